//! `stuffed`: stream millions of tokens through recurrent language models in constant memory, and
//! measure how their fixed-size state fails.
//!
//! Layers, one way: checkpoint (maps) → model (core views) → session (state + buffers) → commands.
pub mod checkpoint;
pub mod cli;
pub mod config;
#[cfg(gpu)]
pub mod cuda;
pub mod defaults;
pub mod eval;
pub mod exec;
pub mod forget;
pub mod fuzz;
pub mod gpumem;
pub mod interrupt;
pub mod model;
pub mod report;
pub mod score;
pub mod session;
pub mod synth;
pub mod text;
pub mod tokenizer;
pub mod world;
