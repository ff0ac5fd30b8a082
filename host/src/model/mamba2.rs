//! Mamba-2 (HF `Mamba2ForCausalLM` or official `mamba_ssm` checkpoints): config quirks, tensor
//! names → `stuffed_core::mamba2` views (FORMATS.md §2).
use super::{fewer_layers, totals, weight, Layout, Loaded, ModelInfo, Net, Views};
use crate::checkpoint::{Checkpoint, Format};
use crate::config::{self, Flavor};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use stuffed_core::mamba2::{self, Mamba2};
use stuffed_core::Weight;

/// The tables a Mamba-2 model borrows.
struct Tables<'a> {
    cfg: mamba2::Config,
    layers: Box<[mamba2::Layer<'a>]>,
    embed: Weight<'a>,
    norm_f: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let w = mamba2::Weights { embed: self.embed, layers: &self.layers, norm_f: self.norm_f, head: self.head };
        let net = Mamba2::new(self.cfg, w).with_context(|| format!("{}: bad Mamba-2 weights", self.path.display()))?;
        Ok(Net::Mamba2(Box::new(net)))
    }
}

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &super::Found) -> Result<Loaded<'a>> {
    let (cfg, path) = (found.config()?, &found.weights);
    let (json, cfg_path) = (&cfg.json, &cfg.path);
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
        let bias = |n: &str, shape: &[usize], conv: bool| -> Result<Option<Weight<'a>>> {
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
    let norm_f = weight(ck.require("backbone.norm_f.weight")?, &[d])?;
    // Count each stored tensor once; an official tied lm_head is a duplicate of the embedding.
    let (params, bytes) = totals(ck, |n| official && mc.tied && n == "lm_head.weight");
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: super::Family::Mamba2,
        format: match (ck.format(), mc.flavor) {
            (Format::Safetensors, Flavor::Hf) => "hf-safetensors",
            (Format::Safetensors, Flavor::Official) => "official-safetensors",
            (Format::TorchZip, Flavor::Hf) => "hf-torch-zip",
            (Format::TorchZip, Flavor::Official) => "official-torch-zip",
        }
        .into(),
        d_model: d,
        n_layer: c.n_layer,
        layout: Layout::Mamba2 {
            n_heads: h,
            head_dim: c.head_dim,
            d_state: c.d_state,
            n_groups: c.n_groups,
            d_conv: k,
        },
        params,
        weight_dtype: super::dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * c.paper_state_size(),
        paper_state_size: c.paper_state_size(),
        vocab_rows: rows,
        config_vocab: mc.vocab_size,
        tied_embeddings: mc.tied,
        state_file: None,
    };
    let tables = Tables { cfg: c, layers: layers.into_boxed_slice(), embed, norm_f, head, path: path.to_path_buf() };
    Ok(Loaded { views: Box::new(tables), info })
}
