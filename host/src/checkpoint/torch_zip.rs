//! PyTorch zip checkpoints (`pytorch_model.bin`, BlinkDL `.pth`): a stored-only ZIP holding
//! `<stem>/data.pkl` (pickle protocol 2) and one member `<stem>/data/<key>` per storage.
//!
//! The pickle is read by a restricted unpickler: a fixed opcode set, and globals limited to
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`/`_rebuild_parameter` and the
//! `torch.*Storage` classes, each interpreted here; nothing is ever imported or executed.

use super::{DType, RawTensor};
use anyhow::{anyhow, bail, Context, Result};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

// ---------------------------------------------------------------- ZIP

fn le(buf: &[u8], off: usize, n: usize) -> Result<u64> {
    let b = off
        .checked_add(n)
        .and_then(|end| buf.get(off..end))
        .ok_or_else(|| anyhow!("truncated zip: need {n} bytes at offset {off}"))?;
    Ok(b.iter().rev().fold(0, |a, &x| (a << 8) | x as u64))
}

fn to_usize(x: u64) -> Result<usize> {
    usize::try_from(x).map_err(|_| anyhow!("zip offset {x} does not fit in memory"))
}

/// A member's data: `buf[start..start + len]`, compression `method` (0 = stored), and the CRC-32 the
/// central directory gives it.
#[derive(Clone, Copy)]
struct Member {
    start: usize,
    len: usize,
    method: u16,
    crc: u32,
}

/// CRC-32 (IEEE, reflected, as ZIP uses), table-driven.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

/// Reads the central directory (ZIP64 aware) and each member's local header.
fn members(buf: &[u8]) -> Result<HashMap<String, Member>> {
    const EOCD: &[u8] = b"PK\x05\x06";
    let lo = buf.len().saturating_sub(22 + 0xFFFF);
    let eocd = (lo..buf.len().saturating_sub(21))
        .rev()
        .find(|&i| buf[i..].starts_with(EOCD))
        .ok_or_else(|| anyhow!("truncated zip: no end of central directory"))?;
    let (mut count, mut cd_len, mut cd_off) = (le(buf, eocd + 10, 2)?, le(buf, eocd + 12, 4)?, le(buf, eocd + 16, 4)?);
    if count == 0xFFFF || cd_len == 0xFFFF_FFFF || cd_off == 0xFFFF_FFFF {
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| buf[l..].starts_with(b"PK\x06\x07"))
            .ok_or_else(|| anyhow!("corrupt zip: ZIP64 end-of-directory locator missing"))?;
        let rec = to_usize(le(buf, loc + 8, 8)?)?;
        if le(buf, rec, 4)? != 0x0606_4b50 {
            bail!("corrupt zip: bad ZIP64 end-of-directory record at {rec}");
        }
        (count, cd_len, cd_off) = (le(buf, rec + 32, 8)?, le(buf, rec + 40, 8)?, le(buf, rec + 48, 8)?);
    }
    let (cd_off, cd_len) = (to_usize(cd_off)?, to_usize(cd_len)?);
    let cd_end = cd_off
        .checked_add(cd_len)
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| anyhow!("truncated zip: central directory [{cd_off}, +{cd_len}) past the end"))?;

    let mut out = HashMap::new();
    // Every member's local header and data, `[local header, data end)`, with its name: they may
    // not overlap each other or the central directory.
    let mut spans: Vec<(usize, usize, String)> = Vec::new();
    let mut at = cd_off;
    for _ in 0..count {
        if at + 46 > cd_end || le(buf, at, 4)? != 0x0201_4b50 {
            bail!("corrupt zip: bad central directory entry at {at}");
        }
        let method = le(buf, at + 10, 2)? as u16;
        let crc = le(buf, at + 16, 4)? as u32;
        let (mut comp, mut size) = (le(buf, at + 20, 4)?, le(buf, at + 24, 4)?);
        let (n, e, c) = (le(buf, at + 28, 2)? as usize, le(buf, at + 30, 2)? as usize, le(buf, at + 32, 2)? as usize);
        let mut local = le(buf, at + 42, 4)?;
        let name_bytes = buf.get(at + 46..at + 46 + n).ok_or_else(|| anyhow!("truncated zip"))?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = buf.get(at + 46 + n..at + 46 + n + e).ok_or_else(|| anyhow!("truncated zip"))?;
        // ZIP64 extra: the 8-byte values of exactly the fields that read 0xFFFFFFFF, in this order.
        let mut z64 = zip64_fields(extra).with_context(|| format!("corrupt zip: member {name}"))?.into_iter();
        for field in [&mut size, &mut comp, &mut local] {
            if *field == 0xFFFF_FFFF {
                *field = z64.next().ok_or_else(|| anyhow!("corrupt zip: member {name} lacks its ZIP64 field"))?;
            }
        }
        let local = to_usize(local)?;
        if le(buf, local, 4)? != 0x0403_4b50 {
            bail!("corrupt zip: member {name} has no local header at {local}");
        }
        // The local header must describe the same member as the directory: a changed name or
        // extra-field length would otherwise shift the data silently.
        let (ln, le_) = (le(buf, local + 26, 2)? as usize, le(buf, local + 28, 2)? as usize);
        if buf.get(local + 30..local + 30 + ln) != Some(name_bytes) {
            bail!("corrupt zip: member {name}: the local header at {local} names another member");
        }
        let local_method = le(buf, local + 8, 2)? as u16;
        if local_method != method {
            bail!("corrupt zip: member {name}: method {local_method} in the local header, {method} in the directory");
        }
        // The local extra field differs from the central one: torch pads it to align the data.
        let local_extra = buf.get(local + 30 + ln..local + 30 + ln + le_).ok_or_else(|| anyhow!("truncated zip"))?;
        let (mut lcomp, mut lsize) = (le(buf, local + 18, 4)?, le(buf, local + 22, 4)?);
        let deferred = le(buf, local + 6, 2)? & 8 != 0; // sizes in a data descriptor after the data
        let mut z64 = zip64_fields(local_extra)
            .with_context(|| format!("corrupt zip: member {name}'s local header"))?
            .into_iter();
        if !(deferred && lcomp == 0 && lsize == 0) {
            for field in [&mut lsize, &mut lcomp] {
                if *field == 0xFFFF_FFFF {
                    *field = z64.next().ok_or_else(|| anyhow!("corrupt zip: member {name} lacks its ZIP64 field"))?;
                }
            }
            if (lcomp, lsize) != (comp, size) {
                bail!(
                    "corrupt zip: member {name}: sizes {lcomp}/{lsize} in the local header, {comp}/{size} in the directory"
                );
            }
        }
        let start = local + 30 + ln + le_;
        let len = to_usize(comp)?;
        if method == 0 && comp != size {
            bail!("corrupt zip: stored member {name} has sizes {comp} and {size}");
        }
        let end = start
            .checked_add(len)
            .filter(|&end| end <= buf.len())
            .ok_or_else(|| anyhow!("truncated zip: member {name} ends past the end of the file"))?;
        if end > cd_off && local < cd_end {
            bail!("corrupt zip: member {name}'s data [{start}, {end}) overlaps the central directory at {cd_off}");
        }
        if deferred {
            // The data descriptor (optional signature, CRC-32, then both sizes in 4 or 8 bytes)
            // follows the data: finding the directory's values there shows the data is not shifted.
            // Without its signature, the 4 bytes before it may not be one: that is data shifted by 4.
            const SIG: Option<u64> = Some(0x0807_4b50);
            let signed = le(buf, end, 4).ok() == SIG;
            let d = end + if signed { 4 } else { 0 };
            let matches = (signed || le(buf, end - 4, 4).ok() != SIG)
                && le(buf, d, 4).ok() == Some(crc as u64)
                && ((le(buf, d + 4, 4).ok(), le(buf, d + 8, 4).ok()) == (Some(comp), Some(size))
                    || (le(buf, d + 4, 8).ok(), le(buf, d + 12, 8).ok()) == (Some(comp), Some(size)));
            if !matches {
                bail!("corrupt zip: member {name}: no data descriptor matching the directory after its data at {end}");
            }
        }
        spans.push((local, end, name.clone()));
        if out.insert(name.clone(), Member { start, len, method, crc }).is_some() {
            bail!("corrupt zip: member {name} appears twice in the directory");
        }
        at += 46 + n + e + c;
    }
    spans.push((cd_off, cd_end, "the central directory".into()));
    spans.push((eocd, buf.len(), "the end of central directory record".into()));
    spans.sort();
    for w in spans.windows(2) {
        let ((_, a_end, a), (b_start, _, b)) = (&w[0], &w[1]);
        if b_start < a_end {
            bail!("corrupt zip: {a} overlaps {b} (at byte {b_start})");
        }
    }
    Ok(out)
}

/// The ZIP64 record's 8-byte values in an extra field, which must be whole `(id, length, body)`
/// records (a changed extra-field length leaves a partial one).
fn zip64_fields(mut extra: &[u8]) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    while !extra.is_empty() {
        let (id, len) = (le(extra, 0, 2)?, le(extra, 2, 2)? as usize);
        let body = extra.get(4..4 + len).ok_or_else(|| anyhow!("extra field overruns"))?;
        if id == 1 && out.is_empty() {
            out = body.chunks_exact(8).map(|c| le(c, 0, 8).unwrap_or(0)).collect();
        }
        extra = &extra[4 + len..];
    }
    Ok(out)
}

// ---------------------------------------------------------------- pickle

/// Containers nest at most this deep (torch needs 3), so dropping a value never recurses far.
const MAX_DEPTH: u32 = 32;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    List,
    Tuple,
    Dict,
}

/// A list, tuple or dict (flat `k, v, k, v`). Shared through the memo, as in Python. Once placed
/// inside another container it is sealed (immutable), so depths stay exact and cycles impossible;
/// pickles written by torch only fill a container before placing it.
struct Obj {
    kind: Kind,
    items: RefCell<Vec<Val>>,
    depth: Cell<u32>,
    sealed: Cell<bool>,
}

#[derive(Clone)]
struct Storage {
    key: String,
    dtype: DType,
    numel: usize,
}

#[derive(Clone)]
struct Tensor {
    storage: Storage,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Clone, Copy, Debug)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(DType),
}

#[derive(Clone)]
enum Val {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Obj(Rc<Obj>),
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<Tensor>),
}

impl Val {
    fn what(&self) -> &'static str {
        match self {
            Val::None => "None",
            Val::Bool => "bool",
            Val::Int(_) => "int",
            Val::Float => "float",
            Val::Str(_) => "str",
            Val::Bytes => "bytes",
            Val::Obj(o) => match o.kind {
                Kind::List => "list",
                Kind::Tuple => "tuple",
                Kind::Dict => "dict",
            },
            Val::Global(_) => "class or function",
            Val::Storage(_) => "storage",
            Val::Tensor(_) => "tensor",
        }
    }

    fn obj(&self, kind: Kind) -> Option<&Rc<Obj>> {
        match self {
            Val::Obj(o) if o.kind == kind => Some(o),
            _ => None,
        }
    }

    fn uint(&self) -> Option<usize> {
        match *self {
            Val::Int(i) => usize::try_from(i).ok(),
            _ => None,
        }
    }

    fn uints(&self) -> Option<Vec<usize>> {
        self.obj(Kind::Tuple)?.items.borrow().iter().map(Val::uint).collect()
    }
}

/// Builds a container over `items`, sealing those that are containers.
fn new_obj(kind: Kind, items: Vec<Val>) -> Result<Val> {
    let o = Rc::new(Obj {
        kind,
        items: RefCell::new(Vec::new()),
        depth: Cell::new(1),
        sealed: Cell::new(kind == Kind::Tuple),
    });
    extend(&o, items)?;
    Ok(Val::Obj(o))
}

fn extend(o: &Rc<Obj>, items: Vec<Val>) -> Result<()> {
    for v in &items {
        if let Val::Obj(c) = v {
            if Rc::ptr_eq(c, o) {
                bail!("a container that holds itself");
            }
            c.sealed.set(true);
            o.depth.set(o.depth.get().max(c.depth.get() + 1));
        }
    }
    if o.depth.get() > MAX_DEPTH {
        bail!("containers nested deeper than {MAX_DEPTH}");
    }
    o.items.borrow_mut().extend(items);
    Ok(())
}

fn global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", s) if s.ends_with("Storage") => Global::Storage(match s {
            "FloatStorage" => DType::F32,
            "BFloat16Storage" => DType::BF16,
            "HalfStorage" => DType::F16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => bail!("unsupported storage type torch.{s}"),
        }),
        _ => bail!("forbidden global {module}.{name}"),
    })
}

/// `func(*args)` for the whitelisted callables.
fn reduce(func: &Val, args: &Val) -> Result<Val> {
    let Val::Global(g) = func else {
        bail!("REDUCE calls a {}, not a class or function", func.what());
    };
    let args = args
        .obj(Kind::Tuple)
        .ok_or_else(|| anyhow!("REDUCE arguments are a {}, not a tuple", args.what()))?
        .items
        .borrow();
    match (g, &args[..]) {
        (Global::OrderedDict, []) => new_obj(Kind::Dict, Vec::new()),
        (Global::RebuildTensor, [storage, offset, size, stride, _grad, _hooks, ..]) if args.len() <= 7 => {
            let Val::Storage(storage) = storage else {
                bail!("_rebuild_tensor_v2 got a {} for its storage", storage.what());
            };
            let bad = || anyhow!("_rebuild_tensor_v2: offset, size or stride is not a non-negative int/tuple");
            Ok(Val::Tensor(Rc::new(Tensor {
                storage: Storage::clone(storage),
                offset: offset.uint().ok_or_else(bad)?,
                shape: size.uints().ok_or_else(bad)?,
                stride: stride.uints().ok_or_else(bad)?,
            })))
        }
        (Global::RebuildParameter, [t @ Val::Tensor(_), _grad, _hooks]) => Ok(t.clone()),
        _ => bail!("unsupported call {g:?} with {} arguments", args.len()),
    }
}

/// `('storage', torch.XStorage, key, location, numel)`.
fn persistent_load(pid: &Val) -> Result<Val> {
    let bad = || anyhow!("unsupported persistent id (expected a torch storage tuple)");
    let items = pid.obj(Kind::Tuple).ok_or_else(bad)?.items.borrow();
    match &items[..] {
        [Val::Str(tag), Val::Global(Global::Storage(dtype)), Val::Str(key), Val::Str(_), numel]
            if &**tag == "storage" =>
        {
            Ok(Val::Storage(Rc::new(Storage {
                key: key.to_string(),
                dtype: *dtype,
                numel: numel.uint().ok_or_else(bad)?,
            })))
        }
        _ => Err(bad()),
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    marks: Vec<usize>,
    memo: HashMap<u32, Val>,
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data = self.data;
        let b = self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
            .ok_or_else(|| anyhow!("truncated pickle"))?;
        self.pos += n;
        Ok(b)
    }

    fn uint(&mut self, n: usize) -> Result<u64> {
        le(self.take(n)?, 0, n)
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("truncated pickle"))?;
        let s = std::str::from_utf8(self.take(n + 1)?).map_err(|_| anyhow!("GLOBAL name is not UTF-8"))?;
        Ok(&s[..n])
    }

    fn text(&mut self, n: usize) -> Result<Val> {
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| anyhow!("string is not UTF-8"))?;
        Ok(Val::Str(s.into()))
    }

    fn pop(&mut self) -> Result<Val> {
        self.stack.pop().ok_or_else(|| anyhow!("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Val>> {
        let m = self.marks.pop().ok_or_else(|| anyhow!("no MARK"))?;
        if m > self.stack.len() {
            bail!("stack underflow");
        }
        Ok(self.stack.split_off(m))
    }

    fn top(&self, kind: Kind) -> Result<Rc<Obj>> {
        let top = self.stack.last().ok_or_else(|| anyhow!("stack underflow"))?;
        let o = top.obj(kind).ok_or_else(|| anyhow!("adding items to a {}, expected a {kind:?}", top.what()))?;
        if o.sealed.get() {
            bail!("changing a {kind:?} after it was placed in another container");
        }
        Ok(o.clone())
    }

    fn tuple(&mut self, n: usize) -> Result<()> {
        let at = self.stack.len().checked_sub(n).ok_or_else(|| anyhow!("stack underflow"))?;
        let items = self.stack.split_off(at);
        let t = new_obj(Kind::Tuple, items)?;
        self.stack.push(t);
        Ok(())
    }

    fn run(&mut self) -> Result<Val> {
        loop {
            let at = self.pos;
            let op = self.take(1)?[0];
            self.step(op).with_context(|| {
                let c = if op.is_ascii_graphic() { format!(" '{}'", op as char) } else { String::new() };
                format!("pickle opcode 0x{op:02x}{c} at byte {at}")
            })?;
            if op == b'.' {
                return self.pop();
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        let v = match op {
            0x80 => {
                self.take(1)?; // PROTO
                return Ok(());
            }
            b'.' => return Ok(()), // STOP
            b'(' => {
                self.marks.push(self.stack.len());
                return Ok(());
            }
            b'N' => Val::None,
            0x88 | 0x89 => Val::Bool,
            b'J' => Val::Int(self.uint(4)? as u32 as i32 as i64),
            b'K' => Val::Int(self.uint(1)? as i64),
            b'M' => Val::Int(self.uint(2)? as i64),
            0x8a => {
                // LONG1: n-byte little-endian two's complement
                let n = self.uint(1)? as usize;
                if n > 8 {
                    bail!("integer wider than 64 bits");
                }
                let x = self.uint(n)?;
                let shift = 64 - 8 * n as u32;
                Val::Int(if n == 0 { 0 } else { ((x << shift) as i64) >> shift })
            }
            b'G' => {
                self.take(8)?;
                Val::Float
            }
            b'X' => {
                let n = to_usize(self.uint(4)?)?;
                self.text(n)?
            }
            0x8c => {
                let n = self.uint(1)? as usize;
                self.text(n)?
            }
            b'B' | b'C' => {
                let n = if op == b'B' { self.uint(4)? } else { self.uint(1)? };
                self.take(to_usize(n)?)?;
                Val::Bytes
            }
            b'}' => new_obj(Kind::Dict, Vec::new())?,
            b']' => new_obj(Kind::List, Vec::new())?,
            b')' => new_obj(Kind::Tuple, Vec::new())?,
            b't' => {
                let items = self.pop_mark()?;
                new_obj(Kind::Tuple, items)?
            }
            0x85..=0x87 => return self.tuple((op - 0x84) as usize),
            b'a' | b'e' | b's' | b'u' => {
                let items = match op {
                    b'a' => vec![self.pop()?],
                    b's' => {
                        let v = self.pop()?;
                        vec![self.pop()?, v]
                    }
                    _ => self.pop_mark()?,
                };
                let kind = if matches!(op, b'a' | b'e') { Kind::List } else { Kind::Dict };
                if kind == Kind::Dict && items.len() % 2 != 0 {
                    bail!("odd number of items for a dict");
                }
                return extend(&self.top(kind)?, items);
            }
            b'q' | b'r' => {
                let key = self.uint(if op == b'q' { 1 } else { 4 })? as u32;
                let top = self.stack.last().ok_or_else(|| anyhow!("stack underflow"))?;
                self.memo.insert(key, top.clone());
                return Ok(());
            }
            b'h' | b'j' => {
                let key = self.uint(if op == b'h' { 1 } else { 4 })? as u32;
                self.memo.get(&key).cloned().ok_or_else(|| anyhow!("memo key {key} not set"))?
            }
            b'c' => {
                let (module, name) = (self.line()?, self.line()?);
                Val::Global(global(module, name)?)
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                reduce(&func, &args)?
            }
            b'b' => {
                // BUILD: only an OrderedDict's state (state_dict `_metadata`), which is ignored.
                let _state = self.pop()?;
                self.top(Kind::Dict)?;
                return Ok(());
            }
            b'Q' => {
                let pid = self.pop()?;
                persistent_load(&pid)?
            }
            _ => bail!("unsupported pickle opcode"),
        };
        self.stack.push(v);
        Ok(())
    }
}

/// Runs the restricted unpickler over a `data.pkl`'s bytes (for the fuzz harness).
pub(super) fn unpickle(data: &[u8]) -> Result<()> {
    Unpickler { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }.run().map(drop)
}

/// The bytes of a torch zip's `data.pkl` member.
pub(super) fn pickle_of(buf: &[u8]) -> Result<Vec<u8>> {
    let members = members(buf)?;
    let m = members
        .iter()
        .find(|(n, _)| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|(_, m)| *m)
        .ok_or_else(|| anyhow!("zip without data.pkl"))?;
    Ok(buf[m.start..m.start + m.len].to_vec())
}

// ---------------------------------------------------------------- tensors

/// Tensors of one torch zip file, as byte ranges of `buf` (the whole file). `verify`: check every
/// member's data against the directory's CRC-32 (reads the whole file).
pub(super) fn parse(buf: &[u8], verify: bool) -> Result<Vec<RawTensor>> {
    let members = members(buf)?;
    if verify {
        let mut names: Vec<_> = members.iter().collect();
        names.sort_by_key(|(_, m)| m.start);
        for (name, m) in names {
            let got = crc32(&buf[m.start..m.start + m.len]);
            if got != m.crc {
                bail!("member {name}: CRC-32 {got:08x} of its data, {:08x} in the directory (damaged weights)", m.crc);
            }
        }
    }
    let mut pkls = members.keys().filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"));
    let pkl = pkls.next().ok_or_else(|| anyhow!("zip without data.pkl: not a torch checkpoint"))?;
    if let Some(other) = pkls.next() {
        bail!("zip holds both {pkl} and {other}");
    }
    let stem = &pkl[..pkl.len() - "data.pkl".len()];
    let member = |name: &str| -> Result<&[u8]> {
        let m = members.get(name).ok_or_else(|| anyhow!("missing zip member {name}"))?;
        if m.method != 0 {
            bail!("zip member {name} is compressed (method {}); torch stores members", m.method);
        }
        Ok(&buf[m.start..m.start + m.len])
    };
    if let Ok(order) = member(&format!("{stem}byteorder")) {
        if order != b"little" {
            bail!("byteorder is {:?}, only little-endian is supported", String::from_utf8_lossy(order));
        }
    }
    let top = Unpickler { data: member(pkl)?, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }
        .run()
        .with_context(|| pkl.clone())?;
    let top =
        top.obj(Kind::Dict).ok_or_else(|| anyhow!("{pkl}: holds a {}, expected a dict of tensors", top.what()))?;

    // Later keys win, as in a Python dict; non-tensor values are skipped.
    let mut tensors = BTreeMap::new();
    for kv in top.items.borrow().chunks_exact(2) {
        if let [Val::Str(name), Val::Tensor(t)] = kv {
            tensors.insert(name.to_string(), t.clone());
        }
    }
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (start, end) = locate(&t, stem, &members).with_context(|| format!("tensor {name}"))?;
        out.push(RawTensor { name, dtype: t.storage.dtype, shape: t.shape.clone(), start, end });
    }
    Ok(out)
}

/// Checks a tensor is a row-major view inside its storage; returns its byte range in the file.
fn locate(t: &Tensor, stem: &str, members: &HashMap<String, Member>) -> Result<(usize, usize)> {
    if t.stride.len() != t.shape.len() {
        bail!("{} strides for {} dimensions", t.stride.len(), t.shape.len());
    }
    let mut numel = 1usize;
    for (&n, &s) in t.shape.iter().zip(&t.stride).rev() {
        if n != 1 && s != numel {
            bail!("not row-major contiguous (shape {:?}, stride {:?}); save it with .contiguous()", t.shape, t.stride);
        }
        numel = numel.checked_mul(n).ok_or_else(|| anyhow!("shape {:?} overflows", t.shape))?;
    }
    let st = &t.storage;
    let name = format!("{stem}data/{}", st.key);
    let m = members.get(&name).ok_or_else(|| anyhow!("storage member {name} is missing"))?;
    if m.method != 0 {
        bail!("storage member {name} is compressed (method {})", m.method);
    }
    let size = st.dtype.size();
    if st.numel.checked_mul(size).is_none_or(|b| b > m.len) {
        bail!("storage {name} should hold {} × {} but has {} bytes", st.numel, st.dtype, m.len);
    }
    let end_el = t.offset.checked_add(numel).filter(|&e| e <= st.numel).ok_or_else(|| {
        anyhow!("elements [{}, +{numel}) lie outside storage {name} of {} elements", t.offset, st.numel)
    })?;
    Ok((m.start + t.offset * size, m.start + end_el * size))
}

#[cfg(test)]
mod tests {
    use super::super::{Checkpoint, DType, Format};
    use std::path::{Path, PathBuf};

    fn fixture(name: &str) -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/torch_zip")).join(name)
    }

    fn err(name: &str) -> String {
        format!("{:#}", Checkpoint::open(&fixture(name)).err().expect("must fail"))
    }

    fn first(ck: &Checkpoint, name: &str) -> Vec<f64> {
        let t = ck.require(name).unwrap();
        let v: Vec<f64> = match t.dtype {
            DType::F32 => t.as_f32().unwrap().iter().map(|&x| x as f64).collect(),
            DType::BF16 => t.as_bf16().unwrap().iter().map(|x| x.to_f64()).collect(),
            DType::F16 => t.as_f16().unwrap().iter().map(|x| x.to_f64()).collect(),
            _ => t.to_i64_vec().unwrap().iter().map(|&x| x as f64).collect(),
        };
        v.into_iter().take(4).collect()
    }

    #[test]
    fn matches_torch_save() {
        let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (file, tensors) in expected.as_object().unwrap() {
            let ck = Checkpoint::open(&fixture(file)).unwrap();
            assert_eq!(ck.format(), Format::TorchZip);
            let tensors = tensors.as_object().unwrap();
            assert_eq!(ck.names().collect::<Vec<_>>(), tensors.keys().collect::<Vec<_>>());
            for (name, want) in tensors {
                let t = ck.require(name).unwrap();
                assert_eq!(t.dtype.name(), want["dtype"], "{file} {name}");
                let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
                assert_eq!(t.shape, shape, "{file} {name}");
                assert_eq!(t.bytes.len(), t.numel() * t.dtype.size());
                let want: Vec<f64> = serde_json::from_value(want["first"].clone()).unwrap();
                assert_eq!(first(&ck, name), want, "{file} {name}");
            }
        }
    }

    #[test]
    fn shared_storage_and_directory() {
        let ck = Checkpoint::open(&fixture("shared.pth")).unwrap();
        let (emb, head) = (ck.require("emb").unwrap(), ck.require("head").unwrap());
        assert_eq!(emb.bytes.as_ptr(), head.bytes.as_ptr(), "tied weights share the map");
        assert_eq!(ck.require("mid").unwrap().as_f32().unwrap(), [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        assert!(ck.owned.is_empty());
        assert_eq!(ck.total_bytes(), 48 + 48 + 24 + 16);

        let dir = fixture("hf");
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.dir(), dir.as_path());
        assert_eq!(ck.names().collect::<Vec<_>>(), ["0.bias", "0.weight"]);
    }

    #[test]
    fn refuses_non_contiguous_and_forbidden() {
        let e = err("transposed.pth");
        assert!(e.contains("transposed.pth") && e.contains("tensor t") && e.contains("row-major"), "{e}");
        let e = err("evil.pth");
        assert!(e.contains("evil.pth") && e.contains("forbidden global posix.system"), "{e}");
    }

    #[test]
    fn never_panics_on_damaged_files() {
        let p = super::super::temp_path("damaged.pth");
        for name in ["dtypes.pth", "zip64.pth", "shared.pth"] {
            let good = std::fs::read(fixture(name)).unwrap();
            for len in (0..good.len()).step_by(7) {
                std::fs::write(&p, &good[..len]).unwrap();
                let e = format!("{:#}", Checkpoint::open(&p).err().expect("truncated must fail"));
                assert!(e.contains("damaged.pth"), "{e}");
            }
            // Flip each byte of the pickle and the directory; opening may succeed, but never panics.
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x5a;
                std::fs::write(&p, &bad).unwrap();
                let _ = Checkpoint::open(&p);
            }
        }
        std::fs::remove_file(&p).unwrap();
    }

    /// Offset of the local header of member `name` and of its central directory entry.
    fn headers(buf: &[u8], name: &str) -> (usize, usize) {
        let find = |sig: &[u8], name_at: usize| {
            (0..buf.len() - name_at)
                .find(|&i| buf[i..].starts_with(sig) && buf[i + name_at..].starts_with(name.as_bytes()))
                .unwrap()
        };
        (find(b"PK\x03\x04", 30), find(b"PK\x01\x02", 46))
    }

    fn open_bytes(bytes: &[u8]) -> anyhow::Result<Checkpoint> {
        let p = super::super::temp_path("mutated.pth");
        std::fs::write(&p, bytes).unwrap();
        let r = Checkpoint::open(&p);
        std::fs::remove_file(&p).unwrap();
        r
    }

    /// A local header that disagrees with the central directory used to shift the data silently:
    /// a changed local name or extra-field length loaded shifted weights, and a member whose data
    /// ran into the central directory loaded.
    #[test]
    fn local_headers_must_match_the_directory() {
        let good = std::fs::read(fixture("dtypes.pth")).unwrap();
        let want = first(&open_bytes(&good).unwrap(), "w.f32");
        let (local, _) = headers(&good, "dtypes/data/0");

        let mut bad = good.clone();
        bad[local + 30 + 12] = b'9'; // dtypes/data/0 → dtypes/data/9
        let e = format!("{:#}", open_bytes(&bad).err().expect("a changed local name must fail"));
        assert!(e.contains("member dtypes/data/0: the local header at") && e.contains("names another"), "{e}");

        for delta in [2u8, 4, 8] {
            let mut bad = good.clone();
            bad[local + 28] = bad[local + 28].wrapping_add(delta);
            let e = format!("{:#}", open_bytes(&bad).err().expect("a changed extra length must fail"));
            assert!(e.contains("dtypes/data/0"), "{e}");
        }
        // The same shift with a well-formed extra field: only the data descriptor shows it.
        for delta in [4u8, 8, 1] {
            let mut bad = good.clone();
            bad[local + 28] += delta;
            bad[local + 30 + 13 + 2] += delta;
            let e = format!("{:#}", open_bytes(&bad).err().expect("shifted data must fail"));
            assert!(e.contains("member dtypes/data/0: no data descriptor matching"), "{e}");
        }

        // The last member's sizes grown (in the directory) until its data runs into the directory.
        let last = "dtypes/.data/serialization_id";
        let (_, central) = headers(&good, last);
        let mut bad = good.clone();
        let size = u32::from_le_bytes(bad[central + 20..central + 24].try_into().unwrap()) + 40;
        bad[central + 20..central + 24].copy_from_slice(&size.to_le_bytes());
        bad[central + 24..central + 28].copy_from_slice(&size.to_le_bytes());
        let e = format!("{:#}", open_bytes(&bad).err().expect("overlapping the directory must fail"));
        assert!(e.contains(&format!("member {last}'s data")) && e.contains("overlaps the central directory"), "{e}");

        assert_eq!(first(&open_bytes(&good).unwrap(), "w.f32"), want);
    }

    #[test]
    fn crc_only_when_verifying() {
        let good = std::fs::read(fixture("dtypes.pth")).unwrap();
        let (local, _) = headers(&good, "dtypes/data/0");
        let start = local + 30 + 13 + u16::from_le_bytes([good[local + 28], good[local + 29]]) as usize;
        let mut bad = good.clone();
        bad[start] ^= 1;
        assert_eq!(super::super::parse_bytes(&good, true).unwrap(), 5);
        assert_eq!(super::super::parse_bytes(&bad, false).unwrap(), 5);
        let e = format!("{:#}", super::super::parse_bytes(&bad, true).unwrap_err());
        assert!(e.starts_with("member dtypes/data/0: CRC-32 ") && e.contains("damaged weights"), "{e}");
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn unpickler_limits() {
        use super::Unpickler;
        let run = |data: &[u8]| {
            let mut u = Unpickler { data, pos: 0, stack: vec![], marks: vec![], memo: Default::default() };
            u.run().map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        let mut deep = vec![0x80, 2, b')'];
        deep.extend([0x85; 100]);
        deep.push(b'.');
        assert!(run(&deep).unwrap_err().contains("nested deeper"));
        // A list appended to itself.
        assert!(run(b"\x80\x02]q\x00h\x00a.").unwrap_err().contains("holds itself"));
        // Mutating a list after placing it in a tuple.
        assert!(run(b"\x80\x02]q\x00\x85h\x00Na.").unwrap_err().contains("after it was placed"));
        assert!(run(b"\x80\x02cbuiltins\neval\n.").unwrap_err().contains("forbidden global builtins.eval"));
        assert!(run(b"\x80\x02ctorch\nComplexFloatStorage\n.").unwrap_err().contains("unsupported storage"));
        assert!(run(b"\x80\x02S'x'\n.").unwrap_err().contains("0x53 'S'"));
        assert!(run(b"\x80\x02\x8a\x02\xff\x7f.").is_ok());
        assert!(run(b"\x80\x02}").unwrap_err().contains("truncated"));
    }
}
