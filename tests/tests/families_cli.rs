//! RWKV-6, RWKV-5.2 and HGRN-2 through the commands: `synth` writes what the loader reads (at the
//! published shapes for the real presets: checked by parameter count in `synth_shapes`), and
//! `info`, `logits`, `ppl`, `passkey` and `probe` run on tiny synthetic RWKV models with the World
//! tokenizer, under every `--forget` method of the core.
use clap::Parser;
use std::path::{Path, PathBuf};
use stuffed::cli::{run, Cli};
use stuffed::model::Model;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cli(args: &[&str]) -> anyhow::Result<()> {
    run(Cli::try_parse_from(std::iter::once("stuffed").chain(args.iter().copied()))?)
}

fn synth(family: &str, dir: &Path) -> PathBuf {
    let out = dir.join(family);
    cli(&["synth", "--family", family, "--preset", "tiny", "--dtype", "bf16", "--out", out.to_str().unwrap()]).unwrap();
    out
}

/// `passkey --oprm 200` on 1k-token prompts (the parts tokenized alone, by the model's own
/// tokenizer): every record says its chunks, the needle's and the one that answered.
fn oprm_passkey(out: &Path, model: &str) {
    let args = ["passkey", "--model", model, "--lengths", "1k", "--samples", "2", "--oprm", "200"];
    cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap();
    for line in std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let x = &r["oprm"];
        let (chunks, needle) = (x["chunks"].as_u64().unwrap(), x["needle_chunks"][0].as_u64().unwrap());
        assert!((4..=6).contains(&chunks) && needle < chunks && x["chosen"].as_u64().unwrap() < chunks, "{r}");
    }
}

#[test]
fn rwkv_commands_on_tiny_synth_models() {
    let dir = tempfile::tempdir().unwrap();
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    for family in ["rwkv6", "rwkv5"] {
        let m = synth(family, dir.path());
        let model = Model::load(&m).unwrap();
        assert_eq!(model.info.family.name(), family);
        assert_eq!(model.info.vocab_rows, 65536);
        let ms = m.to_str().unwrap();
        cli(&["info", "--model", ms]).unwrap();
        for forget in ["none", "rri:a=0.999,b=0.75", "dt:c=0.5", "window:r=64"] {
            let out = dir.path().join(format!("ppl-{family}-{}", forget.len()));
            cli(&[
                "ppl",
                "--model",
                ms,
                "--text",
                text.to_str().unwrap(),
                "--max-tokens",
                "500",
                "--chunk",
                "128",
                "--forget",
                forget,
                "--out",
                out.to_str().unwrap(),
            ])
            .unwrap();
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
            assert!(r.to_string().contains("rwkv_vocab"), "World tokenizer used");
        }
        let out = dir.path().join(format!("pk-{family}"));
        cli(&["passkey", "--model", ms, "--lengths", "1k", "--samples", "2", "--out", out.to_str().unwrap()]).unwrap();
        oprm_passkey(&dir.path().join(format!("pk-oprm-{family}")), ms);
        let out = dir.path().join(format!("probe-{family}"));
        cli(&[
            "probe",
            "--model",
            ms,
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "200",
            "--every",
            "50",
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
    }
}

#[test]
fn hgrn2_synth_loads_and_needs_a_tokenizer_for_text() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth("hgrn2", dir.path());
    let model = Model::load(&m).unwrap();
    assert_eq!(model.info.family.name(), "hgrn2");
    cli(&["info", "--model", m.to_str().unwrap()]).unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3 4 5 6 7").unwrap();
    let out = dir.path().join("o.safetensors");
    cli(&["logits", "--model", m.to_str().unwrap(), "--ids", ids.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .unwrap();
    let err = cli(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi"]).unwrap_err();
    assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
}

/// Mamba-1 through every command on a tiny synth model (GPT-NeoX tokenizer, 50,280 rows): `info`
/// (N_S = L·d_inner·(d_state + d_conv − 1)), `ppl` under every forgetting method, `passkey`,
/// `probe` with `--heads` indexing groups of 64 channels (mean ≤ max of log α over a group's
/// channels and lanes), `bench`.
#[test]
fn mamba1_commands_on_a_tiny_synth_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let m = synth("mamba1", dir.path());
    let model = Model::load(&m).unwrap();
    assert_eq!(model.info.family.name(), "mamba1");
    assert_eq!((model.info.vocab_rows, model.info.paper_state_size), (50280, 2 * 128 * (16 + 3)));
    assert_eq!(model.net().n_heads(), 2, "d_inner 128 = two groups of 64 channels");
    let ms = m.to_str().unwrap();
    cli(&["info", "--model", ms]).unwrap();
    for forget in
        ["none", "rri:a=0.999,b=0.75", "dt:c=0.5", "window:r=64", "state-norm:every=64,calib=128", "reset:every=100"]
    {
        let out = dir.path().join(format!("ppl-{}", forget.len()));
        let t = text.to_str().unwrap();
        let args = ["ppl", "--model", ms, "--text", t, "--max-tokens", "300", "--chunk", "128", "--forget", forget];
        cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        assert!(r.to_string().contains("mamba1"), "{r}");
    }
    let out = dir.path().join("pk");
    cli(&["passkey", "--model", ms, "--lengths", "1k", "--samples", "2", "--out", out.to_str().unwrap()]).unwrap();
    let out = dir.path().join("probe");
    let t = text.to_str().unwrap();
    cli(&["probe", "--model", ms, "--text", t, "--max-tokens", "200", "--every", "50", "--heads", "1"]
        .iter()
        .copied()
        .chain(["--out", out.to_str().unwrap()])
        .collect::<Vec<_>>())
    .unwrap();
    let csv = std::fs::read_to_string(out.join("retention.csv")).unwrap();
    let rows: Vec<Vec<f64>> = csv.lines().skip(1).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    assert_eq!(rows.len(), 2 * 4, "2 layers × group 1 × 4 reports");
    for r in &rows {
        assert_eq!(r[1], 1.0, "--heads 1 records group 1 only");
        assert!(r[3] < 0.0 && r[3] <= r[4] && r[4] < 0.0, "mean ≤ max < 0: {r:?}");
    }
    cli(&["bench", "--model", ms, "--tokens", "256", "--decode", "4"]).unwrap();
}

/// RWKV-7 through the commands on a tiny synth model (BlinkDL names, 65,536 rows: the World
/// tokenizer): `info`, `ppl` under every forgetting method that applies (the staggered states in
/// place of the window, state normalization and periodic reset too), `passkey` and `probe`.
#[test]
fn rwkv7_commands_on_a_tiny_synth_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let m = synth("rwkv7", dir.path());
    let model = Model::load(&m).unwrap();
    assert_eq!((model.info.family.name(), model.info.vocab_rows), ("rwkv7", 65536));
    assert!(model.tokenizer(None).unwrap().is_world(), "65,536 rows: the World tokenizer");
    let ms = m.to_str().unwrap();
    cli(&["info", "--model", ms]).unwrap();
    let forgets = [
        "none",
        "rri:a=0.999,b=0.75",
        "dt:c=0.5",
        "staggered:r=64",
        "state-norm:every=128,calib=256",
        "reset:every=200",
    ];
    for (i, forget) in forgets.into_iter().enumerate() {
        let out = dir.path().join(format!("ppl-{i}"));
        let args = ["ppl", "--model", ms, "--text", text.to_str().unwrap(), "--max-tokens", "500", "--chunk", "128"];
        cli(&[&args[..], &["--forget", forget, "--out", out.to_str().unwrap()]].concat()).unwrap();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        assert!(r.to_string().contains("rwkv_vocab"), "World tokenizer used");
        assert!(r.to_string().contains(forget.split(':').next().unwrap()), "{forget} named in the results");
    }
    let err = cli(&["ppl", "--model", ms, "--text", text.to_str().unwrap(), "--forget", "window:r=64"]).unwrap_err();
    assert!(format!("{err:#}").contains("staggered:r=N"), "{err:#}");
    let out = dir.path().join("pk");
    cli(&["passkey", "--model", ms, "--lengths", "1k", "--samples", "2", "--out", out.to_str().unwrap()]).unwrap();
    let out = dir.path().join("probe");
    let args = ["probe", "--model", ms, "--text", text.to_str().unwrap(), "--max-tokens", "200", "--every", "50"];
    cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap();
    let meta = std::fs::read_to_string(out.join("probe.json")).unwrap();
    assert!(meta.contains("upper bound") && meta.contains("learning_rate_sum"), "{meta}");
}

/// N_S of the RWKV-7 presets (SPEC.md counting: L·(H·N² + 2C)) equals FAMILIES.md §1.1's table.
#[test]
fn rwkv7_presets_state_size() {
    let want = [("0.1b", 608_256), ("0.4b", 1_622_016), ("1.5b", 3_244_032), ("2.9b", 5_406_720), ("7.2b", 8_650_752)];
    for (name, ns) in want {
        let &(_, c, l, f, [dw, da, dv, dg], v) = stuffed::synth::RWKV7_PRESETS.iter().find(|p| p.0 == name).unwrap();
        let cfg = stuffed_core::rwkv7::Config {
            d_model: c,
            n_layer: l,
            n_heads: c / 64,
            head_size: 64,
            d_ffn: f,
            lora_w: dw,
            lora_a: da,
            lora_v: dv,
            lora_g: dg,
            vocab_rows: v,
            eps: 1e-5,
            gn_eps: 64e-5,
        };
        cfg.validate().unwrap();
        assert_eq!(cfg.state_size(), ns, "{name}");
    }
    for (pile, world) in [("pile-168m", "0.1b"), ("pile-421m", "0.4b"), ("pile-1.47b", "1.5b")] {
        let p = stuffed::synth::RWKV7_PRESETS.iter().find(|p| p.0 == pile).unwrap();
        let w = stuffed::synth::RWKV7_PRESETS.iter().find(|p| p.0 == world).unwrap();
        assert_eq!((p.1, p.2, p.3, p.4, p.5), (w.1, w.2, w.3, w.4, 50304), "{pile}: {world}'s shape, NeoX rows");
    }
}

/// GLA: `synth` writes what the loader reads; `info`, `logits`, `ppl` under every `--forget`
/// method (rri, dt, window, state-norm, reset), `passkey` and `probe` run with a tokenizer.json beside the weights (fla-hub's GLA ships
/// a Llama-style one); without one the text commands say so; a tokenizer whose ids pass the
/// embedding's rows is refused naming the id and the rows.
#[test]
fn gla_commands_on_a_tiny_synth_model() {
    gla_style_commands("gla", 2 * 4 * 8 * 16);
}

/// RetNet, through the same commands (GLA's block with a fixed decay and rotary embeddings).
#[test]
fn retnet_commands_on_a_tiny_synth_model() {
    gla_style_commands("retnet", 2 * 4 * 16 * 32);
}

/// xLSTM: `synth` writes what the loader reads (N_S = L·H·(dk·dv + dk + 1): matrix, normaliser,
/// stabiliser); `info`, `logits`, `ppl` under every `--forget` method that applies (rri, dt, reset),
/// `passkey` and `probe` (its note: the state statistics are of the stabilised matrix) run with a
/// tokenizer.json beside the weights; without one the text commands say so; the window and the state
/// norm are refused naming why.
#[test]
fn xlstm_commands_on_a_tiny_synth_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth("xlstm", dir.path());
    let model = Model::load(&m).unwrap();
    assert_eq!(model.info.paper_state_size, 2 * 4 * (8 * 16 + 8 + 1));
    let ms = m.to_str().unwrap();
    cli(&["info", "--model", ms]).unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3 4 5 6 7").unwrap();
    let out = dir.path().join("o.safetensors");
    cli(&["logits", "--model", ms, "--ids", ids.to_str().unwrap(), "--out", out.to_str().unwrap()]).unwrap();
    let err = cli(&["generate", "--model", ms, "--prompt", "hi"]).unwrap_err();
    assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
    std::fs::copy(root().join("tests/data/tokenizer_llama_style/tokenizer.json"), m.join("tokenizer.json")).unwrap();
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let text = text.to_str().unwrap();
    for forget in ["none", "rri:a=0.999,b=0.75", "dt:c=0.5", "reset:every=100"] {
        let out = dir.path().join(format!("ppl-{}", forget.len()));
        let args = ["ppl", "--model", ms, "--text", text, "--max-tokens", "300", "--chunk", "128", "--forget", forget];
        cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap();
        let r = std::fs::read_to_string(out.join("results.json")).unwrap();
        assert!(r.contains("\"xlstm\""), "family in the results: {r}");
    }
    for forget in ["window:r=64", "state-norm:every=64,calib=64"] {
        let out = dir.path().join("ppl-refused");
        let args = ["ppl", "--model", ms, "--text", text, "--max-tokens", "300", "--forget", forget];
        let err = cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap_err();
        assert!(format!("{err:#}").contains("stabiliser"), "{forget}: {err:#}");
    }
    let out = dir.path().join("pk");
    cli(&["passkey", "--model", ms, "--lengths", "1k", "--samples", "2", "--out", out.to_str().unwrap()]).unwrap();
    let out = dir.path().join("probe");
    let args = ["probe", "--model", ms, "--text", text, "--max-tokens", "200", "--every", "50"];
    cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap();
    let meta = std::fs::read_to_string(out.join("probe.json")).unwrap();
    assert!(meta.contains("divided by e^m"), "the state statistics say they are of the stabilised matrix: {meta}");
}

/// `synth` of `family` and every command on it; `n_s` is the paper's state size, L·H·K·V (no
/// short conv; RetNet's position counters are not state).
fn gla_style_commands(family: &str, n_s: usize) {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(family, dir.path());
    let model = Model::load(&m).unwrap();
    assert_eq!(model.info.family.name(), family);
    assert_eq!(model.info.paper_state_size, n_s);
    let ms = m.to_str().unwrap();
    cli(&["info", "--model", ms]).unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3 4 5 6 7").unwrap();
    let out = dir.path().join("o.safetensors");
    cli(&["logits", "--model", ms, "--ids", ids.to_str().unwrap(), "--out", out.to_str().unwrap()]).unwrap();
    let err = cli(&["generate", "--model", ms, "--prompt", "hi"]).unwrap_err();
    assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
    let tok = root().join("tests/data/tokenizer_llama_style/tokenizer.json");
    std::fs::copy(&tok, m.join("tokenizer.json")).unwrap();
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let text = text.to_str().unwrap();
    let methods = ["rri:a=0.999,b=0.75", "dt:c=0.5", "window:r=64", "state-norm:every=64,calib=64", "reset:every=100"];
    for forget in std::iter::once("none").chain(methods) {
        let out = dir.path().join(format!("ppl-{}", forget.len()));
        let o = out.to_str().unwrap();
        let args = ["ppl", "--model", ms, "--text", text, "--max-tokens", "300", "--chunk", "128", "--forget", forget];
        cli(&[&args[..], &["--out", o]].concat()).unwrap();
        let r = std::fs::read_to_string(out.join("results.json")).unwrap();
        assert!(r.contains(&format!("\"{family}\"")), "family in the results: {r}");
    }
    let out = dir.path().join("pk");
    cli(&["passkey", "--model", ms, "--lengths", "1k", "--samples", "2", "--out", out.to_str().unwrap()]).unwrap();
    let out = dir.path().join("probe");
    let args = ["probe", "--model", ms, "--text", text, "--max-tokens", "200", "--every", "50"];
    cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap();
    let probe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("probe.json")).unwrap()).unwrap();
    let bound = probe["retention_bound"].as_str();
    assert_eq!(bound.is_some_and(|b| b.contains("cannot fail to forget")), family == "retnet", "{bound:?}");
    // The golden model has 256 rows: the Llama-style tokenizer's ids pass them.
    let golden = root().join(format!("tests/data/{family}_tiny"));
    let out = dir.path().join("ppl-bad");
    let args = ["ppl", "--model", golden.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap(), "--text", text];
    let err = format!(
        "{:#}",
        cli(&[&args[..], &["--max-tokens", "300", "--out", out.to_str().unwrap()]].concat()).unwrap_err()
    );
    assert!(err.contains("out of range") && err.contains("256 rows"), "{err}");
}

/// DeltaNet and Gated DeltaNet: `synth` writes what the loader reads; `info`, `logits`, `ppl` under
/// every `--forget` method that applies (rri, dt on GDN only, staggered, state-norm, reset),
/// `passkey` and `probe` (with its retention note) run with a tokenizer.json beside the weights;
/// without one the text commands say so; a tokenizer whose ids pass the embedding's rows is refused
/// naming the id and the rows.
#[test]
fn delta_net_commands_on_tiny_synth_models() {
    let dir = tempfile::tempdir().unwrap();
    for (family, ns) in [
        // N_S = L·(H_v·V·K + (2·H_k·K + H_v·V)·(w − 1)): DeltaNet 4 heads of 16 × 16, GDN 2 key heads
        // of 16 over 4 value heads of 32, conv 4.
        ("delta_net", 2 * (4 * 16 * 16 + (2 * 64 + 64) * 3)),
        ("gated_deltanet", 2 * (4 * 32 * 16 + (2 * 32 + 128) * 3)),
    ] {
        let m = synth(family, dir.path());
        let model = Model::load(&m).unwrap();
        assert_eq!(model.info.family.name(), family);
        assert_eq!(model.info.paper_state_size, ns, "{family}");
        let ms = m.to_str().unwrap();
        cli(&["info", "--model", ms]).unwrap();
        let ids = dir.path().join("ids.txt");
        std::fs::write(&ids, "1 2 3 4 5 6 7").unwrap();
        let out = dir.path().join(format!("{family}.safetensors"));
        cli(&["logits", "--model", ms, "--ids", ids.to_str().unwrap(), "--out", out.to_str().unwrap()]).unwrap();
        let err = cli(&["generate", "--model", ms, "--prompt", "hi"]).unwrap_err();
        assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
        let tok = root().join("tests/data/tokenizer_llama_style/tokenizer.json");
        std::fs::copy(&tok, m.join("tokenizer.json")).unwrap();
        let text = root().join("host/assets/corpus/austen_persuasion.txt");
        let text = text.to_str().unwrap();
        let mut methods = vec!["none", "rri:a=0.999,b=0.75", "staggered:r=64", "state-norm:every=64,calib=64"];
        methods.push("reset:every=100");
        if family == "gated_deltanet" {
            methods.push("dt:c=0.5");
        }
        for forget in methods {
            let out = dir.path().join(format!("ppl-{family}-{}", forget.len()));
            let o = out.to_str().unwrap();
            let args =
                ["ppl", "--model", ms, "--text", text, "--max-tokens", "300", "--chunk", "128", "--forget", forget];
            cli(&[&args[..], &["--out", o]].concat()).unwrap();
            let r = std::fs::read_to_string(out.join("results.json")).unwrap();
            assert!(r.contains(&format!("\"{family}\"")), "family in the results: {r}");
        }
        let out = dir.path().join(format!("pk-{family}"));
        cli(&["passkey", "--model", ms, "--lengths", "1k", "--samples", "2", "--out", out.to_str().unwrap()]).unwrap();
        oprm_passkey(&dir.path().join(format!("pk-oprm-{family}")), ms);
        let out = dir.path().join(format!("probe-{family}"));
        let args = ["probe", "--model", ms, "--text", text, "--max-tokens", "200", "--every", "50"];
        cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat()).unwrap();
        let meta = std::fs::read_to_string(out.join("probe.json")).unwrap();
        assert!(meta.contains("upper bound") && meta.contains("beta_sum"), "{meta}");
    }
    // The golden models have 256 rows: the Llama-style tokenizer's ids pass them.
    let golden = root().join("tests/data/gdn_tiny");
    let tok = root().join("tests/data/tokenizer_llama_style/tokenizer.json");
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let out = dir.path().join("ppl-bad");
    let args = ["ppl", "--model", golden.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()];
    let err = format!(
        "{:#}",
        cli(&[&args[..], &["--text", text.to_str().unwrap(), "--max-tokens", "300", "--out", out.to_str().unwrap()]]
            .concat())
        .unwrap_err()
    );
    assert!(err.contains("out of range") && err.contains("256 rows"), "{err}");
}

/// N_S of the released shapes (SPEC.md counting, FAMILIES.md §2.4): DeltaNet 1.3B 24·(16·128² +
/// 3·2048·3) = 6,291,456 + 442,368 conv; the fla GDN 1.3B shape 21·(6·512·256 + (2·1536 + 3072)·3).
#[test]
fn delta_net_presets_state_size() {
    for (name, gated, ns) in [
        ("1.3b", false, 24 * (16 * 128 * 128 + 3 * 2048 * 3)),
        ("2.7b", false, 32 * (20 * 128 * 128 + 3 * 2560 * 3)),
        ("1.3b", true, 21 * (6 * 512 * 256 + (2 * 1536 + 3072) * 3)),
    ] {
        let table = if gated { stuffed::synth::GDN_PRESETS } else { stuffed::synth::DELTA_NET_PRESETS };
        let &(_, c, l, nh, nv, dk, dv, im, v) = table.iter().find(|p| p.0 == name).unwrap();
        let cfg = stuffed_core::delta_net::Config {
            d_model: c,
            n_layer: l,
            n_heads: nh,
            n_v_heads: nv,
            head_k: dk,
            head_v: dv,
            d_mlp: im,
            vocab_rows: v,
            d_conv: 4,
            gated,
            use_beta: true,
            neg_eigval: false,
            output_gate: stuffed_core::delta_net::OutputGate::None,
            eps: 1e-6,
        };
        cfg.validate().unwrap();
        assert_eq!(cfg.state_size(), ns, "{name} gated {gated}");
    }
}
