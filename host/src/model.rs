//! A checkpoint on disk → a core model whose weights are views into the checkpoint's maps.
use crate::checkpoint::{Checkpoint, DType, Format, TensorView};
use crate::config::{self, Flavor};
use crate::forget::ForgetSpec;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use stuffed_core::mamba2::{self, Mamba2};
use stuffed_core::{Data, Recurrent, Weight};

/// Facts about a loaded model, for `stuffed info` and every report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub family: String,
    pub format: String,
    pub d_model: usize,
    pub n_layer: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub d_state: usize,
    pub n_groups: usize,
    pub d_conv: usize,
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
}

mod families;

enum Net {
    Mamba2(Mamba2<'static>),
    Rwkv(stuffed_core::rwkv::Rwkv<'static>),
    Hgrn2(stuffed_core::hgrn2::Hgrn2<'static>),
}

/// A loaded model. The core model borrows `layers` and the checkpoint's maps; both live on the heap
/// and are dropped after it (fields drop in declaration order).
pub struct Model {
    net: Net,
    /// Layer tables of the other families (the core model borrows them too).
    _extra: Option<Box<dyn std::any::Any + Send + Sync>>,
    _layers: Box<[mamba2::Layer<'static>]>,
    _ckpt: Box<Checkpoint>,
    pub info: ModelInfo,
    /// The forgetting method sessions of this model use.
    pub forget: ForgetSpec,
}

/// The directory a model path names (a file's parent): where its config and tokenizer live.
pub fn dir_of(path: &Path) -> PathBuf {
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

    pub fn net(&self) -> &dyn Recurrent {
        match &self.net {
            Net::Mamba2(m) => m,
            Net::Rwkv(m) => m,
            Net::Hgrn2(m) => m,
        }
    }

    /// The Mamba-2 model, when this is one (the CUDA backend runs Mamba-2).
    pub fn mamba2(&self) -> Option<&Mamba2<'static>> {
        match &self.net {
            Net::Mamba2(m) => Some(m),
            _ => None,
        }
    }

    fn net_mut(&mut self) -> &mut dyn Recurrent {
        match &mut self.net {
            Net::Mamba2(m) => m,
            Net::Rwkv(m) => m,
            Net::Hgrn2(m) => m,
        }
    }

    /// Sets the forgetting method (before creating sessions: the state size may change).
    pub fn set_forget(&mut self, f: ForgetSpec) -> Result<()> {
        let path = self.info.path.display().to_string();
        self.net_mut().set_forget(f.core()).with_context(|| format!("{path}: --forget {f}"))?;
        // A window caches r tokens of inputs per layer: refuse one larger than this machine's memory
        // before anything allocates it.
        let bytes = self.net().state_len() as u64 * 4;
        if let Some(total) = crate::report::mem_total_bytes().filter(|&t| bytes > t) {
            let old = self.forget.core();
            self.net_mut().set_forget(old).with_context(|| format!("{path}: --forget"))?;
            bail!(
                "{path}: --forget {f}: the state would take {:.1} GiB (a window caches r tokens of inputs per layer), \
                 more than this machine's memory ({:.1} GiB)",
                bytes as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
        }
        self.forget = f;
        Ok(())
    }

    /// SHA-256 of what decides this model's numbers: the checkpoint directory's config.json (if
    /// any) and every tensor's name, dtype, shape and bytes, in name order (tensors hashed in
    /// parallel). The same weights by another path, or in another container, give the same id.
    pub fn content_id(&self) -> String {
        use rayon::prelude::*;
        use sha2::{Digest, Sha256};
        let ck = &self._ckpt;
        let names: Vec<&str> = ck.names().collect();
        let sums: Vec<String> = names
            .par_iter()
            .filter_map(|n| ck.get(n))
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

    /// Opens a checkpoint directory (or file) and builds the model it holds.
    pub fn load(path: &Path) -> Result<Model> {
        // RWKV (BlinkDL .pth, or HF-format RWKV-5/6) and HGRN-2 load in `families`.
        if let Some(m) = families::try_load(path)? {
            return Ok(m);
        }
        let ckpt = Box::new(Checkpoint::open(path)?);
        // SAFETY: the views borrow memory owned by `ckpt` (maps and aligned copies, all on the heap);
        // `Model` keeps `ckpt` alive, unmoved in its Box, for as long as the views exist.
        let ck: &'static Checkpoint = unsafe { &*(ckpt.as_ref() as *const Checkpoint) };
        let cfg_path = ck.dir().join("config.json");
        if !cfg_path.exists() {
            bail!("{}: missing config.json beside the weights", cfg_path.display());
        }
        let json = config::read_json(&cfg_path)?;
        match config::family(&json, &cfg_path)? {
            "mamba2" => load_mamba2(ck, ckpt, &json, &cfg_path, path),
            other => bail!("{}: unknown architecture '{other}'", cfg_path.display()),
        }
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// A tensor as a core weight of `(rows, cols)`, checking its exact stored shape.
fn weight(t: TensorView<'static>, shape: &[usize]) -> Result<Weight<'static>> {
    if t.shape != shape {
        bail!("{}: tensor {} has shape {:?}, expected {:?}", t.file.display(), t.name, t.shape, shape);
    }
    let data = match t.dtype {
        DType::F32 => Data::F32(t.as_f32()?),
        DType::BF16 => Data::Bf16(t.as_bf16()?),
        DType::F16 => Data::F16(t.as_f16()?),
        other => bail!("{}: tensor {} has dtype {other}; weights must be F32, BF16 or F16", t.file.display(), t.name),
    };
    let (rows, cols) = match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    };
    Ok(Weight::new(data, rows, cols)?)
}

/// Fails when config.json states more layers than the weights hold (`key` names a tensor of layer
/// `{}`), before anything is sized by that count.
pub(crate) fn fewer_layers(ck: &Checkpoint, n_layer: usize, key: &str, cfg: &dyn std::fmt::Display) -> Result<()> {
    let last = key.replace("{}", &n_layer.saturating_sub(1).to_string());
    if n_layer > 0 && ck.get(&last).is_none() {
        bail!("{cfg}: config.json states {n_layer} layers but the weights have fewer (no tensor {last})");
    }
    Ok(())
}

fn load_mamba2(
    ck: &'static Checkpoint,
    ckpt: Box<Checkpoint>,
    json: &serde_json::Value,
    cfg_path: &Path,
    path: &Path,
) -> Result<Model> {
    let official = ck.get("backbone.embedding.weight").is_some();
    let emb_name = if official { "backbone.embedding.weight" } else { "backbone.embeddings.weight" };
    let emb = ck.require(emb_name)?;
    if ck.names().any(|n| n.ends_with("mixer.x_proj.weight")) {
        bail!("{}: this is a Mamba-1 checkpoint (x_proj); stuffed runs Mamba-2", emb.file.display());
    }
    let &[rows, _] = emb.shape else {
        bail!("{}: tensor {emb_name} has shape {:?}, expected [vocab, d_model]", emb.file.display(), emb.shape);
    };
    let mc = config::mamba2(json, cfg_path, rows)?;
    if (mc.flavor == Flavor::Official) != official {
        bail!("{}: config.json and the tensor names disagree on the format (HF vs official)", cfg_path.display());
    }
    let c = mc.core;
    c.validate().with_context(|| cfg_path.display().to_string())?;
    let (d, di, h, cd, k) = (c.d_model, c.d_inner(), c.n_heads, c.conv_dim(), c.d_conv);
    let nin = c.in_proj_rows();
    fewer_layers(ck, c.n_layer, "backbone.layers.{}.mixer.A_log", &cfg_path.display())?;
    let mut layers = Vec::with_capacity(c.n_layer);
    for l in 0..c.n_layer {
        let p = format!("backbone.layers.{l}.");
        let t = |n: &str| ck.require(&format!("{p}{n}"));
        // A bias the config promises must be there; one it rules out must not be (the reference
        // would ignore it, so the file and its config disagree).
        let bias = |n: &str, shape: &[usize], conv: bool| -> Result<Option<Weight<'static>>> {
            let (name, field) = (format!("{p}{n}"), mc.bias_field(conv));
            let promised = if conv { mc.conv_bias } else { mc.bias };
            match (ck.get(&name), promised) {
                (Some(v), true) => weight(v, shape).map(Some),
                (None, false) => Ok(None),
                (None, true) => {
                    let e = ck.require(&name).err().map(|e| format!("{e:#}")).unwrap_or_default();
                    bail!("{e}, which {} promises ({field} = true)", cfg_path.display())
                }
                (Some(v), false) => bail!(
                    "{}: tensor {name} is present but {} has {field} = false (the config and the weights disagree)",
                    v.file.display(),
                    cfg_path.display()
                ),
            }
        };
        let a_log = t("mixer.A_log")?;
        if a_log.shape.len() != 1 {
            bail!(
                "{}: {p}mixer.A_log has shape {:?}: a Mamba-1 layer; stuffed runs Mamba-2",
                a_log.file.display(),
                a_log.shape
            );
        }
        let dv = t("mixer.D")?;
        let d_shape = match mc.d_has_hdim {
            Some(true) => [di],
            Some(false) => [h],
            None if dv.shape == [di] => [di],
            None => [h],
        };
        let inw = t("mixer.in_proj.weight")?;
        if inw.shape.first().is_some_and(|&r| r != nin) {
            bail!(
                "{}: {p}mixer.in_proj.weight has {} rows, expected 2·d_inner + 2·ngroups·d_state + nheads = {nin} \
                 (an MLP prefix or a config that does not match the weights)",
                inw.file.display(),
                inw.shape[0]
            );
        }
        layers.push(mamba2::Layer {
            norm: weight(t("norm.weight")?, &[d])?,
            in_proj: weight(inw, &[nin, d])?,
            in_proj_bias: bias("mixer.in_proj.bias", &[nin], false)?,
            conv_w: weight(t("mixer.conv1d.weight")?, &[cd, 1, k])?,
            conv_b: bias("mixer.conv1d.bias", &[cd], true)?,
            dt_bias: weight(t("mixer.dt_bias")?, &[h])?,
            a_log: weight(a_log, &[h])?,
            d: weight(dv, &d_shape)?,
            gate_norm: weight(t("mixer.norm.weight")?, &[di])?,
            out_proj: weight(t("mixer.out_proj.weight")?, &[d, di])?,
            out_proj_bias: bias("mixer.out_proj.bias", &[d], false)?,
        });
    }
    if ck.get(&format!("backbone.layers.{}.mixer.A_log", c.n_layer)).is_some() {
        bail!("{}: the weights have more than the {} layers config.json states", emb.file.display(), c.n_layer);
    }
    let embed = weight(emb, &[rows, d])?;
    let head = match ck.get("lm_head.weight") {
        Some(hd) if !mc.tied || official => weight(hd, &[rows, d])?,
        _ if mc.tied => embed,
        _ => bail!("{}: missing tensor lm_head.weight (tie_word_embeddings is false)", emb.file.display()),
    };
    let layers: Box<[mamba2::Layer<'static>]> = layers.into_boxed_slice();
    // SAFETY: the boxed slice is owned by the returned `Model` and outlives `net` (drop order).
    let layers_ref: &'static [mamba2::Layer<'static>] = unsafe { &*(layers.as_ref() as *const _) };
    let weights = mamba2::Weights {
        embed,
        layers: layers_ref,
        norm_f: weight(ck.require("backbone.norm_f.weight")?, &[d])?,
        head,
    };
    let net = Mamba2::new(c, weights).with_context(|| format!("{}: bad Mamba-2 weights", path.display()))?;

    // Count each stored tensor once; an official tied lm_head is a duplicate of the embedding.
    let dup = |n: &str| official && mc.tied && n == "lm_head.weight";
    let (params, bytes) = ck
        .names()
        .filter(|n| !dup(n))
        .filter_map(|n| ck.get(n))
        .fold((0, 0), |(p, b), v| (p + v.numel(), b + v.bytes.len()));
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: "mamba2".into(),
        format: match (ck.format(), mc.flavor) {
            (Format::Safetensors, Flavor::Hf) => "hf-safetensors",
            (Format::Safetensors, Flavor::Official) => "official-safetensors",
            (Format::TorchZip, Flavor::Hf) => "hf-torch-zip",
            (Format::TorchZip, Flavor::Official) => "official-torch-zip",
        }
        .into(),
        d_model: d,
        n_layer: c.n_layer,
        n_heads: h,
        head_dim: c.head_dim,
        d_state: c.d_state,
        n_groups: c.n_groups,
        d_conv: k,
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * c.paper_state_size(),
        paper_state_size: c.paper_state_size(),
        vocab_rows: rows,
        config_vocab: mc.vocab_size,
        tied_embeddings: mc.tied,
    };
    Ok(Model { net: Net::Mamba2(net), _extra: None, _layers: layers, _ckpt: ckpt, info, forget: ForgetSpec::None })
}
