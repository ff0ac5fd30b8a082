//! RWKV-6 (x060, "Finch") and RWKV-5.2 (x052, "Eagle"): the whole forward math, as FORMATS.md §3.3
//! states it (the `rwkv` package's CPU path).
//!
//! Per layer: `xx = LN(x; ln1)`, token shift against the previous token's `xx`, the mixed inputs
//! `x_r, x_k, x_v, x_g` (and `x_w` in v6, through the data-dependent LoRA `maa_w1/maa_w2`), the
//! projections `r, k, v`, `g = silu(x_g·W_gᵀ)`, the per-key-channel decay `w = exp(−exp(decay))`
//! (v6: `decay + tanh(x_w·dw1)·dw2`, per token; v5.2: static), the WKV recurrence of
//! [`crate::gla`] in [`gla::Mode::Bonus`], a per-head GroupNorm (eps 64e-5), `x += (o ⊙ g)·W_oᵀ`,
//! then the channel mix `x += σ(x_r·W_rᵀ) ⊙ (relu(x_k·W_kᵀ)²·W_vᵀ)`. The embedding row passes
//! through `LN(·; ln0)` (rounded to the embedding's dtype, as the package folds it into a bf16
//! or f16 `emb.weight`, and computed in torch's operation order: [`ln0_row`]).
//!
//! Shapes: `C` = d_model, `H` heads of `N` channels (`C = H·N`), `F` = FFN width, `Dm`/`Dd` = the
//! LoRA ranks (v6).
//!
//! State, per layer (f32): `att_shift (C)` — the last `ln1` output —, `S (H, N_key, N_value)`,
//! `ffn_shift (C)` — the last `ln2` output; layers follow each other. Zero = start of a sequence.
//! Under `Forget::Window { r }` the state continues with one [`gla::window_len`] cache per layer
//! and then two values (position mod r, filled).
use crate::error::{first_non_finite, need, Error};
use crate::exec::{add_rows, for_row_blocks, map_rows, Exec, Shared, Simd};
use crate::forget::{Forget, LayerWindow, Runs};
use crate::gemm::{gemm_nn_outer, matmul, Product, OUTER_MIN_ROWS};
use crate::gla::{self, Mode};
use crate::model::{non_finite_state, run_stack, Call, Recurrent, Scan, Stack, StackShape, WindowShape};
use crate::ops::{exp, fast_exp, fast_silu, map_in_place, relu};
use crate::weight::{with_slice, DType, Data, Elem, Weight};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// x052: lerp token shift, static decay `[H, N]`.
    V5_2,
    /// x060: data-dependent token shift and decay (LoRA).
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub version: Version,
    /// C
    pub d_model: usize,
    pub n_layer: usize,
    /// H
    pub n_heads: usize,
    /// N
    pub head_size: usize,
    /// F
    pub d_ffn: usize,
    /// Dm (v6; 0 for v5.2)
    pub lora_mix: usize,
    /// Dd (v6; 0 for v5.2)
    pub lora_decay: usize,
    pub vocab_rows: usize,
    /// LayerNorm eps (1e-5).
    pub eps: f32,
    /// GroupNorm eps of `ln_x` (64e-5 = 1e-5·head_size_divisor²).
    pub gn_eps: f32,
}

impl Config {
    /// f32 elements of one layer's state: `2C + H·N²`.
    pub fn layer_state_len(&self) -> usize {
        2 * self.d_model + self.n_heads * self.head_size * self.head_size
    }
    pub fn state_size(&self) -> usize {
        self.n_layer * self.layer_state_len()
    }
    pub fn validate(&self) -> Result<(), Error> {
        let c = self;
        if c.d_model == 0 || c.n_layer == 0 || c.n_heads == 0 || c.head_size == 0 || c.d_ffn == 0 {
            return Err(Error::Config("rwkv: a dimension is zero"));
        }
        if c.n_heads * c.head_size != c.d_model {
            return Err(Error::Config("rwkv: n_heads·head_size must equal d_model"));
        }
        if c.head_size > 256 {
            return Err(Error::Config("rwkv: head_size above 256 is not supported"));
        }
        if c.version == Version::V6 && (c.lora_mix == 0 || c.lora_decay == 0) {
            return Err(Error::Config("rwkv6: a LoRA rank is zero"));
        }
        Ok(())
    }
}

/// The token shift of the time mix.
#[derive(Clone, Copy, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum TimeMix<'a> {
    V5 {
        /// (1, C) each: k, v, r, g
        mix: [Weight<'a>; 4],
    },
    V6 {
        /// (1, C)
        maa_x: Weight<'a>,
        /// (1, C) each: w, k, v, r, g
        maa: [Weight<'a>; 5],
        /// (C, 5·Dm), used as `x @ w1`
        w1: Weight<'a>,
        /// (5·Dm, C) (stored `[5, Dm, C]`)
        w2: Weight<'a>,
        /// (C, Dd)
        dw1: Weight<'a>,
        /// (Dd, C)
        dw2: Weight<'a>,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    /// (1, C) each
    pub ln1_w: Weight<'a>,
    pub ln1_b: Weight<'a>,
    pub ln2_w: Weight<'a>,
    pub ln2_b: Weight<'a>,
    pub mix: TimeMix<'a>,
    /// (1, C): `time_decay` (v6 `[1,1,C]`, v5.2 `[H,N]`), before `−exp`.
    pub decay: Weight<'a>,
    /// (1, C): `time_faaaa` (u), as is.
    pub u: Weight<'a>,
    /// (C, C) each
    pub wr: Weight<'a>,
    pub wk: Weight<'a>,
    pub wv: Weight<'a>,
    pub wg: Weight<'a>,
    pub wo: Weight<'a>,
    /// (1, C)
    pub lnx_w: Weight<'a>,
    pub lnx_b: Weight<'a>,
    /// (1, C) each: the channel mix's k and r shift (maa in v6, mix in v5.2).
    pub fmix_k: Weight<'a>,
    pub fmix_r: Weight<'a>,
    /// (F, C)
    pub fk: Weight<'a>,
    /// (C, C)
    pub fr: Weight<'a>,
    /// (C, F)
    pub fv: Weight<'a>,
    /// (H·N, N): a state-tuned model's initial `S` of each head as RWKV-PEFT stores it,
    /// `[head][value][key]` (the transpose of the state; the `rwkv` package transposes it too).
    pub time_state: Option<Weight<'a>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    /// (V, C), before LN0
    pub embed: Weight<'a>,
    /// (1, C)
    pub ln0_w: Weight<'a>,
    pub ln0_b: Weight<'a>,
    pub layers: &'a [Layer<'a>],
    /// (1, C)
    pub ln_out_w: Weight<'a>,
    pub ln_out_b: Weight<'a>,
    /// (V, C)
    pub head: Weight<'a>,
}

pub struct Rwkv<'a> {
    pub cfg: Config,
    pub w: Weights<'a>,
    forget: Forget,
}

const PROBE: &[&str] = &["log_decay_sum"];

/// Scratch regions for `t` tokens.
pub(crate) struct Scratch<'s> {
    /// (t, C) each
    xx: &'s mut [f32],
    dx: &'s mut [f32],
    tmp: &'s mut [f32],
    tmp2: &'s mut [f32],
    r: &'s mut [f32],
    k: &'s mut [f32],
    v: &'s mut [f32],
    g: &'s mut [f32],
    lw: &'s mut [f32],
    o: &'s mut [f32],
    /// (t, max(5·Dm, Dd, F))
    wide: &'s mut [f32],
    /// (H, gla::head_scratch)
    hs: &'s mut [f32],
}

/// LayerNorm of `x` into `out` (biased variance, two passes).
#[inline]
pub fn layer_norm(x: &[f32], w: &Weight, b: &Weight, eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / libm::sqrtf(var + eps);
    w.for_chunks_with(b, 0, x.len(), |i0, wc, bc| {
        for (((o, v), wv), bv) in out[i0..].iter_mut().zip(&x[i0..]).zip(wc).zip(bc) {
            *o = (v - mean) * inv * wv + bv;
        }
    });
}

/// Float lanes of torch's CPU LayerNorm kernel as x86-64 torch 2.15 runs it for a bf16/f16 row
/// (its AVX2 `Vectorized<float>`), and the reduced-precision vector: two float vectors.
const TORCH_LANES: usize = 8;
const TORCH_BLOCK: usize = 2 * TORCH_LANES;
/// Blocks per Welford chunk (ATen `kChunkSize`).
const TORCH_CHUNK: usize = 16;

/// Welford moments of `TORCH_LANES` interleaved streams (ATen `AddMomentsVec` state).
#[derive(Clone, Copy)]
struct LaneMoments {
    n: usize,
    m1: [f32; TORCH_LANES],
    m2: [f32; TORCH_LANES],
}

impl LaneMoments {
    const ZERO: LaneMoments = LaneMoments { n: 0, m1: [0.0; TORCH_LANES], m2: [0.0; TORCH_LANES] };

    /// ATen `AddMomentsVec` (`other` into `self`), with the compiler's fused multiply-add.
    fn merge(&mut self, other: &LaneMoments) {
        let n = self.n + other.n;
        let c = if n == 0 { 0.0 } else { other.n as f32 / n as f32 };
        for i in 0..TORCH_LANES {
            let delta = other.m1[i] - self.m1[i];
            let scaled = c * delta;
            let counted = delta * self.n as f32;
            self.m1[i] += scaled;
            self.m2[i] = libm::fmaf(counted, scaled, self.m2[i] + other.m2[i]);
        }
        self.n = n;
    }
}

/// `F.layer_norm` of one bf16/f16 row exactly as torch's CPU kernel computes it in f32 before it
/// rounds to the row's dtype (the `rwkv` package folds LN0 into a bf16 `emb.weight` this way;
/// FORMATS.md §3.2): ATen `RowwiseMoments` — Welford over 8 float lanes, each 16-element vector
/// as two halves, chunks of 16 vectors merged in a cascade, a scalar tail, then the lanes —, the
/// biased variance, `rstd = 1/√(var + eps)` and `y = ((x·rstd) + (−rstd·mean))·γ + β`, every
/// `a·b + c` fused as GCC compiles it. A different operation order gives a result an f32 ulp away,
/// which now and then rounds to the other bf16 neighbour: one embedding element a bf16 ulp off.
pub fn layer_norm_torch_reduced(x: &[f32], w: &Weight, b: &Weight, eps: f32, out: &mut [f32]) {
    let len = x.len();
    let blocks = len / TORCH_BLOCK;
    let chunks = blocks.div_ceil(TORCH_CHUNK);
    // ATen's CeilLog2, which is 1 for one or two chunks.
    let depth = if chunks <= 2 { 1 } else { (usize::BITS - (chunks - 1).leading_zeros()) as usize };
    let mut stack = [LaneMoments::ZERO; usize::BITS as usize];
    for i in 0..chunks {
        let m0 = TORCH_CHUNK.min(blocks - i * TORCH_CHUNK);
        let base = i * TORCH_CHUNK * TORCH_BLOCK;
        for half in 0..2 {
            let mut acc = LaneMoments { n: m0, ..LaneMoments::ZERO };
            for j in 0..m0 {
                let c = 1.0 / (j + 1) as f32;
                let xs = &x[base + j * TORCH_BLOCK + half * TORCH_LANES..][..TORCH_LANES];
                for (l, &xv) in xs.iter().enumerate() {
                    let delta = xv - acc.m1[l];
                    acc.m1[l] = libm::fmaf(delta, c, acc.m1[l]);
                    acc.m2[l] = libm::fmaf(delta, xv - acc.m1[l], acc.m2[l]);
                }
            }
            stack[0].merge(&acc);
        }
        let mut mask = i + 1;
        for level in 1..depth {
            if mask & 1 != 0 {
                break;
            }
            let lower = stack[level - 1];
            stack[level].merge(&lower);
            stack[level - 1] = LaneMoments::ZERO;
            mask >>= 1;
        }
    }
    for level in 1..depth {
        let upper = stack[level];
        stack[0].merge(&upper);
    }
    let (mut n, mut mean, mut m2) = (0usize, 0f32, 0f32);
    for &xv in &x[blocks * TORCH_BLOCK..] {
        let delta = xv - mean;
        n += 1;
        mean += delta / n as f32;
        m2 = libm::fmaf(delta, xv - mean, m2);
    }
    // ATen `AddMoments` of each lane (each holds two values per vector).
    let per_lane = blocks * TORCH_BLOCK / TORCH_LANES;
    for l in 0..TORCH_LANES {
        let total = n + per_lane;
        let c = if total == 0 { 0.0 } else { per_lane as f32 / total as f32 };
        let delta = stack[0].m1[l] - mean;
        mean = libm::fmaf(c, delta, mean);
        m2 += libm::fmaf(delta * delta * c, n as f32, stack[0].m2[l]);
        n = total;
    }
    let var = m2 / len as f32;
    let rstd = 1.0 / libm::sqrtf(var + eps);
    let shift = -rstd * mean;
    w.for_chunks_with(b, 0, x.len(), |i0, wc, bc| {
        for (((o, &v), wv), bv) in out[i0..].iter_mut().zip(&x[i0..]).zip(wc).zip(bc) {
            *o = libm::fmaf(libm::fmaf(v, rstd, shift), *wv, *bv);
        }
    });
}

/// The token shift of RWKV-5/6/7: `xx = LN(x)` rows (`shift.len()` wide, split across the
/// executor); `prev` = the previous row's `xx` (from `shift` for the first), and `shift` ← the
/// last `xx`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn token_shift(
    ex: &dyn Exec,
    t: usize,
    x: &[f32],
    (w, b): (&Weight, &Weight),
    eps: f32,
    shift: &mut [f32],
    xx: &mut [f32],
    prev: &mut [f32],
) {
    let d = shift.len();
    map_rows(ex, xx, d, t, &|tt, row| layer_norm(&x[tt * d..(tt + 1) * d], w, b, eps, row));
    prev[..d].copy_from_slice(shift);
    prev[d..t * d].copy_from_slice(&xx[..(t - 1) * d]);
    shift.copy_from_slice(&xx[(t - 1) * d..t * d]);
}

/// Weight elements below which a one-token LoRA product stays on one thread (a hand-off costs more).
const ONE_TOKEN_SPLIT: usize = 1 << 15;

/// `out (t, cols) = x (t, rows) @ w`: a product with an `[in, out]` matrix (the LoRAs), row by row
/// as axpys (the ranks are small), tokens split across the executor (one token: its columns).
/// `x` rows are `ldx` apart, `out` rows `ldo` apart, `w` starts at element `off`.
#[allow(clippy::too_many_arguments)]
fn matmul_in_out(
    ex: &dyn Exec,
    x: &[f32],
    ldx: usize,
    t: usize,
    w: &Weight,
    off: usize,
    (rows, cols): (usize, usize),
    out: &mut [f32],
    ldo: usize,
) {
    /// One piece's layout: `nt` ≤ 4 tokens, `x` rows `ldx` apart, `o` rows `ldo` apart, `cols`
    /// outputs a token from weight rows `ldw` apart.
    #[derive(Clone, Copy)]
    struct Piece {
        nt: usize,
        ldx: usize,
        ldo: usize,
        ldw: usize,
        cols: usize,
    }
    /// `NT` tokens: `o = x · w (rows, cols)` by blocks of 16 outputs held in registers for the
    /// `NT` tokens while the weight rows stream past, and the last `cols mod 16` by axpys. Every
    /// output sums over the rows in order (a product, then a sum), as one token's axpys do.
    #[inline(always)]
    fn block<E: Elem, const NT: usize>(x: &[f32], w: &[E], o: &mut [f32], p: Piece) {
        const CB: usize = 16;
        let Piece { ldx, ldo, ldw, cols, .. } = p;
        let full = cols / CB * CB;
        for c0 in (0..full).step_by(CB) {
            let mut acc = [[0f32; CB]; NT];
            for (i, wr) in w.chunks(ldw).enumerate() {
                let mut wv = [0f32; CB];
                for (d, v) in wv.iter_mut().zip(&wr[c0..c0 + CB]) {
                    *d = v.f32();
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    let xv = x[r * ldx + i];
                    for (a, wj) in ar.iter_mut().zip(&wv) {
                        *a += xv * wj;
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                o[r * ldo + c0..r * ldo + c0 + CB].copy_from_slice(ar);
            }
        }
        if full < cols {
            for r in 0..NT {
                o[r * ldo + full..r * ldo + cols].fill(0.0);
            }
            for (i, wr) in w.chunks(ldw).enumerate() {
                for r in 0..NT {
                    let xv = x[r * ldx + i];
                    for (ov, wv) in o[r * ldo + full..r * ldo + cols].iter_mut().zip(&wr[full..cols]) {
                        *ov += xv * wv.f32();
                    }
                }
            }
        }
    }
    /// One token: `o = x · w (rows, cols)` as axpys, the weight rows streamed in order (each
    /// output sums over the rows in order, as `block` does). `block::<1>` read 16 columns of every
    /// row per pass, a strided walk that waited on memory at each row (a decode step's weights are
    /// not in cache; 3.3 % of a RWKV-6 1.6B decode profile, on one core while the other waited).
    #[inline(always)]
    fn axpys<E: Elem>(x: &[f32], w: &[E], o: &mut [f32], Piece { ldw, cols, .. }: Piece) {
        let o = &mut o[..cols];
        o.fill(0.0);
        let hint = crate::gemm::prefetch();
        for (&xv, wr) in x.iter().zip(w.chunks(ldw)) {
            crate::gemm::prefetch_ahead(wr.as_ptr() as *const u8, cols * core::mem::size_of::<E>(), hint);
            for (ov, wv) in o.iter_mut().zip(&wr[..cols]) {
                *ov += xv * wv.f32();
            }
        }
    }
    #[inline(always)]
    fn body<E: Elem>(x: &[f32], w: &[E], o: &mut [f32], p: Piece) {
        match p.nt {
            1 => axpys(x, w, o, p),
            2 => block::<E, 2>(x, w, o, p),
            3 => block::<E, 3>(x, w, o, p),
            _ => block::<E, 4>(x, w, o, p),
        }
    }
    fn dispatch<E: Elem>(simd: Simd, x: &[f32], w: &[E], o: &mut [f32], p: Piece) {
        #[cfg(target_arch = "x86_64")]
        if simd.has_avx2() {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<E: Elem>(x: &[f32], w: &[E], o: &mut [f32], p: Piece) {
                body(x, w, o, p)
            }
            // SAFETY: the host reported AVX2 and FMA at run time.
            return unsafe { avx2(x, w, o, p) };
        }
        let _ = simd;
        body(x, w, o, p)
    }
    let (n, simd) = (rows * cols, ex.simd());
    let len = out.len().min(t * ldo);
    let shared = Shared::new(&mut out[..len]);
    if t == 1 && ex.threads() > 1 && n >= ONE_TOKEN_SPLIT {
        // A decode step: one token has no rows to split, so its columns are split instead (whole
        // 16-column pieces a task); each task sums its outputs over the weight rows in order.
        let per = cols.div_ceil(ex.threads()).next_multiple_of(16);
        ex.for_each(cols.div_ceil(per), &|i| {
            let (c0, c1) = (i * per, ((i + 1) * per).min(cols));
            // SAFETY: the tasks' column ranges are disjoint.
            let o = unsafe { shared.range(c0, c1 - c0) };
            let piece = Piece { nt: 1, ldx, ldo, ldw: cols, cols: c1 - c0 };
            with_slice!(w.data, s => dispatch(simd, x, &s[off + c0..off + n], o, piece));
        });
        return;
    }
    // Products of 16 tokens or more go to the GEMM's outer-product panels (FMA, 16 lanes: the blocks
    // of 4 tokens below ran at a fraction of its rate) whatever the blocks' sizes, so that a token's
    // row does not depend on the thread count; fewer tokens, and other levels, below.
    let fits =
        t >= OUTER_MIN_ROWS && x.len() >= (t - 1) * ldx + rows && len >= (t - 1) * ldo + cols && w.len() >= off + n;
    for_row_blocks(ex, t, &|blk| {
        let mut done = false;
        if fits {
            ex.with_panels(&mut |panels| {
                with_slice!(w.data, s => {
                    let (a, b) = (x[blk.start * ldx..].as_ptr(), s[off..].as_ptr());
                    let c = shared.ptr().wrapping_add(blk.start * ldo);
                    let p = Product { m: blk.len(), n: cols, k: rows, a, lda: ldx, b, ldb: cols, c, ldc: ldo, acc: false };
                    // SAFETY: `fits` bounds every operand; this block alone writes rows `blk` of `out`.
                    done = unsafe { gemm_nn_outer(simd, p, panels) };
                })
            });
        }
        if done {
            return;
        }
        for r0 in blk.clone().step_by(4) {
            let nt = 4.min(blk.end - r0);
            // SAFETY: the blocks of one `for_row_blocks` call are disjoint; rows r0..r0+nt are this block's.
            let o = unsafe { shared.range(r0 * ldo, (nt - 1) * ldo + cols) };
            let x = &x[r0 * ldx..];
            let piece = Piece { nt, ldx, ldo, ldw: cols, cols };
            with_slice!(w.data, s => dispatch(simd, x, &s[off..off + n], o, piece));
        }
    });
}

/// A token's input row: its embedding row `x` (stored as `dtype`) through LN0. For a bf16/f16
/// embedding the result is rounded to that dtype, as the package's fold into `emb.weight` does, and
/// computed in torch's order ([`layer_norm_torch_reduced`]) so that it rounds the same way.
pub fn ln0_row(x: &[f32], dtype: DType, w: &Weight, b: &Weight, eps: f32, out: &mut [f32]) {
    if dtype == DType::F32 {
        layer_norm(x, w, b, eps, out);
    } else {
        layer_norm_torch_reduced(x, w, b, eps, out);
        out.iter_mut().for_each(|v| *v = round_to(dtype, *v));
    }
}

/// Rounds to the storage dtype (the package folds LN0 into a bf16/f16 embedding).
#[inline]
fn round_to(d: DType, v: f32) -> f32 {
    match d {
        DType::F32 => v,
        DType::Bf16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
    }
}

impl<'a> Rwkv<'a> {
    pub fn new(cfg: Config, w: Weights<'a>) -> Result<Self, Error> {
        cfg.validate()?;
        let (c, f, v) = (cfg.d_model, cfg.d_ffn, cfg.vocab_rows);
        if w.layers.len() != cfg.n_layer {
            return Err(Error::Shape { what: "layers", expected: cfg.n_layer, got: w.layers.len() });
        }
        w.embed.expect_shape("emb", v, c)?;
        w.head.expect_shape("head", v, c)?;
        for x in [&w.ln0_w, &w.ln0_b, &w.ln_out_w, &w.ln_out_b] {
            x.expect_shape("ln", 1, c)?;
        }
        for l in w.layers {
            for x in [&l.ln1_w, &l.ln1_b, &l.ln2_w, &l.ln2_b, &l.decay, &l.u, &l.lnx_w, &l.lnx_b, &l.fmix_k, &l.fmix_r]
            {
                x.expect_shape("per-channel vector", 1, c)?;
            }
            for x in [&l.wr, &l.wk, &l.wv, &l.wg, &l.wo, &l.fr] {
                x.expect_shape("att/ffn square projection", c, c)?;
            }
            l.fk.expect_shape("ffn.key", f, c)?;
            l.fv.expect_shape("ffn.value", c, f)?;
            if let Some(ts) = &l.time_state {
                ts.expect_shape("att.time_state", cfg.n_heads * cfg.head_size, cfg.head_size)?;
            }
            if l.time_state.is_some() != w.layers[0].time_state.is_some() {
                return Err(Error::Config("rwkv: att.time_state in some layers but not all"));
            }
            match (&l.mix, cfg.version) {
                (TimeMix::V5 { mix }, Version::V5_2) => {
                    for x in mix {
                        x.expect_shape("time_mix", 1, c)?;
                    }
                }
                (TimeMix::V6 { maa_x, maa, w1, w2, dw1, dw2 }, Version::V6) => {
                    maa_x.expect_shape("time_maa_x", 1, c)?;
                    for x in maa {
                        x.expect_shape("time_maa", 1, c)?;
                    }
                    w1.expect_shape("time_maa_w1", c, 5 * cfg.lora_mix)?;
                    w2.expect_shape("time_maa_w2", 5 * cfg.lora_mix, c)?;
                    dw1.expect_shape("time_decay_w1", c, cfg.lora_decay)?;
                    dw2.expect_shape("time_decay_w2", cfg.lora_decay, c)?;
                }
                _ => return Err(Error::Config("rwkv: layer weights of the wrong version")),
            }
        }
        Ok(Rwkv { cfg, w, forget: Forget::None })
    }

    fn wide(&self) -> usize {
        let c = &self.cfg;
        (5 * c.lora_mix).max(c.lora_decay).max(c.d_ffn)
    }

    fn scratch_parts<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<Scratch<'s>, Error> {
        need("rwkv scratch", buf.len(), self.scratch_len(t))?;
        let c = &self.cfg;
        let tc = t * c.d_model;
        let (xx, rest) = buf.split_at_mut(tc);
        let (dx, rest) = rest.split_at_mut(tc);
        let (tmp, rest) = rest.split_at_mut(tc);
        let (tmp2, rest) = rest.split_at_mut(tc);
        let (r, rest) = rest.split_at_mut(tc);
        let (k, rest) = rest.split_at_mut(tc);
        let (v, rest) = rest.split_at_mut(tc);
        let (g, rest) = rest.split_at_mut(tc);
        let (lw, rest) = rest.split_at_mut(tc);
        let (o, rest) = rest.split_at_mut(tc);
        let (wide, rest) = rest.split_at_mut(t * self.wide());
        let (hs, _) = rest.split_at_mut(c.n_heads * gla::head_scratch(c.head_size, c.head_size));
        Ok(Scratch { xx, dx, tmp, tmp2, r, k, v, g, lw, o, wide, hs })
    }

    /// The mixed input of projection `j`: v5 `xx⊙mix + prev⊙(1−mix)`; v6 `xx + (prev−xx)⊙(maa + m)`
    /// with `m` (t, C) at `m` (or none).
    #[allow(clippy::too_many_arguments)]
    fn mixed(
        &self,
        ex: &dyn Exec,
        t: usize,
        xx: &[f32],
        prev: &[f32],
        mix: &Weight,
        lora: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let d = self.cfg.d_model;
        map_rows(ex, out, d, t, &|tt, o| {
            let r = tt * d..(tt + 1) * d;
            let (a, p) = (&xx[r.clone()], &prev[r]);
            match self.cfg.version {
                Version::V5_2 => mix.for_chunks(0, d, |i0, mc| {
                    for (((o, a), p), &m) in o[i0..].iter_mut().zip(&a[i0..]).zip(&p[i0..]).zip(mc) {
                        *o = a * m + p * (1.0 - m);
                    }
                }),
                Version::V6 => mix.for_chunks(0, d, |i0, mc| {
                    let os = o[i0..].iter_mut().zip(&a[i0..]).zip(&p[i0..]).zip(mc);
                    match lora {
                        Some(l) => {
                            os.zip(&l[tt * d + i0..]).for_each(|((((o, a), p), mv), lv)| *o = a + (p - a) * (mv + lv))
                        }
                        // `+ 0.0` as the absent LoRA added before: −0.0 mixes become +0.0 alike.
                        None => os.for_each(|(((o, a), p), mv)| *o = a + (p - a) * (mv + 0.0)),
                    }
                }),
            }
        });
    }

    /// Layer `call.l` over the rows `x` (in place) from its state `st`; under [`Scan::Recurrent`],
    /// whether the WKV state it wrote is finite (true, unchecked, under [`Scan::Chunked`]).
    fn layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        s: &mut Scratch,
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
    ) -> Result<bool, Error> {
        let Call { ex, t, scan, l } = call;
        let lw = &self.w.layers[l];
        let c = &self.cfg;
        let (d, h, n) = (c.d_model, c.n_heads, c.head_size);
        let tc = t * d;
        let (att_shift, rest) = st.split_at_mut(d);
        let (wkv, ffn_shift) = rest.split_at_mut(h * n * n);

        // Time mix: token shift and the mixed inputs.
        token_shift(ex, t, x, (&lw.ln1_w, &lw.ln1_b), c.eps, att_shift, s.xx, s.dx);
        let (xx, prev, simd) = (&s.xx[..tc], &s.dx[..tc], ex.simd());
        match &lw.mix {
            TimeMix::V5 { mix } => {
                let outs: [(&Weight, &mut [f32]); 3] = [(&lw.wr, &mut *s.r), (&lw.wk, &mut *s.k), (&lw.wv, &mut *s.v)];
                for (j, (w, out)) in outs.into_iter().enumerate() {
                    let m = [&mix[2], &mix[0], &mix[1]][j];
                    self.mixed(ex, t, xx, prev, m, None, s.tmp);
                    matmul(ex, &s.tmp[..tc], t, w, out)?;
                }
                self.mixed(ex, t, xx, prev, &mix[3], None, s.tmp);
                matmul(ex, &s.tmp[..tc], t, &lw.wg, s.g)?;
                map_rows(ex, s.lw, d, t, &|_, row| {
                    lw.decay.for_chunks(0, d, |i0, dc| row[i0..].iter_mut().zip(dc).for_each(|(v, dv)| *v = -exp(*dv)));
                });
            }
            TimeMix::V6 { maa_x, maa, w1, w2, dw1, dw2 } => {
                let dm = c.lora_mix;
                // m = tanh((xx + (prev − xx)⊙maa_x) @ w1)  (t, 5·Dm)
                self.mixed(ex, t, xx, prev, maa_x, None, s.tmp);
                let wide = self.wide();
                matmul_in_out(ex, &s.tmp[..tc], d, t, w1, 0, (d, 5 * dm), s.wide, wide);
                map_rows(ex, s.wide, wide, t, &|_, row| row[..5 * dm].iter_mut().for_each(|v| *v = libm::tanhf(*v)));
                // j = w, k, v, r, g: m_j = m[j] @ w2[j]; x_j = xx + (prev − xx)⊙(maa_j + m_j).
                for (j, maa_j) in maa.iter().enumerate() {
                    matmul_in_out(ex, &s.wide[j * dm..], wide, t, w2, j * dm * d, (dm, d), s.tmp2, d);
                    self.mixed(ex, t, xx, prev, maa_j, Some(&s.tmp2[..tc]), s.tmp);
                    let xin = &s.tmp[..tc];
                    match j {
                        0 => s.o[..tc].copy_from_slice(xin), // x_w, kept for the decay LoRA
                        1 => matmul(ex, xin, t, &lw.wk, s.k)?,
                        2 => matmul(ex, xin, t, &lw.wv, s.v)?,
                        3 => matmul(ex, xin, t, &lw.wr, s.r)?,
                        _ => matmul(ex, xin, t, &lw.wg, s.g)?,
                    }
                }
                // log w = −exp(decay + tanh(x_w @ dw1) @ dw2)
                let dd = c.lora_decay;
                matmul_in_out(ex, &s.o[..tc], d, t, dw1, 0, (d, dd), s.wide, wide);
                map_rows(ex, s.wide, wide, t, &|_, row| row[..dd].iter_mut().for_each(|v| *v = libm::tanhf(*v)));
                matmul_in_out(ex, s.wide, wide, t, dw2, 0, (dd, d), s.lw, d);
                map_rows(ex, s.lw, d, t, &|_, row| {
                    lw.decay.for_chunks(0, d, |i0, dc| row[i0..].iter_mut().zip(dc).for_each(|(v, dv)| *v += dv));
                    map_in_place(simd, row, |v| -fast_exp(v));
                });
            }
        }
        // g = silu(g) and (RWKV-6) the decays through `fast_exp`, 8 lanes at a time: libm's `expf`
        // one value at a time was 2.8 % of a streamed RWKV-6 run.
        map_rows(ex, s.g, d, t, &|_, row| map_in_place(simd, row, fast_silu));
        // Forgetting: w′ = a·w, k′ = b·k (RRI); log w′ = c·log w (Dt).
        match self.forget {
            Forget::Rri { a, b } => {
                let la = libm::logf(a);
                s.lw[..tc].iter_mut().for_each(|v| *v += la);
                s.k[..tc].iter_mut().for_each(|v| *v *= b);
            }
            Forget::Dt { .. } | Forget::DtLayers(_) => {
                let c = self.forget.dt_scale(l);
                s.lw[..tc].iter_mut().for_each(|v| *v *= c)
            }
            _ => {}
        }
        if let Some(p) = probe {
            for row in s.lw[..tc].chunks_exact(d) {
                for (pv, v) in p.iter_mut().zip(row) {
                    *pv += v;
                }
            }
        }

        // WKV, one head per task; o (t, C).
        let simd = ex.simd();
        let (os, ss, hss) = (Shared::new(&mut s.o[..tc]), Shared::new(wkv), Shared::new(&mut *s.hs));
        let hsl = gla::head_scratch(n, n);
        let (r, k, v, lwv) = (&s.r[..tc], &s.k[..tc], &s.v[..tc], &s.lw[..tc]);
        let wss = window.map(|w| (w.at, Shared::new(w.cache)));
        let wkv_finite = gla::FiniteHeads::new();
        ex.for_each(h, &|hh| {
            let mut ub = [0f32; 256];
            let uv = &mut ub[..n.min(256)];
            lw.u.read(hh * n, uv);
            let uv: &[f32] = uv;
            let head = gla::Head {
                q: r,
                k,
                v,
                lw: lwv,
                ldk: d,
                ldv: d,
                koff: hh * n,
                voff: hh * n,
                kd: n,
                vd: n,
                u: uv,
                mode: Mode::Bonus,
            };
            // SAFETY: head hh owns its state block, its scratch and its N columns of o.
            unsafe {
                let sh = ss.range(hh * n * n, n * n);
                match scan {
                    Scan::Recurrent => wkv_finite.note(gla::recurrent(simd, &head, t, sh, &os, d, hh * n)),
                    Scan::Chunked => gla::chunked(ex, &head, t, sh, hss.range(hh * hsl, hsl), &os, d, hh * n),
                }
                if let Some((win, ws)) = &wss {
                    gla::window_head(&head, hh, h, t, *win, ws, sh, &os, d, hh * n);
                }
            }
        });

        // GroupNorm per head, ⊙ g, then x += o·W_oᵀ.
        let g = &s.g[..tc];
        map_rows(ex, s.o, d, t, &|tt, orow| {
            let grow = &g[tt * d..(tt + 1) * d];
            for (hh, oh) in orow.chunks_exact_mut(n).enumerate() {
                let mean = oh.iter().sum::<f32>() / n as f32;
                let var = oh.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                let inv = 1.0 / libm::sqrtf(var + c.gn_eps);
                let h0 = hh * n;
                lw.lnx_w.for_chunks_with(&lw.lnx_b, h0, n, |i0, wc, bc| {
                    let vs = oh[i0..].iter_mut().zip(wc).zip(bc).zip(&grow[h0 + i0..]);
                    vs.for_each(|(((v, wv), bv), gv)| *v = ((*v - mean) * inv * wv + bv) * gv);
                });
            }
        });
        matmul(ex, &s.o[..tc], t, &lw.wo, s.tmp)?;
        add_rows(ex, x, &s.tmp[..tc], d, t);

        // Channel mix.
        token_shift(ex, t, x, (&lw.ln2_w, &lw.ln2_b), c.eps, ffn_shift, s.xx, s.dx);
        let (xx, prev) = (&s.xx[..tc], &s.dx[..tc]);
        self.mixed(ex, t, xx, prev, &lw.fmix_r, None, s.tmp);
        matmul(ex, &s.tmp[..tc], t, &lw.fr, s.r)?;
        self.mixed(ex, t, xx, prev, &lw.fmix_k, None, s.tmp);
        let f = c.d_ffn;
        let kk = &mut s.wide[..t * f];
        matmul(ex, &s.tmp[..tc], t, &lw.fk, kk)?;
        map_rows(ex, kk, f, t, &|_, row| {
            row.iter_mut().for_each(|v| {
                let r = relu(*v);
                *v = r * r
            })
        });
        matmul(ex, kk, t, &lw.fv, s.tmp)?;
        let (o, r) = (&s.tmp[..tc], &s.r[..tc]);
        map_rows(ex, x, d, t, &|tt, row| {
            for ((xv, ov), rv) in row.iter_mut().zip(&o[tt * d..]).zip(&r[tt * d..]) {
                *xv += ov / (1.0 + exp(-rv));
            }
        });
        Ok(wkv_finite.all())
    }
}

impl Stack for Rwkv<'_> {
    type Scratch<'s> = Scratch<'s>;
    fn stack_shape(&self, _: usize) -> Result<StackShape, Error> {
        let c = &self.cfg;
        let window = match self.forget {
            Forget::Window { r } => {
                Some(WindowShape { r, layer_len: gla::window_len(c.n_heads, c.head_size, c.head_size, r) })
            }
            _ => None,
        };
        Ok(StackShape {
            base_len: c.state_size(),
            layer_state_len: c.layer_state_len(),
            probe_per_layer: c.d_model,
            window,
        })
    }
    fn split_scratch<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<Scratch<'s>, Error> {
        self.scratch_parts(t, buf)
    }
    /// The embedding row through LN0 (folded in place as the `rwkv` package does).
    fn embed(&self, tokens: &[u32], x: &mut [f32], s: &mut Scratch) {
        let (d, ed) = (self.cfg.d_model, self.w.embed.dtype());
        for (row, &tok) in x.chunks_exact_mut(d).zip(tokens) {
            self.w.embed.row(tok as usize, s.tmp);
            ln0_row(&s.tmp[..d], ed, &self.w.ln0_w, &self.w.ln0_b, self.cfg.eps, row);
        }
    }
    fn run_layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        s: &mut Scratch,
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
    ) -> Result<(), Error> {
        let wkv_finite = self.layer(call, x, st, s, probe, window)?;
        if call.scan == Scan::Recurrent {
            // The WKV state was checked as it was written; the two token-shift rows are checked here.
            let (d, wkv) = (self.cfg.d_model, self.cfg.n_heads * self.cfg.head_size * self.cfg.head_size);
            let shifts = [&st[..d], &st[d + wkv..]];
            if !wkv_finite || shifts.iter().any(|r| first_non_finite(r).is_some()) {
                return Err(non_finite_state(call.l, st));
            }
        }
        Ok(())
    }
    fn checks_own_state(&self, scan: Scan) -> bool {
        scan == Scan::Recurrent
    }
    fn final_norm(&self, x: &mut [f32], s: &mut Scratch) {
        let d = self.cfg.d_model;
        for row in x.chunks_exact_mut(d) {
            s.tmp[..d].copy_from_slice(row);
            layer_norm(&s.tmp[..d], &self.w.ln_out_w, &self.w.ln_out_b, self.cfg.eps, row);
        }
    }
}

impl Recurrent for Rwkv<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
        probe: Option<&mut [f32]>,
        scan: Scan,
    ) -> Result<(), Error> {
        run_stack(self, ex, tokens, state, scratch, hidden, probe, scan)
    }
    fn d_model(&self) -> usize {
        self.cfg.d_model
    }
    fn vocab_rows(&self) -> usize {
        self.cfg.vocab_rows
    }
    fn state_len(&self) -> usize {
        let c = &self.cfg;
        match self.forget {
            Forget::Window { r } => {
                c.state_size() + c.n_layer * gla::window_len(c.n_heads, c.head_size, c.head_size, r) + 2
            }
            _ => c.state_size(),
        }
    }
    fn scratch_len(&self, chunk: usize) -> usize {
        let c = &self.cfg;
        chunk * (10 * c.d_model + self.wide()) + c.n_heads * gla::head_scratch(c.head_size, c.head_size)
    }
    fn head(&self) -> &Weight<'_> {
        &self.w.head
    }
    fn set_forget(&mut self, f: Forget) -> Result<(), Error> {
        f.check(self.cfg.n_layer)?;
        self.forget = f;
        Ok(())
    }
    fn forget(&self) -> Forget {
        self.forget
    }
    fn n_layer(&self) -> usize {
        self.cfg.n_layer
    }
    fn n_heads(&self) -> usize {
        self.cfg.n_heads
    }
    /// Zeros, then a state-tuned model's `S` of every head: `time_state` transposed.
    fn initial_state(&self, state: &mut [f32]) {
        state.fill(0.0);
        let n = self.cfg.head_size;
        for (l, layer) in self.w.layers.iter().enumerate() {
            let Some(ts) = &layer.time_state else { continue };
            for h in 0..self.cfg.n_heads {
                let r = self.head_state(l, h);
                if let Some(s) = state.get_mut(r) {
                    for (i, row) in s.chunks_exact_mut(n).enumerate() {
                        for (j, x) in row.iter_mut().enumerate() {
                            *x = ts.get((h * n + j) * n + i);
                        }
                    }
                }
            }
        }
    }
    fn head_state(&self, layer: usize, head: usize) -> core::ops::Range<usize> {
        let c = &self.cfg;
        let nn = c.head_size * c.head_size;
        let start = layer * c.layer_state_len() + c.d_model + head * nn;
        start..start + nn
    }
    fn conv_state(&self, layer: usize, head: usize) -> Option<Runs> {
        let c = &self.cfg;
        Some(Runs {
            start: layer * c.layer_state_len() + head * c.head_size,
            len: c.head_size,
            stride: c.d_model + c.n_heads * c.head_size * c.head_size,
            rows: 2,
        })
    }
    fn probe_series(&self) -> (&'static [&'static str], usize) {
        (PROBE, self.cfg.head_size)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use crate::exec::{Exec, Simd};
    use crate::weight::{Data, Weight};
    use half::bf16;
    use std::vec::Vec;

    /// Claims `.0` workers, runs the tasks one after another in reverse order, at level `.1`.
    struct Split(usize, Simd);
    impl Exec for Split {
        fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
            (0..n).rev().for_each(f);
        }
        fn threads(&self) -> usize {
            self.0
        }
        fn simd(&self) -> Simd {
            self.1
        }
    }

    /// A LoRA product of one token (a decode step: its columns split across the tasks) gives, bit
    /// for bit, each output summed over the weight rows in order, and the same row as the same
    /// token among several (tokens split, 16 columns in registers) — f32 and bf16 weights, a
    /// column count no task split divides, the matrix at an offset in its tensor.
    #[test]
    fn one_token_lora_product_is_the_blocked_products_row() {
        let (rows, cols, off) = (40, 1003, 77);
        assert!(rows * cols >= super::ONE_TOKEN_SPLIT);
        let vals: Vec<f32> = (0..off + rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let b: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
        let ldx = rows + 3;
        let x: Vec<f32> = (0..3 * ldx).map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0).collect();
        for data in [Data::F32(&vals), Data::Bf16(&b)] {
            let Ok(w) = Weight::new(data, 1, off + rows * cols) else { panic!("weight view") };
            let want: Vec<f32> =
                (0..cols).map(|j| (0..rows).fold(0f32, |s, i| s + x[i] * w.get(off + i * cols + j))).collect();
            for simd in crate::exec::portable_and_avx2() {
                for threads in [1, 2, 3, 7] {
                    let ex = Split(threads, simd);
                    let ldo = cols + 5;
                    let mut one = std::vec![f32::NAN; ldo];
                    super::matmul_in_out(&ex, &x, ldx, 1, &w, off, (rows, cols), &mut one, ldo);
                    let mut three = std::vec![f32::NAN; 3 * ldo];
                    super::matmul_in_out(&ex, &x, ldx, 3, &w, off, (rows, cols), &mut three, ldo);
                    for j in 0..cols {
                        let what = || std::format!("{simd:?}, {threads} threads, {:?}, column {j}", w.dtype());
                        assert_eq!(one[j].to_bits(), want[j].to_bits(), "{}", what());
                        assert_eq!(three[j].to_bits(), want[j].to_bits(), "{}", what());
                    }
                    assert!(one[cols..].iter().all(|v| v.is_nan()), "wrote past the row");
                }
            }
        }
    }
}
