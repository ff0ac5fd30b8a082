//! RWKV-5.2 / RWKV-6 (BlinkDL `.pth`, or HF-format `RWKV/v5-Eagle-*-HF` / `v6-Finch-*-HF`) and
//! HGRN-2 (fla-hub safetensors + config.json): FORMATS.md §3 and §4.
use super::{dtype_name, fewer_layers, Model, ModelInfo, Net};
use crate::checkpoint::{Checkpoint, DType, Format, TensorView};
use crate::config;
use crate::forget::ForgetSpec;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use stuffed_core::hgrn2::{self, Hgrn2};
use stuffed_core::rwkv::{self, Rwkv, TimeMix, Version};
use stuffed_core::{Data, Weight};

/// The family of `path` when it is one of these, loaded; `None` for anything else (Mamba-2).
pub(super) fn try_load(path: &Path) -> Result<Option<Model>> {
    let (dir, pth) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let dir =
            path.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let pth = path.extension().is_some_and(|e| e == "pth");
        (dir, pth.then(|| path.to_path_buf()))
    };
    let cfg_path = dir.join("config.json");
    if cfg_path.exists() && pth.is_none() {
        let json = config::read_json(&cfg_path)?;
        return match json.get("model_type").and_then(Value::as_str) {
            Some("rwkv5" | "rwkv6") => load_rwkv(path, Some(&json), &cfg_path).map(Some),
            Some("hgrn2") => load_hgrn2(path, &json, &cfg_path).map(Some),
            _ => Ok(None),
        };
    }
    if let Some(p) = pth {
        return load_rwkv(&p, None, &cfg_path).map(Some);
    }
    if !path.is_dir() {
        return Ok(None);
    }
    // A directory without config.json: one BlinkDL .pth inside.
    let mut pths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| anyhow!("{}: cannot list: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pth"))
        .collect();
    pths.sort();
    match pths.as_slice() {
        [] => Ok(None),
        [one] => load_rwkv(one, None, &cfg_path).map(Some),
        _ => bail!("{}: several .pth files and no config.json; name the one to load", dir.display()),
    }
}

/// A tensor as a `(rows, cols)` weight, checking only its element count (squeezes `[1,1,C]`).
fn view(t: TensorView<'static>, rows: usize, cols: usize) -> Result<Weight<'static>> {
    if t.numel() != rows * cols {
        bail!(
            "{}: tensor {} has shape {:?}, expected {} elements ({rows} × {cols})",
            t.file.display(),
            t.name,
            t.shape,
            rows * cols
        );
    }
    let data = match t.dtype {
        DType::F32 => Data::F32(t.as_f32()?),
        DType::BF16 => Data::Bf16(t.as_bf16()?),
        DType::F16 => Data::F16(t.as_f16()?),
        other => bail!("{}: tensor {} has dtype {other}; weights must be F32, BF16 or F16", t.file.display(), t.name),
    };
    Ok(Weight::new(data, rows, cols)?)
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

fn load_rwkv(path: &Path, json: Option<&Value>, cfg_path: &Path) -> Result<Model> {
    let ckpt = Box::new(Checkpoint::open(path)?);
    // SAFETY: as in `Model::load`: the views borrow `ckpt`, which the Model keeps alive and unmoved.
    let ck: &'static Checkpoint = unsafe { &*(ckpt.as_ref() as *const Checkpoint) };
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
    if ck.get(&name("blocks.0.att.time_state")).is_some() {
        eprintln!(
            "{}: note: att.time_state (a state-tuned model) is ignored; runs start from the zero state",
            fname.display()
        );
    }
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
    let vc = |k: &str| -> Result<Weight<'static>> { view(req(k)?, 1, c) };
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
        });
    }
    let layers: Box<[rwkv::Layer<'static>]> = layers.into_boxed_slice();
    // SAFETY: the boxed slice moves into the Model (`_extra`) and outlives `net` (drop order);
    // moving a Box does not move its heap contents.
    let layers_ref: &'static [rwkv::Layer<'static>] = unsafe { &*(layers.as_ref() as *const _) };
    let weights = rwkv::Weights {
        embed: view(emb, vrows, c)?,
        ln0_w: vc("blocks.0.ln0.weight")?,
        ln0_b: vc("blocks.0.ln0.bias")?,
        layers: layers_ref,
        ln_out_w: vc("ln_out.weight")?,
        ln_out_b: vc("ln_out.bias")?,
        head: view(req("head.weight")?, vrows, c)?,
    };
    let net = Rwkv::new(cfg, weights).with_context(|| format!("{}: bad RWKV weights", fname.display()))?;
    let (params, bytes) =
        ck.names().filter_map(|k| ck.get(k)).fold((0, 0), |(p, b), v| (p + v.numel(), b + v.bytes.len()));
    let _ = cfg_path;
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: if v5 { "rwkv5" } else { "rwkv6" }.into(),
        format: match (hf, ck.format()) {
            (true, _) => "hf-safetensors",
            (false, Format::TorchZip) => "blinkdl-pth",
            (false, Format::Safetensors) => "blinkdl-safetensors",
        }
        .into(),
        d_model: c,
        n_layer,
        n_heads: h,
        head_dim: n,
        d_state: n,
        n_groups: 1,
        d_conv: 0,
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size(),
        vocab_rows: vrows,
        config_vocab: None,
        tied_embeddings: false,
    };
    Ok(Model {
        net: Net::Rwkv(net),
        _extra: Some(Box::new(layers)),
        _layers: Box::new([]),
        _ckpt: ckpt,
        info,
        forget: ForgetSpec::None,
    })
}

fn load_hgrn2(path: &Path, json: &Value, cfg_path: &Path) -> Result<Model> {
    let ckpt = Box::new(Checkpoint::open(path)?);
    // SAFETY: as in `Model::load`.
    let ck: &'static Checkpoint = unsafe { &*(ckpt.as_ref() as *const Checkpoint) };
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
    fewer_layers(ck, n_layer, "model.layers.{}.attn_norm.weight", &p)?;
    // The bounds themselves, computed once (the Box moves into the Model below: `_extra`).
    let bounds: Option<Box<[f32]>> = if use_lb {
        let mut b = vec![0f32; n_layer * c].into_boxed_slice();
        hgrn2::lower_bounds(&view(ck.require("model.lower_bounds")?, n_layer, c)?, &mut b)?;
        Some(b)
    } else {
        None
    };
    // SAFETY: as for the layers below; moving a Box does not move its heap contents.
    let bounds_ref: Option<&'static [f32]> = bounds.as_deref().map(|b| unsafe { &*(b as *const [f32]) });
    let lower_bounds = bounds_ref.map(|b| Weight::new(Data::F32(b), n_layer, c)).transpose()?;
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
    if ck.get(&format!("model.layers.{n_layer}.attn_norm.weight")).is_some() {
        bail!("{p}: the weights have more than the {n_layer} layers config.json states");
    }
    let tied = get_b("tie_word_embeddings").unwrap_or(false);
    let embed = view(emb, vrows, c)?;
    let head = match ck.get("lm_head.weight") {
        Some(hd) => view(hd, vrows, c)?,
        None if tied => embed,
        None => bail!("{}: missing tensor lm_head.weight (tie_word_embeddings is false)", emb.file.display()),
    };
    let layers: Box<[hgrn2::Layer<'static>]> = layers.into_boxed_slice();
    // SAFETY: as for RWKV above.
    let layers_ref: &'static [hgrn2::Layer<'static>] = unsafe { &*(layers.as_ref() as *const _) };
    let weights = hgrn2::Weights {
        embed,
        lower_bounds,
        layers: layers_ref,
        norm: view(ck.require("model.norm.weight")?, 1, c)?,
        head,
    };
    let net = Hgrn2::new(cfg, weights).with_context(|| format!("{}: bad HGRN-2 weights", path.display()))?;
    let (params, bytes) =
        ck.names().filter_map(|k| ck.get(k)).fold((0, 0), |(p, b), v| (p + v.numel(), b + v.bytes.len()));
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: "hgrn2".into(),
        format: match ck.format() {
            Format::Safetensors => "fla-safetensors",
            Format::TorchZip => "fla-torch-zip",
        }
        .into(),
        d_model: c,
        n_layer,
        n_heads: cfg.n_heads(),
        head_dim: cfg.head_v(),
        d_state: expand,
        n_groups: 1,
        d_conv: 0,
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size(),
        vocab_rows: vrows,
        config_vocab: get_u("vocab_size"),
        tied_embeddings: tied,
    };
    Ok(Model {
        net: Net::Hgrn2(net),
        _extra: Some(Box::new((layers, bounds))),
        _layers: Box::new([]),
        _ckpt: ckpt,
        info,
        forget: ForgetSpec::None,
    })
}
