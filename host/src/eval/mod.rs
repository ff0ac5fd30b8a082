//! The evaluators: each is the same streamed forward with a different reduction.
pub mod laws;
pub mod passkey;
pub mod ppl;
pub mod probe;
