//! The f32 product for many activation rows, `c (+)= a · bᵀ`, as outer products of broadcast
//! activations with a packed weight panel (the BLAS micro-kernel), written once for 16 lanes
//! (AVX-512: [`gemm_avx512`]) and 8 (AVX2: [`gemm_avx2`]), instead of the dot-product tiles of
//! [`super::avx2`].
//!
//! Per [`KC`] slice of the reduction, `NP = W · NV` weight rows are widened to f32 and transposed
//! once into a panel in the caller's [`Panels`] (`KC × NP` f32), then every `MR` activation rows
//! sweep it: each step loads `NV` panel vectors and broadcasts `MR` activations into `MR · NV`
//! FMAs. The dot-product tiles spend a widening per weight vector on the FMA ports and horizontal
//! sums per tile; here neither happens in the loop (the widening is paid once per panel and `MR`
//! rows).
//!
//! Shapes, timed with `examples/gemm_sweep.rs`: AVX-512 8 × 48 (24 of the 32 registers; on a Xeon
//! 120–140 GFLOP/s a core against 76–94 for the dot-product tiles, 129–154 since the prefetch below,
//! of ≈ 175 its FMA units issue alone, `gemm_sweep peak`; 12 × 32 and 6 × 64 tiles, and
//! 128-column slices, were slower); AVX2 6 × 16 (12 of the 16 registers, the panel 16 KiB; on the
//! same Xeon's 256-bit units 1.12–1.53× the GFLOP/s of the 4 × 2 dot-product tiles; 4 × 24 ran out
//! of registers).
//!
//! Each output is summed in order along the reduction, carried in `c` from one slice to the next
//! (f32 stores and loads, exact), so its error is the sequential sum's.
use super::avx2::Kernel;
use super::{Panels, Product, PANEL_BYTES};
use crate::lanes::{Avx2, Avx512, Lanes};
use core::arch::x86_64::*;

/// Reduction columns per panel.
pub const KC: usize = 256;
/// Fewest activation rows worth a packed panel; fewer run the dot-product tiles.
pub const MIN_M: usize = super::OUTER_MIN_ROWS;
/// Activation rows per AVX-512 micro-tile: `8 · 3` = 24 accumulators of the 32 registers.
pub const MR_AVX512: usize = 8;
/// 16-lane vectors of weight rows per AVX-512 panel.
pub const NV_AVX512: usize = 3;
/// Activation rows per AVX2 micro-tile: `6 · 2` = 12 accumulators of the 16 registers.
pub const MR_AVX2: usize = 6;
/// 8-lane vectors of weight rows per AVX2 panel.
pub const NV_AVX2: usize = 2;
/// Most vectors a panel has.
const MAX_NV: usize = 3;
/// Weight rows (outputs) per panel: the task split of [`super::matmul`] keeps whole panels.
pub const NP_AVX512: usize = 16 * NV_AVX512;
/// Weight rows per AVX2 panel.
pub const NP_AVX2: usize = 8 * NV_AVX2;
// The panels, in the caller's [`Panels`] (64-byte aligned); the micro-tiles' row arms go to 8.
const _: () = assert!(KC * NP_AVX512 * 4 <= PANEL_BYTES && KC * NP_AVX2 * 4 <= PANEL_BYTES);
const _: () = assert!(MR_AVX512 <= 8 && MR_AVX2 <= 8 && NV_AVX512 <= MAX_NV && NV_AVX2 <= MAX_NV);

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]`, as [`super::gemm_raw`], in 16 lanes.
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX2, FMA, F16C and AVX-512F/VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn gemm_avx512<E: Kernel>(p: Product<E>, panels: &mut Panels) {
    gemm::<Avx512, E, MR_AVX512, NV_AVX512, false>(p, panels)
}

/// [`gemm_avx512`] in 8 lanes.
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_avx2<E: Kernel>(p: Product<E>, panels: &mut Panels) {
    gemm::<Avx2, E, MR_AVX2, NV_AVX2, false>(p, panels)
}

/// [`gemm_avx512`] with the weight stored `[k, n]`: `c[i·ldc + j] (+)= Σ_l a[i·lda + l] ·
/// b[l·ldb + j]` (the RWKV LoRAs' `[in, out]` matrices). Its panels are the weight's rows as they
/// lie, widened, so only the packing differs.
///
/// # Safety
/// As [`gemm_avx512`], with `b` readable at `l·ldb + j` for `l < k`, `j < n`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn gemm_nn_avx512<E: Kernel>(p: Product<E>, panels: &mut Panels) {
    gemm::<Avx512, E, MR_AVX512, NV_AVX512, true>(p, panels)
}

/// [`gemm_nn_avx512`] in 8 lanes.
///
/// # Safety
/// As [`gemm_avx2`], with `b` as [`gemm_nn_avx512`] reads it.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_nn_avx2<E: Kernel>(p: Product<E>, panels: &mut Panels) {
    gemm::<Avx2, E, MR_AVX2, NV_AVX2, true>(p, panels)
}

/// A vector width that can pack a panel: `W` weight rows × `W` columns at a time, widened on load
/// and transposed in registers.
trait Panel: Lanes {
    /// Panel rows `l < W` from `b`'s columns `l`: `out[l·np + q] = b[q·ldb + l]` widened to f32 for
    /// `q < rows`, zero for `rows ≤ q < W`.
    ///
    /// # Safety
    /// `b` readable for `rows` rows of `W`, `out` writable for `W` rows of `np`; the lanes' features.
    unsafe fn pack_block<E: Kernel>(b: *const E, ldb: usize, rows: usize, out: *mut f32, np: usize);
    /// `out[q] = b[q]` widened to f32 for `q < W`.
    ///
    /// # Safety
    /// `b` readable for `W` elements, `out` writable for `W`; the lanes' features.
    unsafe fn copy_widened<E: Kernel>(b: *const E, out: *mut f32);
}

/// Panel `[l·np + jj] = b[jj·ldb + l]` widened to f32, for `jj < nw`, `l < kc`; zero for `nw ≤ jj`
/// up to the next `W` (the vectors past that are not read).
#[inline(always)]
unsafe fn pack<L: Panel, E: Kernel>(b: *const E, ldb: usize, nw: usize, kc: usize, out: *mut f32, np: usize) {
    let kw = kc / L::W * L::W;
    for r0 in (0..nw.div_ceil(L::W) * L::W).step_by(L::W) {
        let rows = (nw - r0).min(L::W);
        for l in (0..kw).step_by(L::W) {
            L::pack_block(b.add(r0 * ldb + l), ldb, rows, out.add(l * np + r0), np);
        }
        // A `kc` that is not a whole number of blocks: the last columns one at a time.
        for l in kw..kc {
            for q in 0..L::W {
                *out.add(l * np + r0 + q) = if q < rows { (*b.add((r0 + q) * ldb + l)).f32() } else { 0.0 };
            }
        }
    }
}

/// Panel `[l·np + jj] = b[l·ldb + jj]` widened to f32 (a `[k, n]` weight's rows are the panel's),
/// for `jj < nw`, `l < kc`; zero for `nw ≤ jj` up to the next `W`.
#[inline(always)]
unsafe fn pack_rows<L: Panel, E: Kernel>(b: *const E, ldb: usize, nw: usize, kc: usize, out: *mut f32, np: usize) {
    let full = nw / L::W * L::W;
    for l in 0..kc {
        let (src, dst) = (b.add(l * ldb), out.add(l * np));
        for jj in (0..full).step_by(L::W) {
            L::copy_widened(src.add(jj), dst.add(jj));
        }
        for jj in full..nw.next_multiple_of(L::W) {
            *dst.add(jj) = if jj < nw { (*src.add(jj)).f32() } else { 0.0 };
        }
    }
}

/// The kernel; `NN`: the weight stored `[k, n]` ([`gemm_nn_avx512`]), else `[n, k]`.
#[inline(always)]
unsafe fn gemm<L: Panel, E: Kernel, const MR: usize, const NV: usize, const NN: bool>(
    p: Product<E>,
    panels: &mut Panels,
) {
    let Product { m, n, k, a, lda, b, ldb, c, ldc, acc } = p;
    if k == 0 {
        if !acc {
            super::clear(m, n, c, ldc);
        }
        return;
    }
    let np = L::W * NV;
    let panel = panels.as_mut_ptr() as *mut f32;
    let rows_ahead = L::W > 8 || super::prefetch() == super::Prefetch::L1;
    let mut j0 = 0;
    while j0 < n {
        let nw = (n - j0).min(np);
        let mut masks = [L::all(); MAX_NV];
        for (v, mask) in masks.iter_mut().enumerate().take(NV) {
            let lanes = nw.saturating_sub(L::W * v).min(L::W);
            if lanes < L::W {
                *mask = L::first(lanes);
            }
        }
        let mut k0 = 0;
        while k0 < k {
            let kc = (k - k0).min(KC);
            if NN {
                pack_rows::<L, E>(b.add(k0 * ldb + j0), ldb, nw, kc, panel, np);
            } else {
                pack::<L, E>(b.add(j0 * ldb + k0), ldb, nw, kc, panel, np);
            }
            let tile = Tile { lda, panel, np, kc, ldc, masks, load_c: acc || k0 > 0, rows_ahead };
            let (ap, cp) = (a.add(k0), c.add(j0));
            // A narrower last panel sweeps only the vectors it fills.
            match nw.div_ceil(L::W) {
                1 => sweep::<L, MR, 1>(m, &tile, ap, cp),
                2 => sweep::<L, MR, 2>(m, &tile, ap, cp),
                _ => sweep::<L, MR, NV>(m, &tile, ap, cp),
            }
            k0 += kc;
        }
        j0 += np;
    }
}

/// Every `MR`-row micro-tile of one panel, `V` of its vectors wide.
#[inline(always)]
unsafe fn sweep<L: Lanes, const MR: usize, const V: usize>(m: usize, tile: &Tile<L>, a: *const f32, c: *mut f32) {
    let mut i = 0;
    while i < m {
        let (ap, cp) = (a.add(i * tile.lda), c.add(i * tile.ldc));
        // A last tile of fewer than `MR` rows takes its own arm (those of `MR` rows and more never run).
        match (m - i).min(MR) {
            // Chosen per tile, not tested in the loop: a test in every step gave most of the gain
            // back (Zen 3, Mamba-2 370m: 1.12× the wall time of no prefetch at all). A last,
            // shorter tile has no next one to ask for.
            r if r == MR && tile.rows_ahead => micro::<L, MR, V, true>(tile, ap, cp),
            r if r == MR => micro::<L, MR, V, false>(tile, ap, cp),
            1 => micro::<L, 1, V, false>(tile, ap, cp),
            2 => micro::<L, 2, V, false>(tile, ap, cp),
            3 => micro::<L, 3, V, false>(tile, ap, cp),
            4 => micro::<L, 4, V, false>(tile, ap, cp),
            5 => micro::<L, 5, V, false>(tile, ap, cp),
            6 => micro::<L, 6, V, false>(tile, ap, cp),
            _ => micro::<L, 7, V, false>(tile, ap, cp),
        }
        i += MR;
    }
}

/// What every micro-tile of one panel shares.
struct Tile<L: Lanes> {
    lda: usize,
    /// `kc × np` f32, row `l` holding column `l` of the panel's weight rows.
    panel: *const f32,
    np: usize,
    kc: usize,
    ldc: usize,
    /// Which of each vector's outputs exist (the last panel may be narrower).
    masks: [L::Mask; MAX_NV],
    /// Add to what `c` holds (an accumulating call, or a later slice).
    load_c: bool,
    /// Prefetch the next micro-tile's activation rows into L1 as this one goes: always in 16
    /// lanes; in 8 only under the [`super::Prefetch::L1`] hint (the Xeons'), not under the AMD
    /// default [`super::Prefetch::L2`] nor `Off`. On an AVX2-only Zen 3 EPYC (2026-12-07; L1D 32
    /// KiB, 8-way) whole `bench --decode 0` runs took 0.87× the wall time without it (Mamba-2 370m
    /// bf16, 5 pairs), 0.92× (RWKV-6 1.6B) and 0.95× (130m f32); prefetching into L2 instead was
    /// 1.24× slower than none.
    rows_ahead: bool,
}

/// `R` rows of `c` (at `cp`, `W·V` wide under the masks) from `R` rows of `a` (at `ap`) and the
/// panel's first `V` vectors: `R · V` accumulators, one broadcast per row and `V` panel loads per step;
/// `AHEAD`: asking for the next tile's rows as it goes ([`Tile::rows_ahead`]).
#[inline(always)]
unsafe fn micro<L: Lanes, const R: usize, const V: usize, const AHEAD: bool>(
    t: &Tile<L>,
    ap: *const f32,
    cp: *mut f32,
) {
    let mut s = [[L::zero(); V]; R];
    if t.load_c {
        for (i, row) in s.iter_mut().enumerate() {
            for (v, sv) in row.iter_mut().enumerate() {
                *sv = L::load(t.masks[v], cp.add(i * t.ldc + L::W * v));
            }
        }
    }
    // One pointer a row, opaque to LLVM, which otherwise reaches row i from row 0 by a chain of
    // adds in every step (eight integer operations beside the 24 FMAs of an AVX-512 step).
    let rows: [*const f32; R] = core::array::from_fn(|i| {
        let mut p = ap.add(i * t.lda);
        core::arch::asm!("/* {0} */", inout(reg) p, options(pure, readonly, nostack, preserves_flags));
        p
    });
    // The next micro-tile's rows, a line of each every 16 steps: it starts with them in L1 instead
    // of waiting for the hardware prefetcher to find eight new streams (1.00–1.06× the GFLOP/s at
    // the released shapes on a Xeon, AVX-512 and AVX2; a prefetch never faults, so past `a` is
    // harmless). Not on an AVX2 Zen 3 ([`Tile::rows_ahead`]).
    let ahead = R * t.lda;
    for l in 0..t.kc {
        if AHEAD && l % 16 == 0 {
            for &ar in &rows {
                _mm_prefetch::<_MM_HINT_T0>(ar.wrapping_add(ahead + l) as *const i8);
            }
        }
        let bv: [L; V] = core::array::from_fn(|v| L::load(L::all(), t.panel.add(l * t.np + L::W * v)));
        for (row, &ar) in s.iter_mut().zip(&rows) {
            let av = L::splat(*ar.add(l));
            for (sv, &b) in row.iter_mut().zip(&bv) {
                *sv = av.mul_add(b, *sv);
            }
        }
    }
    for (i, row) in s.iter().enumerate() {
        for (v, &sv) in row.iter().enumerate() {
            sv.store(t.masks[v], cp.add(i * t.ldc + L::W * v));
        }
    }
}

impl Panel for Avx512 {
    #[inline(always)]
    unsafe fn pack_block<E: Kernel>(b: *const E, ldb: usize, rows: usize, out: *mut f32, np: usize) {
        let mut r: [__m512; 16] =
            core::array::from_fn(|q| if q < rows { E::load16(b.add(q * ldb)) } else { _mm512_setzero_ps() });
        transpose16(&mut r);
        for (l, &col) in r.iter().enumerate() {
            _mm512_storeu_ps(out.add(l * np), col);
        }
    }
    #[inline(always)]
    unsafe fn copy_widened<E: Kernel>(b: *const E, out: *mut f32) {
        _mm512_storeu_ps(out, E::load16(b));
    }
}

impl Panel for Avx2 {
    #[inline(always)]
    unsafe fn pack_block<E: Kernel>(b: *const E, ldb: usize, rows: usize, out: *mut f32, np: usize) {
        let mut r: [__m256; 8] =
            core::array::from_fn(|q| if q < rows { E::load8(b.add(q * ldb)) } else { _mm256_setzero_ps() });
        crate::ops::transpose8(&mut r);
        for (l, &col) in r.iter().enumerate() {
            _mm256_storeu_ps(out.add(l * np), col);
        }
    }
    #[inline(always)]
    unsafe fn copy_widened<E: Kernel>(b: *const E, out: *mut f32) {
        _mm256_storeu_ps(out, E::load8(b));
    }
}

/// `r[i][j] ← r[j][i]` for a 16 × 16 block: pairs of rows interleaved by 32 then 64 bits (within
/// each 128-bit lane), then the 128-bit lanes of each group of four exchanged.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + c], lane L: column 4L + c of rows 4g..4g+3.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let pd = |x: __m512| _mm512_castps_pd(x);
        let (a, b, c, d) = (pd(t[4 * g]), pd(t[4 * g + 1]), pd(t[4 * g + 2]), pd(t[4 * g + 3]));
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    // Column 4L + c = lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
        r[c] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        r[4 + c] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
        r[8 + c] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
    }
}
