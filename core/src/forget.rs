//! Training-free forgetting inside the recurrence (SPEC.md §2.4). State normalization and periodic
//! reset act on the state between calls, so the host applies them (the same way for every path).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Forget {
    #[default]
    None,
    /// Reduced retention and insertion: α′ = a·α, B′ = b·B (B after conv + SiLU, before ·Δ).
    /// Per-channel families: w′ = a·w, k′ = b·k.
    Rri { a: f32, b: f32 },
    /// The delta rule's other RRI analogue (FAMILIES.md §2.9): α′ = a·α and β′ = b·β, scaling the
    /// erasure with the write (`Rri` scales the write alone). DeltaNet and Gated DeltaNet only.
    RriBoth { a: f32, b: f32 },
    /// Δ′ = c·Δ (raises α, shrinks B̄). Per-channel families: log w′ = c·log w.
    Dt { c: f32 },
    /// Mamba-Modulation (arXiv 2509.19633): A′ = s·A, so α′ = α^s and the write Δ·B is unchanged
    /// (Δ scaling moves both). Mamba-1 and Mamba-2 only: elsewhere `Dt` already scales the log
    /// decay alone.
    Decay { s: f32 },
    /// MambaExtend (Azizi et al., ICLR 2025): Δ′ = s_ℓ·Δ with one factor per layer (calibrated by
    /// `stuffed calibrate`); per-channel families: log w′ = s_ℓ·log w, as `Dt`.
    DtLayers(LayerScales),
    /// Mamba-Modulation per layer: A′ = s_ℓ·A in layer ℓ. Mamba-1 and Mamba-2 only.
    DecayLayers(LayerScales),
    /// Sliding window by state difference (Eq. 8): the read-out uses h_t − α_{t−r+1:t}·h_{t−r},
    /// with h_{t−r} advanced r steps behind from each layer's own cached inputs. Calls may hold at
    /// most r tokens. Each time the ring of cached inputs turns over, the state is rebuilt from it
    /// (so no f32 difference of two states that summed the whole stream).
    Window { r: usize },
    /// Two staggered states (FAMILIES.md §9.3), for non-diagonal transitions (RWKV-7) where the
    /// window by state difference is not exact: a second state restarts every r tokens and replaces
    /// the read-out state then, so the read-out holds the last r to 2r tokens.
    Staggered { r: usize },
    /// LongMamba (Ye et al., ICLR 2025; `get_channelwise_dt_threshold`, `slow_factor 0`): per
    /// (layer, head) a threshold θ; a token whose Δ is not above it neither decays nor writes that
    /// head (Δ ← 0). θ = 0 leaves a head alone (LongMamba's local channels). Mamba-2 only.
    DtThreshold(DtThresholds),
}

impl Forget {
    /// Rejects parameters the math cannot use, for a model of `n_layer` layers.
    pub fn check(&self, n_layer: usize) -> Result<(), crate::Error> {
        match *self {
            Forget::Window { r: 0 } => Err(crate::Error::Config("window forgetting needs r ≥ 1")),
            Forget::Rri { a, b } if !(a > 0.0 && a <= 1.0 && b.is_finite()) => {
                Err(crate::Error::Config("rri needs 0 < a ≤ 1 and a finite b"))
            }
            Forget::Dt { c } if !(c > 0.0 && c.is_finite()) => Err(crate::Error::Config("dt scaling needs c > 0")),
            Forget::RriBoth { .. } => Err(crate::Error::Config(
                "rri-both scales the delta rule's erasure with its write: it is for DeltaNet and Gated DeltaNet (use rri)",
            )),
            Forget::Staggered { .. } => Err(crate::Error::Config(
                "staggered-state forgetting is for non-diagonal transitions (RWKV-7); this family's window:r=N is exact",
            )),
            Forget::Decay { .. } => Err(crate::Error::Config(
                "decay:s scales Mamba's A alone (Mamba-1, Mamba-2); this family has no Δ on its write: dt:c scales its log decay alone",
            )),
            Forget::DecayLayers(_) => Err(crate::Error::Config(
                "per-layer decay factors scale Mamba's A alone (Mamba-1, Mamba-2); per-layer dt:c=… scales this family's log decay",
            )),
            Forget::DtLayers(t) => t.fits(n_layer),
            Forget::DtThreshold(_) => Err(crate::Error::Config(
                "longmamba's Δ thresholds are per Mamba-2 head (LongMamba's code filters Mamba-2 heads)",
            )),
            _ => Ok(()),
        }
    }

    /// [`Forget::check`] for Mamba-1 and Mamba-2 of `n_layer` layers, which also take `Decay` and
    /// the per-layer factors (one per layer).
    pub fn check_mamba(&self, n_layer: usize) -> Result<(), crate::Error> {
        match *self {
            Forget::Decay { s } if !(s > 0.0 && s.is_finite()) => {
                Err(crate::Error::Config("decay scaling needs s > 0"))
            }
            Forget::Decay { .. } => Ok(()),
            Forget::DecayLayers(t) => t.fits(n_layer),
            other => other.check(n_layer),
        }
    }

    /// The factor on Δ in layer `l`: c under `Dt`, s_ℓ under `DtLayers`, else 1.
    pub fn dt_scale(&self, l: usize) -> f32 {
        match *self {
            Forget::Dt { c } => c,
            Forget::DtLayers(t) => t.get(l),
            _ => 1.0,
        }
    }

    /// The factor on A in layer `l`: s under `Decay`, s_ℓ under `DecayLayers`, else 1.
    pub fn a_scale(&self, l: usize) -> f32 {
        match *self {
            Forget::Decay { s } => s,
            Forget::DecayLayers(t) => t.get(l),
            _ => 1.0,
        }
    }

    /// [`Forget::check`] for a family with a non-diagonal transition: two staggered states instead
    /// of the window by state difference, which is not exact there.
    pub fn check_non_diagonal(&self, n_layer: usize) -> Result<(), crate::Error> {
        match *self {
            Forget::Staggered { r: 0 } => Err(crate::Error::Config("staggered-state forgetting needs r ≥ 1")),
            Forget::Staggered { .. } => Ok(()),
            Forget::Window { .. } => Err(crate::Error::Config(
                "the window by state difference is exact only for diagonal transitions; \
                 use staggered:r=N (two staggered states, FAMILIES.md §9.3)",
            )),
            other => other.check(n_layer),
        }
    }
}

/// LongMamba's thresholds: `θ (n_layer, heads)` row-major, each finite and ≥ 0. The table is
/// borrowed for the program's life so that [`Forget`] stays `Copy` and the core allocation-free
/// (the host keeps one copy of each table it reads).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DtThresholds {
    theta: &'static [f32],
    heads: usize,
}

impl DtThresholds {
    /// The table `theta (n_layer, heads)`.
    pub fn new(theta: &'static [f32], heads: usize) -> Result<Self, crate::Error> {
        if heads == 0 || theta.is_empty() || !theta.len().is_multiple_of(heads) {
            return Err(crate::Error::Config("Δ thresholds: give n_layer rows of one value per head"));
        }
        if theta.iter().any(|v| !(*v >= 0.0 && v.is_finite())) {
            return Err(crate::Error::Config("Δ thresholds must be finite and ≥ 0"));
        }
        Ok(DtThresholds { theta, heads })
    }

    /// Refuses a table that is not `(n_layer, heads)`.
    pub fn fits(&self, n_layer: usize, heads: usize) -> Result<(), crate::Error> {
        if self.heads != heads {
            return Err(crate::Error::Shape {
                what: "Δ thresholds per layer (one per head)",
                expected: heads,
                got: self.heads,
            });
        }
        match self.theta.len() / self.heads == n_layer {
            true => Ok(()),
            false => Err(crate::Error::Shape {
                what: "Δ threshold rows (one per layer)",
                expected: n_layer,
                got: self.theta.len() / self.heads,
            }),
        }
    }

    /// Layer `l`'s thresholds, one per head (empty past the table).
    pub fn layer(&self, l: usize) -> &'static [f32] {
        self.theta.get(l * self.heads..(l + 1) * self.heads).unwrap_or(&[])
    }

    pub fn as_slice(&self) -> &'static [f32] {
        self.theta
    }

    pub fn heads(&self) -> usize {
        self.heads
    }
}

/// The most layers a [`LayerScales`] table holds (released Mamba-1/2 checkpoints have at most 64).
pub const MAX_LAYERS: usize = 128;

/// One positive factor per layer, in a fixed-size table so that [`Forget`] stays `Copy` and
/// allocation-free.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerScales {
    len: usize,
    s: [f32; MAX_LAYERS],
}

impl LayerScales {
    /// The table of `s` (one factor per layer, each finite and > 0; at most [`MAX_LAYERS`]).
    pub fn new(s: &[f32]) -> Result<Self, crate::Error> {
        if s.is_empty() || s.len() > MAX_LAYERS {
            return Err(crate::Error::Config("per-layer factors: give 1 to 128 (one per layer)"));
        }
        if s.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
            return Err(crate::Error::Config("per-layer factors must be finite and > 0"));
        }
        let mut t = LayerScales { len: s.len(), s: [1.0; MAX_LAYERS] };
        t.s[..s.len()].copy_from_slice(s);
        Ok(t)
    }

    /// Refuses a table whose length is not the model's `n_layer`.
    pub fn fits(&self, n_layer: usize) -> Result<(), crate::Error> {
        match self.len == n_layer {
            true => Ok(()),
            false => {
                Err(crate::Error::Shape { what: "per-layer factors (one per layer)", expected: n_layer, got: self.len })
            }
        }
    }

    /// Layer `l`'s factor (1 past the table).
    pub fn get(&self, l: usize) -> f32 {
        if l < self.len {
            self.s[l]
        } else {
            1.0
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.s[..self.len]
    }
}

/// The values at the very end of a windowed state: the ring position and the fill flag.
pub const WINDOW_COUNTERS: usize = 2;

/// The part of the state `window:r=N` adds after the model's own: every layer's cache
/// (`layer_len` each), then the window's position (tokens seen mod r) and whether r tokens have been
/// seen, both as f32 ([`WINDOW_COUNTERS`]).
pub struct WindowTail<'a> {
    layers: &'a mut [f32],
    meta: &'a mut [f32],
    layer_len: usize,
    /// Where the window stands at the start of this call.
    pub at: WindowAt,
}

/// Where a sliding window stands at the start of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowAt {
    /// The window's length in tokens.
    pub r: usize,
    /// Tokens seen so far mod r: the ring slot the call's first token goes to.
    pub pos0: usize,
    /// Whether r tokens have been seen (every slot holds a token).
    pub filled: bool,
}

/// One layer's part of a windowed call: where the window stands and the layer's cache.
pub struct LayerWindow<'a> {
    pub at: WindowAt,
    pub cache: &'a mut [f32],
}

impl<'a> WindowTail<'a> {
    /// The tail of a state whose model part was split off; `None` without a window.
    pub fn split(r: Option<usize>, extra: &'a mut [f32], layer_len: usize) -> Option<Self> {
        let r = r?;
        let (layers, meta) = extra.split_at_mut(extra.len().saturating_sub(WINDOW_COUNTERS));
        let pos0 = meta.first().map_or(0, |&v| v as usize);
        let filled = meta.get(1).is_some_and(|&v| v > 0.0);
        Some(WindowTail { layers, meta, layer_len, at: WindowAt { r, pos0, filled } })
    }

    /// Layer `l`'s part of the call: where the window stands and the layer's cache.
    pub fn layer(&mut self, l: usize) -> LayerWindow<'_> {
        LayerWindow { at: self.at, cache: &mut self.layers[l * self.layer_len..(l + 1) * self.layer_len] }
    }

    /// Records that the call fed `t` more tokens.
    pub fn advance(&mut self, t: usize) {
        let WindowAt { r, pos0, filled } = self.at;
        if let [pm, fl] = self.meta {
            *fl = if filled || pos0 + t >= r { 1.0 } else { 0.0 };
            *pm = ((pos0 + t) % r) as f32;
        }
    }
}

/// Where one head's values sit in the state: `rows` runs of `len` values, `stride` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runs {
    pub start: usize,
    pub len: usize,
    pub stride: usize,
    pub rows: usize,
}

impl Runs {
    /// The state range of each run, in order.
    pub fn ranges(&self) -> impl Iterator<Item = core::ops::Range<usize>> + '_ {
        (0..self.rows).map(|r| self.start + r * self.stride..self.start + r * self.stride + self.len)
    }
    /// Visits every value.
    pub fn for_each(&self, state: &[f32], mut f: impl FnMut(f32)) {
        for r in self.ranges() {
            state[r].iter().for_each(|&v| f(v));
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::exec::Serial;
    use crate::model::{Call, Recurrent, Scan, Stack};
    use crate::weight::{Data, Weight};
    use crate::{mamba1, mamba2};
    use std::{vec, vec::Vec};

    const L: usize = 3;
    const D: usize = 8;
    const V: usize = 7;
    const T: usize = 37;

    fn memory(n: usize) -> Vec<f32> {
        let mut seed = 77u32;
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                2.0 * ((seed >> 8) as f32 / (1u32 << 24) as f32) - 1.0
            })
            .collect()
    }

    /// Views cut from `mem` in order.
    struct Cut<'m> {
        mem: &'m [f32],
        at: usize,
    }

    impl<'m> Cut<'m> {
        fn w(&mut self, rows: usize, cols: usize) -> Weight<'m> {
            let v = Weight::new(Data::F32(&self.mem[self.at..self.at + rows * cols]), rows, cols).expect("view");
            self.at += rows * cols;
            v
        }
    }

    /// The stack run layer by layer, layer `l` under `per_layer(l)`: what a per-layer table must
    /// equal. Two calls, the state carried.
    fn composed<S: Stack>(net: &mut S, tokens: &[u32], scan: Scan, per_layer: &dyn Fn(usize) -> Forget) -> Vec<f32> {
        let shape = net.stack_shape(tokens.len()).expect("shape");
        let mut state = vec![0f32; net.state_len()];
        let mut scratch = vec![0f32; net.scratch_len(tokens.len())];
        let mut out = Vec::new();
        for part in [&tokens[..T / 2], &tokens[T / 2..]] {
            let t = part.len();
            let mut x = vec![0f32; t * D];
            for l in 0..net.n_layer() {
                net.set_forget(per_layer(l)).expect("method");
                let mut s = net.split_scratch(t, &mut scratch).expect("scratch");
                if l == 0 {
                    net.embed(part, &mut x, &mut s);
                }
                let st = &mut state[l * shape.layer_state_len..(l + 1) * shape.layer_state_len];
                net.run_layer(Call { ex: &Serial, t, scan, l }, &mut x, st, &mut s, None, None).expect("layer");
                if l + 1 == net.n_layer() {
                    net.final_norm(&mut x, &mut s);
                }
            }
            out.extend(x);
        }
        out
    }

    /// The whole stack under `f`, in the same two calls.
    fn whole<R: Recurrent>(net: &mut R, tokens: &[u32], scan: Scan, f: Forget) -> Vec<f32> {
        net.set_forget(f).expect("method");
        let mut state = vec![0f32; net.state_len()];
        let mut scratch = vec![0f32; net.scratch_len(tokens.len())];
        let mut out = Vec::new();
        for part in [&tokens[..T / 2], &tokens[T / 2..]] {
            let mut h = vec![0f32; part.len() * D];
            net.run(&Serial, part, &mut state, &mut scratch, &mut h, None, scan).expect("run");
            out.extend(h);
        }
        out
    }

    /// Per-layer Δ and A factors: layer ℓ runs exactly as the whole-model factor s_ℓ would run it
    /// (bit for bit, both scans, state carried between calls); a table of one value equals that
    /// value for every layer; a table of another length is refused.
    fn per_layer_factors_act_layer_by_layer<S: Stack>(net: &mut S) {
        let tokens: Vec<u32> = (0..T).map(|i| ((i * 5 + 2) % V) as u32).collect();
        let s = [0.3f32, 1.7, 0.05];
        let table = LayerScales::new(&s).expect("table");
        let same = LayerScales::new(&[0.6; L]).expect("table");
        for scan in [Scan::Chunked, Scan::Recurrent] {
            for (per, one, uniform, name) in [
                (
                    Forget::DtLayers(table),
                    &(|l: usize| Forget::Dt { c: s[l] }) as &dyn Fn(usize) -> Forget,
                    Forget::Dt { c: 0.6 },
                    "dt",
                ),
                (Forget::DecayLayers(table), &|l: usize| Forget::Decay { s: s[l] }, Forget::Decay { s: 0.6 }, "decay"),
            ] {
                let want = composed(net, &tokens, scan, one);
                let got = whole(net, &tokens, scan, per);
                assert!(got == want, "{name} {scan:?}: the table differs from layer-by-layer factors");
                let plain = whole(net, &tokens, scan, Forget::None);
                assert!(got != plain, "{name} {scan:?}: the factors changed nothing");
                let same_f = match per {
                    Forget::DtLayers(_) => Forget::DtLayers(same),
                    _ => Forget::DecayLayers(same),
                };
                assert!(
                    whole(net, &tokens, scan, same_f) == whole(net, &tokens, scan, uniform),
                    "{name} {scan:?}: uniform table"
                );
            }
        }
        let short = LayerScales::new(&s[..2]).expect("table");
        assert!(matches!(
            net.set_forget(Forget::DtLayers(short)),
            Err(crate::Error::Shape { expected: L, got: 2, .. })
        ));
    }

    #[test]
    fn mamba1_per_layer_factors() {
        const DI: usize = 12;
        const N: usize = 4;
        const R: usize = 2;
        const K: usize = 3;
        let mem = memory(8000);
        let mut c = Cut { mem: &mem, at: 0 };
        let layers: Vec<mamba1::Layer> = (0..L)
            .map(|_| mamba1::Layer {
                norm: c.w(1, D),
                in_proj: c.w(2 * DI, D),
                in_proj_bias: None,
                conv_w: c.w(DI, K),
                conv_b: Some(c.w(1, DI)),
                x_proj: c.w(R + 2 * N, DI),
                dt_proj: c.w(DI, R),
                dt_bias: c.w(1, DI),
                a_log: c.w(DI, N),
                d: c.w(1, DI),
                out_proj: c.w(D, DI),
                out_proj_bias: None,
            })
            .collect();
        let (embed, norm_f) = (c.w(V, D), c.w(1, D));
        let cfg = mamba1::Config {
            d_model: D,
            n_layer: L,
            d_inner: DI,
            d_state: N,
            dt_rank: R,
            d_conv: K,
            vocab_rows: V,
            eps: 1e-5,
            mixer_rms_eps: None,
        };
        let mut net =
            mamba1::Mamba1::new(cfg, mamba1::Weights { embed, layers: &layers, norm_f, head: embed }).expect("model");
        per_layer_factors_act_layer_by_layer(&mut net);
    }

    #[test]
    fn mamba2_per_layer_factors() {
        const H: usize = 4;
        const P: usize = 4;
        const N: usize = 4;
        const K: usize = 3;
        let (di, gn) = (H * P, N);
        let (nin, cd) = (2 * di + 2 * gn + H, di + 2 * gn);
        let mem = memory(8000);
        let mut c = Cut { mem: &mem, at: 0 };
        let layers: Vec<mamba2::Layer> = (0..L)
            .map(|_| mamba2::Layer {
                norm: c.w(1, D),
                in_proj: c.w(nin, D),
                in_proj_bias: None,
                conv_w: c.w(cd, K),
                conv_b: Some(c.w(1, cd)),
                dt_bias: c.w(1, H),
                a_log: c.w(1, H),
                d: c.w(1, H),
                gate_norm: c.w(1, di),
                out_proj: c.w(D, di),
                out_proj_bias: None,
            })
            .collect();
        let (embed, norm_f) = (c.w(V, D), c.w(1, D));
        let cfg = mamba2::Config {
            d_model: D,
            n_layer: L,
            d_state: N,
            head_dim: P,
            n_heads: H,
            n_groups: 1,
            d_conv: K,
            vocab_rows: V,
            eps: 1e-5,
            dt_min: 0.0,
            dt_max: f32::INFINITY,
        };
        let mut net =
            mamba2::Mamba2::new(cfg, mamba2::Weights { embed, layers: &layers, norm_f, head: embed }).expect("model");
        per_layer_factors_act_layer_by_layer(&mut net);
    }

    #[test]
    fn dt_thresholds_are_whole_rows_of_finite_values() {
        static T: [f32; 6] = [0.0, 0.5, 1.0, 0.0, 2.0, 0.25];
        static BAD: [f32; 2] = [f32::NAN, 1.0];
        static NEG: [f32; 2] = [-0.1, 1.0];
        let t = DtThresholds::new(&T, 3).expect("table");
        assert_eq!((t.layer(0), t.layer(1), t.layer(2)), (&T[..3], &T[3..], &[][..]));
        assert!(t.fits(2, 3).is_ok() && t.fits(3, 3).is_err() && t.fits(3, 2).is_err());
        assert!(DtThresholds::new(&T, 4).is_err() && DtThresholds::new(&T, 0).is_err());
        assert!(DtThresholds::new(&BAD, 2).is_err() && DtThresholds::new(&NEG, 2).is_err());
        // Only Mamba-2 takes it: every other family's check refuses it.
        assert!(Forget::DtThreshold(t).check(2).is_err() && Forget::DtThreshold(t).check_mamba(2).is_err());
    }

    #[test]
    fn layer_scales_refuse_what_the_math_cannot_use() {
        assert!(LayerScales::new(&[]).is_err());
        assert!(LayerScales::new(&[1.0; MAX_LAYERS + 1]).is_err());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(LayerScales::new(&[1.0, bad]).is_err(), "{bad}");
        }
        let t = LayerScales::new(&[0.5, 2.0]).expect("table");
        assert_eq!((t.len(), t.get(1), t.as_slice()), (2, 2.0, &[0.5f32, 2.0][..]));
        // Other families take Δ tables of their length, and refuse A tables.
        assert!(Forget::DtLayers(t).check(2).is_ok() && Forget::DtLayers(t).check(3).is_err());
        assert!(Forget::DecayLayers(t).check(2).is_err());
    }
}

/// The most decimating layers a [`Decimation`] holds (their configs use one or two).
pub const MAX_DECIMATING: usize = 8;

/// DeciMamba (Ben-Kish et al., ICLR 2025; `get_non_decimated_indices`, `mamba_inner_fn`) for one
/// prompt: in each decimating layer a token whose ‖Δ_t‖₂ (softplus(Δ) over the layer's channels) is
/// below the layer's threshold leaves the sequence — that layer's scan, gate and residual and every
/// later layer skip it; the layer's conv still reads it. Their top-K over the whole prompt is the
/// host's: it finds each threshold as the K-th largest norm, one measuring pass per layer.
///
/// Tokens whose norm equals a threshold are kept while the layer's budget of ties lasts (the
/// earliest first), so that exactly K go on where norms tie (their `topk` keeps an unspecified K
/// of tied ones). Calls draw the budget down, so one `Decimation` serves a prompt's calls in order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decimation {
    n: usize,
    layer: [usize; MAX_DECIMATING],
    tau: [f32; MAX_DECIMATING],
    ties: [usize; MAX_DECIMATING],
}

impl Decimation {
    /// Layers `layer` (strictly ascending) keep the tokens whose norm is ≥ `tau` (finite, ≥ 0;
    /// 0 keeps every token). `layer` may be empty: nothing is dropped.
    pub fn new(layer: &[usize], tau: &[f32]) -> Result<Self, crate::Error> {
        if layer.len() != tau.len() || layer.len() > MAX_DECIMATING {
            return Err(crate::Error::Config("decimation: one threshold per decimating layer, at most 8 layers"));
        }
        if !layer.windows(2).all(|w| w[0] < w[1]) {
            return Err(crate::Error::Config("decimation: the decimating layers must ascend"));
        }
        if tau.iter().any(|v| !(*v >= 0.0 && v.is_finite())) {
            return Err(crate::Error::Config("decimation: thresholds must be finite and ≥ 0"));
        }
        let (n, ties) = (layer.len(), [usize::MAX; MAX_DECIMATING]);
        let mut d = Decimation { n, layer: [0; MAX_DECIMATING], tau: [0.0; MAX_DECIMATING], ties };
        d.layer[..n].copy_from_slice(layer);
        d.tau[..n].copy_from_slice(tau);
        Ok(d)
    }

    /// With the `i`-th decimating layer keeping at most `ties` tokens whose norm equals its
    /// threshold (every one by default).
    pub fn with_ties(mut self, i: usize, ties: usize) -> Self {
        if i < self.n {
            self.ties[i] = ties;
        }
        self
    }

    /// The `i`-th decimating layer's budget of ties left (0 past them).
    pub fn ties(&self, i: usize) -> usize {
        self.ties[..self.n].get(i).copied().unwrap_or(0)
    }

    /// The `i`-th decimating layer's budget of ties left, for a call to draw down.
    pub fn ties_mut(&mut self, i: usize) -> Option<&mut usize> {
        self.ties[..self.n].get_mut(i)
    }

    /// Refuses a layer past the model's `n_layer`.
    pub fn fits(&self, n_layer: usize) -> Result<(), crate::Error> {
        match self.layers().last() {
            Some(&l) if l >= n_layer => Err(crate::Error::Shape {
                what: "decimating layer (the model's layers)",
                expected: n_layer,
                got: l + 1,
            }),
            _ => Ok(()),
        }
    }

    pub fn layers(&self) -> &[usize] {
        &self.layer[..self.n]
    }

    /// The threshold of the `i`-th decimating layer (0 past them: every token kept).
    pub fn tau_at(&self, i: usize) -> f32 {
        if i < self.n {
            self.tau[i]
        } else {
            0.0
        }
    }
}

/// A measuring pass of DeciMamba: the call stops inside `layer`, once its Δ is known, and writes
/// the norm ‖Δ_t‖₂ of each row that reached it into `norms` (`(t)`, at least the call's tokens).
pub struct Measure<'a> {
    pub layer: usize,
    pub norms: &'a mut [f32],
}

/// What a decimated call did: the rows that left each decimating layer (in the order of
/// [`Decimation::layers`]), and the rows that reached the measured layer (measuring passes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Decimated {
    pub kept: [usize; MAX_DECIMATING],
    pub measured: usize,
}

/// What a layer does with its rows once Δ is known (DeciMamba).
pub(crate) enum Cut<'a> {
    /// Every row goes on.
    Keep,
    /// The rows with ‖Δ_t‖₂ below the threshold leave the sequence, and those equal to it once
    /// the budget of ties is spent.
    Drop { tau: f32, ties: &'a mut usize },
    /// The layer stops, writing each row's ‖Δ_t‖₂.
    Measure(&'a mut [f32]),
}

/// DeciMamba inside a layer, once its Δ `dt (t, w)` is known: under `Measure`, each row's ‖Δ_t‖₂
/// written and `None` (the layer stops there); under `Drop`, the kept rows of `dt` and of each of
/// `rows` (a buffer and its row width) moved to the front in order, and how many; `Keep`: `t`.
pub(crate) fn cut_rows(
    cut: Cut<'_>,
    t: usize,
    dt: &mut [f32],
    w: usize,
    rows: &mut [(&mut [f32], usize)],
) -> Option<usize> {
    let norm = |dt: &[f32], i: usize| {
        let row = &dt[i * w..(i + 1) * w];
        libm::sqrtf(crate::ops::dot(row, row))
    };
    let (tau, ties) = match cut {
        Cut::Keep => return Some(t),
        Cut::Measure(norms) => {
            norms.iter_mut().take(t).enumerate().for_each(|(i, o)| *o = norm(dt, i));
            return None;
        }
        Cut::Drop { tau, ties } => (tau, ties),
    };
    let mut kept = 0;
    for i in 0..t {
        let v = norm(dt, i);
        if v < tau || (v == tau && *ties == 0) {
            continue;
        }
        if v == tau {
            *ties -= 1;
        }
        if kept < i {
            dt.copy_within(i * w..(i + 1) * w, kept * w);
            for (buf, bw) in rows.iter_mut() {
                buf.copy_within(i * *bw..(i + 1) * *bw, kept * *bw);
            }
        }
        kept += 1;
    }
    Some(kept)
}
