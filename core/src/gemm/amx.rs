//! AMX kernel for bf16-stored weights: `c (+)= a · bᵀ` on `tdpbf16ps` tiles.
//!
//! **Status (2026-12-05): written on CPUs without AMX, never yet run on AMX silicon.** Its blocking,
//! activation packing, row and K tails are tested through [`gemm_with`] over [`Emulated`], a scalar
//! model of the tile instructions it uses; the instructions themselves ([`Hardware`]'s `asm!`
//! blocks, as compiled) run on CPUs without AMX through the host's SIGILL trap emulator
//! (`stuffed::amx_emu`, which shares [`tdpbf16ps_model`]): bit for bit the model in the kernel
//! contract, and every golden test with bf16 weights under the host's `amx-emu` feature. The host runs this kernel only when `STUFFED_SIMD=amx` asks for it,
//! until the golden tests have passed on an AMX CPU (issue 22).
//!
//! Layout: `c (t, n)` is computed transposed, `cᵀ = b · aᵀ`. A weight tile (up to 16 rows × 32
//! bf16, K contiguous as the checkpoint stores it) is the A operand, read in place with the weights'
//! row stride — nothing of the weights is copied but a K tail. The f32 activations are split into
//! bf16 hi (+ lo, as in [`super::bf16`]: `lo = bf16(x − hi)`, |x − hi − lo| ≤ 2⁻¹⁶·|x|) and packed
//! once per block of 32 rows × `KC` columns into the B operand's VNNI layout: row `k2` of a B tile
//! holds, for each activation row `s`, the pair of columns `2·k2, 2·k2 + 1` (a 16 × 16 transpose of
//! 32-bit pairs, `transpose16`). Each f32 result tile (weight rows × activation rows) is stored
//! into the [`Panels`] and added, transposed back, into `c`.
//!
//! Blocking ([`Plan::pairs`]): where 32 activation rows and more than 16 weight rows are left, one
//! `ldtilecfg … tilerelease` block ([`PairJob`]) keeps four C tiles — two weight tiles by two
//! activation tiles — so each 32-column step loads 2 A + 2 B tiles (+ 2 B lo) for 4 (8) products,
//! where a single tile loads 2 (3) for 1 (2); the config, zeroing, store and release are paid once
//! for four tiles' work. Tiles: tmm0–3 = C(i, j) at `2i + j` (`wr[i]` rows × `4·ar[j]` bytes),
//! tmm4–5 = A of weight tile i (`wr[i]` rows × 64 bytes), tmm6–7 = B of activation tile j (16 rows
//! × `4·ar[j]` bytes; hi, then reloaded with lo). The rest goes one tile at a time ([`TileJob`]):
//! tmm0 = C, tmm1 = A, tmm2 / tmm3 = B hi / lo. A K tail (`k` not a multiple of 32) copies the
//! weights' last columns into a zero-padded buffer, so no tile load reads past a weight row,
//! and the packed activations are zero there. Each `ldtilecfg … tilerelease` sequence is one `asm!`
//! block (Rust's asm model knows no tile registers).
//!
//! Chunks ([`Plan::chunks`]): the weight rows go in chunks of about [`L2_WEIGHTS`] bytes, each
//! through every activation block, so a chunk stays in L2 while the activations pass over it.
//!
//! The packing and the transposed add run on AVX-512 ([`Plan::avx512`]; an AMX CPU has AVX512-BF16)
//! or as scalar loops (the reference they are tested against, bit for bit).
use super::{Panels, Product, PANEL_BYTES};
use crate::exec::MatmulMode;
use core::arch::x86_64::*;
use half::bf16;

/// Activation rows per B tile (its pairs per row).
const AR: usize = 16;
/// Weight rows per tile (the A and C tiles' rows).
const WR: usize = 16;
/// Reduction columns per tile step: 32 bf16 = one 64-byte A row.
const KS: usize = 32;
/// Reduction columns per packed block: hi + lo of 32 rows × 512 columns = 64 KiB of [`Panels`].
const KC: usize = 512;
/// u16 elements of one packed B tile: 16 rows × 32 bf16.
const TILE_U16: usize = 16 * KS;
/// u16 elements of one activation tile's packed panel: its 16 rows × [`KC`] columns as B tiles.
const PANEL_U16: usize = KC / KS * TILE_U16;
/// Byte offsets, from a packed block's start, of activation tile 1's hi and of tiles 0 and 1's lo
/// (tile 0's hi is at 0): the panels lie hi 0, hi 1, lo 0, lo 1.
const HI1: usize = 2 * PANEL_U16;
const LO0: usize = 4 * PANEL_U16;
const LO1: usize = 6 * PANEL_U16;
/// u16 elements of two weight tiles' K tails (rows of 32 bf16).
const TAIL_U16: usize = 2 * WR * KS;
/// f32 elements of the result tiles (four of 16 × 16).
const OUT_F32: usize = 4 * WR * 16;
// Packed panels, tails and result tiles, in the caller's [`Panels`].
const _: () = assert!(4 * PANEL_U16 * 2 + TAIL_U16 * 2 + OUT_F32 * 4 <= PANEL_BYTES);

/// How [`gemm_with`] blocks and packs: the kernel [`gemm`] runs is `Plan::BEST`; the others are
/// what the tests and `gemm_sweep` compare it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Four C tiles per `ldtilecfg … tilerelease` block where the shape allows (else one).
    pub pairs: bool,
    /// Pack the activations and add the result tiles on AVX-512 (else scalar loops).
    pub avx512: bool,
    /// Take the weight rows in chunks of about [`L2_WEIGHTS`] bytes, each through every activation
    /// block, so the weights are read from memory once rather than once per 32 activation rows
    /// (the activations are packed once per chunk instead).
    pub chunks: bool,
}

impl Plan {
    pub const BEST: Plan = Plan { pairs: true, avx512: true, chunks: true };
    /// The first kernel: one tile per block, scalar packing and adding, no chunks.
    pub const SINGLE_SCALAR: Plan = Plan { pairs: false, avx512: false, chunks: false };
}

/// Bytes of bf16 weights a chunk of [`Plan::chunks`] holds: half an L2 of 2 MiB (Sapphire Rapids),
/// beside the packed activations (64 KiB) and the output rows being added.
pub const L2_WEIGHTS: usize = 1 << 20;

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

    /// The tiles of a [`PairJob`]: weight tiles of `wr[i]` rows by activation tiles of `ar[j]` rows
    /// (module doc; every one of them ≥ 1).
    fn pair(wr: [usize; 2], ar: [usize; 2]) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |t: usize, rows: usize, colsb: usize| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(colsb as u16).to_le_bytes());
            c[48 + t] = rows as u8;
        };
        for (i, &w) in wr.iter().enumerate() {
            for (j, &a) in ar.iter().enumerate() {
                set(2 * i + j, w, 4 * a); // C(i, j)
            }
            set(4 + i, w, 64); // A of weight tile i
        }
        for (j, &a) in ar.iter().enumerate() {
            set(6 + j, 16, 4 * a); // B of activation tile j
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
/// packed B tiles of 1 KiB each, one after another; `lo` lies `LO0` bytes after `hi` (one packed
/// block's panels), which the instructions use.
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

/// Four tile products in one block: weight tiles i = 0, 1 (from `w[i]`, byte stride `w_stride`) by
/// activation tiles j = 0, 1, over `steps` full 32-column steps, then one step from `tail` when it
/// is not null (32 × 32 bf16, rows 64 bytes apart; weight tile i from row 16·i). `packed` is the
/// packed block at the job's first step (hi 0 at 0, hi 1 at `HI1`, lo 0 / lo 1 at `LO0` /
/// `LO1` bytes, each `steps` (+ 1) tiles of 1 KiB); `out` takes C(i, j) at `(2i + j)·256`.
pub struct PairJob {
    cfg: *const TileConfig,
    w: [*const u16; 2],
    w_stride: usize,
    steps: usize,
    tail: *const u16,
    packed: *const u16,
    out: *mut f32,
}

/// What runs a [`TileJob`] or a [`PairJob`]: the tile instructions, or a scalar model of them.
pub trait TileUnit {
    /// # Safety
    /// The job's pointers must be valid for the extents its config and `steps` describe; for
    /// [`Hardware`], the CPU must have AMX-TILE and AMX-BF16 and the OS must have granted the
    /// process the tile state.
    unsafe fn run<const FAST: bool>(job: &TileJob);
    /// # Safety
    /// As [`TileUnit::run`].
    unsafe fn run_pair<const FAST: bool>(job: &PairJob);
}

/// `ldtilecfg`, `tilezero`, `tileloadd`, `tdpbf16ps`, `tilestored`, `tilerelease`.
pub struct Hardware;

/// One tile's `ldtilecfg … tilerelease` block ([`TileJob`]); `$lo` are the exact mode's extra
/// lines after each hi product (none in fast mode), `$ops` its extra operands.
macro_rules! single_tile_block {
    ($j:expr, [$($lo:literal),*], $($ops:tt)*) => {
        core::arch::asm!(
            "ldtilecfg [{cfg}]",
            "tilezero tmm0",
            "test {steps}, {steps}",
            "jz 3f",
            "2:",
            "tileloadd tmm1, [{w} + {ws} * 1]",
            "tileloadd tmm2, [{hi} + {row} * 1]",
            "tdpbf16ps tmm0, tmm1, tmm2",
            $($lo,)*
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
            $($lo,)*
            "4:",
            "tilestored [{out} + {row} * 1], tmm0",
            "tilerelease",
            cfg = in(reg) $j.cfg,
            w = inout(reg) $j.w => _,
            ws = in(reg) $j.w_stride,
            hi = inout(reg) $j.hi => _,
            steps = inout(reg) $j.steps => _,
            tail = in(reg) $j.tail,
            // Rows of packed B tiles, of the tail buffer and of the output buffer are 64 bytes apart.
            row = in(reg) 64usize,
            out = in(reg) $j.out,
            $($ops)*
            options(nostack),
        )
    };
}

/// A [`PairJob`]'s block, as [`single_tile_block`]: four C tiles (tmm0–3), two A (tmm4–5), two B
/// (tmm6–7; hi, then lo in exact mode). `out` takes the C tiles 1 KiB apart; the tail buffer holds
/// weight tile 1 from its byte 1024.
macro_rules! pair_block {
    ($j:expr, [$($lo:literal),*], $($ops:tt)*) => {
        core::arch::asm!(
            "ldtilecfg [{cfg}]",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "test {steps}, {steps}",
            "jz 3f",
            "2:",
            "tileloadd tmm4, [{w0} + {ws} * 1]",
            "tileloadd tmm5, [{w1} + {ws} * 1]",
            "tileloadd tmm6, [{p} + {row} * 1]",
            "tileloadd tmm7, [{p} + {row} * 1 + {hi1}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            $($lo,)*
            "add {w0}, 64",
            "add {w1}, 64",
            "add {p}, 1024",
            "dec {steps}",
            "jnz 2b",
            "3:",
            "test {tail}, {tail}",
            "jz 4f",
            "tileloadd tmm4, [{tail} + {row} * 1]",
            "tileloadd tmm5, [{tail} + {row} * 1 + 1024]",
            "tileloadd tmm6, [{p} + {row} * 1]",
            "tileloadd tmm7, [{p} + {row} * 1 + {hi1}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            $($lo,)*
            "4:",
            "tilestored [{out} + {row} * 1], tmm0",
            "tilestored [{out} + {row} * 1 + 1024], tmm1",
            "tilestored [{out} + {row} * 1 + 2048], tmm2",
            "tilestored [{out} + {row} * 1 + 3072], tmm3",
            "tilerelease",
            cfg = in(reg) $j.cfg,
            w0 = inout(reg) $j.w[0] => _,
            w1 = inout(reg) $j.w[1] => _,
            ws = in(reg) $j.w_stride,
            p = inout(reg) $j.packed => _,
            steps = inout(reg) $j.steps => _,
            tail = in(reg) $j.tail,
            row = in(reg) 64usize,
            out = in(reg) $j.out,
            hi1 = const HI1,
            $($ops)*
            options(nostack),
        )
    };
}

impl TileUnit for Hardware {
    unsafe fn run<const FAST: bool>(j: &TileJob) {
        if FAST {
            single_tile_block!(j, [],);
        } else {
            // lo lies LO0 bytes after hi (the packed block's layout, which `TileJob` states).
            debug_assert_eq!(j.lo, j.hi.add(LO0 / 2));
            single_tile_block!(j, ["tileloadd tmm3, [{hi} + {row} * 1 + {lo0}]", "tdpbf16ps tmm0, tmm1, tmm3"], lo0 = const LO0,);
        }
    }

    unsafe fn run_pair<const FAST: bool>(j: &PairJob) {
        if FAST {
            pair_block!(j, [],);
        } else {
            pair_block!(
                j,
                [
                    "tileloadd tmm6, [{p} + {row} * 1 + {lo0}]",
                    "tileloadd tmm7, [{p} + {row} * 1 + {lo1}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7"
                ],
                lo0 = const LO0,
                lo1 = const LO1,
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

    /// The four C tiles one at a time, each as the single-tile job over the same operands: in the
    /// instructions each C tile takes the same products in the same order either way.
    unsafe fn run_pair<const FAST: bool>(j: &PairJob) {
        let cfg = &*j.cfg;
        for i in 0..2 {
            for t in 0..2 {
                let single = TileConfig::new(cfg.rows(4 + i), cfg.colsb(6 + t) / 4);
                let panel = j.packed.add(t * PANEL_U16);
                let job = TileJob {
                    cfg: &single,
                    w: j.w[i],
                    w_stride: j.w_stride,
                    steps: j.steps,
                    tail: if j.tail.is_null() { j.tail } else { j.tail.add(i * WR * KS) },
                    hi: panel,
                    lo: panel.add(2 * PANEL_U16),
                    out: j.out.add((2 * i + t) * 256),
                };
                Self::run::<FAST>(&job);
            }
        }
    }
}

/// `c[i·ldc + j] (+)= Σ_l a[i·lda + l] · b[j·ldb + l]`, as [`super::gemm_raw`], on the tiles.
///
/// # Safety
/// As [`super::gemm_raw`]; the CPU must have AMX-TILE, AMX-BF16 and AVX512-BF16, and the OS must
/// have granted the process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)` on Linux).
pub unsafe fn gemm(p: Product<bf16>, mode: MatmulMode, panels: &mut Panels) {
    gemm_on::<Hardware>(Plan::BEST, p, mode == MatmulMode::Fast, panels)
}

/// What runs the tile instructions of [`gemm_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiles {
    /// The CPU ([`Hardware`]; or the host's trap emulator on a CPU without AMX).
    Hardware,
    /// The scalar model ([`Emulated`]), on any x86-64 CPU: the test of everything but the tile
    /// instructions.
    Emulated,
    /// None: the result tiles read as whatever the buffer held. The packing, tail copies and
    /// transposed adds alone, which `gemm_sweep amx` times on any CPU with AVX512-BF16.
    Skipped,
    /// As `Skipped`, plus every byte the tile loads would read (weights and packed activations),
    /// read by AVX-512 loads: what the blocking costs in memory traffic, without the tiles.
    Loads,
}

/// [`gemm`] with another [`Plan`], on `tiles` (what the tests and `gemm_sweep` compare).
///
/// # Safety
/// As [`super::gemm_raw`]; AVX512-BF16 where `plan.avx512`; for [`Tiles::Hardware`], as [`gemm`].
#[doc(hidden)]
pub unsafe fn gemm_with(tiles: Tiles, plan: Plan, p: Product<bf16>, mode: MatmulMode, panels: &mut Panels) {
    let fast = mode == MatmulMode::Fast;
    match tiles {
        Tiles::Hardware => gemm_on::<Hardware>(plan, p, fast, panels),
        Tiles::Emulated => gemm_on::<Emulated>(plan, p, fast, panels),
        Tiles::Skipped => gemm_on::<NoTiles>(plan, p, fast, panels),
        Tiles::Loads => gemm_on::<TouchTiles>(plan, p, fast, panels),
    }
}

/// `c (+)= a · (hi + lo)ᵀ` for an f32 weight held as its bf16 halves
/// ([`crate::weight::SplitHalves`]): `hi` is the product over the hi half, `lo` the lo half's first
/// row, laid out as `hi.b` (row stride `hi.ldb`). `a·hi`, then `a·lo` added, both
/// in the call's mode. Four `tdpbf16ps` a tile product exact, two fast; two passes over the
/// activations (one pass feeding both halves is for the AMX machine to try). Exact mode keeps
/// `a_lo·lo` (≤ 2⁻¹⁸ of the product): dropped, the tiny gated-DeltaNet goldens' logits moved by
/// 1.05e-4 (past FORMATS.md §8's 1e-4; with it 5.9e-5, bf16-stored weights 2.9e-5).
///
/// # Safety
/// As [`gemm_with`], for `hi` and `lo` alike.
pub unsafe fn gemm_split_with(tiles: Tiles, hi: Product<bf16>, lo: *const bf16, mode: MatmulMode, panels: &mut Panels) {
    gemm_with(tiles, Plan::BEST, hi, mode, panels);
    gemm_with(tiles, Plan::BEST, Product { acc: true, ..hi.with_b(lo) }, mode, panels);
}

/// Reads what the tile loads would ([`Tiles::Loads`]) and multiplies nothing.
struct TouchTiles;

impl TouchTiles {
    /// XOR of `rows` 64-byte rows `stride` bytes apart.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    unsafe fn rows(p: *const u16, rows: usize, stride: usize) -> __m512i {
        let mut x = _mm512_setzero_si512();
        for r in 0..rows {
            x = _mm512_xor_si512(x, _mm512_loadu_si512((p as *const u8).add(r * stride) as *const _));
        }
        x
    }

    /// Every load of a single-tile job over `steps` (+ the tail): A, B hi (and lo).
    unsafe fn job<const FAST: bool>(
        w: *const u16,
        stride: usize,
        steps: usize,
        wr: usize,
        hi: *const u16,
        out: *mut f32,
    ) {
        let mut x = _mm512_setzero_si512();
        for s in 0..steps {
            x = _mm512_xor_si512(x, Self::rows(w.add(s * KS), wr, stride));
            x = _mm512_xor_si512(x, Self::rows(hi.add(s * TILE_U16), 16, 64));
            if !FAST {
                x = _mm512_xor_si512(x, Self::rows(hi.add(s * TILE_U16 + LO0 / 2), 16, 64));
            }
        }
        *out = core::mem::transmute::<__m512i, [f32; 16]>(x)[0];
    }
}

impl TileUnit for TouchTiles {
    unsafe fn run<const FAST: bool>(j: &TileJob) {
        Self::job::<FAST>(j.w, j.w_stride, j.steps, (*j.cfg).rows(0), j.hi, j.out);
    }
    unsafe fn run_pair<const FAST: bool>(j: &PairJob) {
        let cfg = &*j.cfg;
        // Each A tile once and each B tile once a step, as the pair's loads.
        Self::job::<FAST>(j.w[0], j.w_stride, j.steps, cfg.rows(4), j.packed, j.out);
        Self::job::<true>(j.w[1], j.w_stride, j.steps, cfg.rows(5), j.packed.add(HI1 / 2), j.out.add(256));
        if !FAST {
            Self::job::<true>(j.w[1], 0, j.steps, 0, j.packed.add(LO1 / 2), j.out.add(512));
        }
    }
}

/// Runs no tile instruction ([`Tiles::Skipped`]).
struct NoTiles;

impl TileUnit for NoTiles {
    unsafe fn run<const FAST: bool>(_: &TileJob) {}
    unsafe fn run_pair<const FAST: bool>(_: &PairJob) {}
}

/// Where one activation block's results go: `c` at its first row, and whether to add.
#[derive(Clone, Copy)]
struct Dst {
    c: *mut f32,
    ldc: usize,
    add: bool,
    avx512: bool,
}

unsafe fn gemm_on<T: TileUnit>(plan: Plan, p: Product<bf16>, fast: bool, panels: &mut Panels) {
    let Product { m, n, k, a, lda, b, ldb, c, ldc, acc } = p;
    if k == 0 {
        if !acc {
            super::clear(m, n, c, ldc);
        }
        return;
    }
    if plan.chunks {
        // Weight rows per chunk: a multiple of 32 (whole pairs of tiles).
        let nc = (L2_WEIGHTS / (2 * k) / 32 * 32).max(32);
        let whole = Plan { chunks: false, ..plan };
        for n0 in (0..n).step_by(nc) {
            gemm_on::<T>(whole, p.part(0, n0, m, nc.min(n - n0)), fast, panels);
        }
        return;
    }
    // In the caller's panels: the packed panels (hi 0, hi 1, lo 0, lo 1; module doc), then two
    // weight tiles' K tails (16 rows × 32 bf16 each) and the result tiles, those two zeroed so the
    // arrays below view initialised memory (`Tiles::Skipped` reads the result tiles unstored).
    let packed = panels.as_mut_ptr() as *mut u16;
    let tail = packed.add(4 * PANEL_U16);
    core::ptr::write_bytes(tail, 0, TAIL_U16);
    let tail = &mut *(tail as *mut [u16; TAIL_U16]);
    let out = packed.add(4 * PANEL_U16 + TAIL_U16) as *mut f32;
    core::ptr::write_bytes(out, 0, OUT_F32);
    let out = &mut *(out as *mut [f32; OUT_F32]);
    let b = b as *const u16;
    let mut i0 = 0;
    while i0 < m {
        let ar = [(m - i0).min(AR), (m - i0).saturating_sub(AR).min(AR)];
        let tiles = if ar[1] > 0 { 2 } else { 1 };
        let mut l0 = 0;
        while l0 < k {
            let kc = (k - l0).min(KC);
            let (steps, has_tail) = (kc / KS, !kc.is_multiple_of(KS));
            for (t, &rows) in ar.iter().enumerate().take(tiles) {
                let panel = packed.add(t * PANEL_U16);
                let src = a.add((i0 + t * AR) * lda + l0);
                pack(src, lda, rows, kc, panel, panel.add(2 * PANEL_U16), fast, plan.avx512);
            }
            // The first K block stores (or adds, under `acc`); later ones add.
            let dst = Dst { c: c.add(i0 * ldc), ldc, add: acc || l0 > 0, avx512: plan.avx512 };
            let mut j0 = 0;
            while j0 < n {
                let w = b.add(j0 * ldb + l0);
                let tail_ptr = if has_tail { tail.as_ptr() } else { core::ptr::null() };
                if plan.pairs && tiles == 2 && n - j0 > WR {
                    let wr = [WR, (n - j0 - WR).min(WR)];
                    if has_tail {
                        copy_tail(w, ldb, wr[0] + wr[1], steps * KS, kc, tail);
                    }
                    let cfg = TileConfig::pair(wr, ar);
                    let job = PairJob {
                        cfg: &cfg,
                        w: [w, w.add(WR * ldb)],
                        w_stride: ldb * 2,
                        steps,
                        tail: tail_ptr,
                        packed,
                        out: out.as_mut_ptr(),
                    };
                    if fast {
                        T::run_pair::<true>(&job);
                    } else {
                        T::run_pair::<false>(&job);
                    }
                    for i in 0..2 {
                        for t in 0..2 {
                            add_tile(&out[(2 * i + t) * 256..], wr[i], ar[t], dst, t * AR, j0 + i * WR);
                        }
                    }
                    j0 += wr[0] + wr[1];
                } else {
                    let wr = (n - j0).min(WR);
                    if has_tail {
                        copy_tail(w, ldb, wr, steps * KS, kc, tail);
                    }
                    for (t, &rows) in ar.iter().enumerate().take(tiles) {
                        let cfg = TileConfig::new(wr, rows);
                        let panel = packed.add(t * PANEL_U16);
                        let job = TileJob {
                            cfg: &cfg,
                            w,
                            w_stride: ldb * 2,
                            steps,
                            tail: tail_ptr,
                            hi: panel,
                            lo: panel.add(2 * PANEL_U16),
                            out: out.as_mut_ptr(),
                        };
                        if fast {
                            T::run::<true>(&job);
                        } else {
                            T::run::<false>(&job);
                        }
                        add_tile(&out[..], wr, rows, dst, t * AR, j0);
                    }
                    j0 += wr;
                }
            }
            l0 += kc;
        }
        i0 += tiles * AR;
    }
}

/// Copies columns `from..kc` of `rows` weight rows into `tail` (rows of 32 bf16, zero past them).
unsafe fn copy_tail(w: *const u16, ldb: usize, rows: usize, from: usize, kc: usize, tail: &mut [u16; TAIL_U16]) {
    tail.fill(0);
    for r in 0..rows {
        core::ptr::copy_nonoverlapping(w.add(r * ldb + from), tail.as_mut_ptr().add(r * KS), kc - from);
    }
}

/// Adds (or stores) result tile `tile` (`wr` weight rows × `ar` activation rows, rows 16 f32
/// apart) transposed into `dst`: `c[(s0 + s)·ldc + j0 + r] (+)= tile[r·16 + s]`.
unsafe fn add_tile(tile: &[f32], wr: usize, ar: usize, dst: Dst, s0: usize, j0: usize) {
    let c = dst.c.add(s0 * dst.ldc + j0);
    if dst.avx512 {
        return add_tile_avx512(tile.as_ptr(), wr, ar, c, dst.ldc, dst.add);
    }
    for r in 0..wr {
        for s in 0..ar {
            let v = tile[r * 16 + s];
            let o = c.add(s * dst.ldc + r);
            *o = if dst.add { *o + v } else { v };
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn add_tile_avx512(tile: *const f32, wr: usize, ar: usize, c: *mut f32, ldc: usize, add: bool) {
    let mut v = [_mm512_setzero_si512(); 16];
    for (r, v) in v.iter_mut().enumerate().take(wr) {
        *v = _mm512_loadu_si512(tile.add(r * 16) as *const _);
    }
    transpose16(&mut v);
    let mask = super::bf16::mask16(wr);
    for (s, v) in v.iter().enumerate().take(ar) {
        let o = c.add(s * ldc);
        let mut x = _mm512_castsi512_ps(*v);
        if add {
            x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), x);
        }
        _mm512_mask_storeu_ps(o, mask, x);
    }
}

/// Transposes a 16 × 16 matrix of 32-bit elements held as 16 rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    // 2 × 2 blocks of elements, then of pairs (64-bit), then of 128-bit and 256-bit lanes.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b) = (4 * i, 4 * i + 2);
        r[4 * i] = _mm512_unpacklo_epi64(t[a], t[b]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[a], t[b]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[a + 1], t[b + 1]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[a + 1], t[b + 1]);
    }
    // Now row 4q + e holds, in each 128-bit lane L, column 4L + e's elements of rows 4q..4q+4.
    for q in 0..2 {
        for e in 0..4 {
            let (a, b) = (8 * q + e, 8 * q + 4 + e);
            t[8 * q + e] = _mm512_shuffle_i32x4::<0x88>(r[a], r[b]);
            t[8 * q + 4 + e] = _mm512_shuffle_i32x4::<0xdd>(r[a], r[b]);
        }
    }
    for e in 0..8 {
        r[e] = _mm512_shuffle_i32x4::<0x88>(t[e], t[8 + e]);
        r[8 + e] = _mm512_shuffle_i32x4::<0xdd>(t[e], t[8 + e]);
    }
}

/// Packs `ar` activation rows × `kc` columns into B tiles (module doc): tile `t`, row `k2`, pair
/// `s` holds row `s`'s columns `32·t + 2·k2` and `+ 1`, as bf16 hi (and lo unless `fast`); columns
/// past `kc` and pairs past `ar` are zero.
#[allow(clippy::too_many_arguments)]
unsafe fn pack(a: *const f32, lda: usize, ar: usize, kc: usize, hi: *mut u16, lo: *mut u16, fast: bool, avx512: bool) {
    if avx512 {
        return pack_avx512(a, lda, ar, kc, hi, lo, fast);
    }
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

/// [`pack`]: each row's 32 columns split by [`super::bf16::split32`] into 16 pairs, then the 16 rows
/// × 16 pairs transposed into a B tile's 16 rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_avx512(a: *const f32, lda: usize, ar: usize, kc: usize, hi: *mut u16, lo: *mut u16, fast: bool) {
    let mut h = [_mm512_setzero_si512(); 16];
    let mut w = [_mm512_setzero_si512(); 16];
    for t in 0..kc.div_ceil(KS) {
        let left = kc - t * KS;
        let (m0, m1) = (super::bf16::mask16(left), super::bf16::mask16(left.saturating_sub(16)));
        for s in 0..AR {
            (h[s], w[s]) = if s < ar {
                let x = a.add(s * lda + t * KS);
                super::bf16::split32(_mm512_maskz_loadu_ps(m0, x), _mm512_maskz_loadu_ps(m1, x.add(16)), fast)
            } else {
                (_mm512_setzero_si512(), _mm512_setzero_si512())
            };
        }
        transpose16(&mut h);
        for (k2, v) in h.iter().enumerate() {
            _mm512_storeu_si512(hi.add(t * TILE_U16 + k2 * KS) as *mut _, *v);
        }
        if !fast {
            transpose16(&mut w);
            for (k2, v) in w.iter().enumerate() {
                _mm512_storeu_si512(lo.add(t * TILE_U16 + k2 * KS) as *mut _, *v);
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

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// The AVX-512 transpose against the definition, on every 16 × 16 position.
    #[test]
    fn transpose16_transposes() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: [[u32; 16]; 16] = core::array::from_fn(|i| core::array::from_fn(|j| (i * 100 + j) as u32));
        // SAFETY: AVX-512F checked above.
        let got = unsafe {
            let mut v: [__m512i; 16] = core::array::from_fn(|i| _mm512_loadu_si512(m[i].as_ptr() as *const _));
            transpose16(&mut v);
            v.map(|r| core::mem::transmute::<__m512i, [u32; 16]>(r))
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[i][j], m[j][i], "({i}, {j})");
            }
        }
    }
}
