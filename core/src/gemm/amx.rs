//! AMX kernel for bf16-stored weights: `c (+)= a · bᵀ` on `tdpbf16ps` tiles.
//!
//! **Status (2026-12-05): written on CPUs without AMX, never yet run on AMX silicon.** Its blocking,
//! activation packing, row and K tails are tested through [`gemm_emulated`], the same code over
//! [`Emulated`], a scalar model of the tile instructions it uses; the instructions themselves
//! ([`Hardware`]'s `asm!` blocks, as compiled) run on CPUs without AMX through the host's SIGILL
//! trap emulator (`stuffed::amx_emu`, which shares [`tdpbf16ps_model`]): bit for bit
//! [`gemm_emulated`] in the kernel contract, and every golden test with bf16 weights under the
//! host's `amx-emu` feature. The host runs this kernel only when `STUFFED_SIMD=amx` asks for it,
//! until the golden tests have passed on an AMX CPU (issue 22).
//!
//! Layout: `c (t, n)` is computed transposed, `cᵀ = b · aᵀ`. A weight tile (up to 16 rows × 32
//! bf16, K contiguous as the checkpoint stores it) is the A operand, read in place with the weights'
//! row stride — nothing of the weights is copied but a K tail. The f32 activations are split into
//! bf16 hi (+ lo, as in [`super::bf16`]: `lo = bf16(x − hi)`, |x − hi − lo| ≤ 2⁻¹⁶·|x|) and packed
//! once per block of 16 rows × [`KC`] columns into the B operand's VNNI layout: row `k2` of a B tile
//! holds, for each activation row `s`, the pair of columns `2·k2, 2·k2 + 1`. The f32 result tile
//! (weight rows × activation rows) is stored into a stack buffer and added, transposed, into `c`.
//!
//! Tiles (palette 1): tmm0 = C (`wr` rows × `4·ar` bytes), tmm1 = A (`wr` rows × 64 bytes),
//! tmm2 / tmm3 = B hi / lo (16 rows × `4·ar` bytes), where `wr, ar ≤ 16` are the weight and
//! activation rows of the tile. A K tail (`k` not a multiple of 32) copies the weights' last
//! columns into a zero-padded 16 × 32 stack buffer, so no tile load reads past a weight row, and
//! the packed activations are zero there. Each `ldtilecfg … tilerelease` sequence is one `asm!`
//! block (Rust's asm model knows no tile registers).
use core::mem::MaybeUninit;
use half::bf16;

/// Activation rows per packed block (the B tile's pairs per row).
const AR: usize = 16;
/// Weight rows per tile (the A and C tiles' rows).
const WR: usize = 16;
/// Reduction columns per tile step: 32 bf16 = one 64-byte A row.
const KS: usize = 32;
/// Reduction columns per packed block: hi + lo of 16 rows × 512 columns = 2 × 16 KiB of stack.
const KC: usize = 512;
/// u16 elements of one packed B tile: 16 rows × 32 bf16.
const TILE_U16: usize = 16 * KS;

/// The 64-byte operand of `ldtilecfg`: palette 1 at byte 0, `colsb[16]` (u16) from byte 16,
/// `rows[16]` (u8) from byte 48.
#[repr(C, align(64))]
pub struct TileConfig([u8; 64]);

impl TileConfig {
    /// The tiles of one product of `wr` weight rows by `ar` activation rows (module doc).
    fn new(wr: usize, ar: usize) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows, colsb) in [(0, wr, 4 * ar), (1, wr, 64), (2, 16, 4 * ar), (3, 16, 4 * ar)] {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(colsb as u16).to_le_bytes());
            c[48 + t] = rows as u8;
        }
        TileConfig(c)
    }

    fn rows(&self, t: usize) -> usize {
        self.0[48 + t] as usize
    }

    fn colsb(&self, t: usize) -> usize {
        u16::from_le_bytes([self.0[16 + 2 * t], self.0[17 + 2 * t]]) as usize
    }
}

/// One tile product: `out[r·16 + s] = Σ_l w[r][l] · (hi[s][l] (+ lo[s][l]))` for `r < wr, s < ar`
/// over `steps` full 32-column steps read from `w` (byte stride `w_stride`), then, when `tail` is not
/// null, one step from `tail` (16 × 32 bf16, rows 64 bytes apart). `hi` and `lo` hold `steps` (+ 1)
/// packed B tiles of 1 KiB each, one after another.
pub struct TileJob {
    cfg: *const TileConfig,
    w: *const u16,
    w_stride: usize,
    steps: usize,
    tail: *const u16,
    hi: *const u16,
    lo: *const u16,
    out: *mut f32,
}

/// What runs a [`TileJob`]: the tile instructions, or a scalar model of them.
pub trait TileUnit {
    /// # Safety
    /// The job's pointers must be valid for the extents its config and `steps` describe; for
    /// [`Hardware`], the CPU must have AMX-TILE and AMX-BF16 and the OS must have granted the
    /// process the tile state.
    unsafe fn run<const FAST: bool>(job: &TileJob);
}

/// `ldtilecfg`, `tilezero`, `tileloadd`, `tdpbf16ps`, `tilestored`, `tilerelease`.
pub struct Hardware;

impl TileUnit for Hardware {
    unsafe fn run<const FAST: bool>(j: &TileJob) {
        // Rows of packed B tiles, of the tail buffer and of the output buffer are all 64 bytes apart.
        let row = 64usize;
        if FAST {
            core::arch::asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "test {steps}, {steps}",
                "jz 3f",
                "2:",
                "tileloadd tmm1, [{w} + {ws} * 1]",
                "tileloadd tmm2, [{hi} + {row} * 1]",
                "tdpbf16ps tmm0, tmm1, tmm2",
                "add {w}, 64",
                "add {hi}, 1024",
                "dec {steps}",
                "jnz 2b",
                "3:",
                "test {tail}, {tail}",
                "jz 4f",
                "tileloadd tmm1, [{tail} + {row} * 1]",
                "tileloadd tmm2, [{hi} + {row} * 1]",
                "tdpbf16ps tmm0, tmm1, tmm2",
                "4:",
                "tilestored [{out} + {row} * 1], tmm0",
                "tilerelease",
                cfg = in(reg) j.cfg,
                w = inout(reg) j.w => _,
                ws = in(reg) j.w_stride,
                hi = inout(reg) j.hi => _,
                steps = inout(reg) j.steps => _,
                tail = in(reg) j.tail,
                row = in(reg) row,
                out = in(reg) j.out,
                options(nostack),
            );
        } else {
            core::arch::asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "test {steps}, {steps}",
                "jz 3f",
                "2:",
                "tileloadd tmm1, [{w} + {ws} * 1]",
                "tileloadd tmm2, [{hi} + {row} * 1]",
                "tdpbf16ps tmm0, tmm1, tmm2",
                "tileloadd tmm3, [{lo} + {row} * 1]",
                "tdpbf16ps tmm0, tmm1, tmm3",
                "add {w}, 64",
                "add {hi}, 1024",
                "add {lo}, 1024",
                "dec {steps}",
                "jnz 2b",
                "3:",
                "test {tail}, {tail}",
                "jz 4f",
                "tileloadd tmm1, [{tail} + {row} * 1]",
                "tileloadd tmm2, [{hi} + {row} * 1]",
                "tdpbf16ps tmm0, tmm1, tmm2",
                "tileloadd tmm3, [{lo} + {row} * 1]",
                "tdpbf16ps tmm0, tmm1, tmm3",
                "4:",
                "tilestored [{out} + {row} * 1], tmm0",
                "tilerelease",
                cfg = in(reg) j.cfg,
                w = inout(reg) j.w => _,
                ws = in(reg) j.w_stride,
                hi = inout(reg) j.hi => _,
                lo = inout(reg) j.lo => _,
                steps = inout(reg) j.steps => _,
                tail = in(reg) j.tail,
                row = in(reg) row,
                out = in(reg) j.out,
                options(nostack),
            );
        }
    }
}

/// A scalar model of the tile instructions as the job uses them, reading exactly the rows and
/// bytes the config gives each tile: `tdpbf16ps` adds, per C element and B row `k2`, the products
/// of the even then the odd pair element (bf16 × bf16 is exact in f32), with denormal inputs read as
/// zero and denormal sums flushed to zero, as the instruction does.
pub struct Emulated;

impl Emulated {
    /// `c[r][s] += Σ_k2 a[r][2k2 + e] · b[k2][2s + e]`, e = 0 then 1, on the config's tiles 0–2.
    unsafe fn dp(cfg: &TileConfig, c: &mut [[f32; 16]; 16], a: *const u16, a_stride: usize, b: *const u16) {
        let shape = DpShape { rows: cfg.rows(0), cols: cfg.colsb(0) / 4, pairs: cfg.colsb(1) / 4 };
        tdpbf16ps_model(shape, c, a, a_stride, b, 2 * KS);
    }

    /// The checks the CPU makes before `tdpbf16ps tmm0, tmm1, tmm{b}` (a #UD fault on hardware; a
    /// panic in this test model): palette 1, every tile within 16 rows × 64 bytes, C and A with the
    /// same rows, C and B with the same bytes per row, and B with one row per A pair.
    fn check_shapes(cfg: &TileConfig, b: usize) {
        assert_eq!(cfg.0[0], 1, "tile palette");
        for t in 0..4 {
            assert!(cfg.rows(t) <= 16 && cfg.colsb(t) <= 64, "tile {t} too large");
            assert!(cfg.rows(t) > 0 && cfg.colsb(t) > 0, "tile {t} unconfigured");
        }
        assert_eq!(cfg.rows(0), cfg.rows(1), "C and A rows");
        assert_eq!(cfg.colsb(0), cfg.colsb(b), "C and B bytes per row");
        assert_eq!(cfg.colsb(1) / 4, cfg.rows(b), "B rows against A pairs");
        assert!(cfg.colsb(0).is_multiple_of(4) && cfg.colsb(1).is_multiple_of(4), "bytes per row of pairs");
    }
}

/// The extents of one `tdpbf16ps`: C rows (= A rows), C columns (f32; = B pairs per row) and A
/// pairs per row (= B rows).
#[derive(Clone, Copy, Debug)]
pub struct DpShape {
    pub rows: usize,
    pub cols: usize,
    pub pairs: usize,
}

/// The scalar model of `tdpbf16ps` shared by [`Emulated`] and the host's trap emulator (which runs
/// the compiled [`Hardware`] blocks on a CPU without AMX): `c[r][s] += a[r][2k2 + e] · b[k2][2s + e]`
/// for k2 in order, e = 0 then 1, each sum rounded to f32 (a bf16 product is exact in f32), denormal
/// inputs read as zero and denormal sums flushed to zero. Rows of `a` are `a_stride` bytes apart, of
/// `b` `b_stride` bytes.
///
/// # Safety
/// `a` and `b` must hold `shape.rows` rows of `2·shape.pairs` and `shape.pairs` rows of
/// `2·shape.cols` u16 at those strides; `shape.rows, shape.cols ≤ 16`.
#[doc(hidden)]
pub unsafe fn tdpbf16ps_model(
    shape: DpShape,
    c: &mut [[f32; 16]; 16],
    a: *const u16,
    a_stride: usize,
    b: *const u16,
    b_stride: usize,
) {
    let f = |bits: u16| daz(bf16::from_bits(bits).to_f32());
    for (r, c_row) in c.iter_mut().enumerate().take(shape.rows) {
        let a_row = (a as *const u8).add(r * a_stride) as *const u16;
        for k2 in 0..shape.pairs {
            let b_row = (b as *const u8).add(k2 * b_stride) as *const u16;
            for (s, cv) in c_row.iter_mut().enumerate().take(shape.cols) {
                for e in 0..2 {
                    *cv = daz(*cv + f(*a_row.add(2 * k2 + e)) * f(*b_row.add(2 * s + e)));
                }
            }
        }
    }
}

/// Subnormal → signed zero.
fn daz(x: f32) -> f32 {
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

impl TileUnit for Emulated {
    unsafe fn run<const FAST: bool>(j: &TileJob) {
        let cfg = &*j.cfg;
        Emulated::check_shapes(cfg, 2);
        if !FAST {
            Emulated::check_shapes(cfg, 3);
        }
        let mut c = [[0f32; 16]; 16];
        let (mut hi, mut lo) = (j.hi, j.lo);
        let mut w = j.w;
        for _ in 0..j.steps {
            Emulated::dp(cfg, &mut c, w, j.w_stride, hi);
            if !FAST {
                Emulated::dp(cfg, &mut c, w, j.w_stride, lo);
            }
            w = w.add(KS);
            hi = hi.add(TILE_U16);
            lo = lo.add(TILE_U16);
        }
        if !j.tail.is_null() {
            Emulated::dp(cfg, &mut c, j.tail, 64, hi);
            if !FAST {
                Emulated::dp(cfg, &mut c, j.tail, 64, lo);
            }
        }
        // tilestored writes the C tile's configured rows × colsb, rows 64 bytes apart.
        let (wr, ar) = (cfg.rows(0), cfg.colsb(0) / 4);
        for (r, row) in c.iter().enumerate().take(wr) {
            for (s, &v) in row.iter().enumerate().take(ar) {
                *j.out.add(r * 16 + s) = v;
            }
        }
    }
}

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]`, as [`super::gemm_raw`], on the tiles.
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AMX-TILE and AMX-BF16 and the OS must have granted
/// the process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)` on Linux).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const bf16,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
    fast: bool,
) {
    gemm_on::<Hardware>(m, n, k, a, lda, b, ldb, c, ldc, acc, fast)
}

/// [`gemm`] over [`Emulated`] tiles, on any x86-64 CPU: the test of everything but the tile
/// instructions.
///
/// # Safety
/// As [`super::gemm_raw`].
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_emulated(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const bf16,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
    fast: bool,
) {
    gemm_on::<Emulated>(m, n, k, a, lda, b, ldb, c, ldc, acc, fast)
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on<T: TileUnit>(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const bf16,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
    fast: bool,
) {
    if k == 0 {
        if !acc {
            super::clear(m, n, c, ldc);
        }
        return;
    }
    const PACKED: usize = KC / KS * TILE_U16;
    let mut hi = MaybeUninit::<[u16; PACKED]>::uninit();
    let mut lo = MaybeUninit::<[u16; PACKED]>::uninit();
    let (hi, lo) = (hi.as_mut_ptr() as *mut u16, lo.as_mut_ptr() as *mut u16);
    let mut tail = [0u16; WR * KS];
    let mut out = [0f32; WR * 16];
    let b = b as *const u16;
    let mut i0 = 0;
    while i0 < m {
        let ar = (m - i0).min(AR);
        let mut l0 = 0;
        while l0 < k {
            let kc = (k - l0).min(KC);
            let (steps, has_tail) = (kc / KS, !kc.is_multiple_of(KS));
            pack(a.add(i0 * lda + l0), lda, ar, kc, hi, lo, fast);
            // The first K block stores (or adds, under `acc`); later ones add.
            let add = acc || l0 > 0;
            let mut j0 = 0;
            while j0 < n {
                let wr = (n - j0).min(WR);
                let cfg = TileConfig::new(wr, ar);
                let w = b.add(j0 * ldb + l0);
                if has_tail {
                    tail.fill(0);
                    for r in 0..wr {
                        let src = w.add(r * ldb + steps * KS);
                        core::ptr::copy_nonoverlapping(src, tail.as_mut_ptr().add(r * KS), kc - steps * KS);
                    }
                }
                let job = TileJob {
                    cfg: &cfg,
                    w,
                    w_stride: ldb * 2,
                    steps,
                    tail: if has_tail { tail.as_ptr() } else { core::ptr::null() },
                    hi,
                    lo,
                    out: out.as_mut_ptr(),
                };
                if fast {
                    T::run::<true>(&job);
                } else {
                    T::run::<false>(&job);
                }
                for r in 0..wr {
                    for s in 0..ar {
                        let v = out[r * 16 + s];
                        let dst = c.add((i0 + s) * ldc + j0 + r);
                        *dst = if add { *dst + v } else { v };
                    }
                }
                j0 += wr;
            }
            l0 += kc;
        }
        i0 += ar;
    }
}

/// Packs `ar` activation rows × `kc` columns into B tiles (module doc): tile `t`, row `k2`, pair
/// `s` holds row `s`'s columns `32·t + 2·k2` and `+ 1`, as bf16 hi (and lo unless `fast`); columns
/// past `kc` and pairs past `ar` are zero.
unsafe fn pack(a: *const f32, lda: usize, ar: usize, kc: usize, hi: *mut u16, lo: *mut u16, fast: bool) {
    let tiles = kc.div_ceil(KS);
    for s in 0..AR {
        for l in 0..tiles * KS {
            let (h, w) = if s < ar && l < kc { split(*a.add(s * lda + l)) } else { (0, 0) };
            let at = (l / KS) * TILE_U16 + (l % KS / 2) * KS + 2 * s + l % 2;
            *hi.add(at) = h;
            if !fast {
                *lo.add(at) = w;
            }
        }
    }
}

/// `x` as bf16 hi and lo (round to nearest even): `lo = bf16(x − hi)`; an infinite `x` (whose
/// `x − hi` is NaN) has lo 0, as in [`super::bf16`].
fn split(x: f32) -> (u16, u16) {
    let h = bf16::from_f32(x);
    let d = x - h.to_f32();
    let d = if d.is_nan() { 0.0 } else { d };
    (h.to_bits(), bf16::from_f32(d).to_bits())
}
