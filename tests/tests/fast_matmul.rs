//! `--fast-matmul` is process-wide (like `--threads`) and stays set, so it has this test binary to
//! itself: one test, the default runs first.
use clap::Parser;
use std::path::{Path, PathBuf};
use stuffed::cli::{run, Cli};
use stuffed_core::exec::{MatmulMode, Simd};

fn ppl(model: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = root.join("host/assets/corpus/austen_persuasion.txt");
    let args = ["stuffed", "ppl", "--model", model.to_str().unwrap(), "--text", text.to_str().unwrap()];
    let more = ["--max-tokens", "300", "--out", out.to_str().unwrap()];
    run(Cli::try_parse_from([&args[..], &more[..], extra].concat()).unwrap()).unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

/// results.json records the kernel and the mode whose numbers the products have. Where
/// `--fast-matmul` rounds activations to bf16 (bf16 weights on the AVX512-BF16 and AMX levels, f32
/// weights on AMX) a fast run is another run: its own fingerprint and NLLs. Elsewhere (f32 weights
/// below AMX; any weights on AVX2, AVX-512 and portable) it is the default run, bit for bit, and
/// the record says the flag was asked and not applied — before, such a run was labelled "fast" and
/// fingerprinted apart from the identical default run.
#[test]
fn fast_matmul_is_recorded_where_it_changes_the_numbers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = tmp.path().join("bf16");
    let synth = ["stuffed", "synth", "--preset", "tiny", "--dtype", "bf16", "--out", bf16.to_str().unwrap()];
    run(Cli::try_parse_from(synth).unwrap()).unwrap();
    let models = [(root.join("models/mamba2-tiny-l4-t2048-a3-4m"), "f32"), (bf16, "bf16")];
    let out = |i: usize, mode: &str| tmp.path().join(format!("{i}-{mode}"));
    let exact: Vec<serde_json::Value> =
        models.iter().enumerate().map(|(i, (m, _))| ppl(m, &out(i, "exact"), &[])).collect();
    let simd = stuffed::exec::default_simd(MatmulMode::Exact);
    for e in &exact {
        assert_eq!(e["matmul"]["mode"], "exact", "{}", e["matmul"]);
        assert_eq!(e["matmul"]["simd"], simd.name());
        assert!(e["matmul"].get("fast_matmul").is_none(), "{}", e["matmul"]);
    }
    let level = stuffed::exec::default_simd(MatmulMode::Fast);
    for (i, ((model, dtype), exact)) in models.iter().zip(&exact).enumerate() {
        let fast = ppl(model, &out(i, "fast"), &["--fast-matmul"]);
        let applies = matches!((level, *dtype), (Simd::Amx, _) | (Simd::Avx512Bf16, "bf16"));
        println!("{dtype} weights on the {} level: --fast-matmul applies: {applies}", level.name());
        // The same options otherwise: only the mode may tell the runs apart.
        assert_eq!(exact["options"], fast["options"]);
        let nll = |r: &serde_json::Value| r["runs"][0]["mean_nll"].as_f64().unwrap();
        if applies {
            assert_eq!(fast["matmul"]["mode"], "fast", "{}", fast["matmul"]);
            assert_ne!(exact["fingerprint"], fast["fingerprint"]);
            assert_ne!(nll(exact), nll(&fast), "{dtype}: rounding the activations changed no NLL");
        } else {
            assert_eq!(fast["matmul"]["mode"], "exact", "{dtype}: {}", fast["matmul"]);
            let said = fast["matmul"]["fast_matmul"].as_str().unwrap_or_default();
            assert!(said.starts_with("asked, not applied") && said.contains(dtype), "{}", fast["matmul"]);
            assert_eq!(exact["fingerprint"], fast["fingerprint"]);
            // Every sum of the run (its wall time aside).
            let sums = |r: &serde_json::Value| {
                let mut acc = r["runs"][0]["acc"].clone();
                acc.as_object_mut().unwrap().remove("seconds");
                acc
            };
            assert_eq!(sums(exact), sums(&fast), "{dtype}: not the default's numbers");
        }
    }
}
