//! AVX-512 f32 product for many activation rows: `c (+)= a · bᵀ` as outer products of broadcast
//! activations with a packed weight panel (the BLAS micro-kernel), instead of the dot-product
//! tiles of [`super::avx2::gemm_wide`].
//!
//! Per [`KC`] slice of the reduction, [`NP`] weight rows are widened to f32 and transposed once into
//! a panel in the caller's [`Panels`] (`KC × NP` f32, 48 KiB), then every [`MR`] activation rows
//! sweep it: each step loads [`NV`] panel vectors and broadcasts `MR` activations into `MR · NV` FMAs. The dot-product
//! tiles spend a zero-extend and a shift per weight vector on the FMA ports and 16 horizontal sums
//! per tile; here neither happens in the loop (the widening is paid once per panel and `MR` rows).
//!
//! The shape (8 × 48 tiles, 256-column slices) was the fastest of those timed on a Xeon
//! (`examples/gemm_sweep.rs`: 120–140 GFLOP/s a core against 76–94 for the dot-product tiles;
//! 12 × 32 and 6 × 64 tiles, and 128-column slices, were slower).
//!
//! Each output is summed in order along the reduction, carried in `c` from one slice to the next
//! (f32 stores and loads, exact), so its error is the sequential sum's.
use super::avx2::Kernel;
use super::{Panels, PANEL_BYTES};
use core::arch::x86_64::*;

/// Reduction columns per panel.
pub const KC: usize = 256;
/// Activation rows per micro-tile: `MR · NV` = 24 accumulators of the 32 registers.
pub const MR: usize = 8;
// `gemm`'s tail arms run 1..MR − 1 rows.
const _: () = assert!(MR == 8);
/// 16-lane vectors of weight rows per panel.
pub const NV: usize = 3;
/// Weight rows (outputs) per panel.
pub const NP: usize = 16 * NV;
// The panel, in the caller's [`Panels`] (64-byte aligned).
const _: () = assert!(KC * NP * 4 <= PANEL_BYTES);
/// Fewest activation rows worth a packed panel; fewer run the dot-product tiles.
pub const MIN_M: usize = 16;

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]`, as [`super::gemm_raw`].
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AVX2, FMA, F16C and AVX-512F/VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
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
    panels: &mut Panels,
) {
    if k == 0 {
        if !acc {
            super::clear(m, n, c, ldc);
        }
        return;
    }
    let panel = panels.as_mut_ptr() as *mut f32;
    let mut j0 = 0;
    while j0 < n {
        let nw = (n - j0).min(NP);
        let masks: [__mmask16; NV] = core::array::from_fn(|v| {
            let lanes = nw.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let mut k0 = 0;
        while k0 < k {
            let kc = (k - k0).min(KC);
            pack(b.add(j0 * ldb + k0), ldb, nw, kc, panel);
            let tile = Tile { lda, panel, kc, ldc, masks, load_c: acc || k0 > 0 };
            let (ap, cp) = (a.add(k0), c.add(j0));
            // A narrower last panel sweeps only the vectors it fills.
            match nw.div_ceil(16) {
                1 => sweep::<1>(m, &tile, ap, cp),
                2 => sweep::<2>(m, &tile, ap, cp),
                _ => sweep::<NV>(m, &tile, ap, cp),
            }
            k0 += kc;
        }
        j0 += NP;
    }
}

/// Every [`MR`]-row micro-tile of one panel, `V` of its vectors wide.
#[inline(always)]
unsafe fn sweep<const V: usize>(m: usize, tile: &Tile, a: *const f32, c: *mut f32) {
    let mut i = 0;
    while i < m {
        let (ap, cp) = (a.add(i * tile.lda), c.add(i * tile.ldc));
        match (m - i).min(MR) {
            1 => micro::<1, V>(tile, ap, cp),
            2 => micro::<2, V>(tile, ap, cp),
            3 => micro::<3, V>(tile, ap, cp),
            4 => micro::<4, V>(tile, ap, cp),
            5 => micro::<5, V>(tile, ap, cp),
            6 => micro::<6, V>(tile, ap, cp),
            7 => micro::<7, V>(tile, ap, cp),
            _ => micro::<MR, V>(tile, ap, cp),
        }
        i += MR;
    }
}

/// What every micro-tile of one panel shares.
struct Tile {
    lda: usize,
    /// `kc × NP` f32, row `l` holding column `l` of the panel's weight rows.
    panel: *const f32,
    kc: usize,
    ldc: usize,
    /// Which of each vector's 16 outputs exist (the last panel may be narrower).
    masks: [__mmask16; NV],
    /// Add to what `c` holds (an accumulating call, or a later slice).
    load_c: bool,
}

/// Panel `[l·NP + jj] = b[jj·ldb + l]` widened to f32, for `jj < nw`, `l < kc`; zero for `nw ≤ jj`
/// up to the next 16 (the vectors past that are not read):
/// 16 rows × 16 columns at a time, widened on load and transposed in registers.
#[inline(always)]
unsafe fn pack<E: Kernel>(b: *const E, ldb: usize, nw: usize, kc: usize, out: *mut f32) {
    let k16 = kc / 16 * 16;
    for r0 in (0..nw.div_ceil(16) * 16).step_by(16) {
        let mut l = 0;
        while l < k16 {
            let mut r: [__m512; 16] = core::array::from_fn(|q| {
                if r0 + q < nw {
                    E::load16(b.add((r0 + q) * ldb + l))
                } else {
                    _mm512_setzero_ps()
                }
            });
            transpose16(&mut r);
            for (q, &col) in r.iter().enumerate() {
                _mm512_storeu_ps(out.add((l + q) * NP + r0), col);
            }
            l += 16;
        }
        for l in k16..kc {
            for q in 0..16 {
                *out.add(l * NP + r0 + q) = if r0 + q < nw { (*b.add((r0 + q) * ldb + l)).f32() } else { 0.0 };
            }
        }
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

/// `R` rows of `c` (at `cp`, `16·V` wide under the masks) from `R` rows of `a` (at `ap`) and the
/// panel's first `V` vectors: `R · V` accumulators, one broadcast per row and `V` panel loads per step.
#[inline(always)]
unsafe fn micro<const R: usize, const V: usize>(t: &Tile, ap: *const f32, cp: *mut f32) {
    let mut s = [[_mm512_setzero_ps(); V]; R];
    if t.load_c {
        for (i, row) in s.iter_mut().enumerate() {
            for (v, sv) in row.iter_mut().enumerate() {
                *sv = _mm512_maskz_loadu_ps(t.masks[v], cp.add(i * t.ldc + 16 * v));
            }
        }
    }
    for l in 0..t.kc {
        let bv: [__m512; V] = core::array::from_fn(|v| _mm512_loadu_ps(t.panel.add(l * NP + 16 * v)));
        for (i, row) in s.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(i * t.lda + l));
            for (sv, &b) in row.iter_mut().zip(&bv) {
                *sv = _mm512_fmadd_ps(av, b, *sv);
            }
        }
    }
    for (i, row) in s.iter().enumerate() {
        for (v, &sv) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(cp.add(i * t.ldc + 16 * v), t.masks[v], sv);
        }
    }
}
