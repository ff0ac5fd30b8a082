//! Elementwise and normalisation ops shared by the families (libm for exp/log: no `std`).
use crate::weight::Weight;

#[inline]
pub fn exp(x: f32) -> f32 {
    libm::expf(x)
}

/// `w` as the f32 pair (hi, lo) with hi + lo = w to ~48 bits: how a window keeps its log-decay sum
/// in an f32 state without the sum's rounding growing with the stream.
#[inline]
pub fn hi_lo(w: f64) -> (f32, f32) {
    let hi = w as f32;
    (hi, (w - hi as f64) as f32)
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

/// `max(x, lo)` with NaN kept, as torch's `clamp_min` / `relu` keep it: `f32::max` returns the
/// other operand for a NaN, which turned a NaN weight into a finite output with exit 0.
#[inline(always)]
pub fn clamp_min(x: f32, lo: f32) -> f32 {
    if x < lo {
        lo
    } else {
        x
    }
}

/// `max(x, 0)` with NaN kept (see [`clamp_min`]).
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    clamp_min(x, 0.0)
}

/// `log(1 + eˣ)`, returning `x` itself above 20 as torch does.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        libm::log1pf(libm::expf(x))
    }
}

/// Σ v², with eight partial sums.
#[inline]
pub fn sum_sq(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|x| x * x).sum::<f32>()
}

/// `out = x · rsqrt(mean(x²) + eps) · w[offset..]` (RMSNorm; `w` may be a slice of a longer vector).
#[inline]
pub fn rmsnorm(x: &[f32], w: &Weight, offset: usize, eps: f32, out: &mut [f32]) {
    let inv = 1.0 / libm::sqrtf(sum_sq(x) / x.len() as f32 + eps);
    let out = &mut out[..x.len()];
    out.copy_from_slice(x);
    w.scale_into(offset, inv, out);
}

/// RMSNorm in place.
#[inline]
pub fn rmsnorm_inplace(x: &mut [f32], w: &Weight, offset: usize, eps: f32) {
    let inv = 1.0 / libm::sqrtf(sum_sq(x) / x.len() as f32 + eps);
    w.scale_into(offset, inv, x);
}

/// `y += a·x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `x·y` over f32 slices.
#[inline]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    crate::gemm::dot(x, y)
}

/// [`fast_exp`]'s input range: below it the result would leave the normal floats.
pub(crate) const EXP_MIN: f32 = -87.3;
/// [`fast_exp`]'s input range: above it the result would overflow.
pub(crate) const EXP_MAX: f32 = 88.7;
/// 1.5·2²³: adding it to a float below 2²² rounds it to an integer, kept in the low mantissa bits.
pub(crate) const EXP_ROUND: f32 = 12_582_912.0;
/// ln 2 in two parts, `n·ln 2` subtracted in two steps (Cephes).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// The polynomial of `(eʳ − 1 − r) / r²` on |r| ≤ ln2/2, highest power first (Cephes `expf`).
pub(crate) const EXP_POLY: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `eˣ` in a branch-free form that vectorises (Cephes polynomial, ≈1 ulp on [−87, 88]).
/// Inputs below −87.3 give ~1e-38 instead of a smaller number; NaN stays NaN.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let t = x * core::f32::consts::LOG2_E + EXP_ROUND;
    let n = t - EXP_ROUND;
    // `t` is exactly ROUND + n, so its bits are ROUND's plus n: the integer without a float →
    // int conversion, whose saturating NaN handling kept this function from vectorising.
    let biased = t.to_bits().wrapping_sub(EXP_ROUND.to_bits()).wrapping_add(127);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(biased << 23)
}

/// `ln(1 + eˣ)` (torch's softplus) in a branch-free form that vectorises: `max(x, 0) +
/// log1p(e^{−|x|})`, the log1p as `2·atanh(s)`, `s = y / (2 + y) ≤ 1/3`, its odd series to s¹⁵
/// (the next term is below 2⁻²⁹ relative), through [`fast_exp`]. NaN stays NaN.
#[inline(always)]
pub fn fast_softplus(x: f32) -> f32 {
    let y = fast_exp(-x.abs());
    x.max(0.0) + two_atanh(y / (2.0 + y))
}

/// `2·atanh(s) = ln((1 + s)/(1 − s))` for |s| ≤ 1/3: the odd series to s¹⁵.
#[inline(always)]
fn two_atanh(s: f32) -> f32 {
    let s2 = s * s;
    let mut p = 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    2.0 * s * (1.0 + s2 * p)
}

/// `ln x` in a branch-free form that vectorises: `x = 2ᵉ·m` through the bits (subnormals scaled
/// by 2²⁵ first) with m in [√½, √2), `ln m = 2·atanh((m − 1)/(m + 1))` by `two_atanh` (|s| ≤
/// 0.172: the next term is below 2⁻⁴⁴ relative), plus `e·ln 2` in two parts. 0 gives −∞, +∞ gives
/// +∞, negatives and NaN give NaN.
#[inline(always)]
pub fn fast_ln(x: f32) -> f32 {
    const SUB_SCALE: f32 = 33_554_432.0; // 2²⁵
    let sub = x < f32::MIN_POSITIVE;
    let bits = if sub { x * SUB_SCALE } else { x }.to_bits();
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    let big = m > core::f32::consts::SQRT_2;
    let m = if big { 0.5 * m } else { m };
    let e = ((bits >> 23) & 0xff) as i32 - 127 + big as i32 - if sub { 25 } else { 0 };
    let e = e as f32;
    let ln = e * LN2_HI + (two_atanh((m - 1.0) / (m + 1.0)) + e * LN2_LO);
    if x > 0.0 && x < f32::INFINITY {
        ln
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        x
    } else {
        f32::NAN
    }
}

/// `x[i] = f(x[i])`, compiled for AVX2 + FMA when `simd` says so (a loop of [`fast_exp`] or
/// [`fast_softplus`] then runs 8 lanes at a time, not the baseline's 4).
#[inline]
pub fn map_in_place(simd: crate::exec::Simd, x: &mut [f32], f: impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &mut [f32], f: impl Fn(f32) -> f32) {
            x.iter_mut().for_each(|v| *v = f(*v));
        }
        // SAFETY: the host reported AVX2 and FMA at run time.
        return unsafe { avx2(x, f) };
    }
    let _ = simd;
    x.iter_mut().for_each(|v| *v = f(*v));
}

/// `x[i] = f(x[i], y[i])` over the shorter of the two, compiled as [`map_in_place`] is (a gate
/// `silu(g) · u` then runs 8 lanes at a time).
#[inline]
pub fn zip_in_place(simd: crate::exec::Simd, x: &mut [f32], y: &[f32], f: impl Fn(f32, f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &mut [f32], y: &[f32], f: impl Fn(f32, f32) -> f32) {
            x.iter_mut().zip(y).for_each(|(v, &w)| *v = f(*v, w));
        }
        // SAFETY: the host reported AVX2 and FMA at run time.
        return unsafe { avx2(x, y, f) };
    }
    let _ = simd;
    x.iter_mut().zip(y).for_each(|(v, &w)| *v = f(*v, w));
}

/// `σ(x) = 1 / (1 + e⁻ˣ)` through [`fast_exp`] (vectorises; 0 below x ≈ −88.7, NaN stays NaN).
#[inline(always)]
pub fn fast_sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `x·σ(x)` through [`fast_exp`].
#[inline(always)]
pub fn fast_silu(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

/// `log Σ eˣ`, shifted by the max. On AVX-512 and AVX2 the exponentials are `crate::lanes`'
/// (`Lanes::exp`, FMA) summed in two vectors of partial sums; the portable level keeps eight
/// scalar partial sums of [`fast_exp`]. (The LM head's log-softmax of every position: 2–2.5 % of a
/// scoring profile in 8-lane `fast_exp`.)
pub fn log_sum_exp(simd: crate::exec::Simd, x: &[f32]) -> f32 {
    #[inline(always)]
    fn max(x: &[f32]) -> f32 {
        let mut mx = [f32::NEG_INFINITY; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for l in 0..16 {
                mx[l] = mx[l].max(c[l]);
            }
        }
        chunks.remainder().iter().chain(&mx).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
    #[inline(always)]
    fn sum_exp(x: &[f32], m: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                acc[l] += fast_exp(c[l] - m);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - m)).sum();
        acc.iter().sum::<f32>() + tail
    }
    /// Σ e^(x − m) in `L`'s vectors: two partial sums a vector each, the last `< W` values scalar.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sum_exp_lanes<L: crate::lanes::Lanes>(x: &[f32], m: f32) -> f32 {
        let (p, n, mv) = (x.as_ptr(), x.len(), L::splat(m));
        let mut acc = [L::zero(); 2];
        let mut i = 0;
        while i + 2 * L::W <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = a.add(L::load(L::all(), p.add(i + u * L::W)).sub(mv).exp());
            }
            i += 2 * L::W;
        }
        if i + L::W <= n {
            acc[0] = acc[0].add(L::load(L::all(), p.add(i)).sub(mv).exp());
            i += L::W;
        }
        let tail: f32 = x[i..].iter().map(|&v| fast_exp(v - m)).sum();
        acc[0].add(acc[1]).sum() + tail
    }
    /// `m + ln Σ e^(x − m)`, `m` the max, the sum by `sum_exp` (a max of ±∞ or NaN is the result).
    #[inline(always)]
    fn shifted(x: &[f32], sum_exp: impl Fn(&[f32], f32) -> f32) -> f32 {
        let m = max(x);
        if !m.is_finite() {
            return m;
        }
        m + libm::logf(sum_exp(x, m))
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(x: &[f32]) -> f32 {
            shifted(x, |x, m| unsafe { sum_exp_lanes::<crate::lanes::Avx512>(x, m) })
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32]) -> f32 {
            shifted(x, |x, m| unsafe { sum_exp_lanes::<crate::lanes::Avx2>(x, m) })
        }
        // SAFETY (both): the host reported these features at run time.
        if simd.has_avx512() {
            return unsafe { avx512(x) };
        }
        if simd.has_avx2() {
            return unsafe { avx2(x) };
        }
    }
    let _ = simd;
    shifted(x, sum_exp)
}

/// The causal depthwise conv of Mamba-1 and Mamba-2, then SiLU: `u[t, c] = silu(bias[c] +
/// Σ_j w[c, j]·in[t − (k−1) + j])` over `u (t, C)`, where token τ's input is `x[τ·ldx..][..C]` and
/// the inputs before the call come from `state` (k−1 rows of C, oldest first); then `state` keeps
/// the last k−1 inputs. Token-major, so every step is a contiguous axpy over channels; `wt (k, C)`
/// is scratch for the weight transposed. Each row is compiled for AVX2 where the executor allows
/// (the sums in the same order, so bit for bit the same).
#[allow(clippy::too_many_arguments)]
pub fn causal_conv_silu(
    ex: &dyn crate::exec::Exec,
    w: &Weight,
    bias: Option<&Weight>,
    t: usize,
    x: &[f32],
    ldx: usize,
    state: &mut [f32],
    wt: &mut [f32],
    u: &mut [f32],
) {
    let (ch, k) = (w.rows, w.cols);
    let km = k - 1;
    for c in 0..ch {
        for j in 0..k {
            wt[j * ch + c] = w.get(c * k + j);
        }
    }
    let (st, wt, simd): (&[f32], &[f32], _) = (state, wt, ex.simd());
    crate::exec::map_rows(ex, u, ch, t, &|tt, out| {
        let mut src: [&[f32]; 16] = [&[]; 16];
        for (j, sj) in src[..k].iter_mut().enumerate() {
            let tau = tt as isize - km as isize + j as isize;
            *sj = if tau < 0 {
                let row = (km as isize + tau) as usize;
                &st[row * ch..(row + 1) * ch]
            } else {
                &x[tau as usize * ldx..tau as usize * ldx + ch]
            };
        }
        conv_row(simd, out, bias, wt, &src[..k]);
    });
    // New history: inputs t−(k−1) .. t−1; ascending j reads row t+j > j before it is overwritten.
    for j in 0..km {
        let tau = t as isize - km as isize + j as isize;
        if tau < 0 {
            state.copy_within((t + j) * ch..(t + j + 1) * ch, j * ch);
        } else {
            state[j * ch..(j + 1) * ch].copy_from_slice(&x[tau as usize * ldx..tau as usize * ldx + ch]);
        }
    }
}

/// One token of the causal conv: `out = silu(bias + Σ_j wt[j]·src[j])`, `wt (k, cd)`, `src` the
/// k input rows oldest first; compiled for AVX2 where `simd` allows (bit for bit the same sums).
fn conv_row(simd: crate::exec::Simd, out: &mut [f32], bias: Option<&Weight>, wt: &[f32], src: &[&[f32]]) {
    #[inline(always)]
    fn body(out: &mut [f32], bias: Option<&Weight>, wt: &[f32], src: &[&[f32]]) {
        match bias {
            Some(b) => b.read(0, out),
            None => out.fill(0.0),
        }
        let cd = out.len();
        for (wj, xj) in wt.chunks_exact(cd).zip(src) {
            for ((o, w), x) in out.iter_mut().zip(wj).zip(*xj) {
                *o += w * x;
            }
        }
        out.iter_mut().for_each(|v| *v = fast_silu(*v));
    }
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(out: &mut [f32], bias: Option<&Weight>, wt: &[f32], src: &[&[f32]]) {
            body(out, bias, wt, src)
        }
        // SAFETY: the host reported AVX2 and FMA at run time.
        return unsafe { avx2(out, bias, wt, src) };
    }
    let _ = simd;
    body(out, bias, wt, src)
}

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`: 8 × 8 tiles, in registers when
/// `simd` has AVX (the scans' operands are stored token-major and the GEMM contracts along rows).
pub fn transpose(
    simd: crate::exec::Simd,
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // Exactly the elements touched, so that the pointer path below stays inside them.
    let (src, dst) = (&src[..(rows - 1) * lds + cols], &mut dst[..(cols - 1) * ldd + rows]);
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        // SAFETY: the host reported AVX at run time; every access is inside the slices above.
        return unsafe { transpose_avx(src.as_ptr(), lds, rows, cols, dst.as_mut_ptr(), ldd) };
    }
    let _ = simd;
    for r0 in (0..rows).step_by(8) {
        for c0 in (0..cols).step_by(8) {
            for r in r0..(r0 + 8).min(rows) {
                for c in c0..(c0 + 8).min(cols) {
                    dst[c * ldd + r] = src[r * lds + c];
                }
            }
        }
    }
}

/// [`transpose`] with whole 8 × 8 tiles in ymm registers and the edges element by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_avx(src: *const f32, lds: usize, rows: usize, cols: usize, dst: *mut f32, ldd: usize) {
    use core::arch::x86_64::*;
    let (rf, cf) = (rows / 8 * 8, cols / 8 * 8);
    for r0 in (0..rf).step_by(8) {
        for c0 in (0..cf).step_by(8) {
            let s = src.add(r0 * lds + c0);
            let mut r: [__m256; 8] = core::array::from_fn(|i| _mm256_loadu_ps(s.add(i * lds)));
            transpose8(&mut r);
            let d = dst.add(c0 * ldd + r0);
            for (i, &col) in r.iter().enumerate() {
                _mm256_storeu_ps(d.add(i * ldd), col);
            }
        }
    }
    for r in 0..rows {
        let c_start = if r < rf { cf } else { 0 };
        for c in c_start..cols {
            *dst.add(c * ldd + r) = *src.add(r * lds + c);
        }
    }
}

/// `r[i][j] ← r[j][i]` for an 8 × 8 block in registers: pairs of rows interleaved, then quads
/// within each 128-bit lane, then the lanes. Only sound in a function compiled with AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn transpose8(r: &mut [core::arch::x86_64::__m256; 8]) {
    use core::arch::x86_64::*;
    let t: [__m256; 8] = core::array::from_fn(|i| {
        let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(x, y)
        } else {
            _mm256_unpackhi_ps(x, y)
        }
    });
    let q = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for i in 0..4 {
        r[i] = _mm256_permute2f128_ps::<0x20>(q[i], q[i + 4]);
        r[i + 4] = _mm256_permute2f128_ps::<0x31>(q[i], q[i + 4]);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    /// Distance in representable f32 values (both finite, same sign or zero).
    fn ulps(a: f32, b: f32) -> u32 {
        let key = |v: f32| if v.is_sign_negative() { -(v.to_bits() as i64 & 0x7fff_ffff) } else { v.to_bits() as i64 };
        (key(a) - key(b)).unsigned_abs() as u32
    }

    /// [`super::log_sum_exp`] against `log Σ eˣ` in f64 on every level this CPU has, at lengths
    /// around the vector widths and the vocabularies' (50,277 and 50,288), with values spread over
    /// ±30 and rows holding −∞: within 2e-6 relative; an all −∞ or empty row is −∞, a +∞ one +∞,
    /// one with a NaN NaN.
    #[test]
    fn log_sum_exp_is_the_f64_sum_on_every_level() {
        let lens = (0..70).chain([127, 128, 129, 1000, 50_277, 50_288]);
        for simd in crate::exec::up_to_avx512() {
            for n in lens.clone() {
                let mut x: Vec<f32> = (0..n).map(|i| ((i * 7919 + n) % 6007) as f32 * 1e-2 - 30.0).collect();
                if n > 3 {
                    x[n / 2] = f32::NEG_INFINITY;
                }
                let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let want = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                let got = super::log_sum_exp(simd, &x);
                if n == 0 {
                    assert_eq!(got, f32::NEG_INFINITY, "{simd:?}: the empty row");
                    continue;
                }
                let rel = ((got as f64 - want) / want.abs().max(1.0)).abs();
                assert!(rel <= 2e-6, "{simd:?} n {n}: {got} against {want} (rel {rel:.2e})");
            }
            assert_eq!(super::log_sum_exp(simd, &[f32::NEG_INFINITY; 40]), f32::NEG_INFINITY, "{simd:?}");
            assert_eq!(super::log_sum_exp(simd, &[1.0, f32::INFINITY, 2.0]), f32::INFINITY, "{simd:?}");
            // A NaN among finite values (in the vectors and in the scalar tail) gives NaN.
            for at in [3, 38] {
                let mut x = [0.5f32; 40];
                x[at] = f32::NAN;
                assert!(super::log_sum_exp(simd, &x).is_nan(), "{simd:?}: NaN at {at} lost");
            }
        }
    }

    /// [`super::fast_softplus`] against `ln(1 + eˣ)` in f64 (`x` past 20 as is, as torch's) and
    /// [`super::fast_exp`] against `eˣ`, over a dense sweep of their working range, through
    /// [`super::map_in_place`] on every path the CPU has: within 3 and 2 ulp of the rounded
    /// result (libm's `log1pf(expf(x))` is itself ~1 ulp off), and NaN stays NaN.
    #[test]
    fn fast_softplus_and_exp_stay_within_a_few_ulp() {
        let xs: Vec<f32> = (-400_000..=400_000).map(|i| i as f32 * 1e-4).chain([-80.0, 60.0, f32::NAN]).collect();
        for simd in crate::exec::portable_and_avx2() {
            let mut sp = xs.clone();
            super::map_in_place(simd, &mut sp, super::fast_softplus);
            let mut ex = xs.clone();
            super::map_in_place(simd, &mut ex, super::fast_exp);
            let (mut worst_sp, mut worst_ex) = (0, 0);
            for ((&x, &s), &e) in xs.iter().zip(&sp).zip(&ex) {
                if x.is_nan() {
                    assert!(s.is_nan() && e.is_nan(), "{simd:?}: NaN gave {s}, {e}");
                    continue;
                }
                let x64 = x as f64;
                worst_sp = worst_sp.max(ulps(s, if x > 20.0 { x } else { x64.exp().ln_1p() as f32 }));
                worst_ex = worst_ex.max(ulps(e, x64.exp() as f32));
            }
            std::eprintln!("{simd:?}: softplus {worst_sp} ulp, exp {worst_ex} ulp");
            assert!(worst_sp <= 3 && worst_ex <= 2, "{simd:?}: softplus {worst_sp} ulp, exp {worst_ex} ulp");
        }
    }

    /// Every shape around the 8 × 8 tiles, strided both sides, on both paths: each element lands
    /// once where it belongs and nothing outside the destination's rectangle is written.
    #[test]
    fn transpose_moves_each_element_once() {
        for simd in crate::exec::portable_and_avx2() {
            for rows in [1, 7, 8, 9, 16, 17, 64] {
                for cols in [1, 3, 8, 15, 16, 64, 130] {
                    let (lds, ldd) = (cols + 3, rows + 5);
                    let src: Vec<f32> = (0..rows * lds).map(|i| i as f32).collect();
                    let mut dst = std::vec![-1f32; cols * ldd];
                    super::transpose(simd, &src, lds, rows, cols, &mut dst, ldd);
                    for c in 0..cols {
                        for r in 0..ldd {
                            let want = if r < rows { src[r * lds + c] } else { -1.0 };
                            assert_eq!(dst[c * ldd + r], want, "{simd:?} rows {rows} cols {cols} at ({c}, {r})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::fast_exp(x), libm::expf(x));
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(super::fast_exp(f32::NAN).is_nan());
        assert!(super::fast_exp(f32::NEG_INFINITY) < 1.3e-38);
    }

    /// `fast_ln` is ln within 3e-7 relative over every binade (subnormals included, 97 points
    /// each) and densely on [0.5, 2) around 1; the special values as documented.
    #[test]
    fn fast_ln_is_the_natural_log() {
        let check = |x: f32| {
            let (got, want) = (super::fast_ln(x) as f64, (x as f64).ln());
            assert!((got - want).abs() <= 3e-7 * want.abs(), "ln({x:e}) = {got}, want {want}");
        };
        for e in -149i32..128 {
            for k in 0..97 {
                check((2f64.powi(e) * (1.0 + k as f64 / 97.0)) as f32);
            }
        }
        let mut x = 0.5f32;
        while x < 2.0 {
            check(x);
            x += 0.000_031_3;
        }
        assert_eq!(super::fast_ln(0.0), f32::NEG_INFINITY);
        assert_eq!(super::fast_ln(-0.0), f32::NEG_INFINITY);
        assert_eq!(super::fast_ln(f32::INFINITY), f32::INFINITY);
        assert!(super::fast_ln(-1.0).is_nan() && super::fast_ln(f32::NAN).is_nan());
    }

    /// `fast_sigmoid` is σ within 1e-6 relative over a dense sweep (0 to 1 across it, both tails
    /// included), exactly 0.5 at 0, and NaN stays NaN.
    #[test]
    fn fast_sigmoid_is_the_logistic() {
        let mut x = -100.0f32;
        while x < 100.0 {
            let (got, want) = (super::fast_sigmoid(x) as f64, 1.0 / (1.0 + (-(x as f64)).exp()));
            assert!((got - want).abs() <= 1e-6 * want + 1e-38, "σ({x}) = {got}, want {want}");
            x += 0.000_913;
        }
        assert_eq!(super::fast_sigmoid(0.0), 0.5);
        assert!(super::fast_sigmoid(f32::NAN).is_nan());
    }

    /// The exponent taken from the rounded float's bits is the float → int cast it replaced, so
    /// every `fast_exp` result (NLLs, gates) is bit for bit what it was.
    #[test]
    fn fast_exp_bits_match_the_cast_form() {
        fn cast_form(x: f32) -> f32 {
            let x = x.clamp(-87.3, 88.7);
            let n = (x * core::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
            let mut p = 1.987_569_1e-4;
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
                p = p * r + c;
            }
            (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(super::fast_exp(x).to_bits(), cast_form(x).to_bits(), "x = {x}");
            x += 0.000_731;
        }
        assert!(super::fast_exp(-1e30) < 1.3e-38);
    }
}
