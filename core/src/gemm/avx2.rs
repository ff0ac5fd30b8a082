//! Register-tiled x86 kernels: AVX2/FMA with 4 tokens × 2 weight rows per tile in 8 lanes, and
//! AVX-512 with 4 × 4 in 16 lanes; weights widened to f32 on load (bf16 by a shift, f16 by F16C).
//! Products of [`super::outer::MIN_M`] rows or more take [`super::outer`]'s panels instead; the
//! one-row GEMVs of a token step live here too.
use super::Product;
use crate::weight::Elem;
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

/// `c (+)= a · bᵀ` in 8-lane tiles of 4 rows of `a` × 2 rows of `b`.
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm<E: Kernel>(p: Product<E>) {
    let (m, n) = (p.m, p.n);
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + TB).min(m);
        let mut j = 0;
        while j < n {
            let two = j + 2 <= n;
            let mut i = i0;
            while i < i1 {
                let mt = (i1 - i).min(4);
                let args = p.part(i, j, mt, if two { 2 } else { 1 });
                match (mt, two) {
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
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX2, FMA, F16C and AVX-512F/VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn gemm_wide<E: Kernel>(p: Product<E>) {
    let (m, n) = (p.m, p.n);
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + TB).min(m);
        let mut j = 0;
        while j < n {
            let nr = (n - j).min(4);
            let mut i = i0;
            while i < i1 {
                let mt = (i1 - i).min(4);
                let args = p.part(i, j, mt, nr);
                match (mt, nr) {
                    (4, 4) => tile_z::<4, 4, E>(args),
                    (3, 4) => tile_z::<3, 4, E>(args),
                    (2, 4) => tile_z::<2, 4, E>(args),
                    (1, 4) => tile_z::<1, 4, E>(args),
                    (4, 3) => tile_z::<4, 3, E>(args),
                    (4, 2) => tile_z::<4, 2, E>(args),
                    (4, _) => tile_z::<4, 1, E>(args),
                    (mt, nr) => {
                        for r in 0..nr {
                            let args = p.part(i, j + r, mt, 1);
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

/// `c[j] (+)= a · b_j` for one row of `a` (a token step's GEMV): each row of `b` in one
/// sequential pass with four partial sums, so the weights stream from memory front to back.
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv<E: Kernel>(p: Product<E>) {
    let Product { n, k, a, b, ldb, c, acc, .. } = p;
    let k32 = k / 32 * 32;
    let kv = k / 8 * 8;
    let hint = super::prefetch();
    for j in 0..n {
        let bp = b.add(j * ldb);
        let mut s = [_mm256_setzero_ps(); 4];
        let mut l = 0;
        while l < k32 {
            prefetch_ahead(bp.add(l), hint);
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

/// How far ahead of the weights being multiplied a GEMV asks for them. The hardware prefetcher
/// alone left a token step at 60–70 % of the read bandwidth; 16 KiB ahead of each stream took the
/// Mamba-2 130m bf16 step from 19.5 to 10–12 ms/token (2-core Xeon, 2026-12-05; 2 KiB: 15 ms).
pub const PREFETCH_BYTES: usize = 16 << 10;

/// Asks for the cache lines of the 32 weights `PREFETCH_BYTES` past `p` ([`super::prefetch_ahead`]).
#[inline(always)]
fn prefetch_ahead<E>(p: *const E, hint: super::Prefetch) {
    super::prefetch_ahead(p as *const u8, 32 * core::mem::size_of::<E>(), hint);
}

/// [`gemv`] four weight rows at a time (AVX-512 VL: 32 ymm registers hold the 16 partial sums):
/// four streams from memory at once instead of one, each row summed exactly as [`gemv`] sums it
/// (the same partial sums in the same order), so the results are bit for bit the same.
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX2, FMA, F16C and AVX-512F/VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn gemv_rows4<E: Kernel>(p: Product<E>) {
    let Product { n, k, a, b, ldb, c, acc, .. } = p;
    let k32 = k / 32 * 32;
    let kv = k / 8 * 8;
    let n4 = n / 4 * 4;
    let hint = super::prefetch();
    let mut j = 0;
    while j < n4 {
        let bp = [b.add(j * ldb), b.add((j + 1) * ldb), b.add((j + 2) * ldb), b.add((j + 3) * ldb)];
        let mut s = [[_mm256_setzero_ps(); 4]; 4];
        let mut l = 0;
        while l < k32 {
            for row in bp {
                prefetch_ahead(row.add(l), hint);
            }
            for u in 0..4 {
                let o = l + 8 * u;
                let x = _mm256_loadu_ps(a.add(o));
                for (r, sr) in s.iter_mut().enumerate() {
                    sr[u] = _mm256_fmadd_ps(x, E::load8(bp[r].add(o)), sr[u]);
                }
            }
            l += 32;
        }
        while l < kv {
            let x = _mm256_loadu_ps(a.add(l));
            for (r, sr) in s.iter_mut().enumerate() {
                sr[0] = _mm256_fmadd_ps(x, E::load8(bp[r].add(l)), sr[0]);
            }
            l += 8;
        }
        for (r, sr) in s.iter().enumerate() {
            let mut t = hsum(_mm256_add_ps(_mm256_add_ps(sr[0], sr[1]), _mm256_add_ps(sr[2], sr[3])));
            for l in kv..k {
                t += *a.add(l) * (*bp[r].add(l)).f32();
            }
            let dst = c.add(j + r);
            *dst = if acc { *dst + t } else { t };
        }
        j += 4;
    }
    if j < n {
        gemv(p.part(0, j, 1, n - j));
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
unsafe fn tile<const MT: usize, const NR: usize, E: Kernel>(args: Product<E>) {
    tile_in::<__m256, MT, NR, E>(args)
}

/// [`tile`] in 16 lanes: half the instructions per FMA (Zen 4 issues a 512-bit FMA as one op),
/// 0.88× the wall time of the 8-lane tile on 130m `logits`, 0.74× on `bench --preset 370m` (paired).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
#[inline]
unsafe fn tile_z<const MT: usize, const NR: usize, E: Kernel>(args: Product<E>) {
    tile_in::<__m512, MT, NR, E>(args)
}

/// The tile's body: dot products of `V::N` lanes, then a scalar tail over `k mod V::N`. Inlined
/// into [`tile`] or [`tile_z`], whose target features decide the instructions.
#[inline(always)]
unsafe fn tile_in<V: Lanes, const MT: usize, const NR: usize, E: Kernel>(p: Product<E>) {
    let Product { k, a: xp, lda, b: wp, ldb, c: cp, ldc, acc, .. } = p;
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
