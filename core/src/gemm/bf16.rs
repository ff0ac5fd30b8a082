//! AVX512-BF16 kernel for bf16-stored weights: `c (+)= a · bᵀ` with `vdpbf16ps`, which adds to each
//! f32 lane the products of two consecutive bf16 pairs. A weight row `b_j` (K contiguous, as the
//! checkpoint stores it) is already in that pair layout, so the weights are read in place, never
//! copied; only the f32 activations are converted, per call, into the caller's [`Panels`]:
//!
//! - [`MatmulMode::Exact`]: `x = hi + lo` with `hi = bf16(x)`, `lo = bf16(x − hi)` (both round to
//!   nearest even), and `c += dp(hi, w) + dp(lo, w)` in f32. bf16 × bf16 products are exact in f32,
//!   so the only loss beyond f32 accumulation is `x − hi − lo`, at most 2⁻⁸·|x − hi| ≤ 2⁻¹⁶·|x|
//!   (bf16's unit roundoff is 2⁻⁸, applied twice).
//! - [`MatmulMode::Fast`]: `hi` alone, `|x − hi| ≤ 2⁻⁸·|x|`.
//!
//! Blocking: `TB` rows of `a` × `KC` columns at a time are split into the buffer (zero-padded to
//! a multiple of 32), then every group of up to 4 weight rows meets every group of up to 4 of
//! those rows (16 accumulators); a K tail loads the weights under a mask, so nothing past a row is
//! read. Partial sums of a K block are added into `c` (fast mode, with no lo half to hold, takes
//! blocks of `2·KC` columns). One activation row (a token step) takes K
//! in blocks of `TB · KC` columns instead, so each weight row streams whole, with the GEMVs'
//! software prefetch.
//!
//! [`MatmulMode::Exact`]: crate::exec::MatmulMode::Exact
//! [`MatmulMode::Fast`]: crate::exec::MatmulMode::Fast
use super::{Panels, Product, PANEL_BYTES};
use crate::exec::MatmulMode;
use core::arch::x86_64::*;
use half::bf16;

/// Rows of `a` per block: each weight row streams past them once per block.
const TB: usize = 64;
/// Columns (reduction) per block: hi + lo of a `TB × KC` block is 96 KiB of [`Panels`], and the 4 weight
/// rows of a tile (3 KiB) stay in L1 while the block's rows go by.
const KC: usize = 384;
// hi then lo, in the caller's [`Panels`] (fast mode: hi alone, `TB × 2·KC`).
const _: () = assert!(2 * TB * KC * 2 <= PANEL_BYTES);

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]`, as [`super::gemm_raw`].
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX-512F/BW/VL and AVX512-BF16.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn gemm(p: Product<bf16>, mode: MatmulMode, panels: &mut Panels) {
    let Product { m, n, k, a, lda, b, ldb, c, ldc, acc } = p;
    let fast = mode == MatmulMode::Fast;
    if k == 0 {
        if !acc {
            super::clear(m, n, c, ldc);
        }
        return;
    }
    let hi = panels.as_mut_ptr() as *mut u16;
    // Fast mode has no lo half: its hi panel takes the whole buffer, twice `KC` columns a block
    // (half the blocks, so half the tiles' final reductions); `lo` is then never read.
    let (lo, kc_block) = if fast { (hi, 2 * KC) } else { (hi.add(TB * KC), KC) };
    // One activation row (a token step) streams each weight row whole, once, with the GEMVs'
    // software prefetch: by `KC`-column blocks it swept every row once per block, four 768-byte
    // pieces at a time, which the hardware prefetcher followed badly (Mamba-2 130m decode under
    // `--fast-matmul`: 14.1 ms/token against 10.4–12.0 for the default f32 GEMV).
    let stream = m == 1;
    let kmax = if stream { TB * KC } else { kc_block };
    let prefetch = if stream { super::prefetch() } else { super::Prefetch::Off };
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + TB).min(m);
        let mut l0 = 0;
        while l0 < k {
            let kc = (k - l0).min(kmax);
            let kp = kc.next_multiple_of(32);
            for i in i0..i1 {
                let o = (i - i0) * kp;
                split_row(a.add(i * lda + l0), kc, kp, hi.add(o), lo.add(o), fast);
            }
            // The first K block stores (or adds, under `acc`); later ones add.
            let add = acc || l0 > 0;
            let mut j = 0;
            while j < n {
                let nr = (n - j).min(4);
                let bp = b.add(j * ldb + l0) as *const u16;
                let mut i = i0;
                while i < i1 {
                    let o = (i - i0) * kp;
                    let args = Block {
                        hi: hi.add(o) as *const u16,
                        lo: lo.add(o) as *const u16,
                        kp,
                        w: bp,
                        ldb,
                        kc,
                        c: c.add(i * ldc + j),
                        ldc,
                        add,
                        prefetch,
                    };
                    let mt = (i1 - i).min(4);
                    if fast {
                        tiles::<true>(mt, nr, args);
                    } else {
                        tiles::<false>(mt, nr, args);
                    }
                    i += 4;
                }
                j += nr;
            }
            l0 += kc;
        }
        i0 = i1;
    }
}

/// One tile's operands: split activation rows against weight rows, over one K block.
#[derive(Clone, Copy)]
struct Block {
    /// The rows' bf16 hi and lo halves, `kp` apart (zero-padded to `kp`, a multiple of 32).
    hi: *const u16,
    lo: *const u16,
    kp: usize,
    /// The weight rows (bf16 bits), `ldb` apart, at this block's first column.
    w: *const u16,
    ldb: usize,
    /// Columns in the block.
    kc: usize,
    c: *mut f32,
    ldc: usize,
    /// Add to what `c` holds.
    add: bool,
    /// How to ask for the weights ahead (one activation row: the weights stream; else `Off`).
    prefetch: super::Prefetch,
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn tiles<const FAST: bool>(mt: usize, nr: usize, args: Block) {
    match (mt, nr) {
        (4, 4) => tile::<4, 4, FAST>(args),
        (4, 3) => tile::<4, 3, FAST>(args),
        (4, 2) => tile::<4, 2, FAST>(args),
        (4, _) => tile::<4, 1, FAST>(args),
        (3, 4) => tile::<3, 4, FAST>(args),
        (3, 3) => tile::<3, 3, FAST>(args),
        (3, 2) => tile::<3, 2, FAST>(args),
        (3, _) => tile::<3, 1, FAST>(args),
        (2, 4) => tile::<2, 4, FAST>(args),
        (2, 3) => tile::<2, 3, FAST>(args),
        (2, 2) => tile::<2, 2, FAST>(args),
        (2, _) => tile::<2, 1, FAST>(args),
        (_, 4) => tile::<1, 4, FAST>(args),
        (_, 3) => tile::<1, 3, FAST>(args),
        (_, 2) => tile::<1, 2, FAST>(args),
        _ => tile::<1, 1, FAST>(args),
    }
}

/// Splits `kc` activations into bf16 hi (and, unless `fast`, lo), zero-padded to `kp`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn split_row(x: *const f32, kc: usize, kp: usize, hi: *mut u16, lo: *mut u16, fast: bool) {
    let mut l = 0;
    while l < kp {
        // Lanes past kc load as 0, so the padding is bf16 zero in hi and lo.
        let left = kc.saturating_sub(l);
        let (m0, m1) = (mask16(left), mask16(left.saturating_sub(16)));
        let x0 = _mm512_maskz_loadu_ps(m0, x.add(l));
        let x1 = _mm512_maskz_loadu_ps(m1, x.add(l + 16));
        let (h, w) = split32(x0, x1, fast);
        _mm512_storeu_si512(hi.add(l) as *mut _, h);
        if !fast {
            _mm512_storeu_si512(lo.add(l) as *mut _, w);
        }
        l += 32;
    }
}

/// 32 activations (`x0` then `x1`) as 32 bf16 hi and, unless `fast` (then zero), 32 bf16 lo =
/// bf16(x − hi), rounded to nearest even by `vcvtne2ps2bf16`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
pub(super) unsafe fn split32(x0: __m512, x1: __m512, fast: bool) -> (__m512i, __m512i) {
    // Lanes 0..16 from the second operand.
    let hi_i = cast_i(_mm512_cvtne2ps_pbh(x1, x0));
    if fast {
        return (hi_i, _mm512_setzero_si512());
    }
    let h0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi_i))));
    let h1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(hi_i))));
    // x − hi is exact in f32; an infinite x leaves NaN there, which must not poison the
    // sum (hi carries the infinity), so NaN → 0 (a NaN x is NaN in hi already).
    let (d0, d1) = (_mm512_sub_ps(x0, h0), _mm512_sub_ps(x1, h1));
    let d0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(d0, d0), d0);
    let d1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(d1, d1), d1);
    (hi_i, cast_i(_mm512_cvtne2ps_pbh(d1, d0)))
}

/// `hi[i] = bf16(x[i])`, `lo[i] = bf16(x[i] − hi[i])` for `i < x.len()` (shorter `hi` / `lo`: up
/// to the shortest): f32 values split as [`gemm`] splits its activations, `|x − hi − lo| ≤
/// 2⁻¹⁶·|x|` (a denormal `x` reads as zero) — the form f32 weights would take on the bf16 tiles
/// (`gemm_sweep amx-f32`).
///
/// # Safety
/// The CPU must have AVX-512F/BW/VL and AVX512-BF16.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn split_values(x: &[f32], hi: &mut [bf16], lo: &mut [bf16]) {
    let n = x.len().min(hi.len()).min(lo.len());
    let (x, hp, lp) = (x.as_ptr(), hi.as_mut_ptr() as *mut u16, lo.as_mut_ptr() as *mut u16);
    let mut l = 0;
    while l < n {
        let left = n - l;
        let (m0, m1) = (mask16(left), mask16(left.saturating_sub(16)));
        let x0 = _mm512_maskz_loadu_ps(m0, x.add(l));
        let x1 = _mm512_maskz_loadu_ps(m1, x.add(l + 16));
        let (h, w) = split32(x0, x1, false);
        let keep = if left >= 32 { u32::MAX } else { (1u32 << left) - 1 };
        _mm512_mask_storeu_epi16(hp.add(l) as *mut _, keep, h);
        _mm512_mask_storeu_epi16(lp.add(l) as *mut _, keep, w);
        l += 32;
    }
}

#[inline(always)]
pub(super) fn mask16(left: usize) -> __mmask16 {
    if left >= 16 {
        0xffff
    } else {
        ((1u32 << left) - 1) as __mmask16
    }
}

#[inline(always)]
unsafe fn cast_i(v: __m512bh) -> __m512i {
    core::mem::transmute(v)
}

#[inline(always)]
unsafe fn cast_bh(v: __m512i) -> __m512bh {
    core::mem::transmute(v)
}

/// An `MT × NR` block of `c`: `MT` split activation rows against `NR` weight rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn tile<const MT: usize, const NR: usize, const FAST: bool>(b: Block) {
    let Block { hi, lo, kp, w, ldb, kc, c, ldc, add, prefetch } = b;
    let mut s = [[_mm512_setzero_ps(); NR]; MT];
    let full = kc / 32 * 32;
    let mut wv = [cast_bh(_mm512_setzero_si512()); NR];
    let mut l = 0;
    while l < full {
        if prefetch != super::Prefetch::Off {
            for r in 0..NR {
                super::prefetch_ahead(w.add(r * ldb + l) as *const u8, 64, prefetch);
            }
        }
        for (r, v) in wv.iter_mut().enumerate() {
            *v = cast_bh(_mm512_loadu_si512(w.add(r * ldb + l) as *const _));
        }
        step::<MT, NR, FAST>(&mut s, &wv, hi.add(l), lo.add(l), kp);
        l += 32;
    }
    if l < kc {
        // The K tail: weights past the row load as 0 (and the activations there are 0).
        let mask = ((1u64 << (kc - l)) - 1) as __mmask32;
        for (r, v) in wv.iter_mut().enumerate() {
            *v = cast_bh(_mm512_maskz_loadu_epi16(mask, w.add(r * ldb + l) as *const i16));
        }
        step::<MT, NR, FAST>(&mut s, &wv, hi.add(l), lo.add(l), kp);
    }
    // The `NR` sums of a row are `NR` consecutive outputs: reduced together, stored under a mask.
    let keep = ((1u32 << NR) - 1) as __mmask8;
    for (i, row) in s.iter().enumerate() {
        let mut four = [_mm512_setzero_ps(); 4];
        four[..NR].copy_from_slice(row);
        let sums = hsum4(&four);
        let dst = c.add(i * ldc);
        let sums = if add { _mm_add_ps(_mm_maskz_loadu_ps(keep, dst), sums) } else { sums };
        _mm_mask_storeu_ps(dst, keep, sums);
    }
}

/// `[hsum(v[0]), hsum(v[1]), hsum(v[2]), hsum(v[3])]`, bit for bit (the same additions in the
/// same pairs), with the four vectors' halves and quarters shuffled side by side: a tile's sixteen
/// one-vector reductions were about a third of its instructions over a 384-column block.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn hsum4(v: &[__m512; 4]) -> __m128 {
    // Each vector's quarters Q0 + Q2 and Q1 + Q3 (its 256-bit halves added), two vectors a register.
    let h01 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(v[0], v[1]), _mm512_shuffle_f32x4::<0xEE>(v[0], v[1]));
    let h23 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(v[2], v[3]), _mm512_shuffle_f32x4::<0xEE>(v[2], v[3]));
    // Quarter r: vector r's (Q0 + Q2) + (Q1 + Q3).
    let q = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(h01, h23), _mm512_shuffle_f32x4::<0xDD>(h01, h23));
    // In each quarter, lane 0: (q0 + q2) + (q1 + q3), as `hsum`'s movehl and movehdup steps.
    let q = _mm512_add_ps(q, _mm512_permute_ps::<0xEE>(q));
    let q = _mm512_add_ps(q, _mm512_movehdup_ps(q));
    _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), q))
}

/// One 32-wide step of K: every activation row's hi (and lo) against the loaded weight rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn step<const MT: usize, const NR: usize, const FAST: bool>(
    s: &mut [[__m512; NR]; MT],
    wv: &[__m512bh; NR],
    hi: *const u16,
    lo: *const u16,
    kp: usize,
) {
    for (i, row) in s.iter_mut().enumerate() {
        let h = cast_bh(_mm512_loadu_si512(hi.add(i * kp) as *const _));
        for (r, v) in row.iter_mut().enumerate() {
            *v = _mm512_dpbf16_ps(*v, h, wv[r]);
        }
        if !FAST {
            let lv = cast_bh(_mm512_loadu_si512(lo.add(i * kp) as *const _));
            for (r, v) in row.iter_mut().enumerate() {
                *v = _mm512_dpbf16_ps(*v, lv, wv[r]);
            }
        }
    }
}

/// The 16 lanes in a fixed, written-out order (halves onto halves): what [`hsum4`] does for four
/// vectors at once, one at a time (its reference).
#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn hsum(v: __m512) -> f32 {
    let h =
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// [`hsum4`] is four [`hsum`]s bit for bit: lanes of mixed signs and magnitudes 2⁻⁴⁰…2⁴⁰,
    /// where any other order of the additions rounds differently.
    #[test]
    fn four_reductions_at_once_are_four_one_at_a_time() {
        if !(std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512bw")) {
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let lanes: Vec<f32> = (0..64)
                .map(|_| {
                    let r = next();
                    let m = (r >> 11) as f32 / (1u64 << 53) as f32 + 0.5;
                    let e = ((r >> 3) % 81) as i32 - 40;
                    if r & 1 == 0 {
                        m * 2f32.powi(e)
                    } else {
                        -m * 2f32.powi(e)
                    }
                })
                .collect();
            // SAFETY: AVX512-BF16 checked above; 64 lanes read as four vectors.
            unsafe {
                let v: [__m512; 4] = core::array::from_fn(|i| _mm512_loadu_ps(lanes[16 * i..].as_ptr()));
                let mut got = [0f32; 4];
                _mm_storeu_ps(got.as_mut_ptr(), hsum4(&v));
                for (i, g) in got.iter().enumerate() {
                    assert_eq!(g.to_bits(), hsum(v[i]).to_bits(), "vector {i} of {lanes:?}");
                }
            }
        }
    }

    /// [`split_values`] against the scalar definition (round to nearest even, lo of the exact
    /// difference; an infinity's lo 0; a denormal read as zero) at every length around the
    /// 32-value steps, writing nothing past the values.
    #[test]
    fn split_values_is_the_scalar_split() {
        if !(std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512bw")) {
            return;
        }
        for n in 0..100 {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1.37e-3 - 0.61).collect();
            if n > 5 {
                x[1] = f32::INFINITY;
                x[4] = -3.0e38;
                x[5] = 1.0e-40;
            }
            let mut hi = std::vec![bf16::from_bits(0x7777); n + 3];
            let mut lo = hi.clone();
            unsafe { split_values(&x, &mut hi, &mut lo) };
            for (i, &v) in x.iter().enumerate() {
                // `vcvtne2ps2bf16` reads a denormal as zero.
                let v = if v.is_subnormal() { 0.0 } else { v };
                let h = bf16::from_f32(v);
                let d = v - h.to_f32();
                let l = bf16::from_f32(if d.is_nan() { 0.0 } else { d });
                assert_eq!((hi[i].to_bits(), lo[i].to_bits()), (h.to_bits(), l.to_bits()), "n {n}, x[{i}] = {v}");
            }
            assert!(hi[n..].iter().chain(&lo[n..]).all(|b| b.to_bits() == 0x7777), "n {n}: wrote past the values");
        }
    }
}
