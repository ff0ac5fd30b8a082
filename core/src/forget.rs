//! Training-free forgetting inside the recurrence (SPEC.md §2.4). State normalization and periodic
//! reset act on the state between calls, so the host applies them (the same way for every path).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Forget {
    #[default]
    None,
    /// Reduced retention and insertion: α′ = a·α, B′ = b·B (B after conv + SiLU, before ·Δ).
    /// Per-channel families: w′ = a·w, k′ = b·k.
    Rri { a: f32, b: f32 },
    /// Δ′ = c·Δ (raises α, shrinks B̄). Per-channel families: log w′ = c·log w.
    Dt { c: f32 },
    /// Sliding window by state difference (Eq. 8): the read-out uses h_t − α_{t−r+1:t}·h_{t−r},
    /// with h_{t−r} advanced r steps behind from each layer's own cached inputs. Calls may hold at
    /// most r tokens.
    Window { r: usize },
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
            _ => Ok(()),
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
