//! The CUDA backend (feature `cuda`): a context, the embedded PTX module, a stream, cuBLAS, and device
//! buffers. The families' launch sequences live beside it (`mamba2.rs`); each kernel's CPU reference
//! is named in `ptx/*.cu`. Feature `cuda-emu` runs the same kernel source and launch sequence on the
//! CPU (`emu.rs`, `ptx/emu/`), so `cargo test` checks them on machines without a GPU.

mod cublas;
#[cfg(feature = "cuda")]
mod driver;
#[cfg(not(feature = "cuda"))]
mod emu;
pub mod mamba2;
pub use cublas::{Blas, DType};
#[cfg(feature = "cuda")]
pub use driver::{DBuf, Gpu, Graph};
#[cfg(not(feature = "cuda"))]
pub use emu::{DBuf, Gpu, Graph};

/// One kernel argument: device pointers, ints and floats, each passed from an 8-byte slot.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    /// The value as the driver reads it: from an 8-byte slot.
    pub(crate) fn slot(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        match self {
            Arg::Ptr(v) => b.copy_from_slice(&v.to_le_bytes()),
            Arg::I64(v) => b.copy_from_slice(&v.to_le_bytes()),
            Arg::I32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
            Arg::F32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
        }
        b
    }
}

/// `usize` → `Arg::I32`, for shapes (checked on the host to fit).
pub fn i(v: usize) -> Arg {
    Arg::I32(v as i32)
}

/// The kernels `ptx/mamba2.cu` defines.
pub(crate) const KERNELS: &[&str] = &[
    "embed_f32",
    "embed_bf16",
    "rmsnorm_f32",
    "rmsnorm_bf16",
    "add_bias",
    "conv_silu",
    "conv_state_update",
    "conv_step",
    "dt_softplus",
    "ssd_cumsum",
    "ssd_chunk_state",
    "ssd_state_pass",
    "ssd_chunk_scan",
    "ssd_step",
    "gated_norm_f32",
    "gated_norm_bf16",
    "lse_nll",
    "argmax_rows",
    "probe_sums",
    "head_norm",
    "ssd_window",
    "window_store",
    "window_meta",
    "count_nonfinite",
];

impl Gpu {
    /// A 1-D launch covering `n` elements with 256-thread blocks.
    pub fn launch_n(&self, name: &'static str, n: usize, args: &[Arg]) -> anyhow::Result<()> {
        self.launch(name, (n.div_ceil(256) as u32, 1), 256, 0, args)
    }
}
