//! The parsers as fuzz targets: each is `fn(&[u8]) -> Result<()>`, with seed inputs built from the
//! real files in `tests/data`, and a seeded mutator that knows their formats (JSON values, the
//! safetensors header, ZIP headers, pickle opcodes, vocab and ids lines). The runner that executes
//! cases in child processes under a memory and time bound is `stuffed-fuzz` (host/src/bin).
//!
//! A case is `(target, n)`: the mutated input is a pure function of both, so a failing case is
//! reproduced by its number alone (`stuffed-fuzz case TARGET N`).
//!
//! Files `stuffed` writes and reads back (ppl and passkey shard results, ppl and probe
//! checkpoints): their targets call today's
//! public readers through a scratch directory; that glue is [`readback`], in one place.
use crate::checkpoint::{self, Checkpoint};
use crate::rng::SplitMix64 as Rng;
use crate::tokenizer::Tokenizer;
use crate::world::World;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How the mutator sees an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Bytes only.
    Bytes,
    /// A JSON document.
    Json,
    /// `u64 length` + JSON header + data (safetensors).
    Safetensors,
    /// A stored ZIP (torch checkpoints).
    Zip,
    /// A pickle program.
    Pickle,
    /// Lines of text holding numbers (RWKV vocab, ids files).
    Lines,
}

pub struct Target {
    pub name: &'static str,
    pub shape: Shape,
    /// Seed inputs (read or built once per process).
    pub seeds: fn() -> Result<Vec<Vec<u8>>>,
    pub parse: fn(&[u8]) -> Result<()>,
}

/// The repository root (seeds live in its `tests/data`, `tools` and `host/assets`).
pub fn repo() -> PathBuf {
    std::env::var_os("STUFFED_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn read(rel: &str) -> Result<Vec<u8>> {
    let p = repo().join(rel);
    std::fs::read(&p).map_err(|e| anyhow!("{}: cannot read fuzz seed: {e}", p.display()))
}

fn reads(rels: &[&str]) -> Result<Vec<Vec<u8>>> {
    rels.iter().map(|r| read(r)).collect()
}

/// This process's scratch directory (removed by [`cleanup`]).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("stuffed-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
}

pub fn cleanup() {
    let _ = std::fs::remove_dir_all(scratch());
}

/// A scratch subdirectory holding `links` (name → repository file, symlinked), made once.
fn dir_with(sub: &str, links: &[(&str, &str)]) -> Result<PathBuf> {
    let d = scratch().join(sub);
    if !d.exists() {
        std::fs::create_dir_all(&d)?;
        for (name, rel) in links {
            let src = std::fs::canonicalize(repo().join(rel))?;
            std::os::unix::fs::symlink(src, d.join(name))?;
        }
    }
    Ok(d)
}

// ---------------------------------------------------------------- targets

/// Every fuzz target. To add one: a name, how the mutator sees it, its seeds and its parse.
pub fn targets() -> Vec<Target> {
    let mut t = vec![
        Target {
            name: "safetensors",
            shape: Shape::Safetensors,
            seeds: || reads(&["tests/data/mamba2_hf_bf16/model.safetensors", "tests/data/hgrn2_tiny/ref.safetensors"]),
            parse: |b| checkpoint::parse_bytes(b, false).map(drop),
        },
        Target {
            name: "torch-zip",
            shape: Shape::Zip,
            seeds: || {
                reads(&[
                    "tests/data/torch_zip/dtypes.pth",
                    "tests/data/torch_zip/shared.pth",
                    "tests/data/torch_zip/zip64.pth",
                    "tests/data/torch_zip/hf/pytorch_model.bin",
                    "tests/data/rwkv6_tiny_bf16/model.pth",
                ])
            },
            // CRC-32 always: the mutator fixes it up after changing member data.
            parse: |b| checkpoint::parse_bytes(b, true).map(drop),
        },
        Target {
            name: "pickle",
            shape: Shape::Pickle,
            seeds: || {
                let zips = reads(&[
                    "tests/data/torch_zip/dtypes.pth",
                    "tests/data/torch_zip/shared.pth",
                    "tests/data/mamba2_official/pytorch_model.bin",
                    "tests/data/rwkv6_tiny/model.pth",
                ])?;
                zips.iter().map(|z| checkpoint::torch_pickle(z)).collect()
            },
            parse: checkpoint::unpickle_bytes,
        },
        Target {
            name: "shard-index",
            shape: Shape::Json,
            seeds: || {
                let st = read("tests/data/mamba2_hf_bf16/model.safetensors")?;
                let n = u64::from_le_bytes(st[..8].try_into()?) as usize;
                let header: serde_json::Map<String, Value> = serde_json::from_slice(&st[8..8 + n])?;
                let map: serde_json::Map<String, Value> = header
                    .keys()
                    .filter(|k| *k != "__metadata__")
                    .map(|k| (k.clone(), Value::from("model-00001-of-00001.safetensors")))
                    .collect();
                let index = serde_json::json!({"metadata": {"total_size": st.len() - 8 - n}, "weight_map": map});
                Ok(vec![serde_json::to_vec_pretty(&index)?])
            },
            parse: |b| {
                let d = dir_with(
                    "shards",
                    &[("model-00001-of-00001.safetensors", "tests/data/mamba2_hf_bf16/model.safetensors")],
                )?;
                std::fs::write(d.join("model.safetensors.index.json"), b)?;
                Checkpoint::open(&d).map(drop)
            },
        },
        Target {
            name: "world-vocab",
            shape: Shape::Lines,
            seeds: || {
                // The shipped vocab's first 3,000 lines (its escapes and byte literals), LF and CRLF.
                let v = read("host/assets/rwkv_vocab_v20230424.txt")?;
                let head: Vec<&[u8]> = v.split_inclusive(|&b| b == b'\n').take(3000).collect();
                let crlf: Vec<u8> = head.iter().flat_map(|l| [&l[..l.len() - 1], b"\r\n"].concat()).collect();
                Ok(vec![head.concat(), crlf])
            },
            parse: |b| World::parse(b, "vocab.txt").map(drop),
        },
        Target {
            name: "tokenizer-json",
            shape: Shape::Json,
            seeds: || {
                reads(&[
                    "models/mamba2-tiny-l4-t64-a3-4m/tokenizer.json",
                    "tests/data/tokenizer_llama_style/tokenizer.json",
                ])
            },
            parse: |b| {
                let t = Tokenizer::from_bytes(b, "tokenizer.json")?;
                let ids = t.encode("The pass key is 71432.\n  Grüße, 世界 \u{1F600}\t<|endoftext|>")?;
                t.decode(&ids).map(drop)
            },
        },
        Target {
            name: "ids",
            shape: Shape::Lines,
            seeds: || Ok(vec![b"510 1509 2234 310 818 1047 1237 15\n".to_vec(), b"0,1,2,\n65535\n7\n".to_vec()]),
            parse: |b| {
                let p = scratch().join("ids.txt");
                std::fs::write(&p, b)?;
                crate::cli::basic::read_ids(&p).map(drop)
            },
        },
    ];
    for (name, _, _) in CONFIGS {
        t.push(Target { name, shape: Shape::Json, seeds: config_seed, parse: config_parse });
    }
    t.extend(readback::targets());
    t
}

/// config.json targets: (target, model directory under tests/data, its weight file).
const CONFIGS: [(&str, &str, &str); 13] = [
    ("config-mamba2", "mamba2_hf_g2_tied", "model.safetensors"),
    ("config-mamba2-official", "mamba2_official", "pytorch_model.bin"),
    ("config-rwkv5", "rwkv5_tiny_hf", "model.safetensors"),
    ("config-rwkv6", "rwkv6_tiny_hf", "model.safetensors"),
    ("config-hgrn2", "hgrn2_tiny", "model.safetensors"),
    ("config-mamba1", "mamba1_hf", "model.safetensors"),
    ("config-mamba1-official", "mamba1_official", "pytorch_model.bin"),
    ("config-rwkv7", "rwkv7_tiny_fla", "model.safetensors"),
    ("config-gla", "gla_tiny", "model.safetensors"),
    ("config-retnet", "retnet_tiny", "model.safetensors"),
    ("config-delta-net", "delta_net_tiny", "model.safetensors"),
    ("config-gated-deltanet", "gdn_tiny", "model.safetensors"),
    ("config-xlstm", "xlstm_tiny", "model.safetensors"),
];

/// The config target this process runs (a config target's fns cannot capture which it is).
static CONFIG: OnceLock<usize> = OnceLock::new();

fn config_index() -> Result<usize> {
    CONFIG.get().copied().ok_or_else(|| anyhow!("config target not selected (see fuzz::select)"))
}

fn config_seed() -> Result<Vec<Vec<u8>>> {
    let (_, dir, _) = CONFIGS[config_index()?];
    Ok(vec![read(&format!("tests/data/{dir}/config.json"))?])
}

fn config_parse(b: &[u8]) -> Result<()> {
    let (name, dir, weights) = CONFIGS[config_index()?];
    let d = dir_with(name, &[(weights, &format!("tests/data/{dir}/{weights}"))])?;
    std::fs::write(d.join("config.json"), b)?;
    crate::model::Model::load(&d).map(drop)
}

/// The target called `name`, ready to run in this process.
pub fn select(name: &str) -> Result<Target> {
    if let Some(i) = CONFIGS.iter().position(|c| c.0 == name) {
        if CONFIG.set(i).is_err() && CONFIG.get() != Some(&i) {
            bail!("one config target per process");
        }
    }
    let names: Vec<&str> = targets().iter().map(|t| t.name).collect();
    targets()
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| anyhow!("no fuzz target {name} (targets: {})", names.join(", ")))
}

// ---------------------------------------------------------------- read-back files

/// Files `stuffed` writes and reads back, fuzzed through today's public readers (the `merge`
/// command's), via a scratch directory. Seeds are written by running the commands once per process
/// on the shipped tiny model. The lead is giving these files checksums and format versions: a
/// validated parser per file replaces the glue here.
pub mod readback {
    use super::*;

    pub fn targets() -> Vec<Target> {
        vec![
            Target { name: "ppl-results", shape: Shape::Json, seeds: ppl_seed, parse: ppl_parse },
            Target { name: "ppl-checkpoint", shape: Shape::Safetensors, seeds: ckpt_seed, parse: ckpt_parse },
            Target {
                name: "probe-checkpoint",
                shape: Shape::Safetensors,
                seeds: probe_ckpt_seed,
                parse: probe_ckpt_parse,
            },
            Target { name: "passkey-results", shape: Shape::Lines, seeds: passkey_seed, parse: passkey_parse },
            Target { name: "passkey-summary", shape: Shape::Json, seeds: summary_seed, parse: summary_parse },
            Target {
                name: "passkey-oprm-results",
                shape: Shape::Lines,
                seeds: oprm_passkey_seed,
                parse: oprm_passkey_parse,
            },
            Target {
                name: "passkey-decimamba-results",
                shape: Shape::Lines,
                seeds: deci_passkey_seed,
                parse: deci_passkey_parse,
            },
            Target { name: "calibrate-result", shape: Shape::Json, seeds: calibrate_seed, parse: calibrate_parse },
            Target {
                name: "calibrate-checkpoint",
                shape: Shape::Json,
                seeds: calibrate_ckpt_seed,
                parse: calibrate_ckpt_parse,
            },
            Target { name: "effrem-checkpoint", shape: Shape::Json, seeds: effrem_ckpt_seed, parse: effrem_ckpt_parse },
            Target { name: "longmamba-result", shape: Shape::Json, seeds: longmamba_seed, parse: longmamba_parse },
            Target {
                name: "longmamba-checkpoint",
                shape: Shape::Json,
                seeds: longmamba_ckpt_seed,
                parse: longmamba_ckpt_parse,
            },
            Target { name: "forget-spec", shape: Shape::Lines, seeds: forget_seed, parse: forget_parse },
        ]
    }

    /// `calibrate` on the fuzz model: its arguments into `out` (3 steps; 1 with `stop` given).
    fn calibrate_args(out: &Path, stop: bool) -> Vec<String> {
        let text = scratch().join("cal.txt");
        let _ = std::fs::write(&text, "The grass is green. The sky is blue. The sun is yellow.\n".repeat(4));
        let mut a: Vec<String> = ["calibrate", "--model", &model(), "--text", &text.display().to_string()]
            .into_iter()
            .chain(["--length", "24", "--windows", "2", "--steps", "3", "--init", "0.5", "--out"])
            .map(String::from)
            .collect();
        a.push(out.display().to_string());
        if stop {
            a.extend(["--stop-after".into(), "1".into()]);
        }
        a
    }

    /// A finished calibration (made once): its directory.
    fn calibrated() -> Result<PathBuf> {
        let d = scratch().join("cal-done");
        if !d.join("calibrate.json").exists() {
            let a = calibrate_args(&d, false);
            stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>()).context("fuzz seed: calibrate run")?;
        }
        Ok(d)
    }

    fn calibrate_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![std::fs::read(calibrated()?.join("calibrate.json"))?])
    }

    /// The case as a calibrate.json read through `--forget dt:file=`, the table set on the model.
    fn calibrate_parse(b: &[u8]) -> Result<()> {
        let f = scratch().join("cal-case.json");
        std::fs::write(&f, resealed(b))?;
        let spec = crate::forget::ForgetSpec::parse(&format!("dt:file={}", f.display()))?;
        let mut m = crate::model::Model::load(Path::new(&model()))?;
        m.set_forget(spec)
    }

    fn calibrate_ckpt_seed() -> Result<Vec<Vec<u8>>> {
        let d = scratch().join("cal-stopped");
        let a = calibrate_args(&d, true);
        if !d.join("calibrate.checkpoint.json").exists() {
            stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>()).context("fuzz seed: stopped calibrate run")?;
        }
        Ok(vec![std::fs::read(d.join("calibrate.checkpoint.json"))?])
    }

    /// The case as the checkpoint of a stopped calibration, resumed to its end.
    fn calibrate_ckpt_parse(b: &[u8]) -> Result<()> {
        let d = scratch().join("cal-resumed");
        std::fs::create_dir_all(&d)?;
        let _ = std::fs::remove_file(d.join("calibrate.json"));
        std::fs::write(d.join("calibrate.checkpoint.json"), resealed(b))?;
        let mut a = calibrate_args(&d, false);
        a.push("--resume".into());
        stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `effrem` on the fuzz model: its arguments into `out` (6 runs; 2 with `stop` given).
    fn effrem_args(out: &Path, stop: bool) -> Vec<String> {
        let text = scratch().join("effrem.txt");
        let _ = std::fs::write(&text, "The grass is green. The sky is blue. The sun is yellow.\n".repeat(4));
        let mut a: Vec<String> = ["effrem", "--model", &model(), "--text", &text.display().to_string()]
            .into_iter()
            .chain(["--at", "12,24", "--starts", "4,16,20", "--sequences", "2", "--out"])
            .map(String::from)
            .collect();
        a.push(out.display().to_string());
        if stop {
            a.extend(["--stop-after".into(), "2".into()]);
        }
        a
    }

    fn effrem_ckpt_seed() -> Result<Vec<Vec<u8>>> {
        let d = scratch().join("effrem-stopped");
        let a = effrem_args(&d, true);
        if !d.join("effrem.checkpoint.json").exists() {
            stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>()).context("fuzz seed: stopped effrem run")?;
        }
        Ok(vec![std::fs::read(d.join("effrem.checkpoint.json"))?])
    }

    /// The case as the checkpoint of a stopped effrem run, resumed to its end.
    fn effrem_ckpt_parse(b: &[u8]) -> Result<()> {
        let d = scratch().join("effrem-resumed");
        std::fs::create_dir_all(&d)?;
        let _ = std::fs::remove_file(d.join("effrem.json"));
        std::fs::write(d.join("effrem.checkpoint.json"), resealed(b))?;
        let mut a = effrem_args(&d, false);
        a.push("--resume".into());
        stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `longmamba` on the fuzz model: its arguments into `out` (3 windows; 1 with `stop` given).
    fn longmamba_args(out: &Path, stop: bool) -> Vec<String> {
        let text = scratch().join("longmamba.txt");
        let _ = std::fs::write(&text, "The grass is green. The sky is blue. The sun is yellow.\n".repeat(8));
        let mut a: Vec<String> = ["longmamba", "--model", &model(), "--text", &text.display().to_string()]
            .into_iter()
            .chain(["--train-len", "8", "--target", "64", "--windows", "3", "--out"])
            .map(String::from)
            .collect();
        a.push(out.display().to_string());
        if stop {
            a.extend(["--stop-after".into(), "1".into()]);
        }
        a
    }

    fn longmamba_seed() -> Result<Vec<Vec<u8>>> {
        let d = scratch().join("longmamba-done");
        if !d.join("longmamba.json").exists() {
            let a = longmamba_args(&d, false);
            stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>()).context("fuzz seed: longmamba run")?;
        }
        Ok(vec![std::fs::read(d.join("longmamba.json"))?])
    }

    /// The case as a longmamba.json read through `--forget longmamba:file=`, set on the model.
    fn longmamba_parse(b: &[u8]) -> Result<()> {
        let f = scratch().join("longmamba-case.json");
        std::fs::write(&f, resealed(b))?;
        let spec = crate::forget::ForgetSpec::parse(&format!("longmamba:file={}", f.display()))?;
        let mut m = crate::model::Model::load(Path::new(&model()))?;
        m.set_forget(spec)
    }

    fn longmamba_ckpt_seed() -> Result<Vec<Vec<u8>>> {
        let d = scratch().join("longmamba-stopped");
        let a = longmamba_args(&d, true);
        if !d.join("longmamba.checkpoint.json").exists() {
            stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>()).context("fuzz seed: stopped longmamba run")?;
        }
        Ok(vec![std::fs::read(d.join("longmamba.checkpoint.json"))?])
    }

    /// The case as the checkpoint of a stopped calibration, resumed to its end.
    fn longmamba_ckpt_parse(b: &[u8]) -> Result<()> {
        let d = scratch().join("longmamba-resumed");
        std::fs::create_dir_all(&d)?;
        let _ = std::fs::remove_file(d.join("longmamba.json"));
        std::fs::write(d.join("longmamba.checkpoint.json"), resealed(b))?;
        let mut a = longmamba_args(&d, false);
        a.push("--resume".into());
        stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn forget_seed() -> Result<Vec<Vec<u8>>> {
        Ok([
            "dt:c=0.25/1.5/0.0625",
            "decay:s=0.5",
            "rri:a=0.99,b=0.7",
            "state-norm:every=128,calib=8k",
            "window:r=4k",
            "decimamba:layers=3/12,base=6000,beta=0.5,min=20,last=1",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect())
    }

    /// The case as a `--forget` method: refused, or printed in a form that parses back to itself.
    fn forget_parse(b: &[u8]) -> Result<()> {
        let s = std::str::from_utf8(b)?;
        if s.contains("file=") {
            bail!("file= reads a file (the calibrate-result target covers it)");
        }
        let spec = crate::forget::ForgetSpec::parse(s)?;
        let text = spec.to_string();
        let again =
            crate::forget::ForgetSpec::parse(&text).map_err(|e| anyhow!("{text}: printed form refused: {e}"))?;
        assert_eq!(again.to_string(), text, "--forget {s}: printed form does not parse back to itself");
        Ok(())
    }

    fn model() -> String {
        repo().join("tests/data/mamba2_neox_tiny").display().to_string()
    }

    /// Runs `stuffed args` in this process.
    fn stuffed(args: &[&str]) -> Result<()> {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(std::iter::once("stuffed").chain(args.iter().copied()))
            .map_err(|e| anyhow!("{e}"))?;
        crate::cli::run(cli)
    }

    /// Shard `k` of 2 of a ppl run, in `scratch/ppl-k` (made once).
    fn ppl_shards() -> Result<[PathBuf; 2]> {
        let text = scratch().join("ppl.txt");
        let dirs = [scratch().join("ppl-1"), scratch().join("ppl-2")];
        if !dirs[1].join("results.json").exists() {
            let line = "The grass is green. The sky is blue. The sun is yellow.\n";
            std::fs::write(&text, line.repeat(3))?;
            std::fs::write(scratch().join("ppl2.txt"), line.repeat(2))?;
            for (k, d) in dirs.iter().enumerate() {
                let (t1, t2, d) = (text.display().to_string(), scratch().join("ppl2.txt"), d.display().to_string());
                let shard = format!("{}/2", k + 1);
                let args = ["ppl", "--model", &model(), "--text", &t1, "--text", t2.to_str().unwrap_or_default()];
                stuffed(&[&args[..], &["--train-len", "8", "--shard", &shard, "--out", &d]].concat())
                    .context("fuzz seed: ppl shard run")?;
            }
        }
        Ok(dirs)
    }

    fn ppl_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![std::fs::read(ppl_shards()?[0].join("results.json"))?])
    }

    /// Half the cases (by length) sealed again after the mutation, as a forger would: a mutated
    /// JSON document, or each mutated JSON line, that still parses gets a valid format and checksum,
    /// so what lies behind the checksum (range checks, merge) meets the mutations too.
    fn resealed(b: &[u8]) -> Vec<u8> {
        let reseal = |text: &str| -> Option<String> {
            let v: serde_json::Value = serde_json::from_str(text).ok()?;
            let kind = v["stuffed_format"]["kind"].as_str()?.to_string();
            crate::report::reseal(&kind, v, !text.ends_with('}') || text.contains('\n')).ok()
        };
        let Ok(text) = std::str::from_utf8(b) else { return b.to_vec() };
        if b.len().is_multiple_of(2) {
            return b.to_vec();
        }
        match reseal(text) {
            Some(doc) => doc.into_bytes(),
            None => {
                text.lines().map(|l| reseal(l).unwrap_or_else(|| l.to_string()) + "\n").collect::<String>().into_bytes()
            }
        }
    }

    /// Shard 1's results.json replaced by the case, merged with shard 2's.
    fn ppl_parse(b: &[u8]) -> Result<()> {
        let [_, two] = ppl_shards()?;
        let case = scratch().join("ppl-case");
        std::fs::create_dir_all(&case)?;
        std::fs::write(case.join("results.json"), resealed(b))?;
        crate::eval::ppl::merge(&[case, two], &scratch().join("ppl-merged"))
    }

    /// The checkpoint of a `cmd` run (ppl or probe) stopped after 64 tokens (made once), and the
    /// run's arguments.
    fn ckpt(cmd: &str) -> Result<(Vec<u8>, Vec<String>)> {
        let text = scratch().join("ck.txt");
        let args = |out: &Path| -> Vec<String> {
            let m = model();
            let (t, o) = (text.display().to_string(), out.display().to_string());
            let own: &[&str] = match cmd {
                "ppl" => &["--train-len", "16", "--chunk", "32"],
                _ => &["--every", "16", "--chunk", "32", "--snapshot-at", "32,80", "--checkpoint-secs", "0"],
            };
            [&[cmd, "--model", &m, "--text", &t, "--out", &o][..], own].concat().into_iter().map(String::from).collect()
        };
        let dir = scratch().join(format!("{cmd}-ck"));
        let file = dir.join(format!("{cmd}.checkpoint.safetensors"));
        if !file.exists() {
            std::fs::write(&text, "The grass is green. The sky is blue. The sun is yellow.\n".repeat(8))?;
            let mut a = args(&dir);
            a.extend(["--stop-after".into(), "64".into()]);
            stuffed(&a.iter().map(String::as_str).collect::<Vec<_>>()).context("fuzz seed: a stopped run")?;
        }
        let case = scratch().join(format!("{cmd}-ck-case"));
        Ok((std::fs::read(&file).context("fuzz seed: checkpoint")?, args(&case)))
    }

    /// The run resumed from the case as its checkpoint.
    fn ckpt_case(cmd: &str, b: &[u8]) -> Result<()> {
        let (_, mut args) = ckpt(cmd)?;
        let case = scratch().join(format!("{cmd}-ck-case"));
        let _ = std::fs::remove_dir_all(&case); // the files a resume cuts back to the checkpoint's lengths
        std::fs::create_dir_all(&case)?;
        std::fs::write(case.join(format!("{cmd}.checkpoint.safetensors")), b)?;
        if cmd == "probe" {
            // The CSVs as the stopped run left them: a resume cuts them back to the recorded lengths.
            for f in ["retention.csv", "state_stats.csv", "conv_stats.csv", "inputs.csv"] {
                std::fs::copy(scratch().join("probe-ck").join(f), case.join(f))?;
            }
        }
        args.push("--resume".into());
        stuffed(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn ckpt_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![ckpt("ppl")?.0])
    }

    fn ckpt_parse(b: &[u8]) -> Result<()> {
        ckpt_case("ppl", b)
    }

    fn probe_ckpt_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![ckpt("probe")?.0])
    }

    fn probe_ckpt_parse(b: &[u8]) -> Result<()> {
        ckpt_case("probe", b)
    }

    /// Which passkey grid a target reads back: plain, `--oprm 48`, or `--forget decimamba` (each
    /// with its records' own fields).
    #[derive(Clone, Copy)]
    enum Grid {
        Plain,
        Oprm,
        Deci,
    }

    impl Grid {
        fn name(self) -> &'static str {
            match self {
                Grid::Plain => "pk",
                Grid::Oprm => "pk-oprm",
                Grid::Deci => "pk-deci",
            }
        }
        fn args(self) -> &'static [&'static str] {
            match self {
                Grid::Plain => &[],
                Grid::Oprm => &["--oprm", "48"],
                Grid::Deci => &["--forget", "decimamba:layers=0/1,base=60,last=8", "--jrt"],
            }
        }
    }

    /// A passkey run's two shards in `scratch/pk-k` (`scratch/pk-oprm-k`, `scratch/pk-deci-k`; made once).
    fn passkey_shards(grid: Grid) -> Result<[PathBuf; 2]> {
        let name = grid.name();
        let dirs = [scratch().join(format!("{name}-1")), scratch().join(format!("{name}-2"))];
        if !dirs[1].join("summary.json").exists() {
            for (k, d) in dirs.iter().enumerate() {
                let (shard, d) = (format!("{}/2", k + 1), d.display().to_string());
                let args = ["passkey", "--model", &model(), "--lengths", "128,256", "--samples", "2"];
                let own = grid.args();
                stuffed(&[&args[..], own, &["--shard", &shard, "--out", &d]].concat())
                    .context("fuzz seed: passkey shard run")?;
            }
        }
        Ok(dirs)
    }

    fn passkey_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![std::fs::read(passkey_shards(Grid::Plain)?[0].join("results.jsonl"))?])
    }

    fn summary_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![std::fs::read(passkey_shards(Grid::Plain)?[0].join("summary.json"))?])
    }

    fn oprm_passkey_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![std::fs::read(passkey_shards(Grid::Oprm)?[0].join("results.jsonl"))?])
    }

    fn deci_passkey_seed() -> Result<Vec<Vec<u8>>> {
        Ok(vec![std::fs::read(passkey_shards(Grid::Deci)?[0].join("results.jsonl"))?])
    }

    /// A shard directory with shard 1's files, `file` replaced by the case, merged with shard 2.
    fn passkey_case(file: &str, b: &[u8]) -> Result<()> {
        passkey_case_of(Grid::Plain, file, b)
    }

    /// [`passkey_case`] of one grid's shards.
    fn passkey_case_of(grid: Grid, file: &str, b: &[u8]) -> Result<()> {
        let [one, two] = passkey_shards(grid)?;
        let case = scratch().join(format!("{}-case", grid.name()));
        std::fs::create_dir_all(&case)?;
        for f in ["results.jsonl", "summary.json", "passkey.run.json"] {
            std::fs::copy(one.join(f), case.join(f))?;
        }
        std::fs::write(case.join(file), resealed(b))?;
        crate::eval::passkey::merge(&[case, two], &scratch().join("pk-merged"))
    }

    fn passkey_parse(b: &[u8]) -> Result<()> {
        passkey_case("results.jsonl", b)
    }

    fn summary_parse(b: &[u8]) -> Result<()> {
        passkey_case("summary.json", b)
    }

    fn oprm_passkey_parse(b: &[u8]) -> Result<()> {
        passkey_case_of(Grid::Oprm, "results.jsonl", b)
    }

    fn deci_passkey_parse(b: &[u8]) -> Result<()> {
        passkey_case_of(Grid::Deci, "results.jsonl", b)
    }
}

// ---------------------------------------------------------------- cases

fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The input of case `n` of `target`: a seed mutated 1–4 times (once, most often).
pub fn case_input(target: &Target, seeds: &[Vec<u8>], n: u64) -> Vec<u8> {
    let mut rng = Rng::new(n ^ name_hash(target.name));
    let mut buf = rng.pick(seeds).clone();
    for _ in 0..*rng.pick(&[1, 1, 1, 2, 2, 3, 4]) {
        buf = mutate(target.shape, &buf, &mut rng);
    }
    buf
}

/// Runs one case in this process: the parse's result, or the panic it raised as an error whose
/// message starts with "PANIC".
pub fn run_case(target: &Target, seeds: &[Vec<u8>], n: u64) -> Result<Result<()>> {
    parse_caught(target, &case_input(target, seeds, n))
}

/// `target`'s parse of `input`, or the panic it raised as an error: "PANIC at FILE:LINE: message"
/// (the place, so that a failure of a read-back target, whose seeds differ per process, is found).
pub fn parse_caught(target: &Target, input: &[u8]) -> Result<Result<()>> {
    static AT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            if let (Ok(mut at), Some(l)) = (AT.lock(), info.location()) {
                *at = format!("{}:{}", l.file(), l.line());
            }
        }))
    });
    std::panic::catch_unwind(|| (target.parse)(input)).map_err(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        let at = AT.lock().map(|a| a.clone()).unwrap_or_default();
        anyhow!("PANIC at {at}: {}", msg.unwrap_or_default())
    })
}

// ---------------------------------------------------------------- mutations

const INTS: [i128; 16] = [
    0,
    1,
    -1,
    2,
    7,
    255,
    65535,
    -2147483648,
    2147483647,
    4294967295,
    1 << 32,
    1 << 40,
    (1 << 53) + 1,
    1 << 63,
    (1 << 64) - 1,
    99_999_999_999,
];

fn mutate(shape: Shape, buf: &[u8], rng: &mut Rng) -> Vec<u8> {
    // Mostly a format-aware mutation, else (or when it does not apply) a byte-level one.
    if rng.below(4) != 0 {
        let smart = match shape {
            Shape::Json => json_mutation(buf, rng),
            Shape::Safetensors => safetensors_mutation(buf, rng),
            Shape::Zip => zip_mutation(buf, rng),
            Shape::Pickle => pickle_mutation(buf, rng),
            Shape::Lines => line_mutation(buf, rng),
            Shape::Bytes => None,
        };
        if let Some(b) = smart {
            return b;
        }
    }
    let mut b = buf.to_vec();
    byte_mutation(&mut b, rng);
    if shape == Shape::Zip {
        fix_crcs(&mut b);
    }
    b
}

fn byte_mutation(b: &mut Vec<u8>, rng: &mut Rng) {
    let n = b.len();
    if n == 0 {
        b.push(rng.next_u64() as u8);
        return;
    }
    let at = rng.below(n);
    match rng.below(8) {
        0 => b[at] ^= 1 << rng.below(8),
        1 => b[at] = *rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'\n']),
        2 => b.truncate(at),
        3 => {
            let len = rng.below(16.min(n - at)) + 1;
            b.drain(at..at + len);
        }
        4 => {
            let len = rng.below(64.min(n - at)) + 1;
            let chunk = b[at..at + len].to_vec();
            let to = rng.below(n);
            b.splice(to..to, chunk);
        }
        5 => {
            // A little-endian length or offset field.
            let v = *rng.pick(&INTS) as u64;
            let w = *rng.pick(&[2usize, 4, 8]);
            for (i, x) in v.to_le_bytes()[..w].iter().enumerate() {
                if let Some(y) = b.get_mut(at + i) {
                    *y = *x;
                }
            }
        }
        6 => {
            let x = rng.next_u64() as u8;
            b.insert(at, x);
        }
        _ => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(n);
                b[i] = rng.next_u64() as u8;
            }
        }
    }
}

/// A JSON value replaced (0, negative, 2^40, NaN, huge, wrong type), a key duplicated or removed.
fn json_mutation(buf: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(buf).ok()?;
    let mut count = 0;
    count_nodes(&v, &mut count);
    let target = rng.below(count);
    let replacement = match rng.below(14) {
        0 => "0".into(),
        1 => "-1".into(),
        2 => "1099511627776".into(),
        3 => "NaN".into(),
        4 => "-Infinity".into(),
        5 => "1e999".into(),
        6 => "18446744073709551616".into(),
        7 => "\"x\"".into(),
        8 => "null".into(),
        9 => "[]".into(),
        10 => "{}".into(),
        11 => "true".into(),
        12 => format!("{}", *rng.pick(&INTS)),
        _ => "-0.5".into(),
    };
    let op = rng.below(4); // 0–1: replace, 2: duplicate a key, 3: drop it
    let mut out = String::new();
    let mut at = 0;
    write_json(&v, &mut out, &mut at, target, op, &replacement);
    Some(out.into_bytes())
}

fn count_nodes(v: &Value, n: &mut usize) {
    *n += 1;
    match v {
        Value::Array(a) => a.iter().for_each(|x| count_nodes(x, n)),
        Value::Object(o) => o.values().for_each(|x| count_nodes(x, n)),
        _ => {}
    }
}

/// Writes `v` with node `target` (pre-order) replaced by `rep` (op 0–1), its key written twice
/// (2: the second time with `rep`) or left out (3).
fn write_json(v: &Value, out: &mut String, at: &mut usize, target: usize, op: usize, rep: &str) {
    let me = *at;
    *at += 1;
    if me == target && op < 2 {
        out.push_str(rep);
        return;
    }
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(x, out, at, target, op, rep);
            }
            out.push(']');
        }
        Value::Object(o) => {
            out.push('{');
            let mut first = true;
            for (k, x) in o {
                let child = *at;
                let key = Value::String(k.clone()).to_string();
                let mut sub = String::new();
                write_json(x, &mut sub, at, target, op, rep);
                if child == target && op == 3 {
                    continue;
                }
                if !first {
                    out.push(',');
                }
                first = false;
                if child == target && op == 2 {
                    out.push_str(&format!("{key}:{sub},{key}:{rep},"));
                }
                out.push_str(&format!("{key}:{sub}"));
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

/// The header's JSON mutated (length kept right or left stale), or its length field changed.
fn safetensors_mutation(buf: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
    let header = buf.get(8..8usize.checked_add(n)?)?;
    if rng.below(4) == 0 {
        let mut b = buf.to_vec();
        let v = (n as i128 + *rng.pick(&[-8i128, -1, 1, 8, 1 << 20, -(n as i128)])).max(0) as u64;
        b[..8].copy_from_slice(&v.to_le_bytes());
        return Some(b);
    }
    // Half the time a JSON document held in a metadata string (a checkpoint's snapshot).
    if rng.below(2) == 0 {
        if let Ok(mut v) = serde_json::from_slice::<Value>(header) {
            let inner = v.get_mut("__metadata__").and_then(Value::as_object_mut).and_then(|m| {
                let keys: Vec<String> = m
                    .iter()
                    .filter(|(_, x)| x.as_str().is_some_and(|t| t.starts_with(['{', '['])))
                    .map(|(k, _)| k.clone())
                    .collect();
                let k = keys.get(rng.below(keys.len().max(1)))?.clone();
                let doc = json_mutation(m[&k].as_str()?.as_bytes(), rng)?;
                m.insert(k, Value::String(String::from_utf8_lossy(&doc).into_owned()));
                Some(())
            });
            if inner.is_some() {
                let h = serde_json::to_vec(&v).ok()?;
                return Some([&(h.len() as u64).to_le_bytes()[..], &h, &buf[8 + n..]].concat());
            }
        }
    }
    let h = json_mutation(header, rng)?;
    let len = if rng.below(8) == 0 { n } else { h.len() };
    Some([&(len as u64).to_le_bytes()[..], &h, &buf[8 + n..]].concat())
}

/// Fields of the ZIP structures (local headers, directory entries, end records) set to interesting
/// values, entries swapped, or a member's data changed with its CRC-32 fixed up.
fn zip_mutation(buf: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let sigs: [(&[u8], &[usize]); 3] = [
        (b"PK\x03\x04", &[6, 8, 14, 18, 22, 26, 28]),
        (b"PK\x01\x02", &[10, 16, 20, 24, 28, 30, 32, 42]),
        (b"PK\x05\x06", &[8, 10, 12, 16]),
    ];
    let (sig, fields) = rng.pick(&sigs);
    let hits: Vec<usize> = buf.windows(4).enumerate().filter(|(_, w)| w == sig).map(|(i, _)| i).collect();
    if hits.is_empty() {
        return None;
    }
    let at = hits[rng.below(hits.len())];
    let mut b = buf.to_vec();
    match rng.below(3) {
        0 | 1 => {
            let off = at + *rng.pick(fields);
            let w = if matches!(off - at, 6 | 8 | 10 | 26 | 28 | 30 | 32) { 2 } else { 4 };
            let v = match rng.below(3) {
                0 => *rng.pick(&INTS) as u64,
                1 => {
                    let old = b.get(off..off + w).map_or(0, |s| s.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64));
                    old.wrapping_add(*rng.pick(&[1u64, 2, 4, 8, u64::MAX]))
                }
                _ => rng.below(buf.len() + 64) as u64,
            };
            for (i, x) in v.to_le_bytes()[..w].iter().enumerate() {
                *b.get_mut(off + i)? = *x;
            }
        }
        _ => {
            // A member's data byte changed, CRC fixed: the pickle or the tensors see it.
            let data = rng.below(b.len());
            b[data] ^= 1 << rng.below(8);
            fix_crcs(&mut b);
        }
    }
    Some(b)
}

/// Recomputes every member's CRC-32 (directory, local header and data descriptor) from its data as
/// the directory places it, so a data change reaches the parser behind the checksum.
fn fix_crcs(b: &mut [u8]) {
    let le = |b: &[u8], at: usize, n: usize| -> Option<u64> {
        Some(b.get(at..at + n)?.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    };
    let mut at = 0;
    while let Some(i) = b[at..].windows(4).position(|w| w == b"PK\x01\x02") {
        let c = at + i;
        at = c + 4;
        let fix = || -> Option<(usize, usize, usize, u32)> {
            let (comp, local) = (le(b, c + 20, 4)? as usize, le(b, c + 42, 4)? as usize);
            let (n, e) = (le(b, local + 26, 2)? as usize, le(b, local + 28, 2)? as usize);
            let start = local + 30 + n + e;
            Some((local, start, comp, crate::checkpoint::crc32(b.get(start..start.checked_add(comp)?)?)))
        };
        if let Some((local, start, comp, crc)) = fix() {
            let bytes = crc.to_le_bytes();
            b[c + 16..c + 20].copy_from_slice(&bytes);
            if le(b, local + 14, 4) != Some(0) {
                b[local + 14..local + 18].copy_from_slice(&bytes);
            }
            let end = start + comp;
            let d = if le(b, end, 4) == Some(0x0807_4b50) { end + 4 } else { end };
            if let Some(s) = b.get_mut(d..d + 4) {
                s.copy_from_slice(&bytes);
            }
        }
    }
}

/// An opcode replaced, inserted or removed, or an argument of one changed.
fn pickle_mutation(buf: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    const OPS: &[u8] = b"().NJKMGXBCtsuae}])qrhjcRbQ\x80\x85\x86\x87\x88\x89\x8a\x8c0123456789SVpgIFLl";
    let mut b = buf.to_vec();
    let at = rng.below(b.len().max(1));
    match rng.below(4) {
        0 => *b.get_mut(at)? = *rng.pick(OPS),
        1 => b.insert(at.min(b.len()), *rng.pick(OPS)),
        2 => {
            if at < b.len() {
                b.remove(at);
            }
        }
        _ => {
            // A 1-, 2- or 4-byte argument after a BININT/LONG/string opcode set to an edge value.
            let ops: Vec<usize> =
                b.iter().enumerate().filter(|(_, &o)| b"JKMXBqrhj\x8a\x8c".contains(&o)).map(|(i, _)| i).collect();
            let &i = ops.get(rng.below(ops.len().max(1)))?;
            let v = (*rng.pick(&INTS) as u64).to_le_bytes();
            for (k, x) in v[..*rng.pick(&[1usize, 2, 4])].iter().enumerate() {
                *b.get_mut(i + 1 + k)? = *x;
            }
        }
    }
    Some(b)
}

/// A line duplicated, dropped or moved, or a number in one replaced by an edge value.
fn line_mutation(buf: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = buf.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    if lines.is_empty() {
        return None;
    }
    let i = rng.below(lines.len());
    match rng.below(4) {
        0 => {
            let l = lines[i].clone();
            let to = rng.below(lines.len());
            lines.insert(to, l);
        }
        1 => {
            lines.remove(i);
        }
        2 => {
            let l = lines.remove(i);
            let to = rng.below(lines.len() + 1);
            lines.insert(to, l);
        }
        _ => {
            let l = &lines[i];
            let digits: Vec<usize> = (0..l.len()).filter(|&k| l[k].is_ascii_digit()).collect();
            let &k = digits.get(rng.below(digits.len().max(1)))?;
            let end = (k..l.len()).find(|&e| !l[e].is_ascii_digit()).unwrap_or(l.len());
            let start = (0..k).rev().find(|&s| !l[s].is_ascii_digit()).map_or(0, |s| s + 1);
            let rep = match rng.below(3) {
                0 => format!("{}", *rng.pick(&INTS)),
                1 => "100000000".into(),
                _ => "1e3".into(),
            };
            lines[i] = [&l[..start], rep.as_bytes(), &l[end..]].concat();
        }
    }
    Some(lines.concat())
}
