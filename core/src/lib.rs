//! `stuffed-core`: the forward math of recurrent language models, `#![no_std]`, with no allocation.
//!
//! Everything here borrows: weights are views into a checkpoint the host mapped, and the recurrent
//! state, the scratch and the outputs are caller-provided `f32` slices whose sizes come from the
//! `*_len` functions of each model. Bad sizes and bad token ids are [`Error`]s, never panics, so the
//! same code can run inside another runtime or on bare metal.
//!
//! One file per family holds its whole math (token step and chunked forward): [`mamba2`], [`rwkv`]
//! (RWKV-5.2 and RWKV-6) and [`hgrn2`], the last two on the shared per-channel recurrence [`gla`],
//! [`rwkv7`] (RWKV-7, the delta-rule state of x070) and [`delta_net`] (DeltaNet and Gated DeltaNet).
//!
//! Embedding a step in another runtime: point [`Weight`] views at the runtime's own weight memory
//! (f32, bf16 or f16, row-major as the checkpoint stores them), size the buffers once from the
//! model, then call [`Recurrent::step`] per token, or [`Recurrent::forward`] on a span:
//!
//! ```
//! use stuffed_core::mamba2::{Config, Layer, Mamba2, Weights};
//! use stuffed_core::{Data, Recurrent, Serial, Weight};
//!
//! let cfg = Config {
//!     d_model: 8, n_layer: 1, d_state: 4, head_dim: 8, n_heads: 2, n_groups: 1, d_conv: 4,
//!     vocab_rows: 16, eps: 1e-5, dt_min: 0.0, dt_max: f32::INFINITY,
//! };
//! // Stand-in for the runtime's weight memory; every view here reads from its start.
//! let mem: Vec<f32> = (0..512).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.4).collect();
//! let w = |rows: usize, cols: usize| Weight::new(Data::F32(&mem[..rows * cols]), rows, cols);
//! let (di, cd, nin) = (cfg.d_inner(), cfg.conv_dim(), cfg.in_proj_rows());
//! let layers = [Layer {
//!     norm: w(1, 8)?, in_proj: w(nin, 8)?, in_proj_bias: None, conv_w: w(cd, 4)?, conv_b: None,
//!     dt_bias: w(1, 2)?, a_log: w(1, 2)?, d: w(1, 2)?, gate_norm: w(1, di)?, out_proj: w(8, di)?,
//!     out_proj_bias: None,
//! }];
//! let embed = w(16, 8)?;
//! let net = Mamba2::new(cfg, Weights { embed, layers: &layers, norm_f: w(1, 8)?, head: embed })?;
//!
//! // Sized once; the calls below allocate nothing. A zero state is the start of a sequence.
//! let (ex, tokens) = (Serial, [3u32, 1, 4, 1, 5]);
//! let mut state = vec![0f32; net.state_len()];
//! let mut scratch = vec![0f32; net.scratch_len(tokens.len())];
//! let mut hidden = vec![0f32; tokens.len() * net.d_model()];
//! let mut logits = vec![0f32; net.vocab_rows()];
//! for &t in &tokens {
//!     net.step(&ex, t, &mut state, &mut scratch, &mut hidden[..8])?;
//!     net.logits(&ex, &hidden[..8], 1, &mut logits)?;
//! }
//! // The chunked form reaches the same state and the same last hidden row.
//! let mut state2 = vec![0f32; net.state_len()];
//! net.forward(&ex, &tokens, &mut state2, &mut scratch, &mut hidden)?;
//! let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs()));
//! assert!(close(&state, &state2));
//! let mut last = vec![0f32; net.vocab_rows()];
//! net.logits(&ex, &hidden[4 * 8..], 1, &mut last)?;
//! assert!(close(&logits, &last));
//! // Bad input is an error, never a panic: an id past the embedding, a buffer of the wrong size.
//! assert!(net.step(&ex, 16, &mut state, &mut scratch, &mut hidden[..8]).is_err());
//! assert!(net.step(&ex, 1, &mut state[1..], &mut scratch, &mut hidden[..8]).is_err());
//! # Ok::<(), stuffed_core::Error>(())
//! ```
#![no_std]
#![forbid(clippy::unwrap_used)]

pub mod delta_net;
pub mod error;
pub mod exec;
pub mod forget;
pub mod gemm;
pub mod gla;
pub mod gla_lm;
pub mod hgrn2;
mod lanes;
pub mod mamba1;
pub mod mamba2;
pub mod model;
pub mod ops;
pub mod rwkv;
pub mod rwkv7;
pub mod weight;
pub mod xlstm;

pub use error::{Error, Site};
pub use exec::{Exec, Serial};
pub use forget::{Forget, Runs};
pub use model::Recurrent;
pub use weight::{DType, Data, SplitHalves, SplitSource, Weight};
