//! GLA against fla 0.6.0's GLAForCausalLM (CPU, its Triton kernels replaced by the naive
//! recurrence and torch ops) on tiny random checkpoints: `tests/data/gla_tiny/` (f32) and
//! `tests/data/gla_tiny_bf16/` (the same model stored in bf16), from `tools/golden_gla.py`
//! (3 heads over 1 kv head, K 10 × V 30 per head, short conv 3, clamp_min), and
//! `tests/data/gla_tiny_relu/` (feature_map relu, no output gate, no short conv, 3 kv heads, no
//! clamp). Bounds: FORMATS.md §8
//! (logits and final state rel ≤ 1e-4).
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed_tests::{assert_close, check_forms, chunked_equals_step, data, Golden};

const CASES: &[&str] = &["gla_tiny", "gla_tiny_bf16", "gla_tiny_relu"];

fn check(pool: fn() -> Pool) {
    for case in CASES {
        let m = Model::load(&data(case)).unwrap();
        assert_eq!(m.info.family.name(), "gla");
        let g = Golden::load(case);
        assert!(g.ids.len() > 64, "T must exceed one GLA block");
        // The final state: per layer S (H, K, V), then the short convs' last inputs.
        let want = g.f32("state");
        check_forms(case, &m, &g, pool, |state| {
            assert_close(&format!("{case} final state"), state, &want);
        });
    }
}

#[test]
fn gla_fla_reference() {
    check(Pool::new);
}

/// The AVX2, AVX-512 and AVX512-BF16 (exact mode) kernels where the CPU has them.
#[test]
fn gla_every_x86_kernel() {
    use stuffed_core::exec::Simd;
    check(|| Pool::with_simd(Simd::Avx2));
    check(|| Pool::with_simd(Simd::Avx512));
    check(|| Pool::with_simd(Simd::Avx512Bf16));
    let tiles = stuffed_tests::on_amx(|| check(|| Pool::with_simd(Simd::Amx)));
    stuffed_tests::amx_tiles_reached("gla_every_x86_kernel", tiles);
}

#[test]
fn gla_portable_kernel() {
    check(Pool::serial_portable);
}

#[test]
fn gla_long_sequence_chunked_equals_step() {
    chunked_equals_step(CASES[0], &[300, 100, 64, 33]);
}

#[test]
fn gla_text_commands_need_a_tokenizer() {
    let err = stuffed::tokenizer::Tokenizer::for_model(Some(&data(CASES[0])), None)
        .err()
        .expect("no tokenizer.json: an error");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
