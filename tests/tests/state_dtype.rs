//! `--state-dtype` (issue #25): the recurrent state stored in bf16 / f16 between calls, in every
//! family through the one `Recurrent` trait; `ppl --vs-state` against two separate runs.
use std::path::{Path, PathBuf};
use stuffed::model::Model;
use stuffed::session::Session;
use stuffed::state_dtype::{round_one, StateDtype, StatePrecision, StateRound};
use stuffed_tests::cli;

const FAMILIES: [&str; 9] = ["mamba2", "rwkv5", "rwkv6", "rwkv7", "hgrn2", "mamba1", "gla", "retnet", "xlstm"];

fn synth(family: &str, dir: &Path) -> PathBuf {
    let out = dir.join(family);
    let o = out.to_str().unwrap();
    cli(&["synth", "--family", family, "--preset", "tiny", "--dtype", "f32", "--out", o]).unwrap();
    out
}

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab.min(2000) as u64) as u32
        })
        .collect()
}

/// Hidden rows of every position and the final state, `ids` fed in calls of `chunk`.
fn feed(m: &Model, chunk: usize, ids: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut s = Session::new(m, chunk);
    let mut rows = Vec::new();
    for part in ids.chunks(chunk) {
        s.feed(part, &mut |_, h| {
            rows.extend(h.iter().map(|x| x.to_bits()));
            Ok(())
        })
        .unwrap();
    }
    (rows, s.state.iter().map(|x| x.to_bits()).collect())
}

/// In every family: rounding after every token gives the same hidden rows and state, bit for bit,
/// at --chunk 64 as at --chunk 1; every recurrent-matrix value stored is a bf16 (f16) value and
/// the conv / token-shift values are not rounded unless --state-dtype-all; rounding at chunk ends
/// stores bf16 values too; and the rounded state differs from the f32 one (it did round).
#[test]
fn rounding_in_every_family() {
    let dir = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let mut m = Model::load(&synth(family, dir.path())).unwrap();
        let ids = ids(150, m.info.vocab_rows);
        let (_, f32_state) = feed(&m, 64, &ids);
        for dtype in [StateDtype::Bf16, StateDtype::F16] {
            m.state_precision = StatePrecision { dtype, round: StateRound::Token, all: false };
            let (rows64, state64) = feed(&m, 64, &ids);
            let (rows1, state1) = feed(&m, 1, &ids);
            assert!(rows64 == rows1, "{family} {dtype}: hidden rows at --chunk 64 differ from --chunk 1");
            assert!(state64 == state1, "{family} {dtype}: states at --chunk 64 differ from --chunk 1");
            assert!(state64 != f32_state, "{family} {dtype}: rounding changed nothing");
            let state: Vec<f32> = state64.iter().map(|&b| f32::from_bits(b)).collect();
            let net = m.net();
            let mut matrix = vec![false; state.len()];
            for l in 0..net.n_layer() {
                for h in 0..net.n_heads() {
                    matrix[net.head_state(l, h)].iter_mut().for_each(|x| *x = true);
                }
            }
            // Counters (RetNet's positions) are never rounded: the same as in the f32 run.
            let mut counter = vec![false; state.len()];
            for run in net.counters().layers.iter().flat_map(|r| r.ranges()) {
                counter[run].iter_mut().for_each(|x| *x = true);
            }
            let stored = |x: f32| round_one(dtype, x).to_bits() == x.to_bits();
            for (i, &x) in state.iter().enumerate() {
                if matrix[i] {
                    assert!(stored(x), "{family} {dtype}: state[{i}] = {x:e} is not a {dtype} value");
                }
            }
            let others: Vec<f32> = (0..state.len()).filter(|&i| !matrix[i] && !counter[i]).map(|i| state[i]).collect();
            if !others.is_empty() {
                assert!(others.iter().any(|&x| !stored(x)), "{family} {dtype}: conv / shift values were rounded");
            }
            // --state-dtype-all: every value; --state-round chunk: stored at the end of a call.
            for (round, all) in [(StateRound::Token, true), (StateRound::Chunk, false), (StateRound::Chunk, true)] {
                m.state_precision = StatePrecision { dtype, round, all };
                let (_, st) = feed(&m, 64, &ids);
                for (i, &b) in st.iter().enumerate() {
                    let x = f32::from_bits(b);
                    if counter[i] {
                        assert_eq!(b, f32_state[i], "{family} {dtype} {round} all={all}: counter state[{i}] moved");
                    } else if all || matrix[i] {
                        assert!(stored(x), "{family} {dtype} {round} all={all}: state[{i}] = {x:e} not stored");
                    }
                }
            }
        }
        m.state_precision = StatePrecision::default();
        assert!(feed(&m, 64, &ids).1 == f32_state, "{family}: f32 is not the plain run");
    }
}

/// An f16 state past 65504 is an error naming the position and the layer (not an infinity).
#[test]
fn f16_overflow_names_position_and_layer() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::load(&synth("mamba2", dir.path())).unwrap();
    m.state_precision = StatePrecision { dtype: StateDtype::F16, round: StateRound::Chunk, all: false };
    let ids = ids(40, m.info.vocab_rows);
    let mut s = Session::new(&m, 8);
    s.feed(&ids[..16], &mut |_, _| Ok(())).unwrap();
    let r = m.net().head_state(1, 0);
    s.state[r].iter_mut().for_each(|x| *x = 1e7);
    let e = format!("{:#}", s.feed(&ids[16..], &mut |_, _| Ok(())).unwrap_err());
    assert!(e.contains("overflows f16 after position 23 in layer 1"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

/// The shipped short-trained model (8,192-id vocab: a cheap head).
fn shipped_t64() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-l4-t64-a3-4m").display().to_string()
}

fn persuasion() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../host/assets/corpus/austen_persuasion.txt").display().to_string()
}

fn ppl(out: &Path, extra: &[&str]) -> serde_json::Value {
    let o = out.to_str().unwrap();
    let (m, t) = (shipped_t64(), persuasion());
    let mut a = vec!["ppl", "--model", &m, "--text", &t, "--max-tokens", "2000", "--chunk", "128", "--bucket", "256"];
    a.extend(["--train-len", "256", "--out", o]);
    a.extend(extra);
    cli(&a).unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

/// `--state-dtype f32` is the run without the flag: the NLL file, loss.csv and the verdict byte
/// for byte (and the fingerprint); a bf16 state changes the NLLs.
#[test]
fn f32_state_is_todays_run() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nll = |d: &Path| d.join("nll.f32").display().to_string();
    let ra = ppl(a.path(), &["--nll-out", &nll(a.path())]);
    let rb = ppl(b.path(), &["--nll-out", &nll(b.path()), "--state-dtype", "f32"]);
    let rc = ppl(c.path(), &["--nll-out", &nll(c.path()), "--state-dtype", "bf16", "--state-round", "chunk"]);
    assert_eq!(std::fs::read(nll(a.path())).unwrap(), std::fs::read(nll(b.path())).unwrap());
    let csv = |d: &Path| std::fs::read(d.join("loss.csv")).unwrap();
    assert_eq!(csv(a.path()), csv(b.path()));
    assert_eq!(ra["runs"][0]["t_forget"], rb["runs"][0]["t_forget"]);
    assert_eq!(ra["runs"][0]["precision"]["state"], "f32");
    assert_ne!(std::fs::read(nll(a.path())).unwrap(), std::fs::read(nll(c.path())).unwrap());
    assert_eq!(rc["runs"][0]["precision"]["state"], "bf16/chunk");
    assert_ne!(ra["fingerprint"], rc["fingerprint"]);
}

/// `ppl --state-dtype bf16 --vs-state f32`: each stream's bucket sums are those of a separate run
/// with its state type, bit for bit; drift.csv's ΔNLL is the difference of the two runs' means.
#[test]
fn vs_state_equals_two_separate_runs() {
    let (v, a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rv = ppl(v.path(), &["--state-dtype", "bf16", "--state-round", "chunk", "--vs-state", "f32"]);
    let ra = ppl(a.path(), &["--state-dtype", "bf16", "--state-round", "chunk"]);
    let rb = ppl(b.path(), &[]);
    assert_eq!(rv["runs"].as_array().unwrap().len(), 2);
    for (i, sep) in [(0, &ra), (1, &rb)] {
        for key in ["linear", "log2", "verdict", "sum", "count"] {
            assert_eq!(rv["runs"][i]["acc"][key], sep["runs"][0]["acc"][key], "stream {i}: {key}");
        }
        assert_eq!(rv["runs"][i]["t_forget"], sep["runs"][0]["t_forget"], "stream {i}");
    }
    let drift = &rv["runs"][0]["drift"];
    assert_eq!(drift["reference"], "f32");
    let rows = drift["buckets_linear"].as_array().unwrap();
    let (pa, pb) =
        (ra["runs"][0]["buckets_linear"].as_array().unwrap(), rb["runs"][0]["buckets_linear"].as_array().unwrap());
    assert_eq!(rows.len(), pa.len());
    for ((r, x), y) in rows.iter().zip(pa).zip(pb) {
        let f = |v: &serde_json::Value| v.as_f64().unwrap();
        let want = f(&x["mean_nll"]) - f(&y["mean_nll"]);
        assert!((f(&r["delta_nll"]) - want).abs() < 1e-9, "{r} vs {want}");
        assert!(f(&r["kl"]) >= -1e-9 && f(&r["kl"]).is_finite(), "{r}");
    }
    assert!(rows.iter().any(|r| r["delta_nll"].as_f64().unwrap() != 0.0), "bf16 changed nothing");
    let csv = std::fs::read_to_string(v.path().join("drift.csv")).unwrap();
    assert!(csv.starts_with("model,method,state,reference,scheme,start,end,count,mean_nll,mean_nll_ref,delta_nll"));
    assert!(v.path().join("drift.svg").exists());
}

/// `ppl --vs-model REF`: each stream's bucket sums are those of a separate run of its model, bit for
/// bit; drift.csv's ΔNLL is the difference of the two runs' means; a model against itself drifts by
/// exactly nothing; a reference with another vocabulary is refused in one line.
#[test]
fn vs_model_equals_two_separate_runs() {
    let long = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-l4-t2048-a3-4m");
    let long = long.display().to_string();
    let (v, a, b, s) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let rv = ppl(v.path(), &["--vs-model", &long]);
    let ra = ppl(a.path(), &[]);
    let rb = ppl(b.path(), &["--model", &long]);
    // (`ppl` names the short model first; the second --model runs after it in rb: its run is [1].)
    for (i, sep) in [(0, &ra["runs"][0]), (1, &rb["runs"][1])] {
        for key in ["linear", "log2", "sum", "count"] {
            assert_eq!(rv["runs"][i]["acc"][key], sep["acc"][key], "stream {i}: {key}");
        }
    }
    let drift = &rv["runs"][0]["drift"];
    assert_eq!(drift["reference"].as_str(), Some(long.as_str()));
    let rows = drift["buckets_linear"].as_array().unwrap();
    let (pa, pb) =
        (ra["runs"][0]["buckets_linear"].as_array().unwrap(), rb["runs"][1]["buckets_linear"].as_array().unwrap());
    assert_eq!(rows.len(), pa.len());
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    for ((r, x), y) in rows.iter().zip(pa).zip(pb) {
        let want = f(&x["mean_nll"]) - f(&y["mean_nll"]);
        assert!((f(&r["delta_nll"]) - want).abs() < 1e-9, "{r} vs {want}");
        assert!(f(&r["kl"]) > 1e-3, "two different models: {r}");
    }
    assert!(std::fs::read_to_string(v.path().join("drift.csv")).unwrap().contains(&long));
    // The model against itself: the same numbers, nothing between them.
    let rs = ppl(s.path(), &["--vs-model", &shipped_t64()]);
    for r in rs["runs"][0]["drift"]["buckets_log2"].as_array().unwrap() {
        assert!(f(&r["delta_nll"]) == 0.0 && f(&r["kl"]) == 0.0, "{r}");
    }
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba2_hf_g1_untied");
    let d = tempfile::tempdir().unwrap();
    let (m, t) = (shipped_t64(), persuasion());
    let args = ["ppl", "--model", &m, "--text", &t, "--max-tokens", "300", "--vs-model", golden.to_str().unwrap()];
    let e = format!("{:#}", cli(&[&args[..], &["--out", d.path().to_str().unwrap()]].concat()).unwrap_err());
    assert!(e.contains("must share a vocabulary") && !e.contains('\n'), "{e}");
    let e =
        format!("{:#}", cli(&[&args[..], &["--resume", "--out", d.path().to_str().unwrap()]].concat()).unwrap_err());
    assert!(e.contains("--vs-model runs two streams") && e.contains("--resume"), "{e}");
}

/// The flags refuse what they cannot do, in one line: a rounded state on CUDA, rounding flags
/// without a dtype, --vs-state with its own type or with a checkpoint.
#[test]
fn refusals() {
    let d = tempfile::tempdir().unwrap();
    let o = d.path().to_str().unwrap();
    let (m, t) = (shipped_t64(), persuasion());
    let base = ["ppl", "--model", &m, "--text", &t, "--max-tokens", "300", "--out", o];
    let err = |extra: &[&str]| format!("{:#}", cli(&[&base[..], extra].concat()).unwrap_err());
    let e = err(&["--state-dtype", "bf16", "--device", "cuda"]);
    assert!(e.contains("--state-dtype bf16: CPU only") && !e.contains('\n'), "{e}");
    assert!(err(&["--state-round", "chunk"]).contains("need --state-dtype bf16 or f16"));
    assert!(err(&["--state-dtype", "bf16", "--vs-state", "bf16"]).contains("compare two different types"));
    assert!(err(&["--state-dtype", "bf16", "--vs-state", "f32", "--resume"]).contains("does not take --resume"));
    let e = format!(
        "{:#}",
        cli(&["generate", "--model", &m, "--prompt", "a", "--state-dtype", "f16", "--device", "cuda"]).unwrap_err()
    );
    assert!(e.contains("--state-dtype f16: CPU only"), "{e}");
}

/// probe (its probed path, token by token) and passkey run with a rounded state and record it.
#[test]
fn probe_and_passkey_record_the_state_dtype() {
    let d = tempfile::tempdir().unwrap();
    let (m, t) = (shipped_t64(), persuasion());
    let (po, ko) = (d.path().join("probe"), d.path().join("pk"));
    cli(&[
        "probe",
        "--model",
        &m,
        "--text",
        &t,
        "--max-tokens",
        "300",
        "--state-dtype",
        "bf16",
        "--out",
        po.to_str().unwrap(),
    ])
    .unwrap();
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(po.join("probe.json")).unwrap()).unwrap();
    assert_eq!(p["precision"]["state"], "bf16/token");
    let pk = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-passkey");
    let a = ["passkey", "--model", pk.to_str().unwrap(), "--lengths", "256", "--samples", "2", "--max-new", "8"];
    cli(&[&a[..], &["--state-dtype", "f16", "--state-round", "chunk", "--out", ko.to_str().unwrap()]].concat())
        .unwrap();
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ko.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["precision"]["state"], "f16/chunk");
}

/// `--forget window:r=N` (or `staggered:r=N`) `--state-dtype bf16 --state-dtype-all`: the window's
/// caches are rounded but its two counters (tokens seen mod r, filled) are bookkeeping, not state,
/// and stay exact. bf16
/// holds the integers only to 256, so a ring position of 299 would be stored as 300 and the next
/// token would land in the wrong slot (it did: 256 after 276 tokens, before `Recurrent::counters`).
#[test]
fn window_counters_are_not_rounded() {
    let dir = tempfile::tempdir().unwrap();
    // (RWKV-7 and DeltaNet keep the same two counters for their two staggered states.)
    for (family, method) in [
        ("mamba2", "window"),
        ("gla", "window"),
        ("retnet", "window"),
        ("rwkv7", "staggered"),
        ("delta_net", "staggered"),
    ] {
        let mut m = Model::load(&synth(family, dir.path())).unwrap();
        m.set_forget(stuffed::forget::ForgetSpec::parse(&format!("{method}:r=300")).unwrap()).unwrap();
        let ids = ids(700, m.info.vocab_rows);
        for round in [StateRound::Token, StateRound::Chunk] {
            m.state_precision = StatePrecision { dtype: StateDtype::Bf16, round, all: true };
            let mut s = Session::new(&m, 23);
            for (i, part) in ids.chunks(23).enumerate() {
                s.feed(part, &mut |_, _| Ok(())).unwrap();
                let seen = (i * 23 + part.len()) as f32;
                let n = s.state.len();
                assert_eq!(s.state[n - 2], seen % 300.0, "{family} {round}: ring position after {seen} tokens");
                assert_eq!(s.state[n - 1], if seen >= 300.0 { 1.0 } else { 0.0 }, "{family} {round}: filled");
            }
        }
    }
}
