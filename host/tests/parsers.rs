//! The parsers under attack: the fuzz harness (host/src/fuzz.rs, run by `stuffed-fuzz` in child
//! processes) over every target, its regression cases, and damaged weights through the CLI.
use std::path::PathBuf;
use std::process::Command;

fn data(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(p)
}

fn fuzz(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stuffed-fuzz")).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Known failures left open, as (target, message): none now (a place to list one with its issue
/// while it is being fixed, so the rest of the run still counts).
const KNOWN: &[(&str, &str)] = &[];

/// A bounded number of cases per target, two targets at a time, each in child processes: every
/// case must end in Ok or Err, without a panic, abort, hang (20 s) or runaway allocation (3 GiB).
#[test]
fn every_parser_survives_its_fuzz_cases() {
    let (_, out) = fuzz(&[
        "run",
        "--cases",
        "600",
        "--cases-of",
        "tokenizer-json=150,ppl-results=250,ppl-checkpoint=80,probe-checkpoint=80,passkey-results=250,passkey-summary=250,passkey-oprm-results=150,passkey-decimamba-results=150,calibrate-checkpoint=150,effrem-checkpoint=100,longmamba-result=100,longmamba-checkpoint=100",
        "--jobs",
        "2",
    ]);
    println!("{out}");
    let fails: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.starts_with("FAIL ") && !KNOWN.iter().any(|(t, m)| l.starts_with(&format!("FAIL {t} ")) && l.ends_with(m))
        })
        .collect();
    assert!(fails.is_empty(), "{fails:#?}");
    assert!(out.contains("cases over 33 targets"), "{out}");
}

#[test]
fn every_fuzz_seed_parses() {
    let (ok, list) = fuzz(&["list"]);
    assert!(ok, "{list}");
    for t in list.lines() {
        let (ok, out) = fuzz(&["seeds", t]);
        assert!(ok, "{out}");
    }
}

/// A flipped weight byte in a torch zip: loads without --verify-weights (the data are only read as
/// the model uses them), refused with one line naming the member with it.
#[test]
fn verify_weights_checks_crc32() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(data("rwkv6_tiny/model.pth")).unwrap();
    // The first byte of member model/data/0's data.
    let name = b"model/data/0";
    let local = (0..good.len()).find(|&i| good[i..].starts_with(b"PK\x03\x04") && good[i + 30..].starts_with(name));
    let local = local.unwrap();
    let extra = u16::from_le_bytes([good[local + 28], good[local + 29]]) as usize;
    let mut bad = good.clone();
    bad[local + 30 + name.len() + extra] ^= 0x10;
    let model = dir.path().join("model.pth");
    std::fs::write(&model, &bad).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_stuffed"))
            .args(["info", "--model", model.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&["--verify-weights"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("model.pth: member model/data/0: CRC-32") && err.contains("damaged weights"), "{err}");
    std::fs::write(&model, &good).unwrap();
    let (code, err) = run(&["--verify-weights"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Fuzz cases that crashed, each run again by its number (host/src/fuzz.rs: the input is a function
/// of target and number), with the error each now ends in: Mamba-2 configs with `num_heads` or
/// `d_model` near 2^63 overflowed a product in config.rs; xLSTM configs with `ffn_proj_factor` near
/// 2^64 overflowed the FFN width check (found by the long fuzz).
#[test]
fn fuzz_regressions() {
    let size = "more than the 16777216 a size may be";
    let ffn = "ffn_proj_factor 18446744073709552000 and ffn_round_up_to_multiple_of";
    for (target, n, error) in [
        ("config-mamba2", "999", size),
        ("config-mamba2", "3677", size),
        ("config-mamba2-official", "4972", size),
        ("config-xlstm", "14362", ffn),
        ("config-xlstm", "18731", ffn),
    ] {
        let (ok, out) = fuzz(&["case", target, n]);
        assert!(ok && out.contains(&format!("{target} {n}: error: ")), "{out}");
        assert!(out.contains(error), "{out}");
    }
}
