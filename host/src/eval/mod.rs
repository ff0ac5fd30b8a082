//! The evaluators: each is the same streamed forward with a different reduction.
pub mod calibrate;
pub mod effrem;
pub mod feed;
pub mod laws;
pub mod longmamba;
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

/// A run's key (its model by content, its inputs by name and SHA-256 `hashes`, its options, the
/// matmul mode) and the key's fingerprint, which a checkpoint must carry to be resumed.
pub fn run_key(
    model: &Model,
    inputs: &[crate::text::Input],
    hashes: &[String],
    options: &impl serde::Serialize,
) -> Result<(serde_json::Value, String)> {
    let mut key = serde_json::json!({
        "model": model_key(model),
        "inputs": inputs.iter().map(crate::text::Input::name).collect::<Vec<_>>(),
        "hashes": hashes,
        "options": options,
    });
    crate::exec::mark_matmul_mode(&mut key, model.matrix_dtypes());
    let fp = crate::report::fingerprint(&key)?;
    Ok((key, fp))
}

/// The sealed JSON checkpoint `ckpt` (of `kind`, holding `fingerprint` and `key`) of `cmd`'s run in
/// `out`, when `cont` resumes one: refused when another run (another fingerprint) made it.
pub fn resume_sealed<T: serde::de::DeserializeOwned>(
    cmd: &str,
    cont: Continue,
    out: &Path,
    ckpt: &Path,
    kind: &str,
    (key, fp): (&serde_json::Value, &str),
) -> Result<Option<T>> {
    if !cont.resumes(cmd, out, &[ckpt.to_path_buf()])? {
        return Ok(None);
    }
    let doc = crate::report::read_sealed(ckpt, kind, crate::report::Older::Refuse)?.doc;
    if doc.get("fingerprint").and_then(|f| f.as_str()) != Some(fp) {
        return Err(other_run(ckpt, doc.get("key").unwrap_or(&serde_json::Value::Null), key));
    }
    serde_json::from_value(doc).map(Some).map_err(|e| anyhow!("{}: not a {cmd} checkpoint: {e}", ckpt.display()))
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

/// When a long run writes its checkpoint: every `secs` seconds and every `tokens` tokens since the
/// last one, when the run stops on purpose, and at SIGINT/SIGTERM (which then end the run). One
/// cadence for ppl, probe and passkey.
pub struct Cadence {
    secs: Option<f64>,
    tokens: Option<u64>,
    last: std::time::Instant,
    since: u64,
}

/// Why a checkpoint is due: a signal (the run then ends, saying which) or the cadence / a stop.
pub struct Due {
    pub signal: Option<&'static str>,
}

impl Cadence {
    pub fn new(secs: Option<f64>, tokens: Option<u64>) -> Self {
        Cadence { secs, tokens, last: std::time::Instant::now(), since: 0 }
    }

    /// `n` more tokens were fed.
    pub fn fed(&mut self, n: u64) {
        self.since += n;
    }

    /// Whether a checkpoint is due now (`stop`: the run stops here on purpose).
    pub fn due(&self, stop: bool) -> Option<Due> {
        let signal = crate::interrupt::raised();
        let timed = self.secs.is_some_and(|s| self.last.elapsed().as_secs_f64() >= s)
            || self.tokens.is_some_and(|n| self.since >= n);
        (stop || timed || signal.is_some()).then_some(Due { signal })
    }

    /// A checkpoint was written: the next one counts from here.
    pub fn saved(&mut self) {
        (self.last, self.since) = (std::time::Instant::now(), 0);
    }
}

/// `ln Σ exp(row)` in f64, shifted by the row's largest value (a logits row's log-normaliser).
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// The `matmul` record of a merge, from its shards' (`(results file, record)`; none for a shard
/// run on the GPU): theirs when they agree; when their CPU kernels differ, the mode and each
/// shard's record. Shards whose CPU products ran in different modes (`--fast-matmul` where it
/// applies, and not) are refused, as a checkpoint is refused across modes: before, a merge recorded
/// the merging process's own kernel and mode, whatever its shards had run.
pub fn merged_matmul(shards: &[(&Path, Option<&serde_json::Value>)]) -> Result<Option<serde_json::Value>> {
    let Some(&(_, first)) = shards.first() else { return Ok(None) };
    if shards.iter().all(|&(_, r)| r == first) {
        return Ok(first.cloned());
    }
    let mode = |r: &serde_json::Value| r["mode"].as_str().unwrap_or("an unrecorded").to_string();
    let cpu: Vec<(&Path, &serde_json::Value)> = shards.iter().filter_map(|&(p, r)| r.map(|r| (p, r))).collect();
    if let Some(&(p0, r0)) = cpu.first() {
        if let Some(&(p, r)) = cpu.iter().find(|&&(_, r)| mode(r) != mode(r0)) {
            bail!(
                "{}: its products ran in {} mode, {}'s in {}: the shards of one run share a matmul mode (--fast-matmul where it applies)",
                p.display(),
                mode(r),
                p0.display(),
                mode(r0)
            );
        }
    }
    Ok(Some(serde_json::json!({
        "mode": cpu.first().map(|&(_, r)| mode(r)),
        "per_shard": shards.iter().map(|&(_, r)| r.cloned()).collect::<Vec<_>>(),
    })))
}
