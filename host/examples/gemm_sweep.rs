//! Timing sweep of the CPU matrix product `out (t, rows) = x (t, cols) · Wᵀ` at the projection
//! shapes of the released models: t = 1 (a token step: memory-bound, GB/s of weights) and t = 512 (a
//! chunk: compute-bound, GFLOP/s). Correctness lives in tests/tests/kernels.rs; this only times.
//!
//! `cargo run --release --example gemm_sweep [-- f32|bf16|f16]` (`--threads N` via RAYON_NUM_THREADS;
//! the kernel level via `STUFFED_SIMD`, fast mode via `STUFFED_FAST_MATMUL=1`).
//!
//! `gemm_sweep amx`: the AMX kernel's plans (`amx::Plan`: one tile or four per block, scalar or
//! AVX-512 packing, weight rows in L2-sized chunks or not) at t = 512, exact and fast, on 1 and 2
//! threads — on an AMX CPU their GFLOP/s; on any CPU with AVX512-BF16 the time of everything but
//! the tile instructions, then of that plus the bytes the tile loads would read, in wall-clock ns per
//! 16 × 16 × 32 tile product (a core issues one `tdpbf16ps` every 16 cycles: ≈ 8 ns at 2 GHz, so
//! ≈ 4 ns a product on two cores).
//!
//! `gemm_sweep peak`: what one core's FMA units issue alone (twelve independent chains of FMAs in
//! 16 lanes and in 8, GFLOP/s, best of 5), the ceiling the kernels' GFLOP/s are read against, and
//! where the CPU has AVX512-BF16 the same for `vdpbf16ps` (a Zen 4 issues one a cycle: twice the
//! FMA's products; a Xeon without AMX one every ≈ 2 cycles).
//!
//! The t = 1 rows stream their weights under the process's prefetch hint (`STUFFED_PREFETCH=l1|l2|off`;
//! default l2 on AMD, l1 elsewhere): `STUFFED_PREFETCH=l2` against `l1` times the hint on a CPU.
//!
//! `gemm_sweep amx-f32`: what f32-stored weights gain on the AMX tiles (issue 22: "split them too,
//! once at load or per chunk: measure both"). Each f32 weight as bf16 hi + lo (|w − hi − lo| ≤
//! 2⁻¹⁶·|w|), `x·hi + x·lo` on the AMX kernel in exact mode (`amx::gemm_split_with`, what `matmul`
//! runs for f32 weights on the AMX level: four `tdpbf16ps` a tile product). At t = 512, 1 and 2
//! threads, ms of the AVX-512 f32 kernel (what f32 weights run on below AMX) beside the split made
//! once (the halves ready, as `matmul` has them after the first product: 4 B a weight beside the
//! f32) and the split made in the call (each thread converts its weight rows first). Where the CPU
//! has no AMX it times the rest of the kernel without the tiles. (Correctness: the kernel contract,
//! tests/tests/gemm.rs, runs the same product through `matmul` on every level.)
use half::{bf16, f16};
use std::time::Instant;
use stuffed::exec::Pool;
use stuffed_core::exec::MatmulMode;
use stuffed_core::gemm::Product;
use stuffed_core::{Data, Exec, Weight};

fn main() {
    let dtype = std::env::args().nth(1).unwrap_or_else(|| "bf16".into());
    if dtype == "amx" {
        return amx_plans();
    }
    if dtype == "amx-f32" {
        return f32_on_amx();
    }
    if dtype == "peak" {
        return fma_peak();
    }
    let pool = Pool::new();
    println!("{dtype} weights, {:?} kernel, {} threads", pool.simd(), pool.threads());
    // (rows, cols, what): Mamba-2 130m in/out proj, 370m in_proj, RWKV-6 1.6B att and FFN, the NeoX head.
    let shapes = [
        (3352, 768, "130m in_proj"),
        (768, 1536, "130m out_proj"),
        (4384, 1024, "370m in_proj"),
        (2048, 2048, "rwkv6-1.6b att.key"),
        (7168, 2048, "rwkv6-1.6b ffn.key"),
        (2048, 7168, "rwkv6-1.6b ffn.value"),
        (50288, 768, "130m lm_head"),
    ];
    for (rows, cols, what) in shapes {
        let vals: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        // Eight copies, cycled, so a step streams its weights from memory rather than from cache.
        let copies: Vec<Vec<u8>> = (0..8)
            .map(|_| match dtype.as_str() {
                "f32" => bytemuck::cast_slice(&vals).to_vec(),
                "f16" => bytemuck::cast_slice(&vals.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()).to_vec(),
                _ => bytemuck::cast_slice(&vals.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).to_vec(),
            })
            .collect();
        let weight = |i: usize| {
            let b = &copies[i % 8];
            let data = match dtype.as_str() {
                "f32" => Data::F32(bytemuck::cast_slice(b)),
                "f16" => Data::F16(bytemuck::cast_slice(b)),
                _ => Data::Bf16(bytemuck::cast_slice(b)),
            };
            Weight::new(data, rows, cols).expect("shape")
        };
        let bytes = copies[0].len() as f64;
        for t in [1usize, 512] {
            let x = vec![0.25f32; t * cols];
            let mut out = vec![0f32; t * rows];
            let reps = ((if t == 1 { 2e9 / bytes } else { 2e10 / (2.0 * (t * rows * cols) as f64) }) as usize).max(2);
            // Inside one `Pool::run`, as a session calls the kernels (its team takes the tasks).
            let s = pool.run(|| {
                let start = Instant::now();
                for r in 0..reps {
                    stuffed_core::gemm::matmul(&pool, &x, t, &weight(r), &mut out).expect("matmul");
                }
                start.elapsed().as_secs_f64() / reps as f64
            });
            let rate = if t == 1 {
                format!("{:6.1} GB/s", bytes / s / 1e9)
            } else {
                format!("{:6.1} GFLOP/s", 2.0 * (t * rows * cols) as f64 / s / 1e9)
            };
            println!("{what:<20} ({rows:>5} × {cols:>4}), t = {t:>3}: {:>9.1} µs  {rate}", s * 1e6);
        }
    }
}

/// (rows, cols, what) the AMX sweeps time: Mamba-2 130m in and out proj, RWKV-6 1.6B ffn.key, the
/// NeoX head.
#[cfg(target_arch = "x86_64")]
const AMX_SHAPES: [(usize, usize, &str); 4] = [
    (3352, 768, "130m in_proj"),
    (768, 1536, "130m out_proj"),
    (7168, 2048, "rwkv6-1.6b ffn.key"),
    (50288, 768, "130m lm_head"),
];

/// See the module doc: `gemm_sweep amx`.
fn amx_plans() {
    #[cfg(target_arch = "x86_64")]
    {
        use stuffed_core::exec::Simd;
        use stuffed_core::gemm::amx::{self, Plan, Tiles};
        // The AVX-512 plans need AVX512-BF16, which every AMX CPU has.
        if !(is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")) {
            println!("gemm_sweep amx: this CPU has no AVX512-BF16");
            return;
        }
        let units: &[(Tiles, &str)] = if stuffed::exec::cpu_simd() == Simd::Amx {
            &[(Tiles::Hardware, "on the tiles, GFLOP/s")]
        } else {
            &[
                (Tiles::Skipped, "no AMX: ns per tile product without the tiles"),
                (Tiles::Loads, "no AMX: ns per tile product with the tile loads' reads, no tiles"),
            ]
        };
        let plans = [
            ("first", Plan::SINGLE_SCALAR),
            ("pairs+avx512", Plan { chunks: false, ..Plan::BEST }),
            ("+chunks (best)", Plan::BEST),
        ];
        let shapes = AMX_SHAPES;
        let t = 512;
        for &(unit, about) in units {
            for threads in [1usize, 2] {
                println!("AMX plans, t = {t}, {threads} thread(s), the weight rows split between them: {about}");
                for (rows, cols, what) in shapes {
                    let w: Vec<bf16> =
                        (0..rows * cols).map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 * 1e-3 - 0.5)).collect();
                    let x: Vec<f32> = (0..t * cols).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
                    let c = vec![0f32; t * rows];
                    let products = (t.div_ceil(16) * rows.div_ceil(16) * cols.div_ceil(32)) as f64;
                    for mode in [MatmulMode::Exact, MatmulMode::Fast] {
                        let fast = mode == MatmulMode::Fast;
                        let mut line = format!("{what:>20} {:5}", if fast { "fast" } else { "exact" });
                        for (name, plan) in plans {
                            let part = rows.div_ceil(threads).next_multiple_of(32);
                            let run = || {
                                std::thread::scope(|scope| {
                                    for r0 in (0..rows).step_by(part) {
                                        let n = part.min(rows - r0);
                                        let (xp, wp, cp) =
                                            (x.as_ptr() as usize, w.as_ptr() as usize, c.as_ptr() as usize);
                                        scope.spawn(move || {
                                            // SAFETY: x is t × cols, w rows × cols, c t × rows; each
                                            // thread writes its own columns; AVX512-BF16 checked above,
                                            // the tiles only where the OS granted them.
                                            unsafe {
                                                let (xp, wp, cp) = (
                                                    xp as *const f32,
                                                    (wp as *const bf16).add(r0 * cols),
                                                    (cp as *mut f32).add(r0),
                                                );
                                                stuffed::exec::with_thread_panels(&mut |p| {
                                                    amx::gemm_with(
                                                        unit,
                                                        plan,
                                                        Product {
                                                            m: t,
                                                            n,
                                                            k: cols,
                                                            a: xp,
                                                            lda: cols,
                                                            b: wp,
                                                            ldb: cols,
                                                            c: cp,
                                                            ldc: rows,
                                                            acc: false,
                                                        },
                                                        mode,
                                                        p,
                                                    )
                                                })
                                            }
                                        });
                                    }
                                })
                            };
                            let best = best_of_5(run);
                            let flops = 2.0 * (t * rows * cols) as f64;
                            let cell = match unit {
                                Tiles::Hardware => format!("{:7.1} GFLOP/s", flops / best / 1e9),
                                _ => format!("{:6.2} ns", best / products * 1e9),
                            };
                            line += &format!("  {name}: {cell}");
                        }
                        println!("{line}");
                    }
                }
            }
        }
    }
}

/// See the module doc: `gemm_sweep amx-f32`.
fn f32_on_amx() {
    #[cfg(target_arch = "x86_64")]
    {
        use stuffed_core::exec::{MatmulMode, Simd};
        use stuffed_core::gemm::amx::{self, Tiles};
        use stuffed_core::gemm::bf16::split_values;
        if !(is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")) {
            println!("gemm_sweep amx-f32: this CPU has no AVX512-BF16");
            return;
        }
        let amx = stuffed::exec::cpu_simd() == Simd::Amx;
        // c (t, n) = x (t, k) · (hi + lo)ᵀ in exact mode, as `matmul` runs f32 weights on AMX.
        // SAFETY (callers): x is t × k, hi and lo n × k (row stride ldw), c t × n (row stride ldc).
        #[allow(clippy::too_many_arguments)]
        unsafe fn product(
            unit: Tiles,
            (t, n, k): (usize, usize, usize),
            x: *const f32,
            hi: *const bf16,
            lo: *const bf16,
            ldw: usize,
            c: *mut f32,
            ldc: usize,
        ) {
            stuffed::exec::with_thread_panels(&mut |p| {
                amx::gemm_split_with(
                    unit,
                    Product { m: t, n, k, a: x, lda: k, b: hi, ldb: ldw, c, ldc, acc: false },
                    lo,
                    MatmulMode::Exact,
                    p,
                )
            })
        }
        let split = |w: &[f32], hi: &mut [bf16], lo: &mut [bf16]| {
            // SAFETY: AVX512-BF16 and AVX512-BW checked above.
            unsafe { split_values(w, hi, lo) }
        };
        let value = |i: usize, m: usize| ((i * m) % 1000) as f32 * 1e-3 - 0.5;
        // Timing: on the tiles, or without them (then the times are the rest: packing, adding, and
        // the split in the call, which is what that variant adds).
        let unit = if amx { Tiles::Hardware } else { Tiles::Skipped };
        let shapes = AMX_SHAPES;
        let t = 512;
        for threads in [1usize, 2] {
            println!(
                "f32 weights, t = {t}, {threads} thread(s), ms a product{}: avx512 f32 | amx split once | amx split in the call",
                if amx { "" } else { " (no AMX: the amx columns without the tiles)" }
            );
            for (rows, cols, what) in shapes {
                let w: Vec<f32> = (0..rows * cols).map(|i| value(i, 7919)).collect();
                let x: Vec<f32> = (0..t * cols).map(|i| value(i, 104_729)).collect();
                let (mut hi, mut lo) = (vec![bf16::ZERO; rows * cols], vec![bf16::ZERO; rows * cols]);
                split(&w, &mut hi, &mut lo);
                let c = vec![0f32; t * rows];
                let part = rows.div_ceil(threads).next_multiple_of(32);
                // Each thread's buffers for the split in the call, made once.
                let bufs: Vec<std::sync::Mutex<(Vec<bf16>, Vec<bf16>)>> = (0..rows.div_ceil(part))
                    .map(|_| std::sync::Mutex::new((vec![bf16::ZERO; part * cols], vec![bf16::ZERO; part * cols])))
                    .collect();
                let mut line = format!("{what:>20}");
                for variant in 0..3 {
                    let run = || {
                        std::thread::scope(|scope| {
                            for (i, r0) in (0..rows).step_by(part).enumerate() {
                                let n = part.min(rows - r0);
                                let w = &w[r0 * cols..(r0 + n) * cols];
                                let (hi, lo, x, buf) = (&hi[r0 * cols..], &lo[r0 * cols..], &x, &bufs[i]);
                                let cp = c.as_ptr() as usize;
                                scope.spawn(move || {
                                    // SAFETY: each thread writes its own columns r0..r0 + n of c;
                                    // the operands hold the shapes given.
                                    unsafe {
                                        let cp = (cp as *mut f32).add(r0);
                                        let shape = (t, n, cols);
                                        match variant {
                                            0 => stuffed::exec::with_thread_panels(&mut |p| {
                                                let c = std::slice::from_raw_parts_mut(cp, (t - 1) * rows + n);
                                                let (simd, mode) = (Simd::Avx512, MatmulMode::Exact);
                                                stuffed_core::gemm::gemm_nt_mode(
                                                    simd, mode, shape, x, cols, w, cols, c, rows, false, p,
                                                )
                                                .expect("sizes");
                                            }),
                                            _ => {
                                                // Split once (ready), or now into this thread's buffers.
                                                let mut own = buf.lock().unwrap();
                                                let (hi, lo) = if variant == 1 {
                                                    (hi, lo)
                                                } else {
                                                    let (h, l) = &mut *own;
                                                    split(w, h, l);
                                                    (&h[..], &l[..])
                                                };
                                                let (h, l) = (hi.as_ptr(), lo.as_ptr());
                                                product(unit, shape, x.as_ptr(), h, l, cols, cp, rows)
                                            }
                                        }
                                    }
                                });
                            }
                        })
                    };
                    let best = best_of_5(run);
                    let gflops = 2.0 * (t * rows * cols) as f64 / best / 1e9;
                    line += &if amx || variant == 0 {
                        format!("  {:8.2} ({gflops:6.1} GFLOP/s)", best * 1e3)
                    } else {
                        format!("  {:8.2}", best * 1e3)
                    };
                }
                println!("{line}");
            }
        }
    }
}

/// See the module doc: `gemm_sweep peak`.
fn fma_peak() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        /// `$name`: GFLOP/s of `STEPS` × 12 FMAs on `$lanes`-lane vectors, each chain depending on
        /// itself only (12 chains cover the FMA latency of both ports).
        macro_rules! peak {
            ($name:ident, $feature:literal, $lanes:literal, $set1:ident, $fma:ident) => {
                #[target_feature(enable = $feature)]
                unsafe fn $name() -> f64 {
                    const STEPS: usize = 20_000_000;
                    let secs = best_of_5(|| {
                        let (b, c) = ($set1(0.999_999), $set1(1e-7));
                        let mut acc = [$set1(1.0); 12];
                        for _ in 0..STEPS {
                            for a in acc.iter_mut() {
                                *a = $fma(*a, b, c);
                            }
                        }
                        std::hint::black_box(acc);
                    });
                    (STEPS * 12 * 2 * $lanes) as f64 / secs / 1e9
                }
            };
        }
        peak!(peak_avx512, "avx512f", 16, _mm512_set1_ps, _mm512_fmadd_ps);
        peak!(peak_avx2, "avx2,fma", 8, _mm256_set1_ps, _mm256_fmadd_ps);
        /// GFLOP/s of `vdpbf16ps` in 16 lanes (two bf16 products a lane), 12 chains: what the
        /// `avx512bf16` level's kernel is read against (a Xeon without AMX issued it about every
        /// 2 cycles, where the FMA issues twice a cycle).
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn peak_dpbf16() -> f64 {
            const STEPS: usize = 20_000_000;
            let secs = best_of_5(|| {
                let one: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80));
                let tiny: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3380));
                let mut acc = [_mm512_set1_ps(1.0); 12];
                for _ in 0..STEPS {
                    for a in acc.iter_mut() {
                        *a = _mm512_dpbf16_ps(*a, one, tiny);
                    }
                }
                std::hint::black_box(acc);
            });
            (STEPS * 12 * 2 * 2 * 16) as f64 / secs / 1e9
        }
        // SAFETY: each runs only where the CPU reports its features.
        if is_x86_feature_detected!("avx512f") {
            println!("FMA peak, one core, 16 lanes: {:6.1} GFLOP/s", unsafe { peak_avx512() });
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            println!("FMA peak, one core,  8 lanes: {:6.1} GFLOP/s", unsafe { peak_avx2() });
        }
        if is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw") {
            println!("vdpbf16ps peak, one core, 16 lanes: {:6.1} GFLOP/s", unsafe { peak_dpbf16() });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("gemm_sweep peak: x86-64 only");
}

/// Seconds of the fastest of five runs of `run`, after one more to warm up.
#[cfg(target_arch = "x86_64")]
fn best_of_5(run: impl Fn()) -> f64 {
    run();
    (0..5)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}
