//! LongMamba (`stuffed longmamba`, `--forget longmamba:file=…`) on the shipped Mamba-2 models: the
//! calibration's file, what the thresholds do to Δ (exactly: a token at or below b·θ neither decays
//! nor writes its head), chunked = step, stop/resume, and refusals.
use std::path::{Path, PathBuf};
use stuffed::forget::ForgetSpec;
use stuffed::model::Model;
use stuffed_tests::{cli, data, logits, persuasion, read_json as read, rel, shipped};

fn t64() -> PathBuf {
    shipped("mamba2-tiny-l4-t64-a3-4m")
}

/// `stuffed longmamba` on the 64-token model into `out`.
fn calibrate(out: &Path, model: &Path, extra: &[&str]) -> anyhow::Result<()> {
    calibrate_to(out, model, "2k", extra)
}

/// [`calibrate`] to the target lengths `target`.
fn calibrate_to(out: &Path, model: &Path, target: &str, extra: &[&str]) -> anyhow::Result<()> {
    let (m, t, o) = (model.to_str().unwrap(), persuasion(), out.to_str().unwrap().to_string());
    let base = ["longmamba", "--model", m, "--text", &t, "--train-len", "64", "--target", target, "--out", &o];
    cli(&[&base[..], extra].concat())
}

/// Layer 0's Δ per token and head, token by token from the zero state (the probe's `dt_sum` of
/// one-token calls).
fn layer0_dt(m: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let net = m.net();
    let nh = net.n_heads();
    let ex = stuffed::exec::Pool::new();
    let (mut state, mut scratch) = (vec![0f32; net.state_len()], vec![0f32; net.scratch_len(1)]);
    let (mut hidden, mut probe) = (vec![0f32; m.info.d_model], vec![0f32; net.probe_len()]);
    ids.iter()
        .map(|id| {
            probe.fill(0.0);
            net.forward_probed(&ex, std::slice::from_ref(id), &mut state, &mut scratch, &mut hidden, &mut probe)
                .unwrap();
            probe[nh..2 * nh].to_vec()
        })
        .collect()
}

/// Mamba-2's Δ tap (what the calibration reads, one chunked call) gives every layer's Δ per token
/// as one-token calls' probe sums do, to rounding, under any forgetting method (here LongMamba's own:
/// the tap reads Δ after the filter, zeros included).
#[test]
fn the_delta_tap_is_each_tokens_delta() {
    let out = tempfile::tempdir().unwrap();
    calibrate(out.path(), &t64(), &["--windows", "4"]).unwrap();
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 7919 + 13) % 250).collect();
    let doc = read(&out.path().join("longmamba.json"));
    // (One target: the first threshold table.)
    let flat = |k: &str| -> Vec<f32> {
        let v = if k == "threshold" { &doc[k][0] } else { &doc[k] };
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
            .collect()
    };
    // θ in force per (layer, head) at the defaults b = 1, c = 0.05.
    let theta: Vec<f32> =
        flat("threshold").iter().zip(flat("retention")).map(|(&t, r)| if r > 0.05 { t } else { 0.0 }).collect();
    for spec in ["none".to_string(), format!("longmamba:file={}", out.path().join("longmamba.json").display())] {
        let mut m = Model::load(&t64()).unwrap();
        m.set_forget(ForgetSpec::parse(&spec).unwrap()).unwrap();
        let net = m.net();
        let (nl, nh, t) = (net.n_layer(), net.n_heads(), ids.len());
        let ex = stuffed::exec::Pool::new();
        let (mut state, mut scratch) = (vec![0f32; net.state_len()], vec![0f32; net.scratch_len(t)]);
        let (mut hidden, mut dt) = (vec![0f32; t * m.info.d_model], vec![0f32; nl * t * nh]);
        m.mamba2().unwrap().forward_dt(&ex, &ids, &mut state, &mut scratch, &mut hidden, &mut dt).unwrap();
        // One-token calls: the probe's Δ sum (series 1 of 4 per layer) is that token's Δ.
        let (mut st1, mut sc1) = (vec![0f32; net.state_len()], vec![0f32; net.scratch_len(1)]);
        let (mut h1, mut probe) = (vec![0f32; m.info.d_model], vec![0f32; net.probe_len()]);
        let (mut worst, mut zeros) = (0f32, 0);
        for (tt, id) in ids.iter().enumerate() {
            probe.fill(0.0);
            net.forward_probed(&ex, std::slice::from_ref(id), &mut st1, &mut sc1, &mut h1, &mut probe).unwrap();
            for l in 0..nl {
                for h in 0..nh {
                    let (a, b) = (dt[l * t * nh + tt * nh + h], probe[l * 4 * nh + nh + h]);
                    zeros += (a == 0.0) as usize;
                    if (a == 0.0) != (b == 0.0) {
                        // Rounding put one side of the threshold's edge: the other is at θ.
                        let (v, th) = (a.max(b), theta[l * nh + h]);
                        assert!(
                            (v - th).abs() <= 1e-4 * th,
                            "{spec}: layer {l} head {h} token {tt}: {a} vs {b}, θ {th}"
                        );
                        continue;
                    }
                    worst = worst.max((a - b).abs() / b.abs().max(1e-3));
                }
            }
        }
        println!("{spec}: worst relative difference {worst:.2e}, {zeros} zeros");
        assert!(worst <= 1e-4, "{spec}: {worst:e}");
        assert_eq!(zeros > 0, spec != "none", "{spec}: the filter's zeros show in the tap");
    }
}

/// The file holds one retention and one threshold per (layer, head); under the method, layer 0's
/// Δ sum over a stream is exactly the sum of the Δ above b·θ on global heads (layer 0's Δ does not
/// depend on the method), with some tokens filtered and some kept; a head whose retention is not
/// above c is left alone; b scales θ.
#[test]
fn thresholds_zero_the_steps_at_or_below_them() {
    let out = tempfile::tempdir().unwrap();
    calibrate(out.path(), &t64(), &["--windows", "20"]).unwrap();
    let file = out.path().join("longmamba.json");
    let doc = read(&file);
    let (ret, thr) = (&doc["retention"], &doc["threshold"][0]);
    assert_eq!((ret.as_array().unwrap().len(), thr[0].as_array().unwrap().len()), (4, 8), "(layers, heads)");
    let row0 =
        |v: &serde_json::Value| -> Vec<f64> { v[0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let (ret0, thr0) = (row0(ret), row0(thr));
    assert!(thr0.iter().all(|&t| t > 0.0), "a target past the training length filters: {thr0:?}");

    let base = Model::load(&t64()).unwrap();
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 250).collect();
    let dt = layer0_dt(&base, &ids);
    let nh = dt[0].len();
    for (b, c) in [(1.0f64, 0.05f64), (0.5, 0.05), (1.0, 0.995)] {
        let mut m = Model::load(&t64()).unwrap();
        m.set_forget(ForgetSpec::parse(&format!("longmamba:file={},b={b},c={c}", file.display())).unwrap()).unwrap();
        let got = layer0_dt(&m, &ids);
        let (mut filtered, mut kept, mut untouched) = (0, 0, 0);
        for h in 0..nh {
            let theta = if ret0[h] > c { (b * thr0[h]) as f32 } else { 0.0 };
            for (row, got_row) in dt.iter().zip(&got) {
                let want = if row[h] <= theta { 0.0 } else { row[h] };
                assert_eq!(got_row[h], want, "b {b} c {c} head {h}: Δ {} θ {theta}", row[h]);
                match (theta > 0.0, row[h] <= theta) {
                    (false, _) => untouched += 1,
                    (true, true) => filtered += 1,
                    (true, false) => kept += 1,
                }
            }
        }
        println!("b {b} c {c}: {filtered} filtered, {kept} kept, {untouched} on local heads");
        assert!(filtered > 0 && kept > 0, "b {b} c {c}: the thresholds must filter some steps and keep others");
        if c > 0.9 {
            assert!(untouched > 0, "c {c}: some head is local");
        }
    }
}

/// Chunked = token by token under the method; it changes the logits; the spec prints and reads
/// back to the same method.
#[test]
fn chunked_equals_step_and_the_spec_round_trips() {
    let out = tempfile::tempdir().unwrap();
    calibrate(out.path(), &t64(), &["--windows", "10"]).unwrap();
    let spec = format!("longmamba:file={}", out.path().join("longmamba.json").display());
    let f = ForgetSpec::parse(&spec).unwrap();
    assert_eq!(ForgetSpec::parse(&f.to_string()).unwrap(), f, "{f}");
    let json = serde_json::to_string(&f).unwrap();
    assert_eq!(serde_json::from_str::<ForgetSpec>(&json).unwrap(), f, "{json}");
    let mut m = Model::load(&t64()).unwrap();
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 31 + 5) % 250).collect();
    let plain = logits(&m, &ids, 64);
    m.set_forget(f).unwrap();
    let step = logits(&m, &ids, 1);
    assert!(rel(&step, &plain) > 1e-3, "the method must change the logits");
    for chunk in [200, 64, 7] {
        let e = rel(&logits(&m, &ids, chunk), &step);
        assert!(e <= 1e-5, "chunk {chunk} vs step: rel {e:.3e}");
    }
}

/// A calibration stopped after some windows resumes to the same file as one run straight through.
#[test]
fn a_stopped_calibration_resumes_to_the_same_tables() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    calibrate(a.path(), &t64(), &["--windows", "6"]).unwrap();
    calibrate(b.path(), &t64(), &["--windows", "6", "--stop-after", "2"]).unwrap();
    assert!(!b.path().join("longmamba.json").exists() && b.path().join("longmamba.checkpoint.json").exists());
    let err = format!("{:#}", calibrate(b.path(), &t64(), &["--windows", "6"]).unwrap_err());
    assert!(err.contains("--resume"), "{err}");
    calibrate(b.path(), &t64(), &["--windows", "6", "--resume"]).unwrap();
    let (x, y) = (read(&a.path().join("longmamba.json")), read(&b.path().join("longmamba.json")));
    for k in ["retention", "threshold", "windows"] {
        assert_eq!(x[k], y[k], "{k}");
    }
    // Another option is another run: refused rather than mixed.
    calibrate(b.path(), &t64(), &["--windows", "6", "--stop-after", "1", "--overwrite"]).unwrap();
    let err =
        format!("{:#}", calibrate(b.path(), &t64(), &["--windows", "6", "--top", "0.2", "--resume"]).unwrap_err());
    assert!(err.contains("another run"), "{err}");
}

#[test]
fn longmamba_refuses_what_it_cannot_use() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path();
    let e = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
    let (m, t) = (t64(), persuasion());
    let args = ["longmamba", "--model", m.to_str().unwrap(), "--text", &t, "--train-len", "64", "--target", "64"];
    let err = e(cli(&args));
    assert!(err.contains("must exceed --train-len"), "{err}");
    let err = e(calibrate(o, &t64(), &["--windows", "5000"]));
    assert!(err.contains("the text has"), "{err}");
    let err = e(calibrate(o, &data("rwkv6_tiny"), &["--windows", "2"]));
    assert!(err.contains("Mamba-2"), "{err}");

    calibrate(o, &t64(), &["--windows", "4"]).unwrap();
    let file = o.join("longmamba.json");
    let spec = |extra: &str| ForgetSpec::parse(&format!("longmamba:file={}{extra}", file.display()));
    let err = format!("{:#}", spec(",b=0").unwrap_err());
    assert!(err.contains("b must be > 0"), "{err}");
    let err = format!("{:#}", ForgetSpec::parse("longmamba:file=/nonexistent/longmamba.json").unwrap_err());
    assert!(err.contains("/nonexistent/longmamba.json"), "{err}");
    let err = format!("{:#}", ForgetSpec::parse("longmamba").unwrap_err());
    assert!(err.contains("missing file="), "{err}");
    // Another model of the same shape (the 2,048-token one): refused by content.
    let mut other = Model::load(&shipped("mamba2-tiny-l4-t2048-a3-4m")).unwrap();
    let err = format!("{:#}", other.set_forget(spec("").unwrap()).unwrap_err());
    assert!(err.contains("calibrated on another model"), "{err}");
    // Another family: refused by the core.
    let mut rwkv = Model::load(&data("rwkv6_tiny")).unwrap();
    let err = format!("{:#}", rwkv.set_forget(spec("").unwrap()).unwrap_err());
    assert!(err.contains("per Mamba-2 head"), "{err}");
    // A tampered file fails its seal.
    let text = std::fs::read_to_string(&file).unwrap().replacen("\"heads\": 8", "\"heads\": 4", 1);
    std::fs::write(&file, text).unwrap();
    assert!(spec("").is_err());
}

/// Which tokens the filter acts on, as LongMamba's code: a prompt of at least `min` tokens (their
/// `forward` when `int(seqlen/1e3) > 2`; of unknown length: filtered), never the tokens decoded
/// after it (their `step`). Through the CPU backend: a short prompt scores as the model without the
/// method, bit for bit; a long one as the method; greedy decoding after a filtered prompt gives the
/// tokens and state of the model without the method decoding from that prompted state — and not
/// those of the filter run on through the decoded tokens.
#[test]
fn the_filter_acts_on_long_prompts_and_not_on_decoded_tokens() {
    use stuffed::backend::{open, Backend, Device};
    use stuffed::forget::Phase;
    let out = tempfile::tempdir().unwrap();
    calibrate(out.path(), &t64(), &["--windows", "10"]).unwrap();
    let spec = format!("longmamba:file={},min=300", out.path().join("longmamba.json").display());
    let mut m = Model::load(&t64()).unwrap();
    m.set_forget(ForgetSpec::parse(&spec).unwrap()).unwrap();
    let plain = Model::load(&t64()).unwrap();
    let real = m.info.vocab_rows;
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 31 + 5) % 250).collect();
    let nll = |b: &mut dyn Backend, phase: Phase| {
        b.reset().unwrap();
        b.set_phase(phase);
        let mut v = Vec::new();
        b.score(&ids, &mut v).unwrap();
        v
    };
    let mut b = open(&m, 64, real, Device::Cpu, Default::default()).unwrap();
    let mut p = open(&plain, 64, real, Device::Cpu, Default::default()).unwrap();
    let none = nll(p.as_mut(), Phase::default());
    assert_eq!(nll(b.as_mut(), Phase::Prompt { len: Some(299) }), none, "a prompt under min is filtered");
    assert_eq!(nll(b.as_mut(), Phase::Answer), none, "answer tokens are filtered");
    let long = nll(b.as_mut(), Phase::Prompt { len: Some(300) });
    assert!(rel(&long, &none) > 1e-3, "a prompt of min tokens is not filtered");
    assert_eq!(nll(b.as_mut(), Phase::Prompt { len: None }), long, "a prompt of unknown length is not filtered");

    // Decoding after the filtered prompt.
    b.reset().unwrap();
    b.set_phase(Phase::Prompt { len: None });
    b.feed(&ids).unwrap();
    let prompted = b.snapshot().unwrap();
    let decoded = b.greedy(24).unwrap();
    let after = b.snapshot().unwrap();
    assert_eq!(b.phase(), Phase::Prompt { len: None }, "greedy decoding keeps the caller's phase");
    p.restore(&prompted, ids.len() as u64).unwrap();
    assert_eq!(p.greedy(24).unwrap(), decoded, "decoded tokens are filtered");
    assert_eq!(p.snapshot().unwrap().state, after.state, "decoded tokens are filtered");
    // The filter would have acted on them: the prompt's phase run on through the same tokens.
    b.restore(&prompted, ids.len() as u64).unwrap();
    b.feed(&decoded[..23]).unwrap();
    assert_ne!(b.snapshot().unwrap().state, after.state, "the filter acts on none of the decoded tokens");
}

/// A passkey grid under LongMamba filters the lengths of at least `min` tokens only: below it the
/// records are those of no forgetting (answers and key NLLs), at and above it the method's.
#[test]
fn passkey_filters_only_the_lengths_of_min_tokens_and_more() {
    let out = tempfile::tempdir().unwrap();
    calibrate(out.path(), &t64(), &["--windows", "10"]).unwrap();
    let (file, model) = (out.path().join("longmamba.json").display().to_string(), t64());
    let run = |name: &str, forget: &str| -> Vec<serde_json::Value> {
        let o = out.path().join(name);
        let args = ["passkey", "--model", model.to_str().unwrap(), "--lengths", "256,512", "--samples", "2"];
        cli(&[&args[..], &["--max-new", "6", "--forget", forget, "--out", o.to_str().unwrap()]].concat()).unwrap();
        let lines = std::fs::read_to_string(o.join("results.jsonl")).unwrap();
        lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let fields = |recs: &[serde_json::Value], length: u64| -> Vec<(serde_json::Value, serde_json::Value)> {
        recs.iter()
            .filter(|r| r["length"] == length)
            .map(|r| (r["continuation"].clone(), r["key_nll"].clone()))
            .collect()
    };
    let none = run("none", "none");
    let split = run("split", &format!("longmamba:file={file},min=512"));
    let all = run("all", &format!("longmamba:file={file},min=0"));
    assert_eq!(fields(&split, 256), fields(&none, 256), "256 < min: filtered");
    assert_eq!(fields(&split, 512), fields(&all, 512), "512 ≥ min: not filtered as with min = 0");
    assert_ne!(fields(&all, 512), fields(&none, 512), "the method changes nothing here");
    assert_eq!(fields(&none, 256).len(), 2);
    // The summary says which target filtered each length (none under min).
    let summary = read(&out.path().join("split").join("summary.json"));
    let used: Vec<_> =
        summary["accuracy_per_length"].as_array().unwrap().iter().map(|r| r["longmamba_target"].clone()).collect();
    assert_eq!(used, [serde_json::Value::Null, serde_json::json!(2048)]);

    // The key is scored in the decoded tokens' place, unfiltered: each record's key NLL is that of
    // the model without the method from the filtered prompt's state (and not the filter's).
    use stuffed::backend::{open, Device};
    use stuffed::eval::passkey::{key_tokens, prompt_text, template, Record, TemplateName};
    let mut m = Model::load(&model).unwrap();
    m.set_forget(ForgetSpec::parse(&format!("longmamba:file={file},min=0")).unwrap()).unwrap();
    let plain = Model::load(&model).unwrap();
    let tok = m.tokenizer(None).unwrap();
    let real = m.real_vocab(&tok);
    let (mut b, mut p) = (
        open(&m, 512, real, Device::Cpu, Default::default()).unwrap(),
        open(&plain, 512, real, Device::Cpu, Default::default()).unwrap(),
    );
    let tpl = template(TemplateName::Code);
    for r in all.iter().map(|r| serde_json::from_value::<Record>(r.clone()).unwrap()) {
        let (text, needle_byte) = prompt_text(&tpl, r.num_blocks, r.needle_block, &r.key);
        let (ids, _) = stuffed::text::encode_long(&tok, &text, needle_byte).unwrap();
        assert_eq!(ids.len(), r.prompt_tokens);
        let key = key_tokens(&tok, &tpl, &r.key).unwrap();
        b.reset().unwrap();
        b.feed(&ids).unwrap();
        let prompted = b.snapshot().unwrap();
        let key_nll = |s: &mut dyn stuffed::backend::Backend| {
            s.restore(&prompted, ids.len() as u64).unwrap();
            let mut nll = Vec::new();
            s.score(&key, &mut nll).unwrap();
            nll.iter().map(|&v| v as f64).sum::<f64>()
        };
        let (want, filtered) = (key_nll(p.as_mut()), key_nll(b.as_mut()));
        let got = r.key_nll.unwrap();
        println!("length {} sample {}: key NLL {got} unfiltered {want} filtered {filtered}", r.length, r.sample);
        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "key NLL {got} vs {want} (filtered {filtered})");
        assert!((filtered - want).abs() > 1e-3, "the filter would not change the key's NLL: {filtered} vs {want}");
    }
}

/// `--target 128,2k` writes one threshold table per target, each the table a calibration to that
/// target alone writes; at use a prompt takes the nearest target's (their grid of lengths: a tie
/// to the shorter), a stream of unknown length the longest's — the NLLs of the single-target file
/// of that target, bit for bit.
#[test]
fn each_prompt_takes_the_thresholds_of_the_nearest_target() {
    use stuffed::backend::{open, Device};
    use stuffed::forget::Phase;
    let dir = tempfile::tempdir().unwrap();
    let cal = |name: &str, target: &str| {
        let out = dir.path().join(name);
        calibrate_to(&out, &t64(), target, &["--windows", "6"]).unwrap();
        out.join("longmamba.json")
    };
    let (both, one, two) = (cal("both", "128,2k"), cal("one", "128"), cal("two", "2k"));
    let doc = read(&both);
    assert_eq!(doc["targets"], serde_json::json!([128, 2048]));
    assert_eq!(doc["threshold"][0], read(&one)["threshold"][0]);
    assert_eq!(doc["threshold"][1], read(&two)["threshold"][0]);
    assert_ne!(doc["threshold"][0], doc["threshold"][1], "the targets' thresholds are the same");
    let ids: Vec<u32> = (0..400u32).map(|i| (i * 31 + 5) % 250).collect();
    let nll = |file: &Path, phase: Phase| {
        let mut m = Model::load(&t64()).unwrap();
        let spec = format!("longmamba:file={},min=0", file.display());
        m.set_forget(ForgetSpec::parse(&spec).unwrap()).unwrap();
        let mut b = open(&m, 64, m.info.vocab_rows, Device::Cpu, Default::default()).unwrap();
        b.set_phase(phase);
        let mut v = Vec::new();
        b.score(&ids, &mut v).unwrap();
        v
    };
    let at = |len: u64| Phase::Prompt { len: Some(len) };
    let (by_one, by_two) = (nll(&one, Phase::default()), nll(&two, Phase::default()));
    assert!(rel(&by_one, &by_two) > 1e-4, "the two targets give the same NLLs");
    for (phase, want, which) in [
        (at(400), &by_one, "128"),
        (at(1088), &by_one, "128 (a tie: the shorter)"),
        (at(1089), &by_two, "2k"),
        (at(100_000), &by_two, "2k"),
        (Phase::default(), &by_two, "2k (unknown length: the longest)"),
    ] {
        assert_eq!(&nll(&both, phase), want, "{phase:?} should take the {which} thresholds");
    }
}

/// A longmamba.json of one target written before targets were a list (`options.target_len`, the
/// threshold's rows alone) reads as that target's table: the same NLLs as the file of today.
#[test]
fn a_file_from_before_the_target_list_reads_as_one_target() {
    let out = tempfile::tempdir().unwrap();
    calibrate(out.path(), &t64(), &["--windows", "4"]).unwrap();
    let new = out.path().join("longmamba.json");
    let mut doc = read(&new);
    let rows = doc["threshold"][0].clone();
    let o = doc.as_object_mut().unwrap();
    o.remove("targets");
    o.insert("threshold".into(), rows);
    o["options"].as_object_mut().unwrap().remove("targets");
    o["options"].as_object_mut().unwrap().insert("target_len".into(), 2048.into());
    let old = out.path().join("old.json");
    stuffed::report::write_sealed(&old, "stuffed-longmamba", &doc).unwrap();
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 31 + 5) % 250).collect();
    let with = |file: &Path| {
        let mut m = Model::load(&t64()).unwrap();
        m.set_forget(ForgetSpec::parse(&format!("longmamba:file={}", file.display())).unwrap()).unwrap();
        logits(&m, &ids, 64)
    };
    assert_eq!(with(&old), with(&new));
}
