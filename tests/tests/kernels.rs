//! The matrix-product contract every family is built on (`out = x · Wᵀ`, weights f32/bf16/f16), on
//! every kernel this CPU has, over the nasty shapes: one row (a token step's GEMV), partial tiles,
//! reductions that are no multiple of the vector width, and products split over threads.
use half::{bf16, f16};
use stuffed::exec::Pool;
use stuffed_core::gemm::{gemm_nt, matmul};
use stuffed_core::{Data, Exec, Weight};
use stuffed_tests::{kernel_pools, values};

/// Checks `out` against the f64 product of the stored (rounded) weights: |Δ| ≤ tol·Σ|x·w| + 1e-30.
fn check(what: &str, x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize), out: &[f32], base: Option<&[f32]>) {
    // The AVX512-BF16 and AMX kernels' hi + lo split of the activations adds ≤ 2⁻¹⁶·Σ|x·w| (tests/gemm.rs).
    let bf16_kernel = what.contains("Avx512Bf16") || what.contains("Amx");
    let tol = if bf16_kernel && what.contains("bf16") { 1e-6 + 2f64.powi(-16) } else { 1e-6 };
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (0f64, 0f64);
            for l in 0..k {
                let p = x[i * k + l] as f64 * w[j * k + l] as f64;
                s += p;
                mag += p.abs();
            }
            s += base.map_or(0.0, |b| b[i * n + j] as f64);
            let got = out[i * n + j] as f64;
            assert!((got - s).abs() <= tol * mag + 1e-30, "{what} ({m}, {n}, {k}) at ({i}, {j}): {got} vs {s}");
        }
    }
}

#[test]
fn matmul_on_every_kernel_dtype_and_shape() {
    let ms = [1, 2, 3, 4, 5, 65];
    let ns = [1, 3, 4, 5, 17, 300];
    let ks = [1, 7, 8, 9, 31, 32, 33, 100, 1030];
    let mut checked = 0;
    for pool in kernel_pools(false) {
        for &k in &ks {
            for &n in &ns {
                let w = values(n * k, (n * 31 + k) as u64);
                let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let h16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let stored = [
                    ("f32", Data::F32(&w), w.clone()),
                    ("bf16", Data::Bf16(&w16), w16.iter().map(|v| v.to_f32()).collect()),
                    ("f16", Data::F16(&h16), h16.iter().map(|v| v.to_f32()).collect()),
                ];
                for &m in &ms {
                    let x = values(m * k, (m * 7 + k) as u64 + 1);
                    for (name, data, exact) in &stored {
                        let what = format!("{:?} ×{} {name}", pool.simd(), pool.threads());
                        let wt = Weight::new(*data, n, k).unwrap();
                        let mut out = vec![f32::NAN; m * n];
                        matmul(&pool, &x, m, &wt, &mut out).unwrap();
                        check(&what, &x, exact, (m, n, k), &out, None);
                        checked += 1;
                    }
                }
            }
        }
        // gemm_nt with strides and accumulation into what `c` held (the SSD's use), one row too.
        for m in [1, 5] {
            let (n, k, lda, ldb, ldc) = (9, 33, 40, 35, 11);
            let (a, b) = (values(m * lda, 3), values(n * ldb, 4));
            let mut c = values(m * ldc, 5);
            let before = c.clone();
            pool.with_panels(&mut |p| gemm_nt(pool.simd(), (m, n, k), &a, lda, &b, ldb, &mut c, ldc, true, p).unwrap());
            let pack = |v: &[f32], rows: usize, ld: usize, cols: usize| -> Vec<f32> {
                (0..rows).flat_map(|r| v[r * ld..r * ld + cols].to_vec()).collect()
            };
            let got = pack(&c, m, ldc, n);
            let base = pack(&before, m, ldc, n);
            check("gemm_nt acc", &pack(&a, m, lda, k), &pack(&b, n, ldb, k), (m, n, k), &got, Some(&base));
            // Columns past n stay as they were.
            assert!((0..m).all(|i| c[i * ldc + n..(i + 1) * ldc] == before[i * ldc + n..(i + 1) * ldc]));
        }
    }
    assert!(checked >= 2 * 9 * 6 * 6 * 3, "{checked}");
}

/// A wrong size is an error, never a panic or a write out of bounds.
#[test]
fn matmul_rejects_bad_sizes() {
    let w = values(12, 1);
    let wt = Weight::new(Data::F32(&w), 3, 4).unwrap();
    let pool = Pool::new();
    let mut out = vec![0f32; 6];
    assert!(matmul(&pool, &values(8, 2), 2, &wt, &mut out).is_ok());
    assert!(matmul(&pool, &values(7, 2), 2, &wt, &mut out).is_err());
    assert!(matmul(&pool, &values(8, 2), 2, &wt, &mut out[..5]).is_err());
    assert!(Weight::new(Data::F32(&w[..11]), 3, 4).is_err());
}

/// An executor as a `no_std` embedder would write one: serial, on one level, its kernels' packed
/// panels in one heap buffer it owns (not the default's stack array, not the host pool's).
struct OwnPanels {
    simd: stuffed_core::exec::Simd,
    mode: stuffed_core::exec::MatmulMode,
    panels: std::sync::Mutex<Box<stuffed_core::gemm::Panels>>,
    lent: std::sync::atomic::AtomicUsize,
}

impl Exec for OwnPanels {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f)
    }
    fn simd(&self) -> stuffed_core::exec::Simd {
        self.simd
    }
    fn matmul_mode(&self) -> stuffed_core::exec::MatmulMode {
        self.mode
    }
    fn with_panels(&self, f: &mut dyn FnMut(&mut stuffed_core::gemm::Panels)) {
        self.lent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f(&mut self.panels.lock().unwrap())
    }
}

/// The core's forward (chunked and token by token) and LM head at every kernel level this CPU has,
/// both matmul modes, on a thread with a 32 KiB stack and no host in between (no `Pool::run`
/// growing the stack), nine models of seven families (bf16, and f32 Mamba-2): the x86 kernels pack
/// into the executor's `Panels` (48–96 KiB, more than the whole stack; before, on the stack, a
/// forward needed 100–128 KiB), and the logits equal bit for bit the same executor's on a full-size
/// stack. An overflow aborts the process, so each level runs in a child process (this test again).
#[test]
fn core_forward_on_a_short_stack_packs_into_the_executors_panels() {
    use stuffed_core::exec::MatmulMode;
    const CHILD: &str = "STUFFED_TEST_CORE_SHORT_STACK";
    let models = [
        "mamba2_hf_bf16",
        "mamba2_official",
        "mamba1_hf_bf16",
        "rwkv6_tiny_bf16",
        "rwkv7_tiny_bf16",
        "gla_tiny_bf16",
        "hgrn2_tiny_bf16",
        "delta_net_tiny_bf16",
        "gdn_tiny_bf16",
    ];
    if let Ok(level) = std::env::var(CHILD) {
        let simd = stuffed_core::exec::Simd::from_name(&level).unwrap();
        // Asks the OS for the tile state (or installs the trap emulator under `amx-emu`), as the
        // host does before its first AMX product.
        assert!(stuffed::exec::levels_here().contains(&simd));
        for mode in [MatmulMode::Exact, MatmulMode::Fast] {
            for name in models {
                let m = stuffed::model::Model::load(&stuffed_tests::data(name)).unwrap();
                let run = || {
                    let net = m.net();
                    let ex = OwnPanels {
                        simd,
                        mode,
                        // Straight onto the heap (`Box::new(Panels::new())` may build it on the stack first).
                        // SAFETY: `Panels` is valid uninitialised.
                        panels: std::sync::Mutex::new(unsafe { Box::new_uninit().assume_init() }),
                        lent: 0.into(),
                    };
                    let ids: Vec<u32> = (0..64).map(|k| (k * 7 + 3) % 60).collect();
                    let (t, d, v) = (ids.len(), net.d_model(), net.vocab_rows());
                    let mut logits = vec![0f32; 2 * t * v];
                    let mut hidden = vec![0f32; t * d];
                    let mut scratch = vec![0f32; net.scratch_len(t)];
                    for (form, out) in logits.chunks_exact_mut(t * v).enumerate() {
                        let mut state = vec![0f32; net.state_len()];
                        let (st, sc, h) = (&mut state[..], &mut scratch[..], &mut hidden[..]);
                        if form == 0 {
                            net.forward(&ex, &ids, st, sc, h).unwrap();
                        } else {
                            net.forward_recurrent(&ex, &ids, st, sc, h).unwrap();
                        }
                        net.logits(&ex, &hidden, t, out).unwrap();
                    }
                    (logits, ex.lent.into_inner())
                };
                let short_stack = std::thread::Builder::new().stack_size(32 << 10);
                let (short, lent) = std::thread::scope(|s| short_stack.spawn_scoped(s, run).unwrap().join().unwrap());
                let (full, _) = run();
                assert!(short.iter().all(|x| x.is_finite()), "{name}");
                assert!(short.iter().zip(&full).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: {level}");
                assert!(lent > 0, "{name}: no product asked the executor for panels");
            }
        }
        println!("ran {level}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for level in stuffed::exec::levels_here() {
        let out = std::process::Command::new(&exe)
            .args(["core_forward_on_a_short_stack_packs_into_the_executors_panels", "--exact", "--nocapture"])
            .env(CHILD, level.name())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{} on a 32 KiB stack: {:?}\n{said}", level.name(), out.status);
        assert!(said.contains(&format!("ran {}", level.name())), "{said}");
        println!("{}: the core's forward ran on a 32 KiB stack", level.name());
    }
}

/// A model's outputs do not depend on the thread count: logits of every position, 24 tokens a call
/// (blocks of 8 or 12 tokens a task), on one thread and on two, bit for bit, one golden model of
/// every family. (RWKV-6's LoRA products once picked their kernel by a task's block of tokens, so
/// a token's logits moved by ~1e-7 with `--threads`.)
#[test]
fn outputs_do_not_depend_on_the_thread_count() {
    let cases = [
        "mamba2_hf_g1_untied",
        "mamba1_hf",
        "rwkv5_tiny",
        "rwkv6_tiny",
        "rwkv6_bf16_m5_d7",
        "rwkv7_tiny",
        "hgrn2_tiny",
        "gla_tiny",
        "delta_net_tiny",
        "gdn_tiny",
    ];
    if Pool::new().threads() < 2 {
        println!("one thread here: nothing to compare");
        return;
    }
    for case in cases {
        let m = stuffed::model::Model::load(&stuffed_tests::data(case)).unwrap();
        let ids: Vec<u32> = (0..100u32).map(|i| (i * 7919 + 13) % m.info.vocab_rows as u32).collect();
        let [one, two] =
            [1, 2].map(|threads| stuffed_tests::run(&m, Pool::new().with_threads(threads), &ids, 24, &[]).0);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&one) == bits(&two), "{case}: logits differ between one thread and two");
    }
}
