//! `stuffed calibrate` (per-layer Δ / A factors, MambaExtend / Mamba-Modulation) on the shipped
//! model trained on 64-token windows, and the `--forget` tables it writes.
use std::path::{Path, PathBuf};
use stuffed::forget::ForgetSpec;
use stuffed::model::Model;
use stuffed_tests::{cli, data, logits, rel};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn t64() -> PathBuf {
    root().join("models/mamba2-tiny-l4-t64-a3-4m")
}

fn persuasion() -> PathBuf {
    root().join("host/assets/corpus/austen_persuasion.txt")
}

fn read(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Mean NLL of the first `windows` windows of `length` tokens of Persuasion, each from the zero
/// state, under `spec`: computed here with the scorer the commands use, not by calibrate.
fn mean_nll(spec: &str, length: usize, windows: usize) -> f64 {
    mean_nll_of(&persuasion(), spec, length, windows)
}

/// [`mean_nll`] of the first windows of `text`.
fn mean_nll_of(text: &Path, spec: &str, length: usize, windows: usize) -> f64 {
    let mut m = Model::load(&t64()).unwrap();
    m.set_forget(ForgetSpec::parse(spec).unwrap()).unwrap();
    let tok = m.tokenizer(None).unwrap();
    let ids = tok.encode(&std::fs::read_to_string(text).unwrap()).unwrap();
    let real = m.real_vocab(&tok);
    let mut b = stuffed::backend::open(&m, 512, real, stuffed::backend::Device::Cpu, Default::default()).unwrap();
    let (mut sum, mut n, mut nll) = (0f64, 0usize, Vec::new());
    for w in ids[..windows * length].chunks(length) {
        b.reset().unwrap();
        for piece in w.chunks(512) {
            b.score(piece, &mut nll).unwrap();
            sum += nll.iter().map(|&v| v as f64).sum::<f64>();
            n += nll.len();
        }
    }
    sum / n as f64
}

/// Both methods: the result holds one factor per layer, its loss is the least it saw (the grid of
/// uniform factors and the no-factor loss included) and is what the factors give when read back
/// through `--forget …:file=` and scored apart; `ppl` runs with the file and records the table.
#[test]
fn calibrate_finds_factors_that_lower_the_loss_they_report() {
    for (method, name) in [("dt", "dt:c="), ("decay", "decay:s=")] {
        let out = tempfile::tempdir().unwrap();
        let o = out.path().to_str().unwrap();
        let text = persuasion();
        cli(&[
            "calibrate",
            "--model",
            t64().to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--method",
            method,
            "--length",
            "256",
            "--windows",
            "2",
            "--steps",
            "4",
            "--out",
            o,
        ])
        .unwrap();
        let r = read(&out.path().join("calibrate.json"));
        assert!(!out.path().join("calibrate.checkpoint.json").exists(), "{method}: the checkpoint stays after the end");
        let forget = r["forget"].as_str().unwrap();
        assert!(forget.starts_with(name) && forget.split('/').count() == 4, "{method}: {forget}");
        // `factors` holds the f32 factors as the forget string prints them (0.01, not 0.009999999776482582).
        let printed: Vec<String> = r["factors"].as_array().unwrap().iter().map(|f| f.to_string()).collect();
        assert_eq!(printed.join("/"), forget[name.len()..], "{method}: factors as written");
        let (none, best) = (r["loss_none"].as_f64().unwrap(), r["loss_best"].as_f64().unwrap());
        let grid: Vec<f64> = r["grid"].as_array().unwrap().iter().map(|p| p["loss"].as_f64().unwrap()).collect();
        let steps: Vec<f64> = r["steps"].as_array().unwrap().iter().map(|s| s["loss"].as_f64().unwrap()).collect();
        assert_eq!((grid.len(), steps.len()), (9, 4), "{method}");
        let least = grid.iter().chain(&steps).fold(none, |a, &b| a.min(b));
        println!(
            "{method}: none {none:.6}, grid best {:.6}, best {best:.6}: {forget}",
            grid.iter().fold(f64::MAX, |a, &b| a.min(b))
        );
        assert_eq!(best, least, "{method}: the best is the least loss seen");
        assert!(best < none - 0.01, "{method}: {none} → {best}");
        let file = format!("{method}:file={}", out.path().join("calibrate.json").display());
        assert_eq!(ForgetSpec::parse(&file).unwrap().to_string(), forget, "{method}: the file's table");
        let again = mean_nll(&file, 256, 2);
        assert!((again - best).abs() <= 1e-12, "{method}: scored apart {again}, reported {best}");
        assert!((mean_nll("none", 256, 2) - none).abs() <= 1e-12, "{method}: loss without factors");
        let ppl = out.path().join("ppl");
        cli(&[
            "ppl",
            "--model",
            t64().to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "600",
            "--forget",
            &file,
            "--out",
            ppl.to_str().unwrap(),
        ])
        .unwrap();
        let res = read(&ppl.join("results.json"));
        assert_eq!(res["runs"][0]["forget"].as_str(), Some(forget), "{method}: ppl's record");
    }
}

/// A result file edited after calibrate wrote it is refused (its seal), as is a file of the
/// other method; calibrate refuses other families and text too short for its windows.
#[test]
fn calibrate_refuses_what_it_cannot_use() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let text = persuasion();
    let m = t64();
    cli(&[
        "calibrate",
        "--model",
        m.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--length",
        "64",
        "--windows",
        "1",
        "--steps",
        "1",
        "--init",
        "0.5",
        "--out",
        o,
    ])
    .unwrap();
    let f = out.path().join("calibrate.json");
    let err = format!("{:#}", ForgetSpec::parse(&format!("decay:file={}", f.display())).unwrap_err());
    assert!(err.contains("not per-layer decay"), "{err}");
    let text_now = std::fs::read_to_string(&f).unwrap();
    let forged = text_now.replacen("dt:c=", "dt:c=1", 1);
    assert_ne!(forged, text_now);
    std::fs::write(&f, forged).unwrap();
    let err = format!("{:#}", ForgetSpec::parse(&format!("dt:file={}", f.display())).unwrap_err());
    assert!(err.contains("checksum mismatch"), "{err}");
    // The error of a calibration of `model` on Persuasion with `extra` flags.
    let refused = |model: &Path, extra: &[&str]| {
        let (m, t) = (model.to_str().unwrap(), text.to_str().unwrap());
        let args = [&["calibrate", "--model", m, "--text", t, "--out", o, "--overwrite"][..], extra].concat();
        format!("{:#}", cli(&args).unwrap_err())
    };
    let err = refused(&data("rwkv6_tiny"), &["--length", "64", "--method", "decay"]);
    assert!(err.contains("--method decay scales Mamba's A"), "{err}");
    let err = refused(&data("delta_net_tiny"), &["--length", "64"]);
    assert!(err.contains("DeltaNet has none"), "{err}");
    let err = refused(&m, &["--length", "100k", "--windows", "2"]);
    assert!(err.contains("text has 121072 tokens") && err.contains("need 204800"), "{err}");
}

/// Per-layer tables through `--forget`: `decay:s=s₀/s₁/…` is the model with A_log + ln s_ℓ in
/// layer ℓ's weights (both Mamba families, chunked and token by token); a table of one value is
/// that value's uniform method bit for bit; the text form parses back to the same f32s; a table
/// of another length and the other families are refused.
#[test]
fn per_layer_tables_apply_each_layer_its_factor() {
    let ids: Vec<u32> = (0..120u32).map(|i| (i * 7919 + 13) % 256).collect();
    for case in ["mamba2_hf_g1_untied", "mamba1_hf", "falcon_mamba_hf"] {
        let n = Model::load(&data(case)).unwrap().net().n_layer();
        assert!(n >= 2, "{case}: a table needs layers that differ");
        let s: Vec<f32> = (0..n).map(|l| [0.3f32, 2.5, 0.8, 1.6][l % 4]).collect();
        let table = s.iter().map(f32::to_string).collect::<Vec<_>>().join("/");
        let mut decayed = Model::load(&data(case)).unwrap();
        let spec = ForgetSpec::parse(&format!("decay:s={table}")).unwrap();
        assert_eq!(ForgetSpec::parse(&spec.to_string()).unwrap(), spec);
        decayed.set_forget(spec).unwrap();
        let shifted = Model::load(stuffed_tests::a_log_shifted(case, &|l| s[l].ln()).path()).unwrap();
        let want = logits(&shifted, &ids, 1);
        let uniform = Model::load(stuffed_tests::a_log_shifted(case, &|_| s[0].ln()).path()).unwrap();
        assert!(rel(&want, &logits(&uniform, &ids, 1)) > 1e-3, "{case}: the layers' factors must matter");
        for chunk in [256, 17, 1] {
            let e = rel(&logits(&decayed, &ids, chunk), &want);
            println!("{case} decay:s={table} chunk {chunk} vs A_log + ln s_l: rel {e:.3e}");
            assert!(e <= 1e-5, "{case} chunk {chunk}: rel {e:.3e}");
        }
        for (one, all) in [("dt:c=0.6", "dt:c="), ("decay:s=0.6", "decay:s=")] {
            let mut a = Model::load(&data(case)).unwrap();
            a.set_forget(ForgetSpec::parse(one).unwrap()).unwrap();
            let mut b = Model::load(&data(case)).unwrap();
            b.set_forget(ForgetSpec::parse(&format!("{all}{}", vec!["0.6"; n].join("/"))).unwrap()).unwrap();
            assert!(logits(&a, &ids, 17) == logits(&b, &ids, 17), "{case}: {one} as a table");
        }
        let mut m = Model::load(&data(case)).unwrap();
        let short = vec!["0.5"; n + 1].join("/");
        let err = format!("{:#}", m.set_forget(ForgetSpec::parse(&format!("dt:c={short}")).unwrap()).unwrap_err());
        assert!(err.contains(&format!("expected {n} elements, found {}", n + 1)), "{case}: {err}");
    }
    let mut m = Model::load(&data("rwkv6_tiny")).unwrap();
    let err = format!("{:#}", m.set_forget(ForgetSpec::parse("decay:s=0.5/0.5").unwrap()).unwrap_err());
    assert!(err.contains("scale Mamba's A alone"), "{err}");
    for bad in ["dt:c=0.5/x", "dt:c=0.5/0", "decay:s=1/-2", "dt:c=0.5/0.5,file=x.json"] {
        assert!(ForgetSpec::parse(bad).is_err(), "{bad}");
    }
}

/// The per-channel families take per-layer `dt` tables too (log w′ = c_ℓ·log w): on RWKV-5,
/// RWKV-6 and Gated DeltaNet a table equals the model with ln c_ℓ added to layer ℓ's decay
/// parameter (`time_decay`: log w = −exp(time_decay + …); `A_log`: log α = −exp(A_log)·softplus(…)),
/// chunked and token by token; on every such family a table of one value is `dt:c` bit for bit,
/// and the last layer's entry acts on the last layer.
#[test]
fn per_layer_dt_tables_scale_each_layers_log_decay() {
    let ids: Vec<u32> = (0..90u32).map(|i| (i * 7919 + 13) % 64).collect();
    for (case, decay) in [("rwkv6_tiny_hf", "time_decay"), ("rwkv5_tiny_hf", "time_decay"), ("gdn_tiny", "A_log")] {
        let n = Model::load(&data(case)).unwrap().net().n_layer();
        assert!(n >= 2, "{case}: a table needs layers that differ");
        let c: Vec<f32> = (0..n).map(|l| [0.3f32, 2.5, 0.8, 1.6][l % 4]).collect();
        let table = c.iter().map(f32::to_string).collect::<Vec<_>>().join("/");
        let mut scaled = Model::load(&data(case)).unwrap();
        scaled.set_forget(ForgetSpec::parse(&format!("dt:c={table}")).unwrap()).unwrap();
        let want = logits(&Model::load(stuffed_tests::shifted(case, decay, &|l| c[l].ln()).path()).unwrap(), &ids, 1);
        let uniform = Model::load(stuffed_tests::shifted(case, decay, &|_| c[0].ln()).path()).unwrap();
        assert!(rel(&want, &logits(&uniform, &ids, 1)) > 1e-3, "{case}: the layers' factors must matter");
        for chunk in [64, 17, 1] {
            let e = rel(&logits(&scaled, &ids, chunk), &want);
            println!("{case} dt:c={table} chunk {chunk} vs {decay} + ln c_l: rel {e:.3e}");
            assert!(e <= 1e-5, "{case} chunk {chunk}: rel {e:.3e}");
        }
    }
    for case in ["rwkv6_tiny", "rwkv7_tiny", "hgrn2_tiny", "gla_tiny", "gdn_tiny", "rwkv5_tiny"] {
        let n = Model::load(&data(case)).unwrap().net().n_layer();
        let mut a = Model::load(&data(case)).unwrap();
        a.set_forget(ForgetSpec::parse("dt:c=0.6").unwrap()).unwrap();
        let mut b = Model::load(&data(case)).unwrap();
        b.set_forget(ForgetSpec::parse(&format!("dt:c={}", vec!["0.6"; n].join("/"))).unwrap()).unwrap();
        assert!(logits(&a, &ids, 17) == logits(&b, &ids, 17), "{case}: dt:c=0.6 as a table");
        // The last layer reads its own entry: 1 there moves the output off dt:c=0.6 everywhere.
        let mut last = vec!["0.6"; n];
        last[n - 1] = "1";
        let mut t = Model::load(&data(case)).unwrap();
        t.set_forget(ForgetSpec::parse(&format!("dt:c={}", last.join("/"))).unwrap()).unwrap();
        let e = rel(&logits(&t, &ids, 17), &logits(&a, &ids, 17));
        assert!(e > 1e-5, "{case}: the last layer's factor changed nothing (rel {e:.3e})");
        let mut m = Model::load(&data(case)).unwrap();
        let err = format!(
            "{:#}",
            m.set_forget(ForgetSpec::parse(&format!("dt:c={}", vec!["0.5"; n + 1].join("/"))).unwrap()).unwrap_err()
        );
        assert!(err.contains(&format!("expected {n} elements, found {}", n + 1)), "{case}: {err}");
    }
}

/// `--stop-after 2` leaves a checkpoint and no result; `--resume` ends with the result an
/// uninterrupted search writes (the same factors, losses and steps); the checkpoint of another
/// search is refused, naming what differs.
#[test]
fn a_stopped_calibration_resumes_to_the_same_result() {
    let text = persuasion();
    let (m, t) = (t64(), text.to_str().unwrap().to_string());
    let run = |out: &Path, extra: &[&str]| {
        let base = ["calibrate", "--model", m.to_str().unwrap(), "--text", &t, "--length", "128", "--windows", "2"];
        let o = out.to_str().unwrap();
        cli(&[&base[..], &["--steps", "5", "--out", o], extra].concat())
    };
    let (whole, parts) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(whole.path(), &[]).unwrap();
    run(parts.path(), &["--stop-after", "2"]).unwrap();
    assert!(parts.path().join("calibrate.checkpoint.json").exists() && !parts.path().join("calibrate.json").exists());
    let err = format!("{:#}", run(parts.path(), &["--seed", "9", "--resume"]).unwrap_err());
    assert!(err.contains("made by another run") && err.contains("seed"), "{err}");
    let err = format!("{:#}", run(parts.path(), &[]).unwrap_err());
    assert!(err.contains("holds an unfinished calibrate run"), "{err}");
    run(parts.path(), &["--resume"]).unwrap();
    let (a, b) = (read(&whole.path().join("calibrate.json")), read(&parts.path().join("calibrate.json")));
    for k in ["forget", "factors", "loss_none", "loss_start", "loss_best", "grid", "steps"] {
        assert_eq!(a[k], b[k], "{k}");
    }
    assert_eq!(b["steps"].as_array().unwrap().len(), 5);
}

/// `--objective passkey`: the loss without factors is the passkey's own key NLL on the same prompts
/// (`stuffed passkey` with the seed calibrate draws its keys from, at the same depths), averaged over
/// the key tokens; the factors lower it; `--text` is refused with it.
#[test]
fn the_passkey_objective_is_the_passkeys_key_nll() {
    let m = root().join("models/mamba2-tiny-passkey");
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let base = ["calibrate", "--model", m.to_str().unwrap(), "--objective", "passkey", "--length", "1k"];
    cli(&[&base[..], &["--windows", "4", "--steps", "2", "--out", o]].concat()).unwrap();
    let r = read(&out.path().join("calibrate.json"));
    let (none, best) = (r["loss_none"].as_f64().unwrap(), r["loss_best"].as_f64().unwrap());
    let pk = out.path().join("pk");
    // calibrate's default --seed 0, mixed with PASSKEY_SEED: 0 ^ PASSKEY_SEED.
    let seed = stuffed::eval::calibrate::PASSKEY_SEED.to_string();
    cli(&[
        "passkey",
        "--model",
        m.to_str().unwrap(),
        "--lengths",
        "1k",
        "--samples",
        "4",
        "--seed",
        &seed,
        "--out",
        pk.to_str().unwrap(),
    ])
    .unwrap();
    let tok = Model::load(&m).unwrap().tokenizer(None).unwrap();
    let tpl = stuffed::eval::passkey::template(stuffed::eval::passkey::TemplateName::Code);
    let (mut sum, mut n) = (0f64, 0usize);
    for line in std::fs::read_to_string(pk.join("results.jsonl")).unwrap().lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        let k = stuffed::eval::passkey::key_tokens(&tok, &tpl, rec["key"].as_str().unwrap()).unwrap().len();
        sum += rec["key_nll"].as_f64().unwrap(); // summed over the key's tokens
        n += k;
    }
    println!("calibrate's loss without factors {none:.6}, passkey's key NLL {:.6}, best {best:.6}", sum / n as f64);
    assert!((none - sum / n as f64).abs() <= 1e-5 * none, "{none} vs {}", sum / n as f64);
    assert!(best < none, "{none} → {best}");
    let text = persuasion();
    let err = format!("{:#}", cli(&[&base[..], &["--text", text.to_str().unwrap(), "--out", o]].concat()).unwrap_err());
    assert!(err.contains("no --text"), "{err}");
}

/// `--validate`: on the calibration text itself it repeats the search's own losses exactly (no
/// factors, the grid's best uniform factor, the result); on held-out text its losses are those of
/// the factors scored apart.
#[test]
fn validation_scores_none_uniform_and_calibrated_on_held_out_text() {
    let text = persuasion();
    let moby = root().join("host/assets/corpus/melville_mobydick_start.txt");
    let (m, t) = (t64(), text.to_str().unwrap().to_string());
    let run = |validate: &Path| {
        let out = tempfile::tempdir().unwrap();
        let args = ["calibrate", "--model", m.to_str().unwrap(), "--text", &t, "--length", "256", "--windows", "2"];
        let o = out.path().to_str().unwrap().to_string();
        cli(&[&args[..], &["--steps", "3", "--out", &o, "--validate", validate.to_str().unwrap()]].concat()).unwrap();
        read(&out.path().join("calibrate.json"))
    };
    let r = run(&text);
    let v = &r["validation"];
    let grid = r["grid"].as_array().unwrap();
    let best_uniform =
        grid.iter().min_by(|a, b| a["loss"].as_f64().unwrap().total_cmp(&b["loss"].as_f64().unwrap())).unwrap();
    assert_eq!(v["loss_none"], r["loss_none"]);
    assert_eq!(v["uniform"], *best_uniform);
    assert_eq!(v["loss_calibrated"], r["loss_best"]);
    let r = run(&moby);
    let v = &r["validation"];
    let f = |spec: &str| mean_nll_of(&moby, spec, 256, 2);
    let factor = v["uniform"]["factor"].as_f64().unwrap();
    println!(
        "moby: none {}, uniform {factor} {}, calibrated {}",
        v["loss_none"], v["uniform"]["loss"], v["loss_calibrated"]
    );
    assert!((v["loss_none"].as_f64().unwrap() - f("none")).abs() <= 1e-12);
    assert!((v["uniform"]["loss"].as_f64().unwrap() - f(&format!("dt:c={factor}"))).abs() <= 1e-12);
    assert!((v["loss_calibrated"].as_f64().unwrap() - f(r["forget"].as_str().unwrap())).abs() <= 1e-12);
    assert_ne!(v["loss_none"], r["loss_none"], "held-out text is another text");
}
