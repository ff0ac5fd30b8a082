//! `stuffed-core`: the forward math of recurrent language models, `#![no_std]`, with no allocation.
//!
//! Everything here borrows: weights are views into a checkpoint the host mapped, and the recurrent
//! state, the scratch and the outputs are caller-provided `f32` slices whose sizes come from the
//! `*_len` functions of each model. Bad sizes and bad token ids are [`Error`]s, never panics, so the
//! same code can run inside another runtime or on bare metal.
//!
//! One file per family holds its whole math (token step and chunked forward): [`mamba2`], [`rwkv`]
//! (RWKV-5.2 and RWKV-6) and [`hgrn2`], the last two on the shared per-channel recurrence [`gla`].
#![no_std]
#![forbid(clippy::unwrap_used)]

pub mod error;
pub mod exec;
pub mod forget;
pub mod gla;
pub mod hgrn2;
pub mod mamba2;
pub mod model;
pub mod ops;
pub mod rwkv;
pub mod weight;

pub use error::Error;
pub use exec::{Exec, Serial};
pub use forget::{Forget, Runs};
pub use model::Recurrent;
pub use weight::{DType, Data, Weight};
