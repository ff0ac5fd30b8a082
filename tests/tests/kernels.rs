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
            gemm_nt(pool.simd(), (m, n, k), &a, lda, &b, ldb, &mut c, ldc, true).unwrap();
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
