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

/// Forwards bytes to `inner` and into a SHA-256, holding back the last two (a JSON object's closing
/// brace, and the line break before it when pretty) so members can be added after the body.
struct SealWriter<'w, W: Write> {
    inner: &'w mut W,
    hash: sha2::Sha256,
    held: Vec<u8>,
}

impl<W: Write> SealWriter<'_, W> {
    fn emit(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use sha2::Digest;
        self.hash.update(bytes);
        self.inner.write_all(bytes)
    }
}

impl<W: Write> Write for SealWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.held.extend_from_slice(buf);
        if self.held.len() > 2 {
            let out: Vec<u8> = self.held.drain(..self.held.len() - 2).collect();
            self.emit(&out)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `value` (a non-empty JSON object) to `w` sealed as a file of `kind`: its members as
/// serde writes them (streamed: nothing of the document is held), then `stuffed_format: {kind,
/// version}`, then last `checksum`: the SHA-256 of every byte before the comma that opens it.
/// Pretty for files, compact for one results.jsonl line.
fn seal_into<W: Write>(w: &mut W, kind: &str, value: &impl serde::Serialize, pretty: bool) -> Result<()> {
    use sha2::Digest;
    let mut sw = SealWriter { inner: w, hash: sha2::Sha256::new(), held: Vec::new() };
    if pretty {
        serde_json::to_writer_pretty(&mut sw, value)?;
    } else {
        serde_json::to_writer(&mut sw, value)?;
    }
    let held = std::mem::take(&mut sw.held);
    let body_end: &[u8] = match (pretty, held.as_slice()) {
        (true, b"\n}") => b"",
        (false, [c, b'}']) if *c != b'{' => &held[..1],
        _ => bail!("{kind}: only a non-empty JSON object can be sealed"),
    };
    sw.emit(body_end)?;
    let (sep, colon) = if pretty { (",\n  ", ": ") } else { (",", ":") };
    let format = format!(
        "{sep}\"{FORMAT_KEY}\"{colon}{{\"kind\"{colon}{},\"version\"{colon}{FORMAT_VERSION}}}",
        serde_json::to_string(kind)?
    );
    sw.emit(format.as_bytes())?;
    let sum = format!("{:x}", sw.hash.finalize());
    let end = if pretty { "\n}\n" } else { "}" };
    w.write_all(format!("{sep}\"{CHECKSUM_KEY}\"{colon}\"{sum}\"{end}").as_bytes())?;
    Ok(())
}

/// `value` sealed (see `seal_into`) as text: pretty, or compact for one results.jsonl line.
pub fn sealed_json(kind: &str, value: &impl serde::Serialize, pretty: bool) -> Result<String> {
    let mut out = Vec::new();
    seal_into(&mut out, kind, value, pretty)?;
    Ok(String::from_utf8(out)?)
}

/// A parsed document sealed again as `kind`, its old seal members dropped first: what a tool that
/// edits a file on purpose (a test, the fuzzer) must do to get past the checksum.
pub fn reseal(kind: &str, mut doc: serde_json::Value, pretty: bool) -> Result<String> {
    if let Some(obj) = doc.as_object_mut() {
        obj.remove(FORMAT_KEY);
        obj.remove(CHECKSUM_KEY);
    }
    sealed_json(kind, &doc, pretty)
}

/// Writes `value` sealed as `kind` to `path`, atomically and streamed.
pub fn write_sealed(path: &Path, kind: &str, value: &impl serde::Serialize) -> Result<()> {
    write_atomic_with(path, |w| seal_into(w, kind, value, true))
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

/// Checks the sealed text of a document of `kind` from `what` (a file, or a file and line): its
/// checksum over the bytes before the last member (which must be the checksum and nothing else
/// may follow), its kind and version; returns it parsed, without the two seal members.
pub fn unseal(what: &str, kind: &str, text: &str, older: Older) -> Result<Unsealed> {
    use sha2::Digest;
    let mut doc: serde_json::Value = serde_json::from_str(text).map_err(|e| anyhow!("{what}: not JSON: {e}"))?;
    let Some(obj) = doc.as_object_mut() else { bail!("{what}: not a JSON object") };
    let (Some(format), Some(sum)) = (obj.remove(FORMAT_KEY), obj.remove(CHECKSUM_KEY)) else {
        if older == Older::Accept && !obj.contains_key(FORMAT_KEY) && !obj.contains_key(CHECKSUM_KEY) {
            return Ok(Unsealed { doc, older: true });
        }
        bail!("{what}: written by an older stuffed; rerun (the file has no format version or checksum)")
    };
    let damaged = || anyhow!("{what}: checksum mismatch: the file was changed or damaged after stuffed wrote it");
    let key = format!("\"{CHECKSUM_KEY}\"");
    let at = text.rfind(&key).ok_or_else(damaged)?;
    let comma = text[..at].rfind(',').filter(|&c| text[c + 1..at].trim().is_empty()).ok_or_else(damaged)?;
    let rest: String = text[at..].chars().filter(|c| !c.is_whitespace()).collect();
    let sum = sum.as_str().ok_or_else(damaged)?;
    if rest != format!("{key}:\"{sum}\"}}") || format!("{:x}", sha2::Sha256::digest(&text.as_bytes()[..comma])) != sum {
        return Err(damaged());
    }
    if format["kind"].as_str() != Some(kind) {
        bail!("{what}: not a {kind} file (its format says {})", format["kind"]);
    }
    if format["version"].as_u64() != Some(FORMAT_VERSION) {
        bail!("{what}: format version {} where this stuffed reads {FORMAT_VERSION}; rerun", format["version"]);
    }
    Ok(Unsealed { doc, older: false })
}

/// Reads a sealed JSON file of `kind` (see [`unseal`]).
pub fn read_sealed(path: &Path, kind: &str, older: Older) -> Result<Unsealed> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    unseal(&path.display().to_string(), kind, &text, older)
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

/// Writes `path` atomically as [`write_atomic`] does, its bytes streamed by `write` through a buffer
/// (nothing of the file's size is held in memory).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let f = std::fs::File::create(&tmp).map_err(|e| anyhow!("{}: cannot create: {e}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let written = write(&mut w).and_then(|_| Ok(w.into_inner().map_err(|e| e.into_error())?.sync_all()?));
    written.map_err(|e| anyhow!("{}: cannot write: {e:#}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("{}: cannot rename into place: {e}", path.display()))
}

/// `value` as pretty JSON in `path`, written atomically and streamed: no JSON tree or text of the
/// whole file is built in memory (a run's accumulators grow with its length).
pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomic_with(path, |w| Ok(serde_json::to_writer_pretty(w, value)?))
}

/// Gives `path` the mode a newly created file gets (0666 less the umask: 0644 under umask 022). For
/// files written through a temp file that is made owner-only (safetensors' `serialize_to_file`).
pub fn set_created_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The umask from /proc (reading it with umask(2) would change it for a moment, for every thread).
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0o022);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask))
            .map_err(|e| anyhow!("{}: cannot set its mode: {e}", path.display()))?;
    }
    Ok(())
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

/// Where a scorer's state sits in a checkpoint: the run's own, or (passkey) a sample's tail held
/// beside the haystack's. One naming for every evaluator's save and resume.
#[derive(Clone, Copy, Debug)]
pub enum StateSlot {
    Run,
    Tail,
}

impl StateSlot {
    /// The tensor names of the state and of the pending row.
    fn names(self) -> [&'static str; 2] {
        match self {
            StateSlot::Run => ["state", "pending"],
            StateSlot::Tail => ["tail_state", "tail_pending"],
        }
    }

    /// `s` as checkpoint tensors (its τ travels in the snapshot).
    pub fn tensors(self, s: &crate::backend::ScorerState) -> Vec<(&'static str, Values<'_>)> {
        let [state, pending] = self.names();
        let mut v = vec![(state, Values::F32(&s.state))];
        v.extend(s.pending.as_deref().map(|p| (pending, Values::F32(p))));
        v
    }
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
    /// The scorer state saved in `slot` ([`StateSlot::tensors`]), with τ from the snapshot.
    pub fn take_state(&mut self, slot: StateSlot, tau: Vec<f32>) -> Result<crate::backend::ScorerState> {
        let [state, pending] = slot.names();
        Ok(crate::backend::ScorerState { state: self.take(state)?, pending: self.take_opt(pending), tau })
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
