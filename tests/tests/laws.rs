//! `stuffed laws` over real `ppl` and `passkey` outputs of the shipped models: the T_forget bracket of
//! the shipped pair, the passkey model's T_recall as its summary says, a line fitted through state
//! sizes, and one error line for each output it cannot use.
use serde_json::Value;
use std::path::{Path, PathBuf};
use stuffed_tests::cli;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Writes `v` as stuffed would: sealed again (format version and checksum) when it was sealed.
fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let Some(kind) = v["stuffed_format"]["kind"].as_str() else { return write_raw(dir, name, v) };
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, stuffed::report::reseal(kind, v.clone(), true).unwrap()).unwrap();
    p
}

/// Writes `v` as it is (an edit stuffed did not make, or a file from before seals).
fn write_raw(dir: &Path, name: &str, v: &Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn laws_bracket_fit_and_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let (ppl, pk, out) = (tmp.path().join("ppl"), tmp.path().join("pk"), tmp.path().join("laws"));
    let models = root().join("models");
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let (t64, t2048) = (models.join("mamba2-tiny-l4-t64-a3-4m"), models.join("mamba2-tiny-l4-t2048-a3-4m"));
    let args = ["ppl", "--model", s(&t64), "--model", s(&t2048), "--text", s(&text), "--max-tokens", "6k"];
    cli(&[&args[..], &["--out", s(&ppl)]].concat()).unwrap();
    let pk_model = models.join("mamba2-tiny-passkey");
    let args = ["passkey", "--model", s(&pk_model), "--lengths", "128,256,2k", "--samples", "4", "--max-new", "8"];
    cli(&[&args[..], &["--out", s(&pk)]].concat()).unwrap();

    // The shipped pair brackets T_forget at N_S 70,144; the passkey model's T_recall is its summary's.
    cli(&["laws", s(&ppl), s(&pk), "--out", s(&out)]).unwrap();
    let laws = read(&out.join("laws.json"));
    let fam = &laws["families"][0];
    assert_eq!((fam["family"].as_str(), laws["families"].as_array().unwrap().len()), (Some("mamba2"), 1));
    let pts = fam["points"].as_array().unwrap();
    let at = |n: u64| pts.iter().find(|p| p["n_s"] == n).unwrap_or_else(|| panic!("no point at {n}: {fam}"));
    let pair = at(70_144);
    assert_eq!((pair["forget_lo"].as_u64(), pair["forget_hi"].as_u64()), (Some(64), Some(2048)), "{pair}");
    assert_eq!(pair["t_forget_k"].as_f64(), Some(2.0));
    // `--verdict q90` fits the robust variant's verdicts (results.json's t_forget.robust); the
    // paper's is the default; another name is refused.
    let q90 = tmp.path().join("laws_q90");
    cli(&["laws", s(&ppl), "--out", s(&q90), "--verdict", "q90"]).unwrap();
    let (lq, res) = (read(&q90.join("laws.json")), read(&ppl.join("results.json")));
    assert_eq!((laws["verdict"].as_str(), lq["verdict"].as_str()), (Some("paper"), Some("q90")));
    let pq = &lq["families"][0]["points"][0];
    for obs in pq["verdicts"].as_array().unwrap() {
        let run = res["runs"].as_array().unwrap().iter().find(|r| r["model"]["path"] == obs["model"]).unwrap();
        assert_eq!(obs["verdict"], run["t_forget"]["robust"]["verdict"], "{obs}");
        assert_eq!(run["t_forget"]["robust"]["name"], "q90");
    }
    assert_eq!(pq["verdicts"].as_array().unwrap().len(), 2, "{pq}");
    let e = format!("{:#}", cli(&["laws", s(&ppl), "--out", s(&q90), "--verdict", "q80"]).unwrap_err());
    assert!(e.contains("--verdict q80: paper or q90"), "{e}");
    let summary = read(&pk.join("summary.json"));
    let want = summary["t_recall"].as_u64().filter(|&t| t < 2048).map(|t| t as f64 / 1024.0);
    assert!(want.is_some(), "the passkey model recalls at 128 and fails at 2k: {}", summary["accuracy_per_length"]);
    assert_eq!(at(35_072)["t_recall_k"].as_f64(), want, "{}", at(35_072));
    assert!(fam["t_forget_fit"].is_null() && fam["t_recall_fit"].is_null(), "one point per law: no fit");
    for f in ["laws.csv", "t_forget.svg", "t_recall.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // Two more state sizes (the same run's facts, relabelled) on one line: T_forget = 2K, 4K, 6K at
    // N_S = n, 2n, 3n fits T = (2/n)·N_S exactly.
    let res = read(&ppl.join("results.json"));
    let relabel = |k: u64, lens: [u64; 2]| {
        let mut r = res.clone();
        for (run, len) in r["runs"].as_array_mut().unwrap().iter_mut().zip(lens) {
            run["model"]["paper_state_size"] = (70_144 * k).into();
            run["t_forget"]["train_len"] = len.into();
        }
        write(&tmp.path().join(format!("x{k}")), "results.json", &r)
    };
    let (x2, x3) = (relabel(2, [2048, 4096]), relabel(3, [4096, 6144]));
    cli(&["laws", s(&ppl), s(&x2), s(&x3), "--out", s(&out)]).unwrap();
    let fit = read(&out.join("laws.json"))["families"][0]["t_forget_fit"].clone();
    let (a, b) = (fit["coef"][0].as_f64().unwrap(), fit["coef"][1].as_f64().unwrap());
    assert!((a - 2.0 / 0.070144).abs() < 1e-6 && b.abs() < 1e-9 && fit["points"] == 3, "{fit}");
    assert!((fit["r2"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{fit}");

    // Each output it cannot use is one error naming the file.
    let err = |paths: &[&Path]| {
        let mut a = vec!["laws"];
        a.extend(paths.iter().map(|p| s(p)));
        a.extend(["--out", s(&out)]);
        format!("{:#}", cli(&a).unwrap_err())
    };
    let mut shard = res.clone();
    shard["options"]["shard"] = serde_json::json!([1, 2]);
    let shard = write(&tmp.path().join("shard"), "results.json", &shard);
    assert!(err(&[&shard]).contains("one shard of a sharded run; `stuffed merge`"), "{}", err(&[&shard]));
    let mut partial = summary.clone();
    partial["samples"] = 11.into();
    let partial = write(&tmp.path().join("partial"), "summary.json", &partial);
    let e = err(&[&partial]);
    assert!(e.contains("partial/summary.json: holds 11 of the grid's 12 samples"), "{e}");
    let other = write(tmp.path(), "other.json", &serde_json::json!({"command": "bench"}));
    assert!(err(&[&other]).contains("other.json: neither a ppl results.json nor a passkey summary.json"));
    assert!(err(&[&tmp.path().join("nowhere")]).contains("nowhere: no such file or directory"));
    assert!(err(&[tmp.path()]).contains(": no results.json (ppl) or summary.json (passkey) in this directory"));
    assert!(err(&[&text]).contains("austen_persuasion.txt: not JSON"), "{}", err(&[&text]));
    let taken = ppl.join("results.json");
    let e = format!("{:#}", cli(&["laws", s(&ppl), "--out", s(&taken)]).unwrap_err());
    assert!(e.contains("results.json: cannot create"), "{e}");
    // A forgetting method measures the method, not the model: left out, so nothing is left here.
    let mut forget = summary.clone();
    forget["forget"] = "rri:a=0.9,b=0.5".into();
    let forget = write(&tmp.path().join("forget"), "summary.json", &forget);
    assert!(err(&[&forget]).contains("no T_forget verdict and no passkey grid"), "{}", err(&[&forget]));

    // Files read back are checked: an edit stuffed did not make is refused by its checksum; a
    // verdict standing on a null (non-finite) L_in or L_out, or a null verdict, is refused even
    // when sealed again; a results.json from before seals is read with a warning, an old summary not.
    let mut edited = res.clone();
    edited["runs"][0]["t_forget"]["train_len"] = 4096.into();
    let e = err(&[&write_raw(&tmp.path().join("edited"), "results.json", &edited)]);
    assert!(e.contains("edited/results.json: checksum mismatch"), "{e}");
    for (field, want) in
        [("l_in", "stands on a null or non-finite L_in or L_out"), ("verdict", "has a training length but no verdict")]
    {
        let mut null = res.clone();
        null["runs"][0]["t_forget"][field] = Value::Null;
        let e = err(&[&write(&tmp.path().join(format!("null-{field}")), "results.json", &null)]);
        assert!(e.contains(want), "{field}: {e}");
    }
    let mut wrong = res.clone();
    wrong["runs"][0]["t_forget"]["verdict"] = "forgets".into(); // the short model does not forget
    let e = err(&[&write(&tmp.path().join("wrong"), "results.json", &wrong)]);
    assert!(e.contains("contradicts its L_in"), "{e}");
    let unseal = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().retain(|k, _| k != "stuffed_format" && k != "checksum");
        v
    };
    cli(&["laws", s(&write_raw(&tmp.path().join("old"), "results.json", &unseal(&res))), "--out", s(&out)]).unwrap();
    let e = err(&[&write_raw(&tmp.path().join("old-pk"), "summary.json", &unseal(&summary))]);
    assert!(e.contains("old-pk/summary.json: written by an older stuffed"), "{e}");
}

/// `laws` keeps each family apart: the same `ppl` run over tiny synth models of three families
/// (and the shipped Mamba-2 pair) gives one family entry each, with the point at the state size
/// `info` reports and the bracket its verdict implies; no line is fitted across families, and the
/// paper's Mamba-2 law stands beside Mamba-2's point only.
#[test]
fn laws_fit_each_family_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let mut args: Vec<String> =
        ["ppl", "--text", s(&text), "--max-tokens", "600", "--train-len", "64"].map(String::from).to_vec();
    let mut want = Vec::new();
    for family in ["mamba1", "rwkv7", "rwkv6"] {
        let m = tmp.path().join(family);
        cli(&["synth", "--family", family, "--preset", "tiny", "--dtype", "bf16", "--out", s(&m)]).unwrap();
        let n_s = stuffed::model::Model::load(&m).unwrap().info.paper_state_size as u64;
        want.push((family, n_s));
        args.extend(["--model".into(), s(&m).into()]);
    }
    let t64 = root().join("models/mamba2-tiny-l4-t64-a3-4m");
    args.extend(["--model".into(), s(&t64).into()]);
    want.push(("mamba2", 70_144));
    let (ppl, out) = (tmp.path().join("ppl"), tmp.path().join("laws"));
    args.extend(["--out".into(), s(&ppl).into()]);
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    cli(&["laws", s(&ppl), "--out", s(&out)]).unwrap();
    let laws = read(&out.join("laws.json"));
    let fams = laws["families"].as_array().unwrap();
    assert_eq!(fams.len(), want.len(), "one entry per family: {laws}");
    let runs = read(&ppl.join("results.json"))["runs"].as_array().unwrap().clone();
    for (family, n_s) in want {
        let f = fams.iter().find(|f| f["family"] == family).unwrap_or_else(|| panic!("no {family} in {laws}"));
        let pts = f["points"].as_array().unwrap();
        assert_eq!(pts.len(), 1, "{f}");
        assert_eq!(pts[0]["n_s"].as_u64(), Some(n_s), "{family}: the point sits at info's N_S: {f}");
        let run = runs.iter().find(|r| r["model"]["family"] == family).unwrap();
        let forgets = run["t_forget"]["verdict"] == "forgets";
        let bracket = (pts[0]["forget_lo"].as_u64(), pts[0]["forget_hi"].as_u64());
        assert_eq!(bracket, if forgets { (None, Some(64)) } else { (Some(64), None) }, "{family}: {f} vs {run}");
        assert!(f["t_forget_fit"].is_null(), "one point: no fit: {f}");
        // The paper fitted Mamba-2 only: its numbers stand beside Mamba-2's points alone.
        assert_eq!(pts[0]["paper"].is_null(), family != "mamba2", "{family}: {f}");
    }
}
