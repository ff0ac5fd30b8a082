//! A checkpoint on disk → a core model whose weights are views into the checkpoint's maps. What a
//! path holds is found once ([`family::detect`]); each family's host file (`model/<family>.rs`,
//! mirroring its core file) reads its config quirks and tensor names into core views.
use crate::checkpoint::{Checkpoint, DType, TensorView};
use crate::forget::{ForgetSpec, Phase};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use stuffed_core::mamba2::Mamba2;
use stuffed_core::{Data, Forget, Recurrent, Weight};

mod delta_net;
mod family;
mod gla;
mod hgrn2;
mod mamba1;
mod mamba2;
mod rwkv;
mod rwkv7;
mod xlstm;

pub use family::{detect, Config, Family, Found, Vocab};

/// Facts about a loaded model, for `stuffed info` and every report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub family: Family,
    pub format: String,
    pub d_model: usize,
    pub n_layer: usize,
    /// What each layer has, in its family's own terms.
    #[serde(flatten)]
    pub layout: Layout,
    pub params: usize,
    pub weight_dtype: String,
    pub weight_bytes: usize,
    /// Recurrent state, f32, all layers.
    pub state_bytes: usize,
    /// N_S as SPEC.md §1 counts it.
    pub paper_state_size: usize,
    pub vocab_rows: usize,
    /// The unpadded vocab the config states, when it does (the tokenizer's size otherwise).
    pub config_vocab: Option<usize>,
    pub tied_embeddings: bool,
    /// The RWKV state-tuning file every stream starts from (`--state-file`), when one was given
    /// beside the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
}

/// A layer's sizes, per family (written flat into `info --json` and every results file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layout {
    /// Mamba-2: `n_heads` heads of `head_dim` channels, each with a `d_state` state read and written
    /// through `n_groups` shared B/C groups, after a causal conv of width `d_conv`.
    Mamba2 { n_heads: usize, head_dim: usize, d_state: usize, n_groups: usize, d_conv: usize },
    /// RWKV-5.2 / 6: `n_heads` heads of a `head_size`² state; a channel mix of `d_ffn`; RWKV-6's
    /// token-shift and decay LoRAs of rank `lora_mix` and `lora_decay` (0 on 5.2).
    Rwkv { n_heads: usize, head_size: usize, d_ffn: usize, lora_mix: usize, lora_decay: usize },
    /// HGRN-2: `n_heads` heads of an `expand` (key) × `head_v` (value) state; a SwiGLU MLP of `d_mlp`.
    Hgrn2 { n_heads: usize, expand: usize, head_v: usize, d_mlp: usize },
    /// Mamba-1: `d_inner` channels of a `d_state` diagonal state each, Δ through a rank-`dt_rank`
    /// projection, a causal conv of width `d_conv`; a "head" is `head_channels` channels.
    Mamba1 { d_inner: usize, d_state: usize, dt_rank: usize, d_conv: usize, head_channels: usize },
    /// RWKV-7: `n_heads` heads of a `head_size`² state; a channel mix of `d_ffn`; the decay,
    /// learning-rate, value-residual and gate LoRAs of ranks `lora_decay`, `lora_a`, `lora_v`, `lora_gate`.
    Rwkv7 {
        n_heads: usize,
        head_size: usize,
        d_ffn: usize,
        lora_decay: usize,
        lora_a: usize,
        lora_v: usize,
        lora_gate: usize,
    },
    /// GLA: `n_heads` heads of a `head_k` × `head_v` state, keys shared by `n_kv_heads`; a SwiGLU MLP
    /// of `gla_mlp`; short convs of width `gla_conv` (0: none).
    Gla { n_heads: usize, n_kv_heads: usize, head_k: usize, head_v: usize, gla_mlp: usize, gla_conv: usize },
    /// DeltaNet / Gated DeltaNet: `n_v_heads` value heads of a `head_v` × `head_k` state, each reading
    /// one of `n_heads` query/key heads; a SwiGLU MLP of `delta_mlp`; short convs of width `delta_conv` (0: none).
    DeltaNet { n_heads: usize, n_v_heads: usize, head_k: usize, head_v: usize, delta_mlp: usize, delta_conv: usize },
    /// xLSTM: `n_heads` mLSTM cells of a `head_qk` × `head_v` matrix (with a `head_qk` normaliser
    /// and a stabiliser); a gated FFN of `xlstm_ffn`.
    Xlstm { n_heads: usize, head_qk: usize, head_v: usize, xlstm_ffn: usize },
}

impl ModelInfo {
    /// Refuses model facts read back from a file (`source`) whose layout is not its family's: the
    /// layout is read by its field names alone, so an older file's RWKV or HGRN-2 facts (written
    /// with Mamba-2's field names) would otherwise read as a Mamba-2 layout.
    pub fn check_read_back(&self, source: &Path) -> Result<()> {
        let fits = match self.layout {
            Layout::Mamba2 { .. } => self.family == Family::Mamba2,
            Layout::Rwkv { .. } => matches!(self.family, Family::Rwkv5 | Family::Rwkv6),
            Layout::Hgrn2 { .. } => self.family == Family::Hgrn2,
            Layout::Mamba1 { .. } => self.family == Family::Mamba1,
            Layout::Rwkv7 { .. } => self.family == Family::Rwkv7,
            Layout::Gla { .. } => matches!(self.family, Family::Gla | Family::RetNet),
            Layout::DeltaNet { .. } => matches!(self.family, Family::DeltaNet | Family::GatedDeltaNet),
            Layout::Xlstm { .. } => self.family == Family::Xlstm,
        };
        if !fits {
            bail!(
                "{}: model facts of a {} model with another family's layout (written by an older stuffed?)",
                source.display(),
                self.family
            );
        }
        Ok(())
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Layout::Mamba2 { n_heads, head_dim, d_state, n_groups, d_conv } => {
                write!(f, "heads {n_heads} × head_dim {head_dim}, d_state {d_state}, groups {n_groups}, conv {d_conv}")
            }
            Layout::Rwkv { n_heads, head_size, d_ffn, lora_mix, lora_decay } => write!(
                f,
                "heads {n_heads} × head_size {head_size}, ffn {d_ffn}, LoRA mix {lora_mix} / decay {lora_decay}"
            ),
            Layout::Hgrn2 { n_heads, expand, head_v, d_mlp } => {
                write!(f, "heads {n_heads} × (expand {expand} × head_v {head_v}), mlp {d_mlp}")
            }
            Layout::Mamba1 { d_inner, d_state, dt_rank, d_conv, head_channels } => write!(
                f,
                "d_inner {d_inner} × d_state {d_state}, dt_rank {dt_rank}, conv {d_conv}, heads of {head_channels} channels"
            ),
            Layout::Rwkv7 { n_heads, head_size, d_ffn, lora_decay, lora_a, lora_v, lora_gate } => write!(
                f,
                "heads {n_heads} × head_size {head_size}, ffn {d_ffn}, LoRA decay {lora_decay} / a {lora_a} / v {lora_v} / gate {lora_gate}"
            ),
            Layout::Gla { n_heads, n_kv_heads, head_k, head_v, gla_mlp, gla_conv } => write!(
                f,
                "heads {n_heads} (kv {n_kv_heads}) × (head_k {head_k} × head_v {head_v}), mlp {gla_mlp}, conv {gla_conv}"
            ),
            Layout::DeltaNet { n_heads, n_v_heads, head_k, head_v, delta_mlp, delta_conv } => write!(
                f,
                "value heads {n_v_heads} (q/k heads {n_heads}) × (head_v {head_v} × head_k {head_k}), mlp {delta_mlp}, conv {delta_conv}"
            ),
            Layout::Xlstm { n_heads, head_qk, head_v, xlstm_ffn } => {
                write!(f, "mLSTM heads {n_heads} × (head_qk {head_qk} × head_v {head_v}), ffn {xlstm_ffn}")
            }
        }
    }
}

/// What a family's host file builds from a checkpoint: its core model's tables (views into the
/// checkpoint and the layer list the core model borrows) and the model's description.
pub(crate) struct Loaded<'a> {
    pub views: Box<dyn Views + 'a>,
    pub info: ModelInfo,
}

/// A family's tables, which lend the core model its weights.
pub(crate) trait Views: Send + Sync {
    fn net(&self) -> Result<Net<'_>>;
}

/// A family's host loader: reads the checkpoint `ck` that `found` names.
pub(crate) type Loader = for<'a> fn(&'a Checkpoint, &Found) -> Result<Loaded<'a>>;

/// A core model. Mamba-2 by its type: the CUDA backend and the FLOP count need its config.
pub(crate) enum Net<'a> {
    Mamba2(Box<Mamba2<'a>>),
    Other(Box<dyn Recurrent + Send + 'a>),
}

impl Net<'_> {
    fn recurrent(&self) -> &dyn Recurrent {
        match self {
            Net::Mamba2(m) => m.as_ref(),
            Net::Other(m) => m.as_ref(),
        }
    }
}

type BoxedViews<'a> = Box<dyn Views + 'a>;

/// The core model with the forgetting method, and the same weights without it where the method
/// acts on part of a sequence only (LongMamba: not on decoded tokens) — made when such a method is set.
pub(crate) struct Nets<'a> {
    main: Net<'a>,
    plain: Option<Net<'a>>,
    /// LongMamba's thresholds of each target but the longest (`main`'s), in the table's order.
    by_target: Vec<Net<'a>>,
}

self_cell::self_cell!(
    /// A checkpoint and the tables that view it.
    struct Viewed {
        owner: Checkpoint,
        #[covariant]
        dependent: BoxedViews,
    }
);

self_cell::self_cell!(
    /// Those and the core models that borrow the tables.
    struct Built {
        owner: Viewed,
        #[covariant]
        dependent: Nets,
    }
);

/// A loaded model: owns the checkpoint's maps, the tables viewing them and the core model.
pub struct Model {
    built: Built,
    pub info: ModelInfo,
    /// The forgetting method sessions of this model use.
    pub forget: ForgetSpec,
    /// How sessions of this model store the state between calls (`--state-dtype`; f32 by default).
    pub state_precision: crate::state_dtype::StatePrecision,
    /// [`Model::content_id`], hashed once (the weights never change under a loaded model).
    content: std::sync::OnceLock<String>,
}

/// The directory a model path names (a file's parent; a model name, its cached snapshot): where its
/// config and tokenizer live.
pub fn dir_of(path: &Path) -> PathBuf {
    let resolved = crate::hub::resolve(path);
    let path = resolved.as_deref().unwrap_or(path);
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// Rejects ids past an embedding of `rows` rows before any work, naming the source and position.
pub fn check_ids(ids: &[u32], rows: usize, source: &str) -> Result<()> {
    if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
        bail!("{source}: token id {id} at position {i} is out of range (the model's embedding has {rows} rows)");
    }
    Ok(())
}

impl Model {
    /// The tokenizer `given`, else the model directory's tokenizer.json, else its family's shipped one.
    pub fn tokenizer(&self, given: Option<&Path>) -> Result<Tokenizer> {
        if self.info.family == Family::Rwkv7 {
            return rwkv7::tokenizer(&self.info, given);
        }
        Tokenizer::for_model(Some(&dir_of(&self.info.path)), given)
    }

    /// Ids that can win a decode or enter a score: rows past the tokenizer's size are padding.
    pub fn real_vocab(&self, tok: &Tokenizer) -> usize {
        let mut v = self.info.vocab_rows.min(tok.vocab_size());
        if let Some(c) = self.info.config_vocab {
            v = v.min(c);
        }
        v
    }

    /// Rejects ids past this model's embedding, naming the source and position.
    pub fn check_ids(&self, ids: &[u32], source: &str) -> Result<()> {
        check_ids(ids, self.info.vocab_rows, source)
    }

    /// The core model with the forgetting method ([`Model::set_forget`]).
    pub fn net(&self) -> &dyn Recurrent {
        self.built.borrow_dependent().main.recurrent()
    }

    /// The core model for the tokens of `phase`: without the method where it does not act there
    /// ([`ForgetSpec::acts_in`]: LongMamba's filter on decoded tokens and short prompts).
    pub fn net_in(&self, phase: Phase) -> &dyn Recurrent {
        let nets = self.built.borrow_dependent();
        if let Some(net) = self.forget.longmamba_target(phase).and_then(|i| nets.by_target.get(i)) {
            return net.recurrent();
        }
        match (&nets.plain, self.forget.acts_in(phase)) {
            (Some(plain), false) => plain.recurrent(),
            _ => nets.main.recurrent(),
        }
    }

    /// The Mamba-2 model, when this is one (the CUDA backend runs Mamba-2).
    pub fn mamba2(&self) -> Option<&Mamba2<'_>> {
        match &self.built.borrow_dependent().main {
            Net::Mamba2(m) => Some(m),
            Net::Other(_) => None,
        }
    }

    fn with_net_mut<T>(&mut self, f: impl FnOnce(&mut dyn Recurrent) -> T) -> T {
        self.built.with_dependent_mut(|_, nets| match &mut nets.main {
            Net::Mamba2(m) => f(m.as_mut()),
            Net::Other(m) => f(m.as_mut()),
        })
    }

    /// Bytes of the bf16 halves its f32 matrices have made so far for products on the AMX level
    /// ([`crate::checkpoint::SplitCell`]; 0 elsewhere).
    pub fn split_bytes(&self) -> usize {
        self.checkpoint().split_bytes()
    }

    /// The most those halves may take (`info` states it).
    pub fn split_bytes_at_most(&self) -> usize {
        self.checkpoint().split_bytes_at_most()
    }

    /// The distinct dtypes of the matrices it multiplies (the checkpoint's 2-D tensors the model
    /// uses), sorted: what decides whether `--fast-matmul` changes its products
    /// ([`crate::exec::fast_matmul_applies`]).
    pub fn matrix_dtypes(&self) -> Vec<&'static str> {
        let ck = self.checkpoint();
        let mut d: Vec<&'static str> = ck
            .names()
            .filter(|n| ck.is_used(n))
            .filter_map(|n| ck.peek(n))
            .filter(|t| t.shape.len() == 2)
            .map(|t| dtype_name(t.dtype))
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    fn checkpoint(&self) -> &Checkpoint {
        self.built.borrow_owner().borrow_owner()
    }

    /// Sets the forgetting method (before creating sessions: the state size may change).
    pub fn set_forget(&mut self, f: ForgetSpec) -> Result<()> {
        let path = self.info.path.display().to_string();
        if let ForgetSpec::LongMamba { table, .. } = f {
            // (Another family refuses the method itself, below.)
            if self.mamba2().is_some() && table.table().content != self.content_id() {
                bail!(
                    "{path}: --forget {f}: {} was calibrated on another model (run stuffed longmamba on this one)",
                    table.table().file
                );
            }
        }
        if let ForgetSpec::DeciMamba(d) = f {
            let net = self.net();
            if !net.decimates() {
                bail!("{path}: --forget {f}: DeciMamba ranks tokens by Mamba's Δ (Mamba-1, Mamba-2); not this family");
            }
            if let Some(&l) = d.layers.as_slice().iter().find(|&&l| l >= net.n_layer()) {
                bail!("{path}: --forget {f}: layer {l} is past the model's {} layers (counted from 0)", net.n_layer());
            }
        }
        if let ForgetSpec::StateNorm { .. } = f {
            if !self.net().rescales_heads() {
                bail!(
                    "{path}: --forget {f}: {} keeps each head's matrix divided by its stabiliser e^m beside its \
                     normaliser, so scaling the matrix is no state norm (use reset:every=N or rri)",
                    self.info.family.title()
                );
            }
        }
        self.with_net_mut(|n| n.set_forget(f.core())).with_context(|| format!("{path}: --forget {f}"))?;
        // A window caches r tokens of inputs per layer: refuse one larger than this machine's memory
        // before anything allocates it.
        let bytes = self.net().state_len() as u64 * 4;
        if let Some(total) = crate::report::mem_total_bytes().filter(|&t| bytes > t) {
            let old = self.forget.core();
            self.with_net_mut(|n| n.set_forget(old)).with_context(|| format!("{path}: --forget"))?;
            bail!(
                "{path}: --forget {f}: the state would take {:.1} GiB (a window caches r tokens of inputs per layer), \
                 more than this machine's memory ({:.1} GiB)",
                bytes as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
        }
        // A method that leaves some tokens alone needs the model without it beside (built once), and
        // LongMamba's other targets a model each.
        let partial = !f.acts_in(Phase::Answer) || !f.acts_in(Phase::Prompt { len: Some(0) });
        let others = match f {
            ForgetSpec::LongMamba { table, .. } => {
                let t = table.table();
                (0..t.targets.len() - 1).map(|i| t.thresholds(i)).collect::<Result<Vec<_>>>()?
            }
            _ => Vec::new(),
        };
        self.built.with_dependent_mut(|owner, nets| -> Result<()> {
            if partial && nets.plain.is_none() {
                nets.plain = Some(owner.borrow_dependent().net()?);
            }
            nets.by_target.clear();
            for th in &others {
                let mut net = owner.borrow_dependent().net()?;
                match &mut net {
                    Net::Mamba2(m) => m.set_forget(Forget::DtThreshold(*th))?,
                    Net::Other(m) => m.set_forget(Forget::DtThreshold(*th))?,
                }
                nets.by_target.push(net);
            }
            Ok(())
        })?;
        self.forget = f;
        Ok(())
    }

    /// SHA-256 of what decides this model's numbers: the checkpoint directory's config.json (if
    /// any) and every tensor's name, dtype, shape and bytes, in name order (tensors hashed in
    /// parallel, once per loaded model). The same weights by another path, or in another container,
    /// give the same id.
    pub fn content_id(&self) -> String {
        self.content.get_or_init(|| self.hash_content()).clone()
    }

    fn hash_content(&self) -> String {
        use rayon::prelude::*;
        use sha2::{Digest, Sha256};
        let ck = self.checkpoint();
        let names: Vec<&str> = ck.names().collect();
        let sums: Vec<String> = names
            .par_iter()
            .filter_map(|n| ck.peek(n))
            .map(|t| format!("{}:{}:{:?}:{:x}", t.name, t.dtype.name(), t.shape, Sha256::digest(t.bytes)))
            .collect();
        let mut h = Sha256::new();
        if let Ok(cfg) = std::fs::read(ck.dir().join("config.json")) {
            h.update(Sha256::digest(cfg));
        }
        for s in &sums {
            h.update(s.as_bytes());
            h.update(b"\n");
        }
        format!("{:x}", h.finalize())
    }

    /// Opens a checkpoint directory (or file), or a model name in the local Hugging Face cache
    /// ([`crate::hub::resolve`]), and builds the model it holds; with the command line's
    /// `--state-file` beside it ([`set_state_file`]), if one was given.
    pub fn load(path: &Path) -> Result<Model> {
        let state = STATE_FILE.read().unwrap_or_else(|p| p.into_inner()).clone();
        Model::open(path, state.as_deref())
    }

    /// [`Model::load`] with `state_file` (or none) beside the model: an RWKV-5/6/7 state-tuning
    /// file (RWKV-PEFT's `blocks.N.att.time_state` for every layer, as RWKV-Runner loads it beside
    /// a model) that every stream then starts from, as if merged into the model's `.pth`.
    pub fn open(path: &Path, state_file: Option<&Path>) -> Result<Model> {
        let path = &crate::hub::resolve(path)?;
        let found = detect(path)?;
        let mut ckpt = Checkpoint::open(&found.weights)?;
        let beside = state_file.map(|s| ckpt.add_beside(s)).transpose()?;
        let mut info = None;
        let viewed = Viewed::try_new(ckpt, |ck| {
            let loaded = (found.family.loader())(ck, &found)?;
            if let (Some(file), Some(s)) = (beside, state_file) {
                refuse_unread_state(ck, file, s, loaded.info.family)?;
            }
            refuse_unused(ck, loaded.info.family)?;
            info = Some(loaded.info);
            anyhow::Ok(loaded.views)
        })?;
        let mut info = info.context("a loader returned no description")?;
        info.state_file = state_file.map(Path::to_path_buf);
        let built = Built::try_new(viewed, |v| {
            anyhow::Ok(Nets { main: v.borrow_dependent().net()?, plain: None, by_target: Vec::new() })
        })?;
        Ok(Model {
            built,
            info,
            forget: ForgetSpec::None,
            state_precision: Default::default(),
            content: Default::default(),
        })
    }
}

/// `--state-file`: the file every model a command opens starts from (none by default).
static STATE_FILE: std::sync::RwLock<Option<PathBuf>> = std::sync::RwLock::new(None);

/// Sets the state-tuning file [`Model::load`] opens beside every model (`--state-file`).
pub fn set_state_file(path: Option<PathBuf>) {
    *STATE_FILE.write().unwrap_or_else(|p| p.into_inner()) = path;
}

/// Refuses a state file whose tensors the model does not start from: another family, an fla-named
/// RWKV-7, or names that are not `blocks.N.att.time_state` (a state trained for another model
/// is refused by the loader's shape check; one already merged into the model, as a name both hold).
fn refuse_unread_state(ck: &Checkpoint, file: usize, path: &Path, family: Family) -> Result<()> {
    let total = ck.names_in(file).count();
    let unused: Vec<&str> = ck.names_in(file).filter(|n| !ck.is_used(n)).collect();
    if total == 0 {
        bail!("{}: holds no tensors, so no state to start from", path.display());
    }
    if unused.is_empty() {
        return Ok(());
    }
    bail!(
        "{}: {} of its {total} tensors ({}) are not a state the {} model starts from: --state-file takes \
         RWKV-PEFT's blocks.N.att.time_state [heads, head size, head size] for every layer of an \
         RWKV-5/6/7 .pth model",
        path.display(),
        unused.len(),
        first_names(&unused, 3),
        family.title()
    )
}

/// The first `most` of `names`, comma-separated, then `…` if there are more.
fn first_names(names: &[&str], most: usize) -> String {
    let shown = names[..names.len().min(most)].join(", ");
    if names.len() > most {
        shown + ", …"
    } else {
        shown
    }
}

/// Refuses a checkpoint holding tensors its family's loader did not ask for: a weight the model
/// would silently run without (an unmerged adapter, a bias or gate of a variant not supported, a
/// tuned state) gives wrong numbers with exit 0. `STUFFED_ALLOW_UNUSED_TENSORS=1` runs it anyway.
fn refuse_unused(ck: &Checkpoint, family: Family) -> Result<()> {
    let unused = ck.unused();
    if unused.is_empty() || std::env::var("STUFFED_ALLOW_UNUSED_TENSORS").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    bail!(
        "{}: {} tensor{} the {} loader does not use ({}): a variant it does not run? \
         STUFFED_ALLOW_UNUSED_TENSORS=1 runs the model without them",
        ck.origin().display(),
        unused.len(),
        if unused.len() == 1 { "" } else { "s" },
        family.title(),
        first_names(&unused, 5)
    )
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// A tensor's elements as core weight data (F32, BF16 or F16, used in place).
fn data(t: TensorView<'_>) -> Result<Data<'_>> {
    Ok(match t.dtype {
        DType::F32 => Data::F32(t.as_f32()?),
        DType::BF16 => Data::Bf16(t.as_bf16()?),
        DType::F16 => Data::F16(t.as_f16()?),
        other => bail!("{}: tensor {} has dtype {other}; weights must be F32, BF16 or F16", t.file.display(), t.name),
    })
}

/// A tensor as a core weight of `(rows, cols)`, checking its exact stored shape.
fn weight<'a>(t: TensorView<'a>, shape: &[usize]) -> Result<Weight<'a>> {
    if t.shape != shape {
        bail!("{}: tensor {} has shape {:?}, expected {:?}", t.file.display(), t.name, t.shape, shape);
    }
    let (rows, cols) = match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    };
    matrix(t, rows, cols)
}

/// `t` as a `(rows, cols)` weight; an f32 matrix (more than one row and column) carries its
/// [`crate::checkpoint::SplitCell`], which makes its bf16 halves only if a product on the AMX level asks.
fn matrix(t: TensorView<'_>, rows: usize, cols: usize) -> Result<Weight<'_>> {
    let w = Weight::new(data(t)?, rows, cols)?;
    Ok(if t.dtype == DType::F32 && rows > 1 && cols > 1 { w.with_split(t.split.lend()) } else { w })
}

/// A tensor as a `(rows, cols)` weight, checking only its element count (squeezes `[1,1,C]`).
fn view(t: TensorView<'_>, rows: usize, cols: usize) -> Result<Weight<'_>> {
    if t.numel() != rows * cols {
        bail!(
            "{}: tensor {} has shape {:?}, expected {} elements ({rows} × {cols})",
            t.file.display(),
            t.name,
            t.shape,
            rows * cols
        );
    }
    matrix(t, rows, cols)
}

/// Parameters and bytes of every stored tensor but those `skip` names (duplicates).
fn totals(ck: &Checkpoint, skip: impl Fn(&str) -> bool) -> (usize, usize) {
    ck.names()
        .filter(|n| !skip(n))
        .filter_map(|n| ck.peek(n))
        .fold((0, 0), |(p, b), v| (p + v.numel(), b + v.bytes.len()))
}

/// Fails when config.json states more layers than the weights hold (`key` names a tensor of layer
/// `{}`), before anything is sized by that count.
/// [`fewer_layers`], and refuses a layer past `n_layer` (`key` with `{}` for the layer index).
pub(crate) fn same_layers(ck: &Checkpoint, n_layer: usize, key: &str, cfg: &dyn std::fmt::Display) -> Result<()> {
    fewer_layers(ck, n_layer, key, cfg)?;
    if ck.peek(&key.replace("{}", &n_layer.to_string())).is_some() {
        bail!("{cfg}: the weights have more than the {n_layer} layers config.json states");
    }
    Ok(())
}

/// The LM head `lm_head.weight` [rows, cols], or `embed` when the config ties them
/// (`tie_word_embeddings`); neither is an error naming the file.
pub(crate) fn head_or_tied<'a>(
    ck: &'a Checkpoint,
    embed: Weight<'a>,
    tied: bool,
    rows: usize,
    cols: usize,
) -> Result<Weight<'a>> {
    match ck.get("lm_head.weight") {
        Some(hd) => weight(hd, &[rows, cols]),
        None if tied => Ok(embed),
        None => bail!("{}: missing tensor lm_head.weight (tie_word_embeddings is false)", ck.origin().display()),
    }
}

pub(crate) fn fewer_layers(ck: &Checkpoint, n_layer: usize, key: &str, cfg: &dyn std::fmt::Display) -> Result<()> {
    let last = key.replace("{}", &n_layer.saturating_sub(1).to_string());
    if n_layer > 0 && ck.get(&last).is_none() {
        bail!("{cfg}: config.json states {n_layer} layers but the weights have fewer (no tensor {last})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RWKV model's facts as an older stuffed wrote them (Mamba-2's field names) read back as a
    /// Mamba-2 layout; the check refuses them, and takes a Mamba-2 model's own.
    #[test]
    fn a_layout_read_back_must_be_its_familys() {
        let facts = |family: &str| {
            serde_json::json!({
                "path": "m", "family": family, "format": "f", "d_model": 64, "n_layer": 2,
                "n_heads": 4, "head_dim": 16, "d_state": 16, "n_groups": 1, "d_conv": 0,
                "params": 1, "weight_dtype": "f32", "weight_bytes": 4, "state_bytes": 4,
                "paper_state_size": 1, "vocab_rows": 256, "config_vocab": null, "tied_embeddings": false
            })
        };
        let old: ModelInfo = serde_json::from_value(facts("rwkv6")).unwrap();
        assert!(matches!(old.layout, Layout::Mamba2 { .. }));
        let e = old.check_read_back(Path::new("results.json")).unwrap_err().to_string();
        assert!(e.contains("results.json: model facts of a rwkv6 model with another family's layout"), "{e}");
        let m: ModelInfo = serde_json::from_value(facts("mamba2")).unwrap();
        m.check_read_back(Path::new("results.json")).unwrap();
    }
}
