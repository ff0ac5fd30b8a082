//! The real device: cust's context, module and stream; raw driver calls through `cust::sys`; a failed
//! call is one error line naming the call.
use super::{Arg, Blas, Profile, KERNELS};
use anyhow::{anyhow, bail, Result};
use cust::context::Context;
use cust::module::Module;
use cust::stream::{Stream, StreamFlags};
use cust::sys as cu;
use std::collections::HashMap;
use std::ffi::c_void;

/// The kernels, compiled by ptx/build.sh (nvcc 13.0, compute_80) and embedded.
const MAMBA2_PTX: &str = include_str!("../../../ptx/mamba2.ptx");

fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(anyhow!("CUDA: {what} failed: {r:?}"))
    }
}

/// A device allocation of `bytes`, freed on drop.
pub struct DBuf {
    ptr: u64,
    pub bytes: usize,
}

impl DBuf {
    pub fn new(bytes: usize) -> Result<DBuf> {
        let mut ptr = 0u64;
        // SAFETY: cuMemAlloc writes one device pointer.
        check(unsafe { cu::cuMemAlloc_v2(&mut ptr, bytes.max(4)) }, &format!("allocating {bytes} bytes"))?;
        Ok(DBuf { ptr, bytes })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The address `byte_off` bytes in.
    pub fn at(&self, byte_off: usize) -> u64 {
        self.ptr + byte_off as u64
    }

    pub fn zero(&self) -> Result<()> {
        // SAFETY: the range lies inside this allocation.
        check(unsafe { cu::cuMemsetD32_v2(self.ptr, 0, self.bytes / 4) }, "clearing a buffer")
    }

    /// Copies `src` to `byte_off` (synchronous).
    pub fn upload<T: bytemuck::Pod>(&mut self, byte_off: usize, src: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(src);
        if byte_off + n > self.bytes {
            bail!("CUDA: upload of {n} bytes at {byte_off} overruns a {}-byte buffer", self.bytes);
        }
        // SAFETY: bounds checked above; the host slice holds n bytes.
        check(unsafe { cu::cuMemcpyHtoD_v2(self.at(byte_off), src.as_ptr() as *const c_void, n) }, "copy to device")
    }

    /// Copies from `byte_off` into `dst` (synchronous: waits for the work before it).
    pub fn download<T: bytemuck::Pod>(&self, byte_off: usize, dst: &mut [T]) -> Result<()> {
        let n = std::mem::size_of_val(dst);
        if byte_off + n > self.bytes {
            bail!("CUDA: download of {n} bytes at {byte_off} overruns a {}-byte buffer", self.bytes);
        }
        // SAFETY: bounds checked above; the host slice holds n bytes.
        check(unsafe { cu::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, self.at(byte_off), n) }, "copy to host")
    }
}

impl Drop for DBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc and freed once.
        unsafe { cu::cuMemFree_v2(self.ptr) };
    }
}

/// A captured and instantiated CUDA graph, replayed with [`Gpu::launch_graph`].
pub struct Graph {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created by cuStreamEndCapture / cuGraphInstantiateWithFlags, destroyed once.
        unsafe {
            cu::cuGraphExecDestroy(self.exec);
            cu::cuGraphDestroy(self.graph);
        }
    }
}

/// A context on device 0 with the kernels loaded. Fields drop in order: the context last.
pub struct Gpu {
    funcs: HashMap<&'static str, cu::CUfunction>,
    pub prof: Profile,
    pub blas: Blas,
    _workspace: DBuf,
    pub stream: Stream,
    _module: Module,
    pub name: String,
    _ctx: Context,
}

impl Gpu {
    pub fn new() -> Result<Gpu> {
        let ctx = cust::quick_init().map_err(|e| anyhow!("CUDA: no usable GPU ({e})"))?;
        let dev = cust::device::Device::get_device(0).map_err(|e| anyhow!("CUDA: device 0: {e}"))?;
        let name = dev.name().unwrap_or_else(|_| "unknown GPU".into());
        let module = Module::from_ptx(MAMBA2_PTX, &[]).map_err(|e| anyhow!("CUDA: loading ptx/mamba2.ptx: {e}"))?;
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            let f = module.get_function(k).map_err(|e| anyhow!("CUDA: kernel {k} missing from the PTX: {e}"))?;
            funcs.insert(k, f.to_raw());
        }
        let stream = Stream::new(StreamFlags::DEFAULT, None).map_err(|e| anyhow!("CUDA: creating a stream: {e}"))?;
        // SAFETY: the stream was just created in this context and outlives the handle (field order).
        let blas = unsafe { Blas::new(stream.as_inner() as *mut c_void)? };
        // cuBLAS's own workspace, so that it allocates nothing while a graph is captured.
        let workspace = DBuf::new(32 << 20)?;
        blas.set_workspace(workspace.ptr(), workspace.bytes)?;
        // The SSD scan wants up to 48 KiB of dynamic shared memory (head_dim 128).
        for k in ["ssd_chunk_scan", "ssd_chunk_state"] {
            // SAFETY: a live function handle; attribute 8 = MAX_DYNAMIC_SHARED_SIZE_BYTES.
            let attr = cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            check(unsafe { cu::cuFuncSetAttribute(funcs[k], attr, 48 * 1024) }, "setting shared memory")?;
        }
        Ok(Gpu {
            funcs,
            prof: Profile::from_env(),
            blas,
            _workspace: workspace,
            stream,
            _module: module,
            name,
            _ctx: ctx,
        })
    }

    /// Launches kernel `name` on the stream: `grid` blocks of `block` threads, `shared` bytes of
    /// dynamic shared memory.
    pub fn launch(&self, name: &'static str, grid: (u32, u32), block: u32, shared: u32, args: &[Arg]) -> Result<()> {
        let f = *self.funcs.get(name).ok_or_else(|| anyhow!("CUDA: unknown kernel {name}"))?;
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let mut slots: Vec<[u8; 8]> = args.iter().map(|a| a.slot()).collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s.as_mut_ptr() as *mut c_void).collect();
        self.timed(name, || {
            // SAFETY: the argument list matches the kernel's signature in ptx/mamba2.cu (each launch
            // site mirrors it); every slot outlives the call.
            let r = unsafe {
                cu::cuLaunchKernel(
                    f,
                    grid.0,
                    grid.1,
                    1,
                    block,
                    1,
                    1,
                    shared,
                    self.stream.as_inner(),
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            check(r, &format!("launching {name}"))
        })
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("CUDA: a kernel failed: {e}"))
    }

    /// Device-to-device copy of `bytes`, in stream order (so it can be captured in a graph).
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: callers pass ranges inside live allocations.
        check(unsafe { cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream.as_inner()) }, "device copy")
    }

    /// The work `ops` issues on the stream, captured once as a graph (nothing runs while capturing).
    pub fn capture(&self, ops: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let s = self.stream.as_inner();
        let mode = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: a live stream of this context; the capture is ended below on every path.
        check(unsafe { cu::cuStreamBeginCapture_v2(s, mode) }, "beginning a graph capture")?;
        use std::sync::atomic::Ordering::Relaxed;
        self.prof.paused.store(true, Relaxed);
        let issued = ops();
        self.prof.paused.store(false, Relaxed);
        let mut graph: cu::CUgraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun above and writes one graph handle.
        let ended = check(unsafe { cu::cuStreamEndCapture(s, &mut graph) }, "ending a graph capture");
        issued?;
        ended?;
        let mut exec: cu::CUgraphExec = std::ptr::null_mut();
        // SAFETY: `graph` is the complete graph just captured.
        let r = unsafe { cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if let Err(e) = check(r, "instantiating a graph") {
            // SAFETY: the graph was created above and is not used again.
            unsafe { cu::cuGraphDestroy(graph) };
            return Err(e);
        }
        Ok(Graph { graph, exec })
    }

    pub fn launch_graph(&self, g: &Graph) -> Result<()> {
        self.timed("graph replay", || {
            // SAFETY: an instantiated graph of this context, launched on its stream.
            check(unsafe { cu::cuGraphLaunch(g.exec, self.stream.as_inner()) }, "launching a graph")
        })
    }

    /// Free and total device memory, bytes.
    pub fn mem_info() -> Result<(usize, usize)> {
        cust::memory::mem_get_info().map_err(|e| anyhow!("CUDA: memory info: {e}"))
    }
}
