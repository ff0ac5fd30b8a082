//! `stuffed`: stream millions of tokens through recurrent language models in constant memory, and
//! measure how their fixed-size state fails.
//!
//! Layers, one way: checkpoint (maps) → model (core views) → backend (session: state + buffers;
//! or the GPU) → evaluators → commands.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
/// A file of `host/assets/` as `Result<&'static [u8]>`: embedded in the binary, or in a lean build
/// (`STUFFED_LEAN=1`, the GPU bundle of tools/gpu_bundle.sh, whose binaries must stay small) read once
/// from the source tree it was built in, which tools/gpu_run.sh links on the GPU machine.
#[macro_export]
macro_rules! asset {
    ($name:literal) => {{
        #[cfg(not(lean))]
        let bytes: anyhow::Result<&'static [u8]> = Ok(include_bytes!(concat!("../assets/", $name)));
        #[cfg(lean)]
        let bytes: anyhow::Result<&'static [u8]> = {
            static CELL: std::sync::OnceLock<Result<Vec<u8>, String>> = std::sync::OnceLock::new();
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $name);
            match CELL.get_or_init(|| {
                std::fs::read(path)
                    .map_err(|e| format!("{path}: {e} (a lean build reads its assets from its source tree)"))
            }) {
                Ok(b) => Ok(b.as_slice()),
                Err(e) => Err(anyhow::anyhow!("{e}")),
            }
        };
        bytes
    }};
}

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
