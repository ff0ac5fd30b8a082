//! GLA (fla `GLAForCausalLM`) and RetNet (fla `RetNetForCausalLM`: the same block with a fixed
//! per-head decay and rotary embeddings, no gate projection), safetensors + config.json as fla
//! 0.6.0 writes them: config fields → `stuffed_core::gla_lm` config (values fla 0.6.0's `GLAConfig` / `GatedLinearAttention` would
//! compute differently, or that change the math beyond it, are refused naming the field), tensor
//! names → core views with their exact shapes.
use super::{
    dtype_name, head_or_tied, same_layers, totals, weight, Family, Found, Layout, Loaded, ModelInfo, Net, Views,
};
use crate::checkpoint::{Checkpoint, Format};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use stuffed_core::gla_lm::{self, Gla};
use stuffed_core::Weight;

/// The tables a GLA model borrows.
struct Tables<'a> {
    cfg: gla_lm::Config,
    layers: Box<[gla_lm::Layer<'a>]>,
    embed: Weight<'a>,
    norm: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let w = gla_lm::Weights { embed: self.embed, layers: &self.layers, norm: self.norm, head: self.head };
        let net = Gla::new(self.cfg, w).with_context(|| format!("{}: bad GLA weights", self.path.display()))?;
        Ok(Net::Other(Box::new(net)))
    }
}

/// `hidden · ratio` as a whole number of channels (fla asserts `isclose`), or an error naming `key`.
fn scaled(p: &dyn std::fmt::Display, key: &str, ratio: f64, hidden: usize) -> Result<usize> {
    let x = hidden as f64 * ratio;
    if ratio.is_nan() || ratio <= 0.0 || (x - x.round()).abs() > 1e-6 * x.max(1.0) {
        bail!("{p}: {key} {ratio} × hidden_size {hidden} is not a whole number of channels");
    }
    Ok(x.round() as usize)
}

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &Found) -> Result<Loaded<'a>> {
    let (cfg_file, path) = (found.config()?, found.weights.as_path());
    let (json, cfg_path) = (&cfg_file.json, &cfg_file.path);
    let p = cfg_path.display();
    let present = |k: &str| json.get(k).filter(|v| !v.is_null());
    let retnet = found.family == Family::RetNet;
    let get_u = |k: &str| -> Result<Option<usize>> {
        present(k)
            .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| anyhow!("{p}: {k} {v} is not a count")))
            .transpose()
    };
    let get_f = |k: &str| -> Result<Option<f64>> {
        present(k).map(|v| v.as_f64().ok_or_else(|| anyhow!("{p}: {k} {v} is not a number"))).transpose()
    };
    let get_b = |k: &str, default: bool| -> Result<bool> {
        present(k).map_or(Ok(default), |v| v.as_bool().ok_or_else(|| anyhow!("{p}: {k} {v} is not true/false")))
    };
    // What fla 0.6.0's GLA layer cannot be told, or what changes its math beyond what this file runs.
    if let Some(a) = present("attn") {
        bail!("{p}: attn {a}: hybrid GLA with attention layers is not supported");
    }
    if let Some(a) = present("attnres_block_size") {
        bail!("{p}: attnres_block_size {a} (attention residuals) is not supported");
    }
    let feature_map = match present("feature_map") {
        None => gla_lm::FeatureMap::Identity,
        Some(f) if f.as_str() == Some("relu") => gla_lm::FeatureMap::Relu,
        Some(f) => bail!("{p}: feature_map {f} is not supported (null or \"relu\")"),
    };
    if let Some(m) = present("attn_mode") {
        if !matches!(m.as_str(), Some("chunk" | "fused_chunk" | "fused_recurrent")) {
            bail!("{p}: attn_mode {m} is not one of fla's chunk, fused_chunk, fused_recurrent");
        }
    }
    if let Some(a) = present("hidden_act").filter(|a| a.as_str() != Some("swish")) {
        bail!("{p}: hidden_act {a} is not supported (the output gate and MLP use swish)");
    }
    if !get_b("elementwise_affine", true)? {
        bail!("{p}: elementwise_affine = false (norms without weights) is not supported");
    }
    if !retnet && !get_b("use_gk", true)? {
        bail!("{p}: use_gk = false is not supported (fla 0.6.0's GLA always gates keys)");
    }
    if !retnet && get_b("use_gv", false)? {
        bail!("{p}: use_gv = true is not supported (fla 0.6.0's GLA has no value gate)");
    }
    if let Some(n) = get_f("gate_logit_normalizer")?.filter(|&n| !retnet && n != 16.0) {
        bail!("{p}: gate_logit_normalizer {n} is not supported (fla 0.6.0's GLA divides by 16)");
    }
    let emb = ck.require("model.embeddings.weight")?;
    let &[vrows, c] = emb.shape else {
        bail!("{}: model.embeddings.weight has shape {:?}, expected [vocab, hidden]", emb.file.display(), emb.shape);
    };
    let hidden = get_u("hidden_size")?.unwrap_or(c);
    if hidden != c {
        bail!("{p}: hidden_size {hidden} but the embedding has {c} columns");
    }
    let n_layer = get_u("num_hidden_layers")?.ok_or_else(|| anyhow!("{p}: missing num_hidden_layers"))?;
    // fla's defaults: GLAConfig 4 heads, expand_k 0.5, expand_v 1; RetNetConfig 8, 1, 2.
    let n_heads = get_u("num_heads")?.unwrap_or(if retnet { 8 } else { 4 });
    let n_kv = get_u("num_kv_heads")?.unwrap_or(n_heads);
    if n_heads == 0 || n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
        bail!("{p}: num_heads {n_heads} must be a positive multiple of num_kv_heads {n_kv}");
    }
    let key_dim = scaled(&p, "expand_k", get_f("expand_k")?.unwrap_or(if retnet { 1.0 } else { 0.5 }), c)?;
    let value_dim = scaled(&p, "expand_v", get_f("expand_v")?.unwrap_or(if retnet { 2.0 } else { 1.0 }), c)?;
    if !key_dim.is_multiple_of(n_heads) || !value_dim.is_multiple_of(n_heads) {
        bail!(
            "{p}: key dim {key_dim} and value dim {value_dim} (expand_k/expand_v) must divide by num_heads {n_heads}"
        );
    }
    let (head_k, head_v) = (key_dim / n_heads, value_dim / n_heads);
    // fla's RetNetBlock never passes use_short_conv on: its layers have no short conv whatever
    // config.json says (a conv weight in the file is refused below).
    let d_conv = if !retnet && get_b("use_short_conv", false)? {
        match get_u("conv_size")?.unwrap_or(4) {
            w @ 2..=gla_lm::MAX_CONV => w,
            w => bail!("{p}: conv_size {w} is not supported (2..={})", gla_lm::MAX_CONV),
        }
    } else {
        0
    };
    let clamp_min = match get_f("clamp_min")?.filter(|_| !retnet) {
        Some(m) if m.is_finite() && m < 0.0 => Some(m as f32),
        Some(m) => bail!("{p}: clamp_min {m} is not supported (a finite log decay bound < 0)"),
        None => None,
    };
    let output_gate = get_b("use_output_gate", true)?;
    let eps = get_f("norm_eps")?.unwrap_or(1e-6) as f32;
    same_layers(ck, n_layer, "model.layers.{}.attn_norm.weight", &p)?;
    let rank = match retnet {
        true => 0,
        false => ck.require("model.layers.0.attn.gk_proj.0.weight")?.shape.first().copied().unwrap_or(0),
    };
    if retnet && ck.get("model.layers.0.attn.gk_proj.0.weight").is_some() {
        bail!("{p}: model_type retnet but the weights have attn.gk_proj (a GLA key gate)");
    }
    let im = ck.require("model.layers.0.mlp.gate_proj.weight")?.shape.first().copied().unwrap_or(0);
    if let Some(i) = get_u("intermediate_size")?.filter(|&i| i != im) {
        bail!("{p}: intermediate_size {i} but the weights have {im} (mlp.gate_proj.weight rows)");
    }
    let cfg = gla_lm::Config {
        d_model: c,
        n_layer,
        n_heads,
        n_kv_heads: n_kv,
        head_k,
        head_v,
        gate_rank: rank,
        d_mlp: im,
        vocab_rows: vrows,
        d_conv,
        decay: match retnet {
            true => gla_lm::Decay::Retention,
            false => gla_lm::Decay::Gate { norm: 16.0, clamp_min },
        },
        rope: retnet,
        output_gate,
        feature_map,
        eps,
    };
    cfg.validate().with_context(|| p.to_string())?;
    let (qd, kd, vd, od) = (cfg.q_dim(), cfg.k_dim(), cfg.v_dim(), cfg.o_dim());
    let mut layers = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let t = |s: &str, shape: &[usize]| weight(ck.require(&format!("model.layers.{l}.{s}"))?, shape);
        let conv = if d_conv > 0 {
            Some([
                t("attn.q_conv1d.weight", &[qd, 1, d_conv])?,
                t("attn.k_conv1d.weight", &[kd, 1, d_conv])?,
                t("attn.v_conv1d.weight", &[vd, 1, d_conv])?,
            ])
        } else {
            None
        };
        // fla's fused (default) and unfused output norms are the same math under two names.
        let g_norm = ["attn.g_norm_swish_gate.weight", "attn.g_norm.weight"]
            .iter()
            .find(|n| ck.get(&format!("model.layers.{l}.{n}")).is_some())
            .ok_or_else(|| {
                anyhow!("{}: missing tensor model.layers.{l}.attn.g_norm_swish_gate.weight", path.display())
            })?;
        let wg = match (output_gate, ck.get(&format!("model.layers.{l}.attn.g_proj.weight"))) {
            (true, _) => Some(t("attn.g_proj.weight", &[od, c])?),
            (false, None) => None,
            (false, Some(_)) => bail!("{p}: use_output_gate = false but the weights have attn.g_proj.weight"),
        };
        layers.push(gla_lm::Layer {
            attn_norm: t("attn_norm.weight", &[c])?,
            wq: t("attn.q_proj.weight", &[qd, c])?,
            wk: t("attn.k_proj.weight", &[kd, c])?,
            wv: t("attn.v_proj.weight", &[vd, c])?,
            wg,
            gk: match retnet {
                true => None,
                false => Some(gla_lm::KeyGate {
                    w1: t("attn.gk_proj.0.weight", &[rank, c])?,
                    w2: t("attn.gk_proj.1.weight", &[kd, rank])?,
                    bias: t("attn.gk_proj.1.bias", &[kd])?,
                }),
            },
            conv,
            g_norm: t(g_norm, &[head_v])?,
            wo: t("attn.o_proj.weight", &[c, od])?,
            mlp_norm: t("mlp_norm.weight", &[c])?,
            gate: t("mlp.gate_proj.weight", &[im, c])?,
            up: t("mlp.up_proj.weight", &[im, c])?,
            down: t("mlp.down_proj.weight", &[c, im])?,
        });
    }
    if d_conv == 0 && ck.get("model.layers.0.attn.q_conv1d.weight").is_some() {
        match retnet {
            true => bail!("{p}: the weights have attn.q_conv1d.weight, which fla's RetNet layers never use"),
            false => bail!("{p}: use_short_conv is false but the weights have attn.q_conv1d.weight"),
        }
    }
    let tied = get_b("tie_word_embeddings", false)?;
    let embed = weight(emb, &[vrows, c])?;
    let head = head_or_tied(ck, embed, tied, vrows, c)?;
    let norm = weight(ck.require("model.norm.weight")?, &[c])?;
    let (params, bytes) = totals(ck, |_| false);
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: found.family,
        format: match ck.format() {
            Format::Safetensors => "fla-safetensors",
            Format::TorchZip => "fla-torch-zip",
        }
        .into(),
        d_model: c,
        n_layer,
        layout: Layout::Gla { n_heads, n_kv_heads: n_kv, head_k, head_v, gla_mlp: im, gla_conv: d_conv },
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size() - cfg.n_layer * cfg.pos_len(),
        vocab_rows: vrows,
        config_vocab: get_u("vocab_size")?,
        tied_embeddings: tied,
        state_file: None,
    };
    let tables = Tables { cfg, layers: layers.into_boxed_slice(), embed, norm, head, path: path.to_path_buf() };
    Ok(Loaded { views: Box::new(tables), info })
}
