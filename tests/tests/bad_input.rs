//! Bad input gets one clear error naming the file or tensor and the problem — never a panic.
use std::path::{Path, PathBuf};
use stuffed::checkpoint::Checkpoint;
use stuffed::cli::{run, Cli};
use stuffed::model::Model;
use stuffed_tests::poisoned;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba2_hf_g1_untied")
}

/// A copy of the tiny model in a temp dir, for mutation.
fn copy_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load_err(path: &Path) -> String {
    match Model::load(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A temp dir holding one text file `name`.
fn text_file(name: &str, content: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join(name);
    std::fs::write(&text, content).unwrap();
    (dir, text)
}

fn assert_mentions(err: &str, needles: &[&str]) {
    assert!(!err.contains('\n'), "error spans lines: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} does not mention {n:?}");
    }
}

/// Re-serialises the tiny model's f32 tensors through `edit` (return false to drop a tensor).
fn rewrite(dir: &Path, edit: impl Fn(&str, &mut Vec<f32>, &mut Vec<usize>) -> bool) {
    let ck = Checkpoint::open(&tiny().join("model.safetensors")).unwrap();
    let mut kept = Vec::new();
    for name in ck.names() {
        let v = ck.require(name).unwrap();
        let (mut data, mut shape) = (v.as_f32().unwrap().to_vec(), v.shape.to_vec());
        if edit(name, &mut data, &mut shape) {
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            kept.push((name.to_string(), shape, bytes));
        }
    }
    let views: Vec<_> = kept
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn missing_file() {
    let err = load_err(Path::new("/nonexistent/model-dir"));
    assert_mentions(&err, &["/nonexistent/model-dir"]);
}

#[test]
fn truncated_safetensors() {
    let dir = copy_tiny();
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
    std::fs::write(&f, &bytes[..5]).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
}

#[test]
fn corrupt_safetensors_header() {
    let dir = copy_tiny();
    let f = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..24].copy_from_slice(b"this is not json");
    std::fs::write(&f, &bytes).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
    // A header length pointing past the end.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
}

#[test]
fn truncated_and_corrupt_torch_zip() {
    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba2_official");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("pytorch_model.bin")).unwrap();
    let f = dir.path().join("pytorch_model.bin");
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    assert_mentions(&load_err(dir.path()), &["pytorch_model.bin"]);
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 22..n - 10].fill(0xff); // end-of-central-directory record
    std::fs::write(&f, &bad).unwrap();
    assert_mentions(&load_err(dir.path()), &["pytorch_model.bin"]);
}

#[test]
fn unknown_architecture_and_mamba1() {
    let dir = copy_tiny();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"mamba2\"", "\"llama\"")).unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "unknown architecture", "llama"]);
    // Mamba-2 weights under a Mamba-1 config: the 1-D A_log is named.
    std::fs::write(&cfg, text.replace("\"mamba2\"", "\"mamba\"")).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "mixer.A_log", "a 1-D A_log is Mamba-2"]);
    std::fs::write(&cfg, "{ not json").unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "invalid JSON"]);
    std::fs::remove_file(&cfg).unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "missing"]);
}

/// A config.json layer count the weights do not have is one error naming both counts, checked before
/// anything is sized by it (10¹² layers used to abort on a 440 GB allocation).
#[test]
fn layer_count_disagrees_with_the_weights() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    for (model, key, n, want) in [
        (
            "mamba2_hf_g1_untied",
            "num_hidden_layers",
            1_000_000_000_000u64,
            "fewer (no tensor backbone.layers.999999999999.",
        ),
        ("mamba2_hf_g1_untied", "num_hidden_layers", 3, "fewer (no tensor backbone.layers.2.mixer.A_log)"),
        ("hgrn2_tiny", "num_hidden_layers", 3, "fewer (no tensor model.layers.2.attn_norm.weight)"),
        ("rwkv6_tiny_hf", "num_hidden_layers", 3, "the weights have 2"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(data.join(model).join(f), dir.path().join(f)).unwrap();
        }
        let cfg = dir.path().join("config.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        json[key] = n.into();
        std::fs::write(&cfg, json.to_string()).unwrap();
        assert_mentions(&load_err(dir.path()), &["config.json", &format!("states {n} layers"), want]);
    }
}

/// Weights with more layers than config.json states are refused naming the count (the fla-style
/// and xLSTM loaders: a layer silently left out would be a wrong model with exit 0).
#[test]
fn more_layers_than_the_config_states() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    for (model, keys) in [
        ("hgrn2_tiny", &["num_hidden_layers"][..]),
        ("gla_tiny", &["num_hidden_layers"]),
        ("delta_net_tiny", &["num_hidden_layers"]),
        ("xlstm_tiny", &["num_hidden_layers", "num_blocks"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(data.join(model).join(f), dir.path().join(f)).unwrap();
        }
        let cfg = dir.path().join("config.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        keys.iter().for_each(|k| json[*k] = 1.into());
        std::fs::write(&cfg, json.to_string()).unwrap();
        assert_mentions(&load_err(dir.path()), &["config.json", "the weights have more than the 1 layers"]);
    }
}

#[test]
fn missing_tensor() {
    let dir = copy_tiny();
    rewrite(dir.path(), |name, _, _| name != "backbone.layers.1.mixer.dt_bias");
    let dir_name = dir.path().display().to_string();
    assert_mentions(&load_err(dir.path()), &[&dir_name, "missing tensor backbone.layers.1.mixer.dt_bias"]);
}

#[test]
fn shape_mismatch() {
    let dir = copy_tiny();
    rewrite(dir.path(), |name, data, shape| {
        if name == "backbone.layers.0.mixer.out_proj.weight" {
            data.truncate(64 * 100);
            *shape = vec![64, 100];
        }
        true
    });
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "out_proj.weight", "[64, 100]"]);
    // A config that disagrees with the weights.
    let dir = copy_tiny();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"state_size\": 16", "\"state_size\": 32")).unwrap();
    assert_mentions(&load_err(dir.path()), &["in_proj.weight"]);
}

#[test]
fn wrong_dtype_tensor() {
    let dir = copy_tiny();
    let ck = Checkpoint::open(&tiny().join("model.safetensors")).unwrap();
    let mut kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ck.names() {
        let v = ck.require(name).unwrap();
        let dt = if name == "backbone.norm_f.weight" { safetensors::Dtype::I32 } else { safetensors::Dtype::F32 };
        kept.push((name.to_string(), dt, v.shape.to_vec(), v.bytes.to_vec()));
    }
    let views: Vec<_> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    assert_mentions(&load_err(dir.path()), &["backbone.norm_f.weight", "I32"]);
}

fn cli(args: &[&str]) -> anyhow::Result<()> {
    run(stuffed::cli::parse_from(std::iter::once("stuffed").chain(args.iter().copied()))?)
}

#[test]
fn token_id_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1, 2, 3\n256 4").unwrap();
    let out = dir.path().join("o.safetensors");
    let model = tiny();
    let err = format!(
        "{:#}",
        cli(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            ids.to_str().unwrap(),
            "--out",
            out.to_str().unwrap()
        ])
        .unwrap_err()
    );
    assert_mentions(&err, &["ids.txt", "token id 256", "position 3", "256 rows"]);
    assert!(!out.exists(), "no output may be written for bad input");
    std::fs::write(&ids, "1 two 3").unwrap();
    let err = format!(
        "{:#}",
        cli(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            ids.to_str().unwrap(),
            "--out",
            out.to_str().unwrap()
        ])
        .unwrap_err()
    );
    assert_mentions(&err, &["ids.txt", "'two'"]);
}

/// `logits` keeps every position in memory and writes once at the end: a bad --out or --chunk is
/// refused before the run, not after it (the computed logits would be lost).
#[test]
fn logits_checks_its_output_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3").unwrap();
    // The model path is wrong too: the --out check comes first, so no model is loaded.
    let out = dir.path().join("missing/o.safetensors");
    let args = |out: &str, chunk: &str| {
        ["logits", "--model", "/nonexistent/model", "--ids", ids.to_str().unwrap(), "--out", out, "--chunk", chunk]
            .map(String::from)
    };
    let err = format!("{:#}", cli(&args(out.to_str().unwrap(), "256").each_ref().map(|s| s.as_str())).unwrap_err());
    assert_mentions(&err, &["missing/o.safetensors", "is not a directory"]);
    let out = dir.path().join("o.safetensors");
    let err = format!("{:#}", cli(&args(out.to_str().unwrap(), "0").each_ref().map(|s| s.as_str())).unwrap_err());
    assert_mentions(&err, &["--chunk", "from 1 up"]);
}

#[test]
fn missing_text_file() {
    let err = format!("{:#}", cli(&["tokenize", "--file", "/nonexistent/text.txt"]).unwrap_err());
    assert_mentions(&err, &["/nonexistent/text.txt", "cannot read"]);
}

/// An empty text file (a wrong path or redirect) is an error before any model runs, not an empty result.
#[test]
fn empty_text_file() {
    let (dir, text) = text_file("empty.txt", "");
    let (m, t) = (tiny(), text.to_str().unwrap().to_string());
    for cmd in ["ppl", "probe"] {
        let out = dir.path().join(cmd);
        let args = [cmd, "--model", m.to_str().unwrap(), "--text", &t, "--out", out.to_str().unwrap()];
        let err = format!("{:#}", cli(&args).unwrap_err());
        assert_mentions(&err, &["empty.txt", "empty text"]);
        assert!(!out.join("results.json").exists(), "{cmd}: no result may be written for an empty text");
    }
}

/// A zero count (a typo that would run for nothing or fail every sample) is one error line naming it.
#[test]
fn zero_counts_are_errors() {
    let m = tiny();
    let m = m.to_str().unwrap();
    for (flag, why) in [("--samples", "positive"), ("--max-new", "positive"), ("--chunk", "from 1 up")] {
        let err = format!("{:#}", cli(&["passkey", "--model", m, "--lengths", "1k", flag, "0"]).unwrap_err());
        assert_mentions(&err, &[flag, why]);
    }
}

/// Every flag that counts tokens takes `64k`/`1m` (the README's `--repeat-to 1m` used to be refused)
/// and refuses 0 or a fraction by name, at parse time (`--stop-after 0` used to run the whole stream,
/// `--max-tokens 0` to write a result of 0 tokens).
#[test]
fn token_count_flags_take_suffixes_and_refuse_zero() {
    use clap::Parser;
    let t = tiny();
    let m = t.to_str().unwrap();
    let flags: [(&str, &[&str]); 3] = [
        ("ppl", &["--max-tokens", "--repeat-to", "--bucket", "--train-len", "--checkpoint-every", "--stop-after"]),
        ("probe", &["--max-tokens", "--every", "--train-len", "--stop-after"]),
        ("bench", &["--tokens"]),
    ];
    for (cmd, flags) in flags {
        for flag in flags {
            for (bad, want) in
                [("0", "'0' is not a whole number"), ("1.5", "'1.5' is not a whole"), ("x", "not a token")]
            {
                let args = ["stuffed", cmd, "--model", m, "--newlines", flag, bad];
                let args = if cmd == "bench" { vec!["stuffed", cmd, flag, bad] } else { args.to_vec() };
                let err = Cli::try_parse_from(args).unwrap_err().to_string();
                let first = err.lines().next().unwrap();
                assert_mentions(first, &[flag, want]);
            }
            let args = ["stuffed", cmd, "--model", m, "--newlines", flag, "1k"];
            let args = if cmd == "bench" { vec!["stuffed", cmd, flag, "1k"] } else { args.to_vec() };
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{cmd} {flag} 1k: {e}"));
        }
    }
    let (dir, text) = text_file("t.txt", "A short text, repeated to a thousand tokens.");
    let (out, neox) = (dir.path().join("o"), tiny().with_file_name("mamba2_neox_tiny"));
    let (neox, text, o) = (neox.to_str().unwrap(), text.to_str().unwrap(), out.to_str().unwrap());
    cli(&["ppl", "--model", neox, "--text", text, "--repeat-to", "1k", "--out", o]).unwrap();
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let acc = &r["runs"][0]["acc"];
    assert_eq!((acc["tokens_fed"].as_u64(), acc["count"].as_u64()), (Some(1024), Some(1023)), "{acc}");
}

/// Sizes that would not fit in memory are one error line before anything allocates them (a window
/// of 10⁹ tokens, a passkey length of 10¹⁴, a --chunk of 4·10⁹ and 10¹¹ samples used to abort on a
/// failed allocation).
#[test]
fn huge_sizes_are_errors_not_aborts() {
    let mut m = Model::load(&tiny()).unwrap();
    // The tiny model caches over 1 KB a token: 1/256 of the memory in tokens is several times too much.
    let r = (stuffed::report::mem_total_bytes().unwrap() / 256).min(1 << 32);
    let spec = stuffed::forget::ForgetSpec::parse(&format!("window:r={r}")).unwrap();
    assert_mentions(&format!("{:#}", m.set_forget(spec).unwrap_err()), &["--forget window:r=", "GiB", "memory"]);
    let state = m.net().state_len();
    m.set_forget(stuffed::forget::ForgetSpec::parse("window:r=64").unwrap()).unwrap();
    assert!(m.net().state_len() > state, "a refused window leaves the model usable");
    let err = format!("{:#}", stuffed::forget::ForgetSpec::parse("window:r=1e11").unwrap_err());
    assert_mentions(&err, &["--forget window:r=1e11", "longer than the 4294967296 tokens"]);
    let t = tiny();
    for lengths in ["99999999999999", "99999999999999999m", "1k..99999999999999:x2"] {
        let err = format!("{:#}", cli(&["passkey", "--model", t.to_str().unwrap(), "--lengths", lengths]).unwrap_err());
        assert_mentions(&err, &["longer than the 4294967296 tokens"]);
    }
    let (dir, text) = text_file("t.txt", "Some text to score.");
    let (m, tx, o) = (t.to_str().unwrap(), text.to_str().unwrap(), dir.path().to_str().unwrap());
    for (chunk, want) in
        [("99999999999", "longer than the 4294967296 tokens"), ("4000000000", "more than this machine's memory")]
    {
        let err = format!("{:#}", cli(&["ppl", "--model", m, "--text", tx, "--chunk", chunk, "--out", o]).unwrap_err());
        assert_mentions(&err, &["--chunk", want]);
    }
    let err =
        format!("{:#}", cli(&["passkey", "--model", m, "--lengths", "1k", "--samples", "99999999999"]).unwrap_err());
    assert_mentions(&err, &["--samples", "at most"]);
}

/// A bad model after good ones fails before any of them runs, not after their work.
#[test]
fn a_bad_later_model_fails_first() {
    let (dir, text) = text_file("t.txt", "Some text to score, long enough for a few tokens.");
    let (nll, out) = (dir.path().join("nll"), dir.path().join("o"));
    let t = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba2_neox_tiny");
    let args =
        ["ppl", "--model", t.to_str().unwrap(), "--model", "/nonexistent/model", "--text", text.to_str().unwrap()];
    let err = format!(
        "{:#}",
        cli(&[&args[..], &["--nll-out", nll.to_str().unwrap(), "--out", out.to_str().unwrap()]].concat()).unwrap_err()
    );
    assert_mentions(&err, &["/nonexistent/model"]);
    assert!(!nll.exists(), "the first model ran before the second was checked");
}

/// The error of feeding `ids` through a fresh session of `chunk` tokens a call.
fn feed_err(dir: &Path, chunk: usize, ids: &[u32]) -> String {
    let m = Model::load(dir).unwrap();
    let mut s = stuffed::session::Session::new(&m, chunk);
    format!("{:#}", s.feed(ids, &mut |_, _| Ok(())).unwrap_err())
}

/// A NaN in the weights reaches the state: the run stops with a clear error naming the layer, not garbage
/// — in the chunked form and the token step (which checks the SSM state as it writes it): a NaN in
/// xBC reaches the conv and the SSM state, one in A_log only the SSM state (else the layer's output
/// would be named instead).
#[test]
fn nan_in_state_is_an_error() {
    for (tensor, index) in [("in_proj.weight", 200 * 64), ("A_log", 0)] {
        let dir = copy_tiny();
        rewrite(dir.path(), |name, data, _| {
            if name == format!("backbone.layers.0.mixer.{tensor}") {
                data[index] = f32::NAN;
            }
            true
        });
        for chunk in [16, 1] {
            let err = feed_err(dir.path(), chunk, &[1, 2, 3]);
            let want = ["non-finite", "layer 0's state", "position", dir.path().to_str().unwrap()];
            assert!(want.iter().all(|w| err.contains(w)), "{tensor}, chunk {chunk}: {err}");
        }
    }
}

/// The GLA-family token steps (RWKV-6, GLA, HGRN-2) check the heads' matrices as they write them and
/// the rest of the layer state after the layer (instead of reading the whole state once more): a
/// NaN reaching the matrices (through a key, a decay or an input), or only the rest (RWKV's channel
/// mix shift row through LN2, GLA's query conv history through q_proj), names layer 0's state in
/// the step as in the chunked form. GLA's decay through `clamp_min` keeps a NaN, as torch's does.
#[test]
fn gla_family_nan_in_state_is_an_error() {
    for (case, tensor) in [
        ("rwkv6_tiny_hf", "rwkv.blocks.0.attention.key.weight"),
        ("rwkv6_tiny_hf", "rwkv.blocks.0.attention.time_decay"),
        ("rwkv6_tiny_hf", "rwkv.blocks.0.ln2.weight"),
        ("gla_tiny", "model.layers.0.attn.k_proj.weight"),
        ("gla_tiny", "model.layers.0.attn.gk_proj.1.bias"),
        ("gla_tiny", "model.layers.0.attn.q_proj.weight"),
        ("hgrn2_tiny", "model.layers.0.attn.f_proj.weight"),
        ("hgrn2_tiny", "model.layers.0.attn.i_proj.weight"),
    ] {
        let dir = poisoned(case, tensor, 0, f32::NAN);
        for chunk in [256, 1] {
            let err = feed_err(dir.path(), chunk, &[7, 8, 9]);
            assert_mentions(&err, &["non-finite", "layer 0's state", dir.path().to_str().unwrap()]);
        }
    }
}

/// A NaN or infinity anywhere in the forward stops it at the first place it appears, named with the
/// layer (or the embedding / final norm) and the stream position, in the chunked and the step form.
#[test]
fn non_finite_hidden_rows_name_the_layer_and_position() {
    let neox = "mamba2_neox_tiny";
    for (case, tensor, index, value, want) in [
        (neox, "backbone.layers.1.mixer.out_proj.weight", 5, f32::NAN, "layer 1's output at position 0"),
        (neox, "backbone.norm_f.weight", 3, f32::INFINITY, "the final norm at position 0"),
        // Row 9 of the (tied) embedding: the tokens before it are fine.
        (neox, "backbone.embeddings.weight", 9 * 32, f32::NAN, "the embedding at position 2"),
        ("rwkv6_tiny_hf", "rwkv.blocks.1.feed_forward.value.weight", 0, f32::NAN, "layer 1's output at position 0"),
        ("hgrn2_tiny", "model.layers.1.mlp.down_proj.weight", 0, f32::NAN, "layer 1's output at position 0"),
        // Through a ReLU (torch keeps the NaN; `f32::max` dropped it, and the output was finite).
        ("rwkv6_tiny_hf", "rwkv.blocks.0.feed_forward.key.weight", 0, f32::NAN, "layer 0's output at position 0"),
        ("rwkv7_tiny_fla", "model.layers.0.ffn.key.weight", 0, f32::NAN, "layer 0's output at position 0"),
        ("gla_tiny_relu", "model.layers.0.attn.q_proj.weight", 0, f32::NAN, "layer 0's output at position 0"),
    ] {
        let dir = poisoned(case, tensor, index, value);
        for chunk in [256, 1] {
            let err = feed_err(dir.path(), chunk, &[7, 8, 9]);
            assert_mentions(&err, &["non-finite", want, dir.path().to_str().unwrap()]);
        }
    }
}

/// A NaN logit (a poisoned LM-head row) stops every command that reads logits with one line naming
/// the model, the position and the id — never a NaN mean with a verdict, never NaN logits with exit 0.
#[test]
fn non_finite_logits_stop_every_command() {
    // The NeoX tiny model ties its head to the embedding: row 50,000 is never an input here.
    let dir = poisoned("mamba2_neox_tiny", "backbone.embeddings.weight", 50_000 * 32 + 4, f32::NAN);
    let (m, out) = (dir.path().to_str().unwrap(), tempfile::tempdir().unwrap());
    let o = out.path().to_str().unwrap();
    let text = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../host/assets/corpus/austen_persuasion.txt");
    let want = ["non-finite logit at position 0 (id 50000)", m];
    let ppl = ["ppl", "--model", m, "--text", text.to_str().unwrap(), "--max-tokens", "300", "--train-len", "64"];
    let err = format!("{:#}", cli(&[&ppl[..], &["--out", o]].concat()).unwrap_err());
    assert_mentions(&err, &want);
    assert!(!out.path().join("results.json").exists(), "a NaN run wrote results");
    let ids = out.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3").unwrap();
    let logits_out = out.path().join("logits.safetensors");
    let logits = ["logits", "--model", m, "--ids", ids.to_str().unwrap(), "--out", logits_out.to_str().unwrap()];
    for chunk in ["256", "1"] {
        let err = format!("{:#}", cli(&[&logits[..], &["--chunk", chunk]].concat()).unwrap_err());
        assert_mentions(&err, &want);
        assert!(!logits_out.exists(), "NaN logits were written");
    }
    let err = format!("{:#}", cli(&["generate", "--model", m, "--prompt", "Hello", "--max-new", "2"]).unwrap_err());
    assert_mentions(&err, &["non-finite logit at position", "(id 50000)", m]);
    let pk = ["passkey", "--model", m, "--lengths", "256", "--samples", "1", "--out", o];
    let err = format!("{:#}", cli(&pk).unwrap_err());
    assert_mentions(&err, &["non-finite", "(id 50000)", m]);
}

/// Without the `cuda` feature, `--device cuda` is one line saying how to get it; bad GPU options are
/// one line too.
#[test]
#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn device_cuda_without_the_feature() {
    let ids = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ids.path(), "1 2 3").unwrap();
    let out = tempfile::tempdir().unwrap();
    let (m, i, o) = (tiny(), ids.path().to_path_buf(), out.path().join("l.safetensors"));
    let args = ["stuffed", "logits", "--model", m.to_str().unwrap(), "--ids", i.to_str().unwrap()];
    let run_err = |extra: &[&str]| {
        let a: Vec<&str> = args.iter().chain(["--out", o.to_str().unwrap()].iter()).chain(extra).copied().collect();
        format!("{:#}", stuffed::cli::parse_from(a).and_then(run).unwrap_err())
    };
    assert_mentions(&run_err(&["--device", "cuda"]), &["built without CUDA", "--features cuda"]);
    assert_mentions(&run_err(&["--device", "cuda", "--max-gpu-mem", "lots"]), &["'lots' is not a size"]);
}

/// A torn or foreign checkpoint file is one error line naming it, for every command that resumes.
#[test]
fn corrupt_checkpoints_are_named() {
    let (dir, text) = text_file("t.txt", &"Some text to score, long enough for a few tokens. ".repeat(20));
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba2_neox_tiny");
    let (m, t) = (m.to_str().unwrap(), text.to_str().unwrap());
    let cases: [(&str, Vec<&str>); 3] = [
        ("ppl", vec!["ppl", "--model", m, "--text", t]),
        ("probe", vec!["probe", "--model", m, "--text", t]),
        ("passkey", vec!["passkey", "--model", m, "--lengths", "1k", "--samples", "2"]),
    ];
    for (cmd, args) in cases {
        let out = dir.path().join(cmd);
        std::fs::create_dir_all(&out).unwrap();
        let ckpt = out.join(format!("{cmd}.checkpoint.safetensors"));
        for bytes in [&b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"[..], b""] {
            std::fs::write(&ckpt, bytes).unwrap();
            let o = out.to_str().unwrap();
            let err = format!("{:#}", cli(&[&args[..], &["--out", o, "--resume"]].concat()).unwrap_err());
            assert_mentions(&err, &[ckpt.to_str().unwrap(), "corrupt checkpoint"]);
        }
    }
}

/// Writes the tensors of golden model `src` (as stored) to `dir/model.safetensors` beside its
/// config.json with `cfg` applied, leaving out the tensors `keep` refuses and adding `extra`
/// (f32, every element 0.1).
fn rewrite_model(
    src: &str,
    dir: &Path,
    cfg: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
    extra: &[(String, Vec<usize>)],
) {
    let from = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data").join(src);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    cfg(&mut json);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let ck = Checkpoint::open(&from).unwrap();
    let mut kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ck.names().filter(|n| keep(n)) {
        let v = ck.require(name).unwrap();
        let dt = match v.dtype {
            stuffed::checkpoint::DType::F32 => safetensors::Dtype::F32,
            stuffed::checkpoint::DType::BF16 => safetensors::Dtype::BF16,
            other => panic!("{name}: {other}"),
        };
        kept.push((name.to_string(), dt, v.shape.to_vec(), v.bytes.to_vec()));
    }
    for (name, shape) in extra {
        let bytes = vec![0.1f32; shape.iter().product()].iter().flat_map(|x| x.to_le_bytes()).collect();
        kept.push((name.clone(), safetensors::Dtype::F32, shape.clone(), bytes));
    }
    let views: Vec<_> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// The error of loading `src` rewritten by [`rewrite_model`], with the temp dir's path.
fn rewritten_err(
    src: &str,
    cfg: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
    extra: &[(String, Vec<usize>)],
) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    rewrite_model(src, dir.path(), cfg, keep, extra);
    (load_err(dir.path()), dir.path().display().to_string())
}

/// `mixer.conv1d.bias`: promised by HF `use_conv_bias` and official `ssm_cfg.conv_bias` (both true
/// by default, as in the golden configs: the official one does not state it). Missing, it was
/// read as zero; one the config rules out would be used although the reference ignores it.
#[test]
fn a_conv_bias_the_config_promises_is_required() {
    let no_conv_bias = |n: &str| n != "backbone.layers.1.mixer.conv1d.bias";
    for (src, field) in
        [("mamba2_hf_g1_untied", "use_conv_bias = true"), ("mamba2_official", "ssm_cfg.conv_bias = true")]
    {
        let (err, dir) = rewritten_err(src, |_| {}, no_conv_bias, &[]);
        assert_mentions(&err, &[&dir, "missing tensor backbone.layers.1.mixer.conv1d.bias", field, "config.json"]);
    }
    let (err, _) = rewritten_err("mamba2_hf_g1_untied", |c| c["use_conv_bias"] = false.into(), |_| true, &[]);
    assert_mentions(&err, &["model.safetensors", "backbone.layers.0.mixer.conv1d.bias", "use_conv_bias = false"]);
    // Stated false and absent: loads.
    let dir = tempfile::tempdir().unwrap();
    rewrite_model(
        "mamba2_hf_g1_untied",
        dir.path(),
        |c| c["use_conv_bias"] = false.into(),
        |n| !n.ends_with("conv1d.bias"),
        &[],
    );
    Model::load(dir.path()).unwrap();
}

/// `mixer.in_proj.bias` and `mixer.out_proj.bias`: promised by HF `use_bias` / official
/// `ssm_cfg.bias` (false by default). Missing, they were read as zero.
#[test]
fn projection_biases_the_config_promises_are_required() {
    // The tiny model: in_proj has 2·128 + 2·16 + 8 = 296 rows, d_model 64.
    let in_bias = |l: usize| (format!("backbone.layers.{l}.mixer.in_proj.bias"), vec![296]);
    let out_bias = |l: usize| (format!("backbone.layers.{l}.mixer.out_proj.bias"), vec![64]);
    let set_hf = |c: &mut serde_json::Value| c["use_bias"] = true.into();
    let (err, dir) = rewritten_err("mamba2_hf_g1_untied", set_hf, |_| true, &[]);
    assert_mentions(&err, &[&dir, "missing tensor backbone.layers.0.mixer.in_proj.bias", "use_bias = true"]);
    let (err, _) = rewritten_err("mamba2_hf_g1_untied", set_hf, |_| true, &[in_bias(0), in_bias(1)]);
    assert_mentions(&err, &["missing tensor backbone.layers.0.mixer.out_proj.bias", "use_bias = true"]);
    let set_official = |c: &mut serde_json::Value| c["ssm_cfg"]["bias"] = true.into();
    let (err, _) = rewritten_err("mamba2_official", set_official, |_| true, &[]);
    assert_mentions(&err, &["missing tensor backbone.layers.0.mixer.in_proj.bias", "ssm_cfg.bias = true"]);
    // Present while the config says false.
    let (err, _) = rewritten_err("mamba2_hf_g1_untied", |_| {}, |_| true, &[out_bias(1)]);
    assert_mentions(&err, &["backbone.layers.1.mixer.out_proj.bias", "is present", "use_bias = false"]);
    // Stated and present: loads.
    let dir = tempfile::tempdir().unwrap();
    let all = [in_bias(0), out_bias(0), in_bias(1), out_bias(1)];
    rewrite_model("mamba2_hf_g1_untied", dir.path(), set_hf, |_| true, &all);
    Model::load(dir.path()).unwrap();
}

/// Official `ssm_cfg` flags that decide which tensors (and shapes) a layer has: `D_has_hdim`
/// promises `mixer.D` of `[d_inner]`; `rmsnorm = false` means no `mixer.norm.weight` (unsupported).
#[test]
fn official_config_flags_match_the_weights() {
    let (err, _) = rewritten_err("mamba2_official", |c| c["ssm_cfg"]["D_has_hdim"] = true.into(), |_| true, &[]);
    assert_mentions(&err, &["backbone.layers.0.mixer.D", "[8]", "expected [128]"]);
    let (err, _) = rewritten_err("mamba2_official", |c| c["ssm_cfg"]["rmsnorm"] = false.into(), |_| true, &[]);
    assert_mentions(&err, &["config.json", "ssm_cfg.rmsnorm = false", "not supported"]);
}

/// HGRN-2 `attnres_block_size` adds tensors (`attn_res_proj`, `res_norm`, …) and changes the
/// residual stream; it was ignored.
#[test]
fn hgrn2_attention_residuals_are_refused() {
    let (err, _) = rewritten_err("hgrn2_tiny", |c| c["attnres_block_size"] = 2.into(), |_| true, &[]);
    assert_mentions(&err, &["config.json", "attnres_block_size", "not supported"]);
}

/// Config fields that change the math or state sizes the weights contradict are refused naming
/// the field: HGRN-2 norms without weights (was "missing tensor g_norm.weight"), another MLP
/// activation or width; HF-RWKV sizes and a GroupNorm divisor other than 8 (were ignored).
#[test]
fn config_fields_the_weights_contradict_are_refused() {
    use serde_json::Value;
    type Edit = fn(&mut Value);
    let cases: &[(&str, Edit, &[&str])] = &[
        ("hgrn2_tiny", |c| c["elementwise_affine"] = false.into(), &["elementwise_affine = false", "not supported"]),
        ("hgrn2_tiny", |c| c["hidden_act"] = "gelu".into(), &["hidden_act \"gelu\"", "not supported"]),
        ("hgrn2_tiny", |c| c["intermediate_size"] = 128.into(), &["intermediate_size 128", "256"]),
        ("rwkv6_tiny_hf", |c| c["hidden_size"] = 128.into(), &["hidden_size 128", "weights have 64"]),
        ("rwkv6_tiny_hf", |c| c["head_size"] = 32.into(), &["head_size 32", "weights have 16"]),
        ("rwkv6_tiny_hf", |c| c["attention_hidden_size"] = 32.into(), &["attention_hidden_size 32", "64"]),
        ("rwkv6_tiny_hf", |c| c["intermediate_size"] = 256.into(), &["intermediate_size 256", "224"]),
        ("rwkv5_tiny_hf", |c| c["head_size_divisor"] = 4.into(), &["head_size_divisor 4", "not supported"]),
    ];
    for &(src, edit, want) in cases {
        let (err, _) = rewritten_err(src, edit, |_| true, &[]);
        assert_mentions(&err, &[&["config.json"], want].concat());
    }
    // What the released configs say still loads (silu, a null intermediate_size, divisor 8).
    for (src, edit) in [
        ("hgrn2_tiny", (|c| c["hidden_act"] = "silu".into()) as Edit),
        ("hgrn2_tiny", |c| c["intermediate_size"] = Value::Null),
        ("rwkv6_tiny_hf", |c| c["intermediate_size"] = Value::Null),
    ] {
        let dir = tempfile::tempdir().unwrap();
        rewrite_model(src, dir.path(), edit, |_| true, &[]);
        Model::load(dir.path()).unwrap_or_else(|e| panic!("{src}: {e:#}"));
    }
}

/// Tensors each family requires (they were already refused when missing): layer-0-only LN0
/// (RWKV `.pth` and HF names), HGRN-2 `lower_bounds` under `use_lower_bound`, an untied lm_head
/// (Mamba-2 HF, HGRN-2); and the genuinely optional ones: a tied lm_head.
#[test]
fn tensors_every_family_requires() {
    let cases: &[(&str, &str)] = &[
        ("rwkv6_tiny_hf", "rwkv.blocks.0.pre_ln.weight"),
        ("rwkv6_tiny_hf", "rwkv.blocks.1.attention.time_maa_w2"),
        ("hgrn2_tiny", "model.lower_bounds"),
        ("hgrn2_tiny", "lm_head.weight"),
        ("mamba2_hf_g1_untied", "lm_head.weight"),
    ];
    for &(src, tensor) in cases {
        let (err, dir) = rewritten_err(src, |_| {}, |n| n != tensor, &[]);
        assert_mentions(&err, &[&dir, &format!("missing tensor {tensor}")]);
    }
    let dir = tempfile::tempdir().unwrap();
    rewrite_model(
        "hgrn2_tiny",
        dir.path(),
        |c| c["use_lower_bound"] = false.into(),
        |n| n != "model.lower_bounds",
        &[],
    );
    Model::load(dir.path()).unwrap();
    rewrite_model("hgrn2_tiny", dir.path(), |c| c["tie_word_embeddings"] = true.into(), |n| n != "lm_head.weight", &[]);
    Model::load(dir.path()).unwrap();
    rewrite_model("mamba2_hf_g2_tied", dir.path(), |_| {}, |n| n != "lm_head.weight", &[]);
    Model::load(dir.path()).unwrap();
}

/// Mamba-1 (HF and official layouts): an unknown variant, a missing or misshapen tensor, and config
/// sizes the weights contradict are one line naming the file and the problem.
#[test]
fn mamba1_bad_input() {
    use serde_json::Value;
    type Edit = fn(&mut Value);
    let cases: &[(&str, Edit, &[&str])] = &[
        ("mamba1_official", |c| c["ssm_cfg"]["layer"] = "Mamba3".into(), &["config.json", "ssm_cfg.layer", "Mamba3"]),
        ("mamba1_hf", |c| c["model_type"] = "falcon_h1".into(), &["config.json", "unknown architecture 'falcon_h1'"]),
        ("mamba1_hf", |c| c["state_size"] = 8.into(), &["config.json", "state_size is 8 but the weights have 7"]),
        (
            "mamba1_hf",
            |c| c["time_step_rank"] = 6.into(),
            &["config.json", "time_step_rank is 6 but the weights have 5"],
        ),
        ("mamba1_hf", |c| c["hidden_act"] = "gelu".into(), &["config.json", "hidden_act 'gelu'", "not supported"]),
        ("mamba1_official", |c| c["ssm_cfg"]["dt_rank"] = 4.into(), &["config.json", "ssm_cfg.dt_rank is 4", "have 3"]),
        ("mamba1_official", |c| c["d_intermediate"] = 8.into(), &["config.json", "d_intermediate", "not supported"]),
        (
            "mamba1_official",
            |c| c["ssm_cfg"]["conv_bias"] = false.into(),
            &["conv1d.bias", "ssm_cfg.conv_bias = false"],
        ),
    ];
    for &(src, edit, want) in cases {
        let (err, _) = rewritten_err(src, edit, |_| true, &[]);
        assert_mentions(&err, want);
    }
    for (src, tensor) in [
        ("mamba1_hf", "backbone.layers.1.mixer.x_proj.weight"),
        ("mamba1_hf", "backbone.layers.0.mixer.dt_proj.bias"),
        ("mamba1_hf", "lm_head.weight"),
        ("mamba1_official", "backbone.norm_f.weight"),
    ] {
        let (err, dir) = rewritten_err(src, |_| {}, |n| n != tensor, &[]);
        assert_mentions(&err, &[&dir, &format!("missing tensor {tensor}")]);
    }
    // Misshapen: x_proj of 3 rows (R + 2N = 19), a 1-D D of the wrong length.
    let x = "backbone.layers.1.mixer.x_proj.weight";
    let (err, _) = rewritten_err("mamba1_hf", |_| {}, |n| n != x, &[(x.into(), vec![3, 80])]);
    assert_mentions(&err, &["model.safetensors", x, "[3, 80]", "expected [19, 80]"]);
    let dd = "backbone.layers.0.mixer.D";
    let (err, _) = rewritten_err("mamba1_hf", |_| {}, |n| n != dd, &[(dd.into(), vec![79])]);
    assert_mentions(&err, &["model.safetensors", dd, "[79]", "expected [80]"]);
    // The tiny model's 256 rows and the GPT-NeoX tokenizer it defaults to: ids past the rows are
    // refused naming the rows, before any work.
    let text = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../host/assets/corpus/austen_persuasion.txt");
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba1_hf");
    let out = tempfile::tempdir().unwrap();
    let e = cli(&[
        "ppl",
        "--model",
        m.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--max-tokens",
        "100",
        "--out",
        out.path().to_str().unwrap(),
    ])
    .unwrap_err();
    assert_mentions(&format!("{e:#}"), &["out of range", "256 rows"]);
}

/// `tests/data/rwkv7_tiny`'s tensors (BlinkDL names) as `dir/model.safetensors` beside a
/// config.json naming rwkv7 (the loader reads them as it reads the `.pth`), leaving out the
/// tensors `keep` refuses and adding `extra` (f32, every element 0.1); returns the load error.
fn rwkv7_err(keep: impl Fn(&str) -> bool, extra: &[(&str, Vec<usize>)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/rwkv7_tiny/model.pth")).unwrap();
    let mut kept: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ck.names().filter(|n| keep(n)) {
        let v = ck.require(name).unwrap();
        kept.push((name.to_string(), v.shape.to_vec(), v.bytes.to_vec()));
    }
    for (name, shape) in extra {
        let bytes = vec![0.1f32; shape.iter().product()].iter().flat_map(|x| x.to_le_bytes()).collect();
        kept.push((name.to_string(), shape.clone(), bytes));
    }
    let views: Vec<_> = kept
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "rwkv7"}"#).unwrap();
    (load_err(dir.path()), dir.path().display().to_string())
}

/// RWKV-7: the final x070 layout loads (layer 0's v0/v1/v2 present or absent: the golden cases);
/// pre-release x070 files and the v7a / v7b variants, missing and misshapen tensors (a LoRA of
/// another rank, a `.pth` LoRA stored the fla way round) are refused in one line naming the file.
#[test]
fn rwkv7_variants_and_bad_tensors_are_refused() {
    let all = |_: &str| true;
    let cases: &[(&str, Vec<usize>, &[&str])] = &[
        ("blocks.0.att.time_aaa_w1", vec![128, 32], &["pre-release RWKV-7", "time_aaa_w1"]),
        ("blocks.1.ffn.s_emb.weight", vec![256, 32], &["RWKV-7a (DeepEmbed", "ffn.s_emb.weight", "not supported"]),
        ("blocks.0.qkv.qq.weight", vec![128, 256], &["RWKV-7b (DEA", "qkv.qq.weight", "not supported"]),
    ];
    for (name, shape, want) in cases {
        let (err, dir) = rwkv7_err(all, &[(name, shape.clone())]);
        assert_mentions(&err, &[&[dir.as_str()], *want].concat());
    }
    for missing in ["blocks.1.att.v1", "blocks.0.att.k_k", "blocks.1.att.r_k", "ln_out.bias"] {
        let (err, dir) = rwkv7_err(|n| n != missing, &[]);
        assert_mentions(&err, &[&dir, &format!("missing tensor {missing}")]);
    }
    let reshaped: &[(&str, Vec<usize>, &[&str])] = &[
        ("blocks.1.att.g2", vec![30, 128], &["blocks.1.att.g2", "[30, 128]", "expected [36, 128]"]),
        ("blocks.1.att.w1", vec![24, 128], &["blocks.1.att.w1", "[24, 128]", "expected [128, 24]"]),
        ("blocks.0.att.w1", vec![24, 128], &["blocks.0.att.w1", "rank-D LoRA", "input side"]),
        ("blocks.1.att.r_k", vec![4, 32], &["blocks.1.att.r_k", "[4, 32]", "expected [2, 64]"]),
        ("blocks.1.ffn.value.weight", vec![128, 100], &["blocks.1.ffn.value.weight", "expected [128, 200]"]),
    ];
    for (name, shape, want) in reshaped {
        let (err, dir) = rwkv7_err(|n| n != *name, &[(name, shape.clone())]);
        assert_mentions(&err, &[&[dir.as_str()], *want].concat());
    }
}

/// RWKV-7 fla / HF config fields that change the math or contradict the weights are refused
/// naming the field; a tokenizer with more ids than the embedding's rows is refused.
#[test]
fn rwkv7_fla_config_and_tokenizer_mismatches_are_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: &[(Edit, &[&str])] = &[
        (|c| c["decay_low_rank_dim"] = 64.into(), &["decay_low_rank_dim 64", "weights have 24"]),
        (|c| c["v_low_rank_dim"] = 16.into(), &["v_low_rank_dim 16", "weights have 12"]),
        (|c| c["num_heads"] = 4.into(), &["num_heads 4", "weights have 2"]),
        (|c| c["intermediate_size"] = 512.into(), &["intermediate_size 512", "weights have 200"]),
        (|c| c["num_hidden_layers"] = 3.into(), &["3 layers", "fewer"]),
        (|c| c["hidden_act"] = "gelu".into(), &["hidden_act \"gelu\"", "not supported"]),
        (|c| c["norm_bias"] = false.into(), &["norm_bias = false", "not supported"]),
        (|c| c["norm_first"] = false.into(), &["norm_first = false", "not supported"]),
        (|c| c["value_dim"] = serde_json::json!([128, 64]), &["value_dim", "not supported"]),
    ];
    for &(edit, want) in cases {
        let (err, _) = rewritten_err("rwkv7_tiny_fla", edit, |_| true, &[]);
        assert_mentions(&err, &[&["config.json"], want].concat());
    }
    let (err, dir) = rewritten_err("rwkv7_tiny_fla", |_| {}, |n| n != "model.layers.1.attn.v_lora.lora.2.bias", &[]);
    assert_mentions(&err, &[&dir, "missing tensor model.layers.1.attn.v_lora.lora.2.bias"]);
    // 256 rows: GPT-NeoX-20B's 50,277 ids do not fit.
    let m = Model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/rwkv7_tiny")).unwrap();
    let neox = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../host/assets/20B_tokenizer.json");
    let err = format!("{:#}", m.tokenizer(Some(&neox)).err().expect("too many ids: an error"));
    assert_mentions(&err, &["rwkv7_tiny", "20B_tokenizer.json", "ids but the model's embedding has 256 rows"]);
}

/// GLA (fla 0.6.0 `GLAForCausalLM`): config values fla would compute differently, or that change
/// the math beyond what stuffed runs, are refused naming the field; missing and misshapen tensors
/// name the tensor; what fla's own configs say (defaults, null fields, the fused norm's name) loads.
#[test]
fn gla_config_and_tensors_are_checked() {
    use serde_json::Value;
    type Edit = fn(&mut Value);
    let src = "gla_tiny";
    let cases: &[(Edit, &[&str])] = &[
        (|c| c["feature_map"] = "swish".into(), &["feature_map \"swish\"", "not supported"]),
        (|c| c["hidden_act"] = "gelu".into(), &["hidden_act \"gelu\"", "not supported"]),
        (|c| c["use_gv"] = true.into(), &["use_gv = true", "not supported"]),
        (|c| c["use_gk"] = false.into(), &["use_gk = false", "not supported"]),
        (|c| c["gate_logit_normalizer"] = 8.into(), &["gate_logit_normalizer 8", "not supported"]),
        (|c| c["num_kv_heads"] = 2.into(), &["num_heads 3", "num_kv_heads 2"]),
        (|c| c["expand_k"] = 0.51.into(), &["expand_k 0.51", "not a whole number"]),
        (|c| c["clamp_min"] = 0.5.into(), &["clamp_min 0.5", "not supported"]),
        (|c| c["conv_size"] = 40.into(), &["conv_size 40", "not supported"]),
        (|c| c["attn"] = serde_json::json!({"layers": [1]}), &["attn", "not supported"]),
        (|c| c["attnres_block_size"] = 2.into(), &["attnres_block_size", "not supported"]),
        (|c| c["attn_mode"] = "parallel".into(), &["attn_mode \"parallel\""]),
        (|c| c["elementwise_affine"] = false.into(), &["elementwise_affine = false", "not supported"]),
        (|c| c["intermediate_size"] = 128.into(), &["intermediate_size 128", "136"]),
        (|c| c["use_short_conv"] = false.into(), &["use_short_conv is false", "q_conv1d"]),
        (|c| c["use_output_gate"] = false.into(), &["use_output_gate = false", "g_proj"]),
        (|c| c["num_heads"] = "three".into(), &["num_heads \"three\"", "not a count"]),
        (|c| c["num_hidden_layers"] = 3.into(), &["states 3 layers", "model.layers.2.attn_norm.weight"]),
    ];
    for &(edit, want) in cases {
        let (err, _) = rewritten_err(src, edit, |_| true, &[]);
        assert_mentions(&err, &[&["config.json"], want].concat());
    }
    // Shapes the config implies: a conv width the weights do not have, heads that split K differently.
    let (err, _) = rewritten_err(src, |c| c["conv_size"] = 4.into(), |_| true, &[]);
    assert_mentions(&err, &["model.layers.0.attn.q_conv1d.weight", "[30, 1, 3]", "expected [30, 1, 4]"]);
    let (err, _) = rewritten_err(src, |c| c["num_kv_heads"] = 3.into(), |_| true, &[]);
    assert_mentions(&err, &["model.layers.0.attn.k_conv1d.weight", "[10, 1, 3]", "expected [30, 1, 3]"]);
    for tensor in ["model.layers.1.attn.gk_proj.1.bias", "model.layers.0.attn.v_conv1d.weight", "lm_head.weight"] {
        let (err, dir) = rewritten_err(src, |_| {}, |n| n != tensor, &[]);
        assert_mentions(&err, &[&dir, &format!("missing tensor {tensor}")]);
    }
    let g_norm = "model.layers.1.attn.g_norm.weight";
    let (err, _) = rewritten_err(src, |_| {}, |n| n != g_norm, &[(g_norm.to_string(), vec![31])]);
    assert_mentions(&err, &[g_norm, "[31]", "expected [30]"]);
    let (err, _) = rewritten_err(src, |_| {}, |n| n != g_norm, &[]);
    assert_mentions(&err, &["missing tensor model.layers.1.attn.g_norm_swish_gate.weight"]);
    // Loads: fla's defaults written out, null fields, the fused norm's name, a tied head.
    let renamed = |n: &str| n.replace("g_norm.weight", "g_norm_swish_gate.weight");
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<_> = (0..2).map(|l| (renamed(&format!("model.layers.{l}.attn.g_norm.weight")), vec![30])).collect();
    rewrite_model(src, dir.path(), |_| {}, |n| !n.ends_with("g_norm.weight"), &all);
    Model::load(dir.path()).unwrap();
    for edit in [
        (|c| c["intermediate_size"] = Value::Null) as Edit,
        |c| c["num_kv_heads"] = 1.into(),
        |c| c["clamp_min"] = Value::Null,
        |c| c["gate_logit_normalizer"] = 16.into(),
        |c| c["attn_mode"] = "fused_recurrent".into(),
    ] {
        rewrite_model(src, dir.path(), edit, |_| true, &[]);
        Model::load(dir.path()).unwrap();
    }
    rewrite_model(src, dir.path(), |c| c["tie_word_embeddings"] = true.into(), |n| n != "lm_head.weight", &[]);
    Model::load(dir.path()).unwrap();
}

/// DeltaNet and Gated DeltaNet (fla 0.6.0 layout): config values fla would compute differently, or
/// that change the math beyond what the loader runs, are refused naming config.json and the field;
/// shapes the config implies are checked tensor by tensor; fla's defaults and a tied head load.
#[test]
fn delta_net_config_and_tensors_are_checked() {
    use serde_json::Value;
    type Edit = fn(&mut Value);
    let dn = "delta_net_tiny";
    let cases: &[(Edit, &[&str])] = &[
        (|c| c["qk_activation"] = "relu".into(), &["qk_activation relu", "not supported"]),
        (|c| c["qk_norm"] = "sum".into(), &["qk_norm sum", "not supported"]),
        (|c| c["use_output_norm"] = false.into(), &["use_output_norm = false", "not supported"]),
        (|c| c["hidden_act"] = "gelu".into(), &["hidden_act gelu", "not supported"]),
        (|c| c["expand_k"] = 0.51.into(), &["expand_k 0.51", "not a whole number"]),
        (|c| c["num_heads"] = 4.into(), &["key dim 30", "num_heads 4"]),
        (|c| c["conv_size"] = 40.into(), &["conv_size 40", "not supported"]),
        (|c| c["attn"] = serde_json::json!({"layers": [1]}), &["attn", "not supported"]),
        (|c| c["attnres_block_size"] = 2.into(), &["attnres_block_size", "not supported"]),
        (|c| c["attn_mode"] = "fused_chunk".into(), &["attn_mode fused_chunk"]),
        (|c| c["elementwise_affine"] = false.into(), &["elementwise_affine = false", "not supported"]),
        (|c| c["intermediate_size"] = 76.into(), &["intermediate_size 76", "75"]),
        (|c| c["use_short_conv"] = false.into(), &["use_short_conv is false", "q_conv1d"]),
        (|c| c["use_beta"] = false.into(), &["use_beta is false", "b_proj"]),
        (|c| c["use_beta"] = "yes".into(), &["use_beta \"yes\"", "not true/false"]),
        (|c| c["num_heads"] = "two".into(), &["num_heads \"two\"", "not a count"]),
        (|c| c["num_hidden_layers"] = 3.into(), &["states 3 layers", "model.layers.2.attn_norm.weight"]),
        (|c| c["hidden_size"] = 41.into(), &["hidden_size 41", "40 columns"]),
    ];
    for &(edit, want) in cases {
        let (err, _) = rewritten_err(dn, edit, |_| true, &[]);
        assert_mentions(&err, &[&["config.json"], want].concat());
    }
    let gdn = "gdn_tiny";
    let cases: &[(Edit, &[&str])] = &[
        (|c| c["num_v_heads"] = 3.into(), &["num_v_heads 3", "multiple of num_heads 2"]),
        (|c| c["expand_v"] = 1.6.into(), &["expand_v 1.6", "head_dim 6", "not a whole number"]),
        (|c| c["output_gate_activation"] = "gelu".into(), &["output_gate_activation gelu"]),
        (|c| c["use_gate"] = false.into(), &["use_gate is false", "g_proj"]),
        (|c| c["attn"] = serde_json::json!({"layers": [0]}), &["attn", "not supported"]),
        (|c| c["model_type"] = "gated_deltanet_v2".into(), &["unknown architecture 'gated_deltanet_v2'"]),
        // (A fuzz case: sizes past usize panicked with "attempt to multiply with overflow".)
        (
            |c| {
                c["num_heads"] = (1u64 << 62).into();
                c["num_v_heads"] = serde_json::Value::Null
            },
            &["the state's size overflows"],
        ),
    ];
    for &(edit, want) in cases {
        let (err, _) = rewritten_err(gdn, edit, |_| true, &[]);
        assert_mentions(&err, &[&["config.json"], want].concat());
    }
    // A decay tensor in a DeltaNet checkpoint: weights the config's math would not use.
    let a_log = [("model.layers.0.attn.A_log".to_string(), vec![2])];
    let (err, _) = rewritten_err(dn, |_| {}, |_| true, &a_log);
    assert_mentions(&err, &["config.json", "has no decay", "model.layers.0.attn.A_log"]);
    // Shapes the config implies.
    let (err, _) = rewritten_err(dn, |c| c["conv_size"] = 4.into(), |_| true, &[]);
    assert_mentions(&err, &["model.layers.0.attn.q_conv1d.weight", "[30, 1, 3]", "expected [30, 1, 4]"]);
    let (err, _) = rewritten_err(gdn, |c| c["num_v_heads"] = 2.into(), |_| true, &[]);
    assert_mentions(&err, &["model.layers.0.attn.v_conv1d.weight", "[36, 1, 4]", "expected [18, 1, 4]"]);
    for (src, tensor) in [
        (gdn, "model.layers.1.attn.A_log"),
        (gdn, "model.layers.0.attn.dt_bias"),
        (gdn, "model.layers.0.attn.a_proj.weight"),
        (dn, "model.layers.1.attn.b_proj.weight"),
        (dn, "model.layers.0.attn.v_conv1d.weight"),
        (dn, "lm_head.weight"),
    ] {
        let (err, dir) = rewritten_err(src, |_| {}, |n| n != tensor, &[]);
        assert_mentions(&err, &[&dir, &format!("missing tensor {tensor}")]);
    }
    let o_norm = "model.layers.1.attn.o_norm.weight";
    let (err, _) = rewritten_err(gdn, |_| {}, |n| n != o_norm, &[(o_norm.to_string(), vec![10])]);
    assert_mentions(&err, &[o_norm, "[10]", "expected [9]"]);
    // Loads: fla's defaults written out, null fields, the recurrent mode.
    let dir = tempfile::tempdir().unwrap();
    for edit in [
        (|c| c["intermediate_size"] = Value::Null) as Edit,
        |c| c["qk_activation"] = "silu".into(),
        |c| c["qk_norm"] = Value::Null,
        |c| c["attn_mode"] = "fused_recurrent".into(),
    ] {
        rewrite_model(dn, dir.path(), edit, |_| true, &[]);
        Model::load(dir.path()).unwrap();
    }
    for (src, edit) in [
        ("gdn_tiny_neg", (|c| c["num_v_heads"] = Value::Null) as Edit),
        (gdn, |c| c["output_gate_activation"] = "silu".into()),
    ] {
        rewrite_model(src, dir.path(), edit, |_| true, &[]);
        Model::load(dir.path()).unwrap();
    }
}

/// A saved state of another size (a forged or foreign checkpoint) is refused by the CPU backend's
/// restore in one line, not copied.
#[test]
fn restoring_a_state_of_another_size_is_an_error() {
    use stuffed::backend::{Device, GpuOptions, ScorerState};
    let m = Model::load(&tiny()).unwrap();
    let mut s = stuffed::backend::open(&m, 64, m.info.vocab_rows, Device::Cpu, GpuOptions::default()).unwrap();
    let n = s.state_len();
    let ok = ScorerState { state: vec![0.0; n], pending: Some(vec![0.0; m.info.d_model]), tau: Vec::new() };
    s.restore(&ok, 3).unwrap();
    for bad in [
        ScorerState { state: vec![0.0; n + 1], ..ok.clone() },
        ScorerState { pending: Some(vec![0.0; m.info.d_model - 1]), ..ok.clone() },
    ] {
        let e = format!("{:#}", s.restore(&bad, 3).unwrap_err());
        assert!(e.contains("a saved state of") && !e.contains('\n'), "{e}");
    }
}
