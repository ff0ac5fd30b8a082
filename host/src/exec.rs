//! The host's executor for the core: rayon's pool and the SIMD level detected at run time.
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use stuffed_core::exec::{Exec, MatmulMode, Simd};
use stuffed_core::gemm::{Panels, Prefetch};

#[derive(Clone, Copy, Debug)]
pub struct Pool {
    threads: usize,
    simd: Simd,
    mode: MatmulMode,
}

/// Stack a call into the core may need below a [`Pool::run`]. The matrix kernels pack their panels
/// into each thread's heap [`Panels`] ([`with_thread_panels`]), not the stack, so the core's
/// forward runs on a 32 KiB thread (`core_forward_on_a_short_stack_packs_into_the_executors_panels`)
/// and so does every C ABI call (`calls_run_on_a_small_thread_stack`); before, the panels (48–96
/// KiB) made a forward need 100–128 KiB. Twice those 32 KiB: a thread with less left still runs the
/// call on a fresh `GROWN_STACK`-byte stack rather than risk an overflow.
pub const KERNEL_STACK: usize = 64 << 10;
/// Size of the stack [`on_kernel_stack`] maps when the caller's is short (its pages are touched
/// only as used).
const GROWN_STACK: usize = 2 << 20;

/// Runs `f` on the calling thread when at least [`KERNEL_STACK`] bytes of its stack are left, else
/// on a fresh stack (`stacker`: one check of the stack pointer against the thread's limit).
fn on_kernel_stack<R>(f: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(KERNEL_STACK, GROWN_STACK, f)
}

/// `--fast-matmul` (process-wide, like the thread count; see [`Pool::init_matmul`]).
static FAST_MATMUL: AtomicBool = AtomicBool::new(false);

impl Pool {
    /// Uses rayon's global pool (sized by `--threads` or RAYON_NUM_THREADS, else all cores), the
    /// process's [`matmul_mode`] and the level [`default_simd`] picks for it.
    pub fn new() -> Pool {
        init_prefetch();
        let mode = matmul_mode();
        Pool { threads: rayon::current_num_threads(), simd: default_simd(mode), mode }
    }

    /// The global pool with a given kernel level, capped at the best this CPU runs ([`cpu_simd`],
    /// which asks the OS for the tile state only when `simd` is [`Simd::Amx`]; `STUFFED_SIMD` does
    /// not apply: a test asks for each level), in [`MatmulMode::Exact`].
    pub fn with_simd(simd: Simd) -> Pool {
        init_prefetch();
        let best = if simd == Simd::Amx { cpu_simd() } else { base_simd() };
        Pool { threads: rayon::current_num_threads(), simd: cap(simd, best), mode: MatmulMode::Exact }
    }

    /// The same pool with another [`MatmulMode`].
    pub fn with_mode(self, mode: MatmulMode) -> Pool {
        Pool { mode, ..self }
    }

    /// The same pool splitting its work for `threads` tasks at once (capped at the global pool's
    /// size): what a run under `--threads` does, for a test in one process.
    pub fn with_threads(self, threads: usize) -> Pool {
        Pool { threads: threads.clamp(1, rayon::current_num_threads()), ..self }
    }

    /// The portable kernel on one thread: the reference the fast path is tested against.
    pub fn serial_portable() -> Pool {
        Pool { threads: 1, simd: Simd::Portable, mode: MatmulMode::Exact }
    }

    /// Runs `f` on one of the pool's workers while the calling thread waits, with the other
    /// `threads − 1` workers spinning beside it as a `crate::team` for the call: the products and
    /// maps inside hand their tasks to them through one atomic word. Called from outside the pool,
    /// every one of them woke the workers and then the caller again (about 150 hand-offs a Mamba-2
    /// 370m decode step, each two wake-ups across cores); through rayon's work stealing on a
    /// worker, the other worker still slept between most of them.
    ///
    /// Every call into the core's kernels goes through here: run in place (one thread, or already
    /// on a worker) it first makes sure of [`KERNEL_STACK`] bytes of stack (see there).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.threads <= 1 || rayon::current_thread_index().is_some() {
            return on_kernel_stack(f);
        }
        crate::team::lead(self.threads, || on_kernel_stack(f))
    }

    /// `--fast-matmul` for every pool made after this call; `STUFFED_FAST_MATMUL=1` also sets it.
    pub fn init_matmul(fast: bool) {
        if fast {
            FAST_MATMUL.store(true, Ordering::Relaxed);
        }
    }

    /// Sizes the global worker pool (once a process; later calls leave it as it is).
    pub fn init_threads(n: Option<usize>) -> anyhow::Result<()> {
        if let Some(n) = n {
            if !(1..=1024).contains(&n) {
                anyhow::bail!("--threads {n}: give 1 to 1024 worker threads");
            }
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
        Ok(())
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

/// Sets the core's [`Prefetch`] to [`detect_prefetch`]'s, once a process (every [`Pool`] does it
/// when made).
pub fn init_prefetch() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| stuffed_core::gemm::set_prefetch(detect_prefetch()));
}

/// How a token step's GEMVs ask for their weights ahead ([`Prefetch`]):
/// `STUFFED_PREFETCH=l1|l2|off`, else [`Prefetch::L2`] on AMD CPUs (Zen 4: a one-thread GEMV read
/// 9–10 GB/s through L1 prefetches, 18–19 through L2 ones) and [`Prefetch::L1`] elsewhere (what
/// the Xeons measured; L2 has not been timed on one: `STUFFED_PREFETCH=l2 stuffed bench …` does).
/// An unknown value says so on stderr, once, and is ignored.
pub fn detect_prefetch() -> Prefetch {
    if let Ok(v) = std::env::var("STUFFED_PREFETCH") {
        match Prefetch::from_name(&v) {
            Some(p) => return p,
            None => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| eprintln!("stuffed: STUFFED_PREFETCH={v}: give l1, l2 or off; ignored"));
            }
        }
    }
    if cpu_vendor_is_amd() {
        Prefetch::L2
    } else {
        Prefetch::L1
    }
}

/// Whether CPUID's vendor string is AMD's (or Hygon's, the same cores).
fn cpu_vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        for (i, w) in [r.ebx, r.edx, r.ecx].into_iter().enumerate() {
            vendor[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        matches!(&vendor, b"AuthenticAMD" | b"HygonGenuine")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The process's [`MatmulMode`]: fast under `--fast-matmul` or `STUFFED_FAST_MATMUL=1`.
pub fn matmul_mode() -> MatmulMode {
    let env = std::env::var("STUFFED_FAST_MATMUL").is_ok_and(|v| v == "1");
    if env || FAST_MATMUL.load(Ordering::Relaxed) {
        MatmulMode::Fast
    } else {
        MatmulMode::Exact
    }
}

/// Whether `--fast-matmul` changes the products of a model whose matrices are stored as
/// `weight_dtype` ([`crate::model::Model::matrix_dtypes`]) on the level [`Pool::new`] runs: only
/// the bf16 kernels round activations to bf16 (AVX512-BF16 and AMX levels, bf16 weights; AMX also
/// f32 weights, as bf16 halves). Elsewhere the exact products run, and the numbers are the
/// default's bit for bit.
pub fn fast_matmul_applies(weight_dtype: &str) -> bool {
    matmul_mode() == MatmulMode::Fast
        && match default_simd(MatmulMode::Fast) {
            Simd::Amx => weight_dtype == "bf16" || weight_dtype == "f32",
            Simd::Avx512Bf16 => weight_dtype == "bf16",
            _ => false,
        }
}

/// What outputs record about the CPU matrix kernel [`Pool::new`] runs for models whose matrices are
/// `weight_dtypes`: `{"simd": "avx512bf16", "mode": "fast"}`. The mode is the one whose numbers
/// the products have ([`fast_matmul_applies`] to one of them), so `--fast-matmul` on a level without
/// bf16 products records `"mode": "exact"` and `"fast_matmul": "asked, not applied: …"`.
pub fn matmul_record<'a>(weight_dtypes: impl IntoIterator<Item = &'a str>) -> serde_json::Value {
    let dtypes: Vec<&str> = weight_dtypes.into_iter().collect();
    let mode = effective_mode(&dtypes);
    let simd = default_simd(matmul_mode());
    let mut record = serde_json::json!({"simd": simd.name(), "mode": mode.name()});
    if matmul_mode() == MatmulMode::Fast && mode == MatmulMode::Exact {
        record["fast_matmul"] =
            format!("asked, not applied: {}, so the exact products ran", no_bf16(simd, &dtypes)).into();
    }
    if simd == Simd::Amx && *amx_state() == AmxState::Emulated {
        record["tiles"] = "emulated".into();
    }
    if simd == Simd::Amx {
        record["f32_weights"] = "bf16 hi + lo halves".into();
    }
    record
}

/// [`MatmulMode::Fast`] when `--fast-matmul` changes the products of one of `dtypes` (the models'
/// weight dtypes), else exact.
fn effective_mode(dtypes: &[&str]) -> MatmulMode {
    if dtypes.iter().any(|d| fast_matmul_applies(d)) {
        MatmulMode::Fast
    } else {
        MatmulMode::Exact
    }
}

/// Why `--fast-matmul` changes nothing: the level `simd` has no bf16 products for `dtypes`.
fn no_bf16(simd: Simd, dtypes: &[&str]) -> String {
    format!("the {} kernel has no bf16 products for {} weights", simd.name(), dtypes.join(" / "))
}

/// The level [`Pool::new`] runs in `mode`: [`detect_simd`]'s, except that exact mode on an
/// AVX512-BF16 CPU keeps the AVX-512 f32 FMA kernel unless `STUFFED_SIMD=avx512bf16` asks for the
/// bf16 one. Measured on the Xeon of issue 22 (2 threads, bf16 weights, t = 512): hi + lo on
/// `vdpbf16ps` runs at ≈ 0.45× the FMA kernel (one `vdpbf16ps` issues every ≈ 2 cycles there, an
/// FMA twice a cycle), so the exact bf16 path is a choice, not the default; fast mode (hi only)
/// takes it. The AMX kernel runs only under `STUFFED_SIMD=amx` ([`detect_simd`]); asking for it
/// where it cannot run says why on stderr, once, and uses the best level there is.
pub fn default_simd(mode: MatmulMode) -> Simd {
    let asked = std::env::var("STUFFED_SIMD").ok();
    let asked = asked.as_deref();
    let level = match detect_simd() {
        Simd::Avx512Bf16 if mode == MatmulMode::Exact && asked != Some(Simd::Avx512Bf16.name()) => Simd::Avx512,
        level => level,
    };
    if asked == Some(Simd::Amx.name()) && level != Simd::Amx {
        static SAID: std::sync::Once = std::sync::Once::new();
        let why = match amx_state() {
            AmxState::Refused(why) => why.clone(),
            _ => "this CPU has no AMX-TILE / AMX-BF16".to_string(),
        };
        SAID.call_once(|| eprintln!("stuffed: STUFFED_SIMD=amx: {why}; using the {} kernel", level.name()));
    }
    level
}

/// Marks a run's fingerprint key as made under `--fast-matmul` when it changes the numbers of its
/// models' `weight_dtypes` ([`fast_matmul_applies`]); a default-mode key stays as it was, so
/// existing checkpoints and fingerprints still match, and a run where the flag changes nothing is
/// the default run (it says so on stderr, once).
pub fn mark_matmul_mode<'a>(key: &mut serde_json::Value, weight_dtypes: impl IntoIterator<Item = &'a str>) {
    let dtypes: Vec<&str> = weight_dtypes.into_iter().collect();
    if effective_mode(&dtypes) == MatmulMode::Fast {
        key["fast_matmul"] = serde_json::Value::Bool(true);
    } else if matmul_mode() == MatmulMode::Fast {
        static SAID: std::sync::Once = std::sync::Once::new();
        let why = no_bf16(default_simd(MatmulMode::Fast), &dtypes);
        SAID.call_once(|| eprintln!("stuffed: --fast-matmul changes nothing here: {why}; the exact products run"));
    }
}

/// `want`, or the highest level below it that `best` includes.
fn cap(want: Simd, best: Simd) -> Simd {
    let rank = |s: Simd| Simd::ALL.iter().position(|&x| x == s);
    if rank(want) <= rank(best) {
        want
    } else {
        best
    }
}

/// The kernel level to run; `STUFFED_SIMD=portable|avx2|avx512|avx512bf16|amx` caps it (an unknown
/// value is ignored). The AMX kernel has not yet run on an AMX CPU (core/src/gemm/amx.rs; only its
/// compiled instructions through [`crate::amx_emu`]'s trap), so
/// only `STUFFED_SIMD=amx` picks it, and only then is the OS asked for the tile state.
pub fn detect_simd() -> Simd {
    match std::env::var("STUFFED_SIMD").ok().and_then(|v| Simd::from_name(&v)) {
        Some(Simd::Amx) => cap(Simd::Amx, cpu_simd()),
        Some(want) => cap(want, base_simd()),
        None => base_simd(),
    }
}

/// The best kernel level this CPU runs (`STUFFED_SIMD` aside): [`base_simd`], or [`Simd::Amx`] on
/// top of it where the CPU has AMX-TILE and AMX-BF16 and the OS grants the tile state (asked here
/// on the first call, see [`amx_state`]).
pub fn cpu_simd() -> Simd {
    match base_simd() {
        Simd::Avx512Bf16 if amx_state().usable() => Simd::Amx,
        level => level,
    }
}

/// Every level this CPU runs, lowest first (AMX only where [`cpu_simd`] grants it): what a test
/// forces one by one through `STUFFED_SIMD`.
pub fn levels_here() -> Vec<Simd> {
    let best = cpu_simd();
    Simd::ALL.into_iter().filter(|&s| cap(s, best) == s).collect()
}

/// The best level below AMX: AVX2 + FMA + F16C; AVX-512F/VL on top; AVX512-BW and AVX512-BF16 on
/// top of that. Asks the OS nothing.
pub fn base_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
            if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16") {
                return Simd::Avx512Bf16;
            }
            return Simd::Avx512;
        }
        return Simd::Avx2;
    }
    Simd::Portable
}

/// Whether this process may run AMX tile instructions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AmxState {
    /// The CPU does not advertise AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22).
    Absent,
    /// The CPU has them and the OS has granted this process the tile state.
    Granted,
    /// The CPU advertises them but they may not be used here: why.
    Refused(String),
    /// The CPU lacks them but has AVX512-BF16, and (feature `amx-emu`) the tile instructions run
    /// through the trap emulator of [`crate::amx_emu`]: the AMX level's code runs, at no useful
    /// speed. (Without AVX512-BF16 the state is [`AmxState::Absent`]: the level needs it besides
    /// the tiles.)
    Emulated,
}

impl AmxState {
    /// Whether the AMX level may run (on the CPU's tiles or, in a test build, emulated ones).
    pub fn usable(&self) -> bool {
        matches!(self, AmxState::Granted | AmxState::Emulated)
    }
}

/// [`AmxState`], found once a process. On an AMX CPU the first call asks Linux for the tile state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): the permission is process-wide and must
/// come before any thread runs a tile instruction, which [`cpu_simd`] ensures (a [`Pool`] on the AMX
/// level is made only after it granted).
pub fn amx_state() -> &'static AmxState {
    static STATE: std::sync::OnceLock<AmxState> = std::sync::OnceLock::new();
    STATE.get_or_init(amx_probe)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_probe() -> AmxState {
    let l1 = std::arch::x86_64::__cpuid(1);
    if !crate::amx_emu::cpu_has_amx() {
        // The emulator stands in for the tiles alone: the AMX level packs its activations, and
        // runs its one-row products, on AVX512-BF16, so without that (an AVX2-only CPU such as a
        // Zen 3) the level cannot run and nothing is emulated.
        #[cfg(feature = "amx-emu")]
        if base_simd() != Simd::Avx512Bf16 {
            return AmxState::Absent;
        }
        #[cfg(feature = "amx-emu")]
        return match crate::amx_emu::install() {
            Ok(()) => AmxState::Emulated,
            Err(why) => AmxState::Refused(format!("the AMX trap emulator: {why}")),
        };
        #[cfg(not(feature = "amx-emu"))]
        return AmxState::Absent;
    }
    if (l1.ecx >> 27) & 1 == 0 {
        return AmxState::Refused("the OS has not enabled XSAVE (CPUID.1:ECX.OSXSAVE)".into());
    }
    // SAFETY: OSXSAVE is set, so XGETBV may run.
    if (unsafe { xcr0() } >> 17) & 3 != 3 {
        return AmxState::Refused("the OS does not save the tile state (XCR0 bits 17-18 clear)".into());
    }
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes takes an integer, or a pointer to a u64 it writes.
    if unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } != 0 {
        let err = std::io::Error::last_os_error();
        return AmxState::Refused(format!("Linux refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM: {err})"));
    }
    let mut granted: u64 = 0;
    // SAFETY: as above; `granted` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut granted as *mut u64) };
    if r != 0 || (granted >> XFEATURE_XTILEDATA) & 1 == 0 {
        return AmxState::Refused("Linux did not grant the tile state (arch_prctl ARCH_GET_XCOMP_PERM)".into());
    }
    AmxState::Granted
}

/// XCR0: which state components the OS saves.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_probe() -> AmxState {
    AmxState::Absent
}

impl Exec for Pool {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.threads <= 1 {
            (0..n).for_each(f);
        } else if crate::team::for_each(n, f) {
            // Inside a `run`: its team's job, or in place inside one of its tasks.
        } else {
            (0..n).into_par_iter().for_each(f);
        }
    }
    fn threads(&self) -> usize {
        self.threads
    }
    fn simd(&self) -> Simd {
        self.simd
    }
    fn matmul_mode(&self) -> MatmulMode {
        self.mode
    }
    fn with_panels(&self, f: &mut dyn FnMut(&mut Panels)) {
        with_thread_panels(f)
    }
}

thread_local! {
    /// This thread's [`Panels`], allocated on its first product and kept: taken while a kernel
    /// runs, so a product nested inside another (none is today) gets a fresh one instead.
    static PANELS: Cell<Option<Box<Panels>>> = const { Cell::new(None) };
}

/// Runs `f` with the calling thread's [`Panels`] (on the heap, not the stack: see
/// [`KERNEL_STACK`]).
pub fn with_thread_panels(f: &mut dyn FnMut(&mut Panels)) {
    let mut panels = PANELS.take().unwrap_or_else(|| {
        // SAFETY: `Panels` is a `MaybeUninit` byte array, valid uninitialised.
        unsafe { Box::<Panels>::new_uninit().assume_init() }
    });
    f(&mut panels);
    PANELS.set(Some(panels));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session's work runs on a worker of the pool as the leader of a team (so the products
    /// inside hand their tasks to the spinning helpers), and a call from a worker runs in place
    /// rather than queueing behind itself.
    #[test]
    fn run_moves_the_work_onto_a_pool_worker() {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(2).build_global();
        let pool = Pool::new();
        assert!(pool.threads() >= 2, "the global pool has {} threads", pool.threads());
        assert_eq!(rayon::current_thread_index(), None);
        let outer = pool.run(|| (rayon::current_thread_index(), pool.run(rayon::current_thread_index)));
        assert!(outer.0.is_some(), "ran on the calling thread");
        assert_eq!(outer.0, outer.1, "a nested call moved to another worker");
        assert!(pool.run(crate::team::leading), "the run has no team");
        assert!(!crate::team::leading());
    }
}
