//! CUDA kernels one at a time against the core (or host) function each one's comment in
//! ptx/mamba2.cu names, on the nasty shapes: a regression names its kernel instead of showing up as
//! "NLL off" in the whole chain (tests/gpu.rs). Through the emulator in CI (`--features cuda-emu`),
//! on a GPU with `--features cuda -- --ignored`.
//!
//! All 27 kernels of `stuffed::cuda::KERNELS` (`every_kernel_has_a_contract` keeps it so). Where the
//! core's function is private to its layer (the conv, the SSM, the window, the probe sums), the
//! reference is the definition written out here: the chunked SSD's four kernels each against the
//! plain recurrence in f64 (not the block decomposition they implement), the window kernels over a
//! stream of calls against the full state history, with bounds that scale with Σ|terms|.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]
use half::bf16;
use stuffed::cuda::{i, Arg, DBuf, Gpu};
use stuffed_core::{Data, Weight};

/// The `extern "C" __global__` kernels a CUDA source defines, in order.
fn defined_kernels(cu: &str) -> Vec<&str> {
    cu.split("__global__ void")
        .skip(1)
        .map(|rest| {
            let rest = rest.trim_start();
            // `__launch_bounds__(…)` may stand between `void` and the name.
            let rest = match rest.strip_prefix("__launch_bounds__") {
                Some(r) => r[r.find(')').unwrap() + 1..].trim_start(),
                None => rest,
            };
            &rest[..rest.find('(').unwrap()]
        })
        .collect()
}

/// A kernel added to ptx/mamba2.cu without its name in `KERNELS` and a contract here fails this.
#[test]
fn every_kernel_has_a_contract() {
    let mut defined = defined_kernels(include_str!("../../ptx/mamba2.cu"));
    let mut listed: Vec<&str> = stuffed::cuda::KERNELS.to_vec();
    defined.sort_unstable();
    listed.sort_unstable();
    assert_eq!(defined, listed, "ptx/mamba2.cu's kernels vs stuffed::cuda::KERNELS");
    let src = include_str!("kernel_contracts.rs");
    let missing: Vec<&str> =
        stuffed::cuda::KERNELS.iter().copied().filter(|k| !src.contains(&format!("\"{k}\""))).collect();
    assert!(missing.is_empty(), "kernels without a contract test: {missing:?}");
}

/// Seeded values in [−scale, scale) (the kernel tests' operands, scaled).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    stuffed_tests::values(n, seed).into_iter().map(|v| v * scale).collect()
}

fn download<T: bytemuck::Pod + Default + Clone>(b: &DBuf, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    b.download(0, &mut v).unwrap();
    v
}

/// Largest |a − b| / max(|b|, 1), naming the kernel and shape when over `bound`.
fn check(kernel: &str, shape: &str, got: &[f32], want: &[f32], bound: f32) {
    assert_eq!(got.len(), want.len(), "{kernel} {shape}: lengths");
    let (mut worst, mut at) = (0f32, 0);
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        // A NaN counts as infinitely wrong.
        let e = ((g - w).abs() / w.abs().max(1.0)).max(if g.is_nan() != w.is_nan() { f32::INFINITY } else { 0.0 });
        if e > worst || e.is_nan() {
            (worst, at) = (e, k);
        }
    }
    assert!(worst <= bound, "{kernel} {shape}: element {at}: {} vs {} (rel {worst:e} > {bound:e})", got[at], want[at]);
}

/// Row widths that straddle a warp and a 256-thread block.
const WIDTHS: [usize; 7] = [1, 31, 32, 33, 255, 257, 1000];

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn embed_gathers_rows() {
    let gpu = Gpu::new().unwrap();
    for d in WIDTHS {
        let rows = 37;
        let emb = values(rows * d, d as u64, 1.0);
        let tok: Vec<u32> = [0, 36, 5, 5, 17, 1].into();
        let want: Vec<f32> = tok.iter().flat_map(|&t| emb[t as usize * d..(t as usize + 1) * d].to_vec()).collect();
        let (tb, x) = (DBuf::from(&tok).unwrap(), DBuf::zeroed(tok.len() * d * 4).unwrap());
        let e32 = DBuf::from(&emb).unwrap();
        let args = |e: &DBuf| [Arg::Ptr(e.ptr()), Arg::Ptr(tb.ptr()), Arg::Ptr(x.ptr()), i(tok.len()), i(d)];
        gpu.launch_n("embed_f32", tok.len() * d, &args(&e32)).unwrap();
        check("embed_f32", &format!("d {d}"), &download(&x, tok.len() * d), &want, 0.0);
        let eb: Vec<bf16> = emb.iter().map(|&v| bf16::from_f32(v)).collect();
        let wantb: Vec<f32> = tok
            .iter()
            .flat_map(|&t| eb[t as usize * d..(t as usize + 1) * d].iter().map(|v| v.to_f32()).collect::<Vec<_>>())
            .collect();
        gpu.launch_n("embed_bf16", tok.len() * d, &args(&DBuf::from(&eb).unwrap())).unwrap();
        check("embed_bf16", &format!("d {d}"), &download(&x, tok.len() * d), &wantb, 0.0);
    }
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn rmsnorm_matches_ops_rmsnorm() {
    let gpu = Gpu::new().unwrap();
    for d in WIDTHS {
        for rows in [1usize, 3] {
            let x = values(rows * d, 100 + d as u64, 4.0);
            let w = values(d, 200 + d as u64, 1.5);
            let wt = Weight::new(Data::F32(&w), 1, d).unwrap();
            let mut want = vec![0f32; rows * d];
            for (xr, o) in x.chunks(d).zip(want.chunks_mut(d)) {
                stuffed_core::ops::rmsnorm(xr, &wt, 0, 1e-5, o);
            }
            let (xb, wb) = (DBuf::from(&x).unwrap(), DBuf::from(&w).unwrap());
            let out = DBuf::zeroed(rows * d * 4).unwrap();
            let args = [Arg::Ptr(xb.ptr()), Arg::Ptr(wb.ptr()), Arg::Ptr(out.ptr()), i(d), Arg::F32(1e-5)];
            let shape = format!("rows {rows}, d {d}");
            gpu.launch("rmsnorm_f32", (rows as u32, 1), 256, 0, &args).unwrap();
            check("rmsnorm_f32", &shape, &download(&out, rows * d), &want, 1e-6);
            gpu.launch("rmsnorm_bf16", (rows as u32, 1), 256, 0, &args).unwrap();
            let got: Vec<f32> = download::<bf16>(&out, rows * d).iter().map(|v| v.to_f32()).collect();
            // One bf16 rounding of the f32 result: half an ulp, at most 2⁻⁸ relative (8 significant bits).
            check("rmsnorm_bf16", &shape, &got, &want, 1.0 / 256.0);
        }
    }
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn add_bias_adds_per_column() {
    let gpu = Gpu::new().unwrap();
    for n in WIDTHS {
        let rows = 5;
        let (y, b) = (values(rows * n, n as u64, 2.0), values(n, 7 + n as u64, 2.0));
        let want: Vec<f32> = y.iter().enumerate().map(|(k, &v)| v + b[k % n]).collect();
        let (yb, bb) = (DBuf::from(&y).unwrap(), DBuf::from(&b).unwrap());
        let args = [Arg::Ptr(yb.ptr()), Arg::Ptr(bb.ptr()), Arg::I64(rows as i64), i(n)];
        gpu.launch_n("add_bias", rows * n, &args).unwrap();
        check("add_bias", &format!("n {n}"), &download(&yb, rows * n), &want, 0.0);
    }
}

/// The NLL over vocab tiles (`first`, middle, `last` calls) against log-sum-exp over the whole row
/// (`backend::NllHead` on the CPU), for rows not a multiple of the 8 a block takes.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn lse_tile_gives_the_nll_over_tiles() {
    let gpu = Gpu::new().unwrap();
    let simd = stuffed_core::exec::Simd::Portable;
    for (rows, v, tile) in [(1usize, 1usize, 1usize), (3, 33, 32), (9, 1000, 256), (17, 777, 1000)] {
        let logits = values(rows * v, (rows * v) as u64, 12.0);
        let target: Vec<u32> = (0..rows).map(|r| ((r * 131 + 7) % v) as u32).collect();
        let want: Vec<f32> = (0..rows)
            .map(|r| {
                let row = &logits[r * v..(r + 1) * v];
                stuffed_core::ops::log_sum_exp(simd, row) - row[target[r] as usize]
            })
            .collect();
        let (tb, run, nll) =
            (DBuf::from(&target).unwrap(), DBuf::zeroed(rows * 3 * 4).unwrap(), DBuf::zeroed(rows * 4).unwrap());
        let tiles: Vec<usize> = (0..v).step_by(tile).collect();
        for (k, &v0) in tiles.iter().enumerate() {
            let n = tile.min(v - v0);
            // The tile as the head GEMM leaves it: (rows, n), leading dimension n.
            let t: Vec<f32> = (0..rows).flat_map(|r| logits[r * v + v0..r * v + v0 + n].to_vec()).collect();
            let tbuf = DBuf::from(&t).unwrap();
            let args = [
                Arg::Ptr(tbuf.ptr()),
                i(rows),
                i(n),
                i(v0),
                Arg::Ptr(tb.ptr()),
                Arg::Ptr(run.ptr()),
                Arg::Ptr(nll.ptr()),
                Arg::I32((k == 0) as i32),
                Arg::I32((k + 1 == tiles.len()) as i32),
            ];
            gpu.launch("lse_tile", (rows.div_ceil(8) as u32, 1), 256, 0, &args).unwrap();
        }
        check("lse_tile", &format!("rows {rows}, vocab {v}, tile {tile}"), &download(&nll, rows), &want, 2e-6);
    }
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn argmax_rows_takes_the_first_largest_real_id() {
    let gpu = Gpu::new().unwrap();
    for (v, real) in [(1usize, 1usize), (33, 30), (1000, 1000), (1000, 257)] {
        let rows = 3;
        let mut l = values(rows * v, v as u64, 3.0);
        // Ties: the first index wins; a larger value past `real` is padding and never wins.
        if real > 3 {
            l[2] = 9.0;
            l[real - 1] = 9.0;
        }
        if v > real {
            l[v - 1] = 99.0;
        }
        let want: Vec<u32> = l.chunks(v).map(|r| stuffed::session::argmax(r, real)).collect();
        let (lb, out) = (DBuf::from(&l).unwrap(), DBuf::zeroed(rows * 4).unwrap());
        let args = [Arg::Ptr(lb.ptr()), Arg::Ptr(out.ptr()), i(v), i(real)];
        gpu.launch("argmax_rows", (rows as u32, 1), 256, 0, &args).unwrap();
        assert_eq!(download::<u32>(&out, rows), want, "argmax_rows vocab {v}, real {real}");
    }
}

/// Calibration (τ ← ‖h‖_F per head) and clipping (h ← h·τ/‖h‖ where ‖h‖ > τ), as
/// `Session::at_boundary` does, on a state of 2 layers with a conv part before each SSM part.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn head_norm_calibrates_and_clips_like_the_session() {
    let gpu = Gpu::new().unwrap();
    for (h, pn, conv) in [(1usize, 1usize, 0usize), (3, 33, 5), (8, 1024, 96)] {
        let (nl, ls) = (2usize, conv + h * pn);
        let state = values(nl * ls, (h * pn) as u64, 1.0);
        let head = |s: &[f32], l: usize, k: usize| s[l * ls + conv + k * pn..l * ls + conv + (k + 1) * pn].to_vec();
        let norms: Vec<f32> = (0..nl)
            .flat_map(|l| (0..h).map(move |k| (l, k)))
            .map(|(l, k)| stuffed::session::fro(&head(&state, l, k)))
            .collect();
        let (sb, tau) = (DBuf::from(&state).unwrap(), DBuf::zeroed(nl * h * 4).unwrap());
        let args = |clip: i32| {
            [
                Arg::Ptr(sb.ptr()),
                Arg::Ptr(tau.ptr()),
                i(h),
                i(pn),
                Arg::I64(ls as i64),
                Arg::I64(conv as i64),
                Arg::I32(clip),
            ]
        };
        gpu.launch("head_norm", (h as u32, nl as u32), 256, 0, &args(0)).unwrap();
        let shape = format!("H {h}, PN {pn}, conv {conv}");
        check("head_norm (calibrate)", &shape, &download(&tau, nl * h), &norms, 1e-5);
        // Halve τ for the even heads: those are scaled to half their norm, the others untouched.
        let t: Vec<f32> = norms.iter().enumerate().map(|(k, &n)| if k % 2 == 0 { n / 2.0 } else { n * 2.0 }).collect();
        let mut tb = tau;
        tb.upload(0, &t).unwrap();
        let tau = tb;
        let args = [
            Arg::Ptr(sb.ptr()),
            Arg::Ptr(tau.ptr()),
            i(h),
            i(pn),
            Arg::I64(ls as i64),
            Arg::I64(conv as i64),
            Arg::I32(1),
        ];
        gpu.launch("head_norm", (h as u32, nl as u32), 256, 0, &args).unwrap();
        let mut want = state.clone();
        for l in 0..nl {
            for k in 0..h {
                let (n, tk) = (norms[l * h + k], t[l * h + k]);
                if n > tk {
                    let r = l * ls + conv + k * pn..l * ls + conv + (k + 1) * pn;
                    want[r].iter_mut().for_each(|v| *v *= tk / n);
                }
            }
        }
        check("head_norm (clip)", &shape, &download(&sb, nl * ls), &want, 1e-5);
    }
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn count_nonfinite_counts_nan_and_infinities() {
    let gpu = Gpu::new().unwrap();
    for n in [1usize, 255, 257, 10_000] {
        let mut v = values(n, n as u64, 1.0);
        let bad = [0, n / 2, n - 1];
        v[bad[0]] = f32::NAN;
        v[bad[1]] = f32::INFINITY;
        v[bad[2]] = f32::NEG_INFINITY;
        let want = v.iter().filter(|x| !x.is_finite()).count() as f32;
        let blocks = 4;
        let (vb, out) = (DBuf::from(&v).unwrap(), DBuf::zeroed(blocks * 4).unwrap());
        gpu.launch(
            "count_nonfinite",
            (blocks as u32, 1),
            256,
            0,
            &[Arg::Ptr(vb.ptr()), Arg::I64(n as i64), Arg::Ptr(out.ptr())],
        )
        .unwrap();
        let got: f32 = download::<f32>(&out, blocks).iter().sum();
        assert_eq!(got, want, "count_nonfinite n {n}");
    }
}

/// `RMSNorm_group(y ⊙ silu(z)) · w` over groups of `gs` channels of one row (`Mamba2::layer`'s
/// gated norm), from `ops::silu` and `ops::rmsnorm`.
fn gated_rows(y: &[f32], z: &[f32], w: &[f32], gs: usize) -> Vec<f32> {
    let wt = Weight::new(Data::F32(w), 1, w.len()).unwrap();
    let v: Vec<f32> = y.iter().zip(z).map(|(&y, &z)| y * stuffed_core::ops::silu(z)).collect();
    let mut out = vec![0f32; v.len()];
    for (g, (vg, og)) in v.chunks(gs).zip(out.chunks_mut(gs)).enumerate() {
        stuffed_core::ops::rmsnorm(vg, &wt, g * gs, 1e-5, og);
    }
    out
}

/// `W (rows, K) · h + bias`, in f64 (the reference for the decode GEMVs).
fn gemv(w: &[f32], h: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    w.chunks(h.len())
        .enumerate()
        .map(|(r, row)| {
            let s: f64 = row.iter().zip(h).map(|(&a, &b)| a as f64 * b as f64).sum();
            (s + bias.map_or(0.0, |b| b[r] as f64)) as f32
        })
        .collect()
}

/// Weights as bf16 (what the bf16 kernels read) and back to f32 (what the reference uses).
fn as_bf16(w: &[f32]) -> (Vec<bf16>, Vec<f32>) {
    let b: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let f = b.iter().map(|v| v.to_f32()).collect();
    (b, f)
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn gated_norm_matches_the_layers_gated_rmsnorm() {
    let gpu = Gpu::new().unwrap();
    for (t, di, g) in [(1usize, 32usize, 1usize), (3, 96, 2), (2, 1000, 2), (1, 33, 1)] {
        let (gs, nin) = (di / g, 2 * di + 7);
        let y = values(t * di, di as u64, 2.0);
        let zx = values(t * nin, 3 + di as u64, 3.0);
        let w = values(di, 5 + di as u64, 1.5);
        let want: Vec<f32> =
            (0..t).flat_map(|r| gated_rows(&y[r * di..][..di], &zx[r * nin..][..di], &w, gs)).collect();
        let (yb, zb, wb) = (DBuf::from(&y).unwrap(), DBuf::from(&zx).unwrap(), DBuf::from(&w).unwrap());
        let out = DBuf::zeroed(t * di * 4).unwrap();
        let args = [
            Arg::Ptr(yb.ptr()),
            Arg::Ptr(zb.ptr()),
            Arg::Ptr(wb.ptr()),
            Arg::Ptr(out.ptr()),
            i(di),
            i(nin),
            i(gs),
            Arg::F32(1e-5),
        ];
        let shape = format!("T {t}, di {di}, G {g}");
        gpu.launch("gated_norm_f32", (t as u32, g as u32), 256, 0, &args).unwrap();
        check("gated_norm_f32", &shape, &download(&out, t * di), &want, 1e-5);
        gpu.launch("gated_norm_bf16", (t as u32, g as u32), 256, 0, &args).unwrap();
        let got: Vec<f32> = download::<bf16>(&out, t * di).iter().map(|v| v.to_f32()).collect();
        check("gated_norm_bf16", &shape, &got, &want, 1.0 / 256.0);
    }
}

/// One token's `zx = RMSNorm(x)·nw · W_inᵀ + bias`, with and without a bias, K a multiple of the
/// 16-byte loads and not.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn decode_in_matches_norm_then_gemv() {
    let gpu = Gpu::new().unwrap();
    for (d, nin, with_bias) in [(4usize, 1usize, false), (31, 17, true), (64, 300, false), (1000, 33, true)] {
        let x = values(d, d as u64, 3.0);
        let nw = values(d, 11 + d as u64, 1.5);
        let w = values(nin * d, 13 + d as u64, 0.2);
        let bias = with_bias.then(|| values(nin, 17, 1.0));
        let mut h = vec![0f32; d];
        stuffed_core::ops::rmsnorm(&x, &Weight::new(Data::F32(&nw), 1, d).unwrap(), 0, 1e-5, &mut h);
        let (wb16, w16) = as_bf16(&w);
        let (xb, nwb) = (DBuf::from(&x).unwrap(), DBuf::from(&nw).unwrap());
        let bb = bias.as_ref().map(|b| DBuf::from(b).unwrap());
        let zx = DBuf::zeroed(nin * 4).unwrap();
        for (kernel, wbuf, wf) in
            [("decode_in_f32", DBuf::from(&w).unwrap(), &w), ("decode_in_bf16", DBuf::from(&wb16).unwrap(), &w16)]
        {
            let args = [
                Arg::Ptr(xb.ptr()),
                Arg::Ptr(nwb.ptr()),
                Arg::Ptr(wbuf.ptr()),
                Arg::Ptr(bb.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(zx.ptr()),
                i(d),
                i(nin),
                Arg::F32(1e-5),
                i(16),
            ];
            gpu.launch(kernel, (nin.div_ceil(16) as u32, 1), 256, (d * 4) as u32, &args).unwrap();
            let want = gemv(wf, &h, bias.as_deref());
            check(kernel, &format!("d {d}, nin {nin}, bias {with_bias}"), &download(&zx, nin), &want, 1e-5);
        }
    }
}

/// One token's `x += GroupRMSNorm(y ⊙ silu(z))·gw · W_outᵀ + bias`.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn decode_out_matches_gated_norm_then_gemv() {
    let gpu = Gpu::new().unwrap();
    for (di, d, g, with_bias) in [(32usize, 16usize, 1usize, false), (96, 33, 2, true), (1000, 64, 2, true)] {
        let gs = di / g;
        let y = values(di, di as u64, 2.0);
        let zx = values(2 * di + 5, 19 + di as u64, 3.0);
        let gw = values(di, 23 + di as u64, 1.5);
        let w = values(d * di, 29 + di as u64, 0.2);
        let x0 = values(d, 31, 1.0);
        let bias = with_bias.then(|| values(d, 37, 1.0));
        let h = gated_rows(&y, &zx[..di], &gw, gs);
        let (wb16, w16) = as_bf16(&w);
        let (yb, zb, gb) = (DBuf::from(&y).unwrap(), DBuf::from(&zx).unwrap(), DBuf::from(&gw).unwrap());
        let bb = bias.as_ref().map(|b| DBuf::from(b).unwrap());
        for (kernel, wbuf, wf) in
            [("decode_out_f32", DBuf::from(&w).unwrap(), &w), ("decode_out_bf16", DBuf::from(&wb16).unwrap(), &w16)]
        {
            let x = DBuf::from(&x0).unwrap();
            let args = [
                Arg::Ptr(yb.ptr()),
                Arg::Ptr(zb.ptr()),
                Arg::Ptr(gb.ptr()),
                Arg::Ptr(wbuf.ptr()),
                Arg::Ptr(bb.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(x.ptr()),
                i(di),
                i(d),
                i(gs),
                Arg::F32(1e-5),
                i(16),
            ];
            gpu.launch(kernel, (d.div_ceil(16) as u32, 1), 256, (di * 4) as u32, &args).unwrap();
            let want: Vec<f32> = gemv(wf, &h, bias.as_deref()).iter().zip(&x0).map(|(p, x)| x + p).collect();
            check(kernel, &format!("di {di}, d {d}, G {g}, bias {with_bias}"), &download(&x, d), &want, 1e-5);
        }
    }
}

/// The conv output in f64 (an f32 reference summed without FMA differs from the GPU's FMA sums by
/// ulps of Σ|terms|, which a cancelling sum makes a large part of x) and Σ|terms|, which bounds what
/// the kernel's own f32 rounding of x can be.
struct ConvRef {
    x: f64,
    terms: f64,
}

/// The causal depthwise conv + SiLU of `Mamba2::conv` at token `t` of a call, channel `ch` of xBC:
/// inputs before the call come from the history `cs (k−1, cd)`, oldest first.
#[allow(clippy::too_many_arguments)]
fn conv_ref(
    zx: &[f32],
    cs: &[f32],
    cw: &[f32],
    cb: Option<&[f32]>,
    t: usize,
    ch: usize,
    nin: usize,
    di: usize,
    cd: usize,
    k: usize,
) -> ConvRef {
    let bias = cb.map_or(0.0, |b| b[ch] as f64);
    let (mut acc, mut terms) = (bias, bias.abs());
    for j in 0..k {
        let tau = t as isize - (k as isize - 1) + j as isize;
        let v = if tau < 0 { cs[(k as isize - 1 + tau) as usize * cd + ch] } else { zx[tau as usize * nin + di + ch] };
        let term = cw[ch * k + j] as f64 * v as f64;
        acc += term;
        terms += term.abs();
    }
    ConvRef { x: acc / (1.0 + (-acc).exp()), terms }
}

/// Conv shapes: (T, di, G·N, k) — one token, fewer tokens than the history, more.
const CONV_SHAPES: [(usize, usize, usize, usize); 4] = [(1, 8, 4, 4), (2, 16, 8, 4), (7, 32, 16, 4), (5, 8, 4, 2)];

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn conv_bc_and_conv_state_update_match_the_causal_conv() {
    let gpu = Gpu::new().unwrap();
    for (t, di, gn, k) in CONV_SHAPES {
        let (cd, h) = (di + 2 * gn, 3);
        let nin = di + cd + h;
        let zx = values(t * nin, (t * di) as u64, 2.0);
        let cs = values((k - 1) * cd, 41 + di as u64, 2.0);
        let cw = values(cd * k, 43 + di as u64, 0.5);
        let cb = values(cd, 47, 0.5);
        let shape = format!("T {t}, di {di}, G·N {gn}, k {k}");
        let (zb, csb, cwb, cbb) =
            (DBuf::from(&zx).unwrap(), DBuf::from(&cs).unwrap(), DBuf::from(&cw).unwrap(), DBuf::from(&cb).unwrap());
        let u = DBuf::zeroed(t * cd * 4).unwrap();
        let b_scale = 0.75f32;
        let args = [
            Arg::Ptr(zb.ptr()),
            Arg::Ptr(csb.ptr()),
            Arg::Ptr(cwb.ptr()),
            Arg::Ptr(cbb.ptr()),
            Arg::Ptr(u.ptr()),
            i(t),
            i(nin),
            i(di),
            i(cd),
            i(k),
            i(gn),
            Arg::F32(b_scale),
        ];
        gpu.launch_n("conv_bc", t * (cd - di), &args).unwrap();
        let got = download::<f32>(&u, t * cd);
        let (mut g, mut want) = (Vec::new(), Vec::new());
        for tt in 0..t {
            for ch in di..cd {
                let s = conv_ref(&zx, &cs, &cw, Some(&cb), tt, ch, nin, di, cd, k).x as f32;
                want.push(if ch < di + gn { s * b_scale } else { s });
                g.push(got[tt * cd + ch]);
            }
        }
        check("conv_bc", &shape, &g, &want, 1e-6);
        // The history after the call: the last k−1 inputs (from the call, or still from the history).
        let want: Vec<f32> = (0..k - 1)
            .flat_map(|j| {
                let tau = t as isize - (k as isize - 1) + j as isize;
                (0..cd)
                    .map(|ch| if tau < 0 { cs[(t + j) * cd + ch] } else { zx[tau as usize * nin + di + ch] })
                    .collect::<Vec<_>>()
            })
            .collect();
        let args = [Arg::Ptr(zb.ptr()), Arg::Ptr(csb.ptr()), i(t), i(nin), i(di), i(cd), i(k)];
        gpu.launch_n("conv_state_update", cd, &args).unwrap();
        check("conv_state_update", &shape, &download(&csb, (k - 1) * cd), &want, 0.0);
    }
}

/// One token: conv + SiLU of every channel, the history shifted by one, and Δ per head
/// (`clamp(softplus(raw + dt_bias), lo, hi)·scale`).
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn conv_step_matches_one_token_of_the_conv_and_delta() {
    let gpu = Gpu::new().unwrap();
    for (_, di, gn, k) in CONV_SHAPES {
        let (cd, h) = (di + 2 * gn, 3);
        let nin = di + cd + h;
        let mut zx = values(nin, 53 + di as u64, 2.0);
        zx[nin - 1] = 30.0; // softplus's linear branch
        let cs = values((k - 1) * cd, 59 + di as u64, 2.0);
        let cw = values(cd * k, 61 + di as u64, 0.5);
        let dt_bias = values(h, 67, 1.0);
        let (lo, hi, scale, b_scale) = (1e-3f32, 10.0f32, 0.5f32, 0.75f32);
        let (zb, csb, cwb) = (DBuf::from(&zx).unwrap(), DBuf::from(&cs).unwrap(), DBuf::from(&cw).unwrap());
        let (u, dtb, dt) = (DBuf::zeroed(cd * 4).unwrap(), DBuf::from(&dt_bias).unwrap(), DBuf::zeroed(h * 4).unwrap());
        let args = [
            Arg::Ptr(zb.ptr()),
            Arg::Ptr(csb.ptr()),
            Arg::Ptr(cwb.ptr()),
            Arg::Ptr(0),
            Arg::Ptr(u.ptr()),
            Arg::Ptr(dtb.ptr()),
            Arg::Ptr(dt.ptr()),
            i(nin),
            i(di),
            i(cd),
            i(k),
            i(gn),
            i(h),
            Arg::F32(b_scale),
            Arg::F32(lo),
            Arg::F32(hi),
            Arg::F32(scale),
            Arg::Ptr(0),
        ];
        gpu.launch_n("conv_step", cd + h, &args).unwrap();
        let shape = format!("di {di}, G·N {gn}, k {k}");
        let want: Vec<f32> = (0..cd)
            .map(|ch| {
                let s = conv_ref(&zx, &cs, &cw, None, 0, ch, nin, di, cd, k).x as f32;
                if (di..di + gn).contains(&ch) {
                    s * b_scale
                } else {
                    s
                }
            })
            .collect();
        check("conv_step (u)", &shape, &download(&u, cd), &want, 1e-6);
        let want: Vec<f32> = (0..k - 1)
            .flat_map(|j| (0..cd).map(move |ch| (j, ch)))
            .map(|(j, ch)| if j + 1 < k - 1 { cs[(j + 1) * cd + ch] } else { zx[di + ch] })
            .collect();
        check("conv_step (history)", &shape, &download(&csb, (k - 1) * cd), &want, 0.0);
        let want: Vec<f32> = (0..h)
            .map(|hh| (stuffed_core::ops::softplus(zx[nin - h + hh] + dt_bias[hh]).clamp(lo, hi)) * scale)
            .collect();
        check("conv_step (Δ)", &shape, &download(&dt, h), &want, 1e-6);
        // LongMamba's thresholds: Δ ← 0 where Δ ≤ θ_h (θ at, above and below each head's Δ).
        let plain = download::<f32>(&dt, h);
        let theta: Vec<f32> = plain.iter().enumerate().map(|(hh, &d)| [d, d * 1.5, d * 0.5][hh % 3]).collect();
        let thb = DBuf::from(&theta).unwrap();
        let cs2 = DBuf::from(&cs).unwrap();
        let mut targs = args;
        (targs[1], targs[17]) = (Arg::Ptr(cs2.ptr()), Arg::Ptr(thb.ptr()));
        gpu.launch_n("conv_step", cd + h, &targs).unwrap();
        let want: Vec<f32> = plain.iter().zip(&theta).map(|(&d, &t)| if d <= t { 0.0 } else { d }).collect();
        check("conv_step (Δ, thresholds)", &format!("di {di}"), &download(&dt, h), &want, 0.0);
    }
}

/// One token of the SSM (`Mamba2::step`): s ← exp(dt·A + la)·s + dt·x·Bᵀ, y = C·s + D·x, per head,
/// with G groups of B/C and D per head or per channel.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn ssd_step_matches_one_token_of_the_recurrence() {
    let gpu = Gpu::new().unwrap();
    for (h, p, n, g, per_channel) in
        [(2usize, 8usize, 16usize, 1usize, false), (4, 64, 16, 2, true), (2, 128, 33, 2, false)]
    {
        let di = h * p;
        let cd = di + 2 * g * n;
        let u = values(cd, (h * p * n) as u64, 1.0);
        let dtv: Vec<f32> = values(h, 71, 1.0).iter().map(|v| v.abs() * 0.1 + 1e-3).collect();
        let a_log = values(h, 73, 1.0);
        let ssm = values(h * p * n, 79, 1.0);
        let dv = values(if per_channel { di } else { h }, 83, 1.0);
        let la = -0.01f32;
        let mut s = ssm.clone();
        let mut want = vec![0f32; di];
        for hh in 0..h {
            let gg = hh / (h / g);
            let decay = (dtv[hh] * -a_log[hh].exp() + la).exp();
            let (b, c) = (&u[di + gg * n..][..n], &u[di + g * n + gg * n..][..n]);
            for pp in 0..p {
                let x = u[hh * p + pp];
                let row = &mut s[(hh * p + pp) * n..][..n];
                let mut acc = 0f32;
                for nn in 0..n {
                    row[nn] = decay * row[nn] + dtv[hh] * x * b[nn];
                    acc += c[nn] * row[nn];
                }
                want[hh * p + pp] = acc + if per_channel { dv[hh * p + pp] } else { dv[hh] } * x;
            }
        }
        let (ub, dtb, ab, sb, db) = (
            DBuf::from(&u).unwrap(),
            DBuf::from(&dtv).unwrap(),
            DBuf::from(&a_log).unwrap(),
            DBuf::from(&ssm).unwrap(),
            DBuf::from(&dv).unwrap(),
        );
        let y = DBuf::zeroed(di * 4).unwrap();
        let args = [
            Arg::Ptr(ub.ptr()),
            Arg::Ptr(dtb.ptr()),
            Arg::Ptr(ab.ptr()),
            Arg::Ptr(sb.ptr()),
            Arg::Ptr(db.ptr()),
            Arg::I32(per_channel as i32),
            Arg::Ptr(y.ptr()),
            i(h),
            i(p),
            i(n),
            i(g),
            i(di),
            Arg::F32(la),
        ];
        gpu.launch("ssd_step", (h as u32, 1), 256, 0, &args).unwrap();
        let shape = format!("H {h}, P {p}, N {n}, G {g}, D per channel {per_channel}");
        check("ssd_step (y)", &shape, &download(&y, di), &want, 1e-5);
        check("ssd_step (state)", &shape, &download(&sb, h * p * n), &s, 1e-6);
    }
}

// ---- chunked SSD, sliding window, probe sums ----------------------------------------------------------
// References from the definitions (the recurrence s ← α·s + Δ·x·Bᵀ, y = C·s + D·x, in f64), not from
// the block decomposition the kernels use; the bound scales with Σ|terms| of each output, so the
// cancellation a sum hides cannot hide an error.

/// The GPU's SSD block length (`Q` of ptx/mamba2.cu).
const Q: usize = stuffed::gpumem::GPU_Q;
/// 3xTF32 (f32 models) and f32 accumulation: ≈ 2⁻²⁰·Σ|terms| in practice; one TF32 rounding of the
/// operands (the error `exact` removes) is ≈ 2⁻¹¹ per term, so it fails this bound.
const EXACT: f64 = 1.0 / (1u64 << 18) as f64;
/// TF32 operands (bf16 models): each rounded to 10 mantissa bits, ≤ 2·2⁻¹¹ per product, and margin.
const TF32: f64 = 1.0 / (1u64 << 9) as f64;

/// |got − want| ≤ rel·mag per element, `mag` the sum of the magnitudes of the terms that make `want`.
fn check_sum(kernel: &str, shape: &str, got: &[f32], want: &[f64], mag: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{kernel} {shape}: lengths");
    for (k, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let e = (g as f64 - w).abs();
        // A NaN fails the comparison.
        assert!(e <= rel * m, "{kernel} {shape}: element {k}: {g} vs {w} (|Δ| {e:e} > {rel:e} × Σ|terms| {m:e})");
    }
}

/// A shape of the SSD: T tokens, H heads of P channels, state width N, G groups of B and C.
#[derive(Clone, Copy, Debug)]
struct Ssd {
    t: usize,
    h: usize,
    p: usize,
    n: usize,
    g: usize,
}

/// T = 1, Q ± 1, 3Q + 17; P 8 (padded to 16), 64, 128; N 16 and 33 (not a tile multiple); G 1 and 2.
const SSD_SHAPES: [Ssd; 4] = [
    Ssd { t: 1, h: 2, p: 8, n: 16, g: 1 },
    Ssd { t: Q - 1, h: 2, p: 64, n: 33, g: 2 },
    Ssd { t: Q + 1, h: 2, p: 128, n: 16, g: 1 },
    Ssd { t: 3 * Q + 17, h: 4, p: 64, n: 16, g: 2 },
];

impl Ssd {
    fn di(self) -> usize {
        self.h * self.p
    }
    /// Channels of u: x (di) | B (G·N) | C (G·N).
    fn cd(self) -> usize {
        self.di() + 2 * self.g * self.n
    }
    fn nb(self) -> usize {
        self.t.div_ceil(Q)
    }
    fn group(self, h: usize) -> usize {
        h / (self.h / self.g)
    }
    fn x(self, u: &[f32], t: usize, h: usize, p: usize) -> f32 {
        u[t * self.cd() + h * self.p + p]
    }
    fn b(self, u: &[f32], t: usize, h: usize) -> &[f32] {
        &u[t * self.cd() + self.di() + self.group(h) * self.n..][..self.n]
    }
    fn c(self, u: &[f32], t: usize, h: usize) -> &[f32] {
        &u[t * self.cd() + self.di() + (self.g + self.group(h)) * self.n..][..self.n]
    }
    /// The tokens of block `c`.
    fn block(self, c: usize) -> std::ops::Range<usize> {
        c * Q..((c + 1) * Q).min(self.t)
    }
    fn label(self, exact: bool) -> String {
        format!("T {}, H {}, P {}, N {}, G {}, exact {exact}", self.t, self.h, self.p, self.n, self.g)
    }
}

/// u (T, cd), Δ (T, H) small enough that a block's decay stays in range, and cum (T, H): the in-block
/// inclusive Σ (Δ·A + la) as ssd_cumsum leaves it (f32, in its order).
struct SsdInputs {
    u: Vec<f32>,
    dt: Vec<f32>,
    cum: Vec<f32>,
}

fn ssd_inputs(s: Ssd, seed: u64) -> SsdInputs {
    let u = values(s.t * s.cd(), seed, 1.0);
    let dt: Vec<f32> = values(s.t * s.h, seed + 1, 1.0).iter().map(|v| 0.011 + 0.01 * v).collect();
    let a: Vec<f32> = values(s.h, seed + 2, 0.5).iter().map(|v| -v.exp()).collect();
    let mut cum = vec![0f32; s.t * s.h];
    for c in 0..s.nb() {
        for h in 0..s.h {
            let mut acc = 0f32;
            for t in s.block(c) {
                acc += dt[t * s.h + h] * a[h] - 0.003;
                cum[t * s.h + h] = acc;
            }
        }
    }
    SsdInputs { u, dt, cum }
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn ssd_cumsum_gives_delta_and_the_in_block_decay_sum() {
    let gpu = Gpu::new().unwrap();
    // Steps the thresholds zeroed, of all.
    let mut filtered = (0, 0);
    for (k, s) in SSD_SHAPES.iter().enumerate() {
        let (t, h) = (s.t, s.h);
        let nin = 2 * s.di() + 2 * s.g * s.n + h;
        let mut zx = values(t * nin, 300 + k as u64, 4.0);
        zx[nin - 1] = 30.0; // softplus's linear branch
        let (dt_bias, a_log) = (values(h, 301, 1.0), values(h, 302, 1.0));
        // Clamps off and scale 1; then both clamps active, Δ scaling and RRI's la.
        // And LongMamba's thresholds (one per head, about each head's median Δ): Δ ← 0 at or below.
        let theta: Vec<f32> = (0..h).map(|hh| 0.3 + 0.4 * hh as f32).collect();
        let thb = DBuf::from(&theta).unwrap();
        for (lo, hi, scale, la, th) in [
            (0.0f32, f32::INFINITY, 1.0f32, 0.0f32, false),
            (0.05, 2.0, 0.5, -0.01, false),
            (0.0, f32::INFINITY, 1.0, 0.0, true),
        ] {
            let (zb, bb, ab) = (DBuf::from(&zx).unwrap(), DBuf::from(&dt_bias).unwrap(), DBuf::from(&a_log).unwrap());
            let (dtb, cumb) = (DBuf::new(t * h * 4).unwrap(), DBuf::new(t * h * 4).unwrap());
            let args = [
                Arg::Ptr(zb.ptr()),
                Arg::Ptr(bb.ptr()),
                Arg::Ptr(ab.ptr()),
                Arg::Ptr(dtb.ptr()),
                Arg::Ptr(cumb.ptr()),
                i(t),
                i(nin),
                i(h),
                Arg::F32(lo),
                Arg::F32(hi),
                Arg::F32(scale),
                Arg::F32(la),
                Arg::Ptr(if th { thb.ptr() } else { 0 }),
            ];
            gpu.launch_n("ssd_cumsum", s.nb() * h, &args).unwrap();
            let shape = format!("T {t}, H {h}, clamp [{lo}, {hi}], scale {scale}, la {la}, thresholds {th}");
            let dt: Vec<f32> = (0..t * h)
                .map(|e| {
                    let d = (stuffed_core::ops::softplus(zx[e / h * nin + nin - h + e % h] + dt_bias[e % h])
                        .clamp(lo, hi))
                        * scale;
                    if th && d <= theta[e % h] {
                        0.0
                    } else {
                        d
                    }
                })
                .collect();
            if th {
                filtered.0 += dt.iter().filter(|&&d| d == 0.0).count();
                filtered.1 += dt.len();
            }
            check("ssd_cumsum (Δ)", &shape, &download(&dtb, t * h), &dt, 1e-6);
            let (mut want, mut mag) = (vec![0f64; t * h], vec![0f64; t * h]);
            for c in 0..s.nb() {
                for hh in 0..h {
                    let (mut acc, mut m) = (0f64, 0f64);
                    for tt in s.block(c) {
                        let term = (dt[tt * h + hh] * -a_log[hh].exp() + la) as f64;
                        acc += term;
                        m += term.abs();
                        (want[tt * h + hh], mag[tt * h + hh]) = (acc, m);
                    }
                }
            }
            // Σ over ≤ Q same-sign terms in f32: ≈ 2⁻²⁰·Σ|terms|, bound 2⁻¹⁷.
            check_sum("ssd_cumsum (cum)", &shape, &download(&cumb, t * h), &want, &mag, 1.0 / (1u64 << 17) as f64);
        }
    }
    println!("thresholds zeroed {} of {} steps", filtered.0, filtered.1);
    assert!(filtered.0 > 0 && filtered.0 < filtered.1, "the thresholds filter some steps, not all: {filtered:?}");
}

/// Each block's own state Σ_j exp(cum_last − cum_j)·Δ_j·x_jᵀ·B_j — the recurrence from zero over the
/// block — with x convolved on the way (and written to u's x channels, which start as NaN).
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn ssd_chunk_state_gives_each_blocks_own_state() {
    let gpu = Gpu::new().unwrap();
    for (k, s) in SSD_SHAPES.iter().enumerate() {
        let (t, h, p, n, di, cd, kc) = (s.t, s.h, s.p, s.n, s.di(), s.cd(), 4usize);
        let nin = di + cd + h;
        let inp = ssd_inputs(*s, 400 + k as u64);
        let zx = values(t * nin, 410 + k as u64, 2.0);
        let cs = values((kc - 1) * cd, 411, 2.0);
        let cw = values(cd * kc, 412, 0.5);
        let conv_b = (k % 2 == 0).then(|| values(cd, 413, 0.5));
        let mut u0 = inp.u.clone();
        for tt in 0..t {
            u0[tt * cd..tt * cd + di].fill(f32::NAN);
        }
        let xr: Vec<ConvRef> =
            (0..t * di).map(|e| conv_ref(&zx, &cs, &cw, conv_b.as_deref(), e / di, e % di, nin, di, cd, kc)).collect();
        let x: Vec<f32> = xr.iter().map(|r| r.x as f32).collect();
        let (mut want, mut mag) = (vec![0f64; s.nb() * h * p * n], vec![0f64; s.nb() * h * p * n]);
        for c in 0..s.nb() {
            for hh in 0..h {
                for pp in 0..p {
                    let o = ((c * h + hh) * p + pp) * n;
                    let (st, sm) = (&mut want[o..o + n], &mut mag[o..o + n]);
                    let blk = s.block(c);
                    for tt in blk.clone() {
                        // The recurrence from zero: every earlier term decays by this token's α.
                        let alpha = if tt == blk.start {
                            1.0
                        } else {
                            (inp.cum[tt * h + hh] as f64 - inp.cum[(tt - 1) * h + hh] as f64).exp()
                        };
                        let (dtj, xj) = (inp.dt[tt * h + hh] as f64, &xr[tt * di + hh * p + pp]);
                        // The kernel's x is an f32 conv: k + 1 roundings of ≤ 2⁻²⁴·Σ|conv terms| each
                        // (silu' ≤ 1.1), so 2⁻³·Σ|conv terms| under the 2⁻¹⁸ bound allows 8 ulps of it.
                        let x_mag = xj.x.abs() + xj.terms / 8.0;
                        for (nn, &bv) in s.b(&inp.u, tt, hh).iter().enumerate() {
                            st[nn] = alpha * st[nn] + dtj * xj.x * bv as f64;
                            sm[nn] = alpha * sm[nn] + (dtj * x_mag * bv as f64).abs();
                        }
                    }
                }
            }
        }
        for exact in [true, false] {
            let launch = stuffed::cuda::mamba2::SsdLaunch::chunk_state(h, p, n, s.nb());
            let (ub, zb, csb, cwb) = (
                DBuf::from(&u0).unwrap(),
                DBuf::from(&zx).unwrap(),
                DBuf::from(&cs).unwrap(),
                DBuf::from(&cw).unwrap(),
            );
            let cbb = conv_b.as_ref().map(|b| DBuf::from(b).unwrap());
            let (dtb, cumb) = (DBuf::from(&inp.dt).unwrap(), DBuf::from(&inp.cum).unwrap());
            let st = DBuf::new(s.nb() * h * p * n * 4).unwrap();
            let args = [
                Arg::Ptr(ub.ptr()),
                Arg::Ptr(zb.ptr()),
                Arg::Ptr(csb.ptr()),
                Arg::Ptr(cwb.ptr()),
                Arg::Ptr(cbb.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(dtb.ptr()),
                Arg::Ptr(cumb.ptr()),
                Arg::Ptr(st.ptr()),
                i(t),
                i(h),
                i(p),
                i(n),
                i(s.g),
                i(cd),
                i(di),
                i(nin),
                i(kc),
                i(launch.width),
                Arg::I32(exact as i32),
            ];
            gpu.launch("ssd_chunk_state", launch.grid, 256, launch.shared_bytes, &args).unwrap();
            let shape = s.label(exact);
            let rel = if exact { EXACT } else { TF32 };
            check_sum("ssd_chunk_state (block states)", &shape, &download(&st, want.len()), &want, &mag, rel);
            let got = download::<f32>(&ub, t * cd);
            let gx: Vec<f32> = (0..t * di).map(|e| got[e / di * cd + e % di]).collect();
            check("ssd_chunk_state (x into u)", &shape, &gx, &x, 1e-6);
            let (gbc, wbc): (Vec<f32>, Vec<f32>) =
                (0..t * cd).filter(|e| e % cd >= di).map(|e| (got[e], inp.u[e])).unzip();
            check("ssd_chunk_state (B, C untouched)", &shape, &gbc, &wbc, 0.0);
        }
    }
}

/// The state entering each block: s ← ssm; per block (entering ← s, s ← exp(cum_last)·s + own); ssm ← s.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn ssd_state_pass_chains_the_block_states() {
    let gpu = Gpu::new().unwrap();
    for (k, s) in SSD_SHAPES.iter().enumerate() {
        let (h, pn, nb) = (s.h, s.p * s.n, s.nb());
        let inp = ssd_inputs(*s, 500 + k as u64);
        let own = values(nb * h * pn, 501, 1.0);
        let ssm = values(h * pn, 502, 1.0);
        let (mut want, mut mag) = (vec![0f64; nb * h * pn], vec![0f64; nb * h * pn]);
        let (mut fin, mut fin_mag) = (vec![0f64; h * pn], vec![0f64; h * pn]);
        for e in 0..h * pn {
            let (mut v, mut m) = (ssm[e] as f64, ssm[e].abs() as f64);
            for c in 0..nb {
                (want[c * h * pn + e], mag[c * h * pn + e]) = (v, m);
                let decay = (inp.cum[(s.block(c).end - 1) * h + e / pn] as f64).exp();
                let mine = own[c * h * pn + e] as f64;
                (v, m) = (decay * v + mine, decay * m + mine.abs());
            }
            (fin[e], fin_mag[e]) = (v, m);
        }
        let (st, cumb, ssmb) = (DBuf::from(&own).unwrap(), DBuf::from(&inp.cum).unwrap(), DBuf::from(&ssm).unwrap());
        let args = [Arg::Ptr(st.ptr()), Arg::Ptr(cumb.ptr()), Arg::Ptr(ssmb.ptr()), i(s.t), i(h), i(pn)];
        gpu.launch_n("ssd_state_pass", h * pn, &args).unwrap();
        let shape = s.label(true);
        check_sum("ssd_state_pass (entering states)", &shape, &download(&st, nb * h * pn), &want, &mag, EXACT);
        check_sum("ssd_state_pass (final state)", &shape, &download(&ssmb, h * pn), &fin, &fin_mag, EXACT);
    }
}

/// y_i = C_i·s_i + D·x_i with s_i the recurrence from the block's entering state through token i, given
/// C·Bᵀ per block (NaN outside the causal rows the kernel may read) and D per head or per channel.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn ssd_chunk_scan_gives_the_outputs_from_the_entering_states() {
    let gpu = Gpu::new().unwrap();
    for (k, s) in SSD_SHAPES.iter().enumerate() {
        let (t, h, p, n, g, di, nb) = (s.t, s.h, s.p, s.n, s.g, s.di(), s.nb());
        let inp = ssd_inputs(*s, 600 + k as u64);
        let entering = values(nb * h * p * n, 601, 1.0);
        let per_channel = k % 2 == 1;
        let d = values(if per_channel { di } else { h }, 602, 1.0);
        let mut cb = vec![f32::NAN; nb * g * Q * Q];
        for c in 0..nb {
            let blk = s.block(c);
            for gg in 0..g {
                let hh = gg * (h / g); // a head of group gg
                for i in 0..blk.len() {
                    for j in 0..=i {
                        let (ci, bj) = (s.c(&inp.u, blk.start + i, hh), s.b(&inp.u, blk.start + j, hh));
                        cb[((c * g + gg) * Q + i) * Q + j] = ci.iter().zip(bj).map(|(a, b)| a * b).sum();
                    }
                }
            }
        }
        let (mut want, mut mag) = (vec![0f64; t * di], vec![0f64; t * di]);
        for c in 0..nb {
            let blk = s.block(c);
            for hh in 0..h {
                let gg = s.group(hh);
                for pp in 0..p {
                    let s_in = &entering[((c * h + hh) * p + pp) * n..][..n];
                    for i in blk.clone() {
                        let (ci, cum_i) = (s.c(&inp.u, i, hh), inp.cum[i * h + hh] as f64);
                        let dv = if per_channel { d[hh * p + pp] } else { d[hh] } as f64;
                        let mut terms: Vec<f64> =
                            ci.iter().zip(s_in).map(|(&a, &b)| cum_i.exp() * (a * b) as f64).collect();
                        for j in blk.start..=i {
                            let m = cb[((c * g + gg) * Q + i - blk.start) * Q + j - blk.start] as f64;
                            let decay = (cum_i - inp.cum[j * h + hh] as f64).exp();
                            terms.push(m * decay * inp.dt[j * h + hh] as f64 * s.x(&inp.u, j, hh, pp) as f64);
                        }
                        terms.push(dv * s.x(&inp.u, i, hh, pp) as f64);
                        want[i * di + hh * p + pp] = terms.iter().sum();
                        mag[i * di + hh * p + pp] = terms.iter().map(|v| v.abs()).sum();
                    }
                }
            }
        }
        for exact in [true, false] {
            let launch = stuffed::cuda::mamba2::SsdLaunch::chunk_scan(h, p, nb);
            let (ub, dtb, cumb) =
                (DBuf::from(&inp.u).unwrap(), DBuf::from(&inp.dt).unwrap(), DBuf::from(&inp.cum).unwrap());
            let (stb, cbb, db) = (DBuf::from(&entering).unwrap(), DBuf::from(&cb).unwrap(), DBuf::from(&d).unwrap());
            let y = DBuf::new(t * di * 4).unwrap();
            let args = [
                Arg::Ptr(ub.ptr()),
                Arg::Ptr(dtb.ptr()),
                Arg::Ptr(cumb.ptr()),
                Arg::Ptr(stb.ptr()),
                Arg::Ptr(cbb.ptr()),
                Arg::Ptr(db.ptr()),
                Arg::I32(per_channel as i32),
                Arg::Ptr(y.ptr()),
                i(t),
                i(h),
                i(p),
                i(n),
                i(g),
                i(s.cd()),
                i(di),
                i(launch.width),
                Arg::I32(exact as i32),
            ];
            gpu.launch("ssd_chunk_scan", launch.grid, 256, launch.shared_bytes, &args).unwrap();
            let shape = format!("{}, D per channel {per_channel}", s.label(exact));
            check_sum("ssd_chunk_scan", &shape, &download(&y, t * di), &want, &mag, if exact { EXACT } else { TF32 });
        }
    }
}

/// The lagged state of the window at token `abs` (≥ r), head `hh`, element `e`, and its magnitude
/// twin, when the state was last rebuilt after token `last_end`: the lag restarts from zero there,
/// so it is h_{abs−r} − α_{t0−r+1:abs−r}·h_{t0−r} (t0 = last_end), h the full recurrence.
#[allow(clippy::too_many_arguments)]
fn lag_at(
    states: &[Vec<f64>],
    mags: &[Vec<f64>],
    log_alpha: &[Vec<f32>],
    r: usize,
    last_end: Option<usize>,
    abs: usize,
    hh: usize,
    e: usize,
) -> (f64, f64) {
    let (mut l, mut m) = (states[abs - r][e], mags[abs - r][e]);
    if let Some(t0) = last_end.filter(|&t0| t0 >= r) {
        let d: f64 = (t0 - r + 1..=abs - r).map(|j| log_alpha[j][hh] as f64).sum();
        l -= d.exp() * states[t0 - r][e];
        m += d.exp() * mags[t0 - r][e];
    }
    (l, m)
}

/// The window by state difference over a stream of calls (each ≤ r tokens, the ring wrapping and
/// filling across calls): ssd_window subtracts exp(Σ_{window} log α)·C_t·L_t from y_t once t ≥ r,
/// L the lagged state (h_{t−r} less the tokens before the last rebuild's window); window_store
/// leaves each token's [log α | Δ | B | x] in slot t mod r and no other; window_rebuild, when the
/// call turned the ring over, sets the layer's state to the window's tokens alone, W to their
/// Σ log α and L to zero, and leaves all three as they were otherwise; window_meta advances
/// (position mod r, filled).
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn window_kernels_subtract_the_lagged_state_and_keep_the_ring() {
    let gpu = Gpu::new().unwrap();
    for (k, (h, p, n, g, r, la)) in
        [(2usize, 8usize, 16usize, 1usize, 1usize, 0f32), (2, 64, 33, 2, 4, -0.01), (4, 16, 16, 2, 7, 0.0)]
            .into_iter()
            .enumerate()
    {
        let s = Ssd { t: 0, h, p, n, g };
        let (di, cd, gn, pn) = (s.di(), s.cd(), g * n, p * n);
        let sl = 2 * h + gn + di;
        let a_log = values(h, 700 + k as u64, 0.5);
        let ab = DBuf::from(&a_log).unwrap();
        let ws = DBuf::zeroed((h * pn + r * sl + 2 * h) * 4).unwrap();
        let meta = DBuf::from(&[0f32, 0.0]).unwrap();
        let mut ring = vec![0f32; r * sl];
        // Per absolute token: log α (H), the full state h_t and its magnitude twin (H, P, N).
        let mut log_alpha: Vec<Vec<f32>> = Vec::new();
        let (mut states, mut mags): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (Vec::new(), Vec::new());
        let mut pos = 0;
        let mut last_end: Option<usize> = None;
        for (call, t) in [1, r, r.div_ceil(2), r, 1, r.min(3), r, r].into_iter().enumerate() {
            let seed = 710 + 10 * call as u64 + k as u64;
            let u = values(t * cd, seed, 1.0);
            let dt: Vec<f32> = values(t * h, seed + 1, 1.0).iter().map(|v| 0.11 + 0.1 * v).collect();
            let y0 = values(t * di, seed + 2, 1.0);
            let (mut want, mut mag): (Vec<f64>, Vec<f64>) = y0.iter().map(|&v| (v as f64, v.abs() as f64)).unzip();
            for tt in 0..t {
                let abs = pos + tt;
                let la_t: Vec<f32> = (0..h).map(|hh| dt[tt * h + hh] * -a_log[hh].exp() + la).collect();
                let (prev, prev_m) = match abs {
                    0 => (vec![0f64; h * pn], vec![0f64; h * pn]),
                    _ => (states[abs - 1].clone(), mags[abs - 1].clone()),
                };
                let (mut st, mut sm) = (prev, prev_m);
                for hh in 0..h {
                    let alpha = (la_t[hh] as f64).exp();
                    for pp in 0..p {
                        let xd = (dt[tt * h + hh] * s.x(&u, tt, hh, pp)) as f64;
                        for (nn, &bv) in s.b(&u, tt, hh).iter().enumerate() {
                            let e = (hh * p + pp) * n + nn;
                            st[e] = alpha * st[e] + xd * bv as f64;
                            sm[e] = alpha * sm[e] + (xd * bv as f64).abs();
                        }
                    }
                }
                log_alpha.push(la_t);
                states.push(st);
                mags.push(sm);
                if abs < r {
                    continue;
                }
                // Σ log α over the window (abs − r, abs], per head.
                let window = &log_alpha[abs - r + 1..=abs];
                let w_sums: Vec<f64> = (0..h).map(|hh| window.iter().map(|la| la[hh] as f64).sum()).collect();
                for (hh, &w) in w_sums.iter().enumerate() {
                    for pp in 0..p {
                        let e0 = (hh * p + pp) * n;
                        let (lag, lag_m): (Vec<f64>, Vec<f64>) =
                            (e0..e0 + n).map(|e| lag_at(&states, &mags, &log_alpha, r, last_end, abs, hh, e)).unzip();
                        let ct = s.c(&u, tt, hh);
                        let o = tt * di + hh * p + pp;
                        want[o] -= w.exp() * ct.iter().zip(&lag).map(|(&c, &l)| c as f64 * l).sum::<f64>();
                        mag[o] += w.exp() * ct.iter().zip(&lag_m).map(|(&c, &l)| c.abs() as f64 * l).sum::<f64>();
                    }
                }
            }
            let s0 = values(h * pn, seed + 3, 1.0);
            let end = pos + t - 1;
            let turned = pos % r + t >= r;
            let ssm = DBuf::from(&s0).unwrap();
            let (ub, dtb, yb) = (DBuf::from(&u).unwrap(), DBuf::from(&dt).unwrap(), DBuf::from(&y0).unwrap());
            let shape = [i(t), i(h), i(p), i(n), i(g), i(cd), i(di), i(r), Arg::F32(la)];
            let mut args = vec![Arg::Ptr(ub.ptr()), Arg::Ptr(dtb.ptr()), Arg::Ptr(ab.ptr()), Arg::Ptr(yb.ptr())];
            args.extend([Arg::Ptr(ws.ptr()), Arg::Ptr(meta.ptr())]);
            args.extend(shape);
            gpu.launch("ssd_window", (h as u32, 1), 256, 0, &args).unwrap();
            let label = format!("H {h}, P {p}, N {n}, G {g}, r {r}, la {la}, call {call} at {pos} of {t} tokens");
            check_sum("ssd_window", &label, &download(&yb, t * di), &want, &mag, EXACT);
            args.remove(3);
            gpu.launch_n("window_store", t * sl, &args).unwrap();
            for tt in 0..t {
                let slot = &mut ring[(pos + tt) % r * sl..][..sl];
                slot[..h].copy_from_slice(&log_alpha[pos + tt]);
                slot[h..2 * h].copy_from_slice(&dt[tt * h..(tt + 1) * h]);
                slot[2 * h..2 * h + gn].copy_from_slice(&u[tt * cd + di..tt * cd + di + gn]);
                slot[2 * h + gn..].copy_from_slice(&u[tt * cd..tt * cd + di]);
            }
            let got = download::<f32>(&ws, h * pn + r * sl + 2 * h);
            check("window_store (ring)", &label, &got[h * pn..h * pn + r * sl], &ring, 1e-6);
            let dims = [i(t), i(h), i(p), i(n), i(g), i(di), i(r)];
            let rebuild: Vec<Arg> =
                [Arg::Ptr(meta.ptr()), Arg::Ptr(ws.ptr()), Arg::Ptr(ssm.ptr())].into_iter().chain(dims).collect();
            gpu.launch("window_rebuild", (h as u32, 1), 256, 0, &rebuild).unwrap();
            let (got_state, after) = (download::<f32>(&ssm, h * pn), download::<f32>(&ws, got.len()));
            let wsums = &after[h * pn + r * sl..];
            if turned {
                // The window (end − r, end]: h_end less the decayed h_{end−r} (nothing before when end < r).
                let (mut want_state, mut mag_state) = (states[end].clone(), mags[end].clone());
                for hh in 0..h {
                    let w: f64 = log_alpha[end.saturating_sub(r - 1)..=end].iter().map(|la| la[hh] as f64).sum();
                    let m: f64 = log_alpha[end.saturating_sub(r - 1)..=end].iter().map(|la| la[hh].abs() as f64).sum();
                    let got_w = wsums[2 * hh] as f64 + wsums[2 * hh + 1] as f64;
                    assert!((got_w - w).abs() <= 1e-6 * m, "window_rebuild (W) {label}: head {hh}: {got_w} vs {w}");
                    for e in hh * pn..(hh + 1) * pn {
                        if end >= r {
                            want_state[e] -= w.exp() * states[end - r][e];
                            mag_state[e] += w.exp() * mags[end - r][e];
                        }
                    }
                }
                check_sum("window_rebuild (state)", &label, &got_state, &want_state, &mag_state, EXACT);
                check("window_rebuild (lag)", &label, &after[..h * pn], &vec![0.0; h * pn], 0.0);
                last_end = Some(end);
            } else {
                check("window_rebuild (untouched state)", &label, &got_state, &s0, 0.0);
                check("window_rebuild (untouched cache)", &label, &after, &got, 0.0);
            }
            gpu.launch("window_meta", (1, 1), 32, 0, &[Arg::Ptr(meta.ptr()), i(t), i(r)]).unwrap();
            pos += t;
            let want_meta = [(pos % r) as f32, if pos >= r { 1.0 } else { 0.0 }];
            check("window_meta", &label, &download(&meta, 2), &want_meta, 0.0);
        }
    }
}

/// p (4, H) += Σ_t log α_t, Σ_t Δ_t, Σ_t mean(B_t), Σ_t mean(x_t) (`Mamba2::probe_sums`), T past a
/// block of 256 threads.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn probe_sums_add_the_probe_series() {
    let gpu = Gpu::new().unwrap();
    for (k, s) in SSD_SHAPES.iter().enumerate() {
        let (t, h, p, n) = (s.t, s.h, s.p, s.n);
        let la = if k % 2 == 0 { 0.0f32 } else { -0.01 };
        let inp = ssd_inputs(*s, 800 + k as u64);
        let a_log = values(h, 801, 0.5);
        let p0 = values(4 * h, 802, 1.0);
        let (mut want, mut mag): (Vec<f64>, Vec<f64>) = p0.iter().map(|&v| (v as f64, v.abs() as f64)).unzip();
        for hh in 0..h {
            for tt in 0..t {
                let dt = inp.dt[tt * h + hh];
                let mean = |v: &[f32]| v.iter().map(|&e| e as f64).sum::<f64>() / v.len() as f64;
                let xs: Vec<f32> = (0..p).map(|pp| s.x(&inp.u, tt, hh, pp)).collect();
                let terms = [(dt * -a_log[hh].exp() + la) as f64, dt as f64, mean(s.b(&inp.u, tt, hh)), mean(&xs)];
                for (q, v) in terms.into_iter().enumerate() {
                    want[q * h + hh] += v;
                    mag[q * h + hh] += v.abs();
                }
            }
        }
        let (ub, dtb, ab, pb) = (
            DBuf::from(&inp.u).unwrap(),
            DBuf::from(&inp.dt).unwrap(),
            DBuf::from(&a_log).unwrap(),
            DBuf::from(&p0).unwrap(),
        );
        let args = [
            Arg::Ptr(ub.ptr()),
            Arg::Ptr(dtb.ptr()),
            Arg::Ptr(ab.ptr()),
            Arg::Ptr(pb.ptr()),
            i(t),
            i(h),
            i(p),
            i(n),
            i(s.g),
            i(s.cd()),
            i(s.di()),
            Arg::F32(la),
        ];
        gpu.launch("probe_sums", (h as u32, 1), 256, 0, &args).unwrap();
        // Σ|terms| bounds the f32 sums; a mean of N or P values adds its own rounding, within 2⁻¹⁸.
        check_sum("probe_sums", &format!("{}, la {la}", s.label(true)), &download(&pb, 4 * h), &want, &mag, EXACT);
    }
}
