//! RWKV-5.2 / RWKV-6 (BlinkDL `.pth`, or HF-format `RWKV/v5-Eagle-*-HF` / `v6-Finch-*-HF`): version
//! from tensor names, BlinkDL ↔ HF names, → `stuffed_core::rwkv` views (FORMATS.md §3).
use super::{dtype_name, totals, view, Family, Found, Layout, Loaded, ModelInfo, Net, Views};
use crate::checkpoint::{Checkpoint, Format};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use stuffed_core::rwkv::{self, Rwkv, TimeMix, Version};
use stuffed_core::Weight;

/// The tables an RWKV model borrows.
struct Tables<'a> {
    cfg: rwkv::Config,
    layers: Box<[rwkv::Layer<'a>]>,
    embed: Weight<'a>,
    ln0_w: Weight<'a>,
    ln0_b: Weight<'a>,
    ln_out_w: Weight<'a>,
    ln_out_b: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let w = rwkv::Weights {
            embed: self.embed,
            ln0_w: self.ln0_w,
            ln0_b: self.ln0_b,
            layers: &self.layers,
            ln_out_w: self.ln_out_w,
            ln_out_b: self.ln_out_b,
            head: self.head,
        };
        let net = Rwkv::new(self.cfg, w).with_context(|| format!("{}: bad RWKV weights", self.path.display()))?;
        Ok(Net::Other(Box::new(net)))
    }
}

/// BlinkDL names → HF-format names (FORMATS §3.5).
fn hf_name(k: &str, v5: bool) -> String {
    if k == "emb.weight" {
        return "rwkv.embeddings.weight".into();
    }
    if k.starts_with("ln_out.") {
        return format!("rwkv.{k}");
    }
    if k == "head.weight" {
        return k.into();
    }
    let mut parts = k.splitn(3, '.');
    let (_, l, rest) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let rest = if let Some(r) = rest.strip_prefix("ln0.") {
        format!("pre_ln.{r}")
    } else if let Some(r) = rest.strip_prefix("att.") {
        let r = if v5 { v5_mix(r) } else { r.to_string() };
        format!("attention.{r}")
    } else if let Some(r) = rest.strip_prefix("ffn.") {
        let r = if v5 { v5_mix(r) } else { r.to_string() };
        format!("feed_forward.{r}")
    } else {
        rest.to_string()
    };
    format!("rwkv.blocks.{l}.{rest}")
}

fn v5_mix(r: &str) -> String {
    match r {
        "time_mix_k" => "time_mix_key".into(),
        "time_mix_v" => "time_mix_value".into(),
        "time_mix_r" => "time_mix_receptance".into(),
        "time_mix_g" => "time_mix_gate".into(),
        other => other.into(),
    }
}

/// What a state-tuned file's format says (RWKV-5/6/7 with `att.time_state` in every layer).
pub(super) const STATE_TUNED: &str = ", state-tuned: every stream starts from its att.time_state";

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &Found) -> Result<Loaded<'a>> {
    let (path, cfg_path) = (found.weights.as_path(), found.config_path.as_path());
    let json = found.config.as_ref().map(|c| &c.json);
    if super::rwkv7::claims(ck) {
        return super::rwkv7::load(ck, found);
    }
    let hf = ck.get("rwkv.embeddings.weight").is_some();
    let names: Vec<String> = ck.names().map(String::from).collect();
    // Version detection from tensor names (FORMATS §3.2), on BlinkDL names.
    let blink: Vec<String> = if hf {
        names
            .iter()
            .map(|n| {
                n.replace("rwkv.embeddings.", "emb.")
                    .replace("rwkv.blocks.", "blocks.")
                    .replace("rwkv.ln_out.", "ln_out.")
                    .replace(".pre_ln.", ".ln0.")
                    .replace(".attention.", ".att.")
                    .replace(".feed_forward.", ".ffn.")
            })
            .collect()
    } else {
        names.clone()
    };
    let file = ck.dir().join(path.file_name().unwrap_or_default());
    let fname = if path.is_dir() { path } else { &file };
    let mut version = 4.0f32;
    for n in &blink {
        if n.contains("ln_x") {
            version = version.max(5.0);
        }
        if n.contains("gate.weight") {
            version = version.max(5.1);
        }
        if n.contains("time_maa") {
            version = version.max(6.0);
        }
    }
    if (5.0..6.0).contains(&version) {
        let key = if hf { "rwkv.blocks.0.attention.time_decay" } else { "blocks.0.att.time_decay" };
        if let Some(t) = ck.get(key) {
            if t.shape.len() == 2 && t.shape[1] > 1 {
                version = 5.2;
            }
        }
    }
    let ver = if version >= 6.0 {
        Version::V6
    } else if (version - 5.2).abs() < 1e-6 {
        Version::V5_2
    } else if ck.names().next().is_none() || ck.get("emb.weight").is_none() && !hf {
        bail!("{}: not an RWKV checkpoint (no emb.weight) and no config.json beside it", fname.display())
    } else {
        bail!("{}: RWKV version {version:.1} detected from the tensor names; stuffed runs 5.2 and 6.0", fname.display())
    };
    let v5 = ver == Version::V5_2;
    let name = |k: &str| if hf { hf_name(k, v5) } else { k.to_string() };
    let req = |k: &str| ck.require(&name(k));
    let emb = req("emb.weight")?;
    let &[vrows, c] = emb.shape else {
        bail!("{}: emb has shape {:?}, expected [vocab, C]", fname.display(), emb.shape);
    };
    let n_layer = blink
        .iter()
        .filter_map(|n| n.strip_prefix("blocks."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let u0 = req("blocks.0.att.time_faaaa")?;
    let (h, n) = match u0.shape {
        [h, n] => (*h, *n),
        [h, n, 1] => (*h, *n),
        s => bail!("{}: time_faaaa has shape {s:?}, expected [H, N]", fname.display()),
    };
    let f = req("blocks.0.ffn.key.weight")?.shape[0];
    let (dm, dd) = if v5 {
        (0, 0)
    } else {
        let w1 = req("blocks.0.att.time_maa_w1")?;
        let d1 = req("blocks.0.att.time_decay_w1")?;
        (w1.shape.get(1).copied().unwrap_or(0) / 5, d1.shape.get(1).copied().unwrap_or(0))
    };
    let stated = json.and_then(|j| j.get("num_hidden_layers")).and_then(Value::as_u64);
    if let Some(s) = stated.filter(|&s| s != n_layer as u64) {
        bail!("{}: config.json states {s} layers but the weights have {n_layer}", cfg_path.display());
    }
    // The sizes an HF config states must be the weights' (a config beside other weights, or edited).
    let sizes = [("hidden_size", c), ("head_size", n), ("attention_hidden_size", h * n), ("intermediate_size", f)];
    for (key, shapes) in sizes {
        if let Some(s) = json.and_then(|j| j.get(key)).and_then(Value::as_u64).filter(|&s| s != shapes as u64) {
            bail!("{}: {key} {s} but the weights have {shapes}", cfg_path.display());
        }
    }
    // The GroupNorm eps is 1e-5·head_size_divisor² (64e-5 for the divisor 8 every release uses).
    if let Some(d) = json.and_then(|j| j.get("head_size_divisor")).filter(|d| !d.is_null() && d.as_u64() != Some(8)) {
        bail!("{}: head_size_divisor {d} is not supported (only 8, the released models')", cfg_path.display());
    }
    let eps = json.and_then(|j| j.get("layer_norm_epsilon")).and_then(Value::as_f64).unwrap_or(1e-5) as f32;
    let cfg = rwkv::Config {
        version: ver,
        d_model: c,
        n_layer,
        n_heads: h,
        head_size: n,
        d_ffn: f,
        lora_mix: dm,
        lora_decay: dd,
        vocab_rows: vrows,
        eps,
        gn_eps: 64e-5,
    };
    cfg.validate().with_context(|| format!("{}: bad RWKV dimensions", fname.display()))?;
    let vc = |k: &str| -> Result<Weight<'a>> { view(req(k)?, 1, c) };
    let mut layers = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let p = |s: &str| format!("blocks.{l}.{s}");
        let lin = |s: &str, r: usize, cc: usize| view(req(&p(s))?, r, cc);
        let mix = if v5 {
            TimeMix::V5 {
                mix: [
                    vc(&p("att.time_mix_k"))?,
                    vc(&p("att.time_mix_v"))?,
                    vc(&p("att.time_mix_r"))?,
                    vc(&p("att.time_mix_g"))?,
                ],
            }
        } else {
            TimeMix::V6 {
                maa_x: vc(&p("att.time_maa_x"))?,
                maa: [
                    vc(&p("att.time_maa_w"))?,
                    vc(&p("att.time_maa_k"))?,
                    vc(&p("att.time_maa_v"))?,
                    vc(&p("att.time_maa_r"))?,
                    vc(&p("att.time_maa_g"))?,
                ],
                w1: lin("att.time_maa_w1", c, 5 * dm)?,
                w2: lin("att.time_maa_w2", 5 * dm, c)?,
                dw1: lin("att.time_decay_w1", c, dd)?,
                dw2: lin("att.time_decay_w2", dd, c)?,
            }
        };
        let (fk, fr) = if v5 { ("ffn.time_mix_k", "ffn.time_mix_r") } else { ("ffn.time_maa_k", "ffn.time_maa_r") };
        layers.push(rwkv::Layer {
            ln1_w: vc(&p("ln1.weight"))?,
            ln1_b: vc(&p("ln1.bias"))?,
            ln2_w: vc(&p("ln2.weight"))?,
            ln2_b: vc(&p("ln2.bias"))?,
            mix,
            decay: vc(&p("att.time_decay"))?,
            u: vc(&p("att.time_faaaa"))?,
            wr: lin("att.receptance.weight", c, c)?,
            wk: lin("att.key.weight", c, c)?,
            wv: lin("att.value.weight", c, c)?,
            wg: lin("att.gate.weight", c, c)?,
            wo: lin("att.output.weight", c, c)?,
            lnx_w: vc(&p("att.ln_x.weight"))?,
            lnx_b: vc(&p("att.ln_x.bias"))?,
            fmix_k: vc(&p(fk))?,
            fmix_r: vc(&p(fr))?,
            fk: lin("ffn.key.weight", f, c)?,
            fr: lin("ffn.receptance.weight", c, c)?,
            fv: lin("ffn.value.weight", c, f)?,
            // A state-tuned model (RWKV-PEFT's state tuning merged into the .pth): each stream
            // starts from it, as the `rwkv` package does.
            time_state: match ck.get(&name(&p("att.time_state"))) {
                Some(t) if t.shape != [h, n, n] => bail!(
                    "{}: {} has shape {:?}, expected [{h}, {n}, {n}] (heads, head size, head size)",
                    t.file.display(),
                    t.name,
                    t.shape
                ),
                Some(t) => Some(view(t, h * n, n)?),
                None => None,
            },
        });
    }
    let tuned = layers.first().is_some_and(|l| l.time_state.is_some());
    let tables = Tables {
        cfg,
        layers: layers.into_boxed_slice(),
        embed: view(emb, vrows, c)?,
        ln0_w: vc("blocks.0.ln0.weight")?,
        ln0_b: vc("blocks.0.ln0.bias")?,
        ln_out_w: vc("ln_out.weight")?,
        ln_out_b: vc("ln_out.bias")?,
        head: view(req("head.weight")?, vrows, c)?,
        path: fname.to_path_buf(),
    };
    let (params, bytes) = totals(ck, |_| false);
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: if v5 { Family::Rwkv5 } else { Family::Rwkv6 },
        // A state-tuned file says so wherever the model is named (`info`, every output's facts).
        format: format!(
            "{}{}",
            match (hf, ck.format()) {
                (true, _) => "hf-safetensors",
                (false, Format::TorchZip) => "blinkdl-pth",
                (false, Format::Safetensors) => "blinkdl-safetensors",
            },
            if tuned { STATE_TUNED } else { "" }
        ),
        d_model: c,
        n_layer,
        layout: Layout::Rwkv { n_heads: h, head_size: n, d_ffn: f, lora_mix: dm, lora_decay: dd },
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size(),
        vocab_rows: vrows,
        config_vocab: None,
        tied_embeddings: false,
        state_file: None,
    };
    Ok(Loaded { views: Box::new(tables), info })
}
