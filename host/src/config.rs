//! config.json → a family and its core config, with every quirk of FORMATS.md §2.2.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use stuffed_core::mamba2;

/// Which file layout and key names a Mamba-2 checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// transformers `Mamba2ForCausalLM` (`backbone.embeddings.weight`, lm_head absent when tied).
    Hf,
    /// state-spaces `MambaLMHeadModel` (`backbone.embedding.weight`, lm_head always present).
    Official,
}

#[derive(Clone, Debug)]
pub struct Mamba2Config {
    pub core: mamba2::Config,
    pub flavor: Flavor,
    pub tied: bool,
    /// The unpadded vocab the config states (official files), if any.
    pub vocab_size: Option<usize>,
    pub torch_dtype: Option<String>,
    /// Whether each layer has `mixer.conv1d.bias` (HF `use_conv_bias`, official `ssm_cfg.conv_bias`;
    /// default true), and `mixer.in_proj.bias` + `mixer.out_proj.bias` (`use_bias` / `ssm_cfg.bias`;
    /// default false): the tensors must then be present, and absent otherwise.
    pub conv_bias: bool,
    pub bias: bool,
    /// `mixer.D` is `[d_inner]` (official `ssm_cfg.D_has_hdim`; HF has no such field: `None`).
    pub d_has_hdim: Option<bool>,
}

impl Mamba2Config {
    /// The config field that says whether `conv1d.bias` (`conv = true`) or the projection biases exist.
    pub fn bias_field(&self, conv: bool) -> &'static str {
        match (self.flavor, conv) {
            (Flavor::Hf, true) => "use_conv_bias",
            (Flavor::Hf, false) => "use_bias",
            (Flavor::Official, true) => "ssm_cfg.conv_bias",
            (Flavor::Official, false) => "ssm_cfg.bias",
        }
    }
}

/// The largest integer a size in a config may hold (2^24): dims, heads and vocab sizes of real
/// models are far below it, and products of three such values cannot overflow.
pub const MAX_FIELD: usize = 1 << 24;

/// Reads `config.json` tolerating the bare `Infinity`/`NaN` tokens older transformers wrote.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&quote_bare_floats(&text)).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))
}

/// Puts quotes around `Infinity`, `-Infinity` and `NaN` where they stand as bare JSON values.
fn quote_bare_floats(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_str, mut esc) = (false, false);
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_str {
            out.push(ch);
            match (esc, ch) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            rest = &rest[ch.len_utf8()..];
            continue;
        }
        if let Some(tok) = ["-Infinity", "Infinity", "NaN"].iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        if ch == '"' {
            in_str = true;
        }
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

/// A float from a number, a string such as "Infinity", or transformers 5's `{"__float__": "Infinity"}`.
fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "Infinity" | "inf" => Some(f64::INFINITY),
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            s => s.parse().ok(),
        },
        Value::Object(o) => o.get("__float__").and_then(as_float),
        _ => None,
    }
}

struct Fields<'a> {
    obj: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.obj.get(key) {
            Some(Value::Null) | None => {
                default.ok_or_else(|| anyhow!("{}: missing config field '{key}'", self.path.display()))
            }
            Some(v) => {
                let x = v.as_u64().ok_or_else(|| {
                    anyhow!("{}: config field '{key}' is not a non-negative integer", self.path.display())
                })?;
                // Sizes past any model's keep the products of a few of them from overflowing. Layer
                // counts enter no product here; the loader checks them against the weights.
                if x > MAX_FIELD as u64 && !matches!(key, "num_hidden_layers" | "n_layer") {
                    bail!(
                        "{}: config field '{key}' is {x}, more than the {MAX_FIELD} a size may be",
                        self.path.display()
                    );
                }
                Ok(x as usize)
            }
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            Some(Value::Null) | None => Ok(default),
            Some(v) => {
                v.as_bool().ok_or_else(|| anyhow!("{}: config field '{key}' is not a boolean", self.path.display()))
            }
        }
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.obj.get(key) {
            Some(Value::Null) | None => Ok(default),
            Some(v) => as_float(v)
                .map(|x| x as f32)
                .ok_or_else(|| anyhow!("{}: config field '{key}' is not a number", self.path.display())),
        }
    }
    fn limit(&self, key: &str) -> Result<(f32, f32)> {
        match self.obj.get(key) {
            Some(Value::Array(a)) if a.len() == 2 => match (as_float(&a[0]), as_float(&a[1])) {
                (Some(lo), Some(hi)) => Ok((lo as f32, hi as f32)),
                _ => bail!("{}: config field '{key}' is not a pair of numbers", self.path.display()),
            },
            Some(Value::Null) | None => Ok((0.0, f32::INFINITY)),
            Some(_) => bail!("{}: config field '{key}' is not a pair of numbers", self.path.display()),
        }
    }
}

/// Parses a Mamba-2 config (HF or official); the vocab rows come from the embedding's shape.
pub fn mamba2(cfg: &Value, path: &Path, vocab_rows: usize) -> Result<Mamba2Config> {
    let p = path.display();
    if cfg.get("model_type").and_then(Value::as_str) == Some("mamba2") {
        let f = Fields { obj: cfg, path };
        let d = f.usize_or("hidden_size", None)?;
        let expand = f.usize_or("expand", Some(2))?;
        let head_dim = f.usize_or("head_dim", Some(64))?;
        let n_heads = f.usize_or("num_heads", Some(expand * d / head_dim.max(1)))?;
        if n_heads * head_dim != expand * d {
            bail!("{p}: num_heads·head_dim = {} but expand·hidden_size = {}", n_heads * head_dim, expand * d);
        }
        let (dt_min, dt_max) = f.limit("time_step_limit")?;
        let core = mamba2::Config {
            d_model: d,
            n_layer: f.usize_or("num_hidden_layers", None)?,
            d_state: f.usize_or("state_size", Some(128))?,
            head_dim,
            n_heads,
            n_groups: f.usize_or("n_groups", Some(1))?,
            d_conv: f.usize_or("conv_kernel", Some(4))?,
            vocab_rows,
            eps: f.f32_or("layer_norm_epsilon", 1e-5)?,
            dt_min,
            dt_max,
        };
        let dtype = cfg.get("dtype").or(cfg.get("torch_dtype")).and_then(Value::as_str).map(String::from);
        return Ok(Mamba2Config {
            core,
            flavor: Flavor::Hf,
            tied: f.bool_or("tie_word_embeddings", false)?,
            vocab_size: None,
            torch_dtype: dtype,
            conv_bias: f.bool_or("use_conv_bias", true)?,
            bias: f.bool_or("use_bias", false)?,
            d_has_hdim: None,
        });
    }
    // Official state-spaces config: d_model, n_layer, ssm_cfg{…}.
    let top = Fields { obj: cfg, path };
    let empty = Value::Object(Default::default());
    let ssm = cfg.get("ssm_cfg").unwrap_or(&empty);
    let s = Fields { obj: ssm, path };
    match ssm.get("layer").and_then(Value::as_str) {
        Some("Mamba2") => {}
        Some(other) => bail!("{p}: ssm_cfg.layer is '{other}'; only Mamba2 is supported"),
        None => {
            bail!("{p}: ssm_cfg.layer is missing, which means Mamba1; only Mamba2 is supported")
        }
    }
    if cfg.get("attn_layer_idx").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
        bail!("{p}: hybrid models with attention layers (attn_layer_idx) are not supported");
    }
    if top.usize_or("d_intermediate", Some(0))? != 0 {
        bail!("{p}: d_intermediate ≠ 0 (MLP blocks) is not supported");
    }
    if !top.bool_or("rms_norm", true)? {
        bail!("{p}: rms_norm = false (LayerNorm) is not supported");
    }
    if s.bool_or("norm_before_gate", false)? {
        bail!("{p}: ssm_cfg.norm_before_gate = true is not supported");
    }
    if !s.bool_or("rmsnorm", true)? {
        bail!("{p}: ssm_cfg.rmsnorm = false (no gated norm, no mixer.norm.weight) is not supported");
    }
    let d = top.usize_or("d_model", None)?;
    let expand = s.usize_or("expand", Some(2))?;
    let head_dim = s.usize_or("headdim", Some(64))?;
    if (expand * d) % head_dim.max(1) != 0 {
        bail!("{p}: expand·d_model = {} is not a multiple of headdim {head_dim}", expand * d);
    }
    let (dt_min, dt_max) = s.limit("dt_limit")?;
    let core = mamba2::Config {
        d_model: d,
        n_layer: top.usize_or("n_layer", None)?,
        d_state: s.usize_or("d_state", Some(128))?,
        head_dim,
        n_heads: expand * d / head_dim.max(1),
        n_groups: s.usize_or("ngroups", Some(1))?,
        d_conv: s.usize_or("d_conv", Some(4))?,
        vocab_rows,
        eps: 1e-5,
        dt_min,
        dt_max,
    };
    Ok(Mamba2Config {
        core,
        flavor: Flavor::Official,
        tied: top.bool_or("tie_embeddings", true)?,
        vocab_size: Some(top.usize_or("vocab_size", None)?),
        torch_dtype: None,
        conv_bias: s.bool_or("conv_bias", true)?,
        bias: s.bool_or("bias", false)?,
        d_has_hdim: Some(s.bool_or("D_has_hdim", false)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_infinity_and_float_objects() {
        let v: Value = serde_json::from_str(&quote_bare_floats(
            r#"{"a": [0.0, Infinity], "s": "Infinity \" NaN", "b": -Infinity, "c": {"__float__": "Infinity"}}"#,
        ))
        .unwrap();
        assert_eq!(as_float(&v["a"][1]), Some(f64::INFINITY));
        assert_eq!(v["s"], "Infinity \" NaN");
        assert_eq!(as_float(&v["b"]), Some(f64::NEG_INFINITY));
        assert_eq!(as_float(&v["c"]), Some(f64::INFINITY));
    }
}
