//! Writing results: atomic files, process facts, progress, SVG charts.
pub mod svg;

use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut f = std::fs::File::create(&tmp).map_err(|e| anyhow!("{}: cannot create: {e}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| anyhow!("{}: cannot write: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("{}: cannot rename into place: {e}", path.display()))
}

/// The version of the files `stuffed` writes and reads back (checkpoints, results.json,
/// results.jsonl lines, summary.json); a file of another version, or without one, is refused.
pub const FORMAT_VERSION: u64 = 1;

/// The key holding a sealed file's kind and version, and the key holding its checksum.
const FORMAT_KEY: &str = "stuffed_format";
const CHECKSUM_KEY: &str = "checksum";

/// SHA-256 (hex) of `parts`, each length-prefixed so that no two splits of the same bytes collide.
fn sha256_of(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("{:x}", h.finalize())
}

/// A JSON object `doc` sealed as a file of `kind`: `stuffed_format: {kind, version}` added and a
/// `checksum` over the compact JSON of everything else (so whitespace does not matter, but any
/// value or key does).
pub fn seal(kind: &str, mut doc: serde_json::Value) -> Result<serde_json::Value> {
    let obj = doc.as_object_mut().ok_or_else(|| anyhow!("{kind}: only a JSON object can be sealed"))?;
    obj.remove(CHECKSUM_KEY);
    obj.insert(FORMAT_KEY.into(), serde_json::json!({"kind": kind, "version": FORMAT_VERSION}));
    let sum = sha256_of(&[&serde_json::to_vec(&doc)?]);
    doc[CHECKSUM_KEY] = sum.into();
    Ok(doc)
}

/// How [`unseal`] treats a file without a format version.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Older {
    Refuse,
    /// Read it (the caller warns): `laws` over results.json from before versions existed.
    Accept,
}

/// What [`unseal`] found: a checked document, or an older one read as it stands.
pub struct Unsealed {
    pub doc: serde_json::Value,
    pub older: bool,
}

/// Checks a sealed document of `kind` from `what` (a file, or a file and line): its kind, version
/// and checksum; returns it without the two seal keys. One error line for anything else.
pub fn unseal(what: &str, kind: &str, mut doc: serde_json::Value, older: Older) -> Result<Unsealed> {
    let Some(obj) = doc.as_object_mut() else { bail!("{what}: not a JSON object") };
    let (Some(format), Some(sum)) = (obj.remove(FORMAT_KEY), obj.remove(CHECKSUM_KEY)) else {
        if older == Older::Accept && !obj.contains_key(FORMAT_KEY) {
            return Ok(Unsealed { doc, older: true });
        }
        bail!("{what}: written by an older stuffed; rerun (the file has no format version or checksum)")
    };
    if format["kind"].as_str() != Some(kind) {
        bail!("{what}: not a {kind} file (its format says {})", format["kind"]);
    }
    if format["version"].as_u64() != Some(FORMAT_VERSION) {
        bail!("{what}: format version {} where this stuffed reads {FORMAT_VERSION}; rerun", format["version"]);
    }
    let mut check = doc.clone();
    check[FORMAT_KEY] = format;
    if sum.as_str() != Some(sha256_of(&[&serde_json::to_vec(&check)?]).as_str()) {
        bail!("{what}: checksum mismatch: the file was changed or damaged after stuffed wrote it");
    }
    Ok(Unsealed { doc, older: false })
}

/// Reads and parses a sealed JSON file of `kind` (see [`unseal`]).
pub fn read_sealed(path: &Path, kind: &str, older: Older) -> Result<Unsealed> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let doc = serde_json::from_str(&text).map_err(|e| anyhow!("{}: not JSON: {e}", path.display()))?;
    unseal(&path.display().to_string(), kind, doc, older)
}

/// The checkpoint kind a path names: its file name (`ppl.checkpoint.safetensors`).
fn checkpoint_kind(path: &Path) -> String {
    path.file_name().map_or("checkpoint".into(), |n| n.to_string_lossy().into_owned())
}

/// The checksum of a checkpoint: its kind, snapshot and every tensor (name, dtype, bytes) in name order.
fn checkpoint_sum(kind: &str, snapshot: &str, tensors: &mut [(String, String, &[u8])]) -> String {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parts: Vec<&[u8]> = vec![kind.as_bytes(), snapshot.as_bytes()];
    for (n, d, b) in tensors.iter() {
        parts.extend([n.as_bytes(), d.as_bytes(), *b]);
    }
    sha256_of(&parts)
}

/// A resumable checkpoint at `path`: 1-D tensors (name, f32 or f64 values) and one JSON `snapshot`
/// entry in the safetensors metadata, with the format version and a checksum over all of it,
/// written atomically (a kill leaves the previous one intact).
pub fn save_checkpoint(path: &Path, snapshot: &str, tensors: &[(&str, Values)]) -> Result<()> {
    let kind = checkpoint_kind(path);
    let views = tensors
        .iter()
        .map(|(n, v)| {
            let (dtype, len, bytes) = match v {
                Values::F32(d) => (safetensors::Dtype::F32, d.len(), bytemuck::cast_slice::<f32, u8>(d)),
                Values::F64(d) => (safetensors::Dtype::F64, d.len(), bytemuck::cast_slice::<f64, u8>(d)),
            };
            let t = safetensors::tensor::TensorView::new(dtype, vec![len], bytes);
            t.map(|t| (n.to_string(), t)).map_err(|e| anyhow!("checkpoint tensor {n}: {e:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut parts: Vec<_> = views.iter().map(|(n, t)| (n.clone(), format!("{:?}", t.dtype()), t.data())).collect();
    let meta = HashMap::from([
        ("snapshot".to_string(), snapshot.to_string()),
        (FORMAT_KEY.to_string(), format!("{kind}/{FORMAT_VERSION}")),
        (CHECKSUM_KEY.to_string(), checkpoint_sum(&kind, snapshot, &mut parts)),
    ]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| anyhow!("checkpoint: {e:?}"))?;
    write_atomic(path, &bytes)
}

/// One tensor of a checkpoint.
pub enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// A checkpoint read back: its snapshot, and its tensors to take by name.
pub struct Loaded<T> {
    pub snapshot: T,
    tensors: HashMap<String, Vec<u8>>,
    path: std::path::PathBuf,
}

impl<T> Loaded<T> {
    /// Tensor `name`, which the checkpoint must have.
    pub fn take<V: bytemuck::Pod>(&mut self, name: &str) -> Result<Vec<V>> {
        let v = self.take_opt(name);
        v.ok_or_else(|| anyhow!("{}: checkpoint has no tensor {name}", self.path.display()))
    }
    /// Tensor `name`, if the checkpoint has it.
    pub fn take_opt<V: bytemuck::Pod>(&mut self, name: &str) -> Option<Vec<V>> {
        self.tensors.remove(name).map(|b| bytemuck::pod_collect_to_vec(&b))
    }
}

/// A checkpoint written by [`save_checkpoint`], its `snapshot` JSON parsed as `T`, its version and
/// checksum verified. `what_writes` finishes the error when there is none ("a run writes one every …").
pub fn load_checkpoint<T: serde::de::DeserializeOwned>(path: &Path, what_writes: &str) -> Result<Loaded<T>> {
    if !path.exists() {
        bail!("{}: no checkpoint to resume from ({what_writes})", path.display());
    }
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    parse_checkpoint(path, &bytes)
}

/// [`load_checkpoint`] of bytes already read (`path` names them in errors and gives the kind).
pub fn parse_checkpoint<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<Loaded<T>> {
    let corrupt = |e: &dyn std::fmt::Debug| anyhow!("{}: corrupt checkpoint: {e:?}", path.display());
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(&e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(&e))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let kind = checkpoint_kind(path);
    match meta.get(FORMAT_KEY) {
        None => bail!(
            "{}: written by an older stuffed; rerun (with --overwrite: the checkpoint has no format version)",
            path.display()
        ),
        Some(f) if *f != format!("{kind}/{FORMAT_VERSION}") => {
            bail!("{}: a checkpoint of format {f}, where this stuffed reads {kind}/{FORMAT_VERSION}", path.display())
        }
        Some(_) => {}
    }
    let snapshot = meta.get("snapshot").ok_or_else(|| anyhow!("{}: checkpoint has no snapshot", path.display()))?;
    let mut parts: Vec<_> = st.tensors().into_iter().map(|(n, t)| (n, format!("{:?}", t.dtype()), t.data())).collect();
    if meta.get(CHECKSUM_KEY) != Some(&checkpoint_sum(&kind, snapshot, &mut parts)) {
        bail!("{}: checksum mismatch: the checkpoint was changed or damaged after stuffed wrote it", path.display());
    }
    let tensors = parts.into_iter().map(|(n, _, b)| (n, b.to_vec())).collect();
    let snapshot = serde_json::from_str(snapshot).map_err(|e| anyhow!("{}: corrupt snapshot: {e}", path.display()))?;
    Ok(Loaded { snapshot, tensors, path: path.to_path_buf() })
}

/// A run's fingerprint: the SHA-256 of `key`, the JSON of everything that decides its numbers.
pub fn fingerprint(key: &serde_json::Value) -> Result<String> {
    use sha2::{Digest, Sha256};
    Ok(format!("{:x}", Sha256::digest(serde_json::to_vec(key)?)))
}

/// Where two run keys differ, as `path: old → new` (values shortened), at most eight.
pub fn key_diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn short(v: Option<&serde_json::Value>) -> String {
        let s = v.map_or("(none)".into(), |v| v.to_string());
        if s.chars().count() > 40 {
            format!("{}…", s.chars().take(16).collect::<String>())
        } else {
            s
        }
    }
    fn walk(path: String, a: Option<&serde_json::Value>, b: Option<&serde_json::Value>, out: &mut Vec<String>) {
        use serde_json::Value::{Array, Object};
        match (a, b) {
            (Some(Object(x)), Some(Object(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(p, x.get(k), y.get(k), out);
                }
            }
            (Some(Array(x)), Some(Array(y))) if x.len() == y.len() => {
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(format!("{path}[{i}]"), Some(u), Some(v), out);
                }
            }
            _ if a != b => out.push(format!("{path}: {} → {}", short(a), short(b))),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(String::new(), Some(old), Some(new), &mut out);
    out.truncate(8);
    out
}

/// A model path as a fingerprint names it (canonical when it exists).
pub fn canonical(p: &Path) -> std::path::PathBuf {
    std::fs::canonicalize(p).unwrap_or(p.to_path_buf())
}

/// This machine's memory (MemTotal), in bytes; `None` where /proc is absent.
pub fn mem_total_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?;
    kb.trim().parse::<u64>().ok().map(|k| k * 1024)
}

/// Peak resident memory of this process (VmHWM), in bytes; 0 where /proc is absent.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A progress bar on a terminal; plain lines every 10 s otherwise (logs, batch jobs).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    start: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(label: &str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {human_pos}/{human_len} tok {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar.set_message(label.to_string());
            bar
        });
        Progress { bar, label: label.to_string(), start: Instant::now(), last_line: Instant::now() }
    }

    pub fn set(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if self.last_line.elapsed() >= Duration::from_secs(10) {
            self.last_line = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            eprintln!("{}: {done} tokens, {:.0} tok/s", self.label, done as f64 / secs.max(1e-9));
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
