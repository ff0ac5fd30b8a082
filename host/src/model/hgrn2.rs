//! HGRN-2 (fla-hub safetensors + config.json): config quirks, tensor names →
//! `stuffed_core::hgrn2` views, and the layers' lower bounds computed once (FORMATS.md §4).
use super::{
    dtype_name, head_or_tied, same_layers, totals, view, Family, Found, Layout, Loaded, ModelInfo, Net, Views,
};
use crate::checkpoint::{Checkpoint, Format};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use stuffed_core::hgrn2::{self, Hgrn2};
use stuffed_core::{Data, Weight};

/// The tables an HGRN-2 model borrows, and its lower bounds (derived once at load).
struct Tables<'a> {
    cfg: hgrn2::Config,
    layers: Box<[hgrn2::Layer<'a>]>,
    /// `[n_layer, C]`: each layer's forget-gate lower bound (cumulative softmax of `model.lower_bounds`).
    bounds: Option<Box<[f32]>>,
    embed: Weight<'a>,
    norm: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let (n_layer, c) = (self.cfg.n_layer, self.cfg.d_model);
        let lower_bounds = self.bounds.as_deref().map(|b| Weight::new(Data::F32(b), n_layer, c)).transpose()?;
        let w =
            hgrn2::Weights { embed: self.embed, lower_bounds, layers: &self.layers, norm: self.norm, head: self.head };
        let net = Hgrn2::new(self.cfg, w).with_context(|| format!("{}: bad HGRN-2 weights", self.path.display()))?;
        Ok(Net::Other(Box::new(net)))
    }
}

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &Found) -> Result<Loaded<'a>> {
    let (cfg_file, path) = (found.config()?, found.weights.as_path());
    let (json, cfg_path) = (&cfg_file.json, &cfg_file.path);
    let p = cfg_path.display();
    let get_u = |k: &str| json.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let get_b = |k: &str| json.get(k).and_then(Value::as_bool);
    if get_b("use_short_conv") == Some(true) {
        bail!("{p}: use_short_conv = true is not supported");
    }
    if json.get("attn").is_some_and(|a| !a.is_null()) {
        bail!("{p}: hybrid HGRN-2 with attention layers ('attn') is not supported");
    }
    // Attention residuals add res_proj/res_norm tensors and change the residual stream.
    if json.get("attnres_block_size").is_some_and(|a| !a.is_null()) {
        bail!("{p}: attnres_block_size (attention residuals: *res_proj/*res_norm tensors) is not supported");
    }
    if get_b("elementwise_affine") == Some(false) {
        bail!("{p}: elementwise_affine = false (norms without weights) is not supported");
    }
    if let Some(act) = json.get("hidden_act").filter(|a| !a.is_null()) {
        if !matches!(act.as_str(), Some("swish" | "silu")) {
            bail!("{p}: hidden_act {act} is not supported (the MLP is SwiGLU: swish / silu)");
        }
    }
    let emb = ck.require("model.embeddings.weight")?;
    let &[vrows, c] = emb.shape else {
        bail!("{}: model.embeddings.weight has shape {:?}, expected [vocab, hidden]", emb.file.display(), emb.shape);
    };
    let hidden = get_u("hidden_size").unwrap_or(c);
    if hidden != c {
        bail!("{p}: hidden_size {hidden} but the embedding has {c} columns");
    }
    let n_layer = get_u("num_hidden_layers").ok_or_else(|| anyhow!("{p}: missing num_hidden_layers"))?;
    let expand = match get_u("expand_ratio") {
        Some(e) => e,
        None => match get_u("num_heads") {
            Some(h) if h > 0 => c / h,
            _ => 128,
        },
    };
    let im = ck.require("model.layers.0.mlp.gate_proj.weight")?.shape.first().copied().unwrap_or(0);
    if let Some(i) = get_u("intermediate_size").filter(|&i| i != im) {
        bail!("{p}: intermediate_size {i} but the weights have {im} (mlp.gate_proj.weight rows)");
    }
    let eps = json.get("norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32;
    let cfg = hgrn2::Config { d_model: c, n_layer, expand, d_mlp: im, vocab_rows: vrows, eps, g_eps: 1e-5 };
    cfg.validate().with_context(|| p.to_string())?;
    let use_lb = get_b("use_lower_bound").unwrap_or(true);
    same_layers(ck, n_layer, "model.layers.{}.attn_norm.weight", &p)?;
    // The bounds themselves, computed once (a derived copy the tables own).
    let bounds: Option<Box<[f32]>> = if use_lb {
        let mut b = vec![0f32; n_layer * c].into_boxed_slice();
        hgrn2::lower_bounds(&view(ck.require("model.lower_bounds")?, n_layer, c)?, &mut b)?;
        Some(b)
    } else {
        None
    };
    let mut layers = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let t = |s: &str, r: usize, cc: usize| view(ck.require(&format!("model.layers.{l}.{s}"))?, r, cc);
        layers.push(hgrn2::Layer {
            attn_norm: t("attn_norm.weight", 1, c)?,
            wq: t("attn.q_proj.weight", c, c)?,
            wf: t("attn.f_proj.weight", c, c)?,
            wi: t("attn.i_proj.weight", c, c)?,
            wo: t("attn.o_proj.weight", c, c)?,
            g_norm: t("attn.g_norm.weight", 1, c)?,
            mlp_norm: t("mlp_norm.weight", 1, c)?,
            gate: t("mlp.gate_proj.weight", im, c)?,
            up: t("mlp.up_proj.weight", im, c)?,
            down: t("mlp.down_proj.weight", c, im)?,
        });
    }
    let tied = get_b("tie_word_embeddings").unwrap_or(false);
    let embed = view(emb, vrows, c)?;
    let head = head_or_tied(ck, embed, tied, vrows, c)?;
    let norm = view(ck.require("model.norm.weight")?, 1, c)?;
    let (params, bytes) = totals(ck, |_| false);
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: Family::Hgrn2,
        format: match ck.format() {
            Format::Safetensors => "fla-safetensors",
            Format::TorchZip => "fla-torch-zip",
        }
        .into(),
        d_model: c,
        n_layer,
        layout: Layout::Hgrn2 { n_heads: cfg.n_heads(), expand, head_v: cfg.head_v(), d_mlp: im },
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size(),
        vocab_rows: vrows,
        config_vocab: get_u("vocab_size"),
        tied_embeddings: tied,
        state_file: None,
    };
    let tables = Tables { cfg, layers: layers.into_boxed_slice(), bounds, embed, norm, head, path: path.to_path_buf() };
    Ok(Loaded { views: Box::new(tables), info })
}
