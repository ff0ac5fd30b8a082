//! GLA (fla `GLAForCausalLM`, Yang et al. 2023): the whole forward math of fla 0.6.0's
//! `GatedLinearAttention` layer (FAMILIES.md §5) around the recurrence of [`crate::gla`].
//!
//! Per layer: `h = RMSNorm(x)`, `q = h·W_qᵀ`, `k = h·W_kᵀ`, `v = h·W_vᵀ` (with `use_short_conv`
//! each through its own causal depthwise conv of width `w` + SiLU), the low-rank gate
//! then `feature_map` on q and k (fla's `ACT2FN[feature_map]`; none or relu here),
//! `gk = (h·W₁ᵀ)·W₂ᵀ + b`, log decay `lw = logsigmoid(gk)/16` (then `max(lw, clamp_min)` when set),
//! kv heads repeated to the query heads (head `h` reads kv head `h / (H/H_kv)`), the recurrence in
//! [`gla::Mode::Inclusive`] with query `q·K^−½` (`S ← diag(exp lw)·S + kᵀv`, `o = q·S`),
//! `o ← RMSNorm_head(o; g_norm, eps) ⊙ silu(h·W_gᵀ)` (no gate without `use_output_gate`),
//! `x += o·W_oᵀ`, then the SwiGLU MLP `x += (silu(h2·W_gateᵀ) ⊙ h2·W_upᵀ)·W_downᵀ` on
//! `h2 = RMSNorm(x)`.
//!
//! RetNet (fla `RetNetForCausalLM`, `MultiScaleRetention`, Sun et al. 2023) is this layer with
//! [`Decay::Retention`]: no gate projection, the fixed log decay `ln(1 − 2^(−5−h))` of query head
//! `h` on every key channel (horizons 32 … 4,096 tokens for 8 heads), and rotary embeddings
//! ([`Config::rope`]) on q and k after the feature map: fla's `RotaryEmbedding(head_k)`, base
//! 10,000, the two halves of each head rotated (`x_i, x_{i+K/2}` by `pos·10000^(−2i/K)`).
//!
//! Shapes: `C` = d_model, `H` heads, `H_kv` kv heads, `K` = key dim per head, `V` = value dim per
//! head, `R` = gate rank, `I` = MLP width, `w` = conv width. Query rows are `H·K` wide, key and
//! gate rows `H_kv·K`, value rows `H_kv·V`, output-gate rows `H·V`.
//!
//! State, per layer (f32): `S (H, K, V)` (`[head][key][value]`), then with the short conv the last
//! `w − 1` inputs of each conv, oldest first: `q (w − 1, H·K)`, `k (w − 1, H_kv·K)`,
//! `v (w − 1, H_kv·V)`; with rotary embeddings then the layer's position, two counters
//! `(pos mod 2^24, pos / 2^24)` that f32 holds exactly ([`crate::model::Recurrent::counters`]).
//! Zero = start of a sequence. Under `Forget::Window { r }` the state continues with one
//! [`gla::window_len`] cache per layer and then two values (position mod r, filled).
use crate::error::{first_non_finite, need, Error};
use crate::exec::{add_rows, for_row_blocks, map_rows, Exec, Shared};
use crate::forget::{Forget, LayerWindow, Runs};
use crate::gemm::matmul;
use crate::gla::{self, Mode};
use crate::model::{non_finite_state, run_stack, Call, Counters, Recurrent, Scan, Stack, StackShape, WindowShape};
use crate::ops::{clamp_min, exp, fast_silu, relu, rmsnorm, rmsnorm_inplace, zip_in_place};
use crate::weight::Weight;

/// The widest short conv the token loop keeps on the stack.
pub const MAX_CONV: usize = 16;

/// Where a layer's per-key-channel log decay comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decay {
    /// GLA: the low-rank gate `logsigmoid((h·W₁ᵀ)·W₂ᵀ + b) / norm`, then `max(·, clamp_min)` when set.
    Gate { norm: f32, clamp_min: Option<f32> },
    /// RetNet: `ln(1 − 2^(−5−h))` for query head `h`, whatever the token.
    Retention,
}

impl Decay {
    /// RetNet's fixed log decay of query head `h` (fla `chunk_retention`'s `g_gamma`).
    pub fn retention(h: usize) -> f32 {
        libm::log1p(-libm::exp2(-5.0 - h as f64)) as f32
    }
}

/// Rotary embeddings' base (fla `RotaryEmbedding`'s default, which RetNet uses).
pub const ROPE_BASE: f64 = 10_000.0;

/// Positions are counted in two f32 values, `pos mod 2^24` and `pos / 2^24`, each exact.
const POS_SPLIT: f64 = 16_777_216.0;

/// fla's `feature_map`: applied to q and k after the short conv, before the recurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureMap {
    /// `feature_map: null` (fla-hub's setting).
    Identity,
    /// `feature_map: "relu"`.
    Relu,
}

impl FeatureMap {
    fn apply(self, x: &mut [f32]) {
        match self {
            FeatureMap::Identity => {}
            FeatureMap::Relu => x.iter_mut().for_each(|v| *v = relu(*v)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// C
    pub d_model: usize,
    pub n_layer: usize,
    /// H
    pub n_heads: usize,
    /// H_kv (divides H)
    pub n_kv_heads: usize,
    /// K (key dim per head)
    pub head_k: usize,
    /// V (value dim per head)
    pub head_v: usize,
    /// R (rank of the gate projection)
    pub gate_rank: usize,
    /// I
    pub d_mlp: usize,
    pub vocab_rows: usize,
    /// w: the short conv's width, 0 without it.
    pub d_conv: usize,
    /// The log decay: GLA's gate or RetNet's fixed per-head decay.
    pub decay: Decay,
    /// Rotary embeddings on q and k (RetNet); the state then carries each layer's position.
    pub rope: bool,
    /// Whether `o` is multiplied by `silu(h·W_gᵀ)` after its norm.
    pub output_gate: bool,
    pub feature_map: FeatureMap,
    /// RMSNorm eps of every norm (attn, g_norm, mlp, final).
    pub eps: f32,
}

impl Config {
    /// Query (and output) key channels `H·K`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_k
    }
    /// Key (and gate) channels `H_kv·K`.
    pub fn k_dim(&self) -> usize {
        self.n_kv_heads * self.head_k
    }
    /// Value channels `H_kv·V`.
    pub fn v_dim(&self) -> usize {
        self.n_kv_heads * self.head_v
    }
    /// Output channels `H·V`.
    pub fn o_dim(&self) -> usize {
        self.n_heads * self.head_v
    }
    /// Channels through the short conv: `q | k | v`.
    pub fn conv_dim(&self) -> usize {
        self.q_dim() + self.k_dim() + self.v_dim()
    }
    pub fn conv_len(&self) -> usize {
        if self.d_conv == 0 {
            0
        } else {
            (self.d_conv - 1) * self.conv_dim()
        }
    }
    /// `H·K·V`: the recurrent matrices of one layer (the paper's state size per layer).
    pub fn matrix_len(&self) -> usize {
        self.n_heads * self.head_k * self.head_v
    }
    /// Per layer: 2 position counters with rotary embeddings, else none.
    pub fn pos_len(&self) -> usize {
        if self.rope {
            2
        } else {
            0
        }
    }
    pub fn layer_state_len(&self) -> usize {
        self.matrix_len() + self.conv_len() + self.pos_len()
    }
    pub fn state_size(&self) -> usize {
        self.n_layer * self.layer_state_len()
    }
    pub fn validate(&self) -> Result<(), Error> {
        let c = self;
        if [c.d_model, c.n_layer, c.n_heads, c.n_kv_heads, c.head_k, c.head_v, c.d_mlp].contains(&0) {
            return Err(Error::Config("gla: a dimension is zero"));
        }
        if !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(Error::Config("gla: num_heads must be a multiple of num_kv_heads"));
        }
        if c.d_conv == 1 || c.d_conv > MAX_CONV {
            return Err(Error::Config("gla: conv_size must be 2..=16"));
        }
        if let Decay::Gate { norm, clamp_min } = c.decay {
            if c.gate_rank == 0 {
                return Err(Error::Config("gla: the key gate's rank is zero"));
            }
            if !(norm > 0.0 && norm.is_finite()) {
                return Err(Error::Config("gla: gate_logit_normalizer must be > 0"));
            }
            if clamp_min.is_some_and(|m| !(m.is_finite() && m < 0.0)) {
                return Err(Error::Config("gla: clamp_min must be finite and < 0"));
            }
        }
        if c.rope && !c.head_k.is_multiple_of(2) {
            return Err(Error::Config("gla: rotary embeddings need an even key dim per head"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    /// (1, C)
    pub attn_norm: Weight<'a>,
    /// (H·K, C)
    pub wq: Weight<'a>,
    /// (H_kv·K, C)
    pub wk: Weight<'a>,
    /// (H_kv·V, C)
    pub wv: Weight<'a>,
    /// (H·V, C), with `output_gate`
    pub wg: Option<Weight<'a>>,
    /// GLA's low-rank key gate; none for RetNet ([`Decay::Retention`]).
    pub gk: Option<KeyGate<'a>>,
    /// Short conv weights (channels, w), with `d_conv > 0`: q (H·K), k (H_kv·K), v (H_kv·V).
    pub conv: Option<[Weight<'a>; 3]>,
    /// (1, V)
    pub g_norm: Weight<'a>,
    /// (C, H·V)
    pub wo: Weight<'a>,
    /// (1, C)
    pub mlp_norm: Weight<'a>,
    /// (I, C) each
    pub gate: Weight<'a>,
    pub up: Weight<'a>,
    /// (C, I)
    pub down: Weight<'a>,
}

/// GLA's key gate `gk = (h·W₁ᵀ)·W₂ᵀ + b` (fla `attn.gk_proj.{0,1}`).
#[derive(Clone, Copy, Debug)]
pub struct KeyGate<'a> {
    /// (R, C)
    pub w1: Weight<'a>,
    /// (H_kv·K, R)
    pub w2: Weight<'a>,
    /// (1, H_kv·K)
    pub bias: Weight<'a>,
}

#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    /// (vocab, C)
    pub embed: Weight<'a>,
    pub layers: &'a [Layer<'a>],
    /// (1, C)
    pub norm: Weight<'a>,
    /// (vocab, C): the embedding itself when tied
    pub head: Weight<'a>,
}

pub struct Gla<'a> {
    pub cfg: Config,
    pub w: Weights<'a>,
    forget: Forget,
}

const PROBE: &[&str] = &["log_decay_sum"];

/// Causal depthwise conv of width `w` + SiLU over `x (t, D)` in place (row stride `D`), continuing
/// from `hist (w − 1, D)` (the last inputs, oldest first), which it leaves holding this call's last
/// `w − 1` inputs. `wt (D, w)`: output `y_t = Σ_j wt[j]·x_{t−(w−1)+j}`. Blocks of [`CONV_BLOCK`]
/// channels are split across the executor, each running its tokens in order with its window in
/// registers, a row of the block at a time (compiled for AVX2 where the executor allows: one
/// channel at a time with `libm`'s exp was 8 % of a Gated DeltaNet run). Nothing is written if `x`
/// or `hist` is shorter than that.
pub(crate) fn short_conv(ex: &dyn Exec, wt: &Weight, w: usize, t: usize, x: &mut [f32], hist: &mut [f32]) {
    let d = wt.rows;
    if w == 0 || w > MAX_CONV || x.len() < t * d || hist.len() < (w - 1) * d {
        return;
    }
    let blocks = d.div_ceil(CONV_BLOCK);
    let tasks = if t * d < 1 << 14 { 1 } else { (ex.threads() * 2).min(blocks).max(1) };
    let per = blocks.div_ceil(tasks);
    let (xs, hs, simd) = (Shared::new(x), Shared::new(hist), ex.simd());
    ex.for_each(tasks, &|task| {
        for b in task * per..((task + 1) * per).min(blocks) {
            let at = ConvBlock { c0: b * CONV_BLOCK, cn: CONV_BLOCK.min(d - b * CONV_BLOCK), d, w, t };
            // SAFETY: lengths checked above; each block reads and writes only its channels' columns.
            unsafe { conv_block(simd, wt, at, xs.ptr(), hs.ptr()) };
        }
    });
}

/// Channels per block of [`short_conv`]: one AVX-512 vector, two AVX2 ones.
const CONV_BLOCK: usize = 16;

/// Which channels of which rows one block of [`short_conv`] runs.
#[derive(Clone, Copy)]
struct ConvBlock {
    c0: usize,
    cn: usize,
    d: usize,
    w: usize,
    t: usize,
}

/// Channels `c0 .. c0 + cn` of [`short_conv`] over every token; compiled for AVX2 when `simd`
/// allows. Per channel the sum runs over the taps in order, as one channel at a time did.
///
/// # Safety
/// `x` holds `t` rows and `hist` `w − 1` rows of `d`; no other thread touches these channels.
unsafe fn conv_block(simd: crate::exec::Simd, wt: &Weight, at: ConvBlock, x: *mut f32, hist: *mut f32) {
    #[inline(always)]
    unsafe fn body(wt: &Weight, at: ConvBlock, x: *mut f32, hist: *mut f32) {
        let ConvBlock { c0, cn, d, w, t } = at;
        let mut taps = [[0f32; CONV_BLOCK]; MAX_CONV];
        let mut win = [[0f32; CONV_BLOCK]; MAX_CONV];
        for i in 0..cn {
            for (j, tap) in taps[..w].iter_mut().enumerate() {
                tap[i] = wt.get((c0 + i) * w + j);
            }
        }
        for (j, row) in win[..w - 1].iter_mut().enumerate() {
            core::ptr::copy_nonoverlapping(hist.add(j * d + c0), row.as_mut_ptr(), cn);
        }
        for tt in 0..t {
            let row = x.add(tt * d + c0);
            core::ptr::copy_nonoverlapping(row, win[w - 1].as_mut_ptr(), cn);
            let mut y = [0f32; CONV_BLOCK];
            for (tap, xin) in taps[..w].iter().zip(&win[..w]) {
                for ((yv, a), b) in y.iter_mut().zip(tap).zip(xin) {
                    *yv += a * b;
                }
            }
            y.iter_mut().for_each(|v| *v = fast_silu(*v));
            core::ptr::copy_nonoverlapping(y.as_ptr(), row, cn);
            win.copy_within(1..w, 0);
        }
        for (j, row) in win[..w - 1].iter().enumerate() {
            core::ptr::copy_nonoverlapping(row.as_ptr(), hist.add(j * d + c0), cn);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(wt: &Weight, at: ConvBlock, x: *mut f32, hist: *mut f32) {
            body(wt, at, x, hist)
        }
        return avx2(wt, at, x, hist);
    }
    let _ = simd;
    body(wt, at, x, hist)
}

/// The SwiGLU MLP block of the GLA-style families (GLA, HGRN-2, DeltaNet):
/// `x += down(silu(gate(h)) ⊙ up(h))` with `h = RMSNorm(x)`, rows split across the executor.
pub(crate) struct Mlp<'a> {
    /// (1, C)
    pub norm: &'a Weight<'a>,
    /// (I, C) each
    pub gate: &'a Weight<'a>,
    pub up: &'a Weight<'a>,
    /// (C, I)
    pub down: &'a Weight<'a>,
    pub eps: f32,
}

/// [`Mlp::run`]'s buffers: `h (t, C)`, `wide (2·t·I)`, `y (t, C)`.
pub(crate) struct MlpScratch<'s> {
    pub h: &'s mut [f32],
    pub wide: &'s mut [f32],
    pub y: &'s mut [f32],
}

impl Mlp<'_> {
    /// The block over the rows `x (t, C)`, in place.
    pub fn run(&self, ex: &dyn Exec, t: usize, x: &mut [f32], s: MlpScratch) -> Result<(), Error> {
        let (d, im) = (self.down.rows, self.gate.rows);
        let xs: &[f32] = x;
        map_rows(ex, s.h, d, t, &|tt, hr| rmsnorm(&xs[tt * d..(tt + 1) * d], self.norm, 0, self.eps, hr));
        let (gt, up) = s.wide.split_at_mut(t * im);
        let h = &s.h[..t * d];
        matmul(ex, h, t, self.gate, gt)?;
        matmul(ex, h, t, self.up, &mut up[..t * im])?;
        let up: &[f32] = up;
        let simd = ex.simd();
        map_rows(ex, gt, im, t, &|tt, row| {
            zip_in_place(simd, row, &up[tt * im..(tt + 1) * im], |g, u| fast_silu(g) * u)
        });
        matmul(ex, gt, t, self.down, &mut s.y[..t * d])?;
        add_rows(ex, x, s.y, d, t);
        Ok(())
    }
}

/// Rotary embeddings of one token at `pos` over its query row (heads of `dk`) and key row, in place
/// (fla `RotaryEmbedding`, not interleaved): channel `i < dk/2` of each head pairs with `i + dk/2`,
/// both turned by `pos·θ_i`, `θ_i = 10000^(−2i/dk)`. The angle is taken in f64 (fla's f32 table
/// is off by ~0.06 rad at position 10⁶); its sine and cosine then in f32.
fn rope_row(pos: f64, dk: usize, q: &mut [f32], k: &mut [f32]) {
    let half = dk / 2;
    for i in 0..half {
        let theta = libm::pow(ROPE_BASE, -((2 * i) as f64) / dk as f64);
        let a = libm::fmod(pos * theta, 2.0 * core::f64::consts::PI);
        let (sin, cos) = (libm::sin(a) as f32, libm::cos(a) as f32);
        for row in [&mut *q, &mut *k] {
            for head in row.chunks_exact_mut(dk) {
                let (x0, x1) = (head[i], head[i + half]);
                head[i] = x0 * cos - x1 * sin;
                head[i + half] = x1 * cos + x0 * sin;
            }
        }
    }
}

/// Repeats each of the `nkv` heads of width `dh` of the rows `buf[..t·nkv·dh]` `g` times in place,
/// giving rows of `nkv·g·dh` (head `h` = source head `h / g`). Back to front, so no source is
/// overwritten before it is read.
fn repeat_heads(buf: &mut [f32], t: usize, nkv: usize, g: usize, dh: usize) {
    if g == 1 {
        return;
    }
    let (nw, ww) = (nkv * dh, nkv * g * dh);
    for tt in (0..t).rev() {
        for h in (0..nkv * g).rev() {
            let src = tt * nw + (h / g) * dh;
            buf.copy_within(src..src + dh, tt * ww + h * dh);
        }
    }
}

impl<'a> Gla<'a> {
    pub fn new(cfg: Config, w: Weights<'a>) -> Result<Self, Error> {
        cfg.validate()?;
        let (c, i, v) = (cfg.d_model, cfg.d_mlp, cfg.vocab_rows);
        if w.layers.len() != cfg.n_layer {
            return Err(Error::Shape { what: "layers", expected: cfg.n_layer, got: w.layers.len() });
        }
        w.embed.expect_shape("embeddings", v, c)?;
        w.head.expect_shape("lm_head", v, c)?;
        w.norm.expect_shape("norm", 1, c)?;
        for l in w.layers {
            l.attn_norm.expect_shape("attn_norm", 1, c)?;
            l.mlp_norm.expect_shape("mlp_norm", 1, c)?;
            l.wq.expect_shape("attn.q_proj", cfg.q_dim(), c)?;
            l.wk.expect_shape("attn.k_proj", cfg.k_dim(), c)?;
            l.wv.expect_shape("attn.v_proj", cfg.v_dim(), c)?;
            match (&l.wg, cfg.output_gate) {
                (Some(g), true) => g.expect_shape("attn.g_proj", cfg.o_dim(), c)?,
                (None, false) => {}
                _ => return Err(Error::Config("gla: attn.g_proj present exactly when use_output_gate")),
            }
            match (&l.gk, cfg.decay) {
                (Some(g), Decay::Gate { .. }) => {
                    g.w1.expect_shape("attn.gk_proj.0", cfg.gate_rank, c)?;
                    g.w2.expect_shape("attn.gk_proj.1", cfg.k_dim(), cfg.gate_rank)?;
                    g.bias.expect_shape("attn.gk_proj.1.bias", 1, cfg.k_dim())?;
                }
                (None, Decay::Retention) => {}
                _ => return Err(Error::Config("gla: a key gate exactly when the decay is gated")),
            }
            match (&l.conv, cfg.d_conv) {
                (None, 0) => {}
                (Some([q, k, vv]), w) if w > 0 => {
                    q.expect_shape("attn.q_conv1d", cfg.q_dim(), w)?;
                    k.expect_shape("attn.k_conv1d", cfg.k_dim(), w)?;
                    vv.expect_shape("attn.v_conv1d", cfg.v_dim(), w)?;
                }
                _ => return Err(Error::Config("gla: conv weights present exactly when use_short_conv")),
            }
            l.g_norm.expect_shape("attn.g_norm", 1, cfg.head_v)?;
            l.wo.expect_shape("attn.o_proj", c, cfg.o_dim())?;
            l.gate.expect_shape("mlp.gate_proj", i, c)?;
            l.up.expect_shape("mlp.up_proj", i, c)?;
            l.down.expect_shape("mlp.down_proj", c, i)?;
        }
        Ok(Gla { cfg, w, forget: Forget::None })
    }

    /// Layer `call.l` over the rows `x (t, C)` (in place) from its state `st` ([`Config::layer_state_len`]).
    ///
    /// Scratch (f32, in this order): `h (t, C)`, `y (t, C)`, `q (t, H·K)`, `k (t, H·K)`,
    /// `lw (t, H·K)`, `v (t, H·V)`, `o (t, H·V)`, `g (t, H·V)`, `lr (t, R)`, `wide (2t, I)`, then
    /// `H` × [`gla::head_scratch`] for the chunked form. Under [`Scan::Recurrent`], whether the
    /// heads' matrices it wrote are finite (true, unchecked, under [`Scan::Chunked`]).
    fn layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        scratch: &mut [f32],
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
    ) -> Result<bool, Error> {
        let Call { ex, t, scan, l } = call;
        let lw = &self.w.layers[l];
        let c = &self.cfg;
        let (d, nh, nkv, dk, dv, im) = (c.d_model, c.n_heads, c.n_kv_heads, c.head_k, c.head_v, c.d_mlp);
        let (qd, od, grp) = (c.q_dim(), c.o_dim(), nh / nkv);
        let (h, rest) = scratch.split_at_mut(t * d);
        let (y, rest) = rest.split_at_mut(t * d);
        let (q, rest) = rest.split_at_mut(t * qd);
        let (k, rest) = rest.split_at_mut(t * qd);
        let (lwb, rest) = rest.split_at_mut(t * qd);
        let (v, rest) = rest.split_at_mut(t * od);
        let (o, rest) = rest.split_at_mut(t * od);
        let (g, rest) = rest.split_at_mut(t * od);
        let (lr, rest) = rest.split_at_mut(t * c.gate_rank);
        let (wide, rest) = rest.split_at_mut(2 * t * im);
        let hsl = gla::head_scratch(dk, dv);
        let hs = &mut rest[..nh * hsl];
        let (sm, rest_st) = st.split_at_mut(c.matrix_len());
        let (conv_st, pos_st) = rest_st.split_at_mut(c.conv_len());
        let pos0 = match pos_st {
            [lo, hi, ..] => *hi as f64 * POS_SPLIT + *lo as f64,
            _ => 0.0,
        };

        let xs: &[f32] = x;
        map_rows(ex, h, d, t, &|tt, hr| rmsnorm(&xs[tt * d..(tt + 1) * d], &lw.attn_norm, 0, c.eps, hr));
        // Projections, narrow (H_kv heads) at the front of k, v and lw.
        let (kn, vn) = (t * c.k_dim(), t * c.v_dim());
        matmul(ex, h, t, &lw.wq, q)?;
        matmul(ex, h, t, &lw.wk, &mut k[..kn])?;
        matmul(ex, h, t, &lw.wv, &mut v[..vn])?;
        if let Some([cq, ck, cv]) = &lw.conv {
            let w = c.d_conv;
            let (hq, rest) = conv_st.split_at_mut((w - 1) * qd);
            let (hk, hv) = rest.split_at_mut((w - 1) * c.k_dim());
            short_conv(ex, cq, w, t, q, hq);
            short_conv(ex, ck, w, t, &mut k[..kn], hk);
            short_conv(ex, cv, w, t, &mut v[..vn], hv);
        }
        c.feature_map.apply(q);
        c.feature_map.apply(&mut k[..kn]);
        if c.rope {
            let kd = c.k_dim();
            let (qs, ks) = (Shared::new(q), Shared::new(&mut k[..kn]));
            for_row_blocks(ex, t, &|rows| {
                // SAFETY: the blocks of one call are disjoint rows of q and of k.
                let (qb, kb) = unsafe { (qs.rows(rows.clone(), qd), ks.rows(rows.clone(), kd)) };
                for ((tt, qr), kr) in rows.zip(qb.chunks_exact_mut(qd)).zip(kb.chunks_exact_mut(kd)) {
                    rope_row(pos0 + tt as f64, dk, qr, kr);
                }
            });
            if let [lo, hi, ..] = pos_st {
                let p = pos0 + t as f64;
                *hi = libm::floor(p / POS_SPLIT) as f32;
                *lo = (p - *hi as f64 * POS_SPLIT) as f32;
            }
        }
        let (rri, dtc) = match self.forget {
            Forget::Rri { a, b } => ((libm::logf(a), b), 1.0),
            Forget::Dt { .. } | Forget::DtLayers(_) => ((0.0, 1.0), self.forget.dt_scale(l)),
            _ => ((0.0, 1.0), 1.0),
        };
        let kd = c.k_dim();
        if let (Some(gk), Decay::Gate { norm, clamp_min: floor }) = (&lw.gk, c.decay) {
            matmul(ex, h, t, &gk.w1, lr)?;
            matmul(ex, lr, t, &gk.w2, &mut lwb[..kn])?;
            let (gs, ks) = (Shared::new(&mut lwb[..kn]), Shared::new(&mut k[..kn]));
            for_row_blocks(ex, t, &|rows| {
                // SAFETY: the blocks of one call are disjoint rows of lwb and of k.
                let (gb, kb) = unsafe { (gs.rows(rows.clone(), kd), ks.rows(rows, kd)) };
                for (grow, krow) in gb.chunks_exact_mut(kd).zip(kb.chunks_exact_mut(kd)) {
                    for ch in 0..kd {
                        let gv = grow[ch] + gk.bias.get(ch);
                        let ls = if gv >= 0.0 { -libm::log1pf(exp(-gv)) } else { gv - libm::log1pf(exp(gv)) };
                        let mut lg = ls / norm;
                        if let Some(m) = floor {
                            lg = clamp_min(lg, m);
                        }
                        grow[ch] = lg * dtc + rri.0;
                        krow[ch] *= rri.1;
                    }
                }
            });
        }
        repeat_heads(k, t, nkv, grp, dk);
        repeat_heads(v, t, nkv, grp, dv);
        if c.decay == Decay::Retention {
            // Every key channel of query head h decays by γ_h, scaled as the gate's would be.
            map_rows(ex, lwb, qd, t, &|_, row| {
                for (hh, head) in row.chunks_exact_mut(dk).enumerate() {
                    head.fill(Decay::retention(hh) * dtc + rri.0);
                }
            });
            if rri.1 != 1.0 {
                map_rows(ex, k, qd, t, &|_, row| row.iter_mut().for_each(|x| *x *= rri.1));
            }
        } else {
            repeat_heads(lwb, t, nkv, grp, dk);
        }
        let scale = 1.0 / libm::sqrtf(dk as f32);
        map_rows(ex, q, qd, t, &|_, row| row.iter_mut().for_each(|x| *x *= scale));
        if let Some(p) = probe {
            for row in lwb.chunks_exact(qd) {
                for (pv, x) in p.iter_mut().zip(row) {
                    *pv += x;
                }
            }
        }
        let simd = ex.simd();
        let finite = gla::FiniteHeads::new();
        {
            let (os, ss, hss) = (Shared::new(o), Shared::new(sm), Shared::new(hs));
            let (qr, kr, vr, lwr) = (&*q, &*k, &*v, &*lwb);
            let wss = window.map(|w| (w.at, Shared::new(w.cache)));
            ex.for_each(nh, &|hh| {
                let head = gla::Head {
                    q: qr,
                    k: kr,
                    v: vr,
                    lw: lwr,
                    ldk: qd,
                    ldv: od,
                    koff: hh * dk,
                    voff: hh * dv,
                    kd: dk,
                    vd: dv,
                    u: &[],
                    mode: Mode::Inclusive,
                };
                // SAFETY: head hh owns its state block, its scratch and its V columns of o.
                unsafe {
                    let sh = ss.range(hh * dk * dv, dk * dv);
                    match scan {
                        Scan::Recurrent => finite.note(gla::recurrent(simd, &head, t, sh, &os, od, hh * dv)),
                        Scan::Chunked => gla::chunked(ex, &head, t, sh, hss.range(hh * hsl, hsl), &os, od, hh * dv),
                    }
                    if let Some((win, ws)) = &wss {
                        gla::window_head(&head, hh, nh, t, *win, ws, sh, &os, od, hh * dv);
                    }
                }
            });
        }
        map_rows(ex, o, od, t, &|_, row| {
            row.chunks_exact_mut(dv).for_each(|head| rmsnorm_inplace(head, &lw.g_norm, 0, c.eps))
        });
        if let Some(wg) = &lw.wg {
            matmul(ex, h, t, wg, g)?;
            let g: &[f32] = g;
            let simd = ex.simd();
            map_rows(ex, o, od, t, &|tt, row| {
                zip_in_place(simd, row, &g[tt * od..(tt + 1) * od], |o, g| o * fast_silu(g))
            });
        }
        matmul(ex, o, t, &lw.wo, y)?;
        add_rows(ex, x, y, d, t);
        let mlp = Mlp { norm: &lw.mlp_norm, gate: &lw.gate, up: &lw.up, down: &lw.down, eps: c.eps };
        mlp.run(ex, t, x, MlpScratch { h, wide, y })?;
        Ok(finite.all())
    }
}

impl Stack for Gla<'_> {
    type Scratch<'s> = &'s mut [f32];
    fn stack_shape(&self, _: usize) -> Result<StackShape, Error> {
        let c = &self.cfg;
        let window = match self.forget {
            Forget::Window { r } => {
                Some(WindowShape { r, layer_len: gla::window_len(c.n_heads, c.head_k, c.head_v, r) })
            }
            _ => None,
        };
        Ok(StackShape {
            base_len: c.state_size(),
            layer_state_len: c.layer_state_len(),
            probe_per_layer: c.q_dim(),
            window,
        })
    }
    fn split_scratch<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<&'s mut [f32], Error> {
        need("gla scratch", buf.len(), self.scratch_len(t))?;
        Ok(buf)
    }
    fn embed(&self, tokens: &[u32], x: &mut [f32], _: &mut &mut [f32]) {
        for (row, &tok) in x.chunks_exact_mut(self.cfg.d_model).zip(tokens) {
            self.w.embed.row(tok as usize, row);
        }
    }
    fn run_layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        s: &mut &mut [f32],
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
    ) -> Result<(), Error> {
        // The heads' matrices are checked as the token step writes them; the conv history here.
        let finite = self.layer(call, x, st, s, probe, window)?;
        if call.scan == Scan::Recurrent && (!finite || first_non_finite(&st[self.cfg.matrix_len()..]).is_some()) {
            return Err(non_finite_state(call.l, st));
        }
        Ok(())
    }
    fn checks_own_state(&self, scan: Scan) -> bool {
        scan == Scan::Recurrent
    }
    fn final_norm(&self, x: &mut [f32], _: &mut &mut [f32]) {
        for row in x.chunks_exact_mut(self.cfg.d_model) {
            rmsnorm_inplace(row, &self.w.norm, 0, self.cfg.eps);
        }
    }
}

impl Recurrent for Gla<'_> {
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
            Forget::Window { r } => c.state_size() + c.n_layer * gla::window_len(c.n_heads, c.head_k, c.head_v, r) + 2,
            _ => c.state_size(),
        }
    }
    fn scratch_len(&self, chunk: usize) -> usize {
        let c = &self.cfg;
        chunk * (2 * c.d_model + 3 * c.q_dim() + 3 * c.o_dim() + c.gate_rank + 2 * c.d_mlp)
            + c.n_heads * gla::head_scratch(c.head_k, c.head_v)
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
    fn head_state(&self, layer: usize, head: usize) -> core::ops::Range<usize> {
        let c = &self.cfg;
        let hl = c.head_k * c.head_v;
        let start = layer * c.layer_state_len() + head * hl;
        start..start + hl
    }
    /// The head's own query channels of the conv history (its key and value channels are shared
    /// by the heads of one kv group).
    fn conv_state(&self, layer: usize, head: usize) -> Option<Runs> {
        let c = &self.cfg;
        (c.d_conv > 0).then(|| Runs {
            start: layer * c.layer_state_len() + c.matrix_len() + head * c.head_k,
            len: c.head_k,
            stride: c.q_dim(),
            rows: c.d_conv - 1,
        })
    }
    fn probe_series(&self) -> (&'static [&'static str], usize) {
        (PROBE, self.cfg.head_k)
    }
    /// RetNet's rotary position in every layer, and a window's counters.
    fn counters(&self) -> Counters {
        let c = &self.cfg;
        let layers = c.rope.then(|| Runs {
            start: c.matrix_len() + c.conv_len(),
            len: c.pos_len(),
            stride: c.layer_state_len(),
            rows: c.n_layer,
        });
        Counters { layers, tail: self.window_counters() }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::ops::silu;
    use std::vec::Vec;

    /// kv head j serves query heads j·g .. j·g + g − 1 (fla's `repeat(x, '(h d) -> (h g) d')`),
    /// in place over several rows.
    #[test]
    fn kv_heads_repeat_in_fla_order() {
        let (t, nkv, g, dh) = (3, 2, 3, 2);
        let mut buf = [0f32; 3 * 2 * 3 * 2];
        for (i, v) in buf[..t * nkv * dh].iter_mut().enumerate() {
            *v = i as f32;
        }
        repeat_heads(&mut buf, t, nkv, g, dh);
        for tt in 0..t {
            for h in 0..nkv * g {
                for c in 0..dh {
                    let want = (tt * nkv * dh + (h / g) * dh + c) as f32;
                    assert_eq!(buf[(tt * nkv * g + h) * dh + c], want, "row {tt} head {h} ch {c}");
                }
            }
        }
    }

    /// Split by channel blocks across an executor (past the size where it splits; 37 channels: two
    /// whole blocks and a tail), on every level the CPU has, the conv gives bit for bit one channel
    /// at a time with the taps summed in order, history included.
    #[test]
    fn short_conv_split_by_channels_is_the_serial_conv() {
        const D: usize = 37;
        const T: usize = 500;
        const W: usize = 4;
        let mut taps = [0f32; D * W];
        for (i, v) in taps.iter_mut().enumerate() {
            *v = ((i * 37 % 17) as f32 - 8.0) * 0.1;
        }
        let wt = Weight::new(crate::weight::Data::F32(&taps), D, W).expect("a D × W weight");
        let mut x = [0f32; D * T];
        for (i, v) in x.iter_mut().enumerate() {
            *v = ((i * 7919 % 101) as f32 - 50.0) * 0.02;
        }
        let mut hist = [0f32; (W - 1) * D];
        for (i, v) in hist.iter_mut().enumerate() {
            *v = ((i * 13 % 7) as f32 - 3.0) * 0.3;
        }
        let (mut want, mut want_hist) = (x, hist);
        for ch in 0..D {
            let mut win: Vec<f32> = (0..W - 1).map(|j| hist[j * D + ch]).collect();
            for tt in 0..T {
                win.push(x[tt * D + ch]);
                let mut y = 0f32;
                for j in 0..W {
                    y += taps[ch * W + j] * win[win.len() - W + j];
                }
                want[tt * D + ch] = crate::ops::fast_silu(y);
            }
            for j in 0..W - 1 {
                want_hist[j * D + ch] = win[win.len() - (W - 1) + j];
            }
        }
        struct Split(crate::exec::Simd);
        impl Exec for Split {
            fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
                (0..n).rev().for_each(f);
            }
            fn threads(&self) -> usize {
                3
            }
            fn simd(&self) -> crate::exec::Simd {
                self.0
            }
        }
        for simd in crate::exec::portable_and_avx2() {
            let (mut xs, mut hs, mut xp, mut hp) = (x, hist, x, hist);
            short_conv(&Split(simd), &wt, W, T, &mut xp, &mut hp);
            short_conv(&crate::exec::Serial, &wt, W, T, &mut xs, &mut hs);
            assert!(xp == want && hp == want_hist, "{simd:?}: split blocks differ from one channel at a time");
            assert!(xs == want && hs == want_hist, "{simd:?}: one task differs from one channel at a time");
        }
    }

    /// The short conv continues across calls: 5 tokens at once equal 2 + 3 with the history kept.
    #[test]
    fn short_conv_carries_its_history() {
        let taps = [0.5f32, -1.0, 2.0, 0.25, 1.5, -0.5];
        let wt = Weight::new(crate::weight::Data::F32(&taps), 2, 3).expect("a 2 × 3 weight");
        let x: [f32; 10] = [0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 0.9, 1.0];
        let (mut whole, mut parts) = (x, x);
        let (mut h1, mut h2) = ([0f32; 4], [0f32; 4]);
        short_conv(&crate::exec::Serial, &wt, 3, 5, &mut whole, &mut h1);
        short_conv(&crate::exec::Serial, &wt, 3, 2, &mut parts[..4], &mut h2);
        short_conv(&crate::exec::Serial, &wt, 3, 3, &mut parts[4..], &mut h2);
        assert_eq!(whole, parts);
        assert_eq!(h1, h2);
        // Token 3, channel 1: row 1 of the taps over inputs 1..=3 of channel 1, oldest first.
        let y = taps[3] * x[3] + taps[4] * x[5] + taps[5] * x[7];
        assert!((whole[7] - silu(y)).abs() < 1e-6);
        assert_eq!(h1, [x[6], x[7], x[8], x[9]]);
    }
}
