//! The evaluators: each is the same streamed forward with a different reduction.
pub mod laws;
pub mod passkey;
pub mod ppl;
pub mod probe;

use crate::model::Model;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// What a run does with the checkpoint an earlier run left in its output directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continue {
    /// No flag: refuse a directory holding an unfinished run's checkpoint, rather than lose it.
    Refuse,
    /// `--resume`: continue the checkpoint; with none (killed before its first), start the run and
    /// say so — a requeued array job always passes `--resume`.
    Resume,
    /// `--overwrite`: discard the checkpoint and start again.
    Overwrite,
    /// The no-argument default run: continue its own checkpoint if there is one, else start.
    Auto,
}

impl Continue {
    pub fn from_flags(resume: bool, overwrite: bool) -> Result<Continue> {
        match (resume, overwrite) {
            (true, true) => bail!("--resume and --overwrite exclude each other"),
            (true, false) => Ok(Continue::Resume),
            (false, true) => Ok(Continue::Overwrite),
            (false, false) => Ok(Continue::Refuse),
        }
    }

    /// Whether to resume the unfinished run in `dir`, whose files are `unfinished` (a checkpoint,
    /// records without a summary; those that exist count), `cmd` naming the command in messages:
    /// refuses to lose one without a flag, removes them on `--overwrite`.
    pub fn resumes(self, cmd: &str, dir: &Path, unfinished: &[std::path::PathBuf]) -> Result<bool> {
        let found: Vec<_> = unfinished.iter().filter(|f| f.exists()).collect();
        match (self, found.first()) {
            (Continue::Refuse, Some(f)) => bail!(
                "{}: {} holds an unfinished {cmd} run; continue it with --resume, or discard it with --overwrite",
                f.display(),
                dir.display()
            ),
            (Continue::Overwrite, Some(_)) => {
                for f in &found {
                    std::fs::remove_file(f).map_err(|e| anyhow!("{}: cannot remove: {e}", f.display()))?;
                }
                eprintln!("{cmd}: discarded the unfinished run in {} (--overwrite)", dir.display());
                Ok(false)
            }
            (Continue::Resume | Continue::Auto, Some(_)) => Ok(true),
            (Continue::Resume, None) => {
                eprintln!("{cmd}: nothing to resume in {}; starting the run from the beginning", dir.display());
                Ok(false)
            }
            (_, None) => Ok(false),
        }
    }
}

/// A model as a run's fingerprint knows it: by content (config and every tensor: name, dtype,
/// shape, bytes), not by path, so the same model reached by another path resumes.
pub fn model_key(model: &Model) -> serde_json::Value {
    serde_json::json!({"content": model.content_id()})
}

/// The refusal of a checkpoint (or result) made by another run: says what differs between its key
/// `old` and this run's `new`.
pub fn other_run(file: &Path, old: &serde_json::Value, new: &serde_json::Value) -> anyhow::Error {
    let diffs = crate::report::key_diff(old, new);
    anyhow!(
        "{}: made by another run ({}); refusing to resume (use --overwrite to discard it, or another --out)",
        file.display(),
        if diffs.is_empty() { "its fingerprint differs".into() } else { diffs.join("; ") }
    )
}
