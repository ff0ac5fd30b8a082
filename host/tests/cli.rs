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
    // A bad flag value is refused by the parser (exit 2, clap's code for usage errors), on one line
    // naming the flag and the value (clap's own message spans lines and ends with a usage hint).
    let m = model.display().to_string();
    for (args, flag) in [
        (vec!["passkey", "--model", &m, "--lengths", "1k", "--shard", "3/2"], "'3/2' for '--shard"),
        (vec!["ppl", "--model", &m, "--forget", "bogus"], "'bogus' for '--forget"),
        (vec!["passkey", "--model", &m, "--lengths", "1k..x"], "'1k..x' for '--lengths"),
        (vec!["ppl", "--model", &m, "--chunk", "x"], "'x' for '--chunk"),
        // 0 tokens a call: `bench` took it as 1 and `probe` ran on, where the others refused it.
        (vec!["bench", "--model", &m, "--chunk", "0"], "'0' for '--chunk"),
        (vec!["probe", "--model", &m, "--newlines", "--chunk", "0"], "'0' for '--chunk"),
        (vec!["logits", "--model", &m, "--ids", "i", "--out", "o", "--chunk", "0"], "'0' for '--chunk"),
        (vec!["selftest", "--model", &m, "--chunk", "0"], "'0' for '--chunk"),
    ] {
        let (code, _, err) = stuffed(&args);
        assert_eq!((code, err.lines().count()), (2, 1), "{args:?}: {err}");
        assert!(err.starts_with("stuffed: error: invalid value ") && err.contains(flag), "{err}");
    }
    // A missing argument: the one line names it (clap lists them on the lines below its first).
    for (args, missing) in [
        (vec!["passkey"], "not provided: --model <MODEL>"),
        (vec!["logits", "--model", &m], "not provided: --ids <IDS>, --out <OUT>"),
        (vec!["info"], "not provided: --model <MODEL>"),
    ] {
        let (code, _, err) = stuffed(&args);
        assert_eq!((code, err.lines().count()), (2, 1), "{args:?}: {err}");
        assert!(err.starts_with("stuffed: error: the following required arguments were not provided"), "{err}");
        assert!(err.contains(missing), "{args:?}: {err}");
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

/// Peak memory does not grow with the stream's length: 256k and 4M tokens in child processes (the
/// newline token repeated through a 256-row model, so that 4M tokens take seconds), with a 64-token
/// training length, whose verdict buckets of 16 positions (24 bytes each, pooled over documents) are
/// all a run keeps per stretch of positions: 1.5 bytes a token (2.5-3.2 measured with the
/// allocator's slack). results.json used to be built as a JSON tree and a pretty string in memory first: ≈ 15
/// bytes a token past 1M tokens.
#[test]
fn ppl_peak_memory_is_constant() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("mamba2_hf_g1_untied");
    let mut peaks = Vec::new();
    let sizes = [256u64 << 10, 4 << 20];
    for n in sizes {
        let out = dir.path().join(n.to_string());
        let (m, o, n) = (model.to_str().unwrap(), out.to_str().unwrap(), n.to_string());
        let args = ["ppl", "--model", m, "--newlines", "--newline-token", "--repeat-to", &n, "--train-len", "64"];
        let started = std::time::Instant::now();
        let (code, err, peak) = stuffed_peak(&[&args[..], &["--out", o]].concat(), &dir.path().join("err"));
        assert_eq!(code, 0, "{err}");
        let res: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        assert_eq!(res["runs"][0]["tokens_fed"].as_u64().unwrap(), n.parse::<u64>().unwrap());
        assert!(res["runs"][0]["t_forget"]["l_out"].as_f64().is_some(), "no verdict");
        println!("{n} tokens: peak RSS {} KiB, {:.1} s", peak / 1024, started.elapsed().as_secs_f64());
        peaks.push(peak);
    }
    let per_token = (peaks[1] as f64 - peaks[0] as f64) / (sizes[1] - sizes[0]) as f64;
    println!("peak RSS grew {per_token:.2} bytes a token");
    assert!(peaks[0] > 0);
    assert!(per_token <= 5.0, "peak memory grew from {} to {} bytes: {per_token:.2} a token", peaks[0], peaks[1]);
    let model = data("mamba2_neox_tiny");
    // A 2 MB text without a line break is cut before spaces, not tokenized whole (≈ 250 MB): its
    // peak against a text with line breaks, both read by the process itself.
    let line = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
    let mut flat_peaks = Vec::new();
    for (name, text) in [("lines", format!("{line}\n").repeat(2_000)), ("flat", format!("{line} ").repeat(22_000))] {
        let path = dir.path().join(format!("{name}.txt"));
        std::fs::write(&path, text).unwrap();
        let out = dir.path().join(name);
        let (m, f, o) = (model.to_str().unwrap(), path.to_str().unwrap(), out.to_str().unwrap());
        let (code, _, err) = stuffed(&["ppl", "--model", m, "--text", f, "--max-tokens", "2k", "--out", o]);
        assert_eq!(code, 0, "{err}");
        let res: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        flat_peaks.push(res["peak_rss_bytes"].as_u64().unwrap());
    }
    println!(
        "peak RSS: 2k tokens {} KiB, of a 2 MB text without a line break {} KiB",
        flat_peaks[0] / 1024,
        flat_peaks[1] / 1024
    );
    assert!(flat_peaks[1] <= flat_peaks[0] + (16 << 20), "a text without line breaks took {} bytes", flat_peaks[1]);
}

/// A passkey grid's peak memory grows only by the prompt's ids and text (the haystack's and the
/// prompt's ids, 4 bytes a token each, and the prompt's text, ≈ 4), not by the tokenizer's working
/// memory for a whole prompt (hundreds): 64k and 4M-token prompts in child processes (peaks from the
/// kernel, so that writing the outputs counts too).
#[test]
fn passkey_peak_memory_grows_only_by_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("mamba2_neox_tiny");
    let mut peaks = Vec::new();
    for n in ["64k", "4m"] {
        let out = dir.path().join(n);
        let m = model.to_str().unwrap();
        let args = ["passkey", "--model", m, "--lengths", n, "--samples", "1", "--out", out.to_str().unwrap()];
        let started = std::time::Instant::now();
        let (code, err, peak) = stuffed_peak(&args, &dir.path().join("err"));
        assert_eq!(code, 0, "{err}");
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["samples"].as_u64(), Some(1));
        println!("{n}: peak RSS {} KiB, {:.1} s", peak / 1024, started.elapsed().as_secs_f64());
        peaks.push(peak);
    }
    let per_token = (peaks[1] as f64 - peaks[0] as f64) / ((4 << 20) - (64 << 10)) as f64;
    println!("peak RSS: 64k {} KiB, 4M {} KiB: {per_token:.1} B per token", peaks[0] / 1024, peaks[1] / 1024);
    assert!(peaks[0] > 0);
    assert!(per_token <= 24.0, "peak memory grew {per_token:.1} bytes per prompt token");
}

/// Runs `stuffed args` to the end: its exit code, stderr and peak resident memory (bytes): VmHWM of
/// its own address space, read when it stops at its exit (traced, `PTRACE_O_TRACEEXIT`). The kernel's
/// `ru_maxrss` of a child would not do: it starts from this test process's RSS, taken over at the
/// fork and exec (≈ 100 MB, which hid a 4M-token run's growth).
#[allow(clippy::zombie_processes)] // reaped by waitpid, which std cannot see
fn stuffed_peak(args: &[&str], stderr: &std::path::Path) -> (i32, String, u64) {
    use std::os::unix::process::CommandExt;
    let err = std::fs::File::create(stderr).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stuffed"));
    // One worker thread: the harness runs these long tests two at a time on CI's two cores, and the
    // property measured is memory, not speed (two 2-thread children on 2 cores spin-wait).
    cmd.args(["--threads", "1"]).args(args).stdout(std::process::Stdio::null()).stderr(err);
    let none = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: ptrace(TRACEME) only, between fork and exec; the child then stops at its exec.
    unsafe {
        cmd.pre_exec(|| match libc::ptrace(libc::PTRACE_TRACEME, 0, std::ptr::null_mut::<libc::c_void>(), 0) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    let pid = cmd.spawn().unwrap().id() as libc::pid_t;
    let (mut status, mut peak) = (0, 0u64);
    // SAFETY: waits for and continues our own traced child; every pointer is valid or null.
    unsafe {
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFSTOPPED(status), "the child did not stop at its exec");
        let opts = libc::PTRACE_O_TRACEEXIT as usize as *mut libc::c_void;
        assert_eq!(libc::ptrace(libc::PTRACE_SETOPTIONS, pid, none, opts), 0);
        assert_eq!(libc::ptrace(libc::PTRACE_CONT, pid, none, none), 0);
        loop {
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                break;
            }
            let sig = libc::WSTOPSIG(status);
            let forward = if sig == libc::SIGTRAP && status >> 16 == libc::PTRACE_EVENT_EXIT {
                let proc = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                let hwm = proc.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
                peak = hwm.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024;
                0
            } else {
                sig // a signal for the child: delivered
            };
            libc::ptrace(libc::PTRACE_CONT, pid, none, forward as usize as *mut libc::c_void);
        }
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    assert!(peak > 0, "no exit stop seen");
    (code, std::fs::read_to_string(stderr).unwrap(), peak)
}

/// A probe's peak memory does not grow with the stream (CSV rows go to disk as they come, plots are
/// drawn from thinned series): 256k and 4M tokens in child processes.
#[test]
fn probe_peak_memory_is_constant() {
    let dir = tempfile::tempdir().unwrap();
    let line = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";
    let m = data("mamba2_neox_tiny");
    let mut peaks = Vec::new();
    // Each text just longer than its run (≈ 22 tokens a line), so reading a whole text would show.
    for (n, lines) in [("256k", 12_000), ("4096k", 191_000)] {
        let text = dir.path().join(format!("{n}.txt"));
        std::fs::write(&text, line.repeat(lines)).unwrap();
        let (out, t) = (dir.path().join(n), text.to_str().unwrap().to_string());
        let args = ["probe", "--model", m.to_str().unwrap(), "--text", &t, "--max-tokens", n, "--out"];
        let started = std::time::Instant::now();
        let (code, err, peak) = stuffed_peak(&[&args[..], &[out.to_str().unwrap()]].concat(), &dir.path().join("err"));
        assert_eq!(code, 0, "{err}");
        println!("{n}: peak RSS {} KiB, {:.1} s", peak / 1024, started.elapsed().as_secs_f64());
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("probe.json")).unwrap()).unwrap();
        assert_eq!(meta["tokens"].as_u64(), Some(n.trim_end_matches('k').parse::<u64>().unwrap() * 1024));
        peaks.push(peak);
    }
    println!("peak RSS: 256k tokens {} KiB, 4M tokens {} KiB", peaks[0] / 1024, peaks[1] / 1024);
    assert!(peaks[0] > 0);
    assert!(peaks[1] <= peaks[0] + (4 << 20), "peak memory grew from {} to {} bytes", peaks[0], peaks[1]);
}

/// Bit of SIGTERM (15) and SIGINT (2) in /proc's signal masks.
const SIGTERM_BIT: u64 = 1 << (15 - 1);
const SIGINT_BIT: u64 = 1 << (2 - 1);

/// A signal mask of process `pid` from /proc (`SigCgt`: caught, `SigIgn`: ignored); 0 once it is gone.
fn signal_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let prefix = format!("{field}:");
    let mask = status.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(str::trim).unwrap_or("0");
    u64::from_str_radix(mask, 16).unwrap_or(0)
}

/// A run started with SIGINT ignored (how a non-interactive shell starts background jobs, so that
/// Ctrl-C stops the script and not them) keeps it ignored; SIGTERM is still caught. Without the
/// inherited SIG_IGN, SIGINT is caught too.
#[test]
fn an_ignored_sigint_stays_ignored() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The grass is green. The sky is blue.\n".repeat(40)).unwrap();
    for ignore in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stuffed"));
        cmd.args(["ppl", "--model"]).arg(data("mamba2_neox_tiny")).arg("--text").arg(&text);
        cmd.args(["--repeat-to", "100000000", "--chunk", "256", "--out"]).arg(dir.path().join("out"));
        // Set either way: the harness itself may run with SIGINT ignored (a background job of a
        // non-interactive shell), which the child would inherit.
        let disposition = if ignore { libc::SIG_IGN } else { libc::SIG_DFL };
        // SAFETY: only async-signal-safe signal(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGINT, disposition);
                Ok(())
            });
        }
        let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
        while signal_mask(child.id(), "SigCgt") & SIGTERM_BIT == 0 {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before it caught SIGTERM");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (caught, ignored) = (signal_mask(child.id(), "SigCgt"), signal_mask(child.id(), "SigIgn"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(ignored & SIGINT_BIT != 0, ignore, "SigIgn {ignored:x}");
        assert_eq!(caught & SIGINT_BIT != 0, !ignore, "SigCgt {caught:x}");
    }
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
    if sigterm {
        // A run of a few seconds can end before the signal reaches it when this harness is starved
        // of the CPU (seen once in a clean-clone CI: exit 0, the grid finished): such a try says
        // nothing about the run's handling of SIGTERM, and is made again; a run that ignored it
        // would end with 0 every time.
        for attempt in 1.. {
            let mut child = run("part").stderr(std::process::Stdio::piped()).spawn().unwrap();
            // Signal once the run catches SIGTERM (its bit in /proc's SigCgt mask): a fixed 100 ms
            // wait was sometimes too short on a loaded machine, and the signal killed the run before
            // its handlers were in.
            while signal_mask(child.id(), "SigCgt") & SIGTERM_BIT == 0 {
                assert!(child.try_wait().unwrap().is_none(), "the run ended before it caught SIGTERM");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(child.try_wait().unwrap().is_none(), "the run ended before the signal");
            let pid = child.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.code() == Some(0) && attempt < 3 {
                eprintln!("the run ended before SIGTERM reached it (try {attempt}); again");
                continue;
            }
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("SIGTERM after") && err.contains("--resume"), "{err}");
            break;
        }
    } else {
        let mut child = run("part").stderr(std::process::Stdio::piped()).spawn().unwrap();
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
    // Stopped on purpose (--stop-after, with a checkpoint, exit 0) and resumed: the same files.
    let stuffed = |extra: &[&str]| {
        let out = dir.path().join("part").display().to_string();
        let o = Command::new(env!("CARGO_BIN_EXE_stuffed"))
            .args(args(dir.path()))
            .args(["--out", &out, "--checkpoint-secs", "0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = stuffed(&["--stop-after", "3000"]);
    assert!(err.contains("stopped after 3008 tokens") && err.contains("--resume"), "{err}");
    assert!(dir.path().join("part/probe.checkpoint.safetensors").exists());
    assert!(!dir.path().join("part/probe.json").exists(), "a stopped probe has not finished");
    stuffed(&["--resume"]);
    for f in ["retention.csv", "state_stats.csv", "conv_stats.csv", "inputs.csv", "snapshots.safetensors", "probe.json"]
    {
        let read = |d: &str| std::fs::read(dir.path().join(d).join(f)).unwrap();
        assert!(read("full") == read("part"), "{f} differs after a stop and resume");
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
        // The killed process's facts (to its checkpoint) are kept before the resumed one's.
        let processed =
            |r: &serde_json::Value| r.as_array().unwrap().last().unwrap()["tokens_processed"].as_u64().unwrap();
        assert!(processed(&part_runs) < processed(&full_runs), "{part_runs} vs {full_runs}");
        assert_eq!(part_runs.as_array().unwrap().len(), 2, "{part_runs}");
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
    let processed = |r: &serde_json::Value| r.as_array().unwrap().last().unwrap()["tokens_processed"].as_u64().unwrap();
    assert!(processed(&part_runs) + 8192 <= processed(&full_runs), "{part_runs} vs {full_runs}");
    assert_eq!(part_runs.as_array().unwrap().len(), 2, "{part_runs}");
}

/// A passkey grid under `--oprm`, killed after a timed checkpoint inside a sample's chunks or stopped
/// by SIGTERM there, resumes at the chunk it stood at, with the best chunk's state, to the
/// uninterrupted grid's lines byte for byte.
#[test]
fn killed_oprm_passkey_resumes_inside_a_sample() {
    let base = tempfile::tempdir().unwrap();
    // The passkey-trained model, the needle in the prompt's first chunk: that chunk answers (the
    // key is read there with the least entropy), long before the run is stopped, so the resumed
    // run answers from the state the checkpoint kept.
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-passkey");
    let m = m.display().to_string();
    // The query rule's best chunk (with its question NLL) is kept and checked the same way.
    for (sigterm, rule) in [(false, "entropy"), (true, "entropy"), (false, "query")] {
        let dir = base.path().join(rule);
        std::fs::create_dir_all(&dir).unwrap();
        let args = |_: &std::path::Path| {
            // (--no-reuse: every chunk runs, so the run lasts long enough to be stopped inside.)
            [
                "passkey",
                "--model",
                &m,
                "--lengths",
                "128k",
                "--depths",
                "0",
                "--oprm",
                "128",
                "--max-new",
                "8",
                "--no-reuse",
                "--oprm-select",
                rule,
            ]
            .map(String::from)
            .to_vec()
        };
        let err = kill_and_resume(&dir, args, "passkey.oprm.checkpoint.safetensors", sigterm);
        assert!(err.contains("sample 0 resumes at OPRM chunk"), "{err}");
        let read = |d: &str| std::fs::read_to_string(dir.join(d).join("results.jsonl")).unwrap();
        assert_eq!(read("full"), read("part"), "results.jsonl differs after a resume");
        let rec: serde_json::Value = serde_json::from_str(read("full").lines().next().unwrap()).unwrap();
        if rule == "entropy" {
            assert!(rec["correct"] == true && rec["oprm"]["chosen"] == 0, "{rec}");
        } else {
            assert!(rec["oprm"]["query_nll"].is_f64(), "{rec}");
        }
        let runs = |d: &str| -> serde_json::Value {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(d).join("summary.json")).unwrap()).unwrap();
            v["runs"].clone()
        };
        let processed =
            |r: &serde_json::Value| r.as_array().unwrap().last().unwrap()["tokens_processed"].as_u64().unwrap();
        let (full, part) = (runs("full"), runs("part"));
        assert!(processed(&part) < processed(&full), "the resume ran every chunk again: {part} vs {full}");
        std::fs::remove_dir_all(dir.join("part")).unwrap();
    }
}

/// A passkey grid under `--forget decimamba`, killed after a timed checkpoint inside a sample's
/// passes or stopped by SIGTERM there, resumes at the pass and token it stood at (state and norms
/// measured so far) to the uninterrupted grid's lines byte for byte.
#[test]
fn killed_decimamba_passkey_resumes_inside_a_sample() {
    let base = tempfile::tempdir().unwrap();
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-passkey");
    let m = m.display().to_string();
    for sigterm in [false, true] {
        let dir = base.path().join(if sigterm { "term" } else { "timed" });
        std::fs::create_dir_all(&dir).unwrap();
        let args = |_: &std::path::Path| {
            ["passkey", "--model", &m, "--lengths", "64k", "--depths", "0", "--max-new", "8"]
                .into_iter()
                .chain(["--forget", "decimamba:layers=0/1,base=1024", "--chunk", "512"])
                .map(String::from)
                .collect()
        };
        let err = kill_and_resume(&dir, args, "passkey.decimamba.checkpoint.safetensors", sigterm);
        assert!(err.contains("sample 0 resumes at decimamba pass"), "{err}");
        let read = |d: &str| std::fs::read_to_string(dir.join(d).join("results.jsonl")).unwrap();
        assert_eq!(read("full"), read("part"), "results.jsonl differs after a resume");
        let rec: serde_json::Value = serde_json::from_str(read("full").lines().next().unwrap()).unwrap();
        assert!(rec["decimated"]["kept"].is_array(), "{rec}");
    }
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
    // Models named by their directory (and method), not by the cache path they were written to.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("mamba2-tiny-l4-t64-a3-4m [none]: "), "{stdout}");
    assert!(!stdout.contains("cache"), "{stdout}");
}

/// An explicit `ppl` run also draws the log-x plot; `--repeat-to` shorter than the document says it
/// cuts; results.json names an input file by its path as a plain string; `ppl --help` describes the
/// no-argument run.
#[test]
fn ppl_explicit_run_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("short.txt");
    std::fs::write(&text, "The grass is green. The sky is blue. Here we go.\n".repeat(100)).unwrap();
    let (m, t) = (data("mamba2_neox_tiny"), text.to_str().unwrap());
    let out = dir.path().join("o");
    let args = ["ppl", "--model", m.to_str().unwrap(), "--text", t, "--repeat-to", "300", "--train-len", "64"];
    let (code, stdout, err) = stuffed(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--repeat-to 300 is shorter than short.txt: it is cut at 300 tokens"), "{err}");
    assert!(stdout.contains("loss_logx.svg"), "{stdout}");
    let logx = std::fs::read_to_string(out.join("loss_logx.svg")).unwrap();
    assert!(logx.contains("position (tokens, log scale)") && logx.contains("train len 64"), "{logx}");
    let linear = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(linear.contains("position (tokens)<"), "{linear}");
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["inputs"][0]["input"].as_str(), Some(t), "{}", res["inputs"]);
    // Repeating a text shorter than --repeat-to says nothing.
    let out2 = dir.path().join("o2");
    let args = ["ppl", "--model", m.to_str().unwrap(), "--text", t, "--repeat-to", "3000", "--out"];
    let (code, _, err) = stuffed(&[&args[..], &[out2.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("is cut"), "{err}");
    let (code, help, err) = stuffed(&["ppl", "--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(help.contains("With no arguments (no --model, no --text): the shipped pair"), "{help}");
}

/// `synth`'s model.safetensors and the `logits --out` file get the mode a created file gets (0644
/// under umask 022; they were 0600, from a temp file); `info`'s weights line has no stray space.
#[test]
fn written_files_get_the_umask_mode() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stuffed"));
        cmd.args(args);
        // SAFETY: umask(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o022);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let syn = dir.path().join("syn");
    run(&["synth", "--preset", "tiny", "--out", syn.to_str().unwrap()]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&syn.join("model.safetensors")), 0o644);
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3").unwrap();
    let logits = dir.path().join("l.safetensors");
    let m = data("mamba2_hf_g1_untied");
    run(&["logits", "--model", m.to_str().unwrap(), "--ids", ids.to_str().unwrap(), "--out", logits.to_str().unwrap()]);
    assert_eq!(mode(&logits), 0o644);
    let info = run(&["info", "--model", m.to_str().unwrap()]);
    let line = info.lines().find(|l| l.starts_with("weights")).unwrap();
    assert!(line.contains(" bytes") && !line.contains(" ,"), "{line}");
}

/// Without --max-new, passkey decodes enough ids for the grid's longest key (+1) and says so: the
/// shipped passkey model's keys are 6 ids (` 98349.` 7 with its period), and the old default of 5
/// cut them (accuracy 0.6 at 128 tokens instead of 1.0).
#[test]
fn passkey_decodes_the_whole_key_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-passkey");
    let out = dir.path().join("o");
    let (code, stdout, err) =
        stuffed(&["passkey", "--model", model.to_str().unwrap(), "--lengths", "128", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["accuracy_per_length"][0]["accuracy"].as_f64(), Some(1.0), "{}", s["accuracy_per_length"]);
    assert_eq!(s["options"]["max_new"].as_u64(), Some(7));
    let note = s["max_new_note"].as_str().unwrap_or_default();
    assert!(note.contains("--max-new 7 by default") && note.contains("6 ids"), "{note}");
    assert!(stdout.contains(note), "{stdout}");
    // The accuracy table (length × depth) at the end.
    assert!(stdout.contains("accuracy (%) by needle depth (rows) and prompt length (columns)"), "{stdout}");
    assert!(stdout.lines().any(|l| l.trim_start().starts_with("0.00–0.10") && l.ends_with(" 100")), "{stdout}");
    assert!(stdout.lines().any(|l| l.trim_start().starts_with("all") && l.ends_with(" 100")), "{stdout}");
    // Given explicitly and too short: a warning.
    let out = dir.path().join("o5");
    let m = model.to_str().unwrap();
    let (code, _, err) = stuffed(&[
        "passkey",
        "--model",
        m,
        "--lengths",
        "128",
        "--samples",
        "2",
        "--max-new",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--max-new 5 is shorter than the grid's longest key (6 ids)"), "{err}");
}

/// `stuffed bench` on the CPU, every family: the synth preset is made once in the cache, the report
/// names its parts (decode beside the machine's read bandwidth).
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
        let parts = [&model, "device       CPU", "tokens       2048 in", "GFLOP/token", "memory", "ms/token"];
        for k in parts.into_iter().chain([
            "bandwidth    read ",
            " GB/s on 1 thread",
            " % of the read bandwidth",
            "with the state read and written",
        ]) {
            assert!(text.contains(k), "{k:?} missing from:\n{text}");
        }
        assert!(dir.path().join(format!("synth/{family}-tiny-f32/model.safetensors")).exists());
    }
}

/// `stuffed bench`'s stream is one seeded stream whatever the chunk: its mean NLL token by token
/// (`--chunk 1`) equals the chunked one's (64 tokens a call, and 512), family by family.
#[test]
fn bench_streams_the_same_tokens_at_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["mamba2", "rwkv6", "hgrn2"] {
        let mean_nll = |chunk: &str| -> f64 {
            let out = Command::new(env!("CARGO_BIN_EXE_stuffed"))
                .args(["bench", "--family", family, "--preset", "tiny", "--dtype", "f32", "--tokens", "600"])
                .args(["--decode", "0", "--threads", "2", "--chunk", chunk])
                .env("STUFFED_CACHE", dir.path())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{family}: {}", String::from_utf8_lossy(&out.stderr));
            let at = text.find("mean NLL ").unwrap_or_else(|| panic!("no mean NLL in:\n{text}"));
            text[at + 9..].split_whitespace().next().unwrap().parse().unwrap()
        };
        let one = mean_nll("1");
        for chunk in ["64", "512"] {
            let nll = mean_nll(chunk);
            // Printed to 4 decimals: each side rounds by up to 5e-5.
            assert!((nll - one).abs() <= 1.5e-4, "{family}: --chunk {chunk} mean NLL {nll}, --chunk 1 {one}");
        }
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

/// `probe` says which layers it plots (stdout and probe.json) and plots the ones `--plot-layers`
/// names; its histogram draws both snapshots over one set of bins.
#[test]
fn probe_plots_name_their_layers_and_share_bins() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The grass is green. The sky is blue. Here we go. There and back again.\n".repeat(80))
        .unwrap();
    let (m, t) = (data("mamba2_neox_tiny"), text.to_str().unwrap().to_string());
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let args = ["probe", "--model", m.to_str().unwrap(), "--text", &t, "--snapshot-at", "64,1024", "--out"];
        let (code, stdout, err) = stuffed(&[&args[..], &[out.to_str().unwrap()], extra].concat());
        (out, code, stdout, err)
    };
    let (out, code, stdout, err) = run("all", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("probe: plots show layers 0, 1 (--plot-layers to choose)"), "{stdout}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("probe.json")).unwrap()).unwrap();
    assert_eq!(meta["plot_layers"], serde_json::json!([0, 1]));
    // The two histograms' bins: the x of every point of each curve.
    let svg = std::fs::read_to_string(out.join("hist_L1_H0.svg")).unwrap();
    let xs: Vec<Vec<String>> = svg
        .lines()
        .filter_map(|l| l.split("points=\"").nth(1).filter(|_| l.starts_with("<polyline")))
        .map(|p| p.split('"').next().unwrap().split(' ').map(|xy| xy.split(',').next().unwrap().to_string()).collect())
        .collect();
    assert_eq!(xs.len(), 2, "{svg}");
    assert_eq!(xs[0], xs[1], "the snapshots are binned differently");
    let (out, code, stdout, err) = run("one", &["--plot-layers", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("probe: plots show layers 0 (--plot-layers to choose)"), "{stdout}");
    assert!(out.join("state_mean_L0.svg").exists() && !out.join("state_mean_L1.svg").exists());
    let (_, code, _, err) = run("bad", &["--layers", "0", "--plot-layers", "1"]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("--plot-layers: layer 1 is not recorded"), "{err}");
}

/// `generate` stops at the tokenizer's end of text: the shipped passkey model answers " 12345." and
/// then `<|endoftext|>`, after which it used to go on with a new prompt.
#[test]
fn generate_stops_at_end_of_text() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-passkey");
    let noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";
    let prompt = format!(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n{noise}\
         The passkey is 12345. Remember it. 12345 is the passkey.\n{noise}\nWhat is the pass key? The passkey is"
    );
    let m = model.to_str().unwrap();
    let (code, out, err) = stuffed(&["generate", "--model", m, "--prompt", &prompt, "--max-new", "30"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim_end_matches('\n'), " 12345.", "{out:?}");
}

/// `STUFFED_SIMD=amx` where the AMX kernel cannot run (no AMX, or the tile state refused): one line
/// on stderr saying why, however often the level is looked up, and the best level below runs and is
/// recorded; where it can run, results.json records `amx` and nothing is said.
#[test]
fn amx_runs_only_on_request_and_a_refusal_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The grass is green. The sky is blue.\n".repeat(20)).unwrap();
    let out = dir.path().join("out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stuffed"));
    cmd.env("STUFFED_SIMD", "amx").args(["--threads", "1", "ppl", "--model"]).arg(data("mamba2_neox_tiny"));
    let o = cmd.arg("--text").arg(&text).arg("--out").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let said: Vec<&str> = err.lines().filter(|l| l.contains("STUFFED_SIMD=amx")).collect();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let simd = r["matmul"]["simd"].as_str().unwrap().to_string();
    if stuffed::exec::cpu_simd() == stuffed_core::exec::Simd::Amx {
        assert_eq!((simd.as_str(), said.len()), ("amx", 0), "{err}");
    } else {
        assert_eq!(said.len(), 1, "{err}");
        // What runs without the request (this process has no STUFFED_SIMD).
        let fallback = stuffed::exec::default_simd(stuffed_core::exec::MatmulMode::Exact);
        assert_eq!(simd, fallback.name(), "{err}");
        println!("{}", said[0]);
    }
}

/// A checkpoint holding a tensor its family's loader does not ask for (here a q_proj bias in a
/// GLA file, which fla's GLA has not) is refused in one line naming the file, the tensor and the
/// way out: run without it, the model's numbers would silently lack it. With
/// `STUFFED_ALLOW_UNUSED_TENSORS=1` it loads.
#[test]
fn unused_tensors_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let src = data("gla_tiny");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let bias = vec![0u8; 30 * 4];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    let extra = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![30], &bias).unwrap();
    views.push(("model.layers.0.attn.q_proj.bias".into(), extra));
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = stuffed(&["info", "--model", d]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for want in [d, "model.layers.0.attn.q_proj.bias", "GLA", "STUFFED_ALLOW_UNUSED_TENSORS=1"] {
        assert!(err.contains(want), "{want}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_stuffed"))
        .args(["info", "--model", d])
        .env("STUFFED_ALLOW_UNUSED_TENSORS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `--state-file` (a global flag) reaches the model a command opens: `logits` with it equals the
/// embedding API opened with the same file and differs from the run without; `info` names it; a
/// file the model would not start from ends the run with one line naming it.
#[test]
fn state_file_flag_starts_every_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (m, s) = (data("rwkv6_bf16_m3_d5"), data("rwkv6_time_state_file/state.pth"));
    let (m, s) = (m.to_str().unwrap(), s.to_str().unwrap());
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 32).collect();
    let ids_file = dir.path().join("ids.txt");
    std::fs::write(&ids_file, ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")).unwrap();
    let logits = |state: Option<&str>| {
        let out = dir.path().join("l.safetensors");
        let mut args =
            vec!["logits", "--model", m, "--ids", ids_file.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend(state.map(|s| ["--state-file", s]).into_iter().flatten());
        let (code, _, err) = stuffed(&args);
        assert_eq!(code, 0, "{err}");
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data = st.tensor("logits").unwrap().data().to_vec();
        data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<f32>>()
    };
    let (with, without) = (logits(Some(s)), logits(None));
    let h = stuffed::embed::Handle::open_with_state(std::path::Path::new(m), Some(std::path::Path::new(s))).unwrap();
    let mut state = vec![0f32; h.state_len()];
    h.initial_state(&mut state).unwrap();
    let mut want = vec![0f32; with.len()];
    h.forward(&mut state, &ids, &mut want, true).unwrap();
    assert_eq!(with, want, "logits --state-file against the embedding API");
    assert_ne!(with, without);
    let (code, out, err) = stuffed(&["info", "--json", "--model", m, "--state-file", s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"state_file\"") && out.contains("state-tuned"), "{out}");
    let (code, _, err) =
        stuffed(&["info", "--model", data("mamba2_hf_g1_untied").to_str().unwrap(), "--state-file", s]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(s) && err.contains("Mamba-2"), "{err}");
}
