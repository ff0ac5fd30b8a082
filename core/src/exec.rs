//! How the core runs independent pieces of work: serially by default, or on the host's thread pool.
//!
//! The core never spawns threads (it has no `std`); a host hands it an [`Exec`] that may run the
//! tasks of one [`Exec::for_each`] call in parallel. Tasks always write disjoint parts of a buffer,
//! shared between them through [`Shared`].
use crate::gemm::Panels;
use core::marker::PhantomData;

/// SIMD level the host detected at run time; the core picks its matmul kernel from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Portable,
    /// x86-64 AVX2 + FMA (+ F16C).
    Avx2,
    /// AVX2 + FMA + F16C with AVX-512F/VL: the GEMM kernel uses 32 registers and a wider tile.
    Avx512,
    /// [`Simd::Avx512`] plus AVX512-BW and AVX512-BF16: products with bf16-stored weights run on
    /// `vdpbf16ps` (see [`MatmulMode`] for what happens to the f32 activations); f32 and f16 weights,
    /// and the scans' f32·f32 products, keep the AVX-512 f32 FMA kernel.
    Avx512Bf16,
    /// [`Simd::Avx512Bf16`] plus AMX-TILE and AMX-BF16, with the OS's permission to use the tiles:
    /// products with bf16-stored weights and more than one activation row run on `tdpbf16ps`
    /// (the same [`MatmulMode`] rule); everything else as on [`Simd::Avx512Bf16`].
    Amx,
}

impl Simd {
    /// Whether AVX2 + FMA code may run (true for every x86 level).
    pub fn has_avx2(self) -> bool {
        matches!(self, Simd::Avx2 | Simd::Avx512 | Simd::Avx512Bf16 | Simd::Amx)
    }

    /// Whether AVX-512F/VL code may run.
    pub fn has_avx512(self) -> bool {
        matches!(self, Simd::Avx512 | Simd::Avx512Bf16 | Simd::Amx)
    }

    /// Whether AVX512-BW and AVX512-BF16 code may run.
    pub fn has_avx512bf16(self) -> bool {
        matches!(self, Simd::Avx512Bf16 | Simd::Amx)
    }

    /// Every level, lowest first.
    pub const ALL: [Simd; 5] = [Simd::Portable, Simd::Avx2, Simd::Avx512, Simd::Avx512Bf16, Simd::Amx];

    /// The name `STUFFED_SIMD` takes and outputs record: `portable`, `avx2`, `avx512`, `avx512bf16`,
    /// `amx`.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
            Simd::Avx512Bf16 => "avx512bf16",
            Simd::Amx => "amx",
        }
    }

    /// The level a name stands for ([`Simd::name`]'s inverse).
    pub fn from_name(name: &str) -> Option<Simd> {
        Simd::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What a bf16 matrix kernel (`vdpbf16ps`, which multiplies bf16 by bf16) does to the f32
/// activations. Kernels that multiply in f32 ignore it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulMode {
    /// Each activation split into bf16 hi + bf16 lo (lo = bf16(x − hi)), both products summed in
    /// f32: the activation keeps ~16 significant bits (relative error ≤ 2⁻¹⁶, typically ~1e-6), so results stay
    /// within the f32 kernels' tolerances.
    #[default]
    Exact,
    /// Activations rounded to bf16 once (`--fast-matmul`): half the products, relative error ≤ 2⁻⁸
    /// per activation, as bf16 models in PyTorch or llama.cpp compute.
    Fast,
}

impl MatmulMode {
    /// `exact` or `fast`, as outputs record it.
    pub fn name(self) -> &'static str {
        match self {
            MatmulMode::Exact => "exact",
            MatmulMode::Fast => "fast",
        }
    }
}

pub trait Exec: Sync {
    /// Runs `f(i)` for every `i` in `0..n`, in any order, possibly at once.
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync));
    /// How many tasks can run at once (a hint for splitting work).
    fn threads(&self) -> usize {
        1
    }
    fn simd(&self) -> Simd {
        Simd::Portable
    }
    /// How the bf16 kernels treat activations (the host's `--fast-matmul`).
    fn matmul_mode(&self) -> MatmulMode {
        MatmulMode::Exact
    }
    /// Runs `f` with a [`Panels`] that no other running call holds: where the matrix kernels pack
    /// their panels (`gemm` module doc). This default puts one on the calling thread's stack
    /// ([`crate::gemm::PANEL_BYTES`]: 96 KiB on x86-64, none elsewhere); an executor whose
    /// threads have short stacks hands out its own instead, as the host's pool does (one a worker,
    /// allocated once).
    fn with_panels(&self, f: &mut dyn FnMut(&mut Panels)) {
        f(&mut Panels::new())
    }
}

/// Runs everything on the calling thread.
pub struct Serial;

impl Exec for Serial {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f);
    }
}

/// A mutable buffer that parallel tasks write in disjoint ranges.
pub struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _life: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks only ever take disjoint ranges (see `range`), so sharing the pointer is sound.
unsafe impl Send for Shared<'_> {}
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    pub fn new(buf: &'a mut [f32]) -> Self {
        Shared { ptr: buf.as_mut_ptr(), len: buf.len(), _life: PhantomData }
    }

    /// The start of the buffer, for kernels that take strided pointers.
    pub fn ptr(&self) -> *mut f32 {
        self.ptr
    }

    /// The elements `start..start+len`, clipped to the buffer.
    ///
    /// # Safety
    /// No two live ranges handed out by one `Shared` may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, start: usize, len: usize) -> &mut [f32] {
        let start = start.min(self.len);
        let len = len.min(self.len - start);
        core::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }

    /// Rows `rows` of a row-major buffer `width` elements wide (the last one clipped).
    ///
    /// # Safety
    /// As [`Shared::range`]: no two live row blocks may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn rows(&self, rows: core::ops::Range<usize>, width: usize) -> &mut [f32] {
        self.range(rows.start * width, (rows.end - rows.start) * width)
    }
}

/// Rows per task below which [`for_row_blocks`] keeps the work on the calling thread: a token
/// step's row-wise maps cost less than a hand-off to the pool.
pub const MIN_ROWS_PER_TASK: usize = 8;

/// Runs `f(r0..r1)` over blocks of the rows `0..t` that together cover them once, split across
/// the executor: for the row-wise maps between the products (norms, token mixes, gates, the small
/// LoRA products) that would otherwise run on one core while the others wait.
pub fn for_row_blocks(ex: &dyn Exec, t: usize, f: &(dyn Fn(core::ops::Range<usize>) + Sync)) {
    let tasks = ex.threads().min(t / MIN_ROWS_PER_TASK).max(1);
    if tasks == 1 {
        if t > 0 {
            f(0..t);
        }
        return;
    }
    let per = t.div_ceil(tasks);
    ex.for_each(tasks, &|i| {
        let (r0, r1) = (i * per, ((i + 1) * per).min(t));
        if r0 < r1 {
            f(r0..r1);
        }
    });
}

/// `f(i, row i)` for the first `t` rows of `buf` (`width` wide), split across the executor by
/// [`for_row_blocks`]. Each row is handed to one task only, so the result does not depend on
/// the split.
pub fn map_rows(ex: &dyn Exec, buf: &mut [f32], width: usize, t: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let len = (t * width).min(buf.len());
    let shared = Shared::new(&mut buf[..len]);
    for_row_blocks(ex, t, &|blk| {
        // SAFETY: the blocks of one `for_row_blocks` call are disjoint.
        let rows = unsafe { shared.rows(blk.clone(), width) };
        for (row, i) in rows.chunks_mut(width.max(1)).zip(blk) {
            f(i, row);
        }
    });
}

/// `x[i] += y[i]` over the first `t` rows (`width` wide), split across the executor (the residual
/// adds).
pub fn add_rows(ex: &dyn Exec, x: &mut [f32], y: &[f32], width: usize, t: usize) {
    map_rows(ex, x, width, t, &|i, row| {
        for (xv, yv) in row.iter_mut().zip(&y[i * width..]) {
            *xv += yv;
        }
    });
}

/// A test executor that claims `.0` workers and runs the tasks one after another in reverse
/// order, so a split's bounds, and any dependence on the order of tasks, show on one thread.
#[cfg(test)]
pub(crate) struct Reversed(pub usize);

#[cfg(test)]
impl Exec for Reversed {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).rev().for_each(f);
    }
    fn threads(&self) -> usize {
        self.0
    }
}

/// The levels a core unit test compares: portable, and AVX2 + FMA where this CPU has them.
#[cfg(test)]
pub(crate) fn portable_and_avx2() -> impl Iterator<Item = Simd> {
    extern crate std;
    #[cfg(target_arch = "x86_64")]
    let avx = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx = false;
    [Simd::Portable, Simd::Avx2].into_iter().filter(move |s| avx || *s == Simd::Portable)
}

/// [`portable_and_avx2`], then AVX-512 where this CPU has it (the kernels that have their own
/// AVX-512 build).
#[cfg(test)]
pub(crate) fn up_to_avx512() -> impl Iterator<Item = Simd> {
    extern crate std;
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    portable_and_avx2().chain(avx512.then_some(Simd::Avx512))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of the `t` is handed out exactly once, with its own index, whatever the split;
    /// nothing past them is touched.
    #[test]
    fn row_blocks_cover_every_row_once() {
        for threads in [1, 2, 3, 8] {
            for t in [0, 1, 7, 8, 15, 16, 17, 33, 100, 513] {
                let mut buf = [0f32; 3 * 513 + 2];
                map_rows(&Reversed(threads), &mut buf, 3, t, &|i, row| {
                    row.iter_mut().for_each(|v| *v += 1.0 + i as f32)
                });
                for (j, v) in buf.iter().enumerate() {
                    let want = if j < 3 * t { 1.0 + (j / 3) as f32 } else { 0.0 };
                    assert_eq!(*v, want, "threads {threads}, t {t}, element {j}");
                }
            }
        }
    }
}
