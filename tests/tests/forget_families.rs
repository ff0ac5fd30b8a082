//! Forgetting methods on RWKV-6, RWKV-5.2, HGRN-2 and GLA (per-channel analogues of SPEC.md §2.4:
//! RRI w′ = a·w, k′ = b·k; Δ scaling log w′ = c·log w; the sliding window by state difference).
//! The window's kernel is checked against direct sums in `stuffed_core::gla`'s unit test; here:
//! every method changes the logits, chunked = token by token = odd splits, a window wider than
//! the stream changes nothing, and the probe's log-decay sum equals Σ log w.
use stuffed::forget::ForgetSpec;
use stuffed::model::Model;
use stuffed_tests::{data, logits, rel};

const CASES: &[&str] = &["rwkv6_tiny", "rwkv5_tiny", "hgrn2_tiny", "rwkv6_tiny_bf16", "gla_tiny"];

fn model(case: &str, spec: &str) -> Model {
    let mut m = Model::load(&data(case)).unwrap();
    m.set_forget(ForgetSpec::parse(spec).unwrap()).unwrap();
    m
}

#[test]
fn every_method_chunked_equals_step() {
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 7919 + 13) % 256).collect();
    for case in CASES {
        let plain = logits(&model(case, "none"), &ids, 256);
        for spec in ["rri:a=0.98,b=0.75", "dt:c=0.5", "window:r=8", "window:r=70"] {
            let m = model(case, spec);
            let step = logits(&m, &ids, 1);
            // (HGRN-2's decays are strong: a 70-token window can leave its logits as they are.)
            if spec != "window:r=70" {
                assert!(rel(&step, &plain) > 1e-3, "{case} {spec} must change the logits");
            }
            for chunk in [256, 77, 5] {
                let e = rel(&logits(&m, &ids, chunk), &step);
                println!("{case} {spec} chunk {chunk} vs step: rel {e:.3e}");
                assert!(e <= 1e-4, "{case} {spec} chunk {chunk}: rel {e:.3e}");
            }
        }
        let wide = logits(&model(case, "window:r=256"), &ids, 64);
        let e = rel(&wide, &plain);
        assert!(e <= 1e-5, "{case}: a window wider than the stream changes nothing ({e:.3e})");
    }
}

#[test]
fn probe_log_decay_sum_is_per_key_channel() {
    let ids: Vec<u32> = (0..50u32).collect();
    for case in CASES {
        let m = model(case, "none");
        let net = m.net();
        let (names, width) = net.probe_series();
        assert_eq!(names[0], "log_decay_sum");
        // (gla_tiny's keys are expand_k = 0.5 of d_model.)
        let keys = if case.starts_with("gla") { m.info.d_model / 2 } else { m.info.d_model };
        assert_eq!(width * net.n_heads(), keys, "{case}: width = key channels per head");
        let mut probe = vec![0f32; net.probe_len()];
        let mut state = vec![0f32; net.state_len()];
        let mut scratch = vec![0f32; net.scratch_len(ids.len())];
        let mut hidden = vec![0f32; ids.len() * m.info.d_model];
        let ex = stuffed::exec::Pool::new();
        net.forward_probed(&ex, &ids, &mut state, &mut scratch, &mut hidden, &mut probe).unwrap();
        assert!(probe.iter().all(|v| *v < 0.0 && v.is_finite()), "{case}: log decays are negative");
        // Dt scaling multiplies every log decay by c.
        let mut m2 = model(case, "dt:c=0.5");
        let _ = &mut m2;
        let net2 = m2.net();
        let mut p2 = vec![0f32; net2.probe_len()];
        state.fill(0.0);
        net2.forward_probed(&ex, &ids, &mut state, &mut scratch, &mut hidden, &mut p2).unwrap();
        // Layer 0's inputs are the same; its sums halve exactly (up to rounding).
        let per_layer = p2.len() / net.n_layer();
        for (a, b) in p2[..per_layer].iter().zip(&probe[..per_layer]) {
            assert!((a - 0.5 * b).abs() <= 1e-4 * b.abs().max(1.0), "{case}: {a} vs {b}/2");
        }
        assert!(net.head_state(1, 0).end <= net.state_len());
    }
}
