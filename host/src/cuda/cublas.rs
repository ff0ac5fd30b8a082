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
    _compute: i32,
    _algo: i32,
) -> i32 {
    if c_type != CUDA_R_32F || a_type != b_type {
        return 7; // CUBLAS_STATUS_INVALID_VALUE
    }
    let el = |p: *const c_void, ty: i32, i: usize| -> f32 {
        if ty == CUDA_R_16BF {
            f32::from_bits((*(p as *const u16).add(i) as u32) << 16)
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
    let c = c as *mut f32;
    for j in 0..n {
        for i in 0..m {
            let acc: f32 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            let cij = c.add(i + j * ldc);
            *cij = alpha * acc + if beta == 0.0 { 0.0 } else { beta * *cij };
        }
    }
    0
}

const OP_N: i32 = 0;
const OP_T: i32 = 1;
const CUDA_R_32F: i32 = 0;
const CUDA_R_16BF: i32 = 14;
const COMPUTE_32F: i32 = 68;
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
        Ok(Blas { h })
    }

    /// `c (t, n) f32 = beta·c + x (t, k) · w (n, k)ᵀ`, all row-major; `x` and `w` of type `dt`,
    /// accumulated in f32. `beta = 1` adds into `c` (the residual).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_nt(&self, dt: DType, t: usize, n: usize, k: usize, x: u64, w: u64, c: u64, beta: f32) -> Result<()> {
        if t == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1f32, beta);
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
}

#[cfg(feature = "cuda")]
impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate, destroyed once.
        unsafe { cublasDestroy_v2(self.h) };
    }
}
