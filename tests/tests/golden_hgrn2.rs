//! HGRN-2 against fla 0.6.0's HGRN2ForCausalLM (CPU, its Triton kernels replaced by the naive
//! recurrence) on a tiny random checkpoint: `tests/data/hgrn2_tiny/`, from `tools/golden_hgrn2.py`.
//! Bounds: FORMATS.md §8 (logits and final state rel ≤ 1e-4).
use stuffed::checkpoint::Checkpoint;
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed_tests::{assert_close, data, run};

const CASE: &str = "hgrn2_tiny";

struct Ref {
    ids: Vec<u32>,
    logits: Vec<f32>,
    stepwise: Vec<f32>,
    split: Vec<f32>,
    /// (L, H, K, V)
    state: Vec<f32>,
}

fn load_ref() -> Ref {
    let ck = Checkpoint::open(&data(CASE).join("ref.safetensors")).unwrap();
    let f = |n: &str| ck.require(n).unwrap().as_f32().unwrap().to_vec();
    Ref {
        ids: ck.require("input_ids").unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect(),
        logits: f("logits"),
        stepwise: f("logits_stepwise"),
        split: f("logits_split"),
        state: f("state"),
    }
}

fn check(pool: fn() -> Pool) {
    let m = Model::load(&data(CASE)).unwrap();
    assert_eq!(m.info.family, "hgrn2");
    let r = load_ref();
    assert!(r.ids.len() > 64, "T must exceed one GLA block");
    let (full, state) = run(&m, pool(), &r.ids, 256, &[]);
    assert_close("chunked vs reference", &full, &r.logits);
    assert_close("chunked final state", &state, &r.state);
    let (small, _) = run(&m, pool(), &r.ids, 16, &[]);
    assert_close("chunk 16 vs reference", &small, &r.logits);
    let (step, state) = run(&m, pool(), &r.ids, 1, &[]);
    assert_close("token-by-token vs reference stepwise", &step, &r.stepwise);
    assert_close("token-by-token vs ours chunked", &step, &full);
    assert_close("token-by-token final state", &state, &r.state);
    let (split, _) = run(&m, pool(), &r.ids, 256, &[40]);
    assert_close("split 40+57 vs reference", &split, &r.split);
    let (odd, _) = run(&m, pool(), &r.ids, 7, &[1, 13]);
    assert_close("splits 1+13+83, chunk 7", &odd, &r.logits);
}

#[test]
fn hgrn2_fla_reference() {
    check(Pool::new);
}

#[test]
fn hgrn2_portable_kernel() {
    check(Pool::serial_portable);
}

#[test]
fn hgrn2_long_sequence_chunked_equals_step() {
    let m = Model::load(&data(CASE)).unwrap();
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 256).collect();
    let (step, step_state) = run(&m, Pool::new(), &ids, 1, &[]);
    for chunk in [300, 100, 64, 33] {
        let (chunked, state) = run(&m, Pool::new(), &ids, chunk, &[]);
        assert_close(&format!("T=300 chunk {chunk} vs step"), &chunked, &step);
        assert_close(&format!("T=300 chunk {chunk} state vs step"), &state, &step_state);
    }
}

#[test]
fn hgrn2_text_commands_need_a_tokenizer() {
    let err =
        stuffed::tokenizer::Tokenizer::for_model(Some(&data(CASE)), None).err().expect("no tokenizer.json: an error");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
