//! The one matrix product every family is built from, `out (t, rows) = x (t, cols) · Wᵀ`, and the
//! strided product the scans use (`c (+)= a · bᵀ`, both operands contiguous along the reduction).
//!
//! Kernel levels, one file each, chosen by the [`Simd`] level the host detected:
//! - portable: [`dot`] per output element (any target);
//! - [`avx2`]: register-tiled AVX2/FMA and AVX-512 f32 FMA dot-product tiles, weights widened to
//!   f32 on load (products of fewer than [`outer::MIN_M`] rows, and the token step's GEMVs);
//! - [`outer`]: the AVX-512 and AVX2 f32 FMA product of [`outer::MIN_M`] or more rows: broadcast
//!   activations times weight panels widened and transposed once into L1 (AVX-512: 1.4–1.5× the
//!   dot-product tiles' GFLOP/s on a Xeon, `examples/gemm_sweep.rs`);
//! - [`bf16`]: AVX512-BF16 `vdpbf16ps` tiles for bf16-stored weights ([`Simd::Avx512Bf16`]), the
//!   activations split into bf16 hi + lo or, under [`MatmulMode::Fast`], rounded once. f32 and f16
//!   weights, and the f32 · f32 products of the scans, use the AVX-512 f32 FMA tiles on that level.
//! - [`amx`]: AMX `tdpbf16ps` tiles for bf16-stored weights and more than one activation row
//!   ([`Simd::Amx`]; the same [`MatmulMode`] rule; not yet run on an AMX CPU, only through a trap emulator, see its doc); one-row
//!   products and other dtypes as on [`Simd::Avx512Bf16`], except f32 weights that carry a
//!   [`crate::weight::SplitSource`] (the host's stored matrices): [`matmul`] multiplies those as their
//!   bf16 halves ([`amx::gemm_split_with`]).
//! - (x86-64 only, behind `#[cfg(target_arch = "x86_64")]`, so `no_std` targets such as thumbv7em
//!   build the portable path alone.)
//!
//! Panels: the x86 kernels pack their panels (widened weight panels, activations split into bf16
//! in the tiles' VNNI layout) into a caller-provided [`Panels`] of [`PANEL_BYTES`], one per
//! running task, which [`Exec::with_panels`] hands out: the host's pool gives each worker thread
//! its own, allocated once, so a forward needs no deep stack (it runs on a 32 KiB thread:
//! tests/kernels.rs); the trait's
//! default, which `Serial` keeps, puts it on the calling thread's stack, and an embedder with
//! short stacks overrides that. The portable path packs nothing.
use crate::error::Error;
use crate::exec::{Exec, MatmulMode, Shared, Simd};
use crate::weight::{with_slice, Data, Elem, SplitHalves, Weight};
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU8, Ordering};

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod bf16;
#[cfg(target_arch = "x86_64")]
pub mod outer;

/// Bytes of a [`Panels`]: the most any kernel packs for one call — [`bf16`]'s hi + lo panels
/// (96 KiB; [`outer`] 48 KiB, [`amx`] 70 KiB). None off x86-64, where only the portable path runs.
#[cfg(target_arch = "x86_64")]
pub const PANEL_BYTES: usize = 96 << 10;
/// Bytes of a [`Panels`]: the portable path packs nothing.
#[cfg(not(target_arch = "x86_64"))]
pub const PANEL_BYTES: usize = 0;

/// Where a matrix kernel packs its panels for the length of one call (module doc): caller-provided,
/// 64-byte aligned, [`PANEL_BYTES`] long. Nothing in it is kept from one call to the next, so it
/// starts uninitialised; each kernel writes what it reads. To put one on the heap without building
/// it on the stack first: `Box::<Panels>::new_uninit()` then `assume_init()` (it is valid
/// uninitialised).
#[repr(C, align(64))]
pub struct Panels {
    bytes: MaybeUninit<[u8; PANEL_BYTES]>,
}

impl Panels {
    pub const fn new() -> Panels {
        Panels { bytes: MaybeUninit::uninit() }
    }

    /// The first byte, for a kernel to lay its panels from (each asserts at compile time that
    /// they fit).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.bytes.as_mut_ptr() as *mut u8
    }
}

impl Default for Panels {
    fn default() -> Self {
        Panels::new()
    }
}

/// Activation rows from which [`outer`]'s panels beat the dot-product tiles (its `MIN_M`).
pub const OUTER_MIN_ROWS: usize = 16;

/// Output rows per task are a multiple of this: whole panels for [`outer`]'s kernels (with 32, a task
/// of 448 rows ended in a panel of 16 that cost a third of a whole one's work for a third of its
/// outputs), whole groups of four for the GEMV and the dot-product tiles.
const PANEL_ROWS: usize = 48;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(
    PANEL_ROWS.is_multiple_of(outer::NP_AVX512)
        && PANEL_ROWS.is_multiple_of(outer::NP_AVX2)
        && PANEL_ROWS.is_multiple_of(4)
);

/// The first output row of task `i` of `tasks` over `rows` rows (`i = tasks`: `rows`): whole
/// panels, the tasks' panel counts differing by one at most (`tasks` ≤ the panels).
fn task_start(i: usize, tasks: usize, rows: usize) -> usize {
    (i * rows.div_ceil(PANEL_ROWS) / tasks * PANEL_ROWS).min(rows)
}

/// `out (t, w.rows) = x (t, w.cols) · wᵀ`, split over the executor by blocks of output rows.
pub fn matmul(ex: &dyn Exec, x: &[f32], t: usize, w: &Weight, out: &mut [f32]) -> Result<(), Error> {
    let (rows, k) = (w.rows, w.cols);
    crate::error::need("matmul input", x.len(), t * k)?;
    crate::error::need("matmul output", out.len(), t * rows)?;
    crate::error::need("matmul weight", w.len(), rows * k)?;
    let work = t * rows * k;
    // Whole panels, spread over the tasks so that their sizes differ by one panel at most: a
    // 2,048-row weight in tasks of ⌈rows/tasks⌉ rounded up to panels (7 of 288 rows and one of 32)
    // left one of two threads with 1,152 rows against 896.
    let panels = rows.div_ceil(PANEL_ROWS);
    let tasks = if work < 1 << 16 { 1 } else { (ex.threads() * 4).min(rows.div_ceil(16)).min(panels).max(1) };
    let start = |i: usize| task_start(i, tasks, rows);
    let (simd, mode) = (ex.simd(), ex.matmul_mode());
    let halves = split_halves(simd, t, w)?;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = halves;
    let shared = Shared::new(&mut out[..t * rows]);
    let task = |i: usize| {
        let (o0, o1) = (start(i), start(i + 1));
        if o0 < o1 {
            ex.with_panels(&mut |panels| {
                let c = shared.ptr().wrapping_add(o0);
                let n = o1 - o0;
                #[cfg(target_arch = "x86_64")]
                if let Some(h) = halves {
                    let (hi, lo) = (h.hi[o0 * k..].as_ptr(), h.lo[o0 * k..].as_ptr());
                    let p = Product { m: t, n, k, a: x.as_ptr(), lda: k, b: hi, ldb: k, c, ldc: rows, acc: false };
                    // SAFETY: `split_halves` returns halves only on the AMX level (the host granted
                    // the tiles) and of the weight's length; each task writes only columns o0..o1.
                    unsafe { amx::gemm_split_with(amx::Tiles::Hardware, p, lo, mode, panels) };
                    return;
                }
                // SAFETY: sizes checked above; each task writes only columns o0..o1 of the output.
                with_slice!(w.data, s => unsafe {
                    let b = s.as_ptr().add(o0 * k);
                    let p = Product { m: t, n, k, a: x.as_ptr(), lda: k, b, ldb: k, c, ldc: rows, acc: false };
                    gemm_raw_mode(simd, mode, p, panels)
                })
            });
        }
    };
    if tasks == 1 {
        task(0);
    } else {
        ex.for_each(tasks, &task);
    }
    Ok(())
}

/// The bf16 halves an f32 `w` lends a product of `t` rows on the AMX level ([`SplitHalves`]:
/// made by its host on the first such product), or `None`: other levels, one-row products (a token
/// step streams the f32 weights, as many bytes as the halves), other dtypes, plain views.
fn split_halves<'a>(simd: Simd, t: usize, w: &Weight<'a>) -> Result<Option<SplitHalves<'a>>, Error> {
    if let (Simd::Amx, true, Data::F32(v), Some(source)) =
        (simd, t > 1 && cfg!(target_arch = "x86_64"), w.data, w.split)
    {
        if let Some(h) = source.halves(v) {
            crate::error::need("matmul weight's hi half", h.hi.len(), v.len())?;
            crate::error::need("matmul weight's lo half", h.lo.len(), v.len())?;
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]` for `i < m, j < n, l < k`: the one product
/// every family is built from (both operands contiguous along the reduction). `acc` adds to `c`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt<E: Kernel>(
    simd: Simd,
    mnk: (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[E],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
    panels: &mut Panels,
) -> Result<(), Error> {
    gemm_nt_mode(simd, MatmulMode::Exact, mnk, a, lda, b, ldb, c, ldc, acc, panels)
}

/// [`gemm_nt`] with a [`MatmulMode`] for the bf16 kernels.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_mode<E: Kernel>(
    simd: Simd,
    mode: MatmulMode,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[E],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
    panels: &mut Panels,
) -> Result<(), Error> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    crate::error::need("gemm a", a.len(), (m - 1) * lda + k)?;
    crate::error::need("gemm b", b.len(), (n - 1) * ldb + k)?;
    crate::error::need("gemm c", c.len(), (m - 1) * ldc + n)?;
    // SAFETY: every index the kernel touches is within the lengths checked above.
    let p = Product { m, n, k, a: a.as_ptr(), lda, b: b.as_ptr(), ldb, c: c.as_mut_ptr(), ldc, acc };
    unsafe { gemm_raw_mode(simd, mode, p, panels) };
    Ok(())
}

/// One product on raw pointers, what [`gemm_raw`] and every kernel take:
/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]` for `i < m, j < n, l < k`; `acc` adds to what
/// `c` holds.
#[derive(Clone, Copy, Debug)]
pub struct Product<E> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    pub b: *const E,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub acc: bool,
}

impl<E> Product<E> {
    /// The `m × n` part of this product from row `i` of `a` and row `j` of `b` (all of `k`).
    ///
    /// # Safety
    /// The part must lie within the product's extents.
    #[inline(always)]
    pub unsafe fn part(self, i: usize, j: usize, m: usize, n: usize) -> Product<E> {
        Product {
            m,
            n,
            a: self.a.add(i * self.lda),
            b: self.b.add(j * self.ldb),
            c: self.c.add(i * self.ldc + j),
            ..self
        }
    }

    /// The same product over another weight pointer of the same layout (the other bf16 half).
    #[inline(always)]
    pub fn with_b<F>(self, b: *const F) -> Product<F> {
        let Product { m, n, k, a, lda, ldb, c, ldc, acc, .. } = self;
        Product { m, n, k, a, lda, b, ldb, c, ldc, acc }
    }
}

/// [`gemm_nt`] on raw pointers, for outputs that parallel tasks share by disjoint columns.
///
/// # Safety
/// `p.a`, `p.b` and `p.c` must be valid for the strided extents `gemm_nt` checks, and no other
/// thread may touch the elements of `p.c` this call writes.
pub unsafe fn gemm_raw<E: Kernel>(simd: Simd, p: Product<E>, panels: &mut Panels) {
    gemm_raw_mode(simd, MatmulMode::Exact, p, panels)
}

/// [`gemm_raw`] with a [`MatmulMode`] for the bf16 kernels.
///
/// # Safety
/// As [`gemm_raw`].
pub unsafe fn gemm_raw_mode<E: Kernel>(simd: Simd, mode: MatmulMode, p: Product<E>, panels: &mut Panels) {
    let m = p.m;
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY (all): the host reported these features at run time; a bf16 `E` is `half::bf16`.
        Simd::Amx if m > 1 && E::DTYPE == crate::weight::DType::Bf16 => {
            return amx::gemm(p.with_b(p.b as *const half::bf16), mode, panels)
        }
        Simd::Avx512Bf16 | Simd::Amx if E::DTYPE == crate::weight::DType::Bf16 => {
            return bf16::gemm(p.with_b(p.b as *const half::bf16), mode, panels)
        }
        // 16-bit weight rows one at a time under the L2 hint (Zen 4: one stream prefetched into L2
        // reads faster on a core than four; f32 rows were slower so), four at a time otherwise (the
        // Xeons' L1 hint: four streams in flight). Both sum a row the same way: the same bits.
        Simd::Amx | Simd::Avx512Bf16 | Simd::Avx512
            if m == 1 && prefetch() == Prefetch::L2 && core::mem::size_of::<E>() == 2 =>
        {
            return avx2::gemv(p)
        }
        Simd::Amx | Simd::Avx512Bf16 | Simd::Avx512 if m == 1 => return avx2::gemv_rows4(p),
        Simd::Avx2 if m == 1 => return avx2::gemv(p),
        Simd::Amx | Simd::Avx512Bf16 | Simd::Avx512 if m >= outer::MIN_M => return outer::gemm_avx512(p, panels),
        Simd::Amx | Simd::Avx512Bf16 | Simd::Avx512 => return avx2::gemm_wide(p),
        Simd::Avx2 if m >= outer::MIN_M => return outer::gemm_avx2(p, panels),
        Simd::Avx2 => return avx2::gemm(p),
        Simd::Portable => {}
    }
    let _ = (simd, mode, panels);
    let Product { n, k, a, lda, b, ldb, c, ldc, acc, .. } = p;
    for i in 0..m {
        let ar = core::slice::from_raw_parts(a.add(i * lda), k);
        for j in 0..n {
            let v = dot(ar, core::slice::from_raw_parts(b.add(j * ldb), k));
            let dst = &mut *c.add(i * ldc + j);
            *dst = if acc { *dst + v } else { v };
        }
    }
}

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[l·ldb + j]`: `p` with its weight stored `[k, n]` (the
/// RWKV LoRAs' `[in, out]` matrices), on [`outer`]'s panels where the level has them (AVX2,
/// AVX-512), for any `p.m`: each output row is summed the same way whatever rows share the call, so
/// a caller may split its rows freely. Returns `false`, having done nothing, on other levels (the
/// caller's own loops run it). Worth it from about [`OUTER_MIN_ROWS`] rows.
///
/// # Safety
/// `p.a` and `p.c` as [`gemm_raw`]; `p.b` readable at `l·ldb + j` for `l < k`, `j < n`.
pub unsafe fn gemm_nn_outer<E: Kernel>(simd: Simd, p: Product<E>, panels: &mut Panels) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both): the host reported these features at run time.
        if simd.has_avx512() {
            outer::gemm_nn_avx512(p, panels);
            return true;
        }
        if simd.has_avx2() {
            outer::gemm_nn_avx2(p, panels);
            return true;
        }
    }
    let _ = (simd, p, panels);
    false
}

/// Zeroes `c[i·ldc + j]` for `i < m, j < n` (a product with nothing to sum, stored).
///
/// # Safety
/// `c` must be valid for those elements.
#[cfg(target_arch = "x86_64")]
unsafe fn clear(m: usize, n: usize, c: *mut f32, ldc: usize) {
    for i in 0..m {
        for j in 0..n {
            *c.add(i * ldc + j) = 0.0;
        }
    }
}

/// Where a token step's GEMVs ask for the weights they will read [`avx2::PREFETCH_BYTES`] ahead
/// (weights streamed once a step from memory). A hint for speed only: no result depends on it.
/// Process-wide, like the thread count: the host sets it once ([`set_prefetch`]) from the CPU and
/// `STUFFED_PREFETCH`; until then [`Prefetch::L1`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// `prefetcht0`, into L1: on the Xeon of issue 22 it took the Mamba-2 130m bf16 token step
    /// from 19.5 to 10–12 ms (the hardware prefetchers alone left it at 60–70 % of the read
    /// bandwidth).
    L1,
    /// `prefetcht1`, into L2, the L1's own prefetcher taking the lines on from there. On a Zen 4
    /// EPYC (2026-12-07) the one-thread GEMV read 11–16 GB/s from memory with `L1` (its L1 miss
    /// buffers held the prefetches) and 20–24 GB/s with this (`gemm_sweep bf16`, t = 1).
    L2,
    /// None: the hardware prefetchers alone.
    Off,
}

impl Prefetch {
    pub const ALL: [Prefetch; 3] = [Prefetch::L1, Prefetch::L2, Prefetch::Off];

    /// The name `STUFFED_PREFETCH` takes and `bench` prints: `l1`, `l2`, `off`.
    pub fn name(self) -> &'static str {
        match self {
            Prefetch::L1 => "l1",
            Prefetch::L2 => "l2",
            Prefetch::Off => "off",
        }
    }

    /// The hint a name stands for, or `None`.
    pub fn from_name(name: &str) -> Option<Prefetch> {
        Prefetch::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// The process's [`Prefetch`] as its index in [`Prefetch::ALL`].
static PREFETCH: AtomicU8 = AtomicU8::new(0);

/// Sets the process's [`Prefetch`] (the host: once, before its first product).
pub fn set_prefetch(hint: Prefetch) {
    let index = Prefetch::ALL.iter().position(|&p| p == hint).unwrap_or(0);
    PREFETCH.store(index as u8, Ordering::Relaxed);
}

/// The process's [`Prefetch`]: a kernel reads it once a call.
pub fn prefetch() -> Prefetch {
    Prefetch::ALL.get(PREFETCH.load(Ordering::Relaxed) as usize).copied().unwrap_or(Prefetch::L1)
}

/// Asks, as `hint` says, for the cache lines of `bytes` bytes from `p` plus
/// [`avx2::PREFETCH_BYTES`], as the GEMVs do, for weights streamed once a token step outside them
/// (a prefetch never faults, so running past a matrix is harmless). Nothing off x86-64.
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, bytes: usize, hint: Prefetch) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let at = p.wrapping_add(avx2::PREFETCH_BYTES) as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch reads nothing architecturally and never faults; SSE is baseline.
            match hint {
                Prefetch::L1 => unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off)) },
                Prefetch::L2 => unsafe { _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(off)) },
                Prefetch::Off => {}
            }
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes, hint);
}

/// Asks, as `hint` says, for the one cache line [`avx2::PREFETCH_BYTES`] past `p`, as the GEMVs
/// ask for their weights: for a host's loop that reads memory as they do (`bench`'s read-bandwidth
/// sum). Nothing off x86-64.
#[inline(always)]
pub fn prefetch_line_ahead(p: *const u8, hint: Prefetch) {
    prefetch_ahead(p, 1, hint)
}

/// A dot product with eight partial sums (so it vectorises and rounds like a blocked kernel).
#[inline]
pub fn dot<E: Elem>(x: &[f32], w: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let n = x.len().min(w.len());
    let (xc, xt) = x[..n].split_at(n / 8 * 8);
    let (wc, wt) = w[..n].split_at(n / 8 * 8);
    for (a, b) in xc.chunks_exact(8).zip(wc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += a[l] * b[l].f32();
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in xt.iter().zip(wt) {
        s += a * b.f32();
    }
    s
}

#[cfg(not(target_arch = "x86_64"))]
pub trait Kernel: Elem {}
#[cfg(not(target_arch = "x86_64"))]
impl<E: Elem> Kernel for E {}
#[cfg(target_arch = "x86_64")]
pub use avx2::Kernel;

#[cfg(test)]
mod tests {
    use super::{task_start, PANEL_ROWS};

    /// `matmul`'s tasks cover the rows in whole panels (the last may be short), their sizes apart
    /// by one panel at most: no thread is left a task's worth more than the other.
    #[test]
    fn tasks_split_the_rows_in_near_equal_whole_panels() {
        for rows in (1usize..3000).step_by(7).chain([2048, 3352, 7168, 50288]) {
            let panels = rows.div_ceil(PANEL_ROWS);
            for tasks in (1..=16).filter(|&t| t <= panels) {
                let starts: [usize; 17] = core::array::from_fn(|i| task_start(i.min(tasks), tasks, rows));
                assert_eq!((starts[0], starts[tasks]), (0, rows));
                let whole = |i: usize| (starts[i + 1] - starts[i]).div_ceil(PANEL_ROWS);
                let (lo, hi) = (0..tasks).map(whole).fold((usize::MAX, 0), |(l, h), w| (l.min(w), h.max(w)));
                assert!(hi - lo <= 1, "{rows} rows in {tasks} tasks: {starts:?}");
                assert!(starts.iter().all(|s| s % PANEL_ROWS == 0 || *s == rows), "{starts:?}");
            }
        }
    }
}
