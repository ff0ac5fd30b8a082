//! One vector of f32 lanes, AVX-512 (16) or AVX2 (8), for the kernels written once for both, and
//! the blocked scan of a matrix state that the delta-rule families (DeltaNet / Gated DeltaNet,
//! RWKV-7) share: blocks of [`ROWS`] state rows taken through [`TOKENS`] tokens at a time, so the
//! rows and the block's inputs stay in L1 and four rows' dot products interleave. Every `Lanes`
//! method is `#[inline(always)]` and only sound in a function compiled with the lanes' target
//! features ([`scan_avx512`], [`scan_avx2`]); `load` and `store` take a lane mask so a row's last
//! partial chunk is read and written in place.
#![cfg(target_arch = "x86_64")]

use crate::exec::Shared;
use crate::forget::WindowAt;
use core::arch::x86_64::*;
use core::ops::Range;

/// State rows updated together.
pub(crate) const ROWS: usize = 4;
/// Tokens a block of rows takes before the next block: their inputs (Gated DeltaNet's q̂ and k̂,
/// 2 · 16 · K f32, 32 KiB at K = 256) stay in L1 beside the rows.
pub(crate) const TOKENS: usize = 16;

/// One family's update of a block of state rows.
pub(crate) trait RowBlock: Sync {
    /// The state's rows.
    fn n_rows(&self) -> usize;
    /// Rows `i0..i0 + R` of the state `s` through `tokens`, writing their read-outs to `o` (none:
    /// a second state that only takes the tokens).
    ///
    /// # Safety
    /// The CPU has `L`'s target features, and the caller's function is compiled with them; `o`'s
    /// places for these rows and tokens are written by no one else.
    unsafe fn rows<L: Lanes, const R: usize>(&self, tokens: Range<usize>, s: &mut [f32], i0: usize, o: Option<&Shared>);
}

/// `tokens` through one state `s`, rows in blocks of [`ROWS`] (then one at a time), tokens in
/// blocks of [`TOKENS`].
#[inline(always)]
unsafe fn scan_one<L: Lanes, K: RowBlock>(k: &K, tokens: Range<usize>, s: &mut [f32], o: Option<&Shared>) {
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        let block = t0..tokens.end.min(t0 + TOKENS);
        let mut i = 0;
        while i + ROWS <= k.n_rows() {
            k.rows::<L, ROWS>(block.clone(), s, i, o);
            i += ROWS;
        }
        while i < k.n_rows() {
            k.rows::<L, 1>(block.clone(), s, i, o);
            i += 1;
        }
        t0 = block.end;
    }
}

/// The scan of `t` tokens from the state `sa`, read out into `o`. With a second state (two
/// staggered states, FAMILIES.md §9.3) both take every token, and after each token that completes
/// a multiple of `r` tokens `sa ← sb`, `sb ← 0`: the tokens between those points go through `sa`,
/// then through `sb`.
#[inline(always)]
unsafe fn scan<L: Lanes, K: RowBlock>(k: &K, t: usize, sa: &mut [f32], sb: Option<(WindowAt, &mut [f32])>, o: &Shared) {
    let Some((at, sb)) = sb else {
        return scan_one::<L, K>(k, 0..t, sa, Some(o));
    };
    let mut t0 = 0;
    while t0 < t {
        let t1 = t.min(t0 + at.r - (at.pos0 + t0) % at.r);
        scan_one::<L, K>(k, t0..t1, sa, Some(o));
        scan_one::<L, K>(k, t0..t1, sb, None);
        if (at.pos0 + t1).is_multiple_of(at.r) {
            sa.copy_from_slice(sb);
            sb.fill(0.0);
        }
        t0 = t1;
    }
}

/// [`scan`] with 16 lanes.
///
/// # Safety
/// As [`RowBlock::rows`]; the CPU has AVX-512F and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn scan_avx512<K: RowBlock>(
    k: &K,
    t: usize,
    sa: &mut [f32],
    sb: Option<(WindowAt, &mut [f32])>,
    o: &Shared,
) {
    scan::<Avx512, K>(k, t, sa, sb, o)
}

/// [`scan`] with 8 lanes.
///
/// # Safety
/// As [`RowBlock::rows`]; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn scan_avx2<K: RowBlock>(
    k: &K,
    t: usize,
    sa: &mut [f32],
    sb: Option<(WindowAt, &mut [f32])>,
    o: &Shared,
) {
    scan::<Avx2, K>(k, t, sa, sb, o)
}

/// A vector of `W` f32 lanes and the mask of a partial one.
pub(crate) trait Lanes: Copy {
    const W: usize;
    type Mask: Copy;
    /// Every lane.
    fn all() -> Self::Mask;
    /// The first `n < W` lanes.
    unsafe fn first(n: usize) -> Self::Mask;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// The masked lanes from `p` (the others zero and not read).
    unsafe fn load(m: Self::Mask, p: *const f32) -> Self;
    /// The masked lanes to `p` (the others not written).
    unsafe fn store(self, m: Self::Mask, p: *mut f32);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    /// `self·b + c`, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// `c − self·b`, rounded once.
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self;
    /// The sum of the lanes.
    unsafe fn sum(self) -> f32;
    unsafe fn sub(self, b: Self) -> Self;
    /// Each lane limited to `[lo, hi]`; NaN stays NaN.
    unsafe fn clamp(self, lo: f32, hi: f32) -> Self;
    /// `2ⁿ` from `t = n + 1.5·2²³` (n an integer in the normal exponents' range), through the bits.
    unsafe fn pow2_of_rounded(t: Self) -> Self;

    /// `eˣ` per lane: [`crate::ops::fast_exp`]'s range, reduction and polynomial, each step's
    /// multiply-add rounded once (FMA), so within a few ulp of `fast_exp`, not bit for bit.
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        use crate::ops::{EXP_MAX, EXP_MIN, EXP_POLY, EXP_ROUND, LN2_HI, LN2_LO};
        let x = self.clamp(EXP_MIN, EXP_MAX);
        let t = x.mul_add(Self::splat(core::f32::consts::LOG2_E), Self::splat(EXP_ROUND));
        let n = t.sub(Self::splat(EXP_ROUND));
        let r = n.neg_mul_add(Self::splat(LN2_HI), x);
        let r = n.neg_mul_add(Self::splat(LN2_LO), r);
        let mut p = Self::splat(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = p.mul_add(r, Self::splat(c));
        }
        let e = p.mul(r).mul_add(r, r).add(Self::splat(1.0));
        e.mul(Self::pow2_of_rounded(t))
    }
}

/// AVX-512F: 16 lanes.
#[derive(Clone, Copy)]
pub(crate) struct Avx512(__m512);

impl Lanes for Avx512 {
    const W: usize = 16;
    type Mask = __mmask16;
    #[inline(always)]
    fn all() -> __mmask16 {
        !0
    }
    #[inline(always)]
    unsafe fn first(n: usize) -> __mmask16 {
        (1u16 << n) - 1
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        Avx512(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Avx512(_mm512_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(m: __mmask16, p: *const f32) -> Self {
        Avx512(_mm512_maskz_loadu_ps(m, p))
    }
    #[inline(always)]
    unsafe fn store(self, m: __mmask16, p: *mut f32) {
        _mm512_mask_storeu_ps(p, m, self.0)
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Avx512(_mm512_add_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Avx512(_mm512_mul_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Avx512(_mm512_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self {
        Avx512(_mm512_fnmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Avx512(_mm512_sub_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: f32, hi: f32) -> Self {
        // max/min return their second operand when either is NaN: `self` goes second.
        Avx512(_mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), self.0)))
    }
    #[inline(always)]
    unsafe fn pow2_of_rounded(t: Self) -> Self {
        let n = _mm512_sub_epi32(_mm512_castps_si512(t.0), _mm512_set1_epi32(crate::ops::EXP_ROUND.to_bits() as i32));
        Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127)))))
    }
}

/// AVX2 + FMA: 8 lanes; the mask is a lane's sign bit.
#[derive(Clone, Copy)]
pub(crate) struct Avx2(__m256);

impl Lanes for Avx2 {
    const W: usize = 8;
    type Mask = Option<__m256i>;
    #[inline(always)]
    fn all() -> Option<__m256i> {
        None
    }
    #[inline(always)]
    unsafe fn first(n: usize) -> Option<__m256i> {
        Some(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        Avx2(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Avx2(_mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(m: Option<__m256i>, p: *const f32) -> Self {
        Avx2(match m {
            None => _mm256_loadu_ps(p),
            Some(m) => _mm256_maskload_ps(p, m),
        })
    }
    #[inline(always)]
    unsafe fn store(self, m: Option<__m256i>, p: *mut f32) {
        match m {
            None => _mm256_storeu_ps(p, self.0),
            Some(m) => _mm256_maskstore_ps(p, m, self.0),
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Avx2(_mm256_add_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Avx2(_mm256_mul_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Avx2(_mm256_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self {
        Avx2(_mm256_fnmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps(self.0, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Avx2(_mm256_sub_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: f32, hi: f32) -> Self {
        // max/min return their second operand when either is NaN: `self` goes second.
        Avx2(_mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), self.0)))
    }
    #[inline(always)]
    unsafe fn pow2_of_rounded(t: Self) -> Self {
        let n = _mm256_sub_epi32(_mm256_castps_si256(t.0), _mm256_set1_epi32(crate::ops::EXP_ROUND.to_bits() as i32));
        Avx2(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)))))
    }
}

/// `$body` for each `L::W`-lane chunk of a `$k`-long row, with `$c` its offset, `$m` its lanes and
/// `$second` true for every other one (so two accumulator chains alternate without indexing):
/// whole chunks in pairs, then the partial last chunk. A macro, not a closure: a closure does not
/// take its function's target features, and its intrinsics would not inline.
macro_rules! each_chunk {
    ($L:ty, $k:expr, |$c:ident, $m:ident, $second:ident| $body:block) => {{
        let k: usize = $k;
        let w = <$L as $crate::lanes::Lanes>::W;
        let full = k / w * w;
        let mut at = 0;
        while at < k {
            let ($c, $m, $second) = (at, <$L as $crate::lanes::Lanes>::all(), false);
            if at + 2 * w <= full {
                $body
                let ($c, $second) = (at + w, true);
                $body
                at += 2 * w;
            } else if at < full {
                $body
                at += w;
            } else {
                let ($m, $second) = (<$L as $crate::lanes::Lanes>::first(k - at), true);
                $body
                at = k;
            }
        }
    }};
}
pub(crate) use each_chunk;

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Lanes::exp`] over `x`, in place, a vector at a time.
    #[inline(always)]
    unsafe fn exp_all<L: Lanes>(x: &mut [f32]) {
        for c in x.chunks_mut(L::W) {
            let m = if c.len() == L::W { L::all() } else { L::first(c.len()) };
            L::load(m, c.as_ptr()).exp().store(m, c.as_mut_ptr());
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn exp_avx512(x: &mut [f32]) {
        exp_all::<Avx512>(x)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_avx2(x: &mut [f32]) {
        exp_all::<Avx2>(x)
    }

    /// The vector `exp` is `fast_exp` with FMA: within 2 ulp of it over the whole range (and of
    /// libm within 4e-7), clamped alike outside it, NaN stays NaN — at both widths.
    #[test]
    fn vector_exp_is_fast_exp_with_fma() {
        extern crate std;
        use std::vec::Vec;
        let mut xs: Vec<f32> = (0..200_000).map(|i| -100.0 + i as f32 * 0.001_003).collect();
        xs.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, -87.3, 88.7, 1e-30]);
        type ExpAll = unsafe fn(&mut [f32]);
        let mut runs: Vec<(&str, ExpAll)> = Vec::new();
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            runs.push(("avx2", exp_avx2));
        }
        if std::is_x86_feature_detected!("avx512f") {
            runs.push(("avx512", exp_avx512));
        }
        for (name, f) in runs {
            let mut got = xs.clone();
            // SAFETY: the CPU has the function's features (checked above).
            unsafe { f(&mut got) };
            for (&x, &g) in xs.iter().zip(&got) {
                let want = crate::ops::fast_exp(x);
                if want.is_nan() {
                    assert!(g.is_nan(), "{name}: exp({x}) = {g}");
                    continue;
                }
                let ulps = (g.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulps <= 2, "{name}: exp({x}) = {g}, fast_exp {want} ({ulps} ulp)");
                if (-87.0..88.0).contains(&x) {
                    let exact = libm::expf(x);
                    assert!(((g - exact) / exact).abs() < 4e-7, "{name}: exp({x}) = {g}, libm {exact}");
                }
            }
        }
    }
}
