//! Mamba-2 against the official implementations (HF transformers, mamba_ssm) on tiny random
//! checkpoints: `tests/data/*/ref.safetensors`, written by `tools/golden_mamba2*.py`.
//! Bounds: FORMATS.md §8 (logits and final state rel ≤ 1e-4).
use stuffed::exec::Pool;
use stuffed::model::{Layout, Model};
use stuffed_tests::{assert_close, check_forms, chunked_equals_step, data, Golden};

const CASES: &[&str] = &["mamba2_hf_g1_untied", "mamba2_hf_g2_tied", "mamba2_hf_bf16", "mamba2_official"];

/// The final-state references: ssm (L, H, P, N); conv (L, cd, k), the last k conv inputs in the
/// HF/mamba_ssm layout.
struct Ref {
    ssm: Vec<f32>,
    conv: Vec<f32>,
    conv_k: usize,
}

fn load_ref(g: &Golden) -> Ref {
    Ref { ssm: g.f32("ssm_state"), conv: g.f32("conv_state"), conv_k: g.shape("conv_state")[2] }
}

/// Our state (per layer: conv (k−1, cd), ssm (H, P, N)) against the reference tensors.
fn check_state(case: &str, m: &Model, state: &[f32], r: &Ref) {
    let (l, k) = (m.info.n_layer, r.conv_k);
    let Layout::Mamba2 { n_heads, head_dim, d_state, n_groups, .. } = m.info.layout else { panic!("not Mamba-2") };
    let cd = n_heads * head_dim + 2 * n_groups * d_state;
    let ssm_len = n_heads * head_dim * d_state;
    let per = cd * (k - 1) + ssm_len;
    let (mut conv, mut ssm) = (Vec::new(), Vec::new());
    let mut ref_conv = Vec::new();
    for layer in 0..l {
        let st = &state[layer * per..(layer + 1) * per];
        conv.extend_from_slice(&st[..cd * (k - 1)]);
        ssm.extend_from_slice(&st[cd * (k - 1)..]);
        for j in 1..k {
            ref_conv.extend((0..cd).map(|c| r.conv[(layer * cd + c) * k + j]));
        }
    }
    assert_close(&format!("{case} ssm state"), &ssm, &r.ssm);
    assert_close(&format!("{case} conv state"), &conv, &ref_conv);
}

fn check_case(case: &str, pool: fn() -> Pool) {
    let m = Model::load(&data(case)).unwrap();
    let g = Golden::load(case);
    assert!(!g.ids.len().is_multiple_of(16), "T must not be a multiple of the chunk size");
    let r = load_ref(&g);
    check_forms(case, &m, &g, pool, |state| check_state(case, &m, state, &r));
}

#[test]
fn hf_g1_untied() {
    check_case(CASES[0], Pool::new);
}

#[test]
fn hf_g2_tied() {
    check_case(CASES[1], Pool::new);
}

#[test]
fn hf_bf16_weights() {
    check_case(CASES[2], Pool::new);
}

#[test]
fn official_torch_zip() {
    check_case(CASES[3], Pool::new);
}

/// The AVX2 kernel too where the CPU would pick the AVX-512 one.
#[test]
fn all_cases_avx2_kernel() {
    for case in CASES {
        check_case(case, || Pool::with_simd(stuffed_core::exec::Simd::Avx2));
    }
}

/// The AVX-512 f32 kernel and the AVX512-BF16 one (default, exact mode) where the CPU has them
/// (`Pool::with_simd` falls back to the best level below otherwise).
#[test]
fn all_cases_avx512_and_avx512bf16_kernels() {
    let mut tiles = 0;
    for case in CASES {
        check_case(case, || Pool::with_simd(stuffed_core::exec::Simd::Avx512));
        check_case(case, || Pool::with_simd(stuffed_core::exec::Simd::Avx512Bf16));
        tiles += stuffed_tests::on_amx(|| check_case(case, || Pool::with_simd(stuffed_core::exec::Simd::Amx)));
    }
    stuffed_tests::amx_tiles_reached("all_cases_avx512_and_avx512bf16_kernels", tiles);
}

/// The same bodies on the portable kernel, one thread: every backend the CPU build has.
#[test]
fn all_cases_portable_kernel() {
    for case in CASES {
        check_case(case, Pool::serial_portable);
    }
}

/// Padded rows never win: the official case states vocab 250 over 256 rows.
#[test]
fn official_config_vocab_is_read() {
    let m = Model::load(&data("mamba2_official")).unwrap();
    assert_eq!(m.info.vocab_rows, 256);
    assert_eq!(m.info.config_vocab, Some(250));
    assert!(m.info.tied_embeddings);
}

/// Many SSD blocks in one call (T = 300 > 64·4), several calls, and a partial last chunk all equal
/// the token-by-token recurrence (which the references above pin down).
#[test]
fn long_sequence_chunked_equals_step() {
    for case in ["mamba2_hf_g2_tied", "mamba2_hf_bf16"] {
        chunked_equals_step(case, &[300, 256, 100, 64, 33]);
    }
}
