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
    /// Sliding window by state difference (Eq. 8): the read-out uses h_t − α_{t−r+1:t}·h_{t−r},
    /// with h_{t−r} advanced r steps behind from each layer's own cached inputs. Calls may hold at
    /// most r tokens.
    Window { r: usize },
    /// Two staggered states (FAMILIES.md §9.3), for non-diagonal transitions (RWKV-7) where the
    /// window by state difference is not exact: a second state restarts every r tokens and replaces
    /// the read-out state then, so the read-out holds the last r to 2r tokens.
    Staggered { r: usize },
}

impl Forget {
    /// Rejects parameters the math cannot use.
    pub fn check(&self) -> Result<(), crate::Error> {
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
            _ => Ok(()),
        }
    }

    /// [`Forget::check`] for Mamba-1 and Mamba-2, which also take `Decay`.
    pub fn check_mamba(&self) -> Result<(), crate::Error> {
        match *self {
            Forget::Decay { s } if !(s > 0.0 && s.is_finite()) => {
                Err(crate::Error::Config("decay scaling needs s > 0"))
            }
            Forget::Decay { .. } => Ok(()),
            other => other.check(),
        }
    }

    /// The factor on A: s under `Decay`, else 1.
    pub fn a_scale(&self) -> f32 {
        match *self {
            Forget::Decay { s } => s,
            _ => 1.0,
        }
    }

    /// [`Forget::check`] for a family with a non-diagonal transition: two staggered states instead
    /// of the window by state difference, which is not exact there.
    pub fn check_non_diagonal(&self) -> Result<(), crate::Error> {
        match *self {
            Forget::Staggered { r: 0 } => Err(crate::Error::Config("staggered-state forgetting needs r ≥ 1")),
            Forget::Staggered { .. } => Ok(()),
            Forget::Window { .. } => Err(crate::Error::Config(
                "the window by state difference is exact only for diagonal transitions; \
                 use staggered:r=N (two staggered states, FAMILIES.md §9.3)",
            )),
            other => other.check(),
        }
    }
}

/// The part of the state `window:r=N` adds after the model's own: every layer's cache
/// (`layer_len` each), then the window's position (tokens seen mod r) and whether r tokens have been
/// seen, both as f32.
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
        let (layers, meta) = extra.split_at_mut(extra.len().saturating_sub(2));
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
    /// Visits every value.
    pub fn for_each(&self, state: &[f32], mut f: impl FnMut(f32)) {
        for r in 0..self.rows {
            let s = self.start + r * self.stride;
            state[s..s + self.len].iter().for_each(|&v| f(v));
        }
    }
}
