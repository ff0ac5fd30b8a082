//! Training-free forgetting (SPEC.md §2.4): RRI, Δ scaling and the sliding window against an
//! independent direct-sum implementation (tools/golden_forget.py), chunked equal to token by token
//! under every method, state normalization bounded by τ, periodic reset equal to a fresh start.
use std::path::PathBuf;
use stuffed::checkpoint::Checkpoint;
use stuffed::forget::ForgetSpec;
use stuffed::model::Model;
use stuffed::session::{fro, Session};
use stuffed_tests::{logits, rel};

fn case() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba2_hf_g1_untied")
}

fn model(spec: &str) -> Model {
    let mut m = Model::load(&case()).unwrap();
    m.set_forget(ForgetSpec::parse(spec).unwrap()).unwrap();
    m
}

#[test]
fn methods_match_the_direct_sum_reference() {
    let r = Checkpoint::open(&case().join("forget_ref.safetensors")).unwrap();
    let ids: Vec<u32> = r.require("input_ids").unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect();
    let plain = r.require("logits_plain").unwrap().as_f32().unwrap().to_vec();
    for (spec, key) in [
        ("none", "logits_plain"),
        ("rri:a=0.98,b=0.75", "logits_rri"),
        ("dt:c=0.5", "logits_dt"),
        ("window:r=8", "logits_window8"),
    ] {
        let want = r.require(key).unwrap().as_f32().unwrap();
        if key != "logits_plain" {
            assert!(rel(want, &plain) > 1e-2, "{spec} must change the logits");
        }
        let m = model(spec);
        let chunked = logits(&m, &ids, 256);
        let stepped = logits(&m, &ids, 1);
        let split = logits(&m, &ids, 5);
        for (what, got) in [("chunked", &chunked), ("token by token", &stepped), ("chunk 5", &split)] {
            let e = rel(got, want);
            println!("{spec} {what}: rel {e:.3e}");
            assert!(e <= 1e-4, "{spec} {what} vs reference: rel {e:.3e}");
        }
        assert!(rel(&chunked, &stepped) <= 1e-4);
    }
}

#[test]
fn chunked_equals_step_under_every_method_on_long_streams() {
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 256).collect();
    for spec in [
        "rri:a=0.9999,b=0.75",
        "dt:c=0.5",
        "window:r=64",
        "window:r=100",
        "state-norm:every=32,calib=64",
        "reset:every=50",
    ] {
        let m = model(spec);
        let step = logits(&m, &ids, 1);
        for chunk in [256, 77] {
            let e = rel(&logits(&m, &ids, chunk), &step);
            println!("{spec} chunk {chunk} vs step: rel {e:.3e}");
            assert!(e <= 1e-4, "{spec} chunk {chunk}: rel {e:.3e}");
        }
    }
}

#[test]
fn window_wider_than_the_stream_changes_nothing() {
    let ids: Vec<u32> = (0..120u32).map(|i| (i * 31 + 5) % 256).collect();
    let plain = logits(&model("none"), &ids, 256);
    assert!(rel(&logits(&model("window:r=128"), &ids, 256), &plain) <= 1e-5);
    assert!(rel(&logits(&model("window:r=100"), &ids, 256), &plain) > 1e-4);
}

#[test]
fn state_norm_keeps_every_head_within_tau() {
    let ids: Vec<u32> = (0..400u32).map(|i| (i * 131 + 7) % 256).collect();
    let m = model("state-norm:every=16,calib=48");
    let net = m.net();
    let mut s = Session::new(&m, 64);
    let mut scaled = 0;
    for part in ids.chunks(16) {
        let before: Vec<f32> = s.state.clone();
        s.feed(part, &mut |_, _| Ok(())).unwrap();
        if s.pos < 48 {
            assert!(s.tau.is_empty());
            continue;
        }
        assert_eq!(s.tau.len(), net.n_layer() * net.n_heads());
        for l in 0..net.n_layer() {
            for h in 0..net.n_heads() {
                let norm = fro(&s.state[net.head_state(l, h)]);
                let tau = s.tau[l * net.n_heads() + h];
                assert!(norm <= tau * (1.0 + 1e-5), "layer {l} head {h} at {}: ‖h‖ {norm} > τ {tau}", s.pos);
                scaled += (norm >= tau * (1.0 - 1e-6)) as usize;
            }
        }
        let _ = before;
    }
    assert!(scaled > 0, "the test must exercise the clamp");
}

#[test]
fn reset_equals_a_fresh_start() {
    let ids: Vec<u32> = (0..90u32).map(|i| (i * 17 + 3) % 256).collect();
    let m = model("reset:every=40");
    let v = m.info.vocab_rows;
    let all = logits(&m, &ids, 256);
    let plain = model("none");
    let fresh = logits(&plain, &ids[40..80], 256);
    assert!(rel(&all[40 * v..80 * v], &fresh) <= 1e-5);
    assert!(rel(&all[..40 * v], &logits(&plain, &ids[..40], 256)) <= 1e-5);
}

#[test]
fn bad_specs_are_refused() {
    for bad in [
        "rri:a=2",
        "window:r=0",
        "window:r=1.5",
        "reset:every=2048.5",
        "dt:c=-1",
        "nope",
        "rri:z=1",
        "reset",
        "window:r=x",
    ] {
        let parsed = ForgetSpec::parse(bad);
        let err = match parsed {
            Err(e) => e.to_string(),
            Ok(spec) => format!("{:#}", Model::load(&case()).unwrap().set_forget(spec).unwrap_err()),
        };
        assert!(err.contains("forget"), "{bad}: {err}");
    }
    assert_eq!(
        ForgetSpec::parse("state-norm:every=128,calib=8192").unwrap().to_string(),
        "state-norm:every=128,calib=8192"
    );
    assert_eq!(ForgetSpec::parse("window:r=4k").unwrap().to_string(), "window:r=4096");
    assert_eq!(ForgetSpec::parse("reset:every=1m").unwrap().to_string(), "reset:every=1048576");
}
