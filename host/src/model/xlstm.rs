//! xLSTM (HF `xLSTMForCausalLM`, `model_type: xlstm`, NX-AI's xLSTM-7b): config.json field by field
//! (values HF's native xLSTM would compute differently, or that change the math beyond what
//! `stuffed_core::xlstm` runs, are refused naming the field), tensor names → views.
use super::{
    dtype_name, head_or_tied, same_layers, totals, weight, Family, Found, Layout, Loaded, ModelInfo, Net, Views,
};
use crate::checkpoint::{Checkpoint, Format};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use stuffed_core::xlstm::{self, Xlstm};
use stuffed_core::Weight;

struct Tables<'a> {
    cfg: xlstm::Config,
    layers: Box<[xlstm::Layer<'a>]>,
    embed: Weight<'a>,
    out_norm: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let w = xlstm::Weights { embed: self.embed, layers: &self.layers, out_norm: self.out_norm, head: self.head };
        let net = Xlstm::new(self.cfg, w).with_context(|| format!("{}: bad xLSTM weights", self.path.display()))?;
        Ok(Net::Other(Box::new(net)))
    }
}

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &Found) -> Result<Loaded<'a>> {
    let (cfg_file, path) = (found.config()?, found.weights.as_path());
    let (json, cfg_path) = (&cfg_file.json, &cfg_file.path);
    let p = cfg_path.display();
    let present = |k: &str| json.get(k).filter(|v| !v.is_null());
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
    // What HF's xLSTM can be told that changes the math beyond what the core runs.
    if get_b("use_bias", false)? {
        bail!("{p}: use_bias = true is not supported (xLSTM-7b has no biases but its gates')");
    }
    if !get_b("add_out_norm", true)? {
        bail!("{p}: add_out_norm = false is not supported (HF's xLSTMModel applies out_norm whatever it says)");
    }
    if let Some(m) = present("weight_mode").filter(|m| m.as_str() != Some("single")) {
        bail!("{p}: weight_mode {m} is not supported (\"single\": separate q, k, v, gate projections)");
    }
    let cap = |k: &str, default: f64| -> Result<f32> {
        match json.get(k) {
            None => Ok(default as f32),
            Some(v) => match v.as_f64() {
                Some(c) if c.is_finite() && c > 0.0 => Ok(c as f32),
                _ => bail!("{p}: {k} {v} is not supported (a finite cap > 0)"),
            },
        }
    };
    let (gate_cap, logit_cap) = (cap("gate_soft_cap", 15.0)?, cap("output_logit_soft_cap", 30.0)?);
    let emb = ck.require("backbone.embeddings.weight")?;
    let &[vrows, c] = emb.shape else {
        bail!("{}: backbone.embeddings.weight has shape {:?}, expected [vocab, hidden]", emb.file.display(), emb.shape);
    };
    for k in ["hidden_size", "embedding_dim"] {
        if let Some(h) = get_u(k)?.filter(|&h| h != c) {
            bail!("{p}: {k} {h} but the embedding has {c} columns");
        }
    }
    let n_layer = match (get_u("num_hidden_layers")?, get_u("num_blocks")?) {
        (Some(a), Some(b)) if a != b => bail!("{p}: num_hidden_layers {a} but num_blocks {b}"),
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => bail!("{p}: missing num_hidden_layers"),
    };
    let n_heads = get_u("num_heads")?.unwrap_or(8);
    // The layer's widths are int(C · factor) (HF's xLSTMLayer; the config's rounded qk_dim property
    // is not what it builds): read from the weights, checked against the factors.
    let pre = "backbone.blocks.0.mlstm_layer";
    let rows = |n: &str| -> Result<usize> { Ok(ck.require(&format!("{pre}.{n}.weight"))?.shape[0]) };
    let (qk, vd) = (rows("q")?, rows("v")?);
    for (k, default, have) in [("qk_dim_factor", 0.5, qk), ("v_dim_factor", 1.0, vd)] {
        let want = (c as f64 * get_f(k)?.unwrap_or(default)) as usize;
        if want != have {
            bail!("{p}: {k} gives {want} channels but the weights have {have}");
        }
    }
    if n_heads == 0 || !qk.is_multiple_of(n_heads) || !vd.is_multiple_of(n_heads) {
        bail!("{p}: num_heads {n_heads} must divide the query/key width {qk} and the value width {vd}");
    }
    let d_ffn = ck.require("backbone.blocks.0.ffn.proj_up.weight")?.shape[0];
    let factor = get_f("ffn_proj_factor")?.unwrap_or(2.667);
    let multiple = get_u("ffn_round_up_to_multiple_of")?.unwrap_or(64).max(1);
    // In f64: a factor near 2^64 made the product of whole multiples overflow (the long fuzz).
    let want = ((c as f64 * factor) / multiple as f64).ceil() * multiple as f64;
    if want != d_ffn as f64 {
        bail!(
            "{p}: ffn_proj_factor {factor} and ffn_round_up_to_multiple_of {multiple} give {want}, the weights {d_ffn}"
        );
    }
    let norm_eps = get_f("norm_eps")?.unwrap_or(1e-6) as f32;
    let eps = get_f("eps")?.unwrap_or(1e-6) as f32;
    let cfg = xlstm::Config {
        d_model: c,
        n_layer,
        n_heads,
        head_qk: qk / n_heads,
        head_v: vd / n_heads,
        d_ffn,
        vocab_rows: vrows,
        norm_eps,
        eps,
        gate_cap,
        logit_cap,
    };
    cfg.validate().with_context(|| p.to_string())?;
    same_layers(ck, n_layer, "backbone.blocks.{}.norm_mlstm.weight", &p)?;
    // The per-head norm's weight: flat [H·dv] as transformers builds it, or [H, dv] (the same
    // values in the same order) as some conversions store it.
    let head_norm = |t: crate::checkpoint::TensorView<'a>| match t.shape {
        [n] if *n == vd => weight(t, &[vd]),
        [h, d] if (*h, *d) == (n_heads, vd / n_heads) => super::view(t, 1, vd),
        _ => bail!(
            "{}: tensor {} has shape {:?}, expected [{vd}] or [{n_heads}, {}]",
            t.file.display(),
            t.name,
            t.shape,
            vd / n_heads
        ),
    };
    let mut layers = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let t = |s: &str, shape: &[usize]| weight(ck.require(&format!("backbone.blocks.{l}.{s}"))?, shape);
        let m = |s: &str, shape: &[usize]| t(&format!("mlstm_layer.{s}"), shape);
        layers.push(xlstm::Layer {
            norm_mlstm: t("norm_mlstm.weight", &[c])?,
            wq: m("q.weight", &[qk, c])?,
            wk: m("k.weight", &[qk, c])?,
            wv: m("v.weight", &[vd, c])?,
            wo: m("ogate_preact.weight", &[vd, c])?,
            wi: m("igate_preact.weight", &[n_heads, c])?,
            bi: m("igate_preact.bias", &[n_heads])?,
            wf: m("fgate_preact.weight", &[n_heads, c])?,
            bf: m("fgate_preact.bias", &[n_heads])?,
            head_norm: head_norm(ck.require(&format!("backbone.blocks.{l}.mlstm_layer.multihead_norm.weight"))?)?,
            out_proj: m("out_proj.weight", &[c, vd])?,
            norm_ffn: t("norm_ffn.weight", &[c])?,
            gate: t("ffn.proj_up_gate.weight", &[d_ffn, c])?,
            up: t("ffn.proj_up.weight", &[d_ffn, c])?,
            down: t("ffn.proj_down.weight", &[c, d_ffn])?,
        });
    }
    let tied = get_b("tie_word_embeddings", false)?;
    let embed = weight(emb, &[vrows, c])?;
    let head = head_or_tied(ck, embed, tied, vrows, c)?;
    let out_norm = weight(ck.require("backbone.out_norm.weight")?, &[c])?;
    let (params, bytes) = totals(ck, |_| false);
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: Family::Xlstm,
        format: match ck.format() {
            Format::Safetensors => "hf-safetensors",
            Format::TorchZip => "hf-torch-zip",
        }
        .into(),
        d_model: c,
        n_layer,
        layout: Layout::Xlstm { n_heads, head_qk: cfg.head_qk, head_v: cfg.head_v, xlstm_ffn: d_ffn },
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size(),
        vocab_rows: vrows,
        config_vocab: get_u("vocab_size")?,
        tied_embeddings: tied && ck.get("lm_head.weight").is_none(),
        state_file: None,
    };
    let tables = Tables { cfg, layers: layers.into_boxed_slice(), embed, out_norm, head, path: path.to_path_buf() };
    Ok(Loaded { views: Box::new(tables), info })
}
