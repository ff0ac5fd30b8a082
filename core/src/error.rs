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
        }
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
