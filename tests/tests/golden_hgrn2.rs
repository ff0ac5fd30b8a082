//! HGRN-2 against fla 0.6.0's HGRN2ForCausalLM (CPU, its Triton kernels replaced by the naive
//! recurrence) on tiny random checkpoints: `tests/data/hgrn2_tiny/` (f32) and
//! `tests/data/hgrn2_tiny_bf16/` (the same model stored in bf16, references from its bf16 values
//! upcast to f32), from `tools/golden_hgrn2.py`. Bounds: FORMATS.md §8 (logits and final state
//! rel ≤ 1e-4).
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed_tests::{assert_close, check_forms, chunked_equals_step, data, Golden};

const CASE: &str = "hgrn2_tiny";
const CASES: &[&str] = &[CASE, "hgrn2_tiny_bf16"];

fn check(pool: fn() -> Pool) {
    for case in CASES {
        let m = Model::load(&data(case)).unwrap();
        assert_eq!(m.info.family.name(), "hgrn2");
        let g = Golden::load(case);
        assert!(g.ids.len() > 64, "T must exceed one GLA block");
        // The final state (L, H, K, V).
        let want = g.f32("state");
        check_forms(case, &m, &g, pool, |state| {
            assert_close(&format!("{case} final state"), state, &want);
        });
    }
}

#[test]
fn hgrn2_fla_reference() {
    check(Pool::new);
}

/// The AVX2, AVX-512 and AVX512-BF16 (exact mode) kernels where the CPU has them.
#[test]
fn hgrn2_every_x86_kernel() {
    use stuffed_core::exec::Simd;
    check(|| Pool::with_simd(Simd::Avx2));
    check(|| Pool::with_simd(Simd::Avx512));
    check(|| Pool::with_simd(Simd::Avx512Bf16));
    let tiles = stuffed_tests::on_amx(|| check(|| Pool::with_simd(Simd::Amx)));
    stuffed_tests::amx_tiles_reached("hgrn2_every_x86_kernel", tiles);
}

#[test]
fn hgrn2_portable_kernel() {
    check(Pool::serial_portable);
}

#[test]
fn hgrn2_long_sequence_chunked_equals_step() {
    chunked_equals_step(CASE, &[300, 100, 64, 33]);
}

#[test]
fn hgrn2_text_commands_need_a_tokenizer() {
    let err =
        stuffed::tokenizer::Tokenizer::for_model(Some(&data(CASE)), None).err().expect("no tokenizer.json: an error");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
