//! DeciMamba (`--forget decimamba`) against their code on the tiny official Mamba-1: their
//! `get_non_decimated_indices` and decimating forward put into mamba_ssm's torch paths
//! (`tools/golden_decimamba.py`, `tests/data/mamba1_official/decimamba_ref.safetensors`): the
//! tokens kept at each decimating layer, the prompt's last logits and greedy decoding after it; and
//! their rule on Mamba-2's heads against mamba_ssm's step-by-step Mamba-2.
use stuffed::backend::{open, Device};
use stuffed::checkpoint::Checkpoint;
use stuffed::forget::{ForgetSpec, Phase};
use stuffed::model::Model;
use stuffed_tests::{assert_close, cli, data, rel};

/// The scripts' cases: (decimating layers, L_base, beta, min_seq_len, resp_len: the last tokens kept).
const CASES: &[(&str, u32, f64, u32, u32)] =
    &[("0", 100, 0.5, 20, 1), ("0/1", 120, 0.5, 20, 1), ("1", 8, 0.5, 30, 1), ("0", 60, 0.5, 20, 5)];
const NEW: usize = 8;

fn spec(&(layers, base, beta, min, last): &(&str, u32, f64, u32, u32)) -> String {
    format!("decimamba:layers={layers},base={base},beta={beta},min={min},last={last}")
}

/// The NLL of each of `tokens` under the reference logits rows `(n, v)`, over all `v` rows.
fn nll_of(logits: &[f32], v: usize, tokens: &[u32]) -> Vec<f32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            let lse = m + row.iter().map(|x| ((x - m) as f64).exp()).sum::<f64>().ln() as f32;
            lse - row[t as usize]
        })
        .collect()
}

/// Mamba-1: their code (`tools/golden_decimamba.py`).
#[test]
fn decimated_prompts_answer_as_their_code() {
    check_case("mamba1_official");
}

/// Mamba-2: their rule on its heads' Δ, against mamba_ssm's `Mamba2.step()` run layer by layer with
/// the dropped tokens' SSM updates undone (`tools/golden_decimamba.py`).
#[test]
fn decimated_mamba2_prompts_answer_as_the_stepwise_reference() {
    check_case("mamba2_official");
}

fn check_case(case: &str) {
    let g = Checkpoint::open(&data(case).join("decimamba_ref.safetensors")).unwrap();
    let ints =
        |name: &str| -> Vec<u32> { g.require(name).unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect() };
    let ids = ints("input_ids");
    let plain = Model::load(&data(case)).unwrap();
    let v = plain.info.vocab_rows;
    for (c, case_) in CASES.iter().enumerate() {
        let reference = g.require(&format!("c{c}_logits")).unwrap().as_f32().unwrap().to_vec();
        let tokens = ints(&format!("c{c}_tokens"));
        let kept: Vec<Vec<u32>> = (0..case_.0.split('/').count()).map(|i| ints(&format!("c{c}_kept_l{i}"))).collect();
        let mut m = Model::load(&data(case)).unwrap();
        m.set_forget(ForgetSpec::parse(&spec(case_)).unwrap()).unwrap();
        // One call, calls cutting the prompt, token by token: the same tokens kept.
        for chunk in [512, 64, 7, 1] {
            let mut b = open(&m, chunk, v, Device::Cpu, Default::default()).unwrap();
            b.set_phase(Phase::Prompt { len: Some(ids.len() as u64) });
            let got = b.feed_decimated(&ids, None, &mut |_, _, _| Ok(())).unwrap();
            assert_eq!(got, kept, "case {c} chunk {chunk}: tokens kept per layer");
            let prompted = b.snapshot().unwrap();
            assert_eq!(b.greedy(NEW).unwrap(), tokens, "case {c} chunk {chunk}: greedy tokens");
            // The prompt's last logits and those of each decoded token, as NLLs of the tokens decoded.
            b.restore(&prompted, ids.len() as u64).unwrap();
            b.set_phase(Phase::Answer);
            let mut nll = Vec::new();
            assert!(b.score(&tokens, &mut nll).unwrap());
            assert_close(&format!("case {c} chunk {chunk} NLLs"), &nll, &nll_of(&reference, v, &tokens));
            // The decoded tokens' own logits rows.
            b.restore(&prompted, ids.len() as u64).unwrap();
            let mut rows = Vec::new();
            b.logits(&tokens, &mut |_, l| {
                rows.extend_from_slice(l);
                Ok(())
            })
            .unwrap();
            assert_close(&format!("case {c} chunk {chunk} decode logits"), &rows, &reference[v..]);
        }
        // Decimation matters here: without it the prompt answers otherwise.
        let mut p = open(&plain, 64, v, Device::Cpu, Default::default()).unwrap();
        p.feed(&ids).unwrap();
        p.set_phase(Phase::Answer);
        let mut nll = Vec::new();
        p.score(&tokens, &mut nll).unwrap();
        let e = rel(&nll, &nll_of(&reference, v, &tokens));
        assert!(e > 1e-3, "case {c}: the model without decimation gives the reference too (rel {e:.2e})");
    }
}

/// The records of a passkey grid in `out`.
fn records(out: &std::path::Path) -> Vec<serde_json::Value> {
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `passkey --forget decimamba` on a tiny synth Mamba-1 (NeoX tokenizer): each prompt runs alone
/// (nothing shared with the haystack stream), its record and the summary say the tokens kept
/// (K = base, + the last token), the answers differ from those of no decimation, a grid of no
/// decimation does not resume under it; and the refusals: a stream (ppl), OPRM, another family, a
/// layer past the model's.
#[test]
fn passkey_decimates_each_prompt_alone() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    cli(&["synth", "--family", "mamba1", "--preset", "tiny", "--dtype", "bf16", "--out", m.to_str().unwrap()]).unwrap();
    let ms = m.to_str().unwrap();
    let grid = |name: &str, forget: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let args =
            ["passkey", "--model", ms, "--lengths", "1k", "--samples", "2", "--max-new", "6", "--forget", forget];
        cli(&[&args[..], extra, &["--out", out.to_str().unwrap()]].concat()).map(|_| out)
    };
    let deci = "decimamba:layers=0,base=50";
    let out = grid("deci", deci, &[]).unwrap();
    let recs = records(&out);
    assert_eq!(recs.len(), 2);
    for r in &recs {
        let d = &r["decimated"];
        assert_eq!(d["kept"], serde_json::json!([51]), "{r}");
        assert_eq!(r["shared_prefix"], 0, "{r}");
        // The needle sentence and the question: their tokens, no more kept than they have.
        let (n, q) = (d["needle_tokens"].as_u64().unwrap(), d["question_tokens"].as_u64().unwrap());
        assert!((15..40).contains(&n) && (5..20).contains(&q), "{r}");
        assert!(d["needle_kept"][0].as_u64().unwrap() <= n && d["question_kept"][0].as_u64().unwrap() <= q);
    }
    let summary = stuffed_tests::read_json(&out.join("summary.json"));
    // Tokens processed: each prompt in two passes (one decimating layer), and up to 6 decoded.
    let prompts: u64 = recs.iter().map(|r| r["prompt_tokens"].as_u64().unwrap()).sum();
    let processed = summary["runs"][0]["tokens_processed"].as_u64().unwrap();
    assert!((2 * prompts..=2 * prompts + 12).contains(&processed), "{processed} for prompts of {prompts}");
    let row = &summary["accuracy_per_length"][0];
    assert_eq!(row["decimamba_kept"], serde_json::json!([51.0]));
    for k in ["decimamba_needle_share", "decimamba_needle_whole", "decimamba_question_whole"] {
        assert!(row[k].is_number(), "{k}: {row}");
    }
    // The mean share of the needle's tokens kept, from the records.
    let share = recs.iter().map(|r| {
        r["decimated"]["needle_kept"][0].as_f64().unwrap() / r["decimated"]["needle_tokens"].as_f64().unwrap()
    });
    assert!((row["decimamba_needle_share"].as_f64().unwrap() - share.sum::<f64>() / 2.0).abs() < 1e-12, "{row}");
    let plain = records(&grid("none", "none", &[]).unwrap());
    assert!(plain.iter().all(|r| r.get("decimated").is_none()));
    let nll = |rs: &[serde_json::Value]| rs.iter().map(|r| r["key_nll"].as_f64().unwrap() as f32).collect::<Vec<_>>();
    let e = rel(&nll(&recs), &nll(&plain));
    assert!(e > 1e-3, "decimation leaves the key NLLs as they were: rel {e:.2e}");
    // The undecimated grid's records are not this run's.
    std::fs::remove_file(dir.path().join("none/summary.json")).unwrap();
    let err = grid("none", deci, &["--resume"]).unwrap_err();
    assert!(format!("{err:#}").contains("made by another run"), "{err:#}");

    // A grid stopped after its first record resumes to the same records (the spec read back from
    // its run file).
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    std::fs::write(out.join("results.jsonl"), format!("{}\n", lines.lines().next().unwrap())).unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    grid("deci", deci, &["--resume"]).unwrap();
    assert_eq!(records(&out), recs, "resumed");

    // A record no decimated prompt could leave (more of the needle kept than it has), resealed
    // as a forger would, is refused on resume.
    let jsonl = out.join("results.jsonl");
    let mut first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    first["decimated"]["needle_kept"] = serde_json::json!([first["decimated"]["needle_tokens"].as_u64().unwrap() + 1]);
    std::fs::write(&jsonl, stuffed::report::reseal("passkey-record", first, false).unwrap() + "\n").unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let err = grid("deci", deci, &["--resume"]).unwrap_err();
    assert!(format!("{err:#}").contains("values no passkey run writes"), "{err:#}");

    let err = grid("o", deci, &["--oprm", "200"]).unwrap_err();
    assert!(format!("{err:#}").contains("choose one"), "{err:#}");
    let err = grid("s", deci, &["--state-dtype", "bf16"]).unwrap_err();
    assert!(format!("{err:#}").contains("runs with an f32 state"), "{err:#}");
    let err = grid("l", "decimamba:layers=2", &[]).unwrap_err();
    assert!(format!("{err:#}").contains("past the model's 2 layers"), "{err:#}");
    let text = stuffed_tests::persuasion();
    let err = cli(&["ppl", "--model", ms, "--text", &text, "--max-tokens", "100", "--forget", deci]).unwrap_err();
    assert!(format!("{err:#}").contains("cannot be decimated"), "{err:#}");
    let mut rwkv = Model::load(&data("rwkv6_tiny")).unwrap();
    let err = rwkv.set_forget(ForgetSpec::parse(deci).unwrap()).unwrap_err();
    assert!(format!("{err:#}").contains("ranks tokens by Mamba's Δ"), "{err:#}");
}

/// The spec: printed as it parses, and what it refuses.
#[test]
fn the_spec_round_trips_and_refuses_what_it_cannot_use() {
    for s in ["decimamba:layers=12", "decimamba:layers=3/12,base=500,beta=0.25,min=0,last=12"] {
        let spec = ForgetSpec::parse(s).unwrap();
        assert_eq!(ForgetSpec::parse(&spec.to_string()).unwrap(), spec, "{s}");
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ForgetSpec>(&json).unwrap(), spec, "{json}");
    }
    assert_eq!(
        ForgetSpec::parse("decimamba:layers=12").unwrap().to_string(),
        "decimamba:layers=12,base=6000,beta=0.5,min=20,last=1",
        "their config's defaults"
    );
    for (bad, says) in [
        ("decimamba", "missing layers="),
        ("decimamba:layers=12/3", "ascend"),
        ("decimamba:layers=1/2/3/4/5/6/7/8/9", "at most 8"),
        ("decimamba:layers=1,beta=0", "beta"),
        ("decimamba:layers=1,beta=1.5", "beta"),
        ("decimamba:layers=1,base=-1", "base"),
        ("decimamba:layers=x", "not a layer"),
        ("decimamba:layers=1,k=2", "unknown parameter"),
        ("decimamba:layers=1,last=0", "from 1 up"),
    ] {
        let err = format!("{:#}", ForgetSpec::parse(bad).unwrap_err());
        assert!(err.contains(says), "{bad}: {err}");
    }
}

/// A prompt stopped anywhere in its passes (measuring or decimating) and continued from what the
/// checkpoint keeps (progress, norms, state) ends as the uninterrupted run: the same positions
/// kept and the same greedy tokens and state after it, bit for bit; a checkpoint that does not fit
/// the prompt is refused.
#[test]
fn a_prompt_resumes_anywhere_in_its_passes() {
    use stuffed::forget::{DeciProgress, DeciResume};
    let g = Checkpoint::open(&data("mamba1_official").join("decimamba_ref.safetensors")).unwrap();
    let ids: Vec<u32> = g.require("input_ids").unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect();
    let mut m = Model::load(&data("mamba1_official")).unwrap();
    // Two decimating layers and ties budgets in play: three passes.
    m.set_forget(ForgetSpec::parse(&spec(&CASES[1])).unwrap()).unwrap();
    let v = m.info.vocab_rows;
    let run = |from: Option<DeciResume>, stop: Option<usize>| {
        let mut b = open(&m, 32, v, Device::Cpu, Default::default()).unwrap();
        b.set_phase(Phase::Prompt { len: Some(ids.len() as u64) });
        let (mut calls, mut saved) = (0, None);
        let r = b.feed_decimated(&ids, from, &mut |p: &DeciProgress, norms: &[f32], state: &[f32]| {
            calls += 1;
            if Some(calls) == stop {
                saved = Some(DeciResume { progress: p.clone(), norms: norms.to_vec(), state: state.to_vec() });
                anyhow::bail!("stopped");
            }
            Ok(())
        });
        match r {
            Ok(kept) => (Some((kept, b.greedy(NEW).unwrap(), b.snapshot().unwrap().state)), saved, calls),
            Err(e) => {
                assert!(stop.is_some(), "{e:#}");
                (None, saved, calls)
            }
        }
    };
    let (whole, _, calls) = run(None, None);
    let whole = whole.unwrap();
    assert_eq!(calls, 3 * ids.len().div_ceil(32), "a call of 32 tokens in each of three passes");
    for stop in [1, 5, 10, 12, 19, 27, calls] {
        let (none, saved, _) = run(None, Some(stop));
        assert!(none.is_none());
        let saved = saved.unwrap();
        let (resumed, _, _) = run(Some(saved), None);
        assert!(resumed.unwrap() == whole, "stopped after call {stop}: the resumed prompt ends otherwise");
    }
    let (_, saved, _) = run(None, Some(12));
    let mut bad = saved.unwrap();
    bad.state.pop();
    let mut b = open(&m, 32, v, Device::Cpu, Default::default()).unwrap();
    let err = b.feed_decimated(&ids, Some(bad), &mut |_, _, _| Ok(())).unwrap_err();
    assert!(format!("{err:#}").contains("does not fit this prompt"), "{err:#}");
}

/// A Δ that overflows in a measured layer is an error naming the layer, not a threshold of ∞
/// (which would keep nothing, or fail later without saying why).
#[test]
fn a_non_finite_delta_norm_is_an_error_naming_its_layer() {
    let bad = stuffed_tests::poisoned("mamba1_hf", "backbone.layers.1.mixer.dt_proj.bias", 3, f32::INFINITY);
    let mut m = Model::load(bad.path()).unwrap();
    m.set_forget(ForgetSpec::parse("decimamba:layers=1,base=10").unwrap()).unwrap();
    let v = m.info.vocab_rows;
    let mut b = open(&m, 16, v, Device::Cpu, Default::default()).unwrap();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 3) % 100).collect();
    b.set_phase(Phase::Prompt { len: Some(ids.len() as u64) });
    let err = b.feed_decimated(&ids, None, &mut |_, _, _| Ok(())).unwrap_err();
    assert!(format!("{err:#}").contains("a non-finite Δ norm in layer 1"), "{err:#}");
}
