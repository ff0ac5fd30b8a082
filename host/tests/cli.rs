//! The binary as a user runs it: exit codes, one-line errors, outputs on disk.
use std::path::PathBuf;
use std::process::Command;

fn data(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(p)
}

fn stuffed(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stuffed")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_inputs_exit_nonzero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 999").unwrap();
    let model = data("mamba2_hf_g1_untied");
    let out = dir.path().join("o.safetensors");
    let cases: Vec<Vec<String>> = vec![
        vec!["info".into(), "--model".into(), "/nonexistent".into()],
        vec![
            "logits".into(),
            "--model".into(),
            model.display().to_string(),
            "--ids".into(),
            ids.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ],
        vec!["tokenize".into(), "--file".into(), "/nonexistent.txt".into()],
        vec!["synth".into(), "--preset".into(), "9b".into(), "--out".into(), dir.path().display().to_string()],
        // 100,000 threads used to be spawned (minutes) before the command ran.
        vec!["--threads".into(), "100000".into(), "info".into(), "--model".into(), model.display().to_string()],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = stuffed(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("stuffed: error: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn logits_tokenize_info_synth_run() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = stuffed(&["tokenize", "--text", "The pass key is 71432."]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "510 1509 2234 310 818 1047 1237 15");
    let (code, out, err) = stuffed(&["info", "--model", data("mamba2_official").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("N_S = 5056"), "{out}");
    assert!(out.contains("laws         SPEC.md §3's Mamba-2 fits hold for N_S ≥ 0.86M, not 0.01M"), "{out}");
    let (code, out, err) = stuffed(&["info", "--json", "--model", data("mamba2_official").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["paper_state_size"].as_u64(), v["laws"]["in_range"].as_bool()), (Some(5056), Some(false)), "{out}");
    let syn = dir.path().join("tiny");
    let (code, _, err) =
        stuffed(&["synth", "--preset", "tiny", "--dtype", "bf16", "--seed", "3", "--out", syn.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, (0..70).map(|i| (i * 37 % 50277).to_string()).collect::<Vec<_>>().join(",")).unwrap();
    let out1 = dir.path().join("a.safetensors");
    let out2 = dir.path().join("b.safetensors");
    for (chunk, out) in [("256", &out1), ("1", &out2)] {
        let (code, _, err) = stuffed(&[
            "logits",
            "--model",
            syn.to_str().unwrap(),
            "--ids",
            ids.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--chunk",
            chunk,
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let read = |p: &PathBuf| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("logits").unwrap();
        assert_eq!(t.shape(), [70, 50288]);
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<f32>>()
    };
    let (a, b) = (read(&out1), read(&out2));
    let max = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(max > 0.0 && err / max < 1e-4, "chunked vs step rel {}", err / max);
    let (code, out, err) =
        stuffed(&["generate", "--model", syn.to_str().unwrap(), "--prompt", "Hello", "--max-new", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
}

/// The presets carry the published shapes: parameter counts by formula (FORMATS.md §6).
#[test]
fn synth_presets_have_published_sizes() {
    let want = [
        ("130m", 128_989_632usize),
        ("370m", 368_346_624),
        ("780m", 780_161_280),
        ("1.3b", 1_343_757_312),
        ("2.7b", 2_702_599_680),
    ];
    for (name, params) in want {
        let &(_, d, l, n, p) = stuffed::synth::MAMBA2_PRESETS.iter().find(|x| x.0 == name).unwrap();
        let (di, k) = (2 * d, 4);
        let (h, cd) = (di / p, di + 2 * n);
        let layer = d + (2 * di + 2 * n + h) * d + cd * k + cd + 3 * h + di + d * di;
        assert_eq!(50288 * d + l * layer + d, params, "{name}");
    }
}

/// Peak memory does not grow with the stream's length: 20k and 200k tokens in child processes.
#[test]
fn ppl_peak_memory_is_constant() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("short.txt");
    std::fs::write(
        &text,
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n".repeat(40),
    )
    .unwrap();
    let model = data("mamba2_neox_tiny");
    let mut peaks = Vec::new();
    for n in ["20000", "200000"] {
        let out = dir.path().join(n);
        let (code, _, err) = stuffed(&[
            "ppl",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--repeat-to",
            n,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let res: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        assert_eq!(res["runs"][0]["tokens_fed"].as_u64().unwrap(), n.parse::<u64>().unwrap());
        peaks.push(res["peak_rss_bytes"].as_u64().unwrap());
    }
    println!("peak RSS: 20k tokens {} KiB, 200k tokens {} KiB", peaks[0] / 1024, peaks[1] / 1024);
    assert!(peaks[0] > 0);
    assert!(peaks[1] <= peaks[0] + (4 << 20), "peak memory grew from {} to {} bytes", peaks[0], peaks[1]);
    // A 2 MB text without a line break is cut before spaces, not tokenized whole (≈ 250 MB).
    let flat = dir.path().join("flat.txt");
    let line = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    std::fs::write(&flat, line.repeat(22_000)).unwrap();
    let out = dir.path().join("flat");
    let (m, f, o) = (model.to_str().unwrap(), flat.to_str().unwrap(), out.to_str().unwrap());
    let (code, _, err) = stuffed(&["ppl", "--model", m, "--text", f, "--max-tokens", "2k", "--out", o]);
    assert_eq!(code, 0, "{err}");
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let peak = res["peak_rss_bytes"].as_u64().unwrap();
    println!("peak RSS: 2 MB without a line break {} KiB", peak / 1024);
    assert!(peak <= peaks[0] + (16 << 20), "a text without line breaks took {peak} bytes");
}

/// A passkey grid's peak memory grows only by the prompt's ids and text (tens of bytes a token), not
/// by the tokenizer's working memory for a whole prompt (hundreds): 16k and 256k in child processes.
#[test]
fn passkey_peak_memory_grows_only_by_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("mamba2_neox_tiny");
    let mut peaks = Vec::new();
    for n in ["16k", "256k"] {
        let out = dir.path().join(n);
        let m = model.to_str().unwrap();
        let (code, _, err) =
            stuffed(&["passkey", "--model", m, "--lengths", n, "--samples", "2", "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        peaks.push(s["runs"][0]["peak_rss_bytes"].as_u64().unwrap());
    }
    let per_token = (peaks[1] as f64 - peaks[0] as f64) / (240 * 1024) as f64;
    println!("peak RSS: 16k {} KiB, 256k {} KiB: {per_token:.1} B per token", peaks[0] / 1024, peaks[1] / 1024);
    assert!(peaks[0] > 0);
    assert!(per_token <= 32.0, "peak memory grew {per_token:.1} bytes per prompt token");
}

/// Runs `stuffed args` to the end: its exit code, stderr and peak resident memory (bytes, from the
/// kernel's accounting of the reaped child, `wait4`).
#[allow(clippy::zombie_processes)] // reaped by wait4, which std cannot see
fn stuffed_peak(args: &[&str], stderr: &std::path::Path) -> (i32, String, u64) {
    let err = std::fs::File::create(stderr).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_stuffed"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child, which std has not reaped; both out-pointers are valid.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    (code, std::fs::read_to_string(stderr).unwrap(), usage.ru_maxrss as u64 * 1024)
}

/// A probe's peak memory does not grow with the stream (CSV rows go to disk as they come, plots are
/// drawn from thinned series): 20k and 200k tokens in child processes.
#[test]
fn probe_peak_memory_is_constant() {
    let dir = tempfile::tempdir().unwrap();
    let line = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";
    let m = data("mamba2_neox_tiny");
    let mut peaks = Vec::new();
    // Each text just longer than its run (≈ 22 tokens a line), so reading a whole text would show.
    for (n, lines) in [("20k", 1_200), ("200k", 12_000)] {
        let text = dir.path().join(format!("{n}.txt"));
        std::fs::write(&text, line.repeat(lines)).unwrap();
        let (out, t) = (dir.path().join(n), text.to_str().unwrap().to_string());
        let args = ["probe", "--model", m.to_str().unwrap(), "--text", &t, "--max-tokens", n, "--out"];
        let (code, err, peak) = stuffed_peak(&[&args[..], &[out.to_str().unwrap()]].concat(), &dir.path().join("err"));
        assert_eq!(code, 0, "{err}");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("probe.json")).unwrap()).unwrap();
        assert_eq!(meta["tokens"].as_u64(), Some(n.trim_end_matches('k').parse::<u64>().unwrap() * 1024));
        peaks.push(peak);
    }
    println!("peak RSS: 20k tokens {} KiB, 200k tokens {} KiB", peaks[0] / 1024, peaks[1] / 1024);
    assert!(peaks[0] > 0);
    assert!(peaks[1] <= peaks[0] + (4 << 20), "peak memory grew from {} to {} bytes", peaks[0], peaks[1]);
}

/// Runs `args(out)` to the end with `--out dir/full` (once); runs it again with `--out dir/part`, stops it
/// and resumes it with `--resume`. `sigterm`: SIGTERM 100 ms in, timed checkpoints off (the run must
/// write one at its next boundary and exit 1 saying so); else SIGKILL (no chance to clean up) 50 ms
/// after its first timed checkpoint `ckpt` appears.
fn kill_and_resume(
    dir: &std::path::Path,
    args: impl Fn(&std::path::Path) -> Vec<String>,
    ckpt: &str,
    sigterm: bool,
) -> String {
    let secs = if sigterm { "0" } else { "0.02" };
    let run = |out: &str| {
        let o = dir.join(out);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stuffed"));
        cmd.args(args(&o)).args(["--checkpoint-secs", secs, "--out"]).arg(&o);
        cmd
    };
    if !dir.join("full").exists() {
        let full = run("full").output().unwrap();
        assert!(full.status.success(), "{}", String::from_utf8_lossy(&full.stderr));
    }
    let ckpt = dir.join("part").join(ckpt);
    let mut child = run("part").stderr(std::process::Stdio::piped()).spawn().unwrap();
    if sigterm {
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "the run ended before the signal");
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("SIGTERM after") && err.contains("--resume"), "{err}");
    } else {
        while !ckpt.exists() {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before its first timed checkpoint");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Later, mid-way between checkpoints: what was written after the last one must be cut off.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(ckpt.exists(), "a checkpoint to resume from");
    let resumed = run("part").arg("--resume").output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(!ckpt.exists(), "the checkpoint is removed when the run is done");
    String::from_utf8_lossy(&resumed.stderr).into_owned()
}

/// A ppl run killed after a timed checkpoint — which every run writes by default — or stopped by
/// SIGTERM resumes to the uninterrupted run's numbers and NLL stream, bit for bit.
#[test]
fn killed_ppl_resumes_from_its_timed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The grass is green. The sky is blue. The sun is yellow. Here we go again.\n".repeat(40))
        .unwrap();
    let (m, t) = (data("mamba2_neox_tiny"), text.display().to_string());
    let args = |out: &std::path::Path| {
        let nll = out.join("nll.f32").display().to_string();
        let m = m.display().to_string();
        ["ppl", "--model", &m, "--text", &t, "--repeat-to", "20000", "--chunk", "256", "--nll-out", &nll]
            .map(String::from)
            .to_vec()
    };
    for sigterm in [false, true] {
        kill_and_resume(dir.path(), args, "ppl.checkpoint.safetensors", sigterm);
        let at = |d: &str, f: &str| dir.path().join(d).join(f);
        let res = |d: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(at(d, "results.json")).unwrap()).unwrap()
        };
        let (a, b) = (res("full"), res("part"));
        for key in ["buckets_linear", "mean_nll", "tokens_scored", "tokens_fed"] {
            assert_eq!(a["runs"][0][key], b["runs"][0][key], "{key}");
        }
        assert_eq!(std::fs::read(at("full", "nll.f32")).unwrap(), std::fs::read(at("part", "nll.f32")).unwrap());
        std::fs::remove_dir_all(dir.path().join("part")).unwrap();
    }
}

/// A probe killed after a timed checkpoint, or stopped by SIGTERM, resumes to the uninterrupted probe's
/// files, byte for byte:
/// every CSV, the whole-state snapshots (one before the kill, one after) and probe.json.
#[test]
fn killed_probe_resumes_from_its_timed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let text = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/austen_persuasion.txt");
    let (m, t) = (data("mamba2_neox_tiny").display().to_string(), text.display().to_string());
    let args = |_: &std::path::Path| {
        ["probe", "--model", &m, "--text", &t, "--every", "16", "--snapshot-at", "100,100000"]
            .map(String::from)
            .to_vec()
    };
    for sigterm in [false, true] {
        kill_and_resume(dir.path(), args, "probe.checkpoint.safetensors", sigterm);
        for f in
            ["retention.csv", "state_stats.csv", "conv_stats.csv", "inputs.csv", "snapshots.safetensors", "probe.json"]
        {
            let read = |d: &str| std::fs::read(dir.path().join(d).join(f)).unwrap();
            assert!(read("full") == read("part"), "{f} differs after a resume");
        }
        std::fs::remove_dir_all(dir.path().join("part")).unwrap();
    }
}

/// A passkey grid killed mid-haystack, or stopped by SIGTERM (in the haystack or in a sample's own
/// tail), resumes from its stream checkpoint to the uninterrupted grid's answers, byte for byte,
/// without streaming either again.
#[test]
fn killed_passkey_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped model that never learned to forget: its state after the haystack still carries
    // the stream's start, so a wrong restored state would change the key NLLs.
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-l4-t64-a3-4m");
    let m = m.display().to_string();
    let args = |_: &std::path::Path| {
        ["passkey", "--model", &m, "--lengths", "16k,32k", "--samples", "3"].map(String::from).to_vec()
    };
    // summary.json without its run facts, and the facts.
    let summary = |d: &str| -> (serde_json::Value, serde_json::Value) {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(d).join("summary.json")).unwrap()).unwrap();
        let runs = v.as_object_mut().unwrap().remove("runs").unwrap();
        v.as_object_mut().unwrap().remove("checksum"); // it covers the run facts too
        (v, runs)
    };
    for sigterm in [false, true] {
        let err = kill_and_resume(dir.path(), args, "passkey.checkpoint.safetensors", sigterm);
        assert!(err.contains("the haystack resumes at token"), "{err}");
        let read = |d: &str| std::fs::read_to_string(dir.path().join(d).join("results.jsonl")).unwrap();
        assert_eq!(read("full"), read("part"), "results.jsonl differs after a resume");
        let ((full, full_runs), (part, part_runs)) = (summary("full"), summary("part"));
        assert_eq!(full, part);
        // The resumed run streamed less than the whole grid: it continued the checkpointed haystack.
        let processed = |r: &serde_json::Value| r[0]["tokens_processed"].as_u64().unwrap();
        assert!(processed(&part_runs) < processed(&full_runs), "{part_runs} vs {full_runs}");
        std::fs::remove_dir_all(dir.path().join("part")).unwrap();
    }
    // A needle at the start: the sample's own tail is the whole prompt (four pieces of 8,192
    // tokens). SIGTERM in it checkpoints the haystack and the sample where they stand; the resume
    // continues the sample from there, to the uninterrupted run's line.
    let run = |out: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stuffed"));
        cmd.args(["passkey", "--model", &m, "--lengths", "32k", "--depths", "0", "--checkpoint-secs", "0.001"]);
        cmd.arg("--out").arg(dir.path().join(out));
        cmd
    };
    assert!(run("tail-full").status().unwrap().success());
    let mut child = run("tail").stderr(std::process::Stdio::piped()).spawn().unwrap();
    // The first checkpoint is the haystack's, at the branch point, just before the tail starts.
    let ckpt = dir.path().join("tail/passkey.checkpoint.safetensors");
    while !ckpt.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("SIGTERM after prompt token") && err.contains("of sample 0"), "{err}");
    let read = |d: &str| std::fs::read_to_string(dir.path().join(d).join("results.jsonl")).unwrap();
    assert_eq!(read("tail"), "", "the interrupted sample was finished, not checkpointed");
    let resumed = run("tail").arg("--resume").output().unwrap();
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains("sample 0 resumes at prompt token"), "{err}");
    assert_eq!(read("tail-full"), read("tail"), "results.jsonl differs after a resume");
    let (_, full_runs) = summary("tail-full");
    let (_, part_runs) = summary("tail");
    let processed = |r: &serde_json::Value| r[0]["tokens_processed"].as_u64().unwrap();
    assert!(processed(&part_runs) + 8192 <= processed(&full_runs), "{part_runs} vs {full_runs}");
}

/// `stuffed ppl` with no --model and no --text runs the embedded pair, from any working directory.
#[test]
fn ppl_default_runs_the_shipped_pair() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stuffed"))
        .args(["ppl", "--max-tokens", "3000", "--out", "o"])
        .current_dir(dir.path())
        .env("STUFFED_CACHE", dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("o/results.json")).unwrap()).unwrap();
    let runs = res["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0]["train_len"].as_u64(), runs[1]["train_len"].as_u64()), (Some(64), Some(2048)));
    assert!(runs.iter().all(|r| r["t_forget"]["verdict"].is_string()));
    assert!(dir.path().join("o/loss.svg").exists());
}

/// `stuffed bench` on the CPU, every family: the synth preset is made once in the cache, the report
/// names its parts.
#[test]
fn bench_runs_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["mamba2", "rwkv6", "rwkv5", "hgrn2"] {
        let out = Command::new(env!("CARGO_BIN_EXE_stuffed"))
            .args([
                "bench", "--family", family, "--preset", "tiny", "--dtype", "f32", "--tokens", "2k", "--decode", "4",
            ])
            .env("STUFFED_CACHE", dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{family}: {}", String::from_utf8_lossy(&out.stderr));
        let model = format!("({family}, 2 layers, d 64, f32)");
        for k in [&model, "device       CPU", "tokens       2048 in", "GFLOP/token", "memory", "ms/token"] {
            assert!(text.contains(k), "{k:?} missing from:\n{text}");
        }
        assert!(dir.path().join(format!("synth/{family}-tiny-f32/model.safetensors")).exists());
    }
}

/// A reader that stops early (`stuffed tokenize … | head -c 10`) ends the process as SIGPIPE ends any
/// Unix tool: no panic message, no exit code 101.
#[cfg(unix)]
#[test]
fn closed_stdout_is_no_panic() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/corpus/austen_persuasion.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stuffed"))
        .args(["tokenize", "--file", corpus])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && out.status.code() != Some(101), "{:?}: {err}", out.status);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
}

/// Any text streams in bounded memory: a 50 MB line without a space or line break (`--max-tokens
/// 4k`; peaked at 8 GB in the regex engine) and a 12 MB line of CJK (`--max-tokens 1k`; 1.8 GB)
/// are cut by force every 256 KiB, saying so once, and reading stops once enough is tokenized.
#[test]
fn a_text_without_safe_cuts_streams_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let m = data("mamba2_neox_tiny");
    let flat = dir.path().join("flat.txt");
    std::fs::write(&flat, "abcdefghijklmnopqrstuvwxyz0123456789".repeat(50_000_000 / 36)).unwrap();
    let cjk = dir.path().join("cjk.txt");
    std::fs::write(&cjk, "我们的状态是有限的记忆会遗忘".repeat(12_000_000 / 42)).unwrap();
    for (text, n) in [(&flat, "4k"), (&cjk, "1k")] {
        let out = dir.path().join(n);
        let args = ["ppl", "--model", m.to_str().unwrap(), "--text", text.to_str().unwrap(), "--max-tokens", n];
        let (code, err, peak) =
            stuffed_peak(&[&args[..], &["--out", out.to_str().unwrap()]].concat(), &dir.path().join("err"));
        assert_eq!(code, 0, "{err}");
        println!("peak RSS: {} with --max-tokens {n}: {} KiB", text.display(), peak / 1024);
        assert_eq!(err.matches("cut there by force").count(), 1, "{err}");
        let res: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        assert_eq!(res["runs"][0]["tokens_fed"].as_u64(), Some(n.trim_end_matches('k').parse::<u64>().unwrap() * 1024));
        assert!(peak < 256 << 20, "{}: peak memory {} MiB", text.display(), peak >> 20);
    }
}
