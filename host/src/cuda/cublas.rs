//! The few cuBLAS calls the backend needs, declared by hand (GPU.md §2). cuBLAS is column-major: a
//! row-major `(r, c)` matrix is a column-major `(c, r)` one, so `C = A·Bᵀ` over row-major operands is
//! `Cᵀ = B·Aᵀ` in its terms.
use anyhow::{bail, Result};
use std::ffi::c_void;

type Handle = *mut c_void;

#[cfg(feature = "cuda")]
#[link(name = "cublas")]
extern "C" {
    fn cublasCreate_v2(handle: *mut Handle) -> i32;
    fn cublasDestroy_v2(handle: Handle) -> i32;
    fn cublasSetStream_v2(handle: Handle, stream: *mut c_void) -> i32;
    fn cublasSetWorkspace_v2(handle: Handle, workspace: *mut c_void, bytes: usize) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn cublasGemmEx(
        handle: Handle,
        transa: i32,
        transb: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: *const c_void,
        a: *const c_void,
        a_type: i32,
        lda: i32,
        b: *const c_void,
        b_type: i32,
        ldb: i32,
        beta: *const c_void,
        c: *mut c_void,
        c_type: i32,
        ldc: i32,
        compute: i32,
        algo: i32,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn cublasGemmStridedBatchedEx(
        handle: Handle,
        transa: i32,
        transb: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: *const c_void,
        a: *const c_void,
        a_type: i32,
        lda: i32,
        stride_a: i64,
        b: *const c_void,
        b_type: i32,
        ldb: i32,
        stride_b: i64,
        beta: *const c_void,
        c: *mut c_void,
        c_type: i32,
        ldc: i32,
        stride_c: i64,
        batch: i32,
        compute: i32,
        algo: i32,
    ) -> i32;
}

/// `cublasGemmEx` as its documentation defines it, on host memory (feature `cuda-emu`): column-major,
/// `C = alpha·op(A)·op(B) + beta·C`, so the emulator checks our parameter mapping, not only the math.
#[cfg(not(feature = "cuda"))]
#[allow(clippy::too_many_arguments, non_snake_case)]
unsafe fn cublasGemmEx(
    _: Handle,
    transa: i32,
    transb: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: *const c_void,
    a: *const c_void,
    a_type: i32,
    lda: i32,
    b: *const c_void,
    b_type: i32,
    ldb: i32,
    beta: *const c_void,
    c: *mut c_void,
    c_type: i32,
    ldc: i32,
    compute: i32,
    _algo: i32,
) -> i32 {
    if c_type != CUDA_R_32F || a_type != b_type {
        return 7; // CUBLAS_STATUS_INVALID_VALUE
    }
    let el = |p: *const c_void, ty: i32, i: usize| -> f32 {
        if ty == CUDA_R_16BF {
            f32::from_bits((*(p as *const u16).add(i) as u32) << 16)
        } else if compute == COMPUTE_32F_FAST_TF32 {
            // TF32 operands: 10 mantissa bits, rounded to nearest (ties away).
            let u = (*(p as *const f32).add(i)).to_bits();
            f32::from_bits(if u & 0x7f80_0000 == 0x7f80_0000 { u } else { (u + 0x1000) & 0xffff_e000 })
        } else {
            *(p as *const f32).add(i)
        }
    };
    let (alpha, beta) = (*(alpha as *const f32), *(beta as *const f32));
    let (m, n, k) = (m as usize, n as usize, k as usize);
    let (lda, ldb, ldc) = (lda as usize, ldb as usize, ldc as usize);
    // op(A)[i, l] and op(B)[l, j], column-major with leading dimensions lda, ldb.
    let at = |i: usize, l: usize| if transa == OP_N { el(a, a_type, i + l * lda) } else { el(a, a_type, l + i * lda) };
    let bt = |l: usize, j: usize| if transb == OP_N { el(b, b_type, l + j * ldb) } else { el(b, b_type, j + l * ldb) };
    // op(A) by rows and op(B) by columns, each contiguous in k: the dot products below then read
    // two slices front to back in 16 independent lanes, which the compiler vectorizes (a sum in
    // one f32 accumulator it may not reorder, and that made the emulated GEMM a quarter of the
    // GPU tests' time). cuBLAS leaves its summation order unspecified too.
    let rows: Vec<f32> = (0..m).flat_map(|i| (0..k).map(move |l| (i, l))).map(|(i, l)| at(i, l)).collect();
    let cols: Vec<f32> = (0..n).flat_map(|j| (0..k).map(move |l| (l, j))).map(|(l, j)| bt(l, j)).collect();
    // The products by the core's CPU GEMM (f32 in, f32 sums; the head GEMMs of the 50k-vocab test
    // model made the emulated cuBLAS a fifth of the GPU tests' time): prod (n, m) row-major =
    // op(B)ᵀ·op(A)ᵀ, i.e. prod[j·m + i] = C's (i, j) before alpha and beta.
    let mut prod = vec![0f32; m * n];
    if k > 0 && m > 0 && n > 0 {
        let simd = crate::exec::detect_simd();
        let mut ok = true;
        crate::exec::with_thread_panels(&mut |panels| {
            ok = stuffed_core::gemm::gemm_nt(simd, (n, m, k), &cols, k, &rows[..], k, &mut prod, m, false, panels)
                .is_ok();
        });
        if !ok {
            return 7;
        }
    }
    let c = c as *mut f32;
    for (j, pj) in prod.chunks_exact(m.max(1)).enumerate().take(n) {
        for (i, &acc) in pj.iter().enumerate() {
            let cij = c.add(i + j * ldc);
            *cij = alpha * acc + if beta == 0.0 { 0.0 } else { beta * *cij };
        }
    }
    0
}

/// `cublasGemmStridedBatchedEx` on host memory: `batch` emulated GemmEx calls at the given strides.
#[cfg(not(feature = "cuda"))]
#[allow(clippy::too_many_arguments, non_snake_case)]
unsafe fn cublasGemmStridedBatchedEx(
    h: Handle,
    transa: i32,
    transb: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: *const c_void,
    a: *const c_void,
    a_type: i32,
    lda: i32,
    stride_a: i64,
    b: *const c_void,
    b_type: i32,
    ldb: i32,
    stride_b: i64,
    beta: *const c_void,
    c: *mut c_void,
    c_type: i32,
    ldc: i32,
    stride_c: i64,
    batch: i32,
    compute: i32,
    algo: i32,
) -> i32 {
    if a_type != CUDA_R_32F {
        return 7;
    }
    for i in 0..batch as usize {
        let at = |p: *const c_void, s: i64| (p as *const f32).add(i * s as usize) as *const c_void;
        let r = cublasGemmEx(
            h,
            transa,
            transb,
            m,
            n,
            k,
            alpha,
            at(a, stride_a),
            a_type,
            lda,
            at(b, stride_b),
            b_type,
            ldb,
            beta,
            (c as *mut f32).add(i * stride_c as usize) as *mut c_void,
            c_type,
            ldc,
            compute,
            algo,
        );
        if r != 0 {
            return r;
        }
    }
    0
}

const OP_N: i32 = 0;
const OP_T: i32 = 1;
const CUDA_R_32F: i32 = 0;
const CUDA_R_16BF: i32 = 14;
const COMPUTE_32F: i32 = 68;
const COMPUTE_32F_FAST_TF32: i32 = 77;
const GEMM_DEFAULT: i32 = -1;

/// The element type of a matrix operand on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
    fn cuda(self) -> i32 {
        match self {
            DType::F32 => CUDA_R_32F,
            DType::Bf16 => CUDA_R_16BF,
        }
    }
}

pub struct Blas {
    h: Handle,
    /// `STUFFED_SANITIZE_INIT=1`: clear each GEMM's output range before cuBLAS writes it, for
    /// compute-sanitizer's initcheck, which does not see the stores of cuBLAS's Hopper kernels (on an
    /// H200, `tools/initcheck_probe.py` shows a `cublasGemmEx` bf16 output reported unwritten) and so
    /// reports every later read of it. The clear covers exactly the range cuBLAS writes.
    #[cfg(feature = "cuda")]
    mark_outputs: Option<*mut c_void>,
}

impl Blas {
    /// The emulator's stand-in (no handle).
    #[cfg(not(feature = "cuda"))]
    pub fn emulated() -> Blas {
        Blas { h: std::ptr::null_mut() }
    }

    /// # Safety
    /// `stream` must be a live CUDA stream of the current context.
    #[cfg(feature = "cuda")]
    pub unsafe fn new(stream: *mut c_void) -> Result<Blas> {
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: cublasCreate writes one handle; the stream belongs to the current context.
        let r = unsafe { cublasCreate_v2(&mut h) };
        if r != 0 {
            bail!("cuBLAS: cublasCreate failed ({r}); is libcublas.so.13 on LD_LIBRARY_PATH?");
        }
        let r = unsafe { cublasSetStream_v2(h, stream) };
        if r != 0 {
            bail!("cuBLAS: cublasSetStream failed ({r})");
        }
        let sanitize = std::env::var_os("STUFFED_SANITIZE_INIT").is_some_and(|v| !v.is_empty() && v != "0");
        Ok(Blas { h, mark_outputs: sanitize.then_some(stream) })
    }

    /// Under `STUFFED_SANITIZE_INIT`: zeros `batch` row-major `(rows, cols)` f32 matrices at `c`, rows
    /// `ld` floats apart, matrices `stride` floats apart (on the stream, before the GEMM that writes them).
    #[allow(unused_variables)]
    fn mark_written(&self, c: u64, (rows, cols, ld): (usize, usize, usize), stride: usize, batch: usize) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(stream) = self.mark_outputs {
            for b in 0..batch {
                // SAFETY: the GEMM about to run writes this range of a device buffer.
                let r = unsafe {
                    cust::sys::cuMemsetD2D32Async(
                        c + (b * stride * 4) as u64,
                        ld * 4,
                        0,
                        cols,
                        rows,
                        stream as cust::sys::CUstream,
                    )
                };
                if r != cust::sys::CUresult::CUDA_SUCCESS {
                    bail!("CUDA: clearing a GEMM output for initcheck failed: {r:?}");
                }
            }
        }
        Ok(())
    }

    /// Gives cuBLAS `bytes` of device memory at `ptr` as its workspace (it must outlive the handle).
    #[cfg(feature = "cuda")]
    pub fn set_workspace(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: a live handle and a device allocation of `bytes` that outlives it (the caller's).
        let r = unsafe { cublasSetWorkspace_v2(self.h, ptr as *mut c_void, bytes) };
        if r != 0 {
            bail!("cuBLAS: cublasSetWorkspace failed ({r})");
        }
        Ok(())
    }

    /// `c (t, n) f32 = beta·c + x (t, k) · w (n, k)ᵀ`, all row-major; `x` and `w` of type `dt`,
    /// accumulated in f32. `beta = 1` adds into `c` (the residual).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_nt(&self, dt: DType, t: usize, n: usize, k: usize, x: u64, w: u64, c: u64, beta: f32) -> Result<()> {
        if t == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1f32, beta);
        if beta == 0.0 {
            self.mark_written(c, (t, n, n), 0, 1)?;
        }
        // Column-major: cᵀ (n, t) = w (as (k, n))ᵀ · xᵀ (as (k, t)).
        // SAFETY: the pointers are device buffers of the stated shapes (the callers size them).
        let r = unsafe {
            cublasGemmEx(
                self.h,
                OP_T,
                OP_N,
                n as i32,
                t as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                dt.cuda(),
                k as i32,
                x as *const c_void,
                dt.cuda(),
                k as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                CUDA_R_32F,
                n as i32,
                COMPUTE_32F,
                GEMM_DEFAULT,
            )
        };
        if r != 0 {
            bail!("cuBLAS: GemmEx ({t}×{k} · {n}×{k}ᵀ, {dt:?}) failed ({r})");
        }
        Ok(())
    }

    /// For each `b < batch`: `c_b (t, n) = x_b (t, k) · w_b (n, k)ᵀ`, f32, row-major with leading
    /// dimensions `ld = [x, w, c]` and element strides `stride = [x, w, c]` between batches; in TF32
    /// on the tensor cores when `tf32`, else in full f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_nt_batched(
        &self,
        (t, n, k): (usize, usize, usize),
        (x, w, c): (u64, u64, u64),
        ld: [usize; 3],
        stride: [usize; 3],
        batch: usize,
        tf32: bool,
    ) -> Result<()> {
        if batch == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1f32, 0f32);
        self.mark_written(c, (t, n, ld[2]), stride[2], batch)?;
        // SAFETY: the pointers are device buffers holding `batch` matrices at the given strides.
        let r = unsafe {
            cublasGemmStridedBatchedEx(
                self.h,
                OP_T,
                OP_N,
                n as i32,
                t as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                CUDA_R_32F,
                ld[1] as i32,
                stride[1] as i64,
                x as *const c_void,
                CUDA_R_32F,
                ld[0] as i32,
                stride[0] as i64,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                CUDA_R_32F,
                ld[2] as i32,
                stride[2] as i64,
                batch as i32,
                if tf32 { COMPUTE_32F_FAST_TF32 } else { COMPUTE_32F },
                GEMM_DEFAULT,
            )
        };
        if r != 0 {
            bail!("cuBLAS: GemmStridedBatchedEx ({batch} × {t}×{k} · {n}×{k}ᵀ) failed ({r})");
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate, destroyed once.
        unsafe { cublasDestroy_v2(self.h) };
    }
}
