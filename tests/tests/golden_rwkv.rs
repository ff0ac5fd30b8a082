//! RWKV-6 (x060) and RWKV-5.2 (x052) against the `rwkv` pip package (CPU, f32) on tiny random
//! BlinkDL `.pth` checkpoints: `tests/data/rwkv*_tiny*/`, written by `tools/golden_rwkv.py`.
//! Bounds: FORMATS.md §8 (logits and final state rel ≤ 1e-4). The bf16 case is compared with the
//! package on the same bf16 file (it folds LN0 into the embedding in bf16, as we do); the `_hf`
//! cases are the same weights under the HF-format key names, against the f32 references.
use stuffed::checkpoint::Checkpoint;
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed_tests::{assert_close, data, run};

/// (model dir, reference dir)
const CASES: &[(&str, &str)] = &[
    ("rwkv6_tiny", "rwkv6_tiny"),
    ("rwkv6_tiny_bf16", "rwkv6_tiny_bf16"),
    ("rwkv5_tiny", "rwkv5_tiny"),
    ("rwkv6_tiny_hf", "rwkv6_tiny"),
    ("rwkv5_tiny_hf", "rwkv5_tiny"),
];

struct Ref {
    ids: Vec<u32>,
    logits: Vec<f32>,
    stepwise: Vec<f32>,
    split: Vec<f32>,
    att: Vec<f32>,
    wkv: Vec<f32>,
    ffn: Vec<f32>,
}

fn load_ref(case: &str) -> Ref {
    let ck = Checkpoint::open(&data(case).join("ref.safetensors")).unwrap();
    let f = |n: &str| ck.require(n).unwrap().as_f32().unwrap().to_vec();
    Ref {
        ids: ck.require("input_ids").unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect(),
        logits: f("logits"),
        stepwise: f("logits_stepwise"),
        split: f("logits_split"),
        att: f("att_shift"),
        wkv: f("wkv_state"),
        ffn: f("ffn_shift"),
    }
}

/// Our state (per layer: att_shift (C), S (H, N, N), ffn_shift (C)) against the reference.
fn check_state(case: &str, m: &Model, state: &[f32], r: &Ref) {
    let i = &m.info;
    let (c, hnn) = (i.d_model, i.n_heads * i.head_dim * i.head_dim);
    let per = 2 * c + hnn;
    assert_eq!(state.len(), i.n_layer * per);
    let (mut att, mut wkv, mut ffn) = (Vec::new(), Vec::new(), Vec::new());
    for st in state.chunks_exact(per) {
        att.extend_from_slice(&st[..c]);
        wkv.extend_from_slice(&st[c..c + hnn]);
        ffn.extend_from_slice(&st[c + hnn..]);
    }
    assert_close(&format!("{case} att_shift"), &att, &r.att);
    assert_close(&format!("{case} wkv state"), &wkv, &r.wkv);
    assert_close(&format!("{case} ffn_shift"), &ffn, &r.ffn);
}

fn check_case((case, refcase): (&str, &str), pool: fn() -> Pool) {
    let m = Model::load(&data(case)).unwrap();
    let r = load_ref(refcase);
    let (full, state) = run(&m, pool(), &r.ids, 256, &[]);
    assert_close(&format!("{case} chunked vs reference"), &full, &r.logits);
    check_state(case, &m, &state, &r);
    let (small, _) = run(&m, pool(), &r.ids, 16, &[]);
    assert_close(&format!("{case} chunk 16 vs reference"), &small, &r.logits);
    let (step, state) = run(&m, pool(), &r.ids, 1, &[]);
    assert_close(&format!("{case} token-by-token vs reference stepwise"), &step, &r.stepwise);
    assert_close(&format!("{case} token-by-token vs ours chunked"), &step, &full);
    check_state(case, &m, &state, &r);
    let (split, _) = run(&m, pool(), &r.ids, 256, &[40]);
    assert_close(&format!("{case} split 40+21 vs reference"), &split, &r.split);
    let (odd, _) = run(&m, pool(), &r.ids, 7, &[1, 13]);
    assert_close(&format!("{case} splits 1+13+47, chunk 7"), &odd, &r.logits);
}

#[test]
fn rwkv6_f32_pth() {
    check_case(CASES[0], Pool::new);
}

#[test]
fn rwkv6_bf16_pth() {
    check_case(CASES[1], Pool::new);
}

#[test]
fn rwkv5_f32_pth() {
    check_case(CASES[2], Pool::new);
}

#[test]
fn rwkv_hf_format() {
    check_case(CASES[3], Pool::new);
    check_case(CASES[4], Pool::new);
}

#[test]
fn all_cases_portable_kernel() {
    for &case in CASES {
        check_case(case, Pool::serial_portable);
    }
}

#[test]
fn detection_and_info() {
    let m = Model::load(&data("rwkv6_tiny")).unwrap();
    assert_eq!(m.info.family, "rwkv6");
    assert_eq!(m.info.format, "blinkdl-pth");
    assert_eq!((m.info.d_model, m.info.n_layer, m.info.n_heads, m.info.head_dim), (64, 2, 4, 16));
    let m = Model::load(&data("rwkv5_tiny").join("model.pth")).unwrap();
    assert_eq!(m.info.family, "rwkv5");
    let m = Model::load(&data("rwkv6_tiny_hf")).unwrap();
    assert_eq!((m.info.family.as_str(), m.info.format.as_str()), ("rwkv6", "hf-safetensors"));
    assert_eq!(m.info.paper_state_size, 2 * (2 * 64 + 4 * 16 * 16));
}

/// Many GLA blocks, several calls and partial chunks equal the token-by-token recurrence.
#[test]
fn long_sequence_chunked_equals_step() {
    for case in ["rwkv6_tiny", "rwkv5_tiny"] {
        let m = Model::load(&data(case)).unwrap();
        let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 256).collect();
        let (step, step_state) = run(&m, Pool::new(), &ids, 1, &[]);
        for chunk in [300, 100, 64, 33] {
            let (chunked, state) = run(&m, Pool::new(), &ids, chunk, &[]);
            assert_close(&format!("{case} T=300 chunk {chunk} vs step"), &chunked, &step);
            assert_close(&format!("{case} T=300 chunk {chunk} state vs step"), &state, &step_state);
        }
    }
}
