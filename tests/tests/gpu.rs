//! The CUDA backend against the CPU core on the same weights and tokens. On a GPU (a build with the
//! SDK, tools/provision_cuda_sdk.sh): `cargo test -p stuffed-tests --release --features cuda -- --ignored`.
//! Without one, `--features cuda-emu` runs the same kernels and launch sequence on the CPU (CI does).
//! Bounds (FORMATS.md §8): f32 weights rel ≤ 1e-4 and max |ΔNLL| ≤ 1e-3; bf16 matmuls NMSE of logits
//! ≤ 1e-4 and mean |ΔNLL| ≤ 1e-2. `stuffed selftest` prints the measured errors.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]
use stuffed_tests::{cli, data, poisoned};

/// The emulated device runs GEMMs as plain loops: smaller workloads there.
const EMU: bool = cfg!(not(feature = "cuda"));

fn selftest(models: &[&str], tokens: usize, chunk: usize, extra: &[&str]) {
    let t = tokens.to_string();
    let c = chunk.to_string();
    let mut args = vec!["selftest", "--device", "cuda", "--tokens", &t, "--chunk", &c];
    for m in models {
        args.extend(["--model", m]);
    }
    args.extend(extra);
    cli(&args).unwrap();
}

fn golden() -> Vec<String> {
    ["mamba2_hf_g1_untied", "mamba2_hf_g2_tied", "mamba2_hf_bf16", "mamba2_official", "mamba2_neox_tiny"]
        .iter()
        .map(|c| data(c).display().to_string())
        .collect()
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn golden_checkpoints_match_the_cpu_at_nasty_chunk_sizes() {
    let g = golden();
    let g: Vec<&str> = g.iter().map(String::as_str).collect();
    // Partial SSD blocks across calls (the GPU's are 256 tokens, the core's 64), exactly one block of
    // each, one token per call, many blocks per call.
    for (tokens, chunk) in [(1000, 300), (640, 64), (512, 256), (200, 65), (40, 1), (1300, 1300)] {
        selftest(&g, tokens, chunk, &[]);
    }
    // One-token calls through cuBLAS (the fused decode kernels' alternative) hold the same bounds.
    selftest(&g, 40, 1, &["--gpu-decode-cublas"]);
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn f32_weights_run_as_bf16_within_the_bf16_bound() {
    let g = golden();
    selftest(&[&g[0], &g[1]], 1000, 300, &["--gpu-bf16"]);
}

/// `--gpu-f32` upcasts bf16-stored weights: the bf16 checkpoints then hold the f32 bounds (their
/// default bf16 GEMMs reach NLL max|Δ| ≈ 2e-2, outside them), chunked and token by token.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn bf16_weights_run_as_f32_within_the_f32_bound() {
    let g = golden();
    selftest(&[&g[2], &g[4]], 1000, 300, &["--gpu-f32"]);
    selftest(&[&g[2], &g[4]], 40, 1, &["--gpu-f32"]);
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn synth_presets_match_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    // The emulator takes the `small` preset (130m's head shape, N 128 and P 64, at toy width) instead,
    // in bf16 (TF32 SSD) and f32 (3xTF32), and `p128` (head dim 128: the other tiling; biases).
    let runs: &[(&str, &str)] = if EMU {
        &[("small", "bf16"), ("small", "f32"), ("p128", "f32")]
    } else {
        &[("130m", "bf16"), ("p128", "f32")]
    };
    for &(preset, dtype) in runs {
        let out = dir.path().join(format!("{preset}-{dtype}"));
        cli(&["synth", "--preset", preset, "--dtype", dtype, "--out", out.to_str().unwrap()]).unwrap();
        selftest(&[out.to_str().unwrap()], if EMU { 600 } else { 2048 }, if EMU { 300 } else { 1000 }, &[]);
        if preset == "p128" {
            // Its biases through both one-token paths.
            selftest(&[out.to_str().unwrap()], 40, 1, &[]);
            selftest(&[out.to_str().unwrap()], 40, 1, &["--gpu-decode-cublas"]);
        }
    }
}

/// Mean NLL of `stuffed ppl` on the held-out novel (`max_tokens` of it) on `dev`, with extra arguments.
fn ppl_mean(dir: &std::path::Path, model: &str, dev: &str, max_tokens: &str, extra: &[&str]) -> f64 {
    let out = dir.join(format!("{dev}-{}", extra.join("_").replace([':', ',', '=', '-'], "_")));
    let text = data("../../host/assets/corpus/austen_persuasion.txt");
    let args = ["ppl", "--model", model, "--text", text.to_str().unwrap(), "--max-tokens", max_tokens];
    cli(&[&args[..], extra, &["--device", dev, "--out", out.to_str().unwrap()]].concat()).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    r["runs"][0]["mean_nll"].as_f64().unwrap()
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn ppl_on_the_gpu_gives_the_cpu_curve() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("mamba2_neox_tiny").display().to_string();
    let n = if EMU { "1500" } else { "20000" };
    let means: Vec<f64> =
        ["cpu", "cuda"].iter().map(|dev| ppl_mean(dir.path(), &model, dev, n, &["--train-len", "2048"])).collect();
    println!("mean NLL cpu {:.6} cuda {:.6}", means[0], means[1]);
    assert!((means[0] - means[1]).abs() <= 1e-3, "{means:?}");
}

/// Every training-free forgetting method gives the CPU's mean NLL on the GPU, and one that differs
/// from no forgetting (so the method did act): RRI, Δ scaling (one factor, and one per layer),
/// A scaling (`decay`, one and per layer: the device's A_log + ln s) and LongMamba's thresholds
/// inside the kernels, the window's lagged state per layer, reset and state normalization between
/// calls at the CPU's positions.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn forgetting_on_the_gpu_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("../../models/mamba2-tiny-l4-t64-a3-4m").display().to_string();
    let n = if EMU { "1200" } else { "20000" };
    let mean = |dev: &str, forget: &str| ppl_mean(dir.path(), &model, dev, n, &["--forget", forget]);
    let none = mean("cpu", "none");
    let lm = dir.path().join("lm");
    let text = data("../../host/assets/corpus/austen_persuasion.txt").display().to_string();
    let calib =
        ["longmamba", "--model", &model, "--text", &text, "--train-len", "64", "--target", "2k", "--windows", "8"];
    stuffed_tests::cli(&[&calib[..], &["--out", lm.to_str().unwrap()]].concat()).unwrap();
    let longmamba = format!("longmamba:file={}", lm.join("longmamba.json").display());
    let methods = [
        "rri:a=0.999,b=0.75",
        "dt:c=0.5",
        "dt:c=0.5/1/2/0.7",
        "decay:s=0.5",
        "decay:s=0.5/1/2/0.7",
        &longmamba,
        "window:r=100",
        "state-norm:every=128,calib=64",
        "reset:every=300",
    ];
    for forget in methods {
        let (cpu, gpu) = (mean("cpu", forget), mean("cuda", forget));
        println!("--forget {forget}: mean NLL cpu {cpu:.6} cuda {gpu:.6} (none {none:.6})");
        assert!((cpu - gpu).abs() <= 1e-3, "{forget}: cpu {cpu} cuda {gpu}");
        assert!((cpu - none).abs() > 1e-2, "{forget} changed nothing: {cpu} vs {none}");
    }
}

/// A GPU run stopped at a checkpoint and resumed gives the uninterrupted run's numbers bit for bit:
/// the recurrent state and the window's lagged state and ring go through the checkpoint file.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn ppl_on_the_gpu_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("../../models/mamba2-tiny-l4-t64-a3-4m").display().to_string();
    let text = data("../../host/assets/corpus/austen_persuasion.txt").display().to_string();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let (o, nll) = (out.to_str().unwrap().to_string(), out.join("nll.f32").to_str().unwrap().to_string());
        let args = ["ppl", "--device", "cuda", "--model", &model, "--text", &text, "--max-tokens", "900"];
        let more = ["--chunk", "256", "--forget", "window:r=100", "--out", &o, "--nll-out", &nll];
        cli(&[&args[..], &more[..], extra].concat()).unwrap();
        out
    };
    let full = run("full", &[]);
    let ck = ["--checkpoint-every", "300"];
    run("part", &[&ck[..], &["--stop-after", "400"]].concat());
    assert!(dir.path().join("part/ppl.checkpoint.safetensors").exists());
    let part = run("part", &[&ck[..], &["--resume"]].concat());
    let json = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("results.json")).unwrap()).unwrap()
    };
    let (a, b) = (json(&full), json(&part));
    for key in ["buckets_linear", "mean_nll", "tokens_scored"] {
        assert_eq!(a["runs"][0][key], b["runs"][0][key], "{key}");
    }
    let nll = |d: &std::path::Path| std::fs::read(d.join("nll.f32")).unwrap();
    assert_eq!(nll(&full), nll(&part), "NLL streams differ");
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn passkey_on_the_gpu_decodes_what_the_cpu_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("../../models/mamba2-tiny-passkey");
    // Plainly, and with window forgetting (its lagged state advances through every decoded token).
    for (forget, lengths, records) in [("none", "128,512", 8), ("window:r=160", "192", 4)] {
        let (mut answers, mut key_nlls) = (Vec::new(), Vec::new());
        for dev in ["cpu", "cuda"] {
            let out = dir.path().join(format!("{dev}-{}", forget.replace([':', '='], "_")));
            let args = ["passkey", "--model", model.to_str().unwrap(), "--lengths", lengths, "--samples", "4"];
            let extra = ["--max-new", "8", "--forget", forget, "--device", dev, "--out", out.to_str().unwrap()];
            cli(&[&args[..], &extra[..]].concat()).unwrap();
            let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
            let recs: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            answers.push(recs.iter().map(|r| (r["continuation"].clone(), r["correct"].clone())).collect::<Vec<_>>());
            key_nlls.push(recs.iter().map(|r| r["key_nll"].as_f64().unwrap()).collect::<Vec<_>>());
        }
        println!("--forget {forget}: {:?}", answers[1]);
        assert_eq!(answers[0].len(), records);
        assert_eq!(answers[0], answers[1]);
        // The key's teacher-forced NLL (a few tokens) within the f32 bound of each token's NLL.
        for (c, g) in key_nlls[0].iter().zip(&key_nlls[1]) {
            assert!((c - g).abs() <= 3e-3, "key NLL cpu {c} vs gpu {g}");
        }
    }
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn probe_on_the_gpu_gives_the_cpu_series() {
    let dir = tempfile::tempdir().unwrap();
    let model = data("../../models/mamba2-tiny-passkey");
    let text = data("../../host/assets/corpus/austen_persuasion.txt");
    let mut tables = Vec::new();
    for dev in ["cpu", "cuda"] {
        let out = dir.path().join(dev);
        let args = ["probe", "--model", model.to_str().unwrap(), "--text", text.to_str().unwrap()];
        let extra = ["--max-tokens", "700", "--every", "128", "--snapshot-at", "300", "--chunk", "200"];
        cli(&[&args[..], &extra[..], &["--device", dev, "--out", out.to_str().unwrap()]].concat()).unwrap();
        // (layer, head, t) columns, then the values.
        let read = |f: &str| -> (Vec<String>, Vec<f64>) {
            let s = std::fs::read_to_string(out.join(f)).unwrap();
            let rows: Vec<Vec<&str>> = s.lines().skip(1).map(|l| l.split(',').collect()).collect();
            let keys = rows.iter().map(|r| r[..3].join(",")).collect();
            (keys, rows.iter().flat_map(|r| r[3..].iter().map(|v| v.parse::<f64>().unwrap())).collect())
        };
        tables.push([read("retention.csv"), read("state_stats.csv"), read("inputs.csv")]);
    }
    for (k, name) in ["retention", "state_stats", "inputs"].iter().enumerate() {
        assert_eq!(tables[0][k].0, tables[1][k].0, "{name}: (layer, head, t) rows");
        let (c, g) = (&tables[0][k].1, &tables[1][k].1);
        assert!(!c.is_empty(), "{name}: empty");
        let scale = c.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = c.iter().zip(g).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        println!("{name}: max |Δ| {err:.3e} (max |value| {scale:.3e})");
        assert!(err <= 1e-4 * scale, "{name}: max |Δ| {err:e} > 1e-4 · {scale:e}");
    }
}

/// A NaN in the LM head stops a GPU run at the first call that meets it, naming the position, and
/// the CPU rerun of that call names where it comes from (the logits, id 50,000).
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn non_finite_nll_on_the_gpu_is_an_error_naming_where() {
    let dir = poisoned("mamba2_neox_tiny", "backbone.embeddings.weight", 50_000 * 32 + 4, f32::NAN);
    let out = tempfile::tempdir().unwrap();
    let text = data("../../host/assets/corpus/austen_persuasion.txt");
    let m = dir.path().to_str().unwrap();
    let args = ["ppl", "--device", "cuda", "--model", m, "--text", text.to_str().unwrap(), "--max-tokens", "300"];
    let err = format!("{:#}", cli(&[&args[..], &["--out", out.path().to_str().unwrap()]].concat()).unwrap_err());
    for want in [
        m,
        "non-finite logit or NLL at position 0 on the GPU",
        "CPU rerun",
        "non-finite logit at position 0 (id 50000)",
    ] {
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
    assert!(!err.contains('\n') && !out.path().join("results.json").exists());
}

/// LongMamba on the device filters what the CPU filters: a long prompt with its nearest target's
/// thresholds, not a short one, and none
/// of the tokens greedy decoding feeds after it (the captured decode step included) — the same
/// tokens and, to f32 rounding, the same state as the CPU, where the filter run on through those
/// tokens ends elsewhere.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a GPU")]
fn longmamba_on_the_gpu_filters_prompts_not_decoded_tokens() {
    use stuffed::backend::{open, Backend, Device};
    use stuffed::forget::{ForgetSpec, Phase};
    let dir = tempfile::tempdir().unwrap();
    let model = data("../../models/mamba2-tiny-l4-t64-a3-4m");
    let text = data("../../host/assets/corpus/austen_persuasion.txt").display().to_string();
    let m = model.to_str().unwrap();
    let calib =
        ["longmamba", "--model", m, "--text", &text, "--train-len", "64", "--target", "128,2k", "--windows", "8"];
    cli(&[&calib[..], &["--out", dir.path().to_str().unwrap()]].concat()).unwrap();
    let mut lm = stuffed::model::Model::load(&model).unwrap();
    let spec = format!("longmamba:file={},min=300", dir.path().join("longmamba.json").display());
    lm.set_forget(ForgetSpec::parse(&spec).unwrap()).unwrap();
    let real = lm.info.vocab_rows;
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 31 + 5) % 250).collect();
    let rel = |a: &[f32], b: &[f32]| {
        let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (d / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
    };
    let mut runs = Vec::new();
    for dev in [Device::Cpu, Device::Cuda] {
        let mut b = open(&lm, 64, real, dev, Default::default()).unwrap();
        let nll = |b: &mut dyn Backend, phase| {
            b.reset().unwrap();
            b.set_phase(phase);
            let mut v = Vec::new();
            b.score(&ids, &mut v).unwrap();
            v
        };
        let short = nll(b.as_mut(), Phase::Prompt { len: Some(200) });
        // The 128-token target's thresholds, then the 2k one's (the nearest to each length).
        let long = nll(b.as_mut(), Phase::Prompt { len: Some(300) });
        let longer = nll(b.as_mut(), Phase::Prompt { len: Some(1500) });
        b.reset().unwrap();
        b.feed(&ids).unwrap();
        let decoded = b.greedy(24).unwrap();
        runs.push((short, long, longer, decoded, b.snapshot().unwrap().state));
    }
    let (cpu, gpu) = (&runs[0], &runs[1]);
    let ((cs, cl, cm), (gs, gl, gm)) = ((&cpu.0, &cpu.1, &cpu.2), (&gpu.0, &gpu.1, &gpu.2));
    println!(
        "short {:.2e} 128 {:.2e} 2k {:.2e}; filter on/off {:.2e}, 128 against 2k {:.2e}",
        rel(gs, cs),
        rel(gl, cl),
        rel(gm, cm),
        rel(cl, cs),
        rel(cm, cl)
    );
    assert!(rel(gs, cs) <= 1e-4 && rel(gl, cl) <= 1e-4 && rel(gm, cm) <= 1e-4, "the device's NLLs are not the CPU's");
    assert!(rel(cl, cs) > 1e-3 && rel(cm, cl) > 1e-4, "the filter or its target changes nothing here");
    assert_eq!(cpu.3, gpu.3, "decoded tokens");
    let e = rel(&gpu.4, &cpu.4);
    // The filter run on through the decoded tokens, on the CPU.
    let mut b = open(&lm, 64, real, Device::Cpu, Default::default()).unwrap();
    b.feed(&ids).unwrap();
    b.feed(&cpu.3[..23]).unwrap();
    let filtered = rel(&b.snapshot().unwrap().state, &cpu.4);
    println!("state after decoding: device vs CPU {e:.2e}; filtered decode vs CPU {filtered:.2e}");
    assert!(e <= 1e-4 && filtered > 1e-2, "device {e:.2e}, filtered {filtered:.2e}");
}
