//! The emulated device (feature `cuda-emu` without `cuda`): buffers are host allocations whose
//! addresses stand in for device pointers (each between poisoned redzones, and poisoned itself until
//! written, as `cuMemAlloc` leaves memory as it was; [`check_redzones`] runs after every op), kernels
//! run from the same `ptx/*.cu` source compiled as C++ (`ptx/emu/`), and cuBLAS is its documented
//! column-major GemmEx (`cublas.rs`). The launch sequence in `mamba2.rs` is the real one, argument
//! slots included.
use super::{Arg, Blas, Profile, KERNELS};
use anyhow::{anyhow, bail, Result};
use std::ffi::{c_char, c_void, CString};

extern "C" {
    fn emu_launch(name: *const c_char, gx: u32, gy: u32, block: u32, shared: u32, args: *mut *mut c_void) -> i32;
}

/// Bytes of poison on each side of every emulated buffer.
const REDZONE: usize = 256;
/// The poison: 0xFF bytes are NaN as f32 and as bf16, so a kernel that reads outside its buffers, or
/// reads memory nothing wrote (a real `cuMemAlloc` leaves it as it was), carries NaN into the results.
const POISON: u8 = 0xFF;

/// Live emulated buffers (their first byte and length), for the after-each-op redzone check.
static LIVE: std::sync::Mutex<Vec<(u64, usize)>> = std::sync::Mutex::new(Vec::new());

fn live() -> Result<std::sync::MutexGuard<'static, Vec<(u64, usize)>>> {
    LIVE.lock().map_err(|_| anyhow!("CUDA: emulator lock poisoned"))
}

/// A host allocation standing in for device memory: 16-byte aligned, `REDZONE` poisoned bytes on each
/// side (checked after every kernel and GEMM, [`check_redzones`]), its own bytes poisoned until
/// written unless made by [`DBuf::zeroed`]; freed on drop.
pub struct DBuf {
    mem: Vec<u128>,
    pub bytes: usize,
}

impl DBuf {
    pub fn new(bytes: usize) -> Result<DBuf> {
        let words = (2 * REDZONE + bytes.max(1).next_multiple_of(16)) / 16;
        let b = DBuf { mem: vec![u128::from_ne_bytes([POISON; 16]); words], bytes };
        live()?.push((b.ptr(), bytes));
        Ok(b)
    }

    pub fn ptr(&self) -> u64 {
        self.mem.as_ptr() as u64 + REDZONE as u64
    }

    pub fn at(&self, byte_off: usize) -> u64 {
        self.ptr() + byte_off as u64
    }

    pub fn zero(&self) -> Result<()> {
        // SAFETY: the allocation holds `bytes` bytes past `ptr`; device memory is written through raw
        // pointers on the real path too.
        unsafe { std::ptr::write_bytes(self.ptr() as *mut u8, 0, self.bytes) };
        Ok(())
    }

    fn own(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u128, u8>(&mut self.mem)[REDZONE..REDZONE + self.bytes]
    }

    pub fn upload<T: bytemuck::Pod>(&mut self, byte_off: usize, src: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(src);
        if byte_off + n > self.bytes {
            bail!("CUDA: upload of {n} bytes at {byte_off} overruns a {}-byte buffer", self.bytes);
        }
        self.own()[byte_off..byte_off + n].copy_from_slice(bytemuck::cast_slice(src));
        Ok(())
    }

    pub fn download<T: bytemuck::Pod>(&self, byte_off: usize, dst: &mut [T]) -> Result<()> {
        let n = std::mem::size_of_val(dst);
        if byte_off + n > self.bytes {
            bail!("CUDA: download of {n} bytes at {byte_off} overruns a {}-byte buffer", self.bytes);
        }
        let own = &bytemuck::cast_slice::<u128, u8>(&self.mem)[REDZONE..REDZONE + self.bytes];
        bytemuck::cast_slice_mut(dst).copy_from_slice(&own[byte_off..byte_off + n]);
        Ok(())
    }
}

impl Drop for DBuf {
    fn drop(&mut self) {
        if let Ok(mut live) = LIVE.lock() {
            let p = self.ptr();
            live.retain(|&(q, _)| q != p);
        }
    }
}

/// After kernel or GEMM `what`: an error naming it if any live buffer's redzone was written, which on
/// a GPU is a write into another allocation or an illegal address.
pub fn check_redzones(what: &str) -> Result<()> {
    let live = live()?;
    for &(p, bytes) in live.iter() {
        let end = bytes.max(1).next_multiple_of(16);
        // SAFETY: a live buffer (removed from LIVE before it is freed) spans p - REDZONE .. p + end + REDZONE.
        let all = unsafe { std::slice::from_raw_parts((p - REDZONE as u64) as *const u8, end + 2 * REDZONE) };
        let (before, after) = (&all[..REDZONE], &all[REDZONE + bytes..]);
        if let Some(i) = before.iter().rposition(|&b| b != POISON) {
            bail!("CUDA: {what} wrote outside a {bytes}-byte buffer, at byte -{} before its start", REDZONE - i);
        }
        if let Some(i) = after.iter().position(|&b| b != POISON) {
            bail!("CUDA: {what} wrote outside a {bytes}-byte buffer, at byte +{i} past its end");
        }
    }
    Ok(())
}

/// The emulator records no graphs: a "graph" is its ops issued again (`GpuMamba2::decode_step`).
pub struct Graph;

pub struct Gpu {
    pub blas: Blas,
    pub name: String,
    pub prof: Profile,
}

impl Gpu {
    pub fn new() -> Result<Gpu> {
        Ok(Gpu { blas: Blas::emulated(), name: "cuda-emu (CPU)".into(), prof: Profile::from_env() })
    }

    pub fn launch(&self, name: &'static str, grid: (u32, u32), block: u32, shared: u32, args: &[Arg]) -> Result<()> {
        if !KERNELS.contains(&name) {
            bail!("CUDA: unknown kernel {name}");
        }
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        if shared > 48 * 1024 || block > 1024 || !block.is_multiple_of(32) {
            bail!("CUDA: launch of {name} with {block} threads and {shared} bytes of shared memory would fail");
        }
        let mut slots: Vec<[u8; 8]> = args.iter().map(|a| a.slot()).collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s.as_mut_ptr() as *mut c_void).collect();
        let cname = CString::new(name)?;
        self.timed(name, || {
            // SAFETY: as on the real path, the slots match the kernel's parameters and outlive the call.
            let r = unsafe { emu_launch(cname.as_ptr(), grid.0, grid.1, block, shared, ptrs.as_mut_ptr()) };
            if r != 0 {
                bail!("CUDA: launching {name} failed (emulator)");
            }
            Ok(())
        })
    }

    pub fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Device-to-device copy of `bytes`, in stream order.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let live = live()?;
        let inside = |a: u64| live.iter().any(|&(p, n)| a >= p && a + bytes as u64 <= p + n as u64);
        if !inside(src) || !inside(dst) {
            bail!("CUDA: a copy of {bytes} bytes reaches outside its buffers");
        }
        // SAFETY: both ranges lie inside live buffers (checked above).
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    pub fn mem_info() -> Result<(usize, usize)> {
        Ok((8 << 30, 8 << 30))
    }
}
