//! Forgetting methods on RWKV-6, RWKV-5.2, HGRN-2, GLA and RetNet (per-channel analogues of SPEC.md §2.4:
//! RRI w′ = a·w, k′ = b·k; Δ scaling log w′ = c·log w; the sliding window by state difference).
//! The window's kernel is checked against direct sums in `stuffed_core::gla`'s unit test; here:
//! every method changes the logits, chunked = token by token = odd splits, a window wider than
//! the stream changes nothing, and the probe's log-decay sum equals Σ log w.
use stuffed::forget::ForgetSpec;
use stuffed::model::Model;
use stuffed_tests::{data, logits, rel};

const CASES: &[&str] = &["rwkv6_tiny", "rwkv5_tiny", "hgrn2_tiny", "rwkv6_tiny_bf16", "gla_tiny", "retnet_tiny"];
/// Mamba-1 (FAMILIES.md §3.8: RRI α′ = a·α, B′ = b·B; Δ′ = c·Δ; the exact window, per channel and
/// lane; the window and the other methods are also checked against direct sums in
/// `stuffed_core::mamba1`'s unit test).
const MAMBA1: &[&str] = &["mamba1_hf", "mamba1_official"];

fn model(case: &str, spec: &str) -> Model {
    let mut m = Model::load(&data(case)).unwrap();
    m.set_forget(ForgetSpec::parse(spec).unwrap()).unwrap();
    m
}

#[test]
fn every_method_chunked_equals_step() {
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 7919 + 13) % 256).collect();
    for case in CASES.iter().chain(MAMBA1) {
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
        let mut m = Model::load(&data(case)).unwrap();
        let err = format!("{:#}", m.set_forget(ForgetSpec::parse("rri-both:a=1,b=0.5").unwrap()).unwrap_err());
        assert!(err.contains("for DeltaNet and Gated DeltaNet"), "{case}: {err}");
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
        // (gla_tiny's and retnet_tiny's keys are expand_k = 0.5 of d_model.)
        let keys =
            if case.starts_with("gla") || case.starts_with("retnet") { m.info.d_model / 2 } else { m.info.d_model };
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

/// Mamba-1's probe: a "head" is a group of channels (gcd(d_inner, 64)); its series holds
/// Σ_t log α = A_{c,n}·Σ_t Δ_t,c per (channel, lane) of the group; Δ scaling halves layer 0's sums;
/// state norm keeps every group's state within τ; reset equals a fresh start.
#[test]
fn mamba1_probe_groups_state_norm_and_reset() {
    use stuffed::model::Layout;
    use stuffed::session::Session;
    let ids: Vec<u32> = (0..50u32).collect();
    for case in MAMBA1 {
        let m = model(case, "none");
        let Layout::Mamba1 { d_inner, d_state, head_channels, .. } = m.info.layout else { panic!("{case}") };
        let net = m.net();
        let (names, width) = net.probe_series();
        assert_eq!(names, ["log_decay_sum"]);
        assert_eq!((width, net.n_heads() * head_channels), (head_channels * d_state, d_inner), "{case}");
        let ex = stuffed::exec::Pool::new();
        let run = |m: &Model| {
            let net = m.net();
            let mut probe = vec![0f32; net.probe_len()];
            let mut state = vec![0f32; net.state_len()];
            let mut scratch = vec![0f32; net.scratch_len(ids.len())];
            let mut hidden = vec![0f32; ids.len() * m.info.d_model];
            net.forward_probed(&ex, &ids, &mut state, &mut scratch, &mut hidden, &mut probe).unwrap();
            probe
        };
        let p = run(&m);
        assert!(p.iter().all(|v| *v < 0.0 && v.is_finite()), "{case}: log decays are negative");
        let p2 = run(&model(case, "dt:c=0.5"));
        let per_layer = p.len() / net.n_layer();
        for (a, b) in p2[..per_layer].iter().zip(&p[..per_layer]) {
            assert!((a - 0.5 * b).abs() <= 1e-4 * b.abs().max(1.0), "{case}: {a} vs {b}/2");
        }
        let last = net.head_state(net.n_layer() - 1, net.n_heads() - 1);
        assert_eq!(last.end, net.state_len(), "{case}: the last group's state ends the state");
        assert_eq!(last.len(), head_channels * d_state);

        let m = model(case, "state-norm:every=16,calib=48");
        let net = m.net();
        let long: Vec<u32> = (0..400u32).map(|i| (i * 131 + 7) % 256).collect();
        let mut s = Session::new(&m, 64);
        let mut scaled = 0;
        for part in long.chunks(16) {
            s.feed(part, &mut |_, _| Ok(())).unwrap();
            if s.pos < 48 {
                continue;
            }
            for l in 0..net.n_layer() {
                for h in 0..net.n_heads() {
                    let st = &s.state[net.head_state(l, h)];
                    let norm = st.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let tau = s.tau[l * net.n_heads() + h];
                    assert!(norm <= tau * (1.0 + 1e-5), "{case} layer {l} group {h}: ‖h‖ {norm} > τ {tau}");
                    scaled += (norm >= tau * (1.0 - 1e-6)) as usize;
                }
            }
        }
        assert!(scaled > 0, "{case}: the test must exercise the clamp");

        let m = model(case, "reset:every=40");
        let v = m.info.vocab_rows;
        let all = logits(&m, &long[..90], 256);
        let fresh = logits(&model(case, "none"), &long[40..80], 256);
        assert!(rel(&all[40 * v..80 * v], &fresh) <= 1e-5, "{case}: reset equals a fresh start");
    }
}

/// RWKV-7 (FAMILIES.md §1.9, §9.3): RRI (w′ = a·w, k′ = b·k; κ̂ and a untouched), Δ-scaling's
/// analogue (log w′ = c·log w) and two staggered states in place of the window (its transition is
/// not diagonal, so the window by state difference is refused; the staggered states are refused on
/// the diagonal families, whose window is exact). Each changes the logits, and chunked = token by
/// token = odd splits; staggered states wider than the stream change nothing.
#[test]
fn rwkv7_every_method_chunked_equals_step() {
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 7919 + 13) % 256).collect();
    for case in ["rwkv7_tiny", "rwkv7_tiny_bf16"] {
        let plain = logits(&model(case, "none"), &ids, 256);
        for spec in ["rri:a=0.98,b=0.75", "dt:c=0.5", "staggered:r=8", "staggered:r=70"] {
            let m = model(case, spec);
            let step = logits(&m, &ids, 1);
            let d = rel(&step, &plain);
            // (The decays are strong: a window of 70 to 140 tokens changes the logits less.)
            let min = if spec == "staggered:r=70" { 1e-4 } else { 1e-3 };
            assert!(d > min, "{case} {spec} must change the logits ({d:.3e})");
            for chunk in [256, 77, 5] {
                let e = rel(&logits(&m, &ids, chunk), &step);
                println!("{case} {spec} chunk {chunk} vs step: rel {e:.3e} (vs none {d:.3e})");
                assert!(e <= 1e-4, "{case} {spec} chunk {chunk}: rel {e:.3e}");
            }
        }
        let wide = logits(&model(case, "staggered:r=256"), &ids, 64);
        let e = rel(&wide, &plain);
        assert!(e <= 1e-5, "{case}: staggered states wider than the stream change nothing ({e:.3e})");
    }
    let mut m = Model::load(&data("rwkv7_tiny")).unwrap();
    let err = format!("{:#}", m.set_forget(ForgetSpec::parse("window:r=8").unwrap()).unwrap_err());
    assert!(err.contains("staggered:r=N") && err.contains("diagonal"), "{err}");
    let err = format!("{:#}", m.set_forget(ForgetSpec::parse("rri-both:a=1,b=0.5").unwrap()).unwrap_err());
    assert!(err.contains("for DeltaNet and Gated DeltaNet"), "{err}");
    for case in CASES {
        let mut m = Model::load(&data(case)).unwrap();
        let err = format!("{:#}", m.set_forget(ForgetSpec::parse("staggered:r=8").unwrap()).unwrap_err());
        assert!(err.contains("non-diagonal") && err.contains("window:r=N"), "{case}: {err}");
    }
}

/// RWKV-7's probe series: Σ log w per key channel (negative; Δ-scaling halves layer 0's exactly)
/// and Σ a, the in-context learning rate (the delta rule's erasure strength, in (0, T)).
#[test]
fn rwkv7_probe_series() {
    let ids: Vec<u32> = (0..50u32).collect();
    let m = model("rwkv7_tiny", "none");
    let net = m.net();
    let (names, width) = net.probe_series();
    assert_eq!(names, ["log_decay_sum", "learning_rate_sum"]);
    assert_eq!(width * net.n_heads(), m.info.d_model);
    let ex = stuffed::exec::Pool::new();
    let run = |net: &dyn stuffed_core::Recurrent| {
        let mut probe = vec![0f32; net.probe_len()];
        let mut state = vec![0f32; net.state_len()];
        let mut scratch = vec![0f32; net.scratch_len(ids.len())];
        let mut hidden = vec![0f32; ids.len() * m.info.d_model];
        net.forward_probed(&ex, &ids, &mut state, &mut scratch, &mut hidden, &mut probe).unwrap();
        probe
    };
    let p = run(net);
    let c = m.info.d_model;
    for layer in p.chunks_exact(2 * c) {
        let (lw, a) = layer.split_at(c);
        // |log w| ≤ e^{−0.5} per token.
        assert!(lw.iter().all(|v| *v < 0.0 && *v >= -0.6066 * 50.0), "log decay sums");
        assert!(a.iter().all(|v| *v > 0.0 && *v < 50.0), "learning-rate sums");
    }
    let m2 = model("rwkv7_tiny", "dt:c=0.5");
    let p2 = run(m2.net());
    for (x, y) in p2[..c].iter().zip(&p[..c]) {
        assert!((x - 0.5 * y).abs() <= 1e-4 * y.abs().max(1.0), "{x} vs {y}/2");
    }
    assert_eq!(p2[c..2 * c], p[c..2 * c], "Δ-scaling leaves the learning rate alone");
}

/// DeltaNet and Gated DeltaNet (FAMILIES.md §2.9, §9.3): RRI (α′ = a·α with the write β·v·k̂ᵀ scaled
/// by b, the erasure kept; on DeltaNet, whose α ≡ 1, `a` adds a decay), Δ-scaling's analogue on GDN
/// (log α′ = c·log α, i.e. softplus·c; refused on DeltaNet, which has no decay) and two staggered
/// states in place of the window (the transition α(I − βk̂k̂ᵀ) is not diagonal). Each changes the
/// logits, and chunked = token by token = odd splits; staggered states wider than the stream change
/// nothing; state norm keeps every value head within τ; reset equals a fresh start.
#[test]
fn delta_net_every_method_chunked_equals_step() {
    use stuffed::session::Session;
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 7919 + 13) % 256).collect();
    for case in ["delta_net_tiny", "gdn_tiny", "gdn_tiny_neg", "gdn_tiny_bf16"] {
        let gated = case.starts_with("gdn");
        let plain = logits(&model(case, "none"), &ids, 256);
        let specs: &[&str] = if gated {
            &[
                "rri:a=0.98,b=0.75",
                "rri:a=1,b=0.75",
                "rri-both:a=1,b=0.75",
                "dt:c=0.5",
                "staggered:r=8",
                "staggered:r=70",
            ]
        } else {
            &["rri:a=0.98,b=0.75", "rri:a=1,b=0.75", "rri-both:a=1,b=0.75", "staggered:r=8", "staggered:r=70"]
        };
        for spec in specs {
            let m = model(case, spec);
            let step = logits(&m, &ids, 1);
            let d = rel(&step, &plain);
            let min = if *spec == "staggered:r=70" { 1e-4 } else { 1e-3 };
            assert!(d > min, "{case} {spec} must change the logits ({d:.3e})");
            for chunk in [256, 77, 5] {
                let e = rel(&logits(&m, &ids, chunk), &step);
                println!("{case} {spec} chunk {chunk} vs step: rel {e:.3e} (vs none {d:.3e})");
                assert!(e <= 1e-4, "{case} {spec} chunk {chunk}: rel {e:.3e}");
            }
        }
        let wide = logits(&model(case, "staggered:r=256"), &ids, 64);
        let e = rel(&wide, &plain);
        assert!(e <= 1e-5, "{case}: staggered states wider than the stream change nothing ({e:.3e})");
        let mut m = Model::load(&data(case)).unwrap();
        let err = format!("{:#}", m.set_forget(ForgetSpec::parse("window:r=8").unwrap()).unwrap_err());
        assert!(err.contains("staggered:r=N") && err.contains("diagonal"), "{case}: {err}");
        let both = |s: &str| logits(&model(case, s), &ids, 256);
        let d = rel(&both("rri-both:a=1,b=0.75"), &both("rri:a=1,b=0.75"));
        assert!(d > 1e-3, "{case}: scaling the erasure too must differ from scaling the write alone ({d:.3e})");
        if !gated {
            let err = format!("{:#}", m.set_forget(ForgetSpec::parse("dt:c=0.5").unwrap()).unwrap_err());
            assert!(err.contains("DeltaNet has none"), "{case}: {err}");
        }

        let m = model(case, "state-norm:every=16,calib=48");
        let net = m.net();
        let long: Vec<u32> = (0..400u32).map(|i| (i * 131 + 7) % 256).collect();
        let mut s = Session::new(&m, 64);
        let mut scaled = 0;
        for part in long.chunks(16) {
            s.feed(part, &mut |_, _| Ok(())).unwrap();
            if s.pos < 48 {
                continue;
            }
            for l in 0..net.n_layer() {
                for h in 0..net.n_heads() {
                    let st = &s.state[net.head_state(l, h)];
                    let norm = st.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let tau = s.tau[l * net.n_heads() + h];
                    assert!(norm <= tau * (1.0 + 1e-5), "{case} layer {l} head {h}: ‖S‖ {norm} > τ {tau}");
                    scaled += (norm >= tau * (1.0 - 1e-6)) as usize;
                }
            }
        }
        assert!(scaled > 0, "{case}: the test must exercise the clamp");
        let m = model(case, "reset:every=40");
        let v = m.info.vocab_rows;
        let all = logits(&m, &long[..90], 256);
        let fresh = logits(&model(case, "none"), &long[40..80], 256);
        assert!(rel(&all[40 * v..80 * v], &fresh) <= 1e-5, "{case}: reset equals a fresh start");
    }
}

/// The delta rule's probe series per value head: Σ log α (GDN: negative, halved on layer 0 by
/// Δ-scaling; DeltaNet: exactly 0, it has no decay, and RRI's a adds T·ln a) and Σ β (the write and
/// erasure strength, in (0, T), or (0, 2T) with allow_neg_eigval).
#[test]
fn delta_net_probe_series() {
    let ids: Vec<u32> = (0..50u32).collect();
    let t = ids.len() as f32;
    let ex = stuffed::exec::Pool::new();
    let run = |m: &Model| {
        let net = m.net();
        let mut probe = vec![0f32; net.probe_len()];
        let mut state = vec![0f32; net.state_len()];
        let mut scratch = vec![0f32; net.scratch_len(ids.len())];
        let mut hidden = vec![0f32; ids.len() * m.info.d_model];
        net.forward_probed(&ex, &ids, &mut state, &mut scratch, &mut hidden, &mut probe).unwrap();
        probe
    };
    for (case, bmax) in [("delta_net_tiny", t), ("gdn_tiny", t), ("gdn_tiny_neg", 2.0 * t)] {
        let m = model(case, "none");
        let net = m.net();
        let (names, width) = net.probe_series();
        assert_eq!((names, width), (&["log_decay_sum", "beta_sum"][..], 1));
        let h = net.n_heads();
        let p = run(&m);
        for layer in p.chunks_exact(2 * h) {
            let (lg, b) = layer.split_at(h);
            if case.starts_with("gdn") {
                assert!(lg.iter().all(|v| *v < 0.0 && v.is_finite()), "{case}: log decay sums {lg:?}");
            } else {
                assert!(lg.iter().all(|v| *v == 0.0), "{case}: DeltaNet has no decay {lg:?}");
            }
            assert!(b.iter().all(|v| *v > 0.0 && *v < bmax), "{case}: beta sums {b:?}");
        }
        let (spec, f): (&str, fn(f32, f32) -> f32) = if case.starts_with("gdn") {
            ("dt:c=0.5", |_, y| 0.5 * y)
        } else {
            ("rri:a=0.5,b=1", |t, y| y + t * 0.5f32.ln())
        };
        let p2 = run(&model(case, spec));
        for (x, y) in p2[..h].iter().zip(&p[..h]) {
            let want = f(t, *y);
            assert!((x - want).abs() <= 1e-4 * want.abs().max(1.0), "{case} {spec}: {x} vs {want}");
        }
        assert_eq!(p2[h..2 * h], p[h..2 * h], "{case} {spec} leaves β alone");
        // The variant that scales the erasure with the write: α′ = a·α and β′ = b·β.
        let p3 = run(&model(case, "rri-both:a=0.5,b=0.5"));
        for (x, y) in p3[..h].iter().zip(&p[..h]) {
            let want = y + t * 0.5f32.ln();
            assert!((x - want).abs() <= 1e-4 * want.abs().max(1.0), "{case} rri-both: {x} vs {want}");
        }
        for (x, y) in p3[h..2 * h].iter().zip(&p[h..2 * h]) {
            assert!((x - 0.5 * y).abs() <= 1e-5 * y.abs(), "{case} rri-both: Σβ {x} vs half of {y}");
        }
        let stuffed::model::Layout::DeltaNet { head_k, head_v, .. } = m.info.layout else { panic!("{case}") };
        let last = net.head_state(net.n_layer() - 1, h - 1);
        assert_eq!(last.len(), head_k * head_v, "{case}: a value head's state is V × K");
        assert!(last.end <= net.state_len());
    }
}

/// A copy of `tests/data/<case>` with `shift` added to every element of each f32 tensor whose name
/// ends in `A_log` (so A = −exp(A_log) is multiplied by exp(shift)).
/// `decay:s` (Mamba-Modulation, A′ = s·A) is the model with A_log + ln s in its weights, chunked and
/// token by token, on both Mamba families; it differs from Δ scaling by the write Δ·B, which it
/// leaves alone; the other families refuse it, naming dt:c.
#[test]
fn decay_scaling_is_a_times_s() {
    let ids: Vec<u32> = (0..120u32).map(|i| (i * 7919 + 13) % 256).collect();
    for case in ["mamba2_hf_g1_untied", "mamba2_hf_g2_tied", "mamba1_hf", "falcon_mamba_hf"] {
        let s = 0.4f32;
        let decayed = model(case, &format!("decay:s={s}"));
        let shifted = Model::load(stuffed_tests::a_log_shifted(case, &|_| s.ln()).path()).unwrap();
        let want = logits(&shifted, &ids, 1);
        assert!(rel(&want, &logits(&model(case, "none"), &ids, 1)) > 1e-3, "{case}: decay must change the logits");
        assert!(rel(&want, &logits(&model(case, "dt:c=0.4"), &ids, 1)) > 1e-3, "{case}: decay is not dt");
        for chunk in [256, 17, 1] {
            let e = rel(&logits(&decayed, &ids, chunk), &want);
            println!("{case} decay:s={s} chunk {chunk} vs A_log + ln s: rel {e:.3e}");
            assert!(e <= 1e-5, "{case} chunk {chunk}: rel {e:.3e}");
        }
    }
    for case in ["rwkv6_tiny", "hgrn2_tiny", "gla_tiny", "rwkv7_tiny", "gdn_tiny"] {
        let mut m = Model::load(&data(case)).unwrap();
        let err = format!("{:#}", m.set_forget(ForgetSpec::parse("decay:s=0.5").unwrap()).unwrap_err());
        assert!(err.contains("dt:c scales its log decay alone"), "{case}: {err}");
    }
}
