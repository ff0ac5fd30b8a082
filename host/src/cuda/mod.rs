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

impl DBuf {
    /// A buffer of `bytes` zeros.
    pub fn zeroed(bytes: usize) -> anyhow::Result<DBuf> {
        let b = DBuf::new(bytes)?;
        b.zero()?;
        Ok(b)
    }

    /// A buffer holding `src`.
    pub fn from<T: bytemuck::Pod>(src: &[T]) -> anyhow::Result<DBuf> {
        let mut b = DBuf::new(std::mem::size_of_val(src))?;
        b.upload(0, src)?;
        Ok(b)
    }
}

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
pub const KERNELS: &[&str] = &[
    "embed_f32",
    "embed_bf16",
    "rmsnorm_f32",
    "rmsnorm_bf16",
    "add_bias",
    "conv_bc",
    "conv_state_update",
    "conv_step",
    "ssd_cumsum",
    "ssd_chunk_state",
    "ssd_state_pass",
    "ssd_chunk_scan",
    "ssd_step",
    "gated_norm_f32",
    "gated_norm_bf16",
    "decode_in_f32",
    "decode_in_bf16",
    "decode_out_f32",
    "decode_out_bf16",
    "lse_tile",
    "argmax_rows",
    "probe_sums",
    "head_norm",
    "ssd_window",
    "window_store",
    "window_rebuild",
    "window_meta",
    "count_nonfinite",
];

/// One profiled op: (name, calls, seconds).
pub type ProfileRow = (&'static str, u64, f64);

/// `STUFFED_PROFILE=1`: every launch, GEMM and graph replay runs alone (a sync before and after) and
/// its wall time is summed per name, for the per-kernel breakdown `stuffed bench` prints; a kernel
/// that faults is named. Off, it costs nothing.
pub struct Profile {
    rows: Option<std::sync::Mutex<Vec<ProfileRow>>>,
    /// Set while a graph is captured: nothing may sync the stream then.
    pub paused: std::sync::atomic::AtomicBool,
}

impl Profile {
    pub fn from_env() -> Profile {
        let on = std::env::var_os("STUFFED_PROFILE").filter(|v| !v.is_empty() && v != "0");
        Profile { rows: on.map(|_| Default::default()), paused: false.into() }
    }

    /// (name, calls, seconds) since the last take, slowest first; None when profiling is off.
    pub fn take(&self) -> Option<Vec<ProfileRow>> {
        let mut rows = std::mem::take(&mut *self.rows.as_ref()?.lock().ok()?);
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        Some(rows)
    }
}

impl Gpu {
    /// Runs `f` (work issued on the stream), timed under `name` when profiling.
    pub fn timed(&self, name: &'static str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        #[cfg(not(feature = "cuda"))]
        let f = || f().and_then(|_| emu::check_redzones(name));
        let Some(m) = &self.prof.rows else { return f() };
        if self.prof.paused.load(std::sync::atomic::Ordering::Relaxed) {
            return f();
        }
        self.sync()?;
        let t0 = std::time::Instant::now();
        f()?;
        // Synced after each op, a kernel's fault is named here (unprofiled, it surfaces at a later sync).
        self.sync().map_err(|e| e.context(format!("CUDA: {name} failed")))?;
        let dt = t0.elapsed().as_secs_f64();
        let mut rows = m.lock().map_err(|_| anyhow::anyhow!("profile lock poisoned"))?;
        match rows.iter_mut().find(|r| r.0 == name) {
            Some(r) => {
                r.1 += 1;
                r.2 += dt;
            }
            None => rows.push((name, 1, dt)),
        }
        Ok(())
    }

    /// A 1-D launch covering `n` elements with 256-thread blocks.
    pub fn launch_n(&self, name: &'static str, n: usize, args: &[Arg]) -> anyhow::Result<()> {
        self.launch(name, (n.div_ceil(256) as u32, 1), 256, 0, args)
    }
}
