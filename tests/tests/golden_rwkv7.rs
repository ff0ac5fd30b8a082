//! RWKV-7 (x070) against the `rwkv` 0.8.32 pip package (CPU, f32, `RWKV_V7_ON=1`) on tiny random
//! BlinkDL `.pth` checkpoints with odd LoRA ranks (C 128, H 2, N 64, F 200, ranks decay 24 / a 20 /
//! v 12 / gate 36): `tests/data/rwkv7_tiny*/`, written by `tools/golden_rwkv7.py`, whose references
//! also agree with a direct float64 recurrence of FAMILIES.md §1.4 (rel ≤ 1e-6, checked there).
//! `rwkv7_tiny` (f32) keeps layer 0's unused v0/v1/v2, `rwkv7_tiny_bf16` has none; `rwkv7_tiny_fla`
//! is the bf16 weights in the fla / HF layout, against the bf16 `.pth` reference (both layouts,
//! one set of logits). Bounds: FORMATS.md §8 (logits and final state rel ≤ 1e-4).
use stuffed::exec::Pool;
use stuffed::model::{Layout, Model};
use stuffed_tests::{assert_close, check_forms, chunked_equals_step, data, Golden};

/// (model dir, reference dir)
const CASES: &[(&str, &str)] = &[
    ("rwkv7_tiny", "rwkv7_tiny"),
    ("rwkv7_tiny_bf16", "rwkv7_tiny_bf16"),
    ("rwkv7_tiny_fla", "rwkv7_tiny_bf16"),
    ("rwkv7_time_state", "rwkv7_time_state"),
];

/// Our state (per layer: att_shift (C), S (H, N_value, N_key), ffn_shift (C)) against the
/// package's (the same layout).
fn check_state(case: &str, m: &Model, state: &[f32], g: &Golden) {
    let i = &m.info;
    let Layout::Rwkv7 { n_heads, head_size, .. } = i.layout else { panic!("not RWKV-7") };
    let (c, hnn) = (i.d_model, n_heads * head_size * head_size);
    let per = 2 * c + hnn;
    assert_eq!(state.len(), i.n_layer * per);
    let (mut att, mut wkv, mut ffn) = (Vec::new(), Vec::new(), Vec::new());
    for st in state.chunks_exact(per) {
        att.extend_from_slice(&st[..c]);
        wkv.extend_from_slice(&st[c..c + hnn]);
        ffn.extend_from_slice(&st[c + hnn..]);
    }
    assert_close(&format!("{case} att_shift"), &att, &g.f32("att_shift"));
    assert_close(&format!("{case} wkv state"), &wkv, &g.f32("wkv_state"));
    assert_close(&format!("{case} ffn_shift"), &ffn, &g.f32("ffn_shift"));
}

fn check_case((case, refcase): (&str, &str), pool: fn() -> Pool) {
    let m = Model::load(&data(case)).unwrap();
    assert_eq!(m.info.family.name(), "rwkv7");
    let g = Golden::load(refcase);
    check_forms(case, &m, &g, pool, |state| check_state(case, &m, state, &g));
}

#[test]
fn rwkv7_f32_pth() {
    check_case(CASES[0], Pool::new);
}

#[test]
fn rwkv7_bf16_pth() {
    check_case(CASES[1], Pool::new);
}

#[test]
fn rwkv7_fla_layout() {
    check_case(CASES[2], Pool::new);
}

/// Every case on the AVX2, AVX-512 and AVX512-BF16 (exact mode) kernels where the CPU has them.
#[test]
fn rwkv7_every_x86_kernel() {
    use stuffed_core::exec::Simd;
    let mut tiles = 0;
    for &case in CASES {
        check_case(case, || Pool::with_simd(Simd::Avx2));
        check_case(case, || Pool::with_simd(Simd::Avx512));
        check_case(case, || Pool::with_simd(Simd::Avx512Bf16));
        tiles += stuffed_tests::on_amx(|| check_case(case, || Pool::with_simd(Simd::Amx)));
    }
    stuffed_tests::amx_tiles_reached("rwkv7_every_x86_kernel", tiles);
}

#[test]
fn rwkv7_portable_kernel() {
    for &case in CASES {
        check_case(case, Pool::serial_portable);
    }
}

#[test]
fn rwkv7_detection_and_info() {
    let m = Model::load(&data("rwkv7_tiny")).unwrap();
    assert_eq!((m.info.family.name(), m.info.format.as_str()), ("rwkv7", "blinkdl-pth"));
    assert_eq!((m.info.d_model, m.info.n_layer), (128, 2));
    let want =
        Layout::Rwkv7 { n_heads: 2, head_size: 64, d_ffn: 200, lora_decay: 24, lora_a: 20, lora_v: 12, lora_gate: 36 };
    assert_eq!(m.info.layout, want);
    // N_S = L·(H·N² + 2C).
    assert_eq!(m.info.paper_state_size, 2 * (2 * 64 * 64 + 2 * 128));
    let m = Model::load(&data("rwkv7_tiny_bf16").join("model.pth")).unwrap();
    assert_eq!((m.info.family.name(), m.info.weight_dtype.as_str()), ("rwkv7", "bf16"));
    let m = Model::load(&data("rwkv7_tiny_fla")).unwrap();
    assert_eq!((m.info.family.name(), m.info.format.as_str()), ("rwkv7", "fla-safetensors"));
    assert_eq!(m.info.layout, want);
}

/// Several calls, partial chunks and a long stream equal the token-by-token recurrence.
#[test]
fn rwkv7_long_sequence_chunked_equals_step() {
    chunked_equals_step("rwkv7_tiny", &[300, 100, 64, 33]);
}

/// 256 embedding rows: neither World nor GPT-NeoX-20B, so text needs --tokenizer.
#[test]
fn rwkv7_text_commands_need_a_tokenizer() {
    let m = Model::load(&data("rwkv7_tiny")).unwrap();
    let err = m.tokenizer(None).err().expect("256 rows: an error");
    let e = format!("{err:#}");
    assert!(e.contains("256 rows") && e.contains("--tokenizer"), "{e}");
}

/// A state-tuned x070 file (`att.time_state` in every layer) starts every stream from S = its
/// time_state as stored (`[head][value][key]`, the state's own layout; the package, which loads no
/// x070 time_state, was started from it explicitly): logits in one call, in chunks, token by token
/// and split, and the final state (`check_forms`); a reset returns to it; `info` says so.
/// The same state as a separate file beside the model without it (`--state-file`, RWKV-Runner's way).
#[test]
fn rwkv7_state_file_beside_the_model() {
    let (_dir, m) = stuffed_tests::beside_state_file(CASES[3].0);
    let g = Golden::load(CASES[3].1);
    check_forms(CASES[3].0, &m, &g, Pool::new, |st| check_state(CASES[3].0, &m, st, &g));
}

#[test]
fn rwkv7_state_tuned_file_starts_from_its_state() {
    check_case(CASES[3], Pool::new);
    let m = Model::load(&data("rwkv7_time_state")).unwrap();
    assert!(m.info.format.contains("state-tuned"), "{}", m.info.format);
    let mut s = stuffed::session::Session::new(&m, 16);
    let init = s.state.clone();
    assert!(init.iter().any(|&x| x != 0.0));
    s.feed(&[1, 2, 3], &mut |_, _| Ok(())).unwrap();
    s.reset();
    assert_eq!(s.state, init);
}
