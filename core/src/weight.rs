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
    let work = t * rows * k;
    let tasks = if work < 1 << 16 { 1 } else { (ex.threads() * 4).min(rows.div_ceil(16)).max(1) };
    let per = rows.div_ceil(tasks).next_multiple_of(4);
    let simd = ex.simd();
    let shared = Shared::new(&mut out[..t * rows]);
    let task = |i: usize| {
        let (o0, o1) = (i * per, ((i + 1) * per).min(rows));
        if o0 < o1 {
            with_slice!(w.data, s => block(simd, x, t, k, s, o0, o1, &shared, rows));
        }
    };
    if tasks == 1 {
        task(0);
    } else {
        ex.for_each(tasks, &task);
    }
    Ok(())
}

/// Output rows `o0..o1` of `out (nt, ld) = x (nt, k) · wᵀ`.
fn block<E: Kernel>(
    simd: Simd,
    x: &[f32],
    nt: usize,
    k: usize,
    w: &[E],
    o0: usize,
    o1: usize,
    out: &Shared,
    ld: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 {
        // SAFETY: the host reported AVX2 + FMA + F16C at run time.
        unsafe { avx2::block(x, nt, k, w, o0, o1, out, ld) };
        return;
    }
    let _ = simd;
    for t in 0..nt {
        let xr = &x[t * k..(t + 1) * k];
        // SAFETY: each task owns output rows o0..o1 of every token; ranges never overlap.
        let orow = unsafe { out.range(t * ld + o0, o1 - o0) };
        for (o, dst) in (o0..o1).zip(orow.iter_mut()) {
            *dst = dot(xr, &w[o * k..(o + 1) * k]);
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
    //! A register-tiled AVX2/FMA kernel: 4 tokens × 2 weight rows per tile, 8 lanes, weights
    //! widened to f32 on load (bf16 by a shift, f16 by F16C).
    use super::{Elem, Shared};
    use core::arch::x86_64::*;
    use half::{bf16, f16};

    pub trait Kernel: Elem {
        /// Eight consecutive elements as f32.
        ///
        /// # Safety
        /// `p..p+8` must be readable; the CPU must have AVX2 and F16C.
        unsafe fn load8(p: *const Self) -> __m256;
    }
    impl Kernel for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }
    impl Kernel for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const bf16) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
    impl Kernel for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block<E: Kernel>(
        x: &[f32],
        nt: usize,
        k: usize,
        w: &[E],
        o0: usize,
        o1: usize,
        out: &Shared,
        ld: usize,
    ) {
        let mut t = 0;
        while t < nt {
            match nt - t {
                1 => rows::<1, E>(x, t, k, w, o0, o1, out, ld),
                2 => rows::<2, E>(x, t, k, w, o0, o1, out, ld),
                3 => rows::<3, E>(x, t, k, w, o0, o1, out, ld),
                _ => rows::<4, E>(x, t, k, w, o0, o1, out, ld),
            }
            t += 4;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<const MT: usize, E: Kernel>(
        x: &[f32],
        t: usize,
        k: usize,
        w: &[E],
        o0: usize,
        o1: usize,
        out: &Shared,
        ld: usize,
    ) {
        let mut o = o0;
        while o + 2 <= o1 {
            tile::<MT, 2, E>(x, t, k, w, o, out, ld);
            o += 2;
        }
        if o < o1 {
            tile::<MT, 1, E>(x, t, k, w, o, out, ld);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const MT: usize, const NR: usize, E: Kernel>(
        x: &[f32],
        t: usize,
        k: usize,
        w: &[E],
        o: usize,
        out: &Shared,
        ld: usize,
    ) {
        let xp = x.as_ptr().add(t * k);
        let wp = w.as_ptr().add(o * k);
        let mut acc = [[_mm256_setzero_ps(); NR]; MT];
        let kv = k / 8 * 8;
        let mut i = 0;
        while i < kv {
            let mut wv = [_mm256_setzero_ps(); NR];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = E::load8(wp.add(r * k + i));
            }
            for (a, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(a * k + i));
                for (r, c) in row.iter_mut().enumerate() {
                    *c = _mm256_fmadd_ps(xv, wv[r], *c);
                }
            }
            i += 8;
        }
        for (a, row) in acc.iter().enumerate() {
            for (r, c) in row.iter().enumerate() {
                let mut s = hsum(*c);
                for j in kv..k {
                    s += *xp.add(a * k + j) * (*wp.add(r * k + j)).f32();
                }
                // SAFETY: this task owns output rows o..o+NR for its tokens.
                out.range((t + a) * ld + o + r, 1)[0] = s;
            }
        }
    }
}
