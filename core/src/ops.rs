//! Elementwise and normalisation ops shared by the families (libm for exp/log: no `std`).
use crate::weight::Weight;

#[inline]
pub fn exp(x: f32) -> f32 {
    libm::expf(x)
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
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

/// `eˣ` in a branch-free form that vectorises (Cephes polynomial, ≈1 ulp on [−87, 88]).
/// Inputs below −87.3 give ~1e-38 instead of a smaller number; NaN stays NaN.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // `t` is exactly ROUND + n, so its bits are ROUND's plus n: the integer without a float →
    // int conversion, whose saturating NaN handling kept this function from vectorising.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(biased << 23)
}

/// `x·σ(x)` through [`fast_exp`].
#[inline(always)]
pub fn fast_silu(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

/// `log Σ eˣ`, shifted by the max, with eight partial sums; compiled for AVX2 when `simd` says so.
pub fn log_sum_exp(simd: crate::exec::Simd, x: &[f32]) -> f32 {
    #[inline(always)]
    fn body(x: &[f32]) -> f32 {
        let mut mx = [f32::NEG_INFINITY; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                mx[l] = mx[l].max(c[l]);
            }
        }
        let m = chunks.remainder().iter().chain(&mx).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if !m.is_finite() {
            return m;
        }
        let mut acc = [0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                acc[l] += fast_exp(c[l] - m);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - m)).sum();
        m + libm::logf(acc.iter().sum::<f32>() + tail)
    }
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32]) -> f32 {
            body(x)
        }
        // SAFETY: the host reported AVX2 and FMA at run time.
        return unsafe { avx2(x) };
    }
    let _ = simd;
    body(x)
}

#[cfg(test)]
mod tests {
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
