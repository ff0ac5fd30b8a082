//! The core's one error type: small, `Copy`, and printable without allocation.
use core::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A tensor or config dimension does not match what the model needs.
    Shape { what: &'static str, expected: usize, got: usize },
    /// A caller-provided buffer is too small.
    Buffer { what: &'static str, need: usize, got: usize },
    /// A token id is not a row of the embedding.
    Token { id: u32, rows: usize },
    /// A config value the math cannot use.
    Config(&'static str),
    /// A NaN or infinity appeared at `site`: `index` is the token within the call for hidden rows,
    /// the element within the layer's state for a state.
    NonFinite { site: Site, index: usize },
}

/// Where in the forward a non-finite value was first seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// The embedded rows (before layer 0).
    Embedding,
    /// Layer `l`'s output rows (the residual stream after it).
    Layer(usize),
    /// Layer `l`'s recurrent state after the call.
    State(usize),
    /// The final norm's output rows (what the LM head reads).
    FinalNorm,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Site::Embedding => f.write_str("the embedding"),
            Site::Layer(l) => write!(f, "layer {l}'s output"),
            Site::State(l) => write!(f, "layer {l}'s state"),
            Site::FinalNorm => f.write_str("the final norm"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Shape { what, expected, got } => {
                write!(f, "{what}: expected {expected} elements, found {got}")
            }
            Error::Buffer { what, need, got } => {
                write!(f, "{what} buffer too small: need {need} f32, got {got}")
            }
            Error::Token { id, rows } => {
                write!(f, "token id {id} is out of range (the embedding has {rows} rows)")
            }
            Error::Config(msg) => f.write_str(msg),
            Error::NonFinite { site: site @ Site::State(_), index } => {
                write!(f, "non-finite value in {site} (element {index})")
            }
            Error::NonFinite { site, index } => write!(f, "non-finite value in {site} at token {index} of the call"),
        }
    }
}

/// A float is non-finite iff its [`magnitude_bits`] reach this (the exponent's all-ones): the
/// test a loop can fold into a running maximum, which vectorises where `is_finite` does not.
pub(crate) const NON_FINITE_BITS: u32 = 0x7f80_0000;

/// The bits of `|x|`.
#[inline(always)]
pub(crate) fn magnitude_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The index of the first NaN or infinity in `v`, by a scan that vectorises (a token step checks
/// its whole state: 19 MB for the Mamba-2 130m shape, where `position(!is_finite)` took 13 % of a
/// greedy decode).
pub fn first_non_finite(v: &[f32]) -> Option<usize> {
    let max = v.iter().fold(0u32, |m, &x| m.max(magnitude_bits(x)));
    (max >= NON_FINITE_BITS).then(|| v.iter().position(|x| !x.is_finite()).unwrap_or(0))
}

/// Fails at the first NaN or infinity of `v` (rows of `width`, or state elements with width 1).
pub fn check_finite(v: &[f32], width: usize, site: Site) -> Result<(), Error> {
    match first_non_finite(v) {
        Some(i) => Err(Error::NonFinite { site, index: i / width.max(1) }),
        None => Ok(()),
    }
}

/// Checks that a caller buffer holds at least `need` elements.
pub fn need(what: &'static str, buf: usize, need: usize) -> Result<(), Error> {
    if buf < need {
        Err(Error::Buffer { what, need, got: buf })
    } else {
        Ok(())
    }
}

impl core::error::Error for Error {}
