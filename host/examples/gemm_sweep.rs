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
use half::{bf16, f16};
use std::time::Instant;
use stuffed::exec::Pool;
use stuffed_core::{Data, Exec, Weight};

fn main() {
    let dtype = std::env::args().nth(1).unwrap_or_else(|| "bf16".into());
    if dtype == "amx" {
        return amx_plans();
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
        let shapes = [
            (3352, 768, "130m in_proj"),
            (768, 1536, "130m out_proj"),
            (7168, 2048, "rwkv6-1.6b ffn.key"),
            (50288, 768, "130m lm_head"),
        ];
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
                    for fast in [false, true] {
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
                                                        unit, plan, t, n, cols, xp, cols, wp, cols, cp, rows, false,
                                                        fast, p,
                                                    )
                                                })
                                            }
                                        });
                                    }
                                })
                            };
                            run();
                            let mut best = f64::MAX;
                            for _ in 0..5 {
                                let start = Instant::now();
                                run();
                                best = best.min(start.elapsed().as_secs_f64());
                            }
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
