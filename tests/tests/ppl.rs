//! `stuffed ppl`: per-position NLL against HF transformers (tools/golden_ppl.py), streamed
//! tokenization equal to whole-text tokenization, resume equal to an uninterrupted run.
use std::path::{Path, PathBuf};
use stuffed::checkpoint::Checkpoint;
use stuffed::text::{Input, TokenStream};
use stuffed::tokenizer::Tokenizer;
use stuffed_tests::cli;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn persuasion() -> PathBuf {
    root().join("host/assets/corpus/austen_persuasion.txt")
}

fn neox_tiny() -> PathBuf {
    root().join("tests/data/mamba2_neox_tiny")
}

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn results(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

/// A Llama-style tokenizer (HGRN-2's kind: "▁" prepended to every input, no pre-tokenizer;
/// tools/golden_llama_tokenizer.py) streamed in pieces gives the ids the Python package gives the
/// whole text: each piece is tokenized after some of the text before it, so no "▁" lands at a cut.
#[test]
fn streamed_llama_style_tokenization_equals_whole_text() {
    let dir = root().join("tests/data/tokenizer_llama_style");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap();
    let want: Vec<u32> = refs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let chars = refs["chars"].as_u64().unwrap() as usize;
    let text: String = std::fs::read_to_string(persuasion()).unwrap().chars().take(chars).collect();
    assert_eq!(tok.encode(&text).unwrap(), want, "the whole text");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("head.txt");
    std::fs::write(&file, &text).unwrap();
    for block in [4096, 65_536] {
        let got = TokenStream::with_block(&tok, &Input::File(file.clone()), block).unwrap().collect_all().unwrap();
        assert!(got == want, "streamed in blocks of {block}: {} ids, want {}", got.len(), want.len());
        let (got, _) = stuffed::text::encode_long_in(&tok, &text, 0, block).unwrap();
        assert!(got == want, "in-memory pieces of {block}: {} ids, want {}", got.len(), want.len());
    }
}

#[test]
fn streamed_tokenization_equals_whole_text() {
    let tok = Tokenizer::for_model(None, None).unwrap();
    let text = std::fs::read_to_string(persuasion()).unwrap();
    let whole = tok.encode(&text).unwrap();
    assert_eq!(whole.len(), 115_530, "SOURCES.md gives 115,530 NeoX tokens");
    for block in [4096, 65_536, 1 << 20] {
        let mut s = TokenStream::with_block(&tok, &Input::File(persuasion()), block).unwrap();
        let mut pieces = 0;
        let mut all = Vec::new();
        while let Some(p) = s.next_piece().unwrap() {
            pieces += 1;
            all.extend(p);
        }
        assert_eq!(all, whole, "block {block}");
        if block == 4096 {
            assert!(pieces > 50, "small blocks must cut the text many times ({pieces})");
        }
    }
    // Without line breaks, GPT-NeoX's text is cut before single spaces, still to the same ids.
    let flat = text.replace('\n', " ");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("flat.txt");
    std::fs::write(&file, &flat).unwrap();
    let whole = tok.encode(&flat).unwrap();
    let mut s = TokenStream::with_block(&tok, &Input::File(file), 4096).unwrap();
    let (mut pieces, mut all) = (0, Vec::new());
    while let Some(p) = s.next_piece().unwrap() {
        pieces += 1;
        all.extend(p);
    }
    assert!(all == whole && pieces > 50, "{pieces} pieces, {} ids, want {}", all.len(), whole.len());
}

#[test]
fn nll_matches_hf_transformers() {
    let r = Checkpoint::open(&neox_tiny().join("nll_ref.safetensors")).unwrap();
    let ids: Vec<u32> = r.require("input_ids").unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect();
    let want = r.require("nll").unwrap().as_f32().unwrap().to_vec();
    let tok = Tokenizer::for_model(None, None).unwrap();
    let ours = TokenStream::new(&tok, &Input::File(persuasion())).unwrap().collect_all().unwrap();
    assert_eq!(&ours[..ids.len()], &ids[..], "token ids differ from the reference's");
    for chunk in ["512", "100", "1"] {
        let dir = tempfile::tempdir().unwrap();
        let nll = dir.path().join("nll.f32");
        let (m, t, o, n) = (neox_tiny(), persuasion(), dir.path().to_path_buf(), nll.clone());
        let args = ["ppl", "--model", m.to_str().unwrap(), "--text", t.to_str().unwrap(), "--max-tokens", "12000"];
        let mut args = args.to_vec();
        args.extend(["--out", o.to_str().unwrap(), "--nll-out", n.to_str().unwrap(), "--chunk", chunk]);
        cli(&args).unwrap();
        let got = read_f32(&nll);
        assert_eq!(got.len(), want.len());
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        println!("chunk {chunk}: max |Δ NLL| {err:.3e}, mean {:.6} vs {:.6}", mean(&got), mean(&want));
        assert!(err <= 1e-3, "chunk {chunk}: max |Δ NLL| {err}");
        // Padding rows entering the softmax would move the mean by ~2e-4.
        assert!((mean(&got) - mean(&want)).abs() < 1e-5, "mean NLL differs");
        let res = results(dir.path());
        let run = &res["runs"][0];
        assert_eq!(run["tokens_scored"], 11999);
        assert!((run["mean_nll"].as_f64().unwrap() - mean(&want)).abs() < 1e-5);
        let lin = run["buckets_linear"].as_array().unwrap();
        assert_eq!(lin[0]["count"], 511);
        assert_eq!(lin.iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(), 11999);
        let first: f64 = want[..511].iter().map(|&x| x as f64).sum::<f64>() / 511.0;
        assert!((lin[0]["mean_nll"].as_f64().unwrap() - first).abs() < 1e-5);
        let log2 = run["buckets_log2"].as_array().unwrap();
        assert_eq!(
            (log2[0]["start"].as_u64(), log2[0]["end"].as_u64(), log2[0]["count"].as_u64()),
            (Some(1), Some(2), Some(1))
        );
        assert!(dir.path().join("loss.svg").exists() && dir.path().join("loss.csv").exists());
    }
}

/// `ppl` on the first 6,000 tokens of Persuasion with the tiny NeoX model, into `out`.
fn ppl_args(out: &str, extra: &[&str]) -> Vec<String> {
    let (m, t) = (neox_tiny(), persuasion());
    let mut v: Vec<String> =
        ["ppl", "--model", m.to_str().unwrap(), "--text", t.to_str().unwrap()].map(String::from).to_vec();
    v.extend(["--max-tokens", "6000", "--chunk", "256", "--out", out].map(String::from));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn go(v: Vec<String>) -> anyhow::Result<()> {
    cli(&v.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn resume_equals_uninterrupted() {
    let full = tempfile::tempdir().unwrap();
    let part = tempfile::tempdir().unwrap();
    let fs = full.path().to_str().unwrap().to_string();
    let ps = part.path().to_str().unwrap().to_string();
    let fnll = format!("{fs}/nll.f32");
    let pnll = format!("{ps}/nll.f32");
    go(ppl_args(&fs, &["--nll-out", &fnll, "--train-len", "2048"])).unwrap();
    // Stopped part-way, then resumed (twice).
    let ck = ["--nll-out", &pnll, "--train-len", "2048", "--checkpoint-every", "1000"];
    go(ppl_args(&ps, &[&ck[..], &["--stop-after", "1500"]].concat())).unwrap();
    assert!(!part.path().join("results.json").exists());
    assert!(part.path().join("ppl.checkpoint.safetensors").exists());
    go(ppl_args(&ps, &[&ck[..], &["--stop-after", "2000", "--resume"]].concat())).unwrap();
    go(ppl_args(&ps, &[&ck[..], &["--resume"]].concat())).unwrap();
    let (a, b) = (results(full.path()), results(part.path()));
    for key in ["buckets_linear", "buckets_log2", "t_forget", "mean_nll", "tokens_scored", "tokens_fed"] {
        assert_eq!(a["runs"][0][key], b["runs"][0][key], "{key}");
    }
    assert_eq!(std::fs::read(&fnll).unwrap(), std::fs::read(&pnll).unwrap(), "NLL streams differ");
    assert!(!part.path().join("ppl.checkpoint.safetensors").exists(), "checkpoint is removed when done");
    // A requeued job resuming a finished run keeps its results (and says so); a fresh --out has none.
    let done = std::fs::read(part.path().join("results.json")).unwrap();
    go(ppl_args(&ps, &[&ck[..], &["--resume"]].concat())).unwrap();
    assert_eq!(std::fs::read(part.path().join("results.json")).unwrap(), done);
    // A requeued job killed before its first checkpoint passes --resume too: it starts the run.
    let fresh = tempfile::tempdir().unwrap();
    go(ppl_args(
        fresh.path().to_str().unwrap(),
        &["--nll-out", &format!("{}/nll.f32", fresh.path().display()), "--train-len", "2048", "--resume"],
    ))
    .unwrap();
    assert_eq!(results(fresh.path())["runs"][0]["buckets_linear"], a["runs"][0]["buckets_linear"]);
    // A checkpoint is never lost silently: a run without --resume is refused, naming both ways on;
    // --overwrite discards it and starts again.
    go(ppl_args(&ps, &["--checkpoint-every", "1000", "--stop-after", "1000"])).unwrap();
    let err = format!("{:#}", go(ppl_args(&ps, &["--checkpoint-every", "1000"])).unwrap_err());
    assert!(
        err.contains("holds an unfinished ppl run") && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    // A resume against other options is refused, saying what differs.
    let err = format!("{:#}", go(ppl_args(&ps, &["--bucket", "128", "--resume"])).unwrap_err());
    assert!(err.contains("refusing to resume") && err.contains("options.bucket: 512 → 128"), "{err}");
    go(ppl_args(&ps, &["--bucket", "128", "--overwrite"])).unwrap();
    assert!(!part.path().join("ppl.checkpoint.safetensors").exists());
    assert_eq!(results(part.path())["options"]["bucket"], 128);
}

/// A model is known by its content: the same files reached by another path resume; other weights
/// under the same name are refused, saying the model's content differs.
#[test]
fn resume_knows_the_model_by_content() {
    let (tmp, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(neox_tiny().join(f), copy.join(f)).unwrap();
    }
    let o = out.path().to_str().unwrap();
    let args = |m: &Path, extra: &[&str]| {
        let mut v = ppl_args(o, extra);
        v[2] = m.display().to_string();
        v
    };
    go(args(&neox_tiny(), &["--checkpoint-every", "1000", "--stop-after", "1000"])).unwrap();
    go(args(&copy, &["--resume", "--stop-after", "2000", "--checkpoint-every", "1000"])).unwrap();
    // The same name, other weights (one byte of one tensor).
    let f = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let err = format!("{:#}", go(args(&copy, &["--resume"])).unwrap_err());
    assert!(err.contains("refusing to resume") && err.contains("models[0].content"), "{err}");
}

#[test]
fn documents_concat_and_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, "The grass is green. The sky is blue.\nThe sun is yellow.\n").unwrap();
    std::fs::write(&b, "Here we go. There and back again.\n").unwrap();
    let m = neox_tiny();
    let (ms, as_, bs) = (m.to_str().unwrap(), a.to_str().unwrap(), b.to_str().unwrap());
    let out = dir.path().join("o");
    let os = out.to_str().unwrap();
    let nd = dir.path().join("nll");
    let nds = nd.to_str().unwrap();
    cli(&["ppl", "--model", ms, "--text", as_, "--text", bs, "--out", os, "--nll-out", nds]).unwrap();
    let files: Vec<_> = std::fs::read_dir(&nd).unwrap().collect();
    assert_eq!(files.len(), 2, "one NLL file per document");
    let tok = Tokenizer::for_model(None, None).unwrap();
    let (na, nb) = (
        tok.encode(&std::fs::read_to_string(&a).unwrap()).unwrap().len(),
        tok.encode(&std::fs::read_to_string(&b).unwrap()).unwrap().len(),
    );
    assert_eq!(results(&out)["runs"][0]["tokens_scored"], (na - 1 + nb - 1) as u64);
    cli(&["ppl", "--model", ms, "--text", as_, "--text", bs, "--concat", "--repeat-to", "1000", "--out", os]).unwrap();
    assert_eq!(results(&out)["runs"][0]["tokens_scored"], 999);
    // `--text a b` (a shell glob) and `--text DIR` (its .txt files in name order) are the same documents.
    std::fs::write(dir.path().join("notes.md"), "not a text").unwrap();
    let one = |args: &[&str]| {
        cli(&[&["ppl", "--model", ms, "--out", os][..], args].concat()).unwrap();
        let r = results(&out);
        (
            r["inputs"].as_array().unwrap().iter().map(|i| i["name"].clone()).collect::<Vec<_>>(),
            r["runs"][0]["mean_nll"].clone(),
        )
    };
    let repeated = one(&["--text", as_, "--text", bs]);
    assert_eq!(repeated.0, ["a.txt", "b.txt"]);
    assert_eq!(one(&["--text", as_, bs]), repeated);
    assert_eq!(one(&["--text", dir.path().to_str().unwrap()]), repeated);
    let empty = tempfile::tempdir().unwrap();
    let err = format!("{:#}", cli(&["ppl", "--model", ms, "--text", empty.path().to_str().unwrap()]).unwrap_err());
    assert!(err.contains("no .txt files"), "{err}");
}

/// `--forget` repeats: every model runs under each method, in order, each labelled.
#[test]
fn several_forgetting_methods_make_several_runs() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().to_str().unwrap();
    let nll = dir.path().join("nll");
    let methods = ["--forget", "none", "--forget", "rri:a=0.9999,b=0.75", "--forget", "reset:every=256"];
    go(ppl_args(o, &[&methods[..], &["--nll-out", nll.to_str().unwrap()]].concat())).unwrap();
    let runs = results(dir.path())["runs"].as_array().unwrap().clone();
    let names: Vec<&str> = runs.iter().map(|r| r["forget"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "rri:a=0.9999,b=0.75", "reset:every=256"]);
    assert_ne!(runs[0]["mean_nll"], runs[1]["mean_nll"]);
    // Every row and file says which model and which method it is.
    let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
    for m in ["[none]", "[rri:a=0.9999,b=0.75]", "[reset:every=256]"] {
        assert!(svg.contains(&format!("mamba2_neox_tiny {m}")), "legend {m}");
    }
    let csv = std::fs::read_to_string(dir.path().join("loss.csv")).unwrap();
    assert!(csv.starts_with("model,method,scheme,"), "{}", &csv[..80]);
    let rows =
        |m: &str| csv.lines().filter(|l| l.contains("mamba2_neox_tiny,") && l.split(',').nth(1) == Some(m)).count();
    assert!(rows("none") > 0 && rows("rri:a=0.9999;b=0.75") == rows("none") && rows("reset:every=256") == rows("none"));
    let mut files: Vec<String> =
        std::fs::read_dir(&nll).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(
        files,
        [
            "00_mamba2_neox_tiny__none__000_austen_persuasion.txt.f32",
            "01_mamba2_neox_tiny__rri-a0.9999_b0.75__000_austen_persuasion.txt.f32",
            "02_mamba2_neox_tiny__reset-every256__000_austen_persuasion.txt.f32",
        ]
    );
}

/// `ppl --shard k/n` over three documents, merged by `stuffed merge`, is the unsharded run: the same
/// counts, verdict and NLL files, and means equal to f64 rounding (the sums add in another order).
/// A missing or repeated shard, or one made with other options, is refused.
#[test]
fn shards_merge_to_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let book = std::fs::read_to_string(persuasion()).unwrap();
    let texts: Vec<String> = (0..3)
        .map(|i| {
            let p = dir.path().join(format!("doc{i}.txt"));
            std::fs::write(&p, &book[i * 9000..i * 9000 + 6000 + 1500 * i]).unwrap();
            p.display().to_string()
        })
        .collect();
    let m = neox_tiny().display().to_string();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name).display().to_string();
        let nll = dir.path().join(format!("{name}-nll")).display().to_string();
        let mut a =
            vec!["ppl", "--model", &m, "--bucket", "128", "--train-len", "512", "--out", &out, "--nll-out", &nll];
        a.extend(["--text", &texts[0], &texts[1], &texts[2]]);
        a.extend(extra);
        cli(&a).unwrap();
        out
    };
    let full = run("full", &[]);
    let (s1, s2) = (run("s1", &["--shard", "1/2"]), run("s2", &["--shard", "2/2"]));
    let merged = dir.path().join("merged");
    cli(&["merge", "--out", merged.to_str().unwrap(), &s2, &s1]).unwrap();
    let (a, b) = (results(Path::new(&full)), results(&merged));
    let (ra, rb) = (&a["runs"][0], &b["runs"][0]);
    for key in ["tokens_scored", "tokens_fed"] {
        assert_eq!(ra[key], rb[key], "{key}");
    }
    let close = |x: &serde_json::Value, y: &serde_json::Value| {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        (x - y).abs() <= 1e-12 * x.abs()
    };
    let (va, vb) = (&ra["t_forget"], &rb["t_forget"]);
    assert_eq!((&va["verdict"], &va["evaluated_len"]), (&vb["verdict"], &vb["evaluated_len"]));
    assert!(close(&va["l_in"], &vb["l_in"]) && close(&va["l_out"], &vb["l_out"]), "{va} vs {vb}");
    assert!(close(&ra["mean_nll"], &rb["mean_nll"]), "{} vs {}", ra["mean_nll"], rb["mean_nll"]);
    for scheme in ["buckets_linear", "buckets_log2"] {
        let (x, y) = (ra[scheme].as_array().unwrap(), rb[scheme].as_array().unwrap());
        assert_eq!(x.len(), y.len(), "{scheme}");
        for (p, q) in x.iter().zip(y) {
            assert_eq!((&p["start"], &p["count"]), (&q["start"], &q["count"]), "{scheme}");
            assert!(close(&p["mean_nll"], &q["mean_nll"]) && close(&p["stderr"], &q["stderr"]), "{scheme}: {p} vs {q}");
        }
    }
    assert_eq!(b["options"]["shard"], serde_json::Value::Null);
    // The merge keeps each shard's process facts, not only its own.
    let facts = b["shards"].as_array().unwrap();
    assert_eq!(facts.iter().map(|f| f["shard"].as_str().unwrap()).collect::<Vec<_>>(), ["2/2", "1/2"]);
    assert!(facts.iter().all(|f| f["peak_rss_bytes"].as_u64() > Some(0) && f["seconds"].as_f64() > Some(0.0)));
    // Each document's NLL file comes from exactly one shard, under the unsharded run's name.
    let files = |d: &str| {
        let mut v: Vec<_> = std::fs::read_dir(dir.path().join(d)).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v.into_iter().map(|p| (p.file_name().unwrap().to_owned(), std::fs::read(&p).unwrap())).collect::<Vec<_>>()
    };
    let mut shards = [files("s1-nll"), files("s2-nll")].concat();
    shards.sort();
    assert_eq!(files("full-nll"), shards);
    // Refused: a missing shard, a repeated one, another option.
    let o = merged.to_str().unwrap();
    let err = |dirs: &[&str]| format!("{:#}", cli(&[&["merge", "--out", o][..], dirs].concat()).unwrap_err());
    assert!(err(&[&s1]).contains("shard 2/2 is missing"));
    assert!(err(&[&s1, &s1]).contains("given twice"));
    let other = run("other", &["--shard", "2/2", "--forget", "dt:c=0.5"]);
    assert!(err(&[&s1, &other]).contains("other inputs or options"));
    assert!(err(&[&full]).contains("not a --shard run"));

    // A shard's results.json is read back checked. Edited by hand, it fails its checksum; sums no
    // run can produce are refused even when sealed again (as a forger would), and an array one
    // element short is an error, not a panic.
    let s2_json = results(Path::new(&s2));
    let tampered = |name: &str, edit: &dyn Fn(&mut serde_json::Value), reseal: bool| {
        let mut v = s2_json.clone();
        edit(&mut v["runs"][0]["acc"]);
        let text = if reseal {
            stuffed::report::reseal("ppl-results", v, true).unwrap()
        } else {
            serde_json::to_string_pretty(&v).unwrap()
        };
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("results.json"), text).unwrap();
        err(&[&s1, d.to_str().unwrap()])
    };
    let e = tampered("t-edit", &|a| a["sum"] = (a["sum"].as_f64().unwrap() + 1.0).into(), false);
    assert!(e.contains("t-edit/results.json: checksum mismatch"), "{e}");
    let cases: [(&str, &Edit, &str); 5] = [
        ("t-neg", &|a| a["linear"]["sum"][2] = (-5.0).into(), "which no run can produce"),
        ("t-huge", &|a| a["log2"]["count"][3] = (1u64 << 63).into(), "which no run can produce"),
        (
            "t-swap",
            &|a| {
                let s = a["linear"]["sum"].as_array_mut().unwrap();
                s.swap(0, 5);
            },
            "which no run can produce",
        ),
        (
            "t-short",
            &|a| {
                a["linear"]["sum"].as_array_mut().unwrap().pop();
            },
            "sums, ",
        ),
        (
            "t-verdict",
            &|a| a["verdict"] = serde_json::Value::Null,
            "no verdict sums although the run has a training length",
        ),
    ];
    for (name, edit, want) in cases {
        let e = tampered(name, edit, true);
        assert!(e.contains(&format!("{name}/results.json: run 0")) && e.contains(want), "{name}: {e}");
    }
    // Counts each within range whose sum is past 2^64 (the fuzzer's: the merge overflowed).
    let e = tampered("t-fed", &|a| a["tokens_fed"] = u64::MAX.into(), true);
    assert!(e.contains("t-fed/results.json: the shards' fed tokens add up past 2^64 - 1"), "{e}");
    // A share read back that no --shard gives (the fuzzer's: k = 0 underflowed, k > n indexed past
    // the flags, n = 2^40 allocated 1 TB) is refused, sealed or not.
    for (name, share) in [("t-k0", [0u64, 2]), ("t-kn", [99_999_999_999, 2]), ("t-n40", [1, 1 << 40])] {
        let mut v = s2_json.clone();
        v["options"]["shard"] = serde_json::json!(share);
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("results.json"), stuffed::report::reseal("ppl-results", v, true).unwrap()).unwrap();
        let e = err(&[d.to_str().unwrap(), &s1]);
        assert!(e.contains("is not a share") || e.contains("other inputs or options"), "{name}: {e}");
        let e = err(&[d.to_str().unwrap()]);
        assert!(e.contains(&format!("{name}/results.json: shard")) || e.contains("is missing"), "{name}: {e}");
    }
    // The merge records the kernel and mode its shards ran, not its own process's: theirs when they
    // agree, each shard's when their kernels differ; shards of different modes are refused.
    assert_eq!(b["matmul"], s2_json["matmul"]);
    assert_eq!(b["matmul"]["mode"], "exact");
    let matmul_of = |name: &str, simd: &str, mode: &str| {
        let mut v = s2_json.clone();
        v["matmul"] = serde_json::json!({"simd": simd, "mode": mode});
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("results.json"), stuffed::report::reseal("ppl-results", v, true).unwrap()).unwrap();
        d.display().to_string()
    };
    let other_kernel = matmul_of("t-kernel", "avx512", "exact");
    let m2 = dir.path().join("merged-kernels");
    cli(&["merge", "--out", m2.to_str().unwrap(), &s1, &other_kernel]).unwrap();
    let mk = results(&m2)["matmul"].clone();
    assert_eq!(mk["mode"], "exact", "{mk}");
    assert_eq!(mk["per_shard"], serde_json::json!([s2_json["matmul"], {"simd": "avx512", "mode": "exact"}]), "{mk}");
    assert_eq!(results(&m2)["shards"][1]["matmul"], mk["per_shard"][1], "each shard's facts carry its kernel");
    let fast = matmul_of("t-fast", "avx512bf16", "fast");
    let e = err(&[&s1, &fast]);
    assert!(
        e.contains("t-fast/results.json: its products ran in fast mode") && e.contains("share a matmul mode"),
        "{e}"
    );
    // A training length of 0 read back (the fuzzer's: its plot's log axis panicked on log2(0)) is
    // refused, sealed or not.
    let mut v = s2_json.clone();
    v["runs"][0]["train_len"] = 0.into();
    let d = dir.path().join("t-len0");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("results.json"), stuffed::report::reseal("ppl-results", v, true).unwrap()).unwrap();
    let e = err(&[&s1, d.to_str().unwrap()]);
    assert!(e.contains("t-len0/results.json: run 0: training length 0"), "{e}");
    // A results.json from before format versions is refused with a line saying so.
    let mut old = s2_json.clone();
    old.as_object_mut().unwrap().retain(|k, _| k != "stuffed_format" && k != "checksum");
    let d = dir.path().join("t-old");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("results.json"), old.to_string()).unwrap();
    let e = err(&[&s1, d.to_str().unwrap()]);
    assert!(e.contains("written by an older stuffed; rerun"), "{e}");
}

/// A checkpoint is read back checked: edited accumulators fail its checksum, a checkpoint from
/// before format versions is refused with a line saying so, and accumulators no run can produce
/// are refused even when the checksum is made to match.
#[test]
fn damaged_checkpoints_are_refused() {
    let part = tempfile::tempdir().unwrap();
    let ps = part.path().to_str().unwrap().to_string();
    let ck = ["--train-len", "2048", "--checkpoint-every", "1000"];
    go(ppl_args(&ps, &[&ck[..], &["--stop-after", "1500"]].concat())).unwrap();
    let path = part.path().join("ppl.checkpoint.safetensors");
    let good = std::fs::read(&path).unwrap();
    let resume = || format!("{:#}", go(ppl_args(&ps, &[&ck[..], &["--resume"]].concat())).unwrap_err());
    // Rewrite the checkpoint's snapshot through `edit`, keeping or dropping the seal.
    let rewrite = |edit: &dyn Fn(&mut serde_json::Value),
                   meta: &dyn Fn(&mut std::collections::HashMap<String, String>)| {
        let st = safetensors::SafeTensors::deserialize(&good).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&good).unwrap();
        let mut m = m.metadata().clone().unwrap();
        let mut snap: serde_json::Value = serde_json::from_str(&m["snapshot"]).unwrap();
        edit(&mut snap);
        m.insert("snapshot".into(), snap.to_string());
        meta(&mut m);
        let views: Vec<_> = st.tensors();
        std::fs::write(&path, safetensors::serialize(views, Some(m)).unwrap()).unwrap();
    };
    rewrite(&|s| s["acc"]["sum"] = (s["acc"]["sum"].as_f64().unwrap() * 0.5).into(), &|_| {});
    let e = resume();
    assert!(e.contains("ppl.checkpoint.safetensors: checksum mismatch"), "{e}");
    rewrite(&|_| {}, &|m| {
        m.remove("stuffed_format");
    });
    let e = resume();
    assert!(e.contains("written by an older stuffed"), "{e}");
    // Sealed again through the library (what a forger could do): the sums themselves are checked.
    let st = safetensors::SafeTensors::deserialize(&good).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&good).unwrap();
    let mut snap: serde_json::Value = serde_json::from_str(&m.metadata().as_ref().unwrap()["snapshot"]).unwrap();
    snap["acc"]["count"] = (snap["acc"]["count"].as_u64().unwrap() + 7).into();
    let tensors: Vec<(String, Vec<f32>)> = st.tensors().into_iter().map(|(n, t)| (n, bytemuck_f32(t.data()))).collect();
    let values: Vec<(&str, stuffed::report::Values)> =
        tensors.iter().map(|(n, v)| (n.as_str(), stuffed::report::Values::F32(v))).collect();
    stuffed::report::save_checkpoint(&path, &snap.to_string(), &values).unwrap();
    let e = resume();
    assert!(e.contains("the linear buckets add up to"), "{e}");
    // The untouched checkpoint still resumes.
    std::fs::write(&path, &good).unwrap();
    go(ppl_args(&ps, &[&ck[..], &["--resume"]].concat())).unwrap();
}

/// An edit of a results.json's accumulators.
type Edit = dyn Fn(&mut serde_json::Value);

fn bytemuck_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
