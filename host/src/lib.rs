//! `stuffed`: stream millions of tokens through recurrent language models in constant memory, and
//! measure how their fixed-size state fails.
//!
//! Layers, one way: checkpoint (maps) → model (core views) → backend (session: state + buffers;
//! or the GPU) → evaluators → commands.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod amx_emu;
pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod config;
#[cfg(gpu)]
pub mod cuda;
pub mod defaults;
pub mod embed;
pub mod eval;
pub mod exec;
pub mod forget;
pub mod fuzz;
pub mod gpumem;
pub mod hub;
pub mod interrupt;
pub mod model;
pub mod report;
pub mod rng;
pub mod session;
pub mod state_dtype;
pub mod synth;
mod team;
pub mod text;
pub mod tokenizer;
pub mod world;
