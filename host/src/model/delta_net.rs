//! DeltaNet and Gated DeltaNet (fla `DeltaNetForCausalLM` / `GatedDeltaNetForCausalLM`,
//! safetensors + config.json as fla 0.6.0 writes them): config fields → `stuffed_core::delta_net`
//! config (values fla 0.6.0's `DeltaNetConfig` / `GatedDeltaNetConfig` and their layers would compute
//! differently, or that change the math beyond them, are refused naming the field), tensor names →
//! core views with their exact shapes. One loader for both: the family says which config it reads.
use super::{
    dtype_name, head_or_tied, same_layers, totals, weight, Family, Found, Layout, Loaded, ModelInfo, Net, Views,
};
use crate::checkpoint::{Checkpoint, Format};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use stuffed_core::delta_net::{self, DeltaNet, OutputGate};
use stuffed_core::gla_lm::MAX_CONV;
use stuffed_core::Weight;

/// The tables a DeltaNet / GDN model borrows.
struct Tables<'a> {
    cfg: delta_net::Config,
    layers: Box<[delta_net::Layer<'a>]>,
    embed: Weight<'a>,
    norm: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
    title: &'static str,
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let w = delta_net::Weights { embed: self.embed, layers: &self.layers, norm: self.norm, head: self.head };
        let net = DeltaNet::new(self.cfg, w)
            .with_context(|| format!("{}: bad {} weights", self.path.display(), self.title))?;
        Ok(Net::Other(Box::new(net)))
    }
}

/// `base · ratio` as a whole number of channels (fla asserts `isclose`), or an error naming `key`.
fn scaled(p: &dyn std::fmt::Display, key: &str, ratio: f64, base: usize, of: &str) -> Result<usize> {
    let x = base as f64 * ratio;
    if ratio.is_nan() || ratio <= 0.0 || (x - x.round()).abs() > 1e-5 * x.max(1.0) {
        bail!("{p}: {key} {ratio} × {of} {base} is not a whole number of channels");
    }
    Ok(x.round() as usize)
}

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &Found) -> Result<Loaded<'a>> {
    let gated = found.family == Family::GatedDeltaNet;
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
    let get_s = |k: &str, default: &'static str| -> Result<String> {
        present(k).map_or(Ok(default.to_string()), |v| {
            v.as_str().map(str::to_string).ok_or_else(|| anyhow!("{p}: {k} {v} is not a string"))
        })
    };
    // What fla 0.6.0's layers cannot be told, or what changes their math beyond what this file runs.
    if let Some(a) = present("attn") {
        bail!("{p}: attn {a}: hybrids with attention layers are not supported");
    }
    if let Some(a) = present("attnres_block_size") {
        bail!("{p}: attnres_block_size {a} (attention residuals) is not supported");
    }
    let mode = get_s("attn_mode", "chunk")?;
    if !matches!(mode.as_str(), "chunk" | "fused_recurrent") {
        bail!("{p}: attn_mode {mode} is not one of fla 0.6.0's chunk, fused_recurrent");
    }
    let act = get_s("hidden_act", "swish")?;
    if act != "swish" {
        bail!("{p}: hidden_act {act} is not supported (the MLP uses swish)");
    }
    if !get_b("elementwise_affine", true)? {
        bail!("{p}: elementwise_affine = false (norms without weights) is not supported");
    }
    let emb = ck.require("model.embeddings.weight")?;
    let &[vrows, c] = emb.shape else {
        bail!("{}: model.embeddings.weight has shape {:?}, expected [vocab, hidden]", emb.file.display(), emb.shape);
    };
    let hidden = get_u("hidden_size")?.unwrap_or(2048);
    if hidden != c {
        bail!("{p}: hidden_size {hidden} but the embedding has {c} columns");
    }
    let n_layer = get_u("num_hidden_layers")?.ok_or_else(|| anyhow!("{p}: missing num_hidden_layers"))?;
    let (n_heads, n_v_heads, head_k, head_v, use_beta, output_gate) = if gated {
        let nh = get_u("num_heads")?.unwrap_or(6);
        let nv = get_u("num_v_heads")?.unwrap_or(nh);
        if nh == 0 || nv == 0 || !nv.is_multiple_of(nh) {
            bail!("{p}: num_v_heads {nv} must be a positive multiple of num_heads {nh}");
        }
        let hk = get_u("head_dim")?.unwrap_or(256);
        let hv = scaled(&p, "expand_v", get_f("expand_v")?.unwrap_or(2.0), hk, "head_dim")?;
        let gate = if get_b("use_gate", true)? {
            match get_s("output_gate_activation", "swish")?.as_str() {
                "swish" | "silu" => OutputGate::Swish,
                "sigmoid" => OutputGate::Sigmoid,
                a => bail!("{p}: output_gate_activation {a} is not one of swish, silu, sigmoid"),
            }
        } else {
            OutputGate::None
        };
        (nh, nv, hk, hv, true, gate)
    } else {
        let q = get_s("qk_activation", "silu")?;
        if q != "silu" {
            bail!("{p}: qk_activation {q} is not supported (only silu, fla-hub's setting)");
        }
        let q = get_s("qk_norm", "l2")?;
        if q != "l2" {
            bail!("{p}: qk_norm {q} is not supported (only l2, fla-hub's setting)");
        }
        if !get_b("use_output_norm", true)? {
            bail!("{p}: use_output_norm = false is not supported (fla 0.6.0's DeltaNet always norms its output)");
        }
        let nh = get_u("num_heads")?.unwrap_or(16);
        if nh == 0 {
            bail!("{p}: num_heads 0");
        }
        let key_dim = scaled(&p, "expand_k", get_f("expand_k")?.unwrap_or(1.0), c, "hidden_size")?;
        let value_dim = scaled(&p, "expand_v", get_f("expand_v")?.unwrap_or(1.0), c, "hidden_size")?;
        if !key_dim.is_multiple_of(nh) || !value_dim.is_multiple_of(nh) {
            bail!("{p}: key dim {key_dim} and value dim {value_dim} (expand_k/expand_v) must divide by num_heads {nh}");
        }
        let gate = if get_b("use_gate", false)? { OutputGate::Swish } else { OutputGate::None };
        (nh, nh, key_dim / nh, value_dim / nh, get_b("use_beta", true)?, gate)
    };
    let d_conv = if get_b("use_short_conv", true)? {
        match get_u("conv_size")?.unwrap_or(4) {
            w @ 2..=MAX_CONV => w,
            w => bail!("{p}: conv_size {w} is not supported (2..={MAX_CONV})"),
        }
    } else {
        0
    };
    let neg_eigval = get_b("allow_neg_eigval", false)?;
    let eps = get_f("norm_eps")?.unwrap_or(1e-6) as f32;
    same_layers(ck, n_layer, "model.layers.{}.attn_norm.weight", &p)?;
    let im = ck.require("model.layers.0.mlp.gate_proj.weight")?.shape.first().copied().unwrap_or(0);
    if let Some(i) = get_u("intermediate_size")?.filter(|&i| i != im) {
        bail!("{p}: intermediate_size {i} but the weights have {im} (mlp.gate_proj.weight rows)");
    }
    let cfg = delta_net::Config {
        d_model: c,
        n_layer,
        n_heads,
        n_v_heads,
        head_k,
        head_v,
        d_mlp: im,
        vocab_rows: vrows,
        d_conv,
        gated,
        use_beta,
        neg_eigval,
        output_gate,
        eps,
    };
    cfg.validate().with_context(|| p.to_string())?;
    let (kd, vd) = (cfg.key_dim(), cfg.value_dim());
    let mut layers = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let name = |s: &str| format!("model.layers.{l}.{s}");
        let t = |s: &str, shape: &[usize]| weight(ck.require(&name(s))?, shape);
        // A tensor the config says is absent must be absent (it would change the math).
        let absent = |s: &str, why: &str| -> Result<()> {
            match ck.get(&name(s)) {
                Some(_) => bail!("{p}: {why} but the weights have {}", name(s)),
                None => Ok(()),
            }
        };
        let conv = if d_conv > 0 {
            for s in ["attn.q_conv1d.bias", "attn.k_conv1d.bias", "attn.v_conv1d.bias"] {
                absent(s, "conv biases are not supported (fla 0.6.0's layers have none)")?;
            }
            Some([
                t("attn.q_conv1d.weight", &[kd, 1, d_conv])?,
                t("attn.k_conv1d.weight", &[kd, 1, d_conv])?,
                t("attn.v_conv1d.weight", &[vd, 1, d_conv])?,
            ])
        } else {
            absent("attn.q_conv1d.weight", "use_short_conv is false")?;
            None
        };
        let wb = if use_beta {
            Some(t("attn.b_proj.weight", &[n_v_heads, c])?)
        } else {
            absent("attn.b_proj.weight", "use_beta is false")?;
            None
        };
        let wg = if output_gate != OutputGate::None {
            Some(t("attn.g_proj.weight", &[vd, c])?)
        } else {
            absent("attn.g_proj.weight", "use_gate is false")?;
            None
        };
        let decay = if gated {
            Some(delta_net::Decay {
                wa: t("attn.a_proj.weight", &[n_v_heads, c])?,
                a_log: t("attn.A_log", &[n_v_heads])?,
                dt_bias: t("attn.dt_bias", &[n_v_heads])?,
            })
        } else {
            absent("attn.A_log", "a DeltaNet config (model_type delta_net) has no decay")?;
            None
        };
        layers.push(delta_net::Layer {
            attn_norm: t("attn_norm.weight", &[c])?,
            wq: t("attn.q_proj.weight", &[kd, c])?,
            wk: t("attn.k_proj.weight", &[kd, c])?,
            wv: t("attn.v_proj.weight", &[vd, c])?,
            wb,
            decay,
            conv,
            wg,
            o_norm: t("attn.o_norm.weight", &[head_v])?,
            wo: t("attn.o_proj.weight", &[c, vd])?,
            mlp_norm: t("mlp_norm.weight", &[c])?,
            gate: t("mlp.gate_proj.weight", &[im, c])?,
            up: t("mlp.up_proj.weight", &[im, c])?,
            down: t("mlp.down_proj.weight", &[c, im])?,
        });
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
        layout: Layout::DeltaNet { n_heads, n_v_heads, head_k, head_v, delta_mlp: im, delta_conv: d_conv },
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size(),
        vocab_rows: vrows,
        config_vocab: get_u("vocab_size")?,
        tied_embeddings: tied,
        state_file: None,
    };
    let title = found.family.title();
    let tables = Tables { cfg, layers: layers.into_boxed_slice(), embed, norm, head, path: path.to_path_buf(), title };
    Ok(Loaded { views: Box::new(tables), info })
}
