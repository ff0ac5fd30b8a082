//! RWKV-7 (x070, "Goose"): the whole forward math, as FAMILIES.md §1.4 states it (the `rwkv`
//! package's `RWKV_x070_TMix_one` / `CMix_one`).
//!
//! Per layer: `xx = LN(x; ln1)`, token shift against the previous token's `xx`, the mixed inputs
//! `x_j = xx + (prev − xx) ⊙ x_j` (j = r, w, k, v, a, g), the projections `r, k, v`, the decay
//! `w = exp(−e^{−0.5}·σ(w0 + tanh(x_w·W1ᵀ)·W2ᵀ))` per key channel, the in-context learning rate
//! `a = σ(a0 + x_a·A1ᵀ·A2ᵀ)`, the gate `g = σ(x_g·G1ᵀ)·G2ᵀ`, the removal key
//! `κ̂ = normalize_L2 per head (k ⊙ k_k)`, `k ← k ⊙ (1 + (a − 1) ⊙ k_a)`, the value residual
//! (layer 0 keeps its `v` as `v_first`; later layers `v ← v + (v_first − v) ⊙ σ(v0 + x_v·V1ᵀ·V2ᵀ)`),
//! then per head the delta-rule state update and read-out
//! `S ← S·diag(w) − (S·κ̂)(κ̂ ⊙ a)ᵀ + v·kᵀ`, `y = S·r` (a sequential scan over the tokens),
//! a per-head GroupNorm (`ln_x`, eps `gn_eps`), the bonus `y += (Σ_i r_i k_i r_k,i)·v` per head,
//! `x += (y ⊙ g)·W_oᵀ`, then the channel mix `x += relu(x_k·W_keyᵀ)²·W_valueᵀ` on the shifted
//! `LN(x; ln2)`. The embedding row passes through `LN(·; ln0)` in f32 (the package folds LN0 after
//! casting to the run dtype, so a bf16 file folds in f32: no rounding to bf16 here).
//!
//! Every projection (r, k, v, o, the four LoRAs, the channel mix) is a batched product over the
//! call's tokens through [`crate::gemm::matmul`]; the LoRA matrices are taken in the Linear layout
//! `(out, in)` (the host transposes a `.pth` file's `[in, out]` ones). The recurrence is a
//! sequential scan, one head per task, in both [`Scan`] forms.
//!
//! Shapes: `C` = d_model, `H` heads of `N` channels (`C = H·N`), `F` = channel-mix width,
//! `Dw, Da, Dv, Dg` = the decay, learning-rate, value and gate LoRA ranks.
//!
//! State, per layer (f32): `att_shift (C)` — the last `ln1` output —, `S (H, N_value, N_key)`
//! (the package's `[H][V][K]`), `ffn_shift (C)` — the last `ln2` output; layers follow each other.
//! Zero = start of a sequence. Under `Forget::Staggered { r }` (two staggered states, FAMILIES.md
//! §9.3) the state continues with a second `S (H, N, N)` per layer and then two values (tokens seen
//! mod r, filled).
use crate::error::{need, Error};
use crate::exec::{add_rows, map_rows, Exec, Shared, Simd};
use crate::forget::{Forget, LayerWindow, Runs, WindowAt};
use crate::gemm::matmul;
#[cfg(target_arch = "x86_64")]
use crate::lanes::{self, each_chunk, Lanes};
use crate::model::{run_stack, Call, Recurrent, Scan, Stack, StackShape, WindowShape};
use crate::ops::{exp, fast_exp, fast_sigmoid, map_in_place, relu, zip_in_place};
use crate::rwkv::{layer_norm, token_shift};
use crate::weight::Weight;
#[cfg(target_arch = "x86_64")]
use core::ops::Range;

/// `e^{−0.5}` as the package writes it (`0.606531`).
pub const DECAY_SCALE: f32 = 0.606531;

/// The largest head size accepted. The scan holds nothing of a head's size on the stack (since
/// 2026-12-06 its decays are made in the layer's scratch); the bound stays until a larger head is
/// tested.
pub const MAX_HEAD: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// C
    pub d_model: usize,
    pub n_layer: usize,
    /// H
    pub n_heads: usize,
    /// N
    pub head_size: usize,
    /// F
    pub d_ffn: usize,
    /// Dw, Da, Dv, Dg
    pub lora_w: usize,
    pub lora_a: usize,
    pub lora_v: usize,
    pub lora_g: usize,
    pub vocab_rows: usize,
    /// LayerNorm eps (1e-5).
    pub eps: f32,
    /// GroupNorm eps of `ln_x` (64e-5 in the package; fla: `head_dim·norm_eps`).
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
    /// The widest LoRA rank or the channel-mix width: the columns of the `wide` scratch.
    fn wide(&self) -> usize {
        self.d_ffn.max(self.lora_w).max(self.lora_a).max(self.lora_v).max(self.lora_g)
    }
    pub fn validate(&self) -> Result<(), Error> {
        let c = self;
        if c.d_model == 0 || c.n_layer == 0 || c.n_heads == 0 || c.head_size == 0 || c.d_ffn == 0 {
            return Err(Error::Config("rwkv7: a dimension is zero"));
        }
        if c.n_heads * c.head_size != c.d_model {
            return Err(Error::Config("rwkv7: n_heads·head_size must equal d_model"));
        }
        if c.head_size > MAX_HEAD {
            return Err(Error::Config("rwkv7: head_size above 256 is not supported"));
        }
        if c.lora_w == 0 || c.lora_a == 0 || c.lora_g == 0 || (c.n_layer > 1 && c.lora_v == 0) {
            return Err(Error::Config("rwkv7: a LoRA rank is zero"));
        }
        Ok(())
    }
}

/// A low-rank product `x·Aᵀ·Bᵀ` in the Linear layout: `a (rank, C)`, `b (C, rank)`.
#[derive(Clone, Copy, Debug)]
pub struct Lora<'a> {
    pub a: Weight<'a>,
    pub b: Weight<'a>,
}

#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    /// (1, C) each
    pub ln1_w: Weight<'a>,
    pub ln1_b: Weight<'a>,
    pub ln2_w: Weight<'a>,
    pub ln2_b: Weight<'a>,
    /// (1, C) each: the token-shift coefficients of r, w, k, v, a, g.
    pub mix: [Weight<'a>; 6],
    /// (1, C) each: the decay, learning-rate and value-residual biases (`v0` unused in layer 0).
    pub w0: Weight<'a>,
    pub a0: Weight<'a>,
    pub v0: Option<Weight<'a>>,
    /// Ranks Dw, Da, Dv, Dg (the value LoRA is absent in layer 0).
    pub w_lora: Lora<'a>,
    pub a_lora: Lora<'a>,
    pub v_lora: Option<Lora<'a>>,
    pub g_lora: Lora<'a>,
    /// (1, C) each
    pub k_k: Weight<'a>,
    pub k_a: Weight<'a>,
    /// (1, C): `r_k [H, N]`, flat.
    pub r_k: Weight<'a>,
    /// (C, C) each
    pub wr: Weight<'a>,
    pub wk: Weight<'a>,
    pub wv: Weight<'a>,
    pub wo: Weight<'a>,
    /// (1, C)
    pub lnx_w: Weight<'a>,
    pub lnx_b: Weight<'a>,
    /// (1, C): the channel mix's shift coefficient.
    pub ffn_x_k: Weight<'a>,
    /// (F, C)
    pub fk: Weight<'a>,
    /// (C, F)
    pub fv: Weight<'a>,
    /// (H·N, N): a state-tuned model's initial `S` of each head, `[head][value][key]`: the state's
    /// own layout, copied as it is (RWKV-Runner's convention for x070; the `rwkv` package loads
    /// no x070 `time_state`).
    pub time_state: Option<Weight<'a>>,
}

/// The model's weights; `L` holds the layers (a borrowed slice, or a host's owned list).
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a, L = &'a [Layer<'a>]> {
    /// (V, C), before LN0
    pub embed: Weight<'a>,
    /// (1, C)
    pub ln0_w: Weight<'a>,
    pub ln0_b: Weight<'a>,
    pub layers: L,
    /// (1, C)
    pub ln_out_w: Weight<'a>,
    pub ln_out_b: Weight<'a>,
    /// (V, C)
    pub head: Weight<'a>,
}

pub struct Rwkv7<'a, L = &'a [Layer<'a>]> {
    pub cfg: Config,
    pub w: Weights<'a, L>,
    forget: Forget,
}

const PROBE: &[&str] = &["log_decay_sum", "learning_rate_sum"];

/// Scratch regions for `t` tokens.
pub(crate) struct Scratch<'s> {
    /// (t, C) each
    xx: &'s mut [f32],
    prev: &'s mut [f32],
    tmp: &'s mut [f32],
    r: &'s mut [f32],
    k: &'s mut [f32],
    v: &'s mut [f32],
    lw: &'s mut [f32],
    a: &'s mut [f32],
    g: &'s mut [f32],
    kk: &'s mut [f32],
    o: &'s mut [f32],
    /// (t, C): layer 0's values, kept for the later layers' value residual.
    v_first: &'s mut [f32],
    /// (t, max(F, ranks))
    wide: &'s mut [f32],
    /// (C): a coefficient vector read as f32.
    vec: &'s mut [f32],
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

impl<'a, L: AsRef<[Layer<'a>]> + Sync> Rwkv7<'a, L> {
    pub fn new(cfg: Config, w: Weights<'a, L>) -> Result<Self, Error> {
        cfg.validate()?;
        let (c, f, v) = (cfg.d_model, cfg.d_ffn, cfg.vocab_rows);
        let layers = w.layers.as_ref();
        if layers.len() != cfg.n_layer {
            return Err(Error::Shape { what: "layers", expected: cfg.n_layer, got: layers.len() });
        }
        w.embed.expect_shape("emb", v, c)?;
        w.head.expect_shape("head", v, c)?;
        for x in [&w.ln0_w, &w.ln0_b, &w.ln_out_w, &w.ln_out_b] {
            x.expect_shape("ln", 1, c)?;
        }
        let lora = |l: &Lora, what: &'static str, rank: usize| -> Result<(), Error> {
            l.a.expect_shape(what, rank, c)?;
            l.b.expect_shape(what, c, rank)
        };
        for (i, l) in layers.iter().enumerate() {
            let vecs = [&l.ln1_w, &l.ln1_b, &l.ln2_w, &l.ln2_b, &l.w0, &l.a0, &l.k_k, &l.k_a, &l.r_k, &l.lnx_w];
            for x in vecs.into_iter().chain([&l.lnx_b, &l.ffn_x_k]).chain(l.mix.iter()) {
                x.expect_shape("per-channel vector", 1, c)?;
            }
            for x in [&l.wr, &l.wk, &l.wv, &l.wo] {
                x.expect_shape("att square projection", c, c)?;
            }
            l.fk.expect_shape("ffn.key", f, c)?;
            l.fv.expect_shape("ffn.value", c, f)?;
            if let Some(ts) = &l.time_state {
                ts.expect_shape("att.time_state", cfg.n_heads * cfg.head_size, cfg.head_size)?;
            }
            if l.time_state.is_some() != layers[0].time_state.is_some() {
                return Err(Error::Config("rwkv7: att.time_state in some layers but not all"));
            }
            lora(&l.w_lora, "decay LoRA (w1/w2)", cfg.lora_w)?;
            lora(&l.a_lora, "learning-rate LoRA (a1/a2)", cfg.lora_a)?;
            lora(&l.g_lora, "gate LoRA (g1/g2)", cfg.lora_g)?;
            if i > 0 {
                match (&l.v_lora, &l.v0) {
                    (Some(vl), Some(v0)) => {
                        lora(vl, "value LoRA (v1/v2)", cfg.lora_v)?;
                        v0.expect_shape("v0", 1, c)?;
                    }
                    _ => return Err(Error::Config("rwkv7: a layer past the first has no value-residual LoRA")),
                }
            }
        }
        Ok(Rwkv7 { cfg, w, forget: Forget::None })
    }

    fn scratch_parts<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<Scratch<'s>, Error> {
        need("rwkv7 scratch", buf.len(), self.scratch_len(t))?;
        let c = &self.cfg;
        let tc = t * c.d_model;
        let (xx, rest) = buf.split_at_mut(tc);
        let (prev, rest) = rest.split_at_mut(tc);
        let (tmp, rest) = rest.split_at_mut(tc);
        let (r, rest) = rest.split_at_mut(tc);
        let (k, rest) = rest.split_at_mut(tc);
        let (v, rest) = rest.split_at_mut(tc);
        let (lw, rest) = rest.split_at_mut(tc);
        let (a, rest) = rest.split_at_mut(tc);
        let (g, rest) = rest.split_at_mut(tc);
        let (kk, rest) = rest.split_at_mut(tc);
        let (o, rest) = rest.split_at_mut(tc);
        let (v_first, rest) = rest.split_at_mut(tc);
        let (wide, rest) = rest.split_at_mut(t * c.wide());
        let (vec, _) = rest.split_at_mut(c.d_model);
        Ok(Scratch { xx, prev, tmp, r, k, v, lw, a, g, kk, o, v_first, wide, vec })
    }

    /// `out = xx + (prev − xx) ⊙ mix` (t rows); `vec` (C) holds `mix` read as f32.
    #[allow(clippy::too_many_arguments)]
    fn mixed(
        ex: &dyn Exec,
        t: usize,
        d: usize,
        xx: &[f32],
        prev: &[f32],
        mix: &Weight,
        vec: &mut [f32],
        out: &mut [f32],
    ) {
        mix.read(0, &mut vec[..d]);
        let vec: &[f32] = vec;
        map_rows(ex, out, d, t, &|tt, o| {
            let (a, p) = (&xx[tt * d..(tt + 1) * d], &prev[tt * d..(tt + 1) * d]);
            for i in 0..d {
                o[i] = a[i] + (p[i] - a[i]) * vec[i];
            }
        });
    }

    /// `out (t, C) = x·Aᵀ·Bᵀ` through `mid (t, rank)`, with `f` applied to the middle.
    fn lora(
        ex: &dyn Exec,
        x: &[f32],
        t: usize,
        l: &Lora,
        mid: &mut [f32],
        f: fn(f32) -> f32,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let rank = l.a.rows;
        let mid = &mut mid[..t * rank];
        matmul(ex, x, t, &l.a, mid)?;
        mid.iter_mut().for_each(|v| *v = f(*v));
        matmul(ex, mid, t, &l.b, out)
    }

    /// Layer `call.l` over the rows `x` (in place) from its state `st`.
    fn layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        s: &mut Scratch,
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
    ) -> Result<(), Error> {
        let Call { ex, t, scan: _, l } = call;
        let lw = &self.w.layers.as_ref()[l];
        let c = &self.cfg;
        let (d, h, n) = (c.d_model, c.n_heads, c.head_size);
        let tc = t * d;
        let (att_shift, rest) = st.split_at_mut(d);
        let (wkv, ffn_shift) = rest.split_at_mut(h * n * n);

        // Time mix: token shift, mixed inputs, projections.
        token_shift(ex, t, x, (&lw.ln1_w, &lw.ln1_b), c.eps, att_shift, s.xx, s.prev);
        let (xx, prev) = (&s.xx[..tc], &s.prev[..tc]);
        let id = |v: f32| v;
        for j in 0..6 {
            Self::mixed(ex, t, d, xx, prev, &lw.mix[j], s.vec, s.tmp);
            let xin = &s.tmp[..tc];
            match j {
                0 => matmul(ex, xin, t, &lw.wr, s.r)?,
                // log w before the bias and σ: tanh(x_w·W1ᵀ)·W2ᵀ
                1 => Self::lora(ex, xin, t, &lw.w_lora, s.wide, libm::tanhf, s.lw)?,
                2 => matmul(ex, xin, t, &lw.wk, s.k)?,
                3 => {
                    matmul(ex, xin, t, &lw.wv, s.v)?;
                    if l == 0 {
                        s.v_first[..tc].copy_from_slice(&s.v[..tc]);
                    } else if let (Some(vl), Some(v0)) = (&lw.v_lora, &lw.v0) {
                        // v += (v_first − v) ⊙ σ(v0 + x_v·V1ᵀ·V2ᵀ), the gate in kk for now.
                        Self::lora(ex, xin, t, vl, s.wide, id, s.kk)?;
                        v0.read(0, &mut s.vec[..d]);
                        let (vec, simd) = (&s.vec[..d], ex.simd());
                        map_rows(ex, &mut s.kk[..tc], d, t, &|_, gr| {
                            zip_in_place(simd, gr, vec, |g, b| fast_sigmoid(b + g))
                        });
                        let (kk, vf) = (&s.kk[..tc], &s.v_first[..tc]);
                        map_rows(ex, s.v, d, t, &|tt, vr| {
                            let (gr, fr) = (&kk[tt * d..(tt + 1) * d], &vf[tt * d..(tt + 1) * d]);
                            for i in 0..d {
                                vr[i] += (fr[i] - vr[i]) * gr[i];
                            }
                        });
                    }
                }
                4 => Self::lora(ex, xin, t, &lw.a_lora, s.wide, id, s.a)?,
                _ => Self::lora(ex, xin, t, &lw.g_lora, s.wide, sigmoid, s.g)?,
            }
        }
        // a = σ(a0 + ·); log w = −e^{−0.5}·σ(w0 + ·).
        lw.a0.read(0, &mut s.vec[..d]);
        let (vec, simd) = (&s.vec[..d], ex.simd());
        map_rows(ex, s.a, d, t, &|_, row| zip_in_place(simd, row, vec, |v, b| fast_sigmoid(b + v)));
        lw.w0.read(0, &mut s.vec[..d]);
        let vec = &s.vec[..d];
        map_rows(ex, s.lw, d, t, &|_, row| zip_in_place(simd, row, vec, |v, b| -DECAY_SCALE * fast_sigmoid(b + v)));
        // κ̂ = normalize(k ⊙ k_k) per head; k ← k ⊙ (1 + (a − 1) ⊙ k_a).
        lw.k_k.read(0, &mut s.vec[..d]);
        let (vec, k) = (&s.vec[..d], &s.k[..tc]);
        map_rows(ex, s.kk, d, t, &|tt, kkr| {
            let kr = &k[tt * d..(tt + 1) * d];
            for (i, v) in kkr.iter_mut().enumerate() {
                *v = kr[i] * vec[i];
            }
            for hv in kkr.chunks_exact_mut(n) {
                let norm = libm::sqrtf(hv.iter().map(|v| v * v).sum::<f32>()).max(1e-12);
                hv.iter_mut().for_each(|v| *v /= norm);
            }
        });
        lw.k_a.read(0, &mut s.vec[..d]);
        let (vec, a) = (&s.vec[..d], &s.a[..tc]);
        map_rows(ex, s.k, d, t, &|tt, kr| {
            let ar = &a[tt * d..(tt + 1) * d];
            for i in 0..d {
                kr[i] *= 1.0 + (ar[i] - 1.0) * vec[i];
            }
        });
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
            let (pw, pa) = p.split_at_mut(d);
            for (lr, ar) in s.lw[..tc].chunks_exact(d).zip(s.a[..tc].chunks_exact(d)) {
                pw.iter_mut().zip(lr).for_each(|(p, v)| *p += v);
                pa.iter_mut().zip(ar).for_each(|(p, v)| *p += v);
            }
        }

        // The scan's decays w = exp(log w) and b = κ̂ ⊙ a, in place (neither is read again), once
        // for every state row.
        let kk = &s.kk[..tc];
        let simd = ex.simd();
        map_rows(ex, &mut s.lw[..tc], d, t, &|_, row| map_in_place(simd, row, fast_exp));
        map_rows(ex, &mut s.a[..tc], d, t, &|tt, row| {
            row.iter_mut().zip(&kk[tt * d..(tt + 1) * d]).for_each(|(v, k)| *v *= k)
        });

        // The delta-rule scan, one head per task; y into o (t, C).
        {
            let os = Shared::new(&mut s.o[..tc]);
            let ss = Shared::new(wkv);
            let (r, k, v, w, b, kk) = (&s.r[..tc], &s.k[..tc], &s.v[..tc], &s.lw[..tc], &s.a[..tc], &s.kk[..tc]);
            let stag = window.map(|w| (w.at, Shared::new(w.cache)));
            let simd = ex.simd();
            ex.for_each(h, &|hh| {
                let ins = Inputs { r, k, v, w, b, kk, ld: d, off: hh * n, n };
                // SAFETY: head hh owns its state blocks and its N columns of o.
                unsafe {
                    let sa = ss.range(hh * n * n, n * n);
                    let out = &os;
                    match &stag {
                        None => scan(simd, &ins, t, sa, None, out),
                        Some((at, cache)) => scan(simd, &ins, t, sa, Some((*at, cache.range(hh * n * n, n * n))), out),
                    }
                }
            });
        }

        // GroupNorm per head, + the bonus (Σ r·k·r_k)·v, ⊙ g, then x += o·W_oᵀ.
        lw.r_k.read(0, &mut s.vec[..d]);
        let (vec, r, k, v, g) = (&s.vec[..d], &s.r[..tc], &s.k[..tc], &s.v[..tc], &s.g[..tc]);
        map_rows(ex, s.o, d, t, &|tt, orow| {
            let row = tt * d..(tt + 1) * d;
            let (rr, kr, vr, gr) = (&r[row.clone()], &k[row.clone()], &v[row.clone()], &g[row]);
            for (hh, oh) in orow.chunks_exact_mut(n).enumerate() {
                let mean = oh.iter().sum::<f32>() / n as f32;
                let var = oh.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                let inv = 1.0 / libm::sqrtf(var + c.gn_eps);
                let base = hh * n;
                let bonus: f32 = (base..base + n).map(|ch| rr[ch] * kr[ch] * vec[ch]).sum();
                for (i, v) in oh.iter_mut().enumerate() {
                    let ch = base + i;
                    let y = (*v - mean) * inv * lw.lnx_w.get(ch) + lw.lnx_b.get(ch) + bonus * vr[ch];
                    *v = y * gr[ch];
                }
            }
        });
        matmul(ex, &s.o[..tc], t, &lw.wo, s.tmp)?;
        add_rows(ex, x, &s.tmp[..tc], d, t);

        // Channel mix.
        token_shift(ex, t, x, (&lw.ln2_w, &lw.ln2_b), c.eps, ffn_shift, s.xx, s.prev);
        let (xx, prev) = (&s.xx[..tc], &s.prev[..tc]);
        Self::mixed(ex, t, d, xx, prev, &lw.ffn_x_k, s.vec, s.tmp);
        let kk = &mut s.wide[..t * c.d_ffn];
        matmul(ex, &s.tmp[..tc], t, &lw.fk, kk)?;
        map_rows(ex, kk, c.d_ffn, t, &|_, row| {
            row.iter_mut().for_each(|v| {
                let r = relu(*v);
                *v = r * r
            })
        });
        matmul(ex, kk, t, &lw.fv, s.tmp)?;
        add_rows(ex, x, &s.tmp[..tc], d, t);
        Ok(())
    }
}

/// One head's per-token inputs: rows `ld` apart, the head's `n` channels at `off`; `w` the decay
/// `exp(log w)` and `b = κ̂ ⊙ a`.
struct Inputs<'a> {
    r: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    kk: &'a [f32],
    ld: usize,
    off: usize,
    n: usize,
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

/// One token into one state `s (N_value, N_key)`: `s ← s·diag(w) − (s·κ̂)·bᵀ + v·kᵀ` with
/// `b = κ̂ ⊙ a`; with `r`, also `y = s·r` (after the update) into `y`.
#[inline(always)]
fn update(s: &mut [f32], w: &[f32], kk: &[f32], b: &[f32], k: &[f32], v: &[f32], mut r: Option<(&[f32], &mut [f32])>) {
    let n = kk.len();
    for (i, (row, &vv)) in s.chunks_exact_mut(n).zip(v).enumerate() {
        let sa = dot8(row, kk);
        for j in 0..n {
            row[j] = row[j] * w[j] - sa * b[j] + vv * k[j];
        }
        if let Some((r, y)) = &mut r {
            y[i] = dot8(row, r);
        }
    }
}

/// The recurrence of one head over `t` tokens from its state `sa`; writes `y` rows into `o`
/// (stride `ld`, at `off`). With a second state (two staggered states, FAMILIES.md §9.3), both take
/// every token, the read-out uses `sa`, and after each token that completes a multiple of `r`
/// tokens `sa ← sb`, `sb ← 0`: the read-out at stream position p (0-based) then holds the tokens
/// from `max(0, r·⌊p/r⌋ − r)` to p — the last r+1 to 2r once p ≥ r. On an AVX2 or AVX-512
/// CPU [`crate::lanes`]' blocked kernel; otherwise the loop below.
///
/// # Safety
/// `o` rows `0..t` at `off..off+n` must be written by no one else.
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
    let n = x.n;
    for tt in 0..t {
        let at = tt * x.ld + x.off;
        let (r, k, v) = (&x.r[at..at + n], &x.k[at..at + n], &x.v[at..at + n]);
        let (w, b, kk) = (&x.w[at..at + n], &x.b[at..at + n], &x.kk[at..at + n]);
        let y = o.range(at, n);
        update(sa, w, kk, b, k, v, Some((r, y)));
        if let Some((win, s2)) = &mut sb {
            update(s2, w, kk, b, k, v, None);
            if (win.pos0 + tt + 1).is_multiple_of(win.r) {
                sa.copy_from_slice(s2);
                s2.fill(0.0);
            }
        }
    }
}

/// The scan of one state on AVX-512 or AVX2 ([`crate::lanes`]: blocks of four rows through 16
/// tokens; 16 or 8 lanes, FMA). Each row's update is the loop's (`s_i ← s_i ⊙ w − (s_i·κ̂)·b +
/// v_i·k`, `y_i = s_i·r`) with other rounding: the sums in another order and
/// `s_i ⊙ w + (v_i·k − (s_i·κ̂)·b)` fused.
#[cfg(target_arch = "x86_64")]
impl crate::lanes::RowBlock for Inputs<'_> {
    fn n_rows(&self) -> usize {
        self.n
    }

    #[inline(always)]
    unsafe fn rows<L: Lanes, const R: usize>(
        &self,
        tokens: Range<usize>,
        s: &mut [f32],
        i0: usize,
        o: Option<&Shared>,
    ) {
        let (x, n) = (self, self.n);
        let sp = s[i0 * n..(i0 + R) * n].as_mut_ptr();
        for tt in tokens {
            let at = tt * x.ld + x.off;
            let row = |v: &[f32]| v[at..at + n].as_ptr();
            let (kkp, kp, rp, wp, bp) = (row(x.kk), row(x.k), row(x.r), row(x.w), row(x.b));
            let v = &x.v[at + i0..at + i0 + R];

            // s_r·κ̂, in two chains a row (even and odd chunks).
            let (mut a0, mut a1) = ([L::zero(); R], [L::zero(); R]);
            each_chunk!(L, n, |c, m, second| {
                let kv = L::load(m, kkp.add(c));
                let a = if second { &mut a1 } else { &mut a0 };
                for (r, a) in a.iter_mut().enumerate() {
                    *a = L::load(m, sp.add(r * n + c)).mul_add(kv, *a);
                }
            });
            let sa: [L; R] = core::array::from_fn(|r| L::splat(a0[r].add(a1[r]).sum()));
            let vv: [L; R] = core::array::from_fn(|r| L::splat(v[r]));

            // s_r ← s_r ⊙ w + (v_r·k − sa_r·b), and s_r·r.
            let (mut a0, mut a1) = ([L::zero(); R], [L::zero(); R]);
            each_chunk!(L, n, |c, m, second| {
                let wv = L::load(m, wp.add(c));
                let bv = L::load(m, bp.add(c));
                let kv = L::load(m, kp.add(c));
                let rv = L::load(m, rp.add(c));
                let a = if second { &mut a1 } else { &mut a0 };
                for r in 0..R {
                    let p = sp.add(r * n + c);
                    let new = L::load(m, p).mul_add(wv, sa[r].neg_mul_add(bv, vv[r].mul(kv)));
                    new.store(m, p);
                    a[r] = new.mul_add(rv, a[r]);
                }
            });
            if let Some(o) = o {
                let y = o.range(at + i0, R);
                for r in 0..R {
                    y[r] = a0[r].add(a1[r]).sum();
                }
            }
        }
    }
}

impl<'a, L: AsRef<[Layer<'a>]> + Sync> Stack for Rwkv7<'a, L> {
    type Scratch<'s> = Scratch<'s>;
    fn stack_shape(&self, _: usize) -> Result<StackShape, Error> {
        let c = &self.cfg;
        let window = match self.forget {
            Forget::Staggered { r } => Some(WindowShape { r, layer_len: c.n_heads * c.head_size * c.head_size }),
            _ => None,
        };
        Ok(StackShape {
            base_len: c.state_size(),
            layer_state_len: c.layer_state_len(),
            probe_per_layer: PROBE.len() * c.d_model,
            window,
        })
    }
    fn split_scratch<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<Scratch<'s>, Error> {
        self.scratch_parts(t, buf)
    }
    /// The embedding row through LN0, in f32.
    fn embed(&self, tokens: &[u32], x: &mut [f32], s: &mut Scratch) {
        let d = self.cfg.d_model;
        for (row, &tok) in x.chunks_exact_mut(d).zip(tokens) {
            self.w.embed.row(tok as usize, s.vec);
            layer_norm(&s.vec[..d], &self.w.ln0_w, &self.w.ln0_b, self.cfg.eps, row);
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
        self.layer(call, x, st, s, probe, window)
    }
    fn final_norm(&self, x: &mut [f32], s: &mut Scratch) {
        let d = self.cfg.d_model;
        for row in x.chunks_exact_mut(d) {
            s.vec[..d].copy_from_slice(row);
            layer_norm(&s.vec[..d], &self.w.ln_out_w, &self.w.ln_out_b, self.cfg.eps, row);
        }
    }
}

impl<'a, L: AsRef<[Layer<'a>]> + Sync> Recurrent for Rwkv7<'a, L> {
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
            Forget::Staggered { .. } => c.state_size() + c.n_layer * c.n_heads * c.head_size * c.head_size + 2,
            _ => c.state_size(),
        }
    }
    fn scratch_len(&self, chunk: usize) -> usize {
        let c = &self.cfg;
        chunk * (12 * c.d_model + c.wide()) + c.d_model
    }
    fn head(&self) -> &Weight<'_> {
        &self.w.head
    }
    fn set_forget(&mut self, f: Forget) -> Result<(), Error> {
        f.check_non_diagonal(self.cfg.n_layer)?;
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
    /// Zeros, then a state-tuned model's `S` of every head, as stored.
    fn initial_state(&self, state: &mut [f32]) {
        state.fill(0.0);
        let nn = self.cfg.head_size * self.cfg.head_size;
        for (l, layer) in self.w.layers.as_ref().iter().enumerate() {
            let Some(ts) = &layer.time_state else { continue };
            for h in 0..self.cfg.n_heads {
                if let Some(s) = state.get_mut(self.head_state(l, h)) {
                    s.iter_mut().enumerate().for_each(|(i, x)| *x = ts.get(h * nn + i));
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
    use super::*;

    const T: usize = 37;
    const N: usize = 4;

    fn inputs() -> [[f32; T * N]; 6] {
        let mut seed = 12345u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((seed >> 8) as f32 / (1u32 << 24) as f32) - 0.5
        };
        let mut x = [[0f32; T * N]; 6];
        for v in x.iter_mut().flatten() {
            *v = rnd();
        }
        for tt in 0..T {
            let kk = &mut x[5][tt * N..(tt + 1) * N];
            let norm = libm::sqrtf(kk.iter().map(|v| v * v).sum());
            kk.iter_mut().for_each(|v| *v /= norm);
        }
        for v in x[3].iter_mut() {
            *v = -0.6 * (*v + 0.5); // log w
        }
        for v in x[4].iter_mut() {
            *v += 0.5; // a in (0, 1)
        }
        x
    }

    /// The scan against the update written out in f64 (`S ← S·diag(w) − (S·κ̂)·(κ̂ ⊙ a)ᵀ + v·kᵀ`,
    /// `y = S·r`), on every level the CPU has (AVX-512 takes its own kernel), for the second of two
    /// heads side by side, with heads of one partial chunk, of whole chunks and of both (N = 4, 64,
    /// 37: row blocks and a tail), over more tokens than one token block.
    #[test]
    fn scan_is_the_rwkv7_rule_on_every_level() {
        extern crate std;
        use std::vec::Vec;
        for simd in crate::exec::up_to_avx512() {
            for n in [N, 64, 37] {
                let mut seed = 777u32;
                let mut rnd = || {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    ((seed >> 8) as f32 / (1u32 << 24) as f32) - 0.5
                };
                let ld = 2 * n;
                let mut x: [Vec<f32>; 6] = core::array::from_fn(|_| (0..T * ld).map(|_| rnd()).collect());
                for tt in 0..T {
                    let kk = &mut x[5][tt * ld + n..(tt + 1) * ld];
                    let norm = libm::sqrtf(kk.iter().map(|v| v * v).sum());
                    kk.iter_mut().for_each(|v| *v /= norm);
                }
                x[3].iter_mut().for_each(|v| *v = -0.6 * (*v + 0.5));
                x[4].iter_mut().for_each(|v| *v += 0.5);
                let [r_, k, v, lw, a, kk] = &x;
                let w: Vec<f32> = lw.iter().map(|&l| exp(l)).collect();
                let b: Vec<f32> = a.iter().zip(kk).map(|(a, k)| a * k).collect();
                let ins = Inputs { r: r_, k, v, w: &w, b: &b, kk, ld, off: n, n };
                let mut out = std::vec![0f32; T * ld];
                let mut s = std::vec![0f32; n * n];
                let os = Shared::new(&mut out);
                unsafe { scan(simd, &ins, T, &mut s, None, &os) };
                let mut m = std::vec![0f64; n * n];
                for tt in 0..T {
                    let at = tt * ld + n;
                    let f = |v: &Vec<f32>, j: usize| v[at + j] as f64;
                    for i in 0..n {
                        let row = &mut m[i * n..(i + 1) * n];
                        let sa: f64 = (0..n).map(|j| row[j] * f(kk, j)).sum();
                        for (j, x) in row.iter_mut().enumerate() {
                            *x = *x * f(lw, j).exp() - sa * f(kk, j) * f(a, j) + f(v, i) * f(k, j);
                        }
                        let y: f64 = (0..n).map(|j| row[j] * f(r_, j)).sum();
                        let got = out[at + i] as f64;
                        assert!((got - y).abs() < 1e-5, "{simd:?} N {n} token {tt} row {i}: {got} vs {y}");
                    }
                }
                assert!(
                    out.chunks_exact(n).step_by(2).flatten().all(|&y| y == 0.0),
                    "{simd:?} N {n}: wrote the other head"
                );
                for (i, (x, y)) in s.iter().zip(&m).enumerate() {
                    assert!((*x as f64 - y).abs() < 1e-5, "{simd:?} N {n} state {i}: {x} vs {y}");
                }
            }
        }
    }

    /// Two staggered states, over two calls (20 tokens, then the rest): the read-out at position p
    /// equals the plain recurrence run from the zero state over tokens max(0, r·⌊p/r⌋ − r)..=p, on
    /// every level the CPU has.
    #[test]
    fn staggered_states_read_out_the_last_r_to_2r_tokens() {
        let [r_, k, v, lw, a, kk] = inputs();
        let (w, b) = (lw.map(exp), core::array::from_fn::<f32, { T * N }, _>(|i| kk[i] * a[i]));
        let ins = Inputs { r: &r_, k: &k, v: &v, w: &w, b: &b, kk: &kk, ld: N, off: 0, n: N };
        for simd in crate::exec::up_to_avx512() {
            for r in [1usize, 3, 10, 50] {
                let mut out = [0f32; T * N];
                let (mut sa, mut sb) = ([0f32; N * N], [0f32; N * N]);
                for (t0, t1) in [(0usize, 20usize), (20, T)] {
                    let sub = Inputs {
                        r: &r_[t0 * N..],
                        k: &k[t0 * N..],
                        v: &v[t0 * N..],
                        w: &w[t0 * N..],
                        b: &b[t0 * N..],
                        kk: &kk[t0 * N..],
                        ..ins
                    };
                    let os = Shared::new(&mut out[t0 * N..]);
                    let at = WindowAt { r, pos0: t0 % r, filled: t0 >= r };
                    unsafe { scan(simd, &sub, t1 - t0, &mut sa, Some((at, &mut sb)), &os) };
                }
                for p in 0..T {
                    let start = (r * (p / r)).saturating_sub(r);
                    let mut s = [0f32; N * N];
                    let mut want = [0f32; N];
                    let os = Shared::new(&mut want);
                    for tt in start..=p {
                        let one = Inputs {
                            r: &r_[tt * N..],
                            k: &k[tt * N..],
                            v: &v[tt * N..],
                            w: &w[tt * N..],
                            b: &b[tt * N..],
                            kk: &kk[tt * N..],
                            ..ins
                        };
                        unsafe { scan(simd, &one, 1, &mut s, None, &os) };
                    }
                    let got = &out[p * N..(p + 1) * N];
                    let err = got.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(err < 1e-5, "{simd:?} r {r} p {p}: {got:?} vs {want:?}");
                }
            }
        }
    }
}
