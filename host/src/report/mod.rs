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
/// entry in the safetensors metadata, written atomically (a kill leaves the previous one intact).
pub fn save_checkpoint(path: &Path, snapshot: &str, tensors: &[(&str, Values)]) -> Result<()> {
    let meta = HashMap::from([("snapshot".to_string(), snapshot.to_string())]);
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

/// A checkpoint written by [`save_checkpoint`], its `snapshot` JSON parsed as `T`. `what_writes`
/// finishes the error when there is none ("a run writes one every …").
pub fn load_checkpoint<T: serde::de::DeserializeOwned>(path: &Path, what_writes: &str) -> Result<Loaded<T>> {
    if !path.exists() {
        bail!("{}: no checkpoint to resume from ({what_writes})", path.display());
    }
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: corrupt checkpoint: {e:?}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: corrupt checkpoint: {e:?}", path.display()))?;
    let snapshot = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("snapshot"))
        .ok_or_else(|| anyhow!("{}: checkpoint has no snapshot", path.display()))?;
    let snapshot = serde_json::from_str(snapshot).map_err(|e| anyhow!("{}: corrupt snapshot: {e}", path.display()))?;
    let tensors = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    Ok(Loaded { snapshot, tensors, path: path.to_path_buf() })
}

/// A run's fingerprint: the SHA-256 of `key`, the JSON of everything that decides its numbers.
pub fn fingerprint(key: &serde_json::Value) -> Result<String> {
    use sha2::{Digest, Sha256};
    Ok(format!("{:x}", Sha256::digest(serde_json::to_vec(key)?)))
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
