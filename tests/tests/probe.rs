//! `stuffed probe`: its statistics equal a direct computation on a small case, and the retention
//! of layer 0 equals the decay of an initial state measured through the state itself.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use stuffed::cli::{run, Cli};
use stuffed::eval::probe::stats;
use stuffed::model::Model;
use stuffed::session::Session;
use stuffed::text::{Input, TokenStream};
use stuffed::tokenizer::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// CSV rows keyed by (layer, head, t).
fn table(path: &Path) -> BTreeMap<(usize, usize, u64), Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap()),
                f[3..].iter().map(|v| v.parse().unwrap()).collect(),
            )
        })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn probe_statistics_equal_a_direct_computation() {
    let model_dir = root().join("tests/data/mamba2_neox_tiny");
    let text = root().join("host/assets/corpus/austen_persuasion.txt");
    let out = tempfile::tempdir().unwrap();
    let args = [
        "stuffed",
        "probe",
        "--model",
        model_dir.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--max-tokens",
        "200",
        "--every",
        "8",
        "--snapshot-at",
        "100,1k",
    ];
    use clap::Parser;
    run(Cli::try_parse_from([&args[..], &["--out", out.path().to_str().unwrap()]].concat()).unwrap()).unwrap();
    let st = table(&out.path().join("state_stats.csv"));
    let cv = table(&out.path().join("conv_stats.csv"));
    let ret = table(&out.path().join("retention.csv"));
    let inp = table(&out.path().join("inputs.csv"));
    assert_eq!(st.len(), 2 * 8 * 25, "2 layers × 8 heads × 25 reports");
    // A snapshot past the stream's end (1k of 200 tokens) is not taken, and probe.json says which were.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("probe.json")).unwrap()).unwrap();
    assert_eq!(meta["snapshots"], serde_json::json!([100]));

    // The same stream through a plain session, 8 tokens at a time.
    let m = Model::load(&model_dir).unwrap();
    let net = m.net();
    let tok = Tokenizer::for_model(Some(&model_dir), None).unwrap();
    let ids = TokenStream::new(&tok, &Input::File(text)).unwrap().collect_all().unwrap();
    let mut s = Session::new(&m, 64);
    for part in ids[..200].chunks(8) {
        s.feed(part, &mut |_, _| Ok(())).unwrap();
        for l in 0..2 {
            for h in 0..8 {
                let want = stats(s.state[net.head_state(l, h)].iter().copied());
                let got = &st[&(l, h, s.pos)];
                for (g, w) in got.iter().zip(want) {
                    assert!(close(*g, w, 1e-6), "state stats l{l} h{h} t{}: {got:?} vs {want:?}", s.pos);
                }
                let r = net.conv_state(l, h).unwrap();
                let mut v = Vec::new();
                r.for_each(&s.state, |x| v.push(x));
                let want = stats(v.into_iter());
                for (g, w) in cv[&(l, h, s.pos)].iter().zip(want) {
                    assert!(close(*g, w, 1e-6), "conv stats l{l} h{h}");
                }
            }
        }
    }
    // Layer 0: an initial state of ones decays by exactly α_{1:t}; the difference of two runs
    // (ones vs zeros; layer 0's inputs are the same in both) measures the retention directly.
    let (mut a, mut b) = (Session::new(&m, 64), Session::new(&m, 64));
    for h in 0..8 {
        let r = net.head_state(0, h);
        a.state[r].fill(1.0);
    }
    a.feed(&ids[..8], &mut |_, _| Ok(())).unwrap();
    b.feed(&ids[..8], &mut |_, _| Ok(())).unwrap();
    let a_log: Vec<f32> = {
        let ck = stuffed::checkpoint::Checkpoint::open(&model_dir).unwrap();
        let t = ck.require("backbone.layers.0.mixer.A_log").unwrap();
        t.as_bf16().unwrap().iter().map(|v| v.to_f32()).collect()
    };
    for h in 0..8 {
        let r = net.head_state(0, h);
        let d = (a.state[r.start] - b.state[r.start]) as f64;
        let logged = ret[&(0, h, 8)][0];
        assert!(close(d.ln(), logged, 1e-4), "head {h}: measured {} vs probe {logged}", d.ln());
        assert_eq!(ret[&(0, h, 8)][0], ret[&(0, h, 8)][1], "per-head decay: mean = max");
        // Σ log α = −exp(A_log)·Σ Δ, and the probe's Δ mean is Σ Δ / 8.
        let dt_mean = inp[&(0, h, 8)][0];
        assert!(close(-(a_log[h] as f64).exp() * dt_mean * 8.0, logged, 1e-5));
    }
}
