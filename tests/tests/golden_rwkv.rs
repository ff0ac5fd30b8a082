//! RWKV-6 (x060) and RWKV-5.2 (x052) against the `rwkv` pip package (CPU, f32) on tiny random
//! BlinkDL `.pth` checkpoints: `tests/data/rwkv*_tiny*/`, written by `tools/golden_rwkv.py`.
//! Bounds: FORMATS.md §8 (logits and final state rel ≤ 1e-4). The bf16 case is compared with the
//! package on the same bf16 file (it folds LN0 into the embedding in bf16, as we do); the `_hf`
//! cases are the same weights under the HF-format key names, against the f32 references. The
//! `rwkv6_bf16_m*_d*` cases are small bf16 files with odd LoRA ranks whose seeds were picked so that
//! the package's LN0 fold has a rounding boundary case in a row the ids use (tools/golden_rwkv.py).
use stuffed::checkpoint::Checkpoint;
use stuffed::exec::Pool;
use stuffed::model::{Layout, Model};
use stuffed_core::{Data, Weight};
use stuffed_tests::{assert_close, beside_state_file, check_forms, chunked_equals_step, data, Golden};

/// (model dir, reference dir)
const CASES: &[(&str, &str)] = &[
    ("rwkv6_tiny", "rwkv6_tiny"),
    ("rwkv6_tiny_bf16", "rwkv6_tiny_bf16"),
    ("rwkv5_tiny", "rwkv5_tiny"),
    ("rwkv6_tiny_hf", "rwkv6_tiny"),
    ("rwkv5_tiny_hf", "rwkv5_tiny"),
    ("rwkv6_bf16_m3_d5", "rwkv6_bf16_m3_d5"),
    ("rwkv6_bf16_m5_d7", "rwkv6_bf16_m5_d7"),
    ("rwkv6_bf16_m7_d3", "rwkv6_bf16_m7_d3"),
    ("rwkv6_time_state", "rwkv6_time_state"),
    ("rwkv5_time_state", "rwkv5_time_state"),
];

/// The state-tuned cases: each layer's `att.time_state` is the state every stream starts from.
const TIME_STATE: &[(&str, &str)] =
    &[("rwkv6_time_state", "rwkv6_time_state"), ("rwkv5_time_state", "rwkv5_time_state")];

/// The bf16 cases whose reference holds the package's folded embedding (`emb_ln0`).
const BF16_CASES: &[&str] = &["rwkv6_tiny_bf16", "rwkv6_bf16_m3_d5", "rwkv6_bf16_m5_d7", "rwkv6_bf16_m7_d3"];

/// The final-state references: att_shift (L, C), wkv_state (L, H, N, N), ffn_shift (L, C).
struct Ref {
    att: Vec<f32>,
    wkv: Vec<f32>,
    ffn: Vec<f32>,
}

fn load_ref(g: &Golden) -> Ref {
    Ref { att: g.f32("att_shift"), wkv: g.f32("wkv_state"), ffn: g.f32("ffn_shift") }
}

/// Our state (per layer: att_shift (C), S (H, N, N), ffn_shift (C)) against the reference.
fn check_state(case: &str, m: &Model, state: &[f32], r: &Ref) {
    let i = &m.info;
    let Layout::Rwkv { n_heads, head_size, .. } = i.layout else { panic!("not RWKV") };
    let (c, hnn) = (i.d_model, n_heads * head_size * head_size);
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
    let g = Golden::load(refcase);
    let r = load_ref(&g);
    check_forms(case, &m, &g, pool, |state| check_state(case, &m, state, &r));
}

#[test]
fn rwkv6_f32_pth() {
    check_case(CASES[0], Pool::new);
}

#[test]
fn rwkv6_bf16_pth() {
    check_case(CASES[1], Pool::new);
}

/// bf16 files with odd LoRA ranks, each with an LN0-fold boundary case in a row its ids use.
#[test]
fn rwkv6_bf16_odd_lora_ranks() {
    for &case in &CASES[5..8] {
        check_case(case, Pool::new);
    }
}

/// Our LN0 fold of every embedding row equals the package's (`F.layer_norm` on the bf16 tensors,
/// rounded to bf16) bit for bit, not only within the logits bound.
#[test]
fn ln0_fold_equals_the_package_bit_for_bit() {
    for &case in BF16_CASES {
        let ck = Checkpoint::open(&data(case).join("model.pth")).unwrap();
        let bf = |n: &str| ck.require(n).unwrap().as_bf16().unwrap();
        let emb = bf("emb.weight");
        let (w, b) = (bf("blocks.0.ln0.weight"), bf("blocks.0.ln0.bias"));
        let c = w.len();
        let (w, b) = (Weight::new(Data::Bf16(w), 1, c).unwrap(), Weight::new(Data::Bf16(b), 1, c).unwrap());
        let want = Golden::load(case).f32("emb_ln0");
        assert_eq!(want.len(), emb.len(), "{case}");
        let mut row = vec![0f32; c];
        let mut wrong = Vec::new();
        for (r, (x, want)) in emb.chunks_exact(c).zip(want.chunks_exact(c)).enumerate() {
            let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            stuffed_core::rwkv::ln0_row(&x, stuffed_core::weight::DType::Bf16, &w, &b, 1e-5, &mut row);
            wrong.extend((0..c).filter(|&i| row[i].to_bits() != want[i].to_bits()).map(|i| (r, i, row[i], want[i])));
        }
        assert!(
            wrong.is_empty(),
            "{case}: {} folded elements differ from the package's (row, col, ours, package): {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
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

/// Every case on the AVX2, AVX-512 and AVX512-BF16 (exact mode) kernels where the CPU has them.
#[test]
fn all_cases_every_x86_kernel() {
    use stuffed_core::exec::Simd;
    let mut tiles = 0;
    for &case in CASES {
        check_case(case, || Pool::with_simd(Simd::Avx2));
        check_case(case, || Pool::with_simd(Simd::Avx512));
        check_case(case, || Pool::with_simd(Simd::Avx512Bf16));
        tiles += stuffed_tests::on_amx(|| check_case(case, || Pool::with_simd(Simd::Amx)));
    }
    stuffed_tests::amx_tiles_reached("all_cases_every_x86_kernel", tiles);
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
    assert_eq!(m.info.family.name(), "rwkv6");
    assert_eq!(m.info.format, "blinkdl-pth");
    assert_eq!((m.info.d_model, m.info.n_layer), (64, 2));
    assert!(matches!(m.info.layout, Layout::Rwkv { n_heads: 4, head_size: 16, .. }), "{:?}", m.info.layout);
    let m = Model::load(&data("rwkv5_tiny").join("model.pth")).unwrap();
    assert_eq!(m.info.family.name(), "rwkv5");
    let m = Model::load(&data("rwkv6_tiny_hf")).unwrap();
    assert_eq!((m.info.family.name(), m.info.format.as_str()), ("rwkv6", "hf-safetensors"));
    assert_eq!(m.info.paper_state_size, 2 * (2 * 64 + 4 * 16 * 16));
}

/// Many GLA blocks, several calls and partial chunks equal the token-by-token recurrence.
#[test]
fn long_sequence_chunked_equals_step() {
    for case in ["rwkv6_tiny", "rwkv5_tiny"] {
        chunked_equals_step(case, &[300, 100, 64, 33]);
    }
}

/// A state-tuned model (RWKV-PEFT's `att.time_state` merged into the .pth) starts every stream from
/// its tuned state, as the `rwkv` package does: the logits from the first token on, token by token
/// and split, and the final state equal the package's (`check_forms`, which starts each run from
/// `Session::new` and each split from where the last left off); `reset` goes back to it, and the
/// state the embedding API hands out is it (not zeros).
#[test]
fn rwkv_state_tuned_models_start_from_their_state() {
    for &case in TIME_STATE {
        check_case(case, Pool::new);
        let m = Model::load(&data(case.0)).unwrap();
        let net = m.net();
        let mut init = vec![0f32; net.state_len()];
        net.initial_state(&mut init);
        assert!(init.iter().any(|&x| x != 0.0), "{}: the initial state is zeros", case.0);
        assert!(m.info.format.contains("state-tuned"), "{}", m.info.format);
        let mut s = stuffed::session::Session::new(&m, 16);
        assert_eq!(s.state, init, "{}: a session starts from the tuned state", case.0);
        s.feed(&[1, 2, 3], &mut |_, _| Ok(())).unwrap();
        s.reset();
        assert_eq!(s.state, init, "{}: reset goes back to the tuned state", case.0);
        let h = stuffed::embed::Handle::open(&data(case.0)).unwrap();
        let mut st = vec![7f32; h.state_len()];
        h.initial_state(&mut st).unwrap();
        assert_eq!(st, init, "{}: the embedding's initial state", case.0);
    }
}

/// A state file beside the model (`--state-file`: RWKV-PEFT's `time_state` alone, as RWKV-Runner
/// loads it) runs as the merged file does: the merged case's references (the golden tool checked that
/// the package on the model without the states, started from the file's states transposed, gives
/// the merged file's logits exactly), in every form.
#[test]
fn rwkv_state_file_beside_the_model() {
    for &case in TIME_STATE {
        let (_dir, m) = beside_state_file(case.0);
        let g = Golden::load(case.1);
        let r = load_ref(&g);
        check_forms(case.0, &m, &g, Pool::new, |state| check_state(case.0, &m, state, &r));
    }
}

/// A state file the model would not start from is refused naming it: one merged already (a tensor
/// both hold), another model's shape, another family, fla's RWKV-7 names, an empty file.
#[test]
fn state_files_that_do_not_fit_are_refused() {
    let state = |case: &str| data(&format!("{case}_file")).join("state.pth");
    let err =
        |model: &std::path::Path, s: &std::path::Path| format!("{:#}", Model::open(model, Some(s)).err().unwrap());
    let e = err(&data("rwkv6_time_state"), &state("rwkv6_time_state"));
    assert!(e.contains("state.pth") && e.contains("also appears in"), "{e}");
    let (_dir, base) = stuffed_tests::without_time_state("rwkv6_time_state");
    let e = err(&base, &state("rwkv7_time_state"));
    assert!(e.contains("time_state has shape [2, 32, 32], expected [2, 16, 16]"), "{e}");
    for (model, family) in [("mamba2_hf_g1_untied", "Mamba-2"), ("rwkv7_tiny_fla", "RWKV-7")] {
        let e = err(&data(model), &state("rwkv7_time_state"));
        assert!(e.contains("state.pth: 2 of its 2 tensors") && e.contains(family), "{model}: {e}");
    }
    let empty = tempfile::tempdir().unwrap();
    let file = empty.path().join("state.safetensors");
    std::fs::write(
        &file,
        safetensors::serialize(Vec::<(String, safetensors::tensor::TensorView<'_>)>::new(), None).unwrap(),
    )
    .unwrap();
    let e = err(&base, &file);
    assert!(e.contains("holds no tensors"), "{e}");
}
