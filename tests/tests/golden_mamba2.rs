//! Mamba-2 against the official implementations (HF transformers, mamba_ssm) on tiny random
//! checkpoints: `tests/data/*/ref.safetensors`, written by `tools/golden_mamba2*.py`.
//! Bounds: FORMATS.md §8 (logits and final state rel ≤ 1e-4).
use stuffed::checkpoint::Checkpoint;
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed_tests::{assert_close, data, run};

const CASES: &[&str] = &["mamba2_hf_g1_untied", "mamba2_hf_g2_tied", "mamba2_hf_bf16", "mamba2_official"];

struct Ref {
    ids: Vec<u32>,
    logits: Vec<f32>,
    stepwise: Vec<f32>,
    split: Vec<f32>,
    /// (L, H, P, N)
    ssm: Vec<f32>,
    /// (L, cd, k): the last k conv inputs, HF/mamba_ssm layout
    conv: Vec<f32>,
    conv_k: usize,
}

fn load_ref(case: &str) -> Ref {
    let ck = Checkpoint::open(&data(case).join("ref.safetensors")).unwrap();
    let f = |n: &str| ck.require(n).unwrap().as_f32().unwrap().to_vec();
    let conv = ck.require("conv_state").unwrap();
    Ref {
        ids: ck.require("input_ids").unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect(),
        logits: f("logits"),
        stepwise: f("logits_stepwise"),
        split: f("logits_split"),
        ssm: f("ssm_state"),
        conv_k: conv.shape[2],
        conv: f("conv_state"),
    }
}

/// Our state (per layer: conv (k−1, cd), ssm (H, P, N)) against the reference tensors.
fn check_state(case: &str, m: &Model, state: &[f32], r: &Ref) {
    let i = &m.info;
    let (l, k) = (i.n_layer, r.conv_k);
    let cd = i.n_heads * i.head_dim + 2 * i.n_groups * i.d_state;
    let ssm_len = i.n_heads * i.head_dim * i.d_state;
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
    let r = load_ref(case);
    let t = r.ids.len();
    assert!(!t.is_multiple_of(16), "T must not be a multiple of the chunk size");
    // Chunked: one call; many chunks with a partial last one; token by token.
    let (full, state) = run(&m, pool(), &r.ids, 256, &[]);
    assert_close(&format!("{case} chunked vs reference"), &full, &r.logits);
    check_state(case, &m, &state, &r);
    let (small, _) = run(&m, pool(), &r.ids, 16, &[]);
    assert_close(&format!("{case} chunk 16 vs reference"), &small, &r.logits);
    let (step, state) = run(&m, pool(), &r.ids, 1, &[]);
    assert_close(&format!("{case} token-by-token vs reference stepwise"), &step, &r.stepwise);
    assert_close(&format!("{case} token-by-token vs ours chunked"), &step, &full);
    check_state(case, &m, &state, &r);
    // Split with carried state: 40 tokens, then the rest.
    let (split, _) = run(&m, pool(), &r.ids, 256, &[40]);
    assert_close(&format!("{case} split 40+21 vs reference"), &split, &r.split);
    let (odd, _) = run(&m, pool(), &r.ids, 7, &[1, 13]);
    assert_close(&format!("{case} splits 1+13+47, chunk 7"), &odd, &r.logits);
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
        let m = Model::load(&data(case)).unwrap();
        let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 256).collect();
        let (step, step_state) = run(&m, Pool::new(), &ids, 1, &[]);
        for chunk in [300, 256, 100, 64, 33] {
            let (chunked, state) = run(&m, Pool::new(), &ids, chunk, &[]);
            assert_close(&format!("{case} T=300 chunk {chunk} vs step"), &chunked, &step);
            assert_close(&format!("{case} T=300 chunk {chunk} state vs step"), &state, &step_state);
        }
    }
}
