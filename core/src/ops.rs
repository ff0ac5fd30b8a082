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
    w.read(offset, &mut out[..x.len()]);
    for (o, v) in out.iter_mut().zip(x) {
        *o *= v * inv;
    }
}

/// RMSNorm in place.
#[inline]
pub fn rmsnorm_inplace(x: &mut [f32], w: &Weight, offset: usize, eps: f32) {
    let inv = 1.0 / libm::sqrtf(sum_sq(x) / x.len() as f32 + eps);
    for (i, v) in x.iter_mut().enumerate() {
        *v *= inv * w.get(offset + i);
    }
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
    crate::weight::dot(x, y)
}
