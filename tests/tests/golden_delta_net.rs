//! DeltaNet and Gated DeltaNet against fla 0.6.0's DeltaNetForCausalLM / GatedDeltaNetForCausalLM
//! (CPU, their Triton kernels replaced by the naive delta-rule recurrences and torch ops) on tiny
//! random checkpoints from `tools/golden_delta_net.py`: `delta_net_tiny` (use_beta, no output gate,
//! K 15 × V 30, conv 3), `delta_net_tiny_gate` (no beta, swish output gate, K 20 × V 10,
//! conv 4, tied), `gdn_tiny` (2 key heads over 4 value heads, K 6 × V 9, swish gate, conv 4,
//! tied), `gdn_tiny_neg` (allow_neg_eigval, sigmoid gate, no conv), and bf16 copies of the first two.
//! Bounds: FORMATS.md §8 (logits and final state rel ≤ 1e-4).
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed_tests::{assert_close, check_forms, chunked_equals_step, data, Golden};

const CASES: &[(&str, &str)] = &[
    ("delta_net_tiny", "delta_net"),
    ("delta_net_tiny_bf16", "delta_net"),
    ("delta_net_tiny_gate", "delta_net"),
    ("gdn_tiny", "gated_deltanet"),
    ("gdn_tiny_neg", "gated_deltanet"),
    ("gdn_tiny_bf16", "gated_deltanet"),
];

fn check(pool: fn() -> Pool) {
    for &(case, family) in CASES {
        let m = Model::load(&data(case)).unwrap();
        assert_eq!(m.info.family.name(), family);
        let g = Golden::load(case);
        assert!(g.ids.len() > 64, "T must exceed fla's recurrent-mode length");
        // The final state: per layer S (H_v, V, K), then the short convs' last inputs.
        let want = g.f32("state");
        check_forms(case, &m, &g, pool, |state| {
            assert_close(&format!("{case} final state"), state, &want);
        });
    }
}

#[test]
fn delta_net_fla_reference() {
    check(Pool::new);
}

/// The AVX2, AVX-512 and AVX512-BF16 (exact mode) kernels where the CPU has them.
#[test]
fn delta_net_every_x86_kernel() {
    use stuffed_core::exec::Simd;
    check(|| Pool::with_simd(Simd::Avx2));
    check(|| Pool::with_simd(Simd::Avx512));
    check(|| Pool::with_simd(Simd::Avx512Bf16));
    let tiles = stuffed_tests::on_amx(|| check(|| Pool::with_simd(Simd::Amx)));
    stuffed_tests::amx_tiles_reached("delta_net_every_x86_kernel", tiles);
}

#[test]
fn delta_net_portable_kernel() {
    check(Pool::serial_portable);
}

#[test]
fn delta_net_long_sequence_chunked_equals_step() {
    chunked_equals_step("delta_net_tiny", &[300, 100, 33]);
    chunked_equals_step("gdn_tiny", &[300, 64]);
}
