//! RWKV-7 (x070): the BlinkDL `.pth` (final "rc4a" layout, FAMILIES.md §1.2) and the fla / HF layout
//! (`fla-hub/rwkv7-*`, config.json `model_type: rwkv7`, §1.3) → `stuffed_core::rwkv7` views. Ranks
//! and widths come from the tensor shapes (released files do not follow the training formula);
//! layer 0's unused `v0/v1/v2` may be present or absent. Pre-release x070 files (`time_aaa_*`, …)
//! and the v7a (DeepEmbed) / v7b (DEA) variants are refused. A `.pth`'s `[in, out]` LoRA matrices
//! are transposed once at load into the Linear layout the core's GEMM takes (f32 copies: exact).
use super::{dtype_name, fewer_layers, totals, view, weight, Family, Found, Layout, Loaded, ModelInfo, Net, Views};
use crate::checkpoint::{Checkpoint, Format};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use stuffed_core::rwkv7::{self, Lora, Rwkv7};
use stuffed_core::{Data, Weight};

/// Embedding rows of the RWKV World vocab and of the Pile series' GPT-NeoX-20B one.
pub const WORLD_ROWS: usize = 65_536;
pub const NEOX_ROWS: usize = 50_304;

/// The tables an RWKV-7 model borrows.
struct Tables<'a> {
    cfg: rwkv7::Config,
    layers: Box<[rwkv7::Layer<'a>]>,
    /// A `.pth`'s LoRA matrices transposed to `(out, in)`, in the order [`Tables::net`] takes them.
    lora_t: Option<Box<[f32]>>,
    embed: Weight<'a>,
    ln0_w: Weight<'a>,
    ln0_b: Weight<'a>,
    ln_out_w: Weight<'a>,
    ln_out_b: Weight<'a>,
    head: Weight<'a>,
    path: PathBuf,
}

/// Every LoRA of a layer, in a fixed order (w, a, v, g; a then b).
fn loras<'l, 'a>(l: &'l mut rwkv7::Layer<'a>) -> impl Iterator<Item = &'l mut Weight<'a>> {
    let v = l.v_lora.as_mut().map(|v| [&mut v.a, &mut v.b]).into_iter().flatten();
    [&mut l.w_lora.a, &mut l.w_lora.b, &mut l.a_lora.a, &mut l.a_lora.b]
        .into_iter()
        .chain(v)
        .chain([&mut l.g_lora.a, &mut l.g_lora.b])
}

impl Views for Tables<'_> {
    fn net(&self) -> Result<Net<'_>> {
        let mut layers: Box<[rwkv7::Layer<'_>]> = self.layers.clone();
        if let Some(buf) = &self.lora_t {
            let mut at = 0;
            for l in layers.iter_mut() {
                for w in loras(l) {
                    // The stored view is `[in, out]`; its transpose is `(out, in)`.
                    let (rows, cols) = (w.cols, w.rows);
                    *w = Weight::new(Data::F32(&buf[at..at + rows * cols]), rows, cols)?;
                    at += rows * cols;
                }
            }
        }
        let w = rwkv7::Weights {
            embed: self.embed,
            ln0_w: self.ln0_w,
            ln0_b: self.ln0_b,
            layers,
            ln_out_w: self.ln_out_w,
            ln_out_b: self.ln_out_b,
            head: self.head,
        };
        let net = Rwkv7::new(self.cfg, w).with_context(|| format!("{}: bad RWKV-7 weights", self.path.display()))?;
        Ok(Net::Other(Box::new(net)))
    }
}

/// Whether a BlinkDL checkpoint is an x070 one (final, pre-release or a variant): this file loads
/// (or refuses) it rather than the RWKV-5/6 one.
pub(super) fn claims(ck: &Checkpoint) -> bool {
    ck.get("blocks.0.att.r_k").is_some()
        || ck.get("blocks.0.att.w0").is_some()
        || ck.names().any(|n| n.contains("time_aaa") || n.contains("time_kkk") || n.contains(".qkv."))
}

/// The layout a checkpoint uses: BlinkDL names, or fla's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Names {
    Pth,
    Fla,
}

/// A BlinkDL key under the checkpoint's names (FAMILIES.md §1.3).
fn key(names: Names, k: &str) -> String {
    if names == Names::Pth {
        return k.to_string();
    }
    match k {
        "emb.weight" => return "model.embeddings.weight".into(),
        "head.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    if let Some(r) = k.strip_prefix("ln_out.") {
        return format!("model.norm.{r}");
    }
    let mut parts = k.splitn(3, '.');
    let (_, l, rest) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let lora = |r: &str| -> Option<String> {
        let (name, last) = r.strip_prefix("att.")?.split_at(1);
        let which = match last {
            "1" => "lora.0.weight",
            "2" => "lora.2.weight",
            "0" => "lora.2.bias",
            _ => return None,
        };
        matches!(name, "w" | "a" | "v" | "g").then(|| format!("attn.{name}_lora.{which}"))
    };
    let rest = match rest {
        "ln0.weight" => "pre_norm.weight".into(),
        "ln0.bias" => "pre_norm.bias".into(),
        "ln1.weight" => "attn_norm.weight".into(),
        "ln1.bias" => "attn_norm.bias".into(),
        "ln2.weight" => "ffn_norm.weight".into(),
        "ln2.bias" => "ffn_norm.bias".into(),
        "att.receptance.weight" => "attn.r_proj.weight".into(),
        "att.key.weight" => "attn.k_proj.weight".into(),
        "att.value.weight" => "attn.v_proj.weight".into(),
        "att.output.weight" => "attn.o_proj.weight".into(),
        "att.ln_x.weight" => "attn.g_norm.weight".into(),
        "att.ln_x.bias" => "attn.g_norm.bias".into(),
        r => lora(r).unwrap_or_else(|| r.replacen("att.", "attn.", 1)),
    };
    format!("model.layers.{l}.{rest}")
}

/// Refuses what is x070 by name but not the final layout.
fn refuse_variants(ck: &Checkpoint, file: &Path) -> Result<()> {
    let f = file.display();
    if let Some(n) = ck.names().find(|n| {
        ["time_aaa", "time_kkk", "time_misc", "time_maa", "time_decay", ".mk_w1", ".ma_w1"]
            .iter()
            .any(|p| n.contains(p))
    }) {
        bail!("{f}: a pre-release RWKV-7 (x070 rc) layout (tensor {n}); stuffed runs the final x070 layout");
    }
    if let Some(n) = ck.names().find(|n| n.contains(".qkv.")) {
        bail!("{f}: RWKV-7b (DEA: quadratic attention, tensor {n}) is not supported; stuffed runs plain x070");
    }
    if let Some(n) = ck.names().find(|n| n.contains("ffn.s_emb") || n.contains("ffn.s0") || n.contains("ffn.s1")) {
        bail!("{f}: RWKV-7a (DeepEmbed, tensor {n}) is not supported; stuffed runs plain x070");
    }
    Ok(())
}

/// Checks a fla config.json's fields that change the math against what stuffed runs.
fn fla_config(json: &Value, cfg_path: &Path) -> Result<f32> {
    let p = cfg_path.display();
    let get_b = |k: &str| json.get(k).and_then(Value::as_bool);
    if get_b("norm_bias") == Some(false) {
        bail!("{p}: norm_bias = false (LayerNorms without bias) is not supported");
    }
    if get_b("norm_first") == Some(false) {
        bail!("{p}: norm_first = false (no pre_norm on layer 0) is not supported");
    }
    if let Some(act) = json.get("hidden_act").filter(|a| !a.is_null()) {
        if act.as_str() != Some("sqrelu") {
            bail!("{p}: hidden_act {act} is not supported (the channel mix is sqrelu)");
        }
    }
    if json.get("attn").is_some_and(|a| !a.is_null()) {
        bail!("{p}: hybrid RWKV-7 with attention layers ('attn') is not supported");
    }
    Ok(json.get("norm_eps").and_then(Value::as_f64).unwrap_or(1e-5) as f32)
}

pub(super) fn load<'a>(ck: &'a Checkpoint, found: &Found) -> Result<Loaded<'a>> {
    let path = found.weights.as_path();
    let names = if ck.get("model.embeddings.weight").is_some() { Names::Fla } else { Names::Pth };
    let file = if path.is_dir() { path.to_path_buf() } else { ck.dir().join(path.file_name().unwrap_or_default()) };
    let f = file.display();
    refuse_variants(ck, &file)?;
    let json = found.config.as_ref().map(|c| &c.json);
    let cfg_path = found.config_path.as_path();
    let norm_eps = match (names, json) {
        (Names::Fla, Some(j)) => fla_config(j, cfg_path)?,
        (Names::Fla, None) => bail!("{}: missing config.json beside fla-layout RWKV-7 weights", cfg_path.display()),
        (Names::Pth, _) => 1e-5,
    };
    let req = |k: &str| ck.require(&key(names, k));
    let emb = req("emb.weight")?;
    let &[vrows, c] = emb.shape else {
        bail!("{f}: {} has shape {:?}, expected [vocab, C]", emb.name, emb.shape);
    };
    let rk = req("blocks.0.att.r_k")?;
    let (h, n) = match rk.shape {
        [h, n] => (*h, *n),
        s => bail!("{f}: {} has shape {s:?}, expected [H, N]", rk.name),
    };
    let prefix = if names == Names::Fla { "model.layers." } else { "blocks." };
    let n_layer = ck
        .names()
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    if let Some(s) = json.and_then(|j| j.get("num_hidden_layers")).and_then(Value::as_u64) {
        fewer_layers(ck, s as usize, &key(names, "blocks.{}.ln1.weight"), &cfg_path.display())?;
        if s as usize != n_layer {
            bail!("{}: config.json states {s} layers but the weights have {n_layer}", cfg_path.display());
        }
    }
    let d_ffn = req("blocks.0.ffn.key.weight")?.shape.first().copied().unwrap_or(0);
    // A LoRA's rank from its first matrix: `[C, D]` in a .pth, `[D, C]` (Linear) in fla.
    let rank = |k: &str| -> Result<usize> {
        let t = req(k)?;
        let r = match (names, t.shape) {
            (Names::Pth, [cc, d]) if *cc == c => *d,
            (Names::Fla, [d, cc]) if *cc == c => *d,
            _ => bail!(
                "{f}: {} has shape {:?}, expected a rank-D LoRA matrix with {c} (C) on its input side",
                t.name,
                t.shape
            ),
        };
        Ok(r)
    };
    let (dw, da, dg) = (rank("blocks.0.att.w1")?, rank("blocks.0.att.a1")?, rank("blocks.0.att.g1")?);
    let dv = if n_layer > 1 { rank("blocks.1.att.v1")? } else { 0 };
    // fla states its sizes: they must be the weights'.
    let stated = [
        ("hidden_size", c),
        ("head_dim", n),
        ("num_heads", h),
        ("intermediate_size", d_ffn),
        ("decay_low_rank_dim", dw),
        ("a_low_rank_dim", da),
        ("v_low_rank_dim", dv),
        ("gate_low_rank_dim", dg),
    ];
    for (k, have) in stated {
        if let Some(s) = json.and_then(|j| j.get(k)).and_then(Value::as_u64).filter(|&s| s != have as u64) {
            if k == "v_low_rank_dim" && n_layer < 2 {
                continue;
            }
            bail!("{}: {k} {s} but the weights have {have}", cfg_path.display());
        }
    }
    if let Some(vd) = json.and_then(|j| j.get("value_dim")).and_then(Value::as_array) {
        if vd.iter().any(|v| v.as_u64() != Some(c as u64)) {
            bail!("{}: value_dim {vd:?} is not supported (only hidden_size in every layer)", cfg_path.display());
        }
    }
    let cfg = rwkv7::Config {
        d_model: c,
        n_layer,
        n_heads: h,
        head_size: n,
        d_ffn,
        lora_w: dw,
        lora_a: da,
        lora_v: dv,
        lora_g: dg,
        vocab_rows: vrows,
        eps: norm_eps,
        // The package's literal 64e-5; fla's GroupNorm eps is head_dim·norm_eps (the same for N 64, 1e-5).
        gn_eps: if names == Names::Fla { n as f32 * norm_eps } else { 64e-5 },
    };
    cfg.validate().with_context(|| format!("{f}: bad RWKV-7 dimensions"))?;
    let vc = |k: &str| -> Result<Weight<'a>> { view(req(k)?, 1, c) };
    let mut lora_t: Vec<f32> = Vec::new();
    // A LoRA `(a, b)` of rank `d`, each matrix checked by its exact stored shape.
    let mut lora = |ka: &str, kb: &str, d: usize| -> Result<Lora<'a>> {
        let (ta, tb) = (req(ka)?, req(kb)?);
        Ok(match names {
            Names::Fla => Lora { a: weight(ta, &[d, c])?, b: weight(tb, &[c, d])? },
            Names::Pth => {
                let (a, b) = (weight(ta, &[c, d])?, weight(tb, &[d, c])?);
                for w in [&a, &b] {
                    transpose_into(w, &mut lora_t);
                }
                Lora { a, b }
            }
        })
    };
    // Layer 0's value-residual LoRA, which some files carry, is unused by the math (layer 0's
    // v_first is its own v): read as known, so the unused-tensor check passes over it.
    for k in ["att.v0", "att.v1", "att.v2"] {
        let _ = ck.get(&key(names, &format!("blocks.0.{k}")));
    }
    let mut layers = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let p = |s: &str| format!("blocks.{l}.{s}");
        let lin = |s: &str, r: usize, cc: usize| -> Result<Weight<'a>> { weight(req(&p(s))?, &[r, cc]) };
        let w_lora = lora(&p("att.w1"), &p("att.w2"), dw)?;
        let a_lora = lora(&p("att.a1"), &p("att.a2"), da)?;
        let v_lora = if l > 0 { Some(lora(&p("att.v1"), &p("att.v2"), dv)?) } else { None };
        let g_lora = lora(&p("att.g1"), &p("att.g2"), dg)?;
        let rk = req(&p("att.r_k"))?;
        if rk.shape != [h, n] {
            bail!("{f}: tensor {} has shape {:?}, expected {:?}", rk.name, rk.shape, [h, n]);
        }
        layers.push(rwkv7::Layer {
            ln1_w: vc(&p("ln1.weight"))?,
            ln1_b: vc(&p("ln1.bias"))?,
            ln2_w: vc(&p("ln2.weight"))?,
            ln2_b: vc(&p("ln2.bias"))?,
            mix: [
                vc(&p("att.x_r"))?,
                vc(&p("att.x_w"))?,
                vc(&p("att.x_k"))?,
                vc(&p("att.x_v"))?,
                vc(&p("att.x_a"))?,
                vc(&p("att.x_g"))?,
            ],
            w0: vc(&p("att.w0"))?,
            a0: vc(&p("att.a0"))?,
            v0: if l > 0 { Some(vc(&p("att.v0"))?) } else { None },
            w_lora,
            a_lora,
            v_lora,
            g_lora,
            k_k: vc(&p("att.k_k"))?,
            k_a: vc(&p("att.k_a"))?,
            r_k: view(rk, 1, c)?,
            wr: lin("att.receptance.weight", c, c)?,
            wk: lin("att.key.weight", c, c)?,
            wv: lin("att.value.weight", c, c)?,
            wo: lin("att.output.weight", c, c)?,
            lnx_w: vc(&p("att.ln_x.weight"))?,
            lnx_b: vc(&p("att.ln_x.bias"))?,
            ffn_x_k: vc(&p("ffn.x_k"))?,
            fk: lin("ffn.key.weight", d_ffn, c)?,
            fv: lin("ffn.value.weight", c, d_ffn)?,
            // A state-tuned .pth (RWKV-PEFT's state tuning merged in): every stream starts from it.
            // Only under .pth names (fla's layout has none): asked for otherwise, an fla file's or a
            // state file's `blocks.N.att.time_state` would count as used and never be read.
            time_state: match (names == Names::Pth).then(|| ck.get(&p("att.time_state"))).flatten() {
                Some(t) if t.shape != [h, n, n] => bail!(
                    "{f}: tensor {} has shape {:?}, expected [{h}, {n}, {n}] (heads, head size, head size)",
                    t.name,
                    t.shape
                ),
                Some(t) => Some(view(t, h * n, n)?),
                None => None,
            },
        });
    }
    let tied = json.and_then(|j| j.get("tie_word_embeddings")).and_then(Value::as_bool).unwrap_or(false);
    let embed = weight(emb, &[vrows, c])?;
    let head = match ck.get(&key(names, "head.weight")) {
        Some(t) => weight(t, &[vrows, c])?,
        None if tied => embed,
        None => bail!("{f}: missing tensor {}", key(names, "head.weight")),
    };
    let tuned = layers.first().is_some_and(|l| l.time_state.is_some());
    let (params, bytes) = totals(ck, |_| false);
    let info = ModelInfo {
        path: path.to_path_buf(),
        family: Family::Rwkv7,
        format: format!(
            "{}{}",
            match (names, ck.format()) {
                (Names::Fla, _) => "fla-safetensors",
                (Names::Pth, Format::TorchZip) => "blinkdl-pth",
                (Names::Pth, Format::Safetensors) => "blinkdl-safetensors",
            },
            if tuned { super::rwkv::STATE_TUNED } else { "" }
        ),
        d_model: c,
        n_layer,
        layout: Layout::Rwkv7 {
            n_heads: h,
            head_size: n,
            d_ffn,
            lora_decay: dw,
            lora_a: da,
            lora_v: dv,
            lora_gate: dg,
        },
        params,
        weight_dtype: dtype_name(emb.dtype).into(),
        weight_bytes: bytes,
        state_bytes: 4 * cfg.state_size(),
        paper_state_size: cfg.state_size(),
        vocab_rows: vrows,
        config_vocab: json.and_then(|j| j.get("vocab_size")).and_then(Value::as_u64).map(|v| v as usize),
        tied_embeddings: tied && ck.get(&key(names, "head.weight")).is_none(),
        state_file: None,
    };
    let tables = Tables {
        cfg,
        layers: layers.into_boxed_slice(),
        lora_t: (names == Names::Pth).then(|| lora_t.into_boxed_slice()),
        embed,
        ln0_w: vc("blocks.0.ln0.weight")?,
        ln0_b: vc("blocks.0.ln0.bias")?,
        ln_out_w: vc("ln_out.weight")?,
        ln_out_b: vc("ln_out.bias")?,
        head,
        path: file.clone(),
    };
    Ok(Loaded { views: Box::new(tables), info })
}

/// Appends the transpose of `w (rows, cols)` as f32 `(cols, rows)`.
fn transpose_into(w: &Weight, out: &mut Vec<f32>) {
    let mut row = vec![0f32; w.cols];
    let start = out.len();
    out.resize(start + w.rows * w.cols, 0.0);
    for r in 0..w.rows {
        w.row(r, &mut row);
        for (cc, v) in row.iter().enumerate() {
            out[start + cc * w.rows + r] = *v;
        }
    }
}

/// The tokenizer of an RWKV-7 model: `given`, else the directory's tokenizer.json, else by the
/// embedding's rows (65,536: RWKV World; 50,304: GPT-NeoX-20B, the Pile series), else an error
/// asking for `--tokenizer`. A tokenizer with more ids than the embedding has rows is refused.
pub fn tokenizer(info: &ModelInfo, given: Option<&Path>) -> Result<Tokenizer> {
    let dir = super::dir_of(&info.path);
    let own = dir.join("tokenizer.json");
    let rows = info.vocab_rows;
    let tok = match given {
        Some(p) => Tokenizer::from_file(p)?,
        None if own.exists() => Tokenizer::from_file(&own)?,
        None if rows == WORLD_ROWS => Tokenizer::world()?,
        None if rows == NEOX_ROWS => Tokenizer::for_model(None, None)?,
        None => bail!(
            "{}: an RWKV-7 embedding of {rows} rows matches neither the RWKV World vocab ({WORLD_ROWS}) nor \
             GPT-NeoX-20B ({NEOX_ROWS}); pass --tokenizer",
            info.path.display()
        ),
    };
    if tok.vocab_size() > rows {
        bail!(
            "{}: tokenizer {} has {} ids but the model's embedding has {rows} rows",
            info.path.display(),
            tok.source,
            tok.vocab_size()
        );
    }
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare `.pth`'s tokenizer follows its embedding rows: 65,536 → World, 50,304 → GPT-NeoX-20B
    /// (the Pile series), anything else → an error asking for --tokenizer.
    #[test]
    fn tokenizer_by_embedding_rows() {
        let dir = tempfile::tempdir().unwrap();
        let info = |rows: usize| ModelInfo {
            path: dir.path().join("model.pth"),
            family: Family::Rwkv7,
            format: "blinkdl-pth".into(),
            d_model: 64,
            n_layer: 1,
            layout: Layout::Rwkv7 {
                n_heads: 1,
                head_size: 64,
                d_ffn: 1,
                lora_decay: 1,
                lora_a: 1,
                lora_v: 0,
                lora_gate: 1,
            },
            params: 1,
            weight_dtype: "bf16".into(),
            weight_bytes: 1,
            state_bytes: 1,
            paper_state_size: 1,
            vocab_rows: rows,
            config_vocab: None,
            tied_embeddings: false,
            state_file: None,
        };
        assert!(tokenizer(&info(WORLD_ROWS), None).unwrap().is_world());
        let neox = tokenizer(&info(NEOX_ROWS), None).unwrap();
        assert_eq!((neox.source.as_str(), neox.vocab_size() <= NEOX_ROWS), ("builtin:gpt-neox-20b", true));
        let err = format!("{:#}", tokenizer(&info(1000), None).err().expect("1000 rows: an error"));
        assert!(err.contains("1000 rows") && err.contains("--tokenizer"), "{err}");
    }
}
