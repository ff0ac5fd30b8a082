//! The host's executor for the core: rayon's pool and the SIMD level detected at run time.
use rayon::prelude::*;
use stuffed_core::exec::{Exec, Simd};

pub struct Pool {
    threads: usize,
    simd: Simd,
}

impl Pool {
    /// Uses rayon's global pool (sized by `--threads` or RAYON_NUM_THREADS, else all cores).
    /// `STUFFED_SIMD=portable` forces the portable kernel (to test both).
    pub fn new() -> Pool {
        Pool { threads: rayon::current_num_threads(), simd: detect_simd() }
    }

    /// The global pool with a given kernel level (no higher than [`detect_simd`]'s).
    pub fn with_simd(simd: Simd) -> Pool {
        let best = detect_simd();
        let simd = match (simd, best) {
            (Simd::Avx512, Simd::Avx512) => Simd::Avx512,
            (Simd::Avx512 | Simd::Avx2, b) if b.has_avx2() => Simd::Avx2,
            _ => Simd::Portable,
        };
        Pool { threads: rayon::current_num_threads(), simd }
    }

    /// The portable kernel on one thread: the reference the fast path is tested against.
    pub fn serial_portable() -> Pool {
        Pool { threads: 1, simd: Simd::Portable }
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

/// The best kernel level this CPU runs; `STUFFED_SIMD=portable|avx2` caps it.
pub fn detect_simd() -> Simd {
    let cap = std::env::var("STUFFED_SIMD").unwrap_or_default();
    if cap == "portable" {
        return Simd::Portable;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        if cap != "avx2" && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
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
}
