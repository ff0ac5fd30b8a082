//! HGRN-2 (fla `HGRN2ForCausalLM`): the whole forward math, as FORMATS.md §4 states it.
//!
//! Per layer: `h = RMSNorm(x)`, `q = silu(h·W_qᵀ)`, `f = h·W_fᵀ`, `i = h·W_iᵀ`, the forget gate
//! `g = logsigmoid(f)` (with a lower bound `lb_l` past layer 0: `g = log(lb + (1−lb)·σ(f))`), key
//! `1 − exp(g)`, the recurrence of [`crate::gla`] in [`gla::Mode::Inclusive`] with query
//! `q·e^−0.5` (`S ← diag(exp g)·S + kᵀ·i`, `o = q·S`), `x += RMSNorm(o; g_norm, 1e-5)·W_oᵀ`, then
//! the SwiGLU MLP `x += (silu(h2·W_gateᵀ) ⊙ h2·W_upᵀ)·W_downᵀ` on `h2 = RMSNorm(x)`.
//!
//! Shapes: `C` = d_model, `e` = expand_ratio = key dim, `H = C/e` heads, value dim `Vh = C/H`,
//! `I` = MLP width.
//!
//! State, per layer (f32): `S (H, e, Vh)` (`[head][key][value]`); layers follow each other. There
//! is no conv or shift state. Zero = start of a sequence. Under `Forget::Window { r }` the state
//! continues with one [`gla::window_len`] cache per layer and then two values (position mod r,
//! filled).
use crate::error::{need, Error};
use crate::exec::{add_rows, for_row_blocks, map_rows, Exec, Shared};
use crate::forget::{Forget, LayerWindow, Runs};
use crate::gemm::matmul;
use crate::gla::{self, Mode};
use crate::gla_lm::{Mlp, MlpScratch};
use crate::model::{non_finite_state, run_stack, Call, Recurrent, Scan, Stack, StackShape, WindowShape};
use crate::ops::{
    exp, fast_exp, fast_ln, fast_sigmoid, fast_silu, fast_softplus, map_in_place, rmsnorm, rmsnorm_inplace,
};
use crate::weight::Weight;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// C
    pub d_model: usize,
    pub n_layer: usize,
    /// e (key dim per head)
    pub expand: usize,
    /// I
    pub d_mlp: usize,
    pub vocab_rows: usize,
    /// RMSNorm eps of attn_norm, mlp_norm and the final norm.
    pub eps: f32,
    /// RMSNorm eps of g_norm (1e-5: fla calls it without `norm_eps`).
    pub g_eps: f32,
}

impl Config {
    pub fn n_heads(&self) -> usize {
        self.d_model / self.expand.max(1)
    }
    pub fn head_v(&self) -> usize {
        self.d_model / self.n_heads().max(1)
    }
    pub fn layer_state_len(&self) -> usize {
        self.n_heads() * self.expand * self.head_v()
    }
    pub fn state_size(&self) -> usize {
        self.n_layer * self.layer_state_len()
    }
    pub fn validate(&self) -> Result<(), Error> {
        let c = self;
        if c.d_model == 0 || c.n_layer == 0 || c.expand == 0 || c.d_mlp == 0 {
            return Err(Error::Config("hgrn2: a dimension is zero"));
        }
        if !c.d_model.is_multiple_of(c.expand) || !c.d_model.is_multiple_of(c.n_heads()) {
            return Err(Error::Config("hgrn2: hidden_size must be a multiple of expand_ratio"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    /// (1, C)
    pub attn_norm: Weight<'a>,
    /// (C, C) each (q, f: `[H·e, C]`)
    pub wq: Weight<'a>,
    pub wf: Weight<'a>,
    pub wi: Weight<'a>,
    pub wo: Weight<'a>,
    /// (1, C)
    pub g_norm: Weight<'a>,
    pub mlp_norm: Weight<'a>,
    /// (I, C) each
    pub gate: Weight<'a>,
    pub up: Weight<'a>,
    /// (C, I)
    pub down: Weight<'a>,
}

#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    /// (V, C)
    pub embed: Weight<'a>,
    /// (L, C): each layer's lower bound per channel, [`lower_bounds`] of the checkpoint's
    /// `model.lower_bounds`, when `use_lower_bound` (computed once: a token step would otherwise
    /// spend L exps per channel and layer on it)
    pub lower_bounds: Option<Weight<'a>>,
    pub layers: &'a [Layer<'a>],
    /// (1, C)
    pub norm: Weight<'a>,
    /// (V, C): the embedding itself when tied
    pub head: Weight<'a>,
}

/// The lower bounds `out (L, C)` from the checkpoint's `raw (L, C)`: per channel,
/// `cumsum(softmax(raw, 0))[l] − softmax(raw, 0)[0]` (0 for the first layer).
pub fn lower_bounds(raw: &Weight, out: &mut [f32]) -> Result<(), Error> {
    let (nl, c) = (raw.rows, raw.cols);
    need("lower bounds", out.len(), nl * c)?;
    for ch in 0..c {
        let mx = (0..nl).fold(f32::NEG_INFINITY, |m, j| m.max(raw.get(j * c + ch)));
        for j in 0..nl {
            out[j * c + ch] = exp(raw.get(j * c + ch) - mx);
        }
        let z: f32 = (0..nl).map(|j| out[j * c + ch]).sum();
        let mut cum = 0.0;
        for j in 0..nl {
            cum += out[j * c + ch] / z;
            out[j * c + ch] = cum;
        }
        let first = out[ch];
        (0..nl).for_each(|j| out[j * c + ch] -= first);
    }
    Ok(())
}

pub struct Hgrn2<'a> {
    pub cfg: Config,
    pub w: Weights<'a>,
    forget: Forget,
}

const PROBE: &[&str] = &["log_decay_sum"];

/// The forget gate of one row: `f` → the log forget gate `g` (in place; then `c·g + ln a` under
/// Dt / RRI) and the key `k = 1 − exp(g)` (then `b·k` under RRI). Layer 0 (or no lower bounds):
/// `g = log σ(f)`, `k = σ(−f)`; with a lower bound lb: `g = ln(lb + (1 − lb)·σ(f))` and `k = (1 −
/// lb)·σ(−f)`, which is `1 − exp(g)` without the cancellation of computing it from g (fla writes
/// `1 − g` of the linear gate). All through the branch-free forms of [`crate::ops`], so the row
/// runs 8 lanes at a time on AVX2 (libm's `log1pf`, `logf` and `expm1f` were 11 % of a run).
struct Gate<'l> {
    /// (d): the layer's lower bound per channel, past layer 0.
    lb: Option<&'l [f32]>,
    log_a: f32,
    b: f32,
    dtc: f32,
}

impl Gate<'_> {
    #[inline]
    fn row(&self, simd: crate::exec::Simd, f: &mut [f32], k: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd.has_avx2() {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(g: &Gate, f: &mut [f32], k: &mut [f32]) {
                g.body(f, k)
            }
            // SAFETY: the host reported AVX2 and FMA at run time.
            return unsafe { avx2(self, f, k) };
        }
        let _ = simd;
        self.body(f, k)
    }

    #[inline(always)]
    fn body(&self, f: &mut [f32], k: &mut [f32]) {
        let (log_a, b, dtc) = (self.log_a, self.b, self.dtc);
        match self.lb {
            Some(lb) => {
                for ((fv, kv), &lb) in f.iter_mut().zip(k.iter_mut()).zip(lb) {
                    let e = fast_exp(-*fv);
                    let s = 1.0 / (1.0 + e);
                    *kv = (1.0 - lb) * (e * s) * b;
                    *fv = fast_ln(lb + (1.0 - lb) * s) * dtc + log_a;
                }
            }
            None => {
                for (fv, kv) in f.iter_mut().zip(k.iter_mut()) {
                    *kv = fast_sigmoid(-*fv) * b;
                    *fv = -fast_softplus(-*fv) * dtc + log_a;
                }
            }
        }
    }
}

impl<'a> Hgrn2<'a> {
    pub fn new(cfg: Config, w: Weights<'a>) -> Result<Self, Error> {
        cfg.validate()?;
        let (c, i, v) = (cfg.d_model, cfg.d_mlp, cfg.vocab_rows);
        if w.layers.len() != cfg.n_layer {
            return Err(Error::Shape { what: "layers", expected: cfg.n_layer, got: w.layers.len() });
        }
        w.embed.expect_shape("embeddings", v, c)?;
        w.head.expect_shape("lm_head", v, c)?;
        w.norm.expect_shape("norm", 1, c)?;
        if let Some(lb) = &w.lower_bounds {
            lb.expect_shape("lower_bounds", cfg.n_layer, c)?;
        }
        for l in w.layers {
            for x in [&l.attn_norm, &l.g_norm, &l.mlp_norm] {
                x.expect_shape("norm weight", 1, c)?;
            }
            for x in [&l.wq, &l.wf, &l.wi, &l.wo] {
                x.expect_shape("attn projection", c, c)?;
            }
            l.gate.expect_shape("mlp.gate_proj", i, c)?;
            l.up.expect_shape("mlp.up_proj", i, c)?;
            l.down.expect_shape("mlp.down_proj", c, i)?;
        }
        Ok(Hgrn2 { cfg, w, forget: Forget::None })
    }

    /// The lower bound of layer `l`, channel `ch`.
    fn lower_bound(&self, l: usize, ch: usize) -> f32 {
        self.w.lower_bounds.as_ref().map_or(0.0, |lb| lb.get(l * self.cfg.d_model + ch))
    }

    /// Layer `call.l` over the rows `x` (in place) from its state `st`; under [`Scan::Recurrent`],
    /// whether the state it wrote is finite (true, unchecked, under [`Scan::Chunked`]).
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
        let (d, e, nh, vh, im) = (c.d_model, c.expand, c.n_heads(), c.head_v(), c.d_mlp);
        let tc = t * d;
        let (h, rest) = scratch.split_at_mut(tc);
        let (q, rest) = rest.split_at_mut(tc);
        let (f, rest) = rest.split_at_mut(tc);
        let (iv, rest) = rest.split_at_mut(tc);
        let (o, rest) = rest.split_at_mut(tc);
        let (wide, rest) = rest.split_at_mut(2 * t * im);
        let hsl = gla::head_scratch(e, vh);
        let hs = &mut rest[..nh * hsl];

        let xs: &[f32] = x;
        map_rows(ex, h, d, t, &|tt, hr| rmsnorm(&xs[tt * d..(tt + 1) * d], &lw.attn_norm, 0, c.eps, hr));
        matmul(ex, h, t, &lw.wq, q)?;
        matmul(ex, h, t, &lw.wf, f)?;
        matmul(ex, h, t, &lw.wi, iv)?;
        let scale = 1.0 / libm::sqrtf(e as f32);
        let simd = ex.simd();
        map_rows(ex, q, d, t, &|_, row| map_in_place(simd, row, |v| fast_silu(v) * scale));
        // f → log forget gate g (in place); k = 1 − exp(g) into h (no longer needed).
        let (rri, dtc) = match self.forget {
            Forget::Rri { a, b } => ((libm::logf(a), b), 1.0),
            Forget::Dt { .. } | Forget::DtLayers(_) => ((0.0, 1.0), self.forget.dt_scale(l)),
            _ => ((0.0, 1.0), 1.0),
        };
        // The layer's lower bound per channel, in o's first row until the recurrence writes o.
        let use_lb = l > 0 && self.w.lower_bounds.is_some();
        if use_lb {
            for (ch, v) in o[..d].iter_mut().enumerate() {
                *v = self.lower_bound(l, ch);
            }
        }
        {
            let (ks, gs, lbs) = (Shared::new(h), Shared::new(f), use_lb.then_some(&o[..d]));
            let gate = Gate { lb: lbs, log_a: rri.0, b: rri.1, dtc };
            let simd = ex.simd();
            for_row_blocks(ex, t, &|rows| {
                // SAFETY: the blocks of one call are disjoint rows of h and of f.
                let (kb, gb) = unsafe { (ks.rows(rows.clone(), d), gs.rows(rows, d)) };
                for (krow, grow) in kb.chunks_exact_mut(d).zip(gb.chunks_exact_mut(d)) {
                    gate.row(simd, grow, krow);
                }
            });
        }
        if let Some(p) = probe {
            for row in f.chunks_exact(d) {
                for (pv, v) in p.iter_mut().zip(row) {
                    *pv += v;
                }
            }
        }
        let simd = ex.simd();
        let finite = gla::FiniteHeads::new();
        {
            let (os, ss, hss) = (Shared::new(o), Shared::new(st), Shared::new(hs));
            let (qr, kr, vr, lwr) = (&*q, &*h, &*iv, &*f);
            let wss = window.map(|w| (w.at, Shared::new(w.cache)));
            ex.for_each(nh, &|hh| {
                let head = gla::Head {
                    q: qr,
                    k: kr,
                    v: vr,
                    lw: lwr,
                    ldk: d,
                    ldv: d,
                    koff: hh * e,
                    voff: hh * vh,
                    kd: e,
                    vd: vh,
                    u: &[],
                    mode: Mode::Inclusive,
                };
                // SAFETY: head hh owns its state block, its scratch and its Vh columns of o.
                unsafe {
                    let sh = ss.range(hh * e * vh, e * vh);
                    match scan {
                        Scan::Recurrent => finite.note(gla::recurrent(simd, &head, t, sh, &os, d, hh * vh)),
                        Scan::Chunked => gla::chunked(ex, &head, t, sh, hss.range(hh * hsl, hsl), &os, d, hh * vh),
                    }
                    if let Some((win, ws)) = &wss {
                        gla::window_head(&head, hh, nh, t, *win, ws, sh, &os, d, hh * vh);
                    }
                }
            });
        }
        map_rows(ex, o, d, t, &|_, row| rmsnorm_inplace(row, &lw.g_norm, 0, c.g_eps));
        matmul(ex, o, t, &lw.wo, q)?;
        add_rows(ex, x, &q[..tc], d, t);
        let mlp = Mlp { norm: &lw.mlp_norm, gate: &lw.gate, up: &lw.up, down: &lw.down, eps: c.eps };
        mlp.run(ex, t, x, MlpScratch { h, wide, y: q })?;
        Ok(finite.all())
    }
}

impl Stack for Hgrn2<'_> {
    type Scratch<'s> = &'s mut [f32];
    fn stack_shape(&self, _: usize) -> Result<StackShape, Error> {
        let c = &self.cfg;
        let window = match self.forget {
            Forget::Window { r } => {
                Some(WindowShape { r, layer_len: gla::window_len(c.n_heads(), c.expand, c.head_v(), r) })
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
    fn split_scratch<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<&'s mut [f32], Error> {
        need("hgrn2 scratch", buf.len(), self.scratch_len(t))?;
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
        // The whole layer state is the heads' matrices, checked as the token step writes them.
        let finite = self.layer(call, x, st, s, probe, window)?;
        if call.scan == Scan::Recurrent && !finite {
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

impl Recurrent for Hgrn2<'_> {
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
                c.state_size() + c.n_layer * gla::window_len(c.n_heads(), c.expand, c.head_v(), r) + 2
            }
            _ => c.state_size(),
        }
    }
    fn scratch_len(&self, chunk: usize) -> usize {
        let c = &self.cfg;
        chunk * (5 * c.d_model + 2 * c.d_mlp) + c.n_heads() * gla::head_scratch(c.expand, c.head_v())
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
        self.cfg.n_heads()
    }
    fn head_state(&self, layer: usize, head: usize) -> core::ops::Range<usize> {
        let c = &self.cfg;
        let hl = c.expand * c.head_v();
        let start = layer * c.layer_state_len() + head * hl;
        start..start + hl
    }
    fn conv_state(&self, _layer: usize, _head: usize) -> Option<Runs> {
        None
    }
    fn probe_series(&self) -> (&'static [&'static str], usize) {
        (PROBE, self.cfg.expand)
    }
}
