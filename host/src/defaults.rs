//! The shipped default of `stuffed ppl` (no `--model`, no `--text`): two tiny Mamba-2 models of one
//! architecture and state size, trained on 64- and 2,048-token windows (models/, tools/train_tiny.py),
//! and the held-out novel. They are embedded in the binary and written once into a cache directory
//! (named by their content hash), so the default never depends on the working directory.
use crate::report::write_atomic;
use anyhow::{anyhow, Result};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[cfg(not(lean))]
macro_rules! model {
    ($dir:literal) => {
        (
            $dir,
            [
                ("config.json", include_bytes!(concat!("../../models/", $dir, "/config.json")).as_slice()),
                ("model.safetensors", include_bytes!(concat!("../../models/", $dir, "/model.safetensors")).as_slice()),
                ("tokenizer.json", include_bytes!(concat!("../../models/", $dir, "/tokenizer.json")).as_slice()),
                ("training.json", include_bytes!(concat!("../../models/", $dir, "/training.json")).as_slice()),
            ],
        )
    };
}

type Files = [(&'static str, &'static [u8]); 4];

/// Short-trained first, long-trained second.
#[cfg(not(lean))]
const MODELS: [(&str, Files); 2] = [model!("mamba2-tiny-l4-t64-a3-4m"), model!("mamba2-tiny-l4-t2048-a3-4m")];
/// A lean build (`STUFFED_LEAN=1`, host/build.rs) embeds none.
#[cfg(lean)]
const MODELS: [(&str, Files); 0] = [];
const HELDOUT: (&str, &[u8]) = ("austen_persuasion.txt", include_bytes!("../assets/corpus/austen_persuasion.txt"));

/// Where the embedded files go: `$STUFFED_CACHE`, else `$XDG_CACHE_HOME/stuffed`, else
/// `~/.cache/stuffed`, else the system temp dir.
pub fn cache_root() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("STUFFED_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("stuffed")))
        .or_else(|| env("HOME").map(|p| p.join(".cache/stuffed")))
        .unwrap_or_else(|| std::env::temp_dir().join("stuffed"))
}

/// Writes the shipped models and text (once) and returns (model dirs, held-out text).
pub fn materialize() -> Result<(Vec<PathBuf>, PathBuf)> {
    if MODELS.is_empty() {
        anyhow::bail!("this build (STUFFED_LEAN) embeds no shipped models: pass --model DIR and --text FILE");
    }
    let mut h = Sha256::new();
    for (name, files) in &MODELS {
        h.update(name);
        files.iter().for_each(|(f, b)| {
            h.update(f);
            h.update(b)
        });
    }
    h.update(HELDOUT.1);
    let root = cache_root().join(format!("default-{}", &format!("{:x}", h.finalize())[..16]));
    let write = |path: PathBuf, bytes: &[u8]| -> Result<()> {
        if std::fs::metadata(&path).map(|m| m.len() as usize).ok() != Some(bytes.len()) {
            let dir = path.parent().unwrap_or(&root).to_path_buf();
            std::fs::create_dir_all(&dir).map_err(|e| anyhow!("{}: cannot create: {e}", dir.display()))?;
            write_atomic(&path, bytes)?;
        }
        Ok(())
    };
    let mut dirs = Vec::new();
    for (name, files) in &MODELS {
        let dir = root.join(name);
        for (f, bytes) in files {
            write(dir.join(f), bytes)?;
        }
        dirs.push(dir);
    }
    let text = root.join(HELDOUT.0);
    write(text.clone(), HELDOUT.1)?;
    Ok((dirs, text))
}
