//! Borrowed weights (f32, bf16 or f16, read in place from the host's memory map) and the one
//! matrix product every family is built from: `out (t, rows) = x (t, cols) · Wᵀ`.
use crate::error::Error;
use crate::exec::{Exec, Shared, Simd};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// A row-major matrix `(rows, cols)` over borrowed data; a vector is `(1, n)`.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub data: Data<'a>,
    pub rows: usize,
    pub cols: usize,
}

/// An element type weights may be stored in.
pub trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// Calls `$body` with `$s` bound to the typed slice of a [`Data`].
macro_rules! with_slice {
    ($data:expr, $s:ident => $body:expr) => {
        match $data {
            Data::F32($s) => $body,
            Data::Bf16($s) => $body,
            Data::F16($s) => $body,
        }
    };
}

impl<'a> Weight<'a> {
    /// A `(rows, cols)` view; the data must hold exactly `rows·cols` elements.
    pub fn new(data: Data<'a>, rows: usize, cols: usize) -> Result<Self, Error> {
        let w = Weight { data, rows, cols };
        if w.len() != rows * cols {
            return Err(Error::Shape { what: "weight", expected: rows * cols, got: w.len() });
        }
        Ok(w)
    }

    /// An error unless the view is `(rows, cols)`.
    pub fn expect_shape(&self, what: &'static str, rows: usize, cols: usize) -> Result<(), Error> {
        if self.rows != rows || self.cols != cols {
            return Err(Error::Shape { what, expected: rows * cols, got: self.rows * self.cols });
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        with_slice!(self.data, s => s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::Bf16(_) => DType::Bf16,
            Data::F16(_) => DType::F16,
        }
    }

    /// Element `i` of the flat data, as f32 (0 when out of range).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        with_slice!(self.data, s => s.get(i).map_or(0.0, |v| v.f32()))
    }

    /// Copies elements `start..start+out.len()` into `out` as f32.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        with_slice!(self.data, s => {
            for (o, v) in out.iter_mut().zip(s.iter().skip(start)) {
                *o = v.f32();
            }
        })
    }

    /// `x[i] *= s · w[offset + i]` (one dtype dispatch for the whole slice, so it vectorises).
    #[inline]
    pub fn scale_into(&self, offset: usize, s: f32, x: &mut [f32]) {
        with_slice!(self.data, w => {
            for (v, wv) in x.iter_mut().zip(w.iter().skip(offset)) {
                *v *= s * wv.f32();
            }
        })
    }

    /// Row `r` as f32 into `out` (cols).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let n = self.cols.min(out.len());
        self.read(r * self.cols, &mut out[..n]);
    }
}

/// `out (t, w.rows) = x (t, w.cols) · wᵀ`, split over the executor by blocks of output rows.
pub fn matmul(ex: &dyn Exec, x: &[f32], t: usize, w: &Weight, out: &mut [f32]) -> Result<(), Error> {
    let (rows, k) = (w.rows, w.cols);
    crate::error::need("matmul input", x.len(), t * k)?;
    crate::error::need("matmul output", out.len(), t * rows)?;
    crate::error::need("matmul weight", w.len(), rows * k)?;
    let work = t * rows * k;
    let tasks = if work < 1 << 16 { 1 } else { (ex.threads() * 4).min(rows.div_ceil(16)).max(1) };
    let per = rows.div_ceil(tasks).next_multiple_of(4);
    let simd = ex.simd();
    let shared = Shared::new(&mut out[..t * rows]);
    let task = |i: usize| {
        let (o0, o1) = (i * per, ((i + 1) * per).min(rows));
        if o0 < o1 {
            // SAFETY: sizes checked above; each task writes only columns o0..o1 of the output.
            with_slice!(w.data, s => unsafe {
                gemm_raw(simd, t, o1 - o0, k, x.as_ptr(), k, s.as_ptr().add(o0 * k), k, shared.ptr().add(o0), rows, false)
            });
        }
    };
    if tasks == 1 {
        task(0);
    } else {
        ex.for_each(tasks, &task);
    }
    Ok(())
}

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]` for `i < m, j < n, l < k`: the one product
/// every family is built from (both operands contiguous along the reduction). `acc` adds to `c`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt<E: Kernel>(
    simd: Simd,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[E],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) -> Result<(), Error> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    crate::error::need("gemm a", a.len(), (m - 1) * lda + k)?;
    crate::error::need("gemm b", b.len(), (n - 1) * ldb + k)?;
    crate::error::need("gemm c", c.len(), (m - 1) * ldc + n)?;
    // SAFETY: every index the kernel touches is within the lengths checked above.
    unsafe { gemm_raw(simd, m, n, k, a.as_ptr(), lda, b.as_ptr(), ldb, c.as_mut_ptr(), ldc, acc) };
    Ok(())
}

/// [`gemm_nt`] on raw pointers, for outputs that parallel tasks share by disjoint columns.
///
/// # Safety
/// `a`, `b` and `c` must be valid for the strided extents `gemm_nt` checks, and no other thread
/// may touch the elements of `c` this call writes.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw<E: Kernel>(
    simd: Simd,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const E,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY (both): the host reported these features at run time.
        Simd::Avx512 | Simd::Avx2 if m == 1 => return avx2::gemv(n, k, a, b, ldb, c, acc),
        Simd::Avx512 => return avx2::gemm_wide(m, n, k, a, lda, b, ldb, c, ldc, acc),
        Simd::Avx2 => return avx2::gemm(m, n, k, a, lda, b, ldb, c, ldc, acc),
        Simd::Portable => {}
    }
    let _ = simd;
    for i in 0..m {
        let ar = core::slice::from_raw_parts(a.add(i * lda), k);
        for j in 0..n {
            let v = dot(ar, core::slice::from_raw_parts(b.add(j * ldb), k));
            let dst = &mut *c.add(i * ldc + j);
            *dst = if acc { *dst + v } else { v };
        }
    }
}

/// A dot product with eight partial sums (so it vectorises and rounds like a blocked kernel).
#[inline]
pub fn dot<E: Elem>(x: &[f32], w: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let n = x.len().min(w.len());
    let (xc, xt) = x[..n].split_at(n / 8 * 8);
    let (wc, wt) = w[..n].split_at(n / 8 * 8);
    for (a, b) in xc.chunks_exact(8).zip(wc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += a[l] * b[l].f32();
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in xt.iter().zip(wt) {
        s += a * b.f32();
    }
    s
}

#[cfg(not(target_arch = "x86_64"))]
pub trait Kernel: Elem {}
#[cfg(not(target_arch = "x86_64"))]
impl<E: Elem> Kernel for E {}
#[cfg(target_arch = "x86_64")]
pub use avx2::Kernel;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Register-tiled x86 kernels: AVX2/FMA with 4 tokens × 2 weight rows per tile in 8 lanes, and
    //! AVX-512 with 4 × 4 in 16 lanes; weights widened to f32 on load (bf16 by a shift, f16 by F16C).
    use super::Elem;
    use core::arch::x86_64::*;
    use half::{bf16, f16};

    pub trait Kernel: Elem {
        /// Eight consecutive elements as f32.
        ///
        /// # Safety
        /// `p..p+8` must be readable; the CPU must have AVX2 and F16C.
        unsafe fn load8(p: *const Self) -> __m256;
        /// Sixteen consecutive elements as f32.
        ///
        /// # Safety
        /// `p..p+16` must be readable; the CPU must have AVX-512F.
        unsafe fn load16(p: *const Self) -> __m512;
    }
    impl Kernel for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
    }
    impl Kernel for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const bf16) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> __m512 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    }
    impl Kernel for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Rows of `a` per block: a block of `a` (64 × k f32) stays in L2 while every row of `b`
    /// streams past it once, two rows at a time from L1.
    const TB: usize = 64;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm<E: Kernel>(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const E,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        let mut i0 = 0;
        while i0 < m {
            let i1 = (i0 + TB).min(m);
            let mut j = 0;
            while j < n {
                let two = j + 2 <= n;
                let mut i = i0;
                while i < i1 {
                    let (ap, bp, cp) = (a.add(i * lda), b.add(j * ldb), c.add(i * ldc + j));
                    let args = (ap, lda, bp, ldb, k, cp, ldc, acc);
                    match ((i1 - i).min(4), two) {
                        (4, true) => tile::<4, 2, E>(args),
                        (3, true) => tile::<3, 2, E>(args),
                        (2, true) => tile::<2, 2, E>(args),
                        (1, true) => tile::<1, 2, E>(args),
                        (4, false) => tile::<4, 1, E>(args),
                        (3, false) => tile::<3, 1, E>(args),
                        (2, false) => tile::<2, 1, E>(args),
                        _ => tile::<1, 1, E>(args),
                    }
                    i += 4;
                }
                j += if two { 2 } else { 1 };
            }
            i0 = i1;
        }
    }

    /// [`gemm`] with up to 4 rows of `b` per tile in 16-lane registers: AVX-512 gives 32 of them,
    /// enough for a 4 × 4 block of accumulators, so each load of `a` feeds four FMAs instead of two.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_wide<E: Kernel>(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const E,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        let mut i0 = 0;
        while i0 < m {
            let i1 = (i0 + TB).min(m);
            let mut j = 0;
            while j < n {
                let nr = (n - j).min(4);
                let mut i = i0;
                while i < i1 {
                    let (ap, bp, cp) = (a.add(i * lda), b.add(j * ldb), c.add(i * ldc + j));
                    let args = (ap, lda, bp, ldb, k, cp, ldc, acc);
                    match ((i1 - i).min(4), nr) {
                        (4, 4) => tile_z::<4, 4, E>(args),
                        (3, 4) => tile_z::<3, 4, E>(args),
                        (2, 4) => tile_z::<2, 4, E>(args),
                        (1, 4) => tile_z::<1, 4, E>(args),
                        (4, 3) => tile_z::<4, 3, E>(args),
                        (4, 2) => tile_z::<4, 2, E>(args),
                        (4, _) => tile_z::<4, 1, E>(args),
                        (mt, nr) => {
                            for r in 0..nr {
                                let args = (ap, lda, bp.add(r * ldb), ldb, k, cp.add(r), ldc, acc);
                                match mt {
                                    3 => tile_z::<3, 1, E>(args),
                                    2 => tile_z::<2, 1, E>(args),
                                    _ => tile_z::<1, 1, E>(args),
                                }
                            }
                        }
                    }
                    i += 4;
                }
                j += nr;
            }
            i0 = i1;
        }
    }

    type TileArgs<E> = (*const f32, usize, *const E, usize, usize, *mut f32, usize, bool);

    /// `c[j] (+)= a · b_j` for one row of `a` (a token step's GEMV): each row of `b` in one
    /// sequential pass with four partial sums, so the weights stream from memory front to back.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemv<E: Kernel>(n: usize, k: usize, a: *const f32, b: *const E, ldb: usize, c: *mut f32, acc: bool) {
        let k32 = k / 32 * 32;
        let kv = k / 8 * 8;
        for j in 0..n {
            let bp = b.add(j * ldb);
            let mut s = [_mm256_setzero_ps(); 4];
            let mut l = 0;
            while l < k32 {
                for (u, su) in s.iter_mut().enumerate() {
                    let o = l + 8 * u;
                    *su = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(o)), E::load8(bp.add(o)), *su);
                }
                l += 32;
            }
            while l < kv {
                s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(l)), E::load8(bp.add(l)), s[0]);
                l += 8;
            }
            let mut t = hsum(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
            for l in kv..k {
                t += *a.add(l) * (*bp.add(l)).f32();
            }
            let dst = c.add(j);
            *dst = if acc { *dst + t } else { t };
        }
    }

    /// A register of f32 lanes: 8 (AVX2) or 16 (AVX-512), so one tile body serves both widths.
    trait Lanes: Copy {
        const N: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn load_w<E: Kernel>(p: *const E) -> Self;
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
        unsafe fn sum(self) -> f32;
    }
    impl Lanes for __m256 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_w<E: Kernel>(p: *const E) -> Self {
            E::load8(p)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            hsum(self)
        }
    }
    impl Lanes for __m512 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_w<E: Kernel>(p: *const E) -> Self {
            E::load16(p)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(a, b, c)
        }
        /// In a fixed, written-out order (high half onto low, then [`hsum`]), so a dot product's
        /// rounding never hangs on how a reduction intrinsic is lowered.
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self)));
            hsum(_mm256_add_ps(_mm512_castps512_ps256(self), hi))
        }
    }

    /// An `MT × NR` block of `c` from `MT` rows of `a` and `NR` rows of `b`, 8 lanes (AVX2).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const MT: usize, const NR: usize, E: Kernel>(args: TileArgs<E>) {
        tile_in::<__m256, MT, NR, E>(args)
    }

    /// [`tile`] in 16 lanes: half the instructions per FMA (Zen 4 issues a 512-bit FMA as one op),
    /// 0.88× the wall time of the 8-lane tile on 130m `logits`, 0.74× on `bench --preset 370m` (paired).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    #[inline]
    unsafe fn tile_z<const MT: usize, const NR: usize, E: Kernel>(args: TileArgs<E>) {
        tile_in::<__m512, MT, NR, E>(args)
    }

    /// The tile's body: dot products of `V::N` lanes, then a scalar tail over `k mod V::N`. Inlined
    /// into [`tile`] or [`tile_z`], whose target features decide the instructions.
    #[inline(always)]
    unsafe fn tile_in<V: Lanes, const MT: usize, const NR: usize, E: Kernel>(
        (xp, lda, wp, ldb, k, cp, ldc, acc): TileArgs<E>,
    ) {
        let mut sums = [[V::zero(); NR]; MT];
        let kv = k / V::N * V::N;
        let mut l = 0;
        while l < kv {
            let mut wv = [V::zero(); NR];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = V::load_w(wp.add(r * ldb + l));
            }
            for (i, row) in sums.iter_mut().enumerate() {
                let xv = V::load(xp.add(i * lda + l));
                for (r, s) in row.iter_mut().enumerate() {
                    *s = V::fma(xv, wv[r], *s);
                }
            }
            l += V::N;
        }
        for (i, row) in sums.iter().enumerate() {
            for (r, v) in row.iter().enumerate() {
                let mut s = v.sum();
                for j in kv..k {
                    s += *xp.add(i * lda + j) * (*wp.add(r * ldb + j)).f32();
                }
                let dst = cp.add(i * ldc + r);
                *dst = if acc { *dst + s } else { s };
            }
        }
    }
}
