//! The AMX tile unit emulated by trapping, for CPUs without AMX: the compiled `asm!` blocks of
//! `stuffed_core::gemm::amx::Hardware` execute as they would on an AMX CPU, and each tile
//! instruction, which raises SIGILL here, is decoded from the faulting address, carried out on a
//! per-thread model of the eight tiles, and stepped over. What it checks that the scalar model
//! (`Emulated`) cannot: the instructions as assembled — their encodings, which tile each names, the
//! tile config as loaded, the base, stride and displacement the register allocator chose, the loop
//! around them. What it cannot check: the CPU's own rounding order inside `tdpbf16ps` (this uses
//! the scalar model's, [`stuffed_core::gemm::amx::tdpbf16ps_model`]) and speed.
//!
//! Used by [`crate::exec::amx_state`] under the cargo feature `amx-emu` (then a CPU without AMX
//! reports [`crate::exec::AmxState::Emulated`] and every AMX-level test runs through here), and by
//! the kernel contract directly. A tile instruction the CPU would fault on (#UD / #GP: tiles not
//! configured, shapes that do not fit, a bad config) prints one line and ends the process with
//! SIGILL, as the CPU would; any other SIGILL (`ud2` of an abort) goes to the handler that was there
//! before.
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use stuffed_core::gemm::amx::{tdpbf16ps_model, DpShape};

/// How many of each tile instruction this process emulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ldtilecfg: u64,
    pub sttilecfg: u64,
    pub tilerelease: u64,
    pub tilezero: u64,
    pub tileloadd: u64,
    pub tilestored: u64,
    pub tdpbf16ps: u64,
}

static COUNTS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

thread_local! {
    /// [`COUNTS`] of this thread alone (what a test calling the kernel directly checks).
    static THREAD_COUNTS: [std::cell::Cell<u64>; 7] = const { [const { std::cell::Cell::new(0) }; 7] };
}

/// The tile instructions the kernel uses (and `sttilecfg`), in [`COUNTS`]' order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    LdTileCfg,
    StTileCfg,
    TileRelease,
    TileZero,
    TileLoadD,
    TileStoreD,
    TdpBf16Ps,
}

/// The counts so far, over the process.
pub fn counts() -> Counts {
    Counts::from(|op: Op| COUNTS[op as usize].load(Ordering::Relaxed))
}

/// The counts so far, of the calling thread's instructions.
pub fn thread_counts() -> Counts {
    THREAD_COUNTS.with(|t| Counts::from(|op: Op| t[op as usize].get()))
}

impl Counts {
    fn from(c: impl Fn(Op) -> u64) -> Counts {
        Counts {
            ldtilecfg: c(Op::LdTileCfg),
            sttilecfg: c(Op::StTileCfg),
            tilerelease: c(Op::TileRelease),
            tilezero: c(Op::TileZero),
            tileloadd: c(Op::TileLoadD),
            tilestored: c(Op::TileStoreD),
            tdpbf16ps: c(Op::TdpBf16Ps),
        }
    }
}

/// One thread's tile state: palette 0 (released) or 1 with each tile's rows and bytes per row.
struct Tiles {
    palette: u8,
    rows: [u8; 8],
    colsb: [u16; 8],
    data: [[[u8; 64]; 16]; 8],
}

impl Tiles {
    const RELEASED: Tiles = Tiles { palette: 0, rows: [0; 8], colsb: [0; 8], data: [[[0; 64]; 16]; 8] };

    /// A tile an instruction may use: configured, with rows.
    fn valid(&self, t: usize) -> bool {
        self.palette == 1 && self.rows[t] > 0
    }
}

thread_local! {
    static TILES: UnsafeCell<Tiles> = const { UnsafeCell::new(Tiles::RELEASED) };
}

/// A decoded memory operand: `base + disp` and the SIB index scaled (a tile load's row stride).
#[derive(Clone, Copy, Debug)]
struct Mem {
    base: u64,
    index: u64,
}

/// One decoded tile instruction.
#[derive(Clone, Copy, Debug)]
struct Insn {
    op: Op,
    len: usize,
    /// ModRM.reg (+ VEX.R): the tile of `tilezero`, `tileloadd`, `tilestored`, `tdpbf16ps`'s destination.
    reg: usize,
    /// ModRM.rm (+ VEX.B) of a register form: `tdpbf16ps`'s first source.
    rm: usize,
    /// VEX.vvvv: `tdpbf16ps`'s second source.
    vvvv: usize,
    mem: Option<Mem>,
}

/// `gregs` index of x86-64 register number `r` (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8…r15).
fn greg(r: usize) -> usize {
    const MAP: [libc::c_int; 16] = [
        libc::REG_RAX,
        libc::REG_RCX,
        libc::REG_RDX,
        libc::REG_RBX,
        libc::REG_RSP,
        libc::REG_RBP,
        libc::REG_RSI,
        libc::REG_RDI,
        libc::REG_R8,
        libc::REG_R9,
        libc::REG_R10,
        libc::REG_R11,
        libc::REG_R12,
        libc::REG_R13,
        libc::REG_R14,
        libc::REG_R15,
    ];
    MAP[r] as usize
}

/// Decodes the VEX-encoded tile instruction at `p` (None: not one of [`Op`]'s, or a form the
/// kernel never uses).
///
/// # Safety
/// `p` must point at an instruction's first byte, readable for its length.
unsafe fn decode(p: *const u8, g: &[libc::greg_t; 23]) -> Option<Insn> {
    let b = |i: usize| *p.add(i);
    // Three-byte VEX: C4, ~R ~X ~B mmmmm, W ~vvvv L pp. Tile instructions are map 0F38, W0, L0.
    if b(0) != 0xC4 || b(1) & 0x1F != 0b00010 || b(2) & 0x84 != 0 {
        return None;
    }
    let (vr, vx, vb) = ((!b(1) >> 7) & 1, (!b(1) >> 6) & 1, (!b(1) >> 5) & 1);
    let vvvv = ((!b(2) >> 3) & 0xF) as usize;
    let pp = b(2) & 3;
    let (opcode, modrm) = (b(3), b(4));
    let (md, reg, rm) = (modrm >> 6, ((modrm >> 3) & 7) | (vr << 3), modrm & 7);
    let mut len = 5;
    let mut mem = None;
    if md != 3 {
        let reg_value = |r: usize| g[greg(r)] as u64;
        let (mut base, mut index) = (0u64, 0u64);
        let mut no_base = false;
        if rm == 4 {
            let sib = b(5);
            len += 1;
            let (scale, idx, bs) = (sib >> 6, ((sib >> 3) & 7) | (vx << 3), (sib & 7) | (vb << 3));
            if idx != 4 {
                index = reg_value(idx as usize) << scale;
            }
            if md == 0 && bs & 7 == 5 {
                no_base = true;
            } else {
                base = reg_value(bs as usize);
            }
        } else if md == 0 && rm == 5 {
            return None; // RIP-relative: never a tile operand here.
        } else {
            base = reg_value((rm | (vb << 3)) as usize);
        }
        let disp = match (md, no_base) {
            (0, false) => 0i64,
            (1, _) => {
                len += 1;
                *p.add(len - 1) as i8 as i64
            }
            _ => {
                len += 4;
                i32::from_le_bytes([b(len - 4), b(len - 3), b(len - 2), b(len - 1)]) as i64
            }
        };
        mem = Some(Mem { base: base.wrapping_add(disp as u64), index });
    }
    let op = match (opcode, pp, md == 3) {
        (0x49, 0, false) if reg & 7 == 0 => Op::LdTileCfg,
        (0x49, 1, false) if reg & 7 == 0 => Op::StTileCfg,
        (0x49, 0, true) if modrm == 0xC0 => Op::TileRelease,
        (0x49, 3, true) if rm == 0 => Op::TileZero,
        (0x4B, 3, false) => Op::TileLoadD,
        (0x4B, 2, false) => Op::TileStoreD,
        (0x5C, 2, true) => Op::TdpBf16Ps,
        _ => return None,
    };
    // Tiles are tmm0–7: a set VEX.R / VEX.B or vvvv ≥ 8 is a #UD on the CPU.
    if reg > 7 || (md == 3 && vb == 1) || (op == Op::TdpBf16Ps && vvvv > 7) {
        return None;
    }
    // `tileloadd` / `tilestored` take only SIB forms.
    if matches!(op, Op::TileLoadD | Op::TileStoreD) && rm != 4 {
        return None;
    }
    Some(Insn { op, len, reg: reg as usize, rm: (rm | (vb << 3)) as usize, vvvv, mem })
}

/// Why the CPU would fault: the process then ends as it would there.
type Fault = &'static str;

/// Carries out `insn` on this thread's tiles.
///
/// # Safety
/// The instruction's memory operands must be what the program meant them to be (they are read and
/// written as the CPU would).
unsafe fn execute(t: &mut Tiles, insn: &Insn) -> Result<(), Fault> {
    let need = |ok: bool, why: Fault| if ok { Ok(()) } else { Err(why) };
    match insn.op {
        Op::LdTileCfg => {
            let cfg = insn.mem.unwrap().base as *const u8;
            let mut c = [0u8; 64];
            core::ptr::copy_nonoverlapping(cfg, c.as_mut_ptr(), 64);
            *t = Tiles::RELEASED;
            if c[0] == 0 {
                return Ok(());
            }
            need(c[0] == 1, "ldtilecfg: palette other than 0 or 1 (#GP)")?;
            need(c[1] == 0, "ldtilecfg: start_row not 0 (unused by the kernel)")?;
            need(c[2..16].iter().all(|&x| x == 0), "ldtilecfg: reserved bytes 2-15 set (#GP)")?;
            need(
                c[32..48].iter().all(|&x| x == 0) && c[56..64].iter().all(|&x| x == 0),
                "ldtilecfg: tiles 8-15 configured (#GP)",
            )?;
            for i in 0..8 {
                let colsb = u16::from_le_bytes([c[16 + 2 * i], c[17 + 2 * i]]);
                let rows = c[48 + i];
                need(rows <= 16 && colsb <= 64, "ldtilecfg: a tile over 16 rows or 64 bytes (#GP)")?;
                need(
                    (rows == 0) == (colsb == 0),
                    "ldtilecfg: a tile with rows but no bytes, or bytes but no rows (#GP)",
                )?;
                t.rows[i] = rows;
                t.colsb[i] = colsb;
            }
            t.palette = 1;
        }
        Op::StTileCfg => {
            let mut c = [0u8; 64];
            if t.palette == 1 {
                c[0] = 1;
                for i in 0..8 {
                    c[16 + 2 * i..18 + 2 * i].copy_from_slice(&t.colsb[i].to_le_bytes());
                    c[48 + i] = t.rows[i];
                }
            }
            core::ptr::copy_nonoverlapping(c.as_ptr(), insn.mem.unwrap().base as *mut u8, 64);
        }
        Op::TileRelease => *t = Tiles::RELEASED,
        Op::TileZero => {
            need(t.valid(insn.reg), "tilezero: tile not configured (#UD)")?;
            t.data[insn.reg] = [[0; 64]; 16];
        }
        Op::TileLoadD | Op::TileStoreD => {
            let i = insn.reg;
            need(t.valid(i), "tileloadd / tilestored: tile not configured (#UD)")?;
            let m = insn.mem.unwrap();
            let (rows, colsb) = (t.rows[i] as usize, t.colsb[i] as usize);
            for r in 0..16 {
                let at = m.base.wrapping_add(m.index.wrapping_mul(r as u64)) as *mut u8;
                let row = &mut t.data[i][r];
                if insn.op == Op::TileLoadD {
                    // Bytes past colsb and rows past rows read as zero.
                    *row = [0; 64];
                    if r < rows {
                        core::ptr::copy_nonoverlapping(at as *const u8, row.as_mut_ptr(), colsb);
                    }
                } else if r < rows {
                    core::ptr::copy_nonoverlapping(row.as_ptr(), at, colsb);
                }
            }
        }
        Op::TdpBf16Ps => {
            let (d, a, b) = (insn.reg, insn.rm, insn.vvvv);
            need(d != a && d != b && a != b, "tdpbf16ps: a tile named twice (#UD)")?;
            need(t.valid(d) && t.valid(a) && t.valid(b), "tdpbf16ps: tile not configured (#UD)")?;
            let (cb, ab, bb) = (t.colsb[d] as usize, t.colsb[a] as usize, t.colsb[b] as usize);
            need(cb % 4 == 0 && ab % 4 == 0 && bb % 4 == 0, "tdpbf16ps: bytes per row not a multiple of 4 (#UD)")?;
            need(t.rows[d] == t.rows[a], "tdpbf16ps: C and A rows differ (#UD)")?;
            need(cb == bb, "tdpbf16ps: C and B bytes per row differ (#UD)")?;
            need(ab / 4 == t.rows[b] as usize, "tdpbf16ps: B rows are not A's pairs per row (#UD)")?;
            let shape = DpShape { rows: t.rows[d] as usize, cols: cb / 4, pairs: ab / 4 };
            let mut c = [[0f32; 16]; 16];
            for (r, row) in c.iter_mut().enumerate() {
                for (s, v) in row.iter_mut().enumerate() {
                    *v = f32::from_le_bytes(t.data[d][r][4 * s..4 * s + 4].try_into().unwrap());
                }
            }
            let (ap, bp) = (t.data[a].as_ptr() as *const u16, t.data[b].as_ptr() as *const u16);
            tdpbf16ps_model(shape, &mut c, ap, 64, bp, 64);
            // The rows written keep only C's bytes; the rest of the tile reads as zero after.
            let dst = &mut t.data[d];
            *dst = [[0; 64]; 16];
            for r in 0..shape.rows {
                for s in 0..shape.cols {
                    dst[r][4 * s..4 * s + 4].copy_from_slice(&c[r][s].to_le_bytes());
                }
            }
        }
    }
    COUNTS[insn.op as usize].fetch_add(1, Ordering::Relaxed);
    THREAD_COUNTS.with(|t| t[insn.op as usize].set(t[insn.op as usize].get() + 1));
    Ok(())
}

/// The SIGILL action that was installed before ours.
struct Previous(libc::sigaction);
// SAFETY: a plain C struct of integers and function addresses, written once before it is read.
unsafe impl Sync for Previous {}
unsafe impl Send for Previous {}
static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// Puts the previous SIGILL action back, so the faulting instruction, run again, reaches it.
fn give_up(why: Option<Fault>) {
    if let Some(why) = why {
        let mut line = [0u8; 160];
        let head = b"stuffed: emulated AMX tile unit: ";
        let n = head.len().min(line.len());
        line[..n].copy_from_slice(&head[..n]);
        let m = why.len().min(line.len() - n - 1);
        line[n..n + m].copy_from_slice(&why.as_bytes()[..m]);
        line[n + m] = b'\n';
        // SAFETY: write(2) is async-signal-safe; `line` outlives the call.
        unsafe { libc::write(2, line.as_ptr() as *const libc::c_void, n + m + 1) };
    }
    if let Some(prev) = PREVIOUS.get() {
        // SAFETY: sigaction is async-signal-safe; `prev.0` is the action read at install.
        unsafe { libc::sigaction(libc::SIGILL, &prev.0, std::ptr::null_mut()) };
    }
}

extern "C" fn on_sigill(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a ucontext_t for an SA_SIGINFO handler; the faulting instruction's
    // bytes are mapped (they were just fetched).
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let g = &mut uc.uc_mcontext.gregs;
        let rip = g[libc::REG_RIP as usize] as *const u8;
        let Some(insn) = decode(rip, g) else {
            return give_up(None);
        };
        match TILES.with(|t| execute(&mut *t.get(), &insn)) {
            Ok(()) => g[libc::REG_RIP as usize] += insn.len as i64,
            Err(why) => give_up(Some(why)),
        }
    }
}

/// Whether the CPU advertises AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22).
pub fn cpu_has_amx() -> bool {
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    (l7.edx >> 24) & 1 == 1 && (l7.edx >> 22) & 1 == 1
}

/// Installs the trap handler, once a process. Refused on a CPU with AMX (its tile instructions do
/// not trap there once the OS grants them, so nothing would be emulated).
pub fn install() -> Result<(), String> {
    if cpu_has_amx() {
        return Err("the CPU has AMX: its tile instructions run on the CPU".into());
    }
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: sigaction with a zeroed, then filled, struct; the handler only touches the
        // faulting thread's tiles, atomics and async-signal-safe calls.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGILL, std::ptr::null(), &mut old) != 0 {
                return Err(format!("sigaction(SIGILL): {}", std::io::Error::last_os_error()));
            }
            let _ = PREVIOUS.set(Previous(old));
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigill as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGILL, &act, std::ptr::null_mut()) != 0 {
                return Err(format!("sigaction(SIGILL): {}", std::io::Error::last_os_error()));
            }
        }
        Ok(())
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodings from the Intel SDM (and as GNU as assembles them), decoded with registers that
    /// need VEX.X / VEX.B, a displacement and no base: the decoder's own contract, independent of
    /// what the compiler emitted.
    #[test]
    fn decodes_the_sdm_encodings() {
        let mut g: [libc::greg_t; 23] = [0; 23];
        g[greg(0)] = 0x1000; // rax
        g[greg(3)] = 0x40; // rbx
        g[greg(13)] = 0x2000; // r13
        g[greg(9)] = 0x80; // r9
        let cases: &[(&[u8], Op, usize, u64, u64)] = &[
            // ldtilecfg [rax]
            (&[0xC4, 0xE2, 0x78, 0x49, 0x00], Op::LdTileCfg, 0, 0x1000, 0),
            // sttilecfg [rax + 8]
            (&[0xC4, 0xE2, 0x79, 0x49, 0x40, 0x08], Op::StTileCfg, 0, 0x1008, 0),
            // tileloadd tmm1, [rax + rbx*1]
            (&[0xC4, 0xE2, 0x7B, 0x4B, 0x0C, 0x18], Op::TileLoadD, 1, 0x1000, 0x40),
            // tileloadd tmm5, [r13 + r9*4 + 0x10]: VEX.X and VEX.B set, r13 needs a displacement
            (&[0xC4, 0x82, 0x7B, 0x4B, 0x6C, 0x8D, 0x10], Op::TileLoadD, 5, 0x2010, 0x200),
            // tilestored [rax + rbx*2 - 4], tmm7
            (&[0xC4, 0xE2, 0x7A, 0x4B, 0x7C, 0x58, 0xFC], Op::TileStoreD, 7, 0x0FFC, 0x80),
            // tileloadd tmm2, [rbx*1 + 0x100] (no base: disp32)
            (&[0xC4, 0xE2, 0x7B, 0x4B, 0x14, 0x1D, 0x00, 0x01, 0x00, 0x00], Op::TileLoadD, 2, 0x100, 0x40),
        ];
        for &(bytes, op, reg, base, index) in cases {
            // SAFETY: `bytes` is the whole instruction.
            let i = unsafe { decode(bytes.as_ptr(), &g) }.unwrap_or_else(|| panic!("{bytes:x?}"));
            assert_eq!((i.op, i.len, i.reg), (op, bytes.len(), reg), "{bytes:x?}");
            let m = i.mem.unwrap();
            assert_eq!((m.base, m.index), (base, index), "{bytes:x?}");
        }
        // tdpbf16ps tmm0, tmm1, tmm2 / tmm3, tmm4, tmm5; tilezero tmm6; tilerelease.
        let regs: &[(&[u8], Op, [usize; 3])] = &[
            (&[0xC4, 0xE2, 0x6A, 0x5C, 0xC1], Op::TdpBf16Ps, [0, 1, 2]),
            (&[0xC4, 0xE2, 0x52, 0x5C, 0xDC], Op::TdpBf16Ps, [3, 4, 5]),
            (&[0xC4, 0xE2, 0x7B, 0x49, 0xF0], Op::TileZero, [6, 0, 0]),
            (&[0xC4, 0xE2, 0x78, 0x49, 0xC0], Op::TileRelease, [0, 0, 0]),
        ];
        for &(bytes, op, [d, a, b]) in regs {
            // SAFETY: as above.
            let i = unsafe { decode(bytes.as_ptr(), &g) }.unwrap_or_else(|| panic!("{bytes:x?}"));
            assert_eq!((i.op, i.len), (op, 5), "{bytes:x?}");
            if op == Op::TdpBf16Ps {
                assert_eq!((i.reg, i.rm, i.vvvv), (d, a, b), "{bytes:x?}");
            } else if op == Op::TileZero {
                assert_eq!(i.reg, d);
            }
        }
        // Not tile instructions: ud2, a VEX instruction of another map, vdpbf16ps (EVEX).
        for bytes in
            [&[0x0F, 0x0B, 0, 0, 0, 0][..], &[0xC4, 0xE3, 0x7D, 0x18, 0xC1, 0], &[0x62, 0xF2, 0x76, 0x48, 0x52, 0xC2]]
        {
            // SAFETY: six readable bytes.
            assert!(unsafe { decode(bytes.as_ptr(), &g) }.is_none(), "{bytes:x?}");
        }
    }
}
