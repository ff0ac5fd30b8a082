//! Checkpoints on disk → named tensor views over memory maps.
//!
//! `Checkpoint::open(path)` accepts a file (`*.safetensors`, `*.bin`, `*.pth`) or a directory holding
//! `model.safetensors`, `model.safetensors.index.json` (shards), `pytorch_model.bin` or
//! `pytorch_model.bin.index.json`. Every tensor is a view into a memory map; a tensor whose bytes are
//! not aligned to its element size is copied once at open into an aligned buffer the checkpoint owns.
//! A pickle is never executed: `torch_zip` reads `data.pkl` with a restricted unpickler.

mod safetensors;
mod torch_zip;

pub use torch_zip::crc32;

use anyhow::{anyhow, bail, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// `--verify-weights`: check each torch zip member's data against its CRC-32 at open (reads every
/// byte of the file; safetensors files carry no checksum). Off by default: maps of many GB are then
/// only read as the model uses them.
static VERIFY_WEIGHTS: AtomicBool = AtomicBool::new(false);

/// Sets whether [`Checkpoint::open`] verifies torch zip members' CRC-32 (`--verify-weights`).
pub fn set_verify_weights(on: bool) {
    VERIFY_WEIGHTS.store(on, Ordering::Relaxed);
}

/// Parses one checkpoint file's bytes as [`Checkpoint::open`] does (by its magic bytes) and checks
/// every tensor lies in the file, without mapping it; for the fuzz harness. `verify`: as
/// `--verify-weights`. Returns the number of tensors.
pub fn parse_bytes(buf: &[u8], verify: bool) -> Result<usize> {
    if buf.len() < 8 {
        bail!("truncated ({} bytes), not a checkpoint", buf.len());
    }
    let raw = if buf.starts_with(b"PK\x03\x04") {
        torch_zip::parse(buf, verify)?
    } else if buf.get(8) == Some(&b'{') {
        safetensors::parse(buf)?
    } else {
        bail!("neither a safetensors file nor a torch zip (unknown magic bytes)");
    };
    for t in &raw {
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let fits = buf.get(t.start..t.end).is_some();
        if !fits || numel.and_then(|n| n.checked_mul(t.dtype.size())) != Some(t.end - t.start) {
            bail!("tensor {} lies outside the file or does not hold its shape", t.name);
        }
    }
    Ok(raw.len())
}

/// Runs the torch zip unpickler over a `data.pkl`'s bytes (for the fuzz harness).
pub fn unpickle_bytes(data: &[u8]) -> Result<()> {
    torch_zip::unpickle(data)
}

/// The `data.pkl` of a torch zip file's bytes (fuzz seeds).
pub fn torch_pickle(buf: &[u8]) -> Result<Vec<u8>> {
    torch_zip::pickle_of(buf)
}

/// Element types a checkpoint may hold (little-endian, row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element (also the alignment every view is guaranteed to have).
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The safetensors spelling, used in messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The container a checkpoint came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    TorchZip,
}

/// One tensor: `bytes` is aligned to `dtype.size()` and holds exactly `numel · size` bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    pub file: &'a Path,
    /// Where an f32 tensor keeps its bf16 halves for the AMX level, once a product there asks.
    pub split: &'a SplitCell,
}

impl<'a> TensorView<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn typed<T: bytemuck::Pod>(&self, want: DType) -> Result<&'a [T]> {
        if self.dtype != want {
            bail!("{}: tensor {} is {}, expected {want}", self.file.display(), self.name, self.dtype);
        }
        bytemuck::try_cast_slice(self.bytes).map_err(|e| anyhow!("{}: tensor {}: {e}", self.file.display(), self.name))
    }

    pub fn as_f32(&self) -> Result<&'a [f32]> {
        self.typed(DType::F32)
    }

    pub fn as_bf16(&self) -> Result<&'a [half::bf16]> {
        self.typed(DType::BF16)
    }

    pub fn as_f16(&self) -> Result<&'a [half::f16]> {
        self.typed(DType::F16)
    }

    /// Integer tensors (token ids) widened to i64.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let b = self.bytes;
        Ok(match self.dtype {
            DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default())).collect(),
            DType::I32 => {
                b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64).collect()
            }
            DType::I16 => {
                b.chunks_exact(2).map(|c| i16::from_le_bytes(c.try_into().unwrap_or_default()) as i64).collect()
            }
            DType::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            DType::U8 => b.iter().map(|&x| x as i64).collect(),
            d => bail!("{}: tensor {} is {d}, expected an integer dtype", self.file.display(), self.name),
        })
    }
}

/// A tensor found by a format parser: `bytes[start..end]` of the file it was parsed from.
/// Parsers check `end - start == numel · size` and that the range lies in the file.
struct RawTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Where a tensor's bytes live: in a file's map, or in an owned aligned copy.
enum Loc {
    Map { start: usize, end: usize },
    Owned { buf: usize, len: usize },
}

struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    file: usize,
    loc: Loc,
    split: SplitCell,
    /// Whether a loader asked for it ([`Checkpoint::unused`]).
    used: std::sync::atomic::AtomicBool,
}

/// An f32 tensor's bf16 halves `hi + lo` ([`stuffed_core::SplitHalves`]), made on the first
/// product of more than one row on the AMX level and kept with the checkpoint: 4 bytes a weight
/// beside its f32 values, paid only by tensors that run there (issue 22 asks f32 weights on the
/// tiles to be split "once at load or per chunk"; this is once, at first use — `gemm_sweep amx-f32`
/// times both). `None` inside when the memory could not be had: the product then runs on f32.
#[derive(Default)]
pub struct SplitCell {
    halves: std::sync::OnceLock<Option<Halves>>,
    /// Lent to a core weight ([`SplitCell::lend`]): what `info` counts as the most it may take.
    lent: AtomicBool,
}

struct Halves {
    /// The address of the f32 values they were made from: a call with other values gets none.
    from: usize,
    hi: Vec<half::bf16>,
    lo: Vec<half::bf16>,
}

impl fmt::Debug for SplitCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SplitCell({} bytes)", self.bytes())
    }
}

impl SplitCell {
    /// This cell as a core weight's [`stuffed_core::SplitSource`], marked as lent.
    pub fn lend(&self) -> &dyn stuffed_core::SplitSource {
        self.lent.store(true, Ordering::Relaxed);
        self
    }

    /// Bytes of the halves made so far (0 before the first product on the AMX level).
    pub fn bytes(&self) -> usize {
        match self.halves.get() {
            Some(Some(h)) => (h.hi.len() + h.lo.len()) * 2,
            _ => 0,
        }
    }
}

impl stuffed_core::SplitSource for SplitCell {
    fn halves(&self, w: &[f32]) -> Option<stuffed_core::SplitHalves<'_>> {
        let h = self.halves.get_or_init(|| split_halves(w)).as_ref()?;
        (h.from == w.as_ptr() as usize && h.hi.len() == w.len())
            .then_some(stuffed_core::SplitHalves { hi: &h.hi, lo: &h.lo })
    }
}

/// `w` as bf16 `hi + lo` (round to nearest even, then the remainder rounded), or `None` with a line
/// on stderr when the allocator refuses the 4 bytes a weight.
fn split_halves(w: &[f32]) -> Option<Halves> {
    let mut hi: Vec<half::bf16> = Vec::new();
    let mut lo: Vec<half::bf16> = Vec::new();
    if hi.try_reserve_exact(w.len()).is_err() || lo.try_reserve_exact(w.len()).is_err() {
        eprintln!(
            "stuffed: no memory for the bf16 halves of an f32 weight ({} MiB): it runs on the f32 kernel",
            (w.len() * 4) >> 20
        );
        return None;
    }
    hi.resize(w.len(), half::bf16::ZERO);
    lo.resize(w.len(), half::bf16::ZERO);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw") {
        // SAFETY: the features were checked; the three slices have one length.
        unsafe { stuffed_core::gemm::bf16::split_values(w, &mut hi, &mut lo) };
        return Some(Halves { from: w.as_ptr() as usize, hi, lo });
    }
    split_scalar(w, &mut hi, &mut lo);
    Some(Halves { from: w.as_ptr() as usize, hi, lo })
}

/// [`stuffed_core::gemm::bf16::split_values`] in scalar code, for a CPU without AVX512-BF16 (where
/// only a test's executor asks for the AMX level); it keeps denormals, which that reads as zero.
fn split_scalar(w: &[f32], hi: &mut [half::bf16], lo: &mut [half::bf16]) {
    for ((&v, h), l) in w.iter().zip(hi).zip(lo) {
        *h = half::bf16::from_f32(v);
        *l = if v.is_finite() { half::bf16::from_f32(v - h.to_f32()) } else { half::bf16::ZERO };
    }
}

/// Named tensors of one checkpoint (all shards), backed by memory maps.
pub struct Checkpoint {
    origin: PathBuf,
    dir: PathBuf,
    format: Format,
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    /// u64 storage so copies are aligned for every dtype.
    owned: Vec<Vec<u64>>,
    tensors: BTreeMap<String, Entry>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
        let mut ck = Checkpoint {
            origin: path.to_path_buf(),
            dir: path.to_path_buf(),
            format: Format::Safetensors,
            files: Vec::new(),
            maps: Vec::new(),
            owned: Vec::new(),
            tensors: BTreeMap::new(),
        };
        if !meta.is_dir() {
            ck.dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            ck.format = ck.add_file(path)?;
            return Ok(ck);
        }
        for (single, index, format) in [
            ("model.safetensors", "model.safetensors.index.json", Format::Safetensors),
            ("pytorch_model.bin", "pytorch_model.bin.index.json", Format::TorchZip),
        ] {
            let (single, index) = (path.join(single), path.join(index));
            if single.is_file() {
                ck.format = ck.add_file(&single)?;
                return Ok(ck);
            }
            if index.is_file() {
                ck.format = format;
                ck.add_shards(&index)?;
                return Ok(ck);
            }
        }
        bail!(
            "{}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or \
             pytorch_model.bin.index.json in this directory",
            path.display()
        )
    }

    /// The path it was opened from (a file or a directory).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The directory holding config.json (for a file: its parent).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The tensor `name`, marked as used (see [`Checkpoint::unused`]).
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let v = self.peek(name)?;
        if let Some(e) = self.tensors.get(name) {
            e.used.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Some(v)
    }

    /// The tensor `name` without marking it used: for sizes, hashes and probes, not for weights.
    pub fn peek(&self, name: &str) -> Option<TensorView<'_>> {
        let (name, e) = self.tensors.get_key_value(name)?;
        let bytes = match e.loc {
            Loc::Map { start, end } => &self.maps[e.file][start..end],
            Loc::Owned { buf, len } => &bytemuck::cast_slice(&self.owned[buf])[..len],
        };
        Some(TensorView { name, dtype: e.dtype, shape: &e.shape, bytes, file: &self.files[e.file], split: &e.split })
    }

    pub fn require(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name).ok_or_else(|| anyhow!("{}: missing tensor {name}", self.origin.display()))
    }

    /// Names of the tensors no loader asked for ([`Checkpoint::get`]), sorted: weights a model
    /// would run without, which may change its math.
    pub fn unused(&self) -> Vec<&str> {
        self.names().filter(|n| !self.is_used(n)).collect()
    }

    /// Adds a file beside the checkpoint (an RWKV state-tuning file, `--state-file`): its tensors
    /// join the checkpoint's, a name both hold is refused. Returns its index for
    /// [`Checkpoint::names_in`].
    pub fn add_beside(&mut self, path: &Path) -> Result<usize> {
        self.add_file(path)?;
        Ok(self.files.len() - 1)
    }

    /// Names of the tensors of file `file` ([`Checkpoint::add_beside`]), sorted.
    pub fn names_in(&self, file: usize) -> impl Iterator<Item = &str> {
        self.tensors.iter().filter(move |(_, e)| e.file == file).map(|(n, _)| n.as_str())
    }

    /// Whether a loader asked for tensor `name` ([`Checkpoint::get`]).
    pub fn is_used(&self, name: &str) -> bool {
        self.tensors.get(name).is_some_and(|e| e.used.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Bytes of the bf16 halves made for f32 tensors on the AMX level so far ([`SplitCell`]).
    pub fn split_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.split.bytes()).sum()
    }

    /// The most those halves may take: 4 bytes a weight of every tensor whose cell was lent to a
    /// model (a lent tensor that no product of rows > 1 reads on the AMX level, such as an untied
    /// embedding, never makes them).
    pub fn split_bytes_at_most(&self) -> usize {
        let numel = |e: &Entry| e.shape.iter().product::<usize>();
        self.tensors.values().filter(|e| e.split.lent.load(Ordering::Relaxed)).map(|e| numel(e) * 4).sum()
    }

    /// Bytes of all tensors (a tied tensor counts once per name).
    pub fn total_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|e| match e.loc {
                Loc::Map { start, end } => end - start,
                Loc::Owned { len, .. } => len,
            })
            .sum()
    }

    /// Maps one file, parses it by its magic bytes and adds its tensors.
    fn add_file(&mut self, path: &Path) -> Result<Format> {
        let file = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < 8 {
            bail!("{}: truncated ({len} bytes), not a checkpoint", path.display());
        }
        // SAFETY: the map is read-only; modifying the file while it is open is outside our contract.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{}: cannot map: {e}", path.display()))?;
        let (format, raw) = if map.starts_with(b"PK\x03\x04") {
            (Format::TorchZip, torch_zip::parse(&map, VERIFY_WEIGHTS.load(Ordering::Relaxed)))
        } else if map.get(8) == Some(&b'{') {
            (Format::Safetensors, safetensors::parse(&map))
        } else {
            bail!("{}: neither a safetensors file nor a torch zip (unknown magic bytes)", path.display());
        };
        let raw = raw.map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        let file_idx = self.files.len();
        for t in raw {
            if self.tensors.contains_key(&t.name) {
                bail!(
                    "{}: tensor {} also appears in {}",
                    path.display(),
                    t.name,
                    self.files[self.tensors[&t.name].file].display()
                );
            }
            let bytes = map
                .get(t.start..t.end)
                .ok_or_else(|| anyhow!("{}: tensor {} lies outside the file", path.display(), t.name))?;
            let loc = if (bytes.as_ptr() as usize).is_multiple_of(t.dtype.size()) {
                Loc::Map { start: t.start, end: t.end }
            } else {
                let mut buf = vec![0u64; bytes.len().div_ceil(8)];
                bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(bytes);
                self.owned.push(buf);
                Loc::Owned { buf: self.owned.len() - 1, len: bytes.len() }
            };
            let entry = Entry {
                dtype: t.dtype,
                shape: t.shape,
                file: file_idx,
                loc,
                split: SplitCell::default(),
                used: Default::default(),
            };
            self.tensors.insert(t.name, entry);
        }
        self.files.push(path.to_path_buf());
        self.maps.push(map);
        Ok(format)
    }

    /// Opens every shard an index names and checks each named tensor is in its shard.
    fn add_shards(&mut self, index: &Path) -> Result<()> {
        let text = std::fs::read_to_string(index).map_err(|e| anyhow!("{}: cannot read: {e}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards = BTreeSet::new();
        let plain = |s: &&str| Path::new(s).file_name() == Some(OsStr::new(s));
        for (name, shard) in map {
            let Some(file) = shard.as_str().filter(plain) else {
                bail!("{}: tensor {name} maps to {shard}, not a file name", index.display());
            };
            shards.insert(file);
        }
        for shard in shards {
            let format = self.add_file(&dir.join(shard))?;
            if format != self.format {
                bail!("{}: shard {shard} is {format:?}, expected {:?}", index.display(), self.format);
            }
        }
        for (name, shard) in map {
            let found = self.tensors.get(name).and_then(|e| self.files[e.file].file_name());
            if found != shard.as_str().map(OsStr::new) {
                bail!("{}: tensor {name} is not in shard {shard}", index.display());
            }
        }
        Ok(())
    }
}

/// Per-test scratch files in the system temp directory.
#[cfg(test)]
pub(crate) fn temp_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("stuffed-ck-{}-{n}-{tag}", std::process::id()))
}

#[cfg(test)]
mod tests {
    /// A cell makes the halves of the values it is first asked for, once, within 2⁻¹⁶ of each value;
    /// hands them out again for the same values only; counts their bytes; the scalar split is the
    /// AVX-512 one where the CPU has it.
    #[test]
    fn split_cell_makes_one_weights_halves_once() {
        use stuffed_core::SplitSource;
        let mut w: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 * 1.37e-3 - 0.61).collect();
        w[3] = f32::INFINITY;
        w[4] = -1e30;
        let cell = super::SplitCell::default();
        assert_eq!(cell.bytes(), 0);
        let Some(h) = cell.halves(&w) else { panic!("no halves") };
        for (i, &v) in w.iter().enumerate() {
            let (hi, lo) = (h.hi[i].to_f32(), h.lo[i].to_f32());
            if v.is_finite() {
                assert!((v as f64 - hi as f64 - lo as f64).abs() <= 2f64.powi(-16) * (v as f64).abs(), "{v} at {i}");
            } else {
                assert_eq!((hi, lo), (v, 0.0));
            }
        }
        assert_eq!(cell.bytes(), w.len() * 4);
        let Some(again) = cell.halves(&w) else { panic!("no halves the second time") };
        assert_eq!((again.hi.as_ptr(), again.lo.as_ptr()), (h.hi.as_ptr(), h.lo.as_ptr()), "made twice");
        let other = w.clone();
        assert!(cell.halves(&other).is_none(), "another weight's values got this one's halves");
        assert!(cell.halves(&w[..999]).is_none(), "a shorter view got the whole weight's halves");
        let (mut hi, mut lo) = (vec![half::bf16::ZERO; w.len()], vec![half::bf16::ZERO; w.len()]);
        super::split_scalar(&w, &mut hi, &mut lo);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw") {
            assert_eq!((&hi[..], &lo[..]), (h.hi, h.lo), "the scalar split is not the AVX-512 one");
        }
    }

    use super::*;
    use std::collections::HashMap;

    fn st(tensors: &[(&str, DType, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                let d = match d {
                    DType::F32 => ::safetensors::Dtype::F32,
                    DType::BF16 => ::safetensors::Dtype::BF16,
                    DType::I64 => ::safetensors::Dtype::I64,
                    _ => unreachable!(),
                };
                let v = ::safetensors::tensor::TensorView::new(d, s.clone(), b).unwrap();
                (n.to_string(), v)
            })
            .collect();
        ::safetensors::serialize(views, None::<HashMap<String, String>>).unwrap()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn directory_with_shards() {
        let dir = temp_path("shards");
        std::fs::create_dir_all(&dir).unwrap();
        let a = st(&[("a", DType::F32, vec![2], f32s(&[1.0, 2.0]))]);
        let b = st(&[
            ("b", DType::F32, vec![1], f32s(&[3.0])),
            ("c", DType::I64, vec![2], bytemuck::cast_slice(&[7i64, -1]).to_vec()),
        ]);
        std::fs::write(dir.join("s1.safetensors"), a).unwrap();
        std::fs::write(dir.join("s2.safetensors"), &b).unwrap();
        let index = r#"{"metadata":{"total_size":28},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors","c":"s2.safetensors"}}"#;
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.format(), Format::Safetensors);
        assert_eq!(ck.dir(), dir.as_path());
        assert_eq!(ck.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(ck.require("a").unwrap().as_f32().unwrap(), [1.0, 2.0]);
        assert_eq!(ck.require("c").unwrap().to_i64_vec().unwrap(), [7, -1]);
        assert!(ck.require("c").unwrap().as_f32().is_err());
        assert_eq!(ck.total_bytes(), 28);
        let err = ck.require("zz").unwrap_err().to_string();
        assert!(err.contains("missing tensor zz"), "{err}");

        // The same name in two shards.
        std::fs::write(dir.join("s1.safetensors"), &b).unwrap();
        let index = r#"{"weight_map":{"b":"s1.safetensors","c":"s2.safetensors"}}"#;
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
        let err = format!("{:#}", Checkpoint::open(&dir).err().unwrap());
        assert!(err.contains("also appears in"), "{err}");

        // A missing shard names the file.
        let index = r#"{"weight_map":{"b":"s9.safetensors"}}"#;
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
        let err = format!("{:#}", Checkpoint::open(&dir).err().unwrap());
        assert!(err.contains("s9.safetensors"), "{err}");

        // model.safetensors wins over the index.
        std::fs::write(dir.join("model.safetensors"), &b).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.names().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();

        let err = format!("{:#}", Checkpoint::open(&dir).err().unwrap());
        assert!(err.contains("cannot open"), "{err}");
    }

    #[test]
    fn unknown_magic_and_tiny_files() {
        let p = temp_path("junk");
        for bytes in [&b""[..], b"abc", b"0123456789abcdef"] {
            std::fs::write(&p, bytes).unwrap();
            let err = format!("{:#}", Checkpoint::open(&p).err().unwrap());
            assert!(err.starts_with(&p.display().to_string()), "{err}");
        }
        std::fs::remove_file(&p).unwrap();
    }
}
