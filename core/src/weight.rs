//! Borrowed weights (f32, bf16 or f16, read in place from the host's memory map). The matrix
//! product every family is built from, `out (t, rows) = x (t, cols) · Wᵀ`, is in [`crate::gemm`].
use crate::error::Error;
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
    /// Where f32 data may get its bf16 halves for the AMX tiles ([`SplitSource`]); `None` for
    /// a plain view. Set by the host on whole stored matrices ([`Weight::with_split`]).
    pub split: Option<&'a dyn SplitSource>,
}

/// An f32 matrix as two bf16 matrices of its shape, `w ≈ hi + lo` with |w − hi − lo| ≤ 2⁻¹⁶·|w|
/// (hi = w rounded to nearest even, lo = the remainder rounded): the AMX tiles multiply bf16
/// only, and f32 weights there (issue 22: "split them too, once at load or per chunk") run as
/// `x·hi + x·lo`, the activations split (or rounded) as for bf16 weights.
#[derive(Clone, Copy, Debug)]
pub struct SplitHalves<'a> {
    pub hi: &'a [bf16],
    pub lo: &'a [bf16],
}

/// Makes and keeps an f32 weight's [`SplitHalves`] on its first product on the AMX level, so a
/// model that never runs there pays no memory (the core allocates nothing: the host owns them,
/// 4 bytes a weight beside the f32 values).
pub trait SplitSource: Sync + core::fmt::Debug {
    /// The halves of `w`, the f32 data of the weight this source was attached to (always the
    /// same data); `None` where they cannot be made, and the product then runs on f32.
    fn halves(&self, w: &[f32]) -> Option<SplitHalves<'_>>;
}

/// An element type weights may be stored in.
pub trait Elem: Copy + Send + Sync {
    /// The storage type's tag (lets a kernel pick a path for one type, e.g. bf16).
    const DTYPE: DType;
    fn f32(self) -> f32;
}
impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
impl Elem for f16 {
    const DTYPE: DType = DType::F16;
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
pub(crate) use with_slice;

impl<'a> Weight<'a> {
    /// A `(rows, cols)` view; the data must hold exactly `rows·cols` elements.
    pub fn new(data: Data<'a>, rows: usize, cols: usize) -> Result<Self, Error> {
        let w = Weight { data, rows, cols, split: None };
        if w.len() != rows * cols {
            return Err(Error::Shape { what: "weight", expected: rows * cols, got: w.len() });
        }
        Ok(w)
    }

    /// This view with `source` lending its f32 data's bf16 halves to the AMX level (the source
    /// must belong to this very data: a sub-view of it is a plain [`Weight::new`]).
    pub fn with_split(self, source: &'a dyn SplitSource) -> Self {
        Weight { split: Some(source), ..self }
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
    #[inline]
    pub fn read(&self, start: usize, out: &mut [f32]) {
        with_slice!(self.data, s => {
            for (o, v) in out.iter_mut().zip(s.iter().skip(start)) {
                *o = v.f32();
            }
        })
    }

    /// `f(i0, w[start + i0 ..][..n])` as f32 for the `len` elements from `start`, 256 at a time
    /// through a stack buffer: one dtype dispatch a chunk instead of one an element ([`Self::get`]),
    /// so the loop in `f` vectorises.
    #[inline]
    pub fn for_chunks(&self, start: usize, len: usize, mut f: impl FnMut(usize, &[f32])) {
        const CHUNK: usize = 256;
        let mut buf = [0f32; CHUNK];
        let mut i0 = 0;
        while i0 < len {
            let n = CHUNK.min(len - i0);
            self.read(start + i0, &mut buf[..n]);
            f(i0, &buf[..n]);
            i0 += n;
        }
    }

    /// [`Self::for_chunks`] over this weight and `other` side by side (a norm's scale and bias):
    /// `f(i0, self chunk, other chunk)`.
    #[inline]
    pub fn for_chunks_with(&self, other: &Weight, start: usize, len: usize, mut f: impl FnMut(usize, &[f32], &[f32])) {
        self.for_chunks(start, len, |i0, a| other.for_chunks(start + i0, a.len(), |_, b| f(i0, a, b)));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks past the 256-element buffer, from an offset, on every dtype: each element is handed
    /// over once, at its index, with [`Weight::get`]'s value.
    #[test]
    fn for_chunks_visit_each_element_once_with_get_s_value() {
        const N: usize = 1100;
        let f: [f32; N] = core::array::from_fn(|i| i as f32 * 0.25 - 3.0);
        let g: [f32; N] = core::array::from_fn(|i| 7.0 - i as f32 * 0.5);
        let b: [bf16; N] = core::array::from_fn(|i| bf16::from_f32(f[i]));
        let h: [f16; N] = core::array::from_fn(|i| f16::from_f32(f[i]));
        for data in [Data::F32(&f), Data::Bf16(&b), Data::F16(&h)] {
            let Ok(w) = Weight::new(data, 1, N) else { panic!("a 1 × {N} view") };
            for (start, len) in [(0, N), (3, 700), (256, 256), (5, 0), (1000, 100)] {
                let mut seen = [0u8; N];
                w.for_chunks(start, len, |i0, c| {
                    for (j, &v) in c.iter().enumerate() {
                        assert_eq!(v, w.get(start + i0 + j), "start {start} len {len} at {}", i0 + j);
                        seen[i0 + j] += 1;
                    }
                });
                assert!(seen[..len].iter().all(|&s| s == 1) && seen[len..].iter().all(|&s| s == 0));
                // Beside a second weight (f32, other values): both chunks at the same index.
                let Ok(other) = Weight::new(Data::F32(&g), 1, N) else { panic!("a 1 × {N} view") };
                let mut seen = [0u8; N];
                w.for_chunks_with(&other, start, len, |i0, a, b| {
                    assert_eq!(a.len(), b.len());
                    for (j, (&x, &y)) in a.iter().zip(b).enumerate() {
                        assert_eq!((x, y), (w.get(start + i0 + j), other.get(start + i0 + j)));
                        seen[i0 + j] += 1;
                    }
                });
                assert!(seen[..len].iter().all(|&s| s == 1) && seen[len..].iter().all(|&s| s == 0));
            }
        }
    }
}
