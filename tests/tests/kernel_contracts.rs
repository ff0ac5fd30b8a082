//! CUDA kernels one at a time against the core (or host) function each one's comment in
//! ptx/mamba2.cu names, on the nasty shapes: a regression names its kernel instead of showing up as
//! "NLL off" in the whole chain (tests/gpu.rs). Through the emulator in CI (`--features cuda-emu`),
//! on a GPU with `--features cuda -- --ignored`.
//!
//! Covered so far (19 of 27): embed_{f32,bf16}, rmsnorm_{f32,bf16}, add_bias, gated_norm_{f32,bf16},
//! decode_in_{f32,bf16}, decode_out_{f32,bf16}, conv_bc, conv_state_update, conv_step, ssd_step,
//! lse_tile, argmax_rows, head_norm, count_nonfinite. Where the core's function is private to its
//! layer (the conv, the SSM step), the reference is its formula written out here. Not yet here:
//! the chunked SSD (ssd_cumsum, ssd_chunk_state, ssd_state_pass, ssd_chunk_scan), the window
//! (ssd_window, window_store, window_meta) and probe_sums.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]
use half::bf16;
use stuffed::cuda::{i, Arg, DBuf, Gpu};
use stuffed_core::{Data, Weight};

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
) -> f32 {
    let mut acc = cb.map_or(0.0, |b| b[ch]);
    for j in 0..k {
        let tau = t as isize - (k as isize - 1) + j as isize;
        let v = if tau < 0 { cs[(k as isize - 1 + tau) as usize * cd + ch] } else { zx[tau as usize * nin + di + ch] };
        acc += cw[ch * k + j] * v;
    }
    stuffed_core::ops::silu(acc)
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
                let s = conv_ref(&zx, &cs, &cw, Some(&cb), tt, ch, nin, di, cd, k);
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
        ];
        gpu.launch_n("conv_step", cd + h, &args).unwrap();
        let shape = format!("di {di}, G·N {gn}, k {k}");
        let want: Vec<f32> = (0..cd)
            .map(|ch| {
                let s = conv_ref(&zx, &cs, &cw, None, 0, ch, nin, di, cd, k);
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
