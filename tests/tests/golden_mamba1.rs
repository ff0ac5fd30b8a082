//! Mamba-1 against the official implementations on tiny random checkpoints:
//! `mamba1_hf` and `mamba1_hf_bf16` (HF transformers' pure-torch `MambaForCausalLM`,
//! `tools/golden_mamba1.py`) and `mamba1_official` (mamba_ssm's `selective_scan_ref` and
//! `Mamba.step()`, `tools/golden_mamba1_official.py`), and `falcon_mamba_hf` (transformers'
//! `FalconMambaForCausalLM`: weightless RMSNorms on dt, B and C). Bounds: FORMATS.md §8 (logits and final state
//! rel ≤ 1e-4).
use stuffed::exec::Pool;
use stuffed::model::{Layout, Model};
use stuffed_tests::{assert_close, check_forms, chunked_equals_step, data, Golden};

const CASES: &[&str] = &["mamba1_hf", "mamba1_hf_bf16", "mamba1_official", "falcon_mamba_hf"];

/// Our state (per layer: conv (k−1, di), ssm (di, N)) against the reference tensors: ssm
/// `(L, di, N)`, conv `(L, di, k)` (the last k conv inputs, oldest first).
fn check_state(case: &str, m: &Model, state: &[f32], g: &Golden) {
    let Layout::Mamba1 { d_inner: di, d_state: n, d_conv: k, .. } = m.info.layout else { panic!("not Mamba-1") };
    let (rc, rs) = (g.f32("conv_state"), g.f32("ssm_state"));
    assert_eq!(g.shape("conv_state"), [m.info.n_layer, di, k]);
    let per = di * (k - 1) + di * n;
    assert_eq!(state.len(), m.info.n_layer * per);
    let (mut conv, mut ssm, mut ref_conv) = (Vec::new(), Vec::new(), Vec::new());
    for l in 0..m.info.n_layer {
        let st = &state[l * per..(l + 1) * per];
        conv.extend_from_slice(&st[..di * (k - 1)]);
        ssm.extend_from_slice(&st[di * (k - 1)..]);
        for j in 1..k {
            ref_conv.extend((0..di).map(|c| rc[(l * di + c) * k + j]));
        }
    }
    assert_close(&format!("{case} ssm state"), &ssm, &rs);
    assert_close(&format!("{case} conv state"), &conv, &ref_conv);
}

fn check_case(case: &str, pool: fn() -> Pool) {
    let m = Model::load(&data(case)).unwrap();
    assert_eq!(m.info.family.name(), "mamba1");
    let g = Golden::load(case);
    assert!(!g.ids.len().is_multiple_of(16), "T must not be a multiple of the chunk size");
    check_forms(case, &m, &g, pool, |state| check_state(case, &m, state, &g));
}

#[test]
fn mamba1_hf_f32() {
    check_case(CASES[0], Pool::new);
}

#[test]
fn mamba1_hf_bf16_weights() {
    check_case(CASES[1], Pool::new);
}

#[test]
fn mamba1_official_torch_zip() {
    check_case(CASES[2], Pool::new);
}

#[test]
fn falcon_mamba_hf() {
    check_case(CASES[3], Pool::new);
    let m = Model::load(&data(CASES[3])).unwrap();
    assert_eq!(m.info.format, "falcon-mamba-hf");
}

/// The AVX2, AVX-512 and AVX512-BF16 (exact mode) kernels where the CPU has them.
#[test]
fn mamba1_every_x86_kernel() {
    use stuffed_core::exec::Simd;
    let mut tiles = 0;
    for case in CASES {
        check_case(case, || Pool::with_simd(Simd::Avx2));
        check_case(case, || Pool::with_simd(Simd::Avx512));
        check_case(case, || Pool::with_simd(Simd::Avx512Bf16));
        tiles += stuffed_tests::on_amx(|| check_case(case, || Pool::with_simd(Simd::Amx)));
    }
    stuffed_tests::amx_tiles_reached("mamba1_every_x86_kernel", tiles);
}

#[test]
fn mamba1_portable_kernel() {
    for case in CASES {
        check_case(case, Pool::serial_portable);
    }
}

/// The official config states vocab 250 over 256 rows, `dt_rank "auto"` (⌈36/16⌉ = 3) and tied
/// embeddings (the file's duplicate lm_head counted once).
#[test]
fn mamba1_official_config_is_read() {
    let m = Model::load(&data("mamba1_official")).unwrap();
    assert_eq!((m.info.vocab_rows, m.info.config_vocab, m.info.tied_embeddings), (256, Some(250), true));
    assert_eq!(m.info.format, "official-torch-zip");
    assert_eq!(m.info.layout, Layout::Mamba1 { d_inner: 72, d_state: 16, dt_rank: 3, d_conv: 4, head_channels: 8 });
    // N_S = L·di·(N + k − 1).
    assert_eq!(m.info.paper_state_size, 2 * 72 * (16 + 3));
}

/// Many scan blocks in one call, several calls and a partial last chunk equal token by token.
#[test]
fn mamba1_long_sequence_chunked_equals_step() {
    for case in ["mamba1_hf", "mamba1_hf_bf16"] {
        chunked_equals_step(case, &[300, 100, 64, 33]);
    }
}
