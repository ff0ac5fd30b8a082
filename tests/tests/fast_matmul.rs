//! `--fast-matmul` is process-wide (like `--threads`) and stays set, so it has this test binary to
//! itself: one test, the default run first.
use clap::Parser;
use std::path::PathBuf;
use stuffed::cli::{run, Cli};

fn ppl(model: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = root.join("host/assets/corpus/austen_persuasion.txt");
    let args = ["stuffed", "ppl", "--model", model.to_str().unwrap(), "--text", text.to_str().unwrap()];
    let more = ["--max-tokens", "300", "--out", out.to_str().unwrap()];
    run(Cli::try_parse_from([&args[..], &more[..], extra].concat()).unwrap()).unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

/// results.json records the kernel and the mode, and a fast run is another run (fingerprint).
#[test]
fn fast_matmul_is_recorded_and_changes_the_fingerprint() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-l4-t2048-a3-4m");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let exact = ppl(&model, a.path(), &[]);
    assert_eq!(exact["matmul"]["mode"], "exact", "{}", exact["matmul"]);
    let simd = stuffed::exec::default_simd(stuffed_core::exec::MatmulMode::Exact);
    assert_eq!(exact["matmul"]["simd"], simd.name());
    let fast = ppl(&model, b.path(), &["--fast-matmul"]);
    assert_eq!(fast["matmul"]["mode"], "fast", "{}", fast["matmul"]);
    assert_ne!(exact["fingerprint"], fast["fingerprint"]);
    // The same options otherwise: only the mode tells the runs apart.
    assert_eq!(exact["options"], fast["options"]);
}
