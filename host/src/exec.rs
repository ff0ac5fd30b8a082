//! The host's executor for the core: rayon's pool and the SIMD level detected at run time.
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use stuffed_core::exec::{Exec, MatmulMode, Simd};

#[derive(Clone, Copy, Debug)]
pub struct Pool {
    threads: usize,
    simd: Simd,
    mode: MatmulMode,
}

/// `--fast-matmul` (process-wide, like the thread count; see [`Pool::init_matmul`]).
static FAST_MATMUL: AtomicBool = AtomicBool::new(false);

impl Pool {
    /// Uses rayon's global pool (sized by `--threads` or RAYON_NUM_THREADS, else all cores), the
    /// process's [`matmul_mode`] and the level [`default_simd`] picks for it.
    pub fn new() -> Pool {
        let mode = matmul_mode();
        Pool { threads: rayon::current_num_threads(), simd: default_simd(mode), mode }
    }

    /// The global pool with a given kernel level, capped at the best this CPU runs ([`cpu_simd`];
    /// `STUFFED_SIMD` does not apply: a test asks for each level), in [`MatmulMode::Exact`].
    pub fn with_simd(simd: Simd) -> Pool {
        Pool { threads: rayon::current_num_threads(), simd: cap(simd, cpu_simd()), mode: MatmulMode::Exact }
    }

    /// The same pool with another [`MatmulMode`].
    pub fn with_mode(self, mode: MatmulMode) -> Pool {
        Pool { mode, ..self }
    }

    /// The portable kernel on one thread: the reference the fast path is tested against.
    pub fn serial_portable() -> Pool {
        Pool { threads: 1, simd: Simd::Portable, mode: MatmulMode::Exact }
    }

    /// `--fast-matmul` for every pool made after this call; `STUFFED_FAST_MATMUL=1` also sets it.
    pub fn init_matmul(fast: bool) {
        if fast {
            FAST_MATMUL.store(true, Ordering::Relaxed);
        }
    }

    /// Sizes the global pool once; later calls keep the first size.
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

/// The process's [`MatmulMode`]: fast under `--fast-matmul` or `STUFFED_FAST_MATMUL=1`.
pub fn matmul_mode() -> MatmulMode {
    let env = std::env::var("STUFFED_FAST_MATMUL").is_ok_and(|v| v == "1");
    if env || FAST_MATMUL.load(Ordering::Relaxed) {
        MatmulMode::Fast
    } else {
        MatmulMode::Exact
    }
}

/// What outputs record about the CPU matrix kernel [`Pool::new`] runs:
/// `{"simd": "avx512bf16", "mode": "fast"}`.
pub fn matmul_record() -> serde_json::Value {
    let mode = matmul_mode();
    serde_json::json!({"simd": default_simd(mode).name(), "mode": mode.name()})
}

/// The level [`Pool::new`] runs in `mode`: [`detect_simd`]'s, except that exact mode on an
/// AVX512-BF16 CPU keeps the AVX-512 f32 FMA kernel unless `STUFFED_SIMD=avx512bf16` asks for the
/// bf16 one. Measured on the Xeon of issue 22 (2 threads, bf16 weights, t = 512): hi + lo on
/// `vdpbf16ps` runs at ≈ 0.45× the FMA kernel (one `vdpbf16ps` issues every ≈ 2 cycles there, an
/// FMA twice a cycle), so the exact bf16 path is a choice, not the default; fast mode (hi only)
/// takes it.
pub fn default_simd(mode: MatmulMode) -> Simd {
    let level = detect_simd();
    let asked = std::env::var("STUFFED_SIMD").is_ok_and(|v| v == Simd::Avx512Bf16.name());
    if level == Simd::Avx512Bf16 && mode == MatmulMode::Exact && !asked {
        Simd::Avx512
    } else {
        level
    }
}

/// Marks a run's fingerprint key as made under `--fast-matmul` (it changes the numbers); a
/// default-mode key stays as it was, so existing checkpoints and fingerprints still match.
pub fn mark_matmul_mode(key: &mut serde_json::Value) {
    if matmul_mode() == MatmulMode::Fast {
        key["fast_matmul"] = serde_json::Value::Bool(true);
    }
}

/// `want`, or the highest level below it that `best` includes.
fn cap(want: Simd, best: Simd) -> Simd {
    let rank = |s: Simd| [Simd::Portable, Simd::Avx2, Simd::Avx512, Simd::Avx512Bf16].iter().position(|&x| x == s);
    if rank(want) <= rank(best) {
        want
    } else {
        best
    }
}

/// The best kernel level this CPU runs; `STUFFED_SIMD=portable|avx2|avx512|avx512bf16` caps it
/// (an unknown value is ignored).
pub fn detect_simd() -> Simd {
    let best = cpu_simd();
    match std::env::var("STUFFED_SIMD").ok().and_then(|v| Simd::from_name(&v)) {
        Some(want) => cap(want, best),
        None => best,
    }
}

/// The best kernel level this CPU runs (`STUFFED_SIMD` aside): AVX2 + FMA + F16C; AVX-512F/VL on
/// top; AVX512-BW and AVX512-BF16 on top of that.
pub fn cpu_simd() -> Simd {
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

impl Exec for Pool {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.threads <= 1 {
            (0..n).for_each(f);
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
}
