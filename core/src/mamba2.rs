//! Mamba-2: the whole forward math, as FORMATS.md §2.3 states it.
//!
//! Per layer: `h = RMSNorm(x)`, `[z | xBC | dt] = h·W_inᵀ`, a causal depthwise conv + SiLU over
//! `xBC = [x | B | C]`, `dt = softplus(dt + dt_bias)` clamped to the time-step limit, then the SSM
//! `S ← exp(dt·A)·S + dt·x·Bᵀ`, `y = S·C + D·x` per head, `y ← GroupRMSNorm(y ⊙ fast_silu(z))`, and
//! `x ← x + y·W_outᵀ`. The chunked form (SSD) computes the same `y` and final `S` block by block:
//! within a block of `Q` tokens the output is a masked, decay-weighted attention `(C·Bᵀ ⊙ L)·x`,
//! and the state enters and leaves each block once.
//!
//! Shapes: `d` = d_model, `di` = d_inner = H·P, `H` heads of `P` channels, `G` groups of `N` = d_state,
//! `k` = conv width, `cd = di + 2GN`, `nin = 2di + 2GN + H`.
//!
//! State, per layer (f32): `conv (k−1, cd)` — the last k−1 conv inputs, oldest first — then
//! `ssm (H, P, N)`; layers follow each other. Zero = start of a sequence.
use crate::error::{first_non_finite, need, Error};
use crate::exec::{map_rows, Exec, Shared, Simd};
use crate::forget::{cut_rows, Cut, Decimated, Decimation, Forget, LayerWindow, Measure, Runs, WindowAt};
use crate::gemm::{gemm_nt, gemm_raw, matmul, Panels, Product};
use crate::model::{
    non_finite_state, run_stack, run_stack_decimated, Call, Recurrent, Scan, Stack, StackShape, WindowShape,
};
use crate::ops::{
    axpy, causal_conv_silu, dot, exp, fast_exp, fast_silu, hi_lo, rmsnorm, rmsnorm_inplace, softplus, transpose,
};
use crate::weight::Weight;
use core::sync::atomic::{AtomicU32, Ordering};

/// Tokens per SSD block inside a chunk (the attention-like part is `Q × Q`).
pub const SSD_BLOCK: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub d_model: usize,
    pub n_layer: usize,
    /// N
    pub d_state: usize,
    /// P
    pub head_dim: usize,
    /// H
    pub n_heads: usize,
    /// G
    pub n_groups: usize,
    /// k
    pub d_conv: usize,
    /// Embedding / head rows (padded vocab).
    pub vocab_rows: usize,
    /// Epsilon of every RMSNorm.
    pub eps: f32,
    /// `time_step_limit`: dt is clamped to `[dt_min, dt_max]`.
    pub dt_min: f32,
    pub dt_max: f32,
}

impl Config {
    pub fn d_inner(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Channels through the conv: `x | B | C`.
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.n_groups * self.d_state
    }
    /// Rows of `in_proj`: `z | xBC | dt`.
    pub fn in_proj_rows(&self) -> usize {
        2 * self.d_inner() + 2 * self.n_groups * self.d_state + self.n_heads
    }
    pub fn conv_len(&self) -> usize {
        self.conv_dim() * (self.d_conv - 1)
    }
    pub fn ssm_len(&self) -> usize {
        self.n_heads * self.head_dim * self.d_state
    }
    /// f32 elements of one layer's state.
    pub fn layer_state_len(&self) -> usize {
        self.conv_len() + self.ssm_len()
    }
    /// State size N_S as the paper counts it (elements, all layers).
    pub fn paper_state_size(&self) -> usize {
        self.n_layer * self.layer_state_len()
    }

    pub fn validate(&self) -> Result<(), Error> {
        let c = self;
        if c.d_model == 0 || c.n_layer == 0 || c.d_state == 0 || c.head_dim == 0 || c.n_heads == 0 {
            return Err(Error::Config("mamba2: a dimension is zero"));
        }
        if c.n_groups == 0 || !c.n_heads.is_multiple_of(c.n_groups) {
            return Err(Error::Config("mamba2: n_heads must be a multiple of n_groups"));
        }
        if c.d_conv < 1 || c.d_conv > 16 {
            return Err(Error::Config("mamba2: conv width must be 1..=16"));
        }
        if c.dt_min.partial_cmp(&c.dt_max).is_none_or(|o| o.is_gt()) {
            return Err(Error::Config("mamba2: time_step_limit is not an interval"));
        }
        Ok(())
    }
}

/// One layer's weights (shapes as stored).
#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    /// (1, d)
    pub norm: Weight<'a>,
    /// (nin, d)
    pub in_proj: Weight<'a>,
    /// (1, nin), absent in released models
    pub in_proj_bias: Option<Weight<'a>>,
    /// (cd, k)
    pub conv_w: Weight<'a>,
    /// (1, cd)
    pub conv_b: Option<Weight<'a>>,
    /// (1, H)
    pub dt_bias: Weight<'a>,
    /// (1, H)
    pub a_log: Weight<'a>,
    /// (1, H), or (1, di) when `D_has_hdim`
    pub d: Weight<'a>,
    /// (1, di)
    pub gate_norm: Weight<'a>,
    /// (d, di)
    pub out_proj: Weight<'a>,
    /// (1, d)
    pub out_proj_bias: Option<Weight<'a>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    /// (Vp, d)
    pub embed: Weight<'a>,
    pub layers: &'a [Layer<'a>],
    /// (1, d)
    pub norm_f: Weight<'a>,
    /// (Vp, d): the embedding itself when tied
    pub head: Weight<'a>,
}

/// A layer's weights with what the forgetting method sets for it: the factor on A.
struct LayerCall<'l, 'a> {
    w: &'l Layer<'a>,
    a_scale: f32,
}

impl<'a> core::ops::Deref for LayerCall<'_, 'a> {
    type Target = Layer<'a>;
    fn deref(&self) -> &Layer<'a> {
        self.w
    }
}

pub struct Mamba2<'a> {
    pub cfg: Config,
    pub w: Weights<'a>,
    forget: Forget,
}

/// Probe series, per layer and head, summed over tokens.
const PROBE: &[&str] = &["log_decay_sum", "dt_sum", "b_mean_sum", "x_mean_sum"];

/// Scratch regions for `t` tokens (all f32, row-major).
pub(crate) struct Scratch<'s> {
    /// (t, max(d, di)): normed input, then the out_proj output
    h: &'s mut [f32],
    /// (t, nin): `z | xBC | dt_raw`
    zx: &'s mut [f32],
    /// (t, cd): conv + SiLU output `x | B | C`
    u: &'s mut [f32],
    /// (t, H): dt
    dt: &'s mut [f32],
    /// (t, di): SSM output
    y: &'s mut [f32],
    /// (G, ⌈t/Q⌉, Q, Q): C_i·B_j per group and block
    cb: &'s mut [f32],
    /// (k, cd): the conv weight transposed
    wt: &'s mut [f32],
    /// (H, head_scratch): per-head SSD scratch
    hs: &'s mut [f32],
}

impl<'a> Mamba2<'a> {
    /// Checks every tensor's shape against the config.
    pub fn new(cfg: Config, w: Weights<'a>) -> Result<Self, Error> {
        cfg.validate()?;
        let (d, di, h, cd) = (cfg.d_model, cfg.d_inner(), cfg.n_heads, cfg.conv_dim());
        if w.layers.len() != cfg.n_layer {
            return Err(Error::Shape { what: "layers", expected: cfg.n_layer, got: w.layers.len() });
        }
        w.embed.expect_shape("embedding", cfg.vocab_rows, d)?;
        w.head.expect_shape("lm_head", cfg.vocab_rows, d)?;
        w.norm_f.expect_shape("norm_f", 1, d)?;
        for l in w.layers {
            l.norm.expect_shape("norm", 1, d)?;
            l.in_proj.expect_shape("in_proj", cfg.in_proj_rows(), d)?;
            if let Some(b) = &l.in_proj_bias {
                b.expect_shape("in_proj.bias", 1, cfg.in_proj_rows())?;
            }
            l.conv_w.expect_shape("conv1d.weight", cd, cfg.d_conv)?;
            if let Some(b) = &l.conv_b {
                b.expect_shape("conv1d.bias", 1, cd)?;
            }
            l.dt_bias.expect_shape("dt_bias", 1, h)?;
            l.a_log.expect_shape("A_log", 1, h)?;
            if l.d.len() != h && l.d.len() != di {
                return Err(Error::Shape { what: "D", expected: h, got: l.d.len() });
            }
            l.gate_norm.expect_shape("mixer.norm", 1, di)?;
            l.out_proj.expect_shape("out_proj", d, di)?;
            if let Some(b) = &l.out_proj_bias {
                b.expect_shape("out_proj.bias", 1, d)?;
            }
        }
        Ok(Mamba2 { cfg, w, forget: Forget::None })
    }

    fn scratch_parts<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<Scratch<'s>, Error> {
        need("mamba2 scratch", buf.len(), self.scratch_len(t))?;
        let c = &self.cfg;
        let nb = t.div_ceil(SSD_BLOCK);
        let (h, rest) = buf.split_at_mut(t * c.d_model.max(c.d_inner()));
        let (zx, rest) = rest.split_at_mut(t * c.in_proj_rows());
        let (u, rest) = rest.split_at_mut(t * c.conv_dim());
        let (dt, rest) = rest.split_at_mut(t * c.n_heads);
        let (y, rest) = rest.split_at_mut(t * c.d_inner());
        let (cb, rest) = rest.split_at_mut(c.n_groups * nb * SSD_BLOCK * SSD_BLOCK);
        let (wt, rest) = rest.split_at_mut(c.d_conv * c.conv_dim());
        let (hs, _) = rest.split_at_mut(c.n_heads * head_scratch(c));
        Ok(Scratch { h, zx, u, dt, y, cb, wt, hs })
    }

    /// f32 elements of one layer's window cache: `L (H, P, N)`, a ring of r slots of
    /// `[log α (H) | dt (H) | B (G·N) | x (di)]`, and the window's log-decay sum `(H, 2)` (hi, lo).
    fn window_layer_len(&self, r: usize) -> usize {
        let c = &self.cfg;
        c.ssm_len() + r * self.slot_len() + 2 * c.n_heads
    }

    fn slot_len(&self) -> usize {
        let c = &self.cfg;
        2 * c.n_heads + c.n_groups * c.d_state + c.d_inner()
    }

    /// Head `hh`'s A = −exp(A_log), times the layer's factor under `decay`.
    fn a(&self, lw: &LayerCall, hh: usize) -> f32 {
        -exp(lw.a_log.get(hh)) * lw.a_scale
    }

    /// log α offset per token: ln a under RRI, else 0.
    fn log_a(&self) -> f32 {
        match self.forget {
            Forget::Rri { a, .. } => libm::logf(a),
            _ => 0.0,
        }
    }

    /// Layer `call.l` over the rows `x` (in place) from its state `st`; the rows it leaves (fewer
    /// than `call.t` where DeciMamba's `cut` drops some; under `Cut::Measure` the rows measured,
    /// the layer stopping there).
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        s: &mut Scratch,
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
        cut: Cut<'_>,
    ) -> Result<usize, Error> {
        let Call { ex, t, scan, l } = call;
        let lw = &LayerCall { w: &self.w.layers[l], a_scale: self.forget.a_scale(l) };
        let c = &self.cfg;
        let (d, di, nin, cd) = (c.d_model, c.d_inner(), c.in_proj_rows(), c.conv_dim());
        let (conv_state, ssm_state) = st.split_at_mut(c.conv_len());

        // h = RMSNorm(x); [z | xBC | dt] = h·W_inᵀ
        let h = &mut s.h[..t * d];
        let xs: &[f32] = x;
        map_rows(ex, h, d, t, &|tt, hr| rmsnorm(&xs[tt * d..(tt + 1) * d], &lw.norm, 0, c.eps, hr));
        let zx = &mut s.zx[..t * nin];
        matmul(ex, h, t, &lw.in_proj, zx)?;
        if let Some(b) = &lw.in_proj_bias {
            for row in zx.chunks_exact_mut(nin) {
                row.iter_mut().enumerate().for_each(|(i, v)| *v += b.get(i));
            }
        }

        // Causal depthwise conv over xBC, continuing from the k−1 inputs kept in the state.
        let u = &mut s.u[..t * cd];
        causal_conv_silu(ex, &lw.conv_w, lw.conv_b.as_ref(), t, &zx[c.d_inner()..], nin, conv_state, s.wt, u);

        // dt = clamp(softplus(dt_raw + dt_bias)), then the forgetting knobs: Δ′ = c·Δ, B′ = b·B.
        let nh = c.n_heads;
        let dt = &mut s.dt[..t * nh];
        let dt_scale = self.forget.dt_scale(l);
        for (dr, zr) in dt.chunks_exact_mut(nh).zip(zx.chunks_exact(nin)) {
            for (hh, v) in dr.iter_mut().enumerate() {
                let raw = zr[nin - nh + hh] + lw.dt_bias.get(hh);
                *v = softplus(raw).clamp(c.dt_min, c.dt_max) * dt_scale;
            }
        }
        // LongMamba: Δ ← 0 where Δ ≤ θ (a filtered token neither decays nor writes the head).
        if let Forget::DtThreshold(th) = self.forget {
            let theta = th.layer(l);
            for dr in dt.chunks_exact_mut(nh) {
                dr.iter_mut().zip(theta).filter(|(v, th)| **v <= **th).for_each(|(v, _)| *v = 0.0);
            }
        }
        let gn = c.n_groups * c.d_state;
        if let Forget::Rri { b, .. } = self.forget {
            for row in u.chunks_exact_mut(cd) {
                row[di..di + gn].iter_mut().for_each(|v| *v *= b);
            }
        }
        // DeciMamba (here over the heads' Δ): the rows whose ‖Δ_t‖₂ is below the layer's
        // threshold leave the sequence (the conv above read them).
        let t = match cut_rows(cut, t, dt, nh, &mut [(&mut *x, d), (&mut *zx, nin), (&mut *u, cd)]) {
            Some(kept) => kept,
            None => return Ok(t),
        };
        let (x, zx, u, dt) = (&mut x[..t * d], &zx[..t * nin], &u[..t * cd], &dt[..t * nh]);
        if let Some(p) = probe {
            self.probe_sums(lw, t, u, dt, p);
        }

        // SSM, one head per task.
        let y = &mut s.y[..t * di];
        match scan {
            Scan::Recurrent => {
                // The step checks the state it writes (see `Stack::checks_own_state`).
                let ssm_finite = self.ssm_recurrent(ex, lw, t, u, dt, ssm_state, y);
                if !ssm_finite || first_non_finite(conv_state).is_some() {
                    return Err(non_finite_state(call.l, st));
                }
            }
            Scan::Chunked => self.ssm_chunked(ex, lw, t, u, dt, ssm_state, y, s.cb, s.hs),
        }
        if let Some(w) = window {
            self.window(ex, lw, t, u, dt, y, ssm_state, w.at, w.cache);
        }

        // y ← GroupRMSNorm(y ⊙ fast_silu(z)), norm over groups of di/G channels.
        let gs = di / c.n_groups;
        let zs: &[f32] = zx;
        let simd = ex.simd();
        map_rows(ex, y, di, t, &|tt, yr| {
            gated_norm_row(simd, yr, &zs[tt * nin..tt * nin + di], &lw.gate_norm, gs, c.eps)
        });

        // x ← x + y·W_outᵀ
        let o = &mut s.h[..t * d];
        matmul(ex, y, t, &lw.out_proj, o)?;
        let o: &[f32] = o;
        map_rows(ex, x, d, t, &|tt, xr| {
            axpy(xr, 1.0, &o[tt * d..(tt + 1) * d]);
            if let Some(b) = &lw.out_proj_bias {
                xr.iter_mut().enumerate().for_each(|(i, v)| *v += b.get(i));
            }
        });
        Ok(t)
    }

    /// Views of x (P), B (N) and C (N) of head `hh` at token `tt` in the conv output.
    #[inline]
    fn xbc<'u>(&self, u: &'u [f32], tt: usize, hh: usize) -> (&'u [f32], &'u [f32], &'u [f32]) {
        let c = &self.cfg;
        let (p, n, di, cd) = (c.head_dim, c.d_state, c.d_inner(), c.conv_dim());
        let g = hh / (c.n_heads / c.n_groups);
        let row = &u[tt * cd..(tt + 1) * cd];
        let gn = c.n_groups * n;
        (&row[hh * p..(hh + 1) * p], &row[di + g * n..di + (g + 1) * n], &row[di + gn + g * n..di + gn + (g + 1) * n])
    }

    fn d_skip(&self, lw: &Layer, hh: usize, pp: usize) -> f32 {
        if lw.d.len() == self.cfg.n_heads {
            lw.d.get(hh)
        } else {
            lw.d.get(hh * self.cfg.head_dim + pp)
        }
    }

    /// The literal recurrence, token after token: `S ← exp(dt·A)·S + dt·x·Bᵀ; y = S·C + D·x`.
    #[allow(clippy::too_many_arguments)]
    fn ssm_recurrent(
        &self,
        ex: &dyn Exec,
        lw: &LayerCall,
        t: usize,
        u: &[f32],
        dt: &[f32],
        ssm: &mut [f32],
        y: &mut [f32],
    ) -> bool {
        let c = &self.cfg;
        let (p, n, nh, di) = (c.head_dim, c.d_state, c.n_heads, c.d_inner());
        let (ys, ss) = (Shared::new(y), Shared::new(ssm));
        let non_finite = AtomicU32::new(0);
        ex.for_each(nh, &|hh| {
            // SAFETY: head hh owns its state block and its P columns of y.
            let s = unsafe { ss.range(hh * p * n, p * n) };
            let a = self.a(lw, hh);
            let la = self.log_a();
            for tt in 0..t {
                let (xv, b, cc) = self.xbc(u, tt, hh);
                let dth = dt[tt * nh + hh];
                let da = exp(dth * a + la);
                let yr = unsafe { ys.range(tt * di + hh * p, p) };
                // Whether a state value's exponent bits are all ones (NaN or ±∞), found while the
                // value is written: a token step would otherwise read its whole state once more.
                let mut bad = 0u32;
                for (pp, sp) in s.chunks_exact_mut(n).enumerate() {
                    for (sv, bv) in sp.iter_mut().zip(b) {
                        *sv = *sv * da + dth * xv[pp] * bv;
                        bad |= (sv.to_bits() & 0x7f80_0000 == 0x7f80_0000) as u32;
                    }
                    yr[pp] = dot(sp, cc) + self.d_skip(lw, hh, pp) * xv[pp];
                }
                if bad != 0 {
                    non_finite.fetch_or(1, Ordering::Relaxed);
                }
            }
        });
        non_finite.load(Ordering::Relaxed) == 0
    }

    /// SSD: per block of Q tokens, `y = exp(cum)·(S·C) + (C·Bᵀ ⊙ exp(cum_t − cum_s)·dt_s)·x + D·x`,
    /// then `S ← exp(cum_last)·S + Σ_s exp(cum_last − cum_s)·dt_s·x_s·B_sᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn ssm_chunked(
        &self,
        ex: &dyn Exec,
        lw: &LayerCall,
        t: usize,
        u: &[f32],
        dt: &[f32],
        ssm: &mut [f32],
        y: &mut [f32],
        cb: &mut [f32],
        hs: &mut [f32],
    ) {
        let c = &self.cfg;
        let (p, n, nh, ng, di) = (c.head_dim, c.d_state, c.n_heads, c.n_groups, c.d_inner());
        let q = SSD_BLOCK;
        let nb = t.div_ceil(q);
        let hpg = nh / ng;

        let simd = ex.simd();
        let (cd, gn) = (c.conv_dim(), ng * n);
        // C_i·B_j per (group, block): shared by the heads of a group.
        let cbs = Shared::new(&mut cb[..ng * nb * q * q]);
        ex.for_each(ng * nb, &|task| {
            let (g, blk) = (task / nb, task % nb);
            let t0 = blk * q;
            let len = q.min(t - t0);
            // SAFETY: each (group, block) task owns its Q×Q tile.
            let tile = unsafe { cbs.range(task * q * q, q * q) };
            let (cs, bs) = (&u[t0 * cd + di + gn + g * n..], &u[t0 * cd + di + g * n..]);
            ex.with_panels(&mut |panels| {
                let _ = gemm_nt(simd, (len, len, n), cs, cd, bs, cd, &mut tile[..], q, false, panels);
            });
        });
        let cb = &cb[..ng * nb * q * q];

        let (ys, ss, hss) = (Shared::new(y), Shared::new(ssm), Shared::new(&mut hs[..nh * head_scratch(c)]));
        ex.for_each(nh, &|hh| {
            // SAFETY: head hh owns its state, its scratch and its P columns of y.
            let s = unsafe { ss.range(hh * p * n, p * n) };
            let hs = unsafe { hss.range(hh * head_scratch(c), head_scratch(c)) };
            let cb = &cb[(hh / hpg) * nb * q * q..];
            ex.with_panels(&mut |panels| {
                #[cfg(target_arch = "x86_64")]
                if simd.has_avx2() {
                    // SAFETY: the host reported AVX2 and FMA at run time.
                    unsafe { self.ssd_head_avx2(simd, lw, hh, t, u, dt, s, cb, hs, &ys, panels) };
                    return;
                }
                self.ssd_head(simd, lw, hh, t, u, dt, s, cb, hs, &ys, panels);
            });
        });
    }

    /// [`Self::ssd_head`] compiled for AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn ssd_head_avx2(
        &self,
        simd: Simd,
        lw: &LayerCall,
        hh: usize,
        t: usize,
        u: &[f32],
        dt: &[f32],
        s: &mut [f32],
        cb: &[f32],
        hs: &mut [f32],
        ys: &Shared,
        panels: &mut Panels,
    ) {
        self.ssd_head(simd, lw, hh, t, u, dt, s, cb, hs, ys, panels)
    }

    /// One head of the SSD over `t` tokens, block by block. `cb` holds this head's group's
    /// `(⌈t/Q⌉, Q, Q)` tiles of C·Bᵀ; `hs` is the head's scratch (see [`head_scratch`]);
    /// `panels` the products' panels.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn ssd_head(
        &self,
        simd: Simd,
        lw: &LayerCall,
        hh: usize,
        t: usize,
        u: &[f32],
        dt: &[f32],
        s: &mut [f32],
        cb: &[f32],
        hs: &mut [f32],
        ys: &Shared,
        panels: &mut Panels,
    ) {
        let c = &self.cfg;
        let (p, n, nh, di, cd) = (c.head_dim, c.d_state, c.n_heads, c.d_inner(), c.conv_dim());
        let q = SSD_BLOCK;
        let g = hh / (nh / c.n_groups);
        let (xo, bo, co) = (hh * p, di + g * n, di + (c.n_groups + g) * n);
        let la = self.log_a();
        let (mm, rest) = hs.split_at_mut(q * q);
        let (xt, rest) = rest.split_at_mut(p * q);
        let (wbt, dv) = rest.split_at_mut(n * q);
        // D for this head's P channels, read once (a per-head D repeated).
        let dv = &mut dv[..p];
        if lw.d.len() == nh {
            dv.fill(lw.d.get(hh));
        } else {
            lw.d.read(hh * p, dv);
        }
        let a = self.a(lw, hh);
        for (blk, t0) in (0..t).step_by(q).enumerate() {
            let len = q.min(t - t0);
            let tile = &cb[blk * q * q..(blk + 1) * q * q];
            // dt and the inclusive cumulative log decay of this head over the block.
            let (mut dth, mut cum) = ([0f32; SSD_BLOCK], [0f32; SSD_BLOCK]);
            let mut acc = 0.0;
            for i in 0..len {
                dth[i] = dt[(t0 + i) * nh + hh];
                acc += dth[i] * a + la;
                cum[i] = acc;
            }
            let ub = &u[t0 * cd..];
            // SAFETY: head hh alone writes columns hh·P..(hh+1)·P of rows t0.. of y.
            let yp = unsafe { ys.ptr().add(t0 * di + hh * p) };
            // The state entering the block, read by each C and decayed to its token: y = e·(C·Sᵀ) + D·x.
            let prod = Product {
                m: len,
                n: p,
                k: n,
                a: ub[co..].as_ptr(),
                lda: cd,
                b: s.as_ptr(),
                ldb: n,
                c: yp,
                ldc: di,
                acc: false,
            };
            unsafe { gemm_raw(simd, prod, panels) };
            for i in 0..len {
                let yr = unsafe { ys.range((t0 + i) * di + hh * p, p) };
                let e = fast_exp(cum[i]);
                let xr = &ub[i * cd + xo..i * cd + xo + p];
                for ((yv, xv), d) in yr.iter_mut().zip(xr).zip(dv.iter()) {
                    *yv = *yv * e + d * xv;
                }
            }
            // Within the block: y += M·x with M_ij = C_i·B_j · exp(cum_i − cum_j) · dt_j (j ≤ i).
            // Row by row in straight loops (no branch per entry) so the exponentials vectorise.
            for i in 0..len {
                let (row, ci) = (&mut mm[i * q..i * q + len], cum[i]);
                let (lower, upper) = row.split_at_mut(i + 1);
                let pairs = tile[i * q..=i * q + i].iter().zip(&cum[..=i]).zip(&dth[..=i]);
                for (mv, ((tv, cj), dj)) in lower.iter_mut().zip(pairs) {
                    *mv = tv * fast_exp(ci - cj) * dj;
                }
                upper.fill(0.0);
            }
            transpose(simd, &ub[xo..], cd, len, p, xt, q);
            let prod = Product {
                m: len,
                n: p,
                k: len,
                a: mm.as_ptr(),
                lda: q,
                b: xt.as_ptr(),
                ldb: q,
                c: yp,
                ldc: di,
                acc: true,
            };
            unsafe { gemm_raw(simd, prod, panels) };
            // S ← exp(cum_last)·S + Σ_j exp(cum_last − cum_j)·dt_j·x_j·B_jᵀ  (= Xᵀ·(w∘B)).
            let last = cum[len - 1];
            transpose(simd, &ub[bo..], cd, len, n, wbt, q);
            let mut w = [0f32; SSD_BLOCK];
            for ((wv, cj), dj) in w[..len].iter_mut().zip(&cum[..len]).zip(&dth[..len]) {
                *wv = fast_exp(last - cj) * dj;
            }
            for col in wbt.chunks_exact_mut(q) {
                col[..len].iter_mut().zip(&w[..len]).for_each(|(v, wv)| *v *= wv);
            }
            let el = fast_exp(last);
            s.iter_mut().for_each(|v| *v *= el);
            let _ = gemm_nt(simd, (p, n, len), xt, q, &wbt[..], q, s, n, true, panels);
        }
    }
}

impl Mamba2<'_> {
    /// Adds, per head, Σ_t log α_t, Σ_t Δ_t, Σ_t mean(B_t) and Σ_t mean(x_t) into `p (4, H)`.
    fn probe_sums(&self, lw: &LayerCall, t: usize, u: &[f32], dt: &[f32], p: &mut [f32]) {
        let c = &self.cfg;
        let (nh, la) = (c.n_heads, self.log_a());
        for hh in 0..nh {
            let a = self.a(lw, hh);
            let (mut ld, mut sd, mut sb, mut sx) = (0f32, 0f32, 0f32, 0f32);
            for tt in 0..t {
                let dth = dt[tt * nh + hh];
                let (x, b, _) = self.xbc(u, tt, hh);
                ld += dth * a + la;
                sd += dth;
                sb += b.iter().sum::<f32>() / b.len() as f32;
                sx += x.iter().sum::<f32>() / x.len() as f32;
            }
            for (k, v) in [ld, sd, sb, sx].into_iter().enumerate() {
                p[k * nh + hh] += v;
            }
        }
    }

    /// Sliding window by state difference, after the SSM wrote `y`: per token, advance the lagged
    /// state `L = h_{t−r}` by the cached inputs of token t−r, keep W = Σ log α over the window, and
    /// subtract `exp(W)·(C_t·L)` from y_t. Then cache this call's inputs (t ≤ r, so no token of
    /// the call reads a slot the call writes). When the call turns the ring over (every r tokens),
    /// the state is rebuilt from the window's r cached tokens by the recurrence from zero, W is
    /// summed afresh and L ← 0: the read-outs to come are the same in exact arithmetic (the lag then
    /// runs from zero by the same recurrence), and no state or sum grows with the stream, so the
    /// difference never cancels away the window's digits (in f32 it did: TV 0.23 at 1M tokens
    /// against a run restarted inside the window, README `effrem`; subtracting exp(W)·L from the
    /// state at every call in place of the rebuild still drifted, linearly, 2.8e-5 at 1M).
    #[allow(clippy::too_many_arguments)]
    fn window(
        &self,
        ex: &dyn Exec,
        lw: &LayerCall,
        t: usize,
        u: &[f32],
        dt: &[f32],
        y: &mut [f32],
        ssm_state: &mut [f32],
        WindowAt { r, pos0, filled }: WindowAt,
        ws: &mut [f32],
    ) {
        let c = &self.cfg;
        let (p, n, nh, di, gn) = (c.head_dim, c.d_state, c.n_heads, c.d_inner(), c.n_groups * c.d_state);
        let sl = self.slot_len();
        let (lag, rest) = ws.split_at_mut(c.ssm_len());
        let (ring, wsum) = rest.split_at_mut(r * sl);
        let la = self.log_a();
        let (ys, lags, wss) = (Shared::new(y), Shared::new(lag), Shared::new(wsum));
        let ring_r: &[f32] = ring;
        ex.for_each(nh, &|hh| {
            // SAFETY: head hh owns its lagged state, its window sum and its P columns of y.
            let lh = unsafe { lags.range(hh * p * n, p * n) };
            let w2 = unsafe { wss.range(2 * hh, 2) };
            let a = self.a(lw, hh);
            let mut w = w2[0] as f64 + w2[1] as f64;
            for tt in 0..t {
                let abs = pos0 + tt;
                let full = filled || abs >= r;
                if full {
                    w -= self.advance_cached(&ring_r[(abs % r) * sl..(abs % r + 1) * sl], hh, lh) as f64;
                }
                w += (dt[tt * nh + hh] * a + la) as f64;
                if full {
                    let (_, _, ct) = self.xbc(u, tt, hh);
                    let f = exp(w as f32);
                    let yr = unsafe { ys.range(tt * di + hh * p, p) };
                    for (yv, lp) in yr.iter_mut().zip(lh.chunks_exact(n)) {
                        *yv -= f * dot(lp, ct);
                    }
                }
            }
            (w2[0], w2[1]) = hi_lo(w);
        });
        for tt in 0..t {
            let slot = &mut ring[((pos0 + tt) % r) * sl..((pos0 + tt) % r + 1) * sl];
            for hh in 0..nh {
                slot[hh] = dt[tt * nh + hh] * self.a(lw, hh) + la;
                slot[nh + hh] = dt[tt * nh + hh];
            }
            let row = &u[tt * c.conv_dim()..];
            slot[2 * nh..2 * nh + gn].copy_from_slice(&row[di..di + gn]);
            slot[2 * nh + gn..].copy_from_slice(&row[..di]);
        }
        if pos0 % r + t < r {
            return;
        }
        // The ring turned over: rebuild each head's state from the window's r tokens, oldest first.
        let end = pos0 + t;
        let (ring_r, lags, wss, hs): (&[f32], _, _, _) =
            (ring, Shared::new(lag), Shared::new(wsum), Shared::new(ssm_state));
        ex.for_each(nh, &|hh| {
            // SAFETY: head hh owns its lagged state, its window sum and its state.
            let (lh, w2, hst) =
                unsafe { (lags.range(hh * p * n, p * n), wss.range(2 * hh, 2), hs.range(hh * p * n, p * n)) };
            lh.fill(0.0);
            hst.fill(0.0);
            let mut w = 0f64;
            for j in 0..r {
                w += self.advance_cached(&ring_r[((end + j) % r) * sl..((end + j) % r + 1) * sl], hh, hst) as f64;
            }
            (w2[0], w2[1]) = hi_lo(w);
        });
    }

    /// Head `hh`'s state `h (P, N)` advanced by the cached token in ring `slot`
    /// (`[log α (H) | Δ (H) | B (G·N) | x (di)]`): h ← α·h + Δ·x·Bᵀ (the lag's step and the
    /// rebuild's). Returns the token's log α.
    #[inline]
    fn advance_cached(&self, slot: &[f32], hh: usize, h: &mut [f32]) -> f32 {
        let c = &self.cfg;
        let (nh, n, p, gn) = (c.n_heads, c.d_state, c.head_dim, c.n_groups * c.d_state);
        let g = hh / (nh / c.n_groups);
        let (lo, dto) = (slot[hh], slot[nh + hh]);
        let bo = &slot[2 * nh + g * n..2 * nh + (g + 1) * n];
        let xo = &slot[2 * nh + gn + hh * p..2 * nh + gn + (hh + 1) * p];
        let e = exp(lo);
        for (hp, &xv) in h.chunks_exact_mut(n).zip(xo) {
            for (hv, &bv) in hp.iter_mut().zip(bo) {
                *hv = *hv * e + dto * xv * bv;
            }
        }
        lo
    }
}

/// `y ← GroupRMSNorm(y ⊙ silu(z))` over groups of `gs` channels, one token; compiled for AVX2
/// where `simd` allows.
fn gated_norm_row(simd: Simd, y: &mut [f32], z: &[f32], w: &Weight, gs: usize, eps: f32) {
    #[inline(always)]
    fn body(y: &mut [f32], z: &[f32], w: &Weight, gs: usize, eps: f32) {
        for (yv, zv) in y.iter_mut().zip(z) {
            *yv *= fast_silu(*zv);
        }
        for (g, yg) in y.chunks_exact_mut(gs).enumerate() {
            rmsnorm_inplace(yg, w, g * gs, eps);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(y: &mut [f32], z: &[f32], w: &Weight, gs: usize, eps: f32) {
            body(y, z, w, gs, eps)
        }
        // SAFETY: the host reported AVX2 and FMA at run time.
        return unsafe { avx2(y, z, w, gs, eps) };
    }
    let _ = simd;
    body(y, z, w, gs, eps)
}

/// Per-head SSD scratch: M `(Q, Q)`, Xᵀ `(P, Q)`, (w∘B)ᵀ `(N, Q)`, D `(P)`.
fn head_scratch(c: &Config) -> usize {
    SSD_BLOCK * (SSD_BLOCK + c.head_dim + c.d_state) + c.head_dim
}

impl Stack for Mamba2<'_> {
    fn checks_own_state(&self, scan: Scan) -> bool {
        scan == Scan::Recurrent
    }
    type Scratch<'s> = Scratch<'s>;
    fn stack_shape(&self, t: usize) -> Result<StackShape, Error> {
        let c = &self.cfg;
        let window = match self.forget {
            Forget::Window { r } if t > r => {
                return Err(Error::Config("window forgetting: a call may hold at most r tokens"))
            }
            Forget::Window { r } => Some(WindowShape { r, layer_len: self.window_layer_len(r) }),
            _ => None,
        };
        let (base_len, layer_state_len) = (c.paper_state_size(), c.layer_state_len());
        Ok(StackShape { base_len, layer_state_len, probe_per_layer: PROBE.len() * c.n_heads, window })
    }
    fn split_scratch<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<Scratch<'s>, Error> {
        self.scratch_parts(t, buf)
    }
    fn embed(&self, tokens: &[u32], x: &mut [f32], _: &mut Scratch) {
        for (row, &tok) in x.chunks_exact_mut(self.cfg.d_model).zip(tokens) {
            self.w.embed.row(tok as usize, row);
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
        self.layer(call, x, st, s, probe, window, Cut::Keep).map(|_| ())
    }
    fn run_layer_cut(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        s: &mut Scratch,
        cut: Cut,
    ) -> Result<usize, Error> {
        self.layer(call, x, st, s, None, None, cut)
    }
    fn final_norm(&self, x: &mut [f32], _: &mut Scratch) {
        for row in x.chunks_exact_mut(self.cfg.d_model) {
            rmsnorm_inplace(row, &self.w.norm_f, 0, self.cfg.eps);
        }
    }
}

impl Mamba2<'_> {
    /// [`Recurrent::forward`] (chunked) that also writes each layer's Δ after the forgetting
    /// knobs into `dt (n_layer, t, H)`: what LongMamba's calibration reads, in one call rather than
    /// one call per token.
    pub fn forward_dt(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
        dt: &mut [f32],
    ) -> Result<(), Error> {
        let (t, nh) = (tokens.len(), self.cfg.n_heads);
        need("mamba2 Δ tap", dt.len(), self.cfg.n_layer * t * nh)?;
        let tap = |l: usize, s: &Scratch<'_>| dt[l * t * nh..(l + 1) * t * nh].copy_from_slice(&s.dt[..t * nh]);
        crate::model::run_stack_tapped(self, ex, tokens, state, scratch, hidden, None, Scan::Chunked, tap)
    }
}

impl Recurrent for Mamba2<'_> {
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
    #[allow(clippy::too_many_arguments)]
    fn forward_decimated(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
        cut: &mut Decimation,
        measure: Option<Measure<'_>>,
    ) -> Result<Decimated, Error> {
        run_stack_decimated(self, ex, tokens, state, scratch, hidden, cut, measure)
    }
    fn decimates(&self) -> bool {
        true
    }
    fn d_model(&self) -> usize {
        self.cfg.d_model
    }
    fn vocab_rows(&self) -> usize {
        self.cfg.vocab_rows
    }
    fn state_len(&self) -> usize {
        let base = self.cfg.paper_state_size();
        match self.forget {
            Forget::Window { r } => base + self.cfg.n_layer * self.window_layer_len(r) + 2,
            _ => base,
        }
    }
    fn scratch_len(&self, chunk: usize) -> usize {
        let c = &self.cfg;
        let t = chunk;
        t * (c.d_model.max(c.d_inner()) + c.in_proj_rows() + c.conv_dim() + c.n_heads + c.d_inner())
            + c.n_groups * t.div_ceil(SSD_BLOCK) * SSD_BLOCK * SSD_BLOCK
            + c.d_conv * c.conv_dim()
            + c.n_heads * head_scratch(c)
    }
    fn head(&self) -> &Weight<'_> {
        &self.w.head
    }
    fn set_forget(&mut self, f: Forget) -> Result<(), Error> {
        match f {
            Forget::DtThreshold(th) => th.fits(self.cfg.n_layer, self.cfg.n_heads)?,
            other => other.check_mamba(self.cfg.n_layer)?,
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
    fn n_heads(&self) -> usize {
        self.cfg.n_heads
    }
    fn head_state(&self, layer: usize, head: usize) -> core::ops::Range<usize> {
        let c = &self.cfg;
        let start = layer * c.layer_state_len() + c.conv_len() + head * c.head_dim * c.d_state;
        start..start + c.head_dim * c.d_state
    }
    fn conv_state(&self, layer: usize, head: usize) -> Option<Runs> {
        let c = &self.cfg;
        let start = layer * c.layer_state_len() + head * c.head_dim;
        Some(Runs { start, len: c.head_dim, stride: c.conv_dim(), rows: c.d_conv - 1 })
    }
    fn probe_series(&self) -> (&'static [&'static str], usize) {
        (PROBE, 1)
    }
}
