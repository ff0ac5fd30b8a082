//! DeltaNet and Gated DeltaNet (fla `DeltaNetForCausalLM` / `GatedDeltaNetForCausalLM`, FAMILIES.md
//! §2): the whole forward math of fla 0.6.0's `DeltaNet` and `GatedDeltaNet` layers, one delta rule
//! for both (DeltaNet is GDN with α ≡ 1).
//!
//! Per layer: `h = RMSNorm(x)`, `q = h·W_qᵀ`, `k = h·W_kᵀ`, `v = h·W_vᵀ`, each through its own causal
//! depthwise conv of width `w` then SiLU (SiLU alone without the short conv), `q̂ = q/√(Σq² + 1e-6)`,
//! `k̂` likewise per key head (fla's in-kernel L2 norm), `q̂ ← q̂·K^−½`; `β = σ(h·W_bᵀ)` per value
//! head (1 without `use_beta`; ×2 with `allow_neg_eigval`); GDN's log decay
//! `g = −exp(A_log)·softplus(h·W_aᵀ + dt_bias)` per value head (0 for DeltaNet); then per value head
//! `j` (reading key head `j / (H_v/H_k)`), token after token:
//! `S ← α·S`, `u = β·(v − S·k̂)`, `S ← S + u·k̂ᵀ`, `o = S·q̂` with `S (V, K)` and `α = exp(g)` (the delta
//! correction after the decay, as fla's kernels and naive references); `o ← RMSNorm_head(o; o_norm)`,
//! then `⊙ act(h·W_gᵀ)` with the output gate (`act` = SiLU or σ), `x += o·W_oᵀ`, then the SwiGLU
//! MLP `x += (silu(h2·W_gateᵀ) ⊙ h2·W_upᵀ)·W_downᵀ` on `h2 = RMSNorm(x)`.
//!
//! The projections are batched products over the call's tokens through [`crate::gemm::matmul`]; the
//! recurrence is a sequential scan, one value head per task, in both [`Scan`] forms (the chunked
//! call and the token step differ only in how many tokens one call holds).
//!
//! Shapes: `C` = d_model, `H_k` key heads of `K` channels, `H_v` value heads of `V` channels
//! (`H_v` a multiple of `H_k`), `I` = MLP width, `w` = conv width.
//!
//! State, per layer (f32): `S (H_v, V, K)` (fla's cache layout, `state_v_first`), then with the
//! short conv the last `w − 1` inputs of each conv, oldest first: `q (w − 1, H_k·K)`,
//! `k (w − 1, H_k·K)`, `v (w − 1, H_v·V)`. Zero = start of a sequence. Under
//! `Forget::Staggered { r }` (two staggered states, FAMILIES.md §9.3) the state continues with a
//! second `S (H_v, V, K)` per layer and then two values (tokens seen mod r, filled).
use crate::error::{need, Error};
use crate::exec::{add_rows, map_rows, Exec, Shared, Simd};
use crate::forget::{Forget, LayerWindow, Runs, WindowAt};
use crate::gemm::matmul;
use crate::gla_lm::{short_conv, Mlp, MlpScratch, MAX_CONV};
#[cfg(target_arch = "x86_64")]
use crate::lanes::{self, each_chunk, Lanes};
use crate::model::{run_stack, Call, Recurrent, Scan, Stack, StackShape, WindowShape};
use crate::ops::{exp, fast_silu, rmsnorm, rmsnorm_inplace, silu, softplus, zip_in_place};
use crate::weight::Weight;
#[cfg(target_arch = "x86_64")]
use core::ops::Range;

/// The largest key head accepted (the scan holds nothing of a head's size on the stack; the bound
/// stays until a larger head is tested).
pub const MAX_HEAD_K: usize = 1024;

/// The eps of fla's in-kernel L2 norm of q and k.
pub const L2_EPS: f32 = 1e-6;

/// What multiplies the normed output by the output gate `h·W_gᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputGate {
    /// No output gate: `o_norm` is a plain RMSNorm.
    None,
    /// `⊙ silu(g)` (fla's `swish`).
    Swish,
    /// `⊙ σ(g)`.
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// C
    pub d_model: usize,
    pub n_layer: usize,
    /// H_k: query/key heads.
    pub n_heads: usize,
    /// H_v: value heads (a multiple of H_k; GDN's `num_v_heads`).
    pub n_v_heads: usize,
    /// K
    pub head_k: usize,
    /// V
    pub head_v: usize,
    /// I
    pub d_mlp: usize,
    pub vocab_rows: usize,
    /// w: the short conv's width, 0 without it.
    pub d_conv: usize,
    /// GDN: the decay α = exp(−exp(A_log)·softplus(h·W_aᵀ + dt_bias)); DeltaNet: α ≡ 1.
    pub gated: bool,
    /// β = σ(h·W_bᵀ); without it β = 1.
    pub use_beta: bool,
    /// β ← 2β (eigenvalues of I − βk̂k̂ᵀ in [−1, 1]).
    pub neg_eigval: bool,
    pub output_gate: OutputGate,
    /// RMSNorm eps of every norm (attn, o_norm, mlp, final).
    pub eps: f32,
}

impl Config {
    /// Key (and query) channels `H_k·K`.
    pub fn key_dim(&self) -> usize {
        self.n_heads * self.head_k
    }
    /// Value (and output) channels `H_v·V`.
    pub fn value_dim(&self) -> usize {
        self.n_v_heads * self.head_v
    }
    /// Channels through the short convs: `q | k | v`.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    pub fn conv_len(&self) -> usize {
        if self.d_conv == 0 {
            0
        } else {
            (self.d_conv - 1) * self.conv_dim()
        }
    }
    /// `H_v·V·K`: the recurrent matrices of one layer.
    pub fn matrix_len(&self) -> usize {
        self.n_v_heads * self.head_v * self.head_k
    }
    pub fn layer_state_len(&self) -> usize {
        self.matrix_len() + self.conv_len()
    }
    /// f32 elements of the whole state: SPEC.md's N_S, `L·(H_v·V·K + (2·H_k·K + H_v·V)·(w − 1))`.
    pub fn state_size(&self) -> usize {
        self.n_layer * self.layer_state_len()
    }
    pub fn validate(&self) -> Result<(), Error> {
        let c = self;
        if [c.d_model, c.n_layer, c.n_heads, c.n_v_heads, c.head_k, c.head_v, c.d_mlp].contains(&0) {
            return Err(Error::Config("delta_net: a dimension is zero"));
        }
        if !c.n_v_heads.is_multiple_of(c.n_heads) {
            return Err(Error::Config("delta_net: num_v_heads must be a multiple of num_heads"));
        }
        if c.d_conv == 1 || c.d_conv > MAX_CONV {
            return Err(Error::Config("delta_net: conv_size must be 2..=16"));
        }
        if c.head_k > MAX_HEAD_K {
            return Err(Error::Config("delta_net: a key head above 1024 channels is not supported"));
        }
        // Every size below is a product of config values: none may overflow.
        let sizes = (|| {
            let kd = c.n_heads.checked_mul(c.head_k)?;
            let vd = c.n_v_heads.checked_mul(c.head_v)?;
            let conv = kd.checked_mul(2)?.checked_add(vd)?.checked_mul(c.d_conv.saturating_sub(1))?;
            let layer = vd.checked_mul(c.head_k)?.checked_add(conv)?;
            c.n_layer.checked_mul(layer)?.checked_mul(2)
        })();
        if sizes.is_none() {
            return Err(Error::Config("delta_net: the state's size overflows"));
        }
        if !(c.eps >= 0.0 && c.eps.is_finite()) {
            return Err(Error::Config("delta_net: norm_eps must be finite and ≥ 0"));
        }
        Ok(())
    }
}

/// GDN's decay parameters.
#[derive(Clone, Copy, Debug)]
pub struct Decay<'a> {
    /// (H_v, C)
    pub wa: Weight<'a>,
    /// (1, H_v) each
    pub a_log: Weight<'a>,
    pub dt_bias: Weight<'a>,
}

#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    /// (1, C)
    pub attn_norm: Weight<'a>,
    /// (H_k·K, C) each
    pub wq: Weight<'a>,
    pub wk: Weight<'a>,
    /// (H_v·V, C)
    pub wv: Weight<'a>,
    /// (H_v, C), with `use_beta`
    pub wb: Option<Weight<'a>>,
    /// With `gated` (GDN).
    pub decay: Option<Decay<'a>>,
    /// Short conv weights (channels, w), with `d_conv > 0`: q (H_k·K), k (H_k·K), v (H_v·V).
    pub conv: Option<[Weight<'a>; 3]>,
    /// (H_v·V, C), with an output gate
    pub wg: Option<Weight<'a>>,
    /// (1, V)
    pub o_norm: Weight<'a>,
    /// (C, H_v·V)
    pub wo: Weight<'a>,
    /// (1, C)
    pub mlp_norm: Weight<'a>,
    /// (I, C) each
    pub gate: Weight<'a>,
    pub up: Weight<'a>,
    /// (C, I)
    pub down: Weight<'a>,
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

pub struct DeltaNet<'a> {
    pub cfg: Config,
    pub w: Weights<'a>,
    forget: Forget,
}

/// Per value head: Σ log α (the log retention along the decay path) and Σ β (the write/erase rate).
const PROBE: &[&str] = &["log_decay_sum", "beta_sum"];

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Each `n`-wide head of the rows `x` divided by `√(Σx² + eps)`, then times `scale`.
fn l2_heads(x: &mut [f32], n: usize, scale: f32) {
    for hv in x.chunks_exact_mut(n) {
        let inv = scale / libm::sqrtf(hv.iter().map(|v| v * v).sum::<f32>() + L2_EPS);
        hv.iter_mut().for_each(|v| *v *= inv);
    }
}

impl<'a> DeltaNet<'a> {
    pub fn new(cfg: Config, w: Weights<'a>) -> Result<Self, Error> {
        cfg.validate()?;
        let (c, i, v) = (cfg.d_model, cfg.d_mlp, cfg.vocab_rows);
        let (kd, vd, hv) = (cfg.key_dim(), cfg.value_dim(), cfg.n_v_heads);
        if w.layers.len() != cfg.n_layer {
            return Err(Error::Shape { what: "layers", expected: cfg.n_layer, got: w.layers.len() });
        }
        w.embed.expect_shape("embeddings", v, c)?;
        w.head.expect_shape("lm_head", v, c)?;
        w.norm.expect_shape("norm", 1, c)?;
        for l in w.layers {
            l.attn_norm.expect_shape("attn_norm", 1, c)?;
            l.mlp_norm.expect_shape("mlp_norm", 1, c)?;
            l.wq.expect_shape("attn.q_proj", kd, c)?;
            l.wk.expect_shape("attn.k_proj", kd, c)?;
            l.wv.expect_shape("attn.v_proj", vd, c)?;
            match (&l.wb, cfg.use_beta) {
                (Some(b), true) => b.expect_shape("attn.b_proj", hv, c)?,
                (None, false) => {}
                _ => return Err(Error::Config("delta_net: attn.b_proj present exactly when use_beta")),
            }
            match (&l.decay, cfg.gated) {
                (Some(d), true) => {
                    d.wa.expect_shape("attn.a_proj", hv, c)?;
                    d.a_log.expect_shape("attn.A_log", 1, hv)?;
                    d.dt_bias.expect_shape("attn.dt_bias", 1, hv)?;
                }
                (None, false) => {}
                _ => return Err(Error::Config("delta_net: a_proj/A_log/dt_bias present exactly for GDN")),
            }
            match (&l.wg, cfg.output_gate) {
                (None, OutputGate::None) => {}
                (Some(g), OutputGate::Swish | OutputGate::Sigmoid) => g.expect_shape("attn.g_proj", vd, c)?,
                _ => return Err(Error::Config("delta_net: attn.g_proj present exactly with the output gate")),
            }
            match (&l.conv, cfg.d_conv) {
                (None, 0) => {}
                (Some([q, k, vv]), w) if w > 0 => {
                    q.expect_shape("attn.q_conv1d", kd, w)?;
                    k.expect_shape("attn.k_conv1d", kd, w)?;
                    vv.expect_shape("attn.v_conv1d", vd, w)?;
                }
                _ => return Err(Error::Config("delta_net: conv weights present exactly when use_short_conv")),
            }
            l.o_norm.expect_shape("attn.o_norm", 1, cfg.head_v)?;
            l.wo.expect_shape("attn.o_proj", c, vd)?;
            l.gate.expect_shape("mlp.gate_proj", i, c)?;
            l.up.expect_shape("mlp.up_proj", i, c)?;
            l.down.expect_shape("mlp.down_proj", c, i)?;
        }
        Ok(DeltaNet { cfg, w, forget: Forget::None })
    }

    /// Layer `call.l` over the rows `x (t, C)` (in place) from its state `st` ([`Config::layer_state_len`]).
    ///
    /// Scratch (f32, in this order): `h (t, C)`, `y (t, C)`, `q (t, H_k·K)`, `k (t, H_k·K)`,
    /// `v (t, H_v·V)`, `o (t, H_v·V)`, `g (t, H_v·V)`, `beta (t, H_v)`, `lg (t, H_v)`, `wide (2t, I)`.
    fn layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        scratch: &mut [f32],
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
    ) -> Result<(), Error> {
        let Call { ex, t, scan: _, l } = call;
        let lw = &self.w.layers[l];
        let c = &self.cfg;
        let (d, nhv, dk, dv, im) = (c.d_model, c.n_v_heads, c.head_k, c.head_v, c.d_mlp);
        let (kd, vd, grp) = (c.key_dim(), c.value_dim(), c.n_v_heads / c.n_heads);
        let (h, rest) = scratch.split_at_mut(t * d);
        let (y, rest) = rest.split_at_mut(t * d);
        let (q, rest) = rest.split_at_mut(t * kd);
        let (k, rest) = rest.split_at_mut(t * kd);
        let (v, rest) = rest.split_at_mut(t * vd);
        let (o, rest) = rest.split_at_mut(t * vd);
        let (g, rest) = rest.split_at_mut(t * vd);
        let (beta, rest) = rest.split_at_mut(t * nhv);
        let (lg, rest) = rest.split_at_mut(t * nhv);
        let wide = &mut rest[..2 * t * im];
        let (sm, conv_st) = st.split_at_mut(c.matrix_len());

        let xs: &[f32] = x;
        map_rows(ex, h, d, t, &|tt, hr| rmsnorm(&xs[tt * d..(tt + 1) * d], &lw.attn_norm, 0, c.eps, hr));
        matmul(ex, h, t, &lw.wq, q)?;
        matmul(ex, h, t, &lw.wk, k)?;
        matmul(ex, h, t, &lw.wv, v)?;
        if let Some([cq, ck, cv]) = &lw.conv {
            let w = c.d_conv;
            let (hq, rest) = conv_st.split_at_mut((w - 1) * kd);
            let (hk, hvv) = rest.split_at_mut((w - 1) * kd);
            short_conv(ex, cq, w, t, q, hq);
            short_conv(ex, ck, w, t, k, hk);
            short_conv(ex, cv, w, t, v, hvv);
        } else {
            for xv in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *xv = silu(*xv);
            }
        }
        let qscale = 1.0 / libm::sqrtf(dk as f32);
        map_rows(ex, q, kd, t, &|_, row| l2_heads(row, dk, qscale));
        map_rows(ex, k, kd, t, &|_, row| l2_heads(row, dk, 1.0));
        match &lw.wb {
            Some(wb) => {
                matmul(ex, h, t, wb, beta)?;
                beta.iter_mut().for_each(|b| *b = sigmoid(*b));
            }
            None => beta.fill(1.0),
        }
        if c.neg_eigval {
            beta.iter_mut().for_each(|b| *b *= 2.0);
        }
        match &lw.decay {
            Some(dc) => {
                matmul(ex, h, t, &dc.wa, lg)?;
                for row in lg.chunks_exact_mut(nhv) {
                    for (j, a) in row.iter_mut().enumerate() {
                        *a = -exp(dc.a_log.get(j)) * softplus(*a + dc.dt_bias.get(j));
                    }
                }
            }
            None => lg.fill(0.0),
        }
        // Forgetting: α′ = a·α with the write scaled by b (the erasure kept) (RRI), or with β′ = b·β
        // (write and erasure scaled: RriBoth); log α′ = c·log α (Dt).
        match self.forget {
            Forget::Rri { a, b } => {
                let la = libm::logf(a);
                lg.iter_mut().for_each(|x| *x += la);
                v.iter_mut().for_each(|x| *x *= b);
            }
            Forget::RriBoth { a, b } => {
                let la = libm::logf(a);
                lg.iter_mut().for_each(|x| *x += la);
                beta.iter_mut().for_each(|x| *x *= b);
            }
            Forget::Dt { .. } | Forget::DtLayers(_) => {
                let c = self.forget.dt_scale(l);
                lg.iter_mut().for_each(|x| *x *= c)
            }
            _ => {}
        }
        if let Some(p) = probe {
            let (pg, pb) = p.split_at_mut(nhv);
            for (gr, br) in lg.chunks_exact(nhv).zip(beta.chunks_exact(nhv)) {
                pg.iter_mut().zip(gr).for_each(|(p, x)| *p += x);
                pb.iter_mut().zip(br).for_each(|(p, x)| *p += x);
            }
        }
        // The decays α = exp(log α), in place (log α is not read again).
        lg.iter_mut().for_each(|x| *x = exp(*x));
        {
            let os = Shared::new(o);
            let ss = Shared::new(sm);
            let (qr, kr, vr, br, ar) = (&*q, &*k, &*v, &*beta, &*lg);
            let stag = window.map(|w| (w.at, Shared::new(w.cache)));
            let simd = ex.simd();
            let hl = dv * dk;
            ex.for_each(nhv, &|j| {
                let ins = Inputs {
                    q: qr,
                    k: kr,
                    v: vr,
                    beta: br,
                    alpha: ar,
                    ldk: kd,
                    ldv: vd,
                    nhv,
                    koff: (j / grp) * dk,
                    voff: j * dv,
                    head: j,
                    dk,
                    dv,
                };
                // SAFETY: value head j owns its state blocks and its V columns of o.
                unsafe {
                    let sa = ss.range(j * hl, hl);
                    match &stag {
                        None => scan(simd, &ins, t, sa, None, &os),
                        Some((at, cache)) => scan(simd, &ins, t, sa, Some((*at, cache.range(j * hl, hl))), &os),
                    }
                }
            });
        }
        map_rows(ex, o, vd, t, &|_, row| {
            row.chunks_exact_mut(dv).for_each(|head| rmsnorm_inplace(head, &lw.o_norm, 0, c.eps))
        });
        if let Some(wg) = &lw.wg {
            matmul(ex, h, t, wg, g)?;
            let (g, simd, sigmoid_gate): (&[f32], _, _) = (g, ex.simd(), c.output_gate == OutputGate::Sigmoid);
            map_rows(ex, o, vd, t, &|tt, row| {
                let g = &g[tt * vd..(tt + 1) * vd];
                match sigmoid_gate {
                    true => zip_in_place(simd, row, g, |o, g| o * sigmoid(g)),
                    false => zip_in_place(simd, row, g, |o, g| o * fast_silu(g)),
                }
            });
        }
        matmul(ex, o, t, &lw.wo, y)?;
        add_rows(ex, x, y, d, t);
        let mlp = Mlp { norm: &lw.mlp_norm, gate: &lw.gate, up: &lw.up, down: &lw.down, eps: c.eps };
        mlp.run(ex, t, x, MlpScratch { h, wide, y })
    }
}

/// One value head's per-token inputs: q̂ and k̂ rows `ldk` apart (the head's key head at `koff`),
/// v rows `ldv` apart at `voff`, β and α rows `nhv` apart at `head`.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: &'a [f32],
    alpha: &'a [f32],
    ldk: usize,
    ldv: usize,
    nhv: usize,
    koff: usize,
    voff: usize,
    head: usize,
    dk: usize,
    dv: usize,
}

/// `Σ a_i·b_i` with eight partial sums (so it vectorises).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One token into one state `s (V, K)`: per value row `i`, `u = β·(v_i − α·(s_i·k̂))`,
/// `s_i ← α·s_i + u·k̂`; with `q`, also `y_i = s_i·q̂` (after the update).
#[inline(always)]
fn update(s: &mut [f32], alpha: f32, beta: f32, k: &[f32], v: &[f32], mut q: Option<(&[f32], &mut [f32])>) {
    let n = k.len();
    for (i, (row, &vv)) in s.chunks_exact_mut(n).zip(v).enumerate() {
        let u = beta * (vv - alpha * dot8(row, k));
        for j in 0..n {
            row[j] = alpha * row[j] + u * k[j];
        }
        if let Some((q, y)) = &mut q {
            y[i] = dot8(row, q);
        }
    }
}

/// The recurrence of one value head over `t` tokens from its state `sa (V, K)`; writes `o` rows
/// (stride `ldv`, at `voff`). With a second state (two staggered states, FAMILIES.md §9.3), both
/// take every token, the read-out uses `sa`, and after each token that completes a multiple of `r`
/// tokens `sa ← sb`, `sb ← 0`: the read-out at stream position p (0-based) then holds the tokens
/// from `max(0, r·⌊p/r⌋ − r)` to p. On an AVX2 or AVX-512 CPU [`crate::lanes`]'
/// blocked kernel; otherwise the loop below.
///
/// # Safety
/// `o` rows `0..t` at `voff..voff+V` must be written by no one else.
unsafe fn scan(simd: Simd, x: &Inputs, t: usize, sa: &mut [f32], sb: Option<(WindowAt, &mut [f32])>, o: &Shared) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd.has_avx512() {
            return lanes::scan_avx512(x, t, sa, sb, o);
        }
        if simd.has_avx2() {
            return lanes::scan_avx2(x, t, sa, sb, o);
        }
    }
    let _ = simd;
    scan_body(x, t, sa, sb, o)
}

#[inline(always)]
unsafe fn scan_body(x: &Inputs, t: usize, sa: &mut [f32], mut sb: Option<(WindowAt, &mut [f32])>, o: &Shared) {
    let (dk, dv) = (x.dk, x.dv);
    for tt in 0..t {
        let (ka, va, ga) = (tt * x.ldk + x.koff, tt * x.ldv + x.voff, tt * x.nhv + x.head);
        let (q, k, v) = (&x.q[ka..ka + dk], &x.k[ka..ka + dk], &x.v[va..va + dv]);
        let (alpha, beta) = (x.alpha[ga], x.beta[ga]);
        let y = o.range(va, dv);
        update(sa, alpha, beta, k, v, Some((q, y)));
        if let Some((win, s2)) = &mut sb {
            update(s2, alpha, beta, k, v, None);
            if (win.pos0 + tt + 1).is_multiple_of(win.r) {
                sa.copy_from_slice(s2);
                s2.fill(0.0);
            }
        }
    }
}

/// The scan of one state on AVX-512 or AVX2 ([`crate::lanes`]: blocks of four rows through 16
/// tokens; 16 or 8 lanes, FMA). Each row's update is the loop's (`u = β·(v_i − α·(s_i·k̂))`,
/// `s_i ← α·s_i + u·k̂`, `y_i = s_i·q̂`) with other rounding: the sums in another order and
/// `α·s_i + (u·k̂)` fused.
#[cfg(target_arch = "x86_64")]
impl crate::lanes::RowBlock for Inputs<'_> {
    fn n_rows(&self) -> usize {
        self.dv
    }

    #[inline(always)]
    unsafe fn rows<L: Lanes, const R: usize>(
        &self,
        tokens: Range<usize>,
        s: &mut [f32],
        i0: usize,
        o: Option<&Shared>,
    ) {
        let (x, dk) = (self, self.dk);
        let sp = s[i0 * dk..(i0 + R) * dk].as_mut_ptr();
        for tt in tokens {
            let ka = tt * x.ldk + x.koff;
            let (kp, qp) = (x.k[ka..ka + dk].as_ptr(), x.q[ka..ka + dk].as_ptr());
            let ga = tt * x.nhv + x.head;
            let (alpha, beta) = (x.alpha[ga], x.beta[ga]);
            let va = tt * x.ldv + x.voff + i0;
            let v = &x.v[va..va + R];

            // s_r·k̂, in two chains a row (even and odd chunks).
            let (mut a0, mut a1) = ([L::zero(); R], [L::zero(); R]);
            each_chunk!(L, dk, |c, m, second| {
                let kv = L::load(m, kp.add(c));
                let a = if second { &mut a1 } else { &mut a0 };
                for (r, a) in a.iter_mut().enumerate() {
                    *a = L::load(m, sp.add(r * dk + c)).mul_add(kv, *a);
                }
            });
            let u: [L; R] = core::array::from_fn(|r| L::splat(beta * (v[r] - alpha * a0[r].add(a1[r]).sum())));

            // s_r ← α·s_r + u_r·k̂, and s_r·q̂.
            let av = L::splat(alpha);
            let (mut a0, mut a1) = ([L::zero(); R], [L::zero(); R]);
            each_chunk!(L, dk, |c, m, second| {
                let kv = L::load(m, kp.add(c));
                let qv = L::load(m, qp.add(c));
                let a = if second { &mut a1 } else { &mut a0 };
                for r in 0..R {
                    let p = sp.add(r * dk + c);
                    let new = av.mul_add(L::load(m, p), u[r].mul(kv));
                    new.store(m, p);
                    a[r] = new.mul_add(qv, a[r]);
                }
            });
            if let Some(o) = o {
                let y = o.range(va, R);
                for r in 0..R {
                    y[r] = a0[r].add(a1[r]).sum();
                }
            }
        }
    }
}

impl Stack for DeltaNet<'_> {
    type Scratch<'s> = &'s mut [f32];
    fn stack_shape(&self, _: usize) -> Result<StackShape, Error> {
        let c = &self.cfg;
        let window = match self.forget {
            Forget::Staggered { r } => Some(WindowShape { r, layer_len: c.matrix_len() }),
            _ => None,
        };
        Ok(StackShape {
            base_len: c.state_size(),
            layer_state_len: c.layer_state_len(),
            probe_per_layer: PROBE.len() * c.n_v_heads,
            window,
        })
    }
    fn split_scratch<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<&'s mut [f32], Error> {
        need("delta_net scratch", buf.len(), self.scratch_len(t))?;
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
        self.layer(call, x, st, s, probe, window)
    }
    fn final_norm(&self, x: &mut [f32], _: &mut &mut [f32]) {
        for row in x.chunks_exact_mut(self.cfg.d_model) {
            rmsnorm_inplace(row, &self.w.norm, 0, self.cfg.eps);
        }
    }
}

impl Recurrent for DeltaNet<'_> {
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
            Forget::Staggered { .. } => c.state_size() + c.n_layer * c.matrix_len() + 2,
            _ => c.state_size(),
        }
    }
    fn scratch_len(&self, chunk: usize) -> usize {
        let c = &self.cfg;
        chunk * (2 * c.d_model + 2 * c.key_dim() + 3 * c.value_dim() + 2 * c.n_v_heads + 2 * c.d_mlp)
    }
    fn head(&self) -> &Weight<'_> {
        &self.w.head
    }
    /// Non-diagonal transitions: two staggered states instead of the window by state difference;
    /// Δ-scaling needs GDN's decay (DeltaNet has none to scale).
    fn set_forget(&mut self, f: Forget) -> Result<(), Error> {
        match f {
            Forget::RriBoth { a, b } => Forget::Rri { a, b }.check(self.cfg.n_layer)?,
            _ => f.check_non_diagonal(self.cfg.n_layer)?,
        }
        if matches!(f, Forget::Dt { .. } | Forget::DtLayers(_)) && !self.cfg.gated {
            return Err(Error::Config("dt scaling needs a decay to scale; DeltaNet has none (α ≡ 1): use rri:a=…"));
        }
        self.forget = f;
        Ok(())
    }
    fn forget(&self) -> Forget {
        self.forget
    }
    fn n_layer(&self) -> usize {
        self.cfg.n_layer
    }
    /// Value heads: each has its own `V × K` state.
    #[allow(clippy::misnamed_getters)]
    fn n_heads(&self) -> usize {
        self.cfg.n_v_heads
    }
    fn head_state(&self, layer: usize, head: usize) -> core::ops::Range<usize> {
        let c = &self.cfg;
        let hl = c.head_k * c.head_v;
        let start = layer * c.layer_state_len() + head * hl;
        start..start + hl
    }
    /// The head's own value channels of the conv history (its query and key channels are shared by
    /// the value heads of one key head).
    fn conv_state(&self, layer: usize, head: usize) -> Option<Runs> {
        let c = &self.cfg;
        (c.d_conv > 0).then(|| Runs {
            start: layer * c.layer_state_len() + c.matrix_len() + (c.d_conv - 1) * 2 * c.key_dim() + head * c.head_v,
            len: c.head_v,
            stride: c.value_dim(),
            rows: c.d_conv - 1,
        })
    }
    fn probe_series(&self) -> (&'static [&'static str], usize) {
        (PROBE, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: usize = 29;
    const K: usize = 5;
    const V: usize = 3;

    type HeadInputs = ([f32; T * K], [f32; T * K], [f32; T * V], [f32; T], [f32; T]);

    /// Random inputs of one head: q, k (unit rows), v, β in (0, 2), log α ≤ 0.
    fn inputs() -> HeadInputs {
        let mut seed = 4242u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((seed >> 8) as f32 / (1u32 << 24) as f32) - 0.5
        };
        let (mut q, mut k, mut v, mut b, mut g) = ([0f32; T * K], [0f32; T * K], [0f32; T * V], [0f32; T], [0f32; T]);
        q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()).for_each(|x| *x = rnd());
        l2_heads(&mut k, K, 1.0);
        b.iter_mut().for_each(|x| *x = 1.0 + 1.9 * rnd());
        g.iter_mut().for_each(|x| *x = -0.3 * (rnd() + 0.5));
        (q, k, v, b, g)
    }

    /// The scan against the delta rule written out with the whole matrix:
    /// `S ← α(I − β k̂k̂ᵀ)`-style update `S = α S + β (v − α S k̂) k̂ᵀ`, `o = S q̂`, in f64; on every
    /// level the CPU has (AVX-512 takes its own kernel), with key heads of one partial chunk, of
    /// whole chunks and of both (K = 5, 64, 37), value heads of a whole row block, a tail, and both,
    /// and more tokens than one token block.
    #[test]
    fn scan_is_the_gated_delta_rule_on_every_level() {
        extern crate std;
        use std::vec;
        for simd in crate::exec::up_to_avx512() {
            for (t, dk, dv) in [(T, K, V), (40, 37, 9), (20, 64, 8)] {
                let mut seed = 4242u32;
                let mut rnd = || {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    ((seed >> 8) as f32 / (1u32 << 24) as f32) - 0.5
                };
                let (mut q, mut k, mut v) = (vec![0f32; t * dk], vec![0f32; t * dk], vec![0f32; t * dv]);
                q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()).for_each(|x| *x = rnd());
                l2_heads(&mut k, dk, 1.0);
                let b: std::vec::Vec<f32> = (0..t).map(|_| 1.0 + 1.9 * rnd()).collect();
                let g: std::vec::Vec<f32> = (0..t).map(|_| -0.3 * (rnd() + 0.5)).collect();
                let alpha: std::vec::Vec<f32> = g.iter().map(|&g| exp(g)).collect();
                let ins = Inputs {
                    q: &q,
                    k: &k,
                    v: &v,
                    beta: &b,
                    alpha: &alpha,
                    ldk: dk,
                    ldv: dv,
                    nhv: 1,
                    koff: 0,
                    voff: 0,
                    head: 0,
                    dk,
                    dv,
                };
                let mut out = vec![0f32; t * dv];
                let mut s = vec![0f32; dv * dk];
                let os = Shared::new(&mut out);
                unsafe { scan(simd, &ins, t, &mut s, None, &os) };
                let mut m = vec![0f64; dv * dk];
                for tt in 0..t {
                    let a = (g[tt] as f64).exp();
                    let kt = &k[tt * dk..(tt + 1) * dk];
                    for i in 0..dv {
                        let row = &mut m[i * dk..(i + 1) * dk];
                        let sk: f64 = row.iter().zip(kt).map(|(m, k)| m * *k as f64).sum();
                        let u = b[tt] as f64 * (v[tt * dv + i] as f64 - a * sk);
                        row.iter_mut().zip(kt).for_each(|(m, k)| *m = a * *m + u * *k as f64);
                        let y: f64 = row.iter().zip(&q[tt * dk..(tt + 1) * dk]).map(|(m, q)| m * *q as f64).sum();
                        let got = out[tt * dv + i] as f64;
                        assert!((got - y).abs() < 1e-5, "{simd:?} K {dk} V {dv} token {tt} row {i}: {got} vs {y}");
                    }
                }
                for (i, (x, y)) in s.iter().zip(&m).enumerate() {
                    assert!((*x as f64 - y).abs() < 1e-5, "{simd:?} K {dk} V {dv} state {i}: {x} vs {y}");
                }
            }
        }
    }

    /// Two staggered states over two calls: the read-out at p equals the plain recurrence from zero
    /// over tokens max(0, r·⌊p/r⌋ − r)..=p, on every level the CPU has.
    #[test]
    fn staggered_states_read_out_the_last_r_to_2r_tokens() {
        let (q, k, v, b, g) = inputs();
        let alpha = g.map(exp);
        let base = Inputs {
            q: &q,
            k: &k,
            v: &v,
            beta: &b,
            alpha: &alpha,
            ldk: K,
            ldv: V,
            nhv: 1,
            koff: 0,
            voff: 0,
            head: 0,
            dk: K,
            dv: V,
        };
        let at = |t0: usize| Inputs {
            q: &q[t0 * K..],
            k: &k[t0 * K..],
            v: &v[t0 * V..],
            beta: &b[t0..],
            alpha: &alpha[t0..],
            ..base
        };
        for simd in crate::exec::up_to_avx512() {
            for r in [1usize, 4, 10, 40] {
                let mut out = [0f32; T * V];
                let (mut sa, mut sb) = ([0f32; V * K], [0f32; V * K]);
                for (t0, t1) in [(0usize, 13usize), (13, T)] {
                    let os = Shared::new(&mut out[t0 * V..]);
                    let w = WindowAt { r, pos0: t0 % r, filled: t0 >= r };
                    unsafe { scan(simd, &at(t0), t1 - t0, &mut sa, Some((w, &mut sb)), &os) };
                }
                for p in 0..T {
                    let start = (r * (p / r)).saturating_sub(r);
                    let mut s = [0f32; V * K];
                    let mut want = [0f32; T * V];
                    let os = Shared::new(&mut want[start * V..]);
                    unsafe { scan(simd, &at(start), p + 1 - start, &mut s, None, &os) };
                    for i in 0..V {
                        let (x, y) = (out[p * V + i], want[p * V + i]);
                        assert!((x - y).abs() < 1e-5, "{simd:?} r {r} p {p}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
