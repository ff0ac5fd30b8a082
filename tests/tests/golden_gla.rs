//! GLA against fla 0.6.0's GLAForCausalLM (CPU, its Triton kernels replaced by the naive
//! recurrence and torch ops) on tiny random checkpoints: `tests/data/gla_tiny/` (f32) and
//! `tests/data/gla_tiny_bf16/` (the same model stored in bf16), from `tools/golden_gla.py`
//! (3 heads over 1 kv head, K 10 × V 30 per head, short conv 3, clamp_min), and
//! `tests/data/gla_tiny_relu/` (feature_map relu, no output gate, no short conv, 3 kv heads, no
//! clamp). RetNet (GLA's block with a fixed per-head decay and rotary q/k) against fla 0.6.0's
//! RetNetForCausalLM (its Triton kernels replaced by the naive recurrence with fla's per-head decay,
//! its rotary embeddings by fla's own reference over its own cos/sin table), from
//! `tools/golden_retnet.py`: `tests/data/retnet_tiny/` (f32; 3 heads over 1 kv head, K 10 × V 30 per
//! head, output gate) and `tests/data/retnet_tiny_bf16/`; their split golden (40 + 57) starts the
//! second call's rotary angles at position 40, which the state carries. Bounds: FORMATS.md §8
//! (logits and final state rel ≤ 1e-4).
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed_tests::{assert_close, check_forms, chunked_equals_step, data, Golden};

const CASES: &[&str] = &["gla_tiny", "gla_tiny_bf16", "gla_tiny_relu", "retnet_tiny", "retnet_tiny_bf16"];

fn check(pool: fn() -> Pool) {
    for case in CASES {
        let m = Model::load(&data(case)).unwrap();
        assert_eq!(m.info.family.name(), if case.starts_with("retnet") { "retnet" } else { "gla" });
        let g = Golden::load(case);
        assert!(g.ids.len() > 64, "T must exceed one GLA block");
        // The final state: per layer S (H, K, V), then the short convs' last inputs (GLA) or the
        // position counters (T, 0) (RetNet).
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
    chunked_equals_step("gla_tiny", &[300, 100, 64, 33]);
    chunked_equals_step("retnet_tiny", &[300, 100, 64, 33]);
}

#[test]
fn gla_text_commands_need_a_tokenizer() {
    let err = stuffed::tokenizer::Tokenizer::for_model(Some(&data(CASES[0])), None)
        .err()
        .expect("no tokenizer.json: an error");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

/// The decay is the model's, not the data's: every head's summed log decay over n tokens is
/// n·ln(1 − 2^(−5−h)) on every key channel (probe's retention series).
#[test]
fn retnet_retention_is_fixed_per_head() {
    let m = Model::load(&data("retnet_tiny")).unwrap();
    let net = m.net();
    let ids: Vec<u32> = (0..50u32).map(|i| (i * 31 + 5) % 256).collect();
    let mut state = vec![0f32; net.state_len()];
    let mut scratch = vec![0f32; net.scratch_len(ids.len())];
    let mut hidden = vec![0f32; ids.len() * net.d_model()];
    let mut probe = vec![0f32; net.probe_len()];
    net.forward_probed(&Pool::new(), &ids, &mut state, &mut scratch, &mut hidden, &mut probe).unwrap();
    let (_, width) = net.probe_series();
    for l in 0..net.n_layer() {
        for h in 0..net.n_heads() {
            let want = 50.0 * (1.0 - 2f64.powi(-5 - h as i32)).ln();
            for ch in 0..width {
                let got = probe[(l * net.n_heads() + h) * width + ch] as f64;
                assert!((got - want).abs() < 1e-4 * want.abs(), "layer {l} head {h} ch {ch}: {got} vs {want}");
            }
        }
    }
}

/// Hidden rows of `ids` from a zero state whose every layer's position is `(lo, hi)`, fed in the
/// calls `splits`; and the final position counters of layer 0.
fn from_position(m: &Model, lo: f32, hi: f32, ids: &[u32], splits: &[usize]) -> (Vec<f32>, [f32; 2]) {
    let net = m.net();
    let c = net.counters().layers.expect("RetNet counts its position in every layer");
    let mut s = stuffed::session::Session::new(m, 64);
    for run in c.ranges() {
        s.state[run].copy_from_slice(&[lo, hi]);
    }
    let mut rows = Vec::new();
    let mut at = 0;
    for &n in splits {
        s.feed(&ids[at..at + n], &mut |_, h| {
            rows.extend_from_slice(h);
            Ok(())
        })
        .unwrap();
        at += n;
    }
    (rows, [s.state[c.start], s.state[c.start + 1]])
}

/// Positions past f32's exact integers (2^24 = 16,777,216 tokens) are counted exactly: the counters
/// carry into the high one. Retention only sees relative positions (q at t and k at s are turned
/// by t and s), so a run from any start equals the run from 0 — unless a call starts at a position
/// that is not the one its state was written at: a run across the carry in two calls (the second
/// starting at 2^24 exactly) equals one call from position 0. `--state-dtype-all` leaves the
/// counters alone.
#[test]
fn retnet_positions_past_two_to_the_24() {
    let m = Model::load(&data("retnet_tiny")).unwrap();
    let ids: Vec<u32> = (0..7u32).map(|i| (i * 37 + 11) % 256).collect();
    let edge = 16_777_214.0f32; // 2^24 − 2
    let (one, end) = from_position(&m, edge, 0.0, &ids, &[7]);
    assert_eq!(end, [5.0, 1.0], "2^24 − 2 + 7 = 2^24 + 5");
    let (two, mid) = from_position(&m, edge, 0.0, &ids, &[2, 5]);
    assert_eq!(mid, [5.0, 1.0]);
    let (zero, _) = from_position(&m, 0.0, 0.0, &ids, &[7]);
    assert_close("from 2^24 − 2 in one call vs from 0", &one, &zero);
    assert_close("from 2^24 − 2, 2 + 5 across the carry vs from 0", &two, &zero);
    let (far, _) = from_position(&m, 5.0, 1.0, &ids, &[3, 4]);
    assert_close("from 2^24 + 5, 3 + 4 vs from 0", &far, &zero);
    let net = m.net();
    let c = net.counters().layers.unwrap();
    let ranges = stuffed::state_dtype::ranges(net, true);
    for (l, run) in c.ranges().enumerate() {
        assert!(!ranges.iter().any(|r| run.clone().any(|i| r.contains(&i))), "layer {l}'s position is rounded");
    }
}
