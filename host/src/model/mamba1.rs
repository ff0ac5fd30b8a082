//! Mamba-1 (official `state-spaces/mamba-*` `config.json` + `pytorch_model.bin`, or HF
//! `MambaForCausalLM` safetensors): config quirks, tensor names → `stuffed_core::mamba1` views
//! (FAMILIES.md §3.2). The sizes come from the tensors; every size the config states must agree.
use super::{dtype_name, fewer_layers, totals, weight, Family, Found, Layout, Loaded, ModelInfo, Net, Views};
use crate::checkpoint::{Checkpoint, Format};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use stuffed_core::mamba1::{self, Mamba1};
use stuffed_core::Weight;

/// The tables a Mamba-1 model borrows.
struct Tables<'a> {
    cfg: mamba1::Config,
    layers: Box<[mamba1::Layer<'a>]>,
    embed: Weight<'a>,
    norm_f: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let w = mamba1::Weights { embed: self.embed, layers: &self.layers, norm_f: self.norm_f, head: self.head };
        let net = Mamba1::new(self.cfg, w).with_context(|| format!("{}: bad Mamba-1 weights", self.path.display()))?;
        Ok(Net::Other(Box::new(net)))
    }
}

/// What the two config layouts say, by their own field names.
struct Stated {
    official: bool,
    n_layer: usize,
    /// (field, value) pairs checked against the tensors' sizes.
    sizes: Vec<(&'static str, usize)>,
    eps: f32,
    tied: bool,
    bias: bool,
    conv_bias: bool,
    vocab_size: Option<usize>,
    /// FalconMamba's `mixer_rms_eps`.
    mixer_rms_eps: Option<f32>,
}

fn stated(json: &Value, p: &str) -> Result<Stated> {
    let num = |obj: &Value, k: &str| -> Result<Option<usize>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(Some(x as usize)),
                None => bail!("{p}: config field '{k}' is not a non-negative integer"),
            },
        }
    };
    let flag = |obj: &Value, k: &str, def: bool| -> Result<bool> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(def),
            Some(v) => v.as_bool().with_context(|| format!("{p}: config field '{k}' is not a boolean")),
        }
    };
    let rank = |obj: &Value, k: &str| -> Result<Option<usize>> {
        match obj.get(k) {
            Some(Value::String(s)) if s == "auto" => Ok(None),
            _ => num(obj, k),
        }
    };
    let model_type = json.get("model_type").and_then(Value::as_str);
    if matches!(model_type, Some("mamba" | "falcon_mamba")) {
        if let Some(act) = json.get("hidden_act").and_then(Value::as_str).filter(|a| !matches!(*a, "silu" | "swish")) {
            bail!("{p}: hidden_act '{act}' is not supported (Mamba-1 uses silu)");
        }
        let n_layer = num(json, "num_hidden_layers")?.with_context(|| format!("{p}: missing num_hidden_layers"))?;
        let mut sizes = Vec::new();
        for (k, v) in [
            ("hidden_size", num(json, "hidden_size")?),
            ("intermediate_size", num(json, "intermediate_size")?),
            ("state_size", num(json, "state_size")?),
            ("conv_kernel", num(json, "conv_kernel")?),
            ("time_step_rank", rank(json, "time_step_rank")?),
        ] {
            if let Some(v) = v {
                sizes.push((k, v));
            }
        }
        let eps = json.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5) as f32;
        let mixer_rms_eps = (model_type == Some("falcon_mamba"))
            .then(|| json.get("mixer_rms_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32);
        return Ok(Stated {
            official: false,
            n_layer,
            sizes,
            eps,
            tied: flag(json, "tie_word_embeddings", true)?,
            bias: flag(json, "use_bias", false)?,
            conv_bias: flag(json, "use_conv_bias", true)?,
            vocab_size: None,
            mixer_rms_eps,
        });
    }
    // Official state-spaces config: d_model, n_layer, ssm_cfg{…} (layer absent = Mamba1).
    let empty = Value::Object(Default::default());
    let ssm = json.get("ssm_cfg").unwrap_or(&empty);
    match ssm.get("layer").and_then(Value::as_str) {
        None | Some("Mamba1") => {}
        Some(other) => bail!("{p}: ssm_cfg.layer is '{other}', an unknown variant (known: Mamba1, Mamba2)"),
    }
    if json.get("attn_layer_idx").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
        bail!("{p}: hybrid models with attention layers (attn_layer_idx) are not supported");
    }
    if num(json, "d_intermediate")?.unwrap_or(0) != 0 {
        bail!("{p}: d_intermediate ≠ 0 (MLP blocks) is not supported");
    }
    if !flag(json, "rms_norm", true)? {
        bail!("{p}: rms_norm = false (LayerNorm) is not supported");
    }
    let n_layer = num(json, "n_layer")?.with_context(|| format!("{p}: missing n_layer"))?;
    let d = num(json, "d_model")?.with_context(|| format!("{p}: missing d_model"))?;
    let expand = num(ssm, "expand")?.unwrap_or(2);
    let dt_rank = rank(ssm, "dt_rank")?.unwrap_or(d.div_ceil(16));
    let sizes = vec![
        ("d_model", d),
        ("ssm_cfg.expand · d_model", expand.saturating_mul(d)),
        ("ssm_cfg.d_state", num(ssm, "d_state")?.unwrap_or(16)),
        ("ssm_cfg.d_conv", num(ssm, "d_conv")?.unwrap_or(4)),
        ("ssm_cfg.dt_rank", dt_rank),
    ];
    Ok(Stated {
        official: true,
        n_layer,
        sizes,
        eps: 1e-5,
        tied: flag(json, "tie_embeddings", true)?,
        bias: flag(ssm, "bias", false)?,
        conv_bias: flag(ssm, "conv_bias", true)?,
        vocab_size: num(json, "vocab_size")?,
        mixer_rms_eps: None,
    })
}

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &Found) -> Result<Loaded<'a>> {
    let (cfg_file, path) = (found.config()?, found.weights.as_path());
    let (json, cfg_path) = (&cfg_file.json, &cfg_file.path);
    let p = cfg_path.display().to_string();
    let st = stated(json, &p)?;
    let official = ck.get("backbone.embedding.weight").is_some();
    if official != st.official {
        bail!("{p}: config.json and the tensor names disagree on the format (HF vs official)");
    }
    let emb_name = if official { "backbone.embedding.weight" } else { "backbone.embeddings.weight" };
    let emb = ck.require(emb_name)?;
    let file = emb.file.display().to_string();
    let &[rows, d] = emb.shape else {
        bail!("{file}: tensor {emb_name} has shape {:?}, expected [vocab, d_model]", emb.shape);
    };
    // The sizes from layer 0's tensors.
    let l0 = |n: &str| ck.require(&format!("backbone.layers.0.mixer.{n}"));
    let a0 = l0("A_log")?;
    let &[di, n] = a0.shape else {
        bail!(
            "{file}: tensor {} has shape {:?}, expected [d_inner, d_state] (a 1-D A_log is Mamba-2)",
            a0.name,
            a0.shape
        );
    };
    let dt0 = l0("dt_proj.weight")?;
    let &[_, r] = dt0.shape else {
        bail!("{file}: tensor {} has shape {:?}, expected [d_inner, dt_rank]", dt0.name, dt0.shape);
    };
    let cv0 = l0("conv1d.weight")?;
    let &[_, 1, k] = cv0.shape else {
        bail!("{file}: tensor {} has shape {:?}, expected [d_inner, 1, d_conv]", cv0.name, cv0.shape);
    };
    let from_weights = |field: &str| match field {
        "d_model" | "hidden_size" => d,
        "intermediate_size" | "ssm_cfg.expand · d_model" => di,
        "state_size" | "ssm_cfg.d_state" => n,
        "conv_kernel" | "ssm_cfg.d_conv" => k,
        _ => r,
    };
    for &(field, v) in &st.sizes {
        let w = from_weights(field);
        if v != w {
            bail!("{p}: {field} is {v} but the weights have {w}");
        }
    }
    let c = mamba1::Config {
        d_model: d,
        n_layer: st.n_layer,
        d_inner: di,
        d_state: n,
        dt_rank: r,
        d_conv: k,
        vocab_rows: rows,
        eps: st.eps,
        mixer_rms_eps: st.mixer_rms_eps,
    };
    c.validate().with_context(|| p.clone())?;
    fewer_layers(ck, c.n_layer, "backbone.layers.{}.mixer.A_log", &p)?;
    let mut layers = Vec::with_capacity(c.n_layer);
    for l in 0..c.n_layer {
        let pre = format!("backbone.layers.{l}.");
        let t = |s: &str| ck.require(&format!("{pre}{s}"));
        // A bias the config promises must be there; one it rules out must not be.
        let bias = |s: &str, shape: &[usize], promised: bool, field: &str| -> Result<Option<Weight<'a>>> {
            let name = format!("{pre}{s}");
            match (ck.get(&name), promised) {
                (Some(v), true) => weight(v, shape).map(Some),
                (None, false) => Ok(None),
                (None, true) => bail!("{file}: missing tensor {name}, which {p} promises ({field} = true)"),
                (Some(_), false) => {
                    bail!("{file}: tensor {name} is present but {p} has {field} = false (the config and the weights disagree)")
                }
            }
        };
        let (bias_field, conv_field) =
            if official { ("ssm_cfg.bias", "ssm_cfg.conv_bias") } else { ("use_bias", "use_conv_bias") };
        layers.push(mamba1::Layer {
            norm: weight(t("norm.weight")?, &[d])?,
            in_proj: weight(t("mixer.in_proj.weight")?, &[2 * di, d])?,
            in_proj_bias: bias("mixer.in_proj.bias", &[2 * di], st.bias, bias_field)?,
            conv_w: weight(t("mixer.conv1d.weight")?, &[di, 1, k])?,
            conv_b: bias("mixer.conv1d.bias", &[di], st.conv_bias, conv_field)?,
            x_proj: weight(t("mixer.x_proj.weight")?, &[r + 2 * n, di])?,
            dt_proj: weight(t("mixer.dt_proj.weight")?, &[di, r])?,
            dt_bias: weight(t("mixer.dt_proj.bias")?, &[di])?,
            a_log: weight(t("mixer.A_log")?, &[di, n])?,
            d: weight(t("mixer.D")?, &[di])?,
            out_proj: weight(t("mixer.out_proj.weight")?, &[d, di])?,
            out_proj_bias: bias("mixer.out_proj.bias", &[d], st.bias, bias_field)?,
        });
    }
    if ck.get(&format!("backbone.layers.{}.mixer.A_log", c.n_layer)).is_some() {
        bail!("{file}: the weights have more than the {} layers {p} states", c.n_layer);
    }
    let embed = weight(emb, &[rows, d])?;
    let head = match ck.get("lm_head.weight") {
        Some(hd) if !st.tied || official => weight(hd, &[rows, d])?,
        _ if st.tied => embed,
        _ => bail!("{file}: missing tensor lm_head.weight (tie_word_embeddings is false)"),
    };
    let norm_f = weight(ck.require("backbone.norm_f.weight")?, &[d])?;
    let (params, bytes) = totals(ck, |nm| official && st.tied && nm == "lm_head.weight");
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: Family::Mamba1,
        format: match (ck.format(), official) {
            _ if st.mixer_rms_eps.is_some() => "falcon-mamba-hf",
            (Format::Safetensors, false) => "hf-safetensors",
            (Format::Safetensors, true) => "official-safetensors",
            (Format::TorchZip, false) => "hf-torch-zip",
            (Format::TorchZip, true) => "official-torch-zip",
        }
        .into(),
        d_model: d,
        n_layer: c.n_layer,
        layout: Layout::Mamba1 { d_inner: di, d_state: n, dt_rank: r, d_conv: k, head_channels: c.group() },
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * c.paper_state_size(),
        paper_state_size: c.paper_state_size(),
        vocab_rows: rows,
        config_vocab: st.vocab_size,
        tied_embeddings: st.tied,
        state_file: None,
    };
    let tables = Tables { cfg: c, layers: layers.into_boxed_slice(), embed, norm_f, head, path: path.to_path_buf() };
    Ok(Loaded { views: Box::new(tables), info })
}
