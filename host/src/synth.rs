//! `stuffed synth`: seeded random weights at the published shapes, written as an HF directory.
//! The models are UNTRAINED: they exist to measure speed and memory, never quality.
use crate::model::Family;
use crate::rng::SplitMix64 as Rng;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::Path;

/// (d_model, n_layer, d_state, head_dim) of each published Mamba-2 size; `tiny`, `small` and `p128` are for tests.
pub const MAMBA2_PRESETS: &[(&str, usize, usize, usize, usize)] = &[
    ("tiny", 64, 2, 16, 16),
    // The released models' head shape (N 128, P 64) at toy width: the GPU tiling at its real sizes.
    ("small", 128, 1, 128, 64),
    // Head dim 128 (the GPU's other tiling: block states in two column splits, 64-row scan tiles),
    // with projection biases (no released model has them; the loaders and kernels do).
    ("p128", 128, 1, 128, 128),
    ("130m", 768, 24, 128, 64),
    ("370m", 1024, 48, 128, 64),
    ("780m", 1536, 48, 128, 64),
    ("1.3b", 2048, 48, 128, 64),
    ("2.7b", 2560, 64, 128, 64),
];
/// The storage type of synth weights (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreDtype {
    Bf16,
    F16,
    F32,
}

impl std::fmt::Display for StoreDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreDtype::Bf16 => "bf16",
            StoreDtype::F16 => "f16",
            StoreDtype::F32 => "f32",
        })
    }
}

impl StoreDtype {
    fn safetensors(self) -> Dtype {
        match self {
            StoreDtype::Bf16 => Dtype::BF16,
            StoreDtype::F16 => Dtype::F16,
            StoreDtype::F32 => Dtype::F32,
        }
    }
}

/// `stuffed synth`: a preset of `family` written to `out`.
pub fn write(family: Family, preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    match family {
        Family::Mamba2 => mamba2(preset, dtype, seed, out),
        Family::Rwkv6 => rwkv(true, preset, dtype, seed, out),
        Family::Rwkv5 => rwkv(false, preset, dtype, seed, out),
        Family::Hgrn2 => hgrn2(preset, dtype, seed, out),
        Family::Mamba1 => mamba1(preset, dtype, seed, out),
        Family::Rwkv7 => rwkv7(preset, dtype, seed, out),
        Family::Gla => gla(false, preset, dtype, seed, out),
        Family::RetNet => gla(true, preset, dtype, seed, out),
        Family::DeltaNet => delta_net(false, preset, dtype, seed, out),
        Family::GatedDeltaNet => delta_net(true, preset, dtype, seed, out),
        Family::Xlstm => xlstm(preset, dtype, seed, out),
    }
}

/// GPT-NeoX vocab padded to a multiple of 16, as in the released configs.
const VOCAB_ROWS: usize = 50288;

struct Tensor {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    bytes: Vec<u8>,
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(values: impl Iterator<Item = f32>, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
        Dtype::F16 => values.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
        _ => values.flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// The core config of a Mamba-2 preset (expand 2, one group, conv 4, GPT-NeoX vocab), for sizing.
pub fn mamba2_config(preset: &str) -> Option<stuffed_core::mamba2::Config> {
    let &(_, d, n_layer, n, p) = MAMBA2_PRESETS.iter().find(|x| x.0 == preset)?;
    Some(stuffed_core::mamba2::Config {
        d_model: d,
        n_layer,
        d_state: n,
        head_dim: p,
        n_heads: 2 * d / p,
        n_groups: 1,
        d_conv: 4,
        vocab_rows: VOCAB_ROWS,
        eps: 1e-5,
        dt_min: 0.0,
        dt_max: f32::INFINITY,
    })
}

fn mamba2(preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let Some(&(_, d, n_layer, n, p)) = MAMBA2_PRESETS.iter().find(|x| x.0 == preset) else {
        let names: Vec<_> = MAMBA2_PRESETS.iter().map(|x| x.0).collect();
        bail!("unknown Mamba-2 preset '{preset}' (known: {})", names.join(", "));
    };
    let dt = dtype.safetensors();
    let (di, k) = (2 * d, 4);
    let h = di / p;
    let cd = di + 2 * n;
    let nin = 2 * di + 2 * n + h;
    let bias = preset == "p128";
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng, usize) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|i| f(&mut rng, i)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    // Scales follow the reference init: N(0, 0.02)-sized embeddings, 1/√fan_in projections,
    // A ∈ [1, 16], dt ∈ [1e-3, 0.1] through the inverse softplus, D = 1, norms = 1.
    add("backbone.embeddings.weight".into(), vec![VOCAB_ROWS, d], &mut |r, _| r.uniform(-0.035, 0.035));
    for l in 0..n_layer {
        let pre = format!("backbone.layers.{l}.");
        let s_in = 1.0 / (d as f32).sqrt();
        let s_out = 1.0 / (di as f32).sqrt() / (2.0 * n_layer as f32).sqrt();
        add(format!("{pre}norm.weight"), vec![d], &mut |_, _| 1.0);
        add(format!("{pre}mixer.in_proj.weight"), vec![nin, d], &mut |r, _| r.uniform(-s_in, s_in));
        if bias {
            add(format!("{pre}mixer.in_proj.bias"), vec![nin], &mut |r, _| r.uniform(-0.1, 0.1));
            add(format!("{pre}mixer.out_proj.bias"), vec![d], &mut |r, _| r.uniform(-0.1, 0.1));
        }
        add(format!("{pre}mixer.conv1d.weight"), vec![cd, 1, k], &mut |r, _| r.uniform(-0.5, 0.5));
        add(format!("{pre}mixer.conv1d.bias"), vec![cd], &mut |r, _| r.uniform(-0.5, 0.5));
        add(format!("{pre}mixer.dt_bias"), vec![h], &mut |r, _| {
            let dt = (r.uniform(0.001f32.ln(), 0.1f32.ln())).exp();
            dt + (-(-dt).exp_m1()).ln()
        });
        add(format!("{pre}mixer.A_log"), vec![h], &mut |r, _| r.uniform(1.0, 16.0).ln());
        add(format!("{pre}mixer.D"), vec![h], &mut |_, _| 1.0);
        add(format!("{pre}mixer.norm.weight"), vec![di], &mut |_, _| 1.0);
        add(format!("{pre}mixer.out_proj.weight"), vec![d, di], &mut |r, _| r.uniform(-s_out, s_out));
    }
    add("backbone.norm_f.weight".into(), vec![d], &mut |_, _| 1.0);

    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create directory", out.display()))?;
    let config = serde_json::json!({
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": d, "num_hidden_layers": n_layer, "state_size": n, "head_dim": p,
        "num_heads": h, "n_groups": 1, "expand": 2, "conv_kernel": k, "chunk_size": 256,
        "use_bias": bias, "use_conv_bias": true, "layer_norm_epsilon": 1e-5,
        "residual_in_fp32": true, "tie_word_embeddings": true, "vocab_size": VOCAB_ROWS,
        "time_step_limit": [0.0, {"__float__": "Infinity"}],
        "torch_dtype": match dt { Dtype::BF16 => "bfloat16", Dtype::F16 => "float16", _ => "float32" },
        "stuffed_synth": {"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"},
    });
    let cfg_path = out.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("{}: cannot write", cfg_path.display()))?;
    let st_path = out.join("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.clone(), t)), Some(meta), &st_path)
        .with_context(|| format!("{}: cannot write", st_path.display()))?;
    crate::report::set_created_mode(&st_path)?;
    Ok(())
}

/// (name, C, L, head size, F, Dm, Dd, vocab rows) of the published RWKV-6 sizes (FORMATS §6).
/// (name, C, L, head size, F, Dm, Dd, vocab rows).
pub type Rwkv6Preset = (&'static str, usize, usize, usize, usize, usize, usize, usize);
pub const RWKV6_PRESETS: &[Rwkv6Preset] = &[
    ("tiny", 64, 2, 16, 224, 32, 64, 65536),
    ("1.6b", 2048, 24, 64, 7168, 32, 64, 65536),
    ("3b", 2560, 32, 64, 8960, 32, 64, 65536),
    ("7b", 4096, 32, 64, 14336, 64, 128, 65536),
];
/// (name, C, L, head size, F, vocab rows) of the RWKV-5 sizes the paper uses (FORMATS §6).
pub const RWKV5_PRESETS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("tiny", 64, 2, 16, 224, 65536),
    ("0.4b", 1024, 24, 64, 3584, 65536),
    ("1.5b", 2048, 24, 64, 7168, 65536),
    ("3b", 2560, 32, 64, 8960, 65536),
    ("7b", 4096, 32, 64, 14336, 65536),
];
/// (name, C, L, expand_ratio, I, vocab rows) of HGRN-2 (FORMATS §6).
pub const HGRN2_PRESETS: &[(&str, usize, usize, usize, usize, usize)] =
    &[("tiny", 64, 2, 16, 256, 256), ("1.3b", 2048, 24, 128, 5632, 32000)];

/// (name, C, L, F, LoRA ranks decay / a / v / gate, vocab rows) of the released RWKV-7 sizes
/// (FAMILIES.md §1.1–1.2; head size 64). The 0.1B/0.4B/1.5B ranks are the released files'; the
/// 2.9B and 7.2B ranks are the training code's formula (not read from a released file).
pub type Rwkv7Preset = (&'static str, usize, usize, usize, [usize; 4], usize);
pub const RWKV7_PRESETS: &[Rwkv7Preset] = &[
    ("tiny", 64, 2, 224, [8, 8, 8, 16], 65536),
    ("0.1b", 768, 12, 3072, [64, 64, 32, 128], 65536),
    ("0.4b", 1024, 24, 4096, [64, 64, 32, 128], 65536),
    ("1.5b", 2048, 24, 8192, [96, 96, 64, 256], 65536),
    ("2.9b", 2560, 32, 10240, [128, 128, 96, 256], 65536),
    ("7.2b", 4096, 32, 16384, [160, 160, 96, 320], 65536),
    ("pile-168m", 768, 12, 3072, [64, 64, 32, 128], 50304),
    ("pile-421m", 1024, 24, 4096, [64, 64, 32, 128], 50304),
    ("pile-1.47b", 2048, 24, 8192, [96, 96, 64, 256], 50304),
];

/// (name, C, L, heads, I, vocab rows) of GLA (fla-hub `gla-{1.3B,2.7B}-100B`: expand_k 0.5, expand_v 1,
/// no short conv, I = fla's 256-rounded ⅔·4·C; the 2.7B shape is from third-party material). The
/// tiny one has rows for the 2,259 tokens of tests/data/tokenizer_llama_style.
pub const GLA_PRESETS: &[(&str, usize, usize, usize, usize, usize)] =
    &[("tiny", 64, 2, 4, 256, 2304), ("1.3b", 2048, 24, 4, 5632, 32000), ("2.7b", 2560, 32, 4, 6912, 32000)];

/// The same of RetNet (fla-hub `retnet-1.3B-100B`: 8 heads, expand_k 1, expand_v 2, FAMILIES.md §6,
/// third-party; I = fla's 256-rounded ⅔·hidden_ratio·C with RetNetConfig's hidden_ratio 2, which
/// makes 1.35B parameters): K 256 × V 512 a head.
pub const RETNET_PRESETS: &[(&str, usize, usize, usize, usize, usize)] =
    &[("tiny", 64, 2, 4, 256, 2304), ("1.3b", 2048, 24, 8, 2816, 32000)];

/// (name, C, L, q/k heads, value heads, K, V, I, vocab rows).
pub type DeltaNetPreset = (&'static str, usize, usize, usize, usize, usize, usize, usize, usize);

/// [`DeltaNetPreset`]s of DeltaNet (fla-hub
/// `delta_net-{1.3B,2.7B}-100B`: 16 / 20 heads of 128 × 128, use_beta, no output gate, conv 4; I = fla's
/// 256-rounded ⅔·4·C; shapes from third-party material, FAMILIES.md §2.1). The tiny one has rows for
/// the 2,259 tokens of tests/data/tokenizer_llama_style.
pub const DELTA_NET_PRESETS: &[DeltaNetPreset] = &[
    ("tiny", 64, 2, 4, 4, 16, 16, 256, 2304),
    ("1.3b", 2048, 24, 16, 16, 128, 128, 5632, 32000),
    ("2.7b", 2560, 32, 20, 20, 128, 128, 6912, 32000),
];
/// The same for Gated DeltaNet (fla 0.6.0's `GatedDeltaNetConfig` defaults, the fla GDN 1.3B shape:
/// C 2048, 21 layers, 6 heads of K 256 × V 512 (expand_v 2), swish output gate, conv 4; FAMILIES.md
/// §2.4). The tiny one has 2 key heads over 4 value heads.
pub const GDN_PRESETS: &[DeltaNetPreset] =
    &[("tiny", 64, 2, 2, 4, 16, 32, 256, 2304), ("1.3b", 2048, 21, 6, 6, 256, 512, 5632, 32000)];

/// (name, C, blocks, heads, FFN width, vocab rows) of xLSTM (NX-AI `xLSTM-7b`: qk_dim_factor 0.5,
/// v_dim_factor 1, FFN round_up(2.667·C, 64); GPT-NeoX vocab padded to 50,304). The tiny one has rows
/// for the 2,259 tokens of tests/data/tokenizer_llama_style.
pub const XLSTM_PRESETS: &[(&str, usize, usize, usize, usize, usize)] =
    &[("tiny", 64, 2, 4, 192, 2304), ("7b", 4096, 32, 8, 10944, 50304)];

fn torch_dtype(dt: Dtype) -> &'static str {
    match dt {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

fn write_dir(out: &Path, config: serde_json::Value, tensors: &[Tensor]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create directory", out.display()))?;
    let cfg_path = out.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("{}: cannot write", cfg_path.display()))?;
    let st_path = out.join("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.clone(), t)), Some(meta), &st_path)
        .with_context(|| format!("{}: cannot write", st_path.display()))?;
    crate::report::set_created_mode(&st_path)
}

/// RWKV-6 (`v6 = true`) or RWKV-5.2 random weights under BlinkDL's tensor names, written as
/// `model.safetensors` + `config.json` (`model_type` rwkv6 / rwkv5): the loader reads it as it
/// reads a `.pth`.
fn rwkv(v6: bool, preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let dims = if v6 {
        RWKV6_PRESETS.iter().find(|x| x.0 == preset).map(|&(_, c, l, n, f, dm, dd, v)| (c, l, n, f, dm, dd, v))
    } else {
        RWKV5_PRESETS.iter().find(|x| x.0 == preset).map(|&(_, c, l, n, f, v)| (c, l, n, f, 0, 0, v))
    };
    let Some((c, n_layer, n, f, dm, dd, vocab)) = dims else {
        let names: Vec<&str> =
            if v6 { RWKV6_PRESETS.iter().map(|x| x.0).collect() } else { RWKV5_PRESETS.iter().map(|x| x.0).collect() };
        bail!("unknown RWKV-{} preset '{preset}' (known: {})", if v6 { 6 } else { 5 }, names.join(", "));
    };
    let dt = dtype.safetensors();
    let h = c / n;
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|_| f(&mut rng)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    let s_in = 1.0 / (c as f32).sqrt();
    let s_out = s_in / (2.0 * n_layer as f32).sqrt();
    add("emb.weight".into(), vec![vocab, c], &mut |r| r.uniform(-1e-1, 1e-1));
    for l in 0..n_layer {
        let b = format!("blocks.{l}.");
        let lns: &[&str] = if l == 0 { &["ln0", "ln1", "ln2"] } else { &["ln1", "ln2"] };
        for ln in lns {
            add(format!("{b}{ln}.weight"), vec![c], &mut |_| 1.0);
            add(format!("{b}{ln}.bias"), vec![c], &mut |_| 0.0);
        }
        let a = format!("{b}att.");
        if v6 {
            for j in ["x", "w", "k", "v", "r", "g"] {
                add(format!("{a}time_maa_{j}"), vec![1, 1, c], &mut |r| r.uniform(0.0, 1.0));
            }
            add(format!("{a}time_maa_w1"), vec![c, 5 * dm], &mut |r| r.uniform(-1e-2, 1e-2));
            add(format!("{a}time_maa_w2"), vec![5, dm, c], &mut |r| r.uniform(-1e-1, 1e-1));
            add(format!("{a}time_decay"), vec![1, 1, c], &mut |r| r.uniform(-6.0, 0.0));
            add(format!("{a}time_decay_w1"), vec![c, dd], &mut |r| r.uniform(-1e-2, 1e-2));
            add(format!("{a}time_decay_w2"), vec![dd, c], &mut |r| r.uniform(-1e-1, 1e-1));
        } else {
            for j in ["k", "v", "r", "g"] {
                add(format!("{a}time_mix_{j}"), vec![1, 1, c], &mut |r| r.uniform(0.0, 1.0));
            }
            add(format!("{a}time_decay"), vec![h, n], &mut |r| r.uniform(-6.0, 0.0));
        }
        add(format!("{a}time_faaaa"), vec![h, n], &mut |r| r.uniform(-0.5, 0.5));
        for p in ["receptance", "key", "value", "gate"] {
            add(format!("{a}{p}.weight"), vec![c, c], &mut |r| r.uniform(-s_in, s_in));
        }
        add(format!("{a}output.weight"), vec![c, c], &mut |r| r.uniform(-s_out, s_out));
        add(format!("{a}ln_x.weight"), vec![c], &mut |_| 1.0);
        add(format!("{a}ln_x.bias"), vec![c], &mut |_| 0.0);
        let fm = if v6 { "time_maa" } else { "time_mix" };
        for j in ["k", "r"] {
            add(format!("{b}ffn.{fm}_{j}"), vec![1, 1, c], &mut |r| r.uniform(0.0, 1.0));
        }
        add(format!("{b}ffn.key.weight"), vec![f, c], &mut |r| r.uniform(-s_in, s_in));
        add(format!("{b}ffn.receptance.weight"), vec![c, c], &mut |r| r.uniform(-s_in, s_in));
        let sf = 1.0 / (f as f32).sqrt() / (2.0 * n_layer as f32).sqrt();
        add(format!("{b}ffn.value.weight"), vec![c, f], &mut |r| r.uniform(-sf, sf));
    }
    add("ln_out.weight".into(), vec![c], &mut |_| 1.0);
    add("ln_out.bias".into(), vec![c], &mut |_| 0.0);
    add("head.weight".into(), vec![vocab, c], &mut |r| r.uniform(-s_in, s_in));
    let config = serde_json::json!({
        "model_type": if v6 { "rwkv6" } else { "rwkv5" },
        "stuffed_note": "BlinkDL tensor names in safetensors (the .pth layout); LN0 not folded",
        "hidden_size": c, "num_hidden_layers": n_layer, "head_size": n, "intermediate_size": f,
        "layer_norm_epsilon": 1e-5, "vocab_size": vocab,
        "torch_dtype": torch_dtype(dt),
        "stuffed_synth": {"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"},
    });
    write_dir(out, config, &tensors)
}

/// RWKV-7 random weights under BlinkDL's tensor names (the `.pth` layout, LoRAs `[in, out]`),
/// written as `model.safetensors` + `config.json` (`model_type` rwkv7): the loader reads it as it
/// reads a `.pth`. Head size 32 for `tiny`, 64 otherwise.
fn rwkv7(preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let Some(&(_, c, n_layer, f, [dw, da, dv, dg], vocab)) = RWKV7_PRESETS.iter().find(|x| x.0 == preset) else {
        let names: Vec<_> = RWKV7_PRESETS.iter().map(|x| x.0).collect();
        bail!("unknown RWKV-7 preset '{preset}' (known: {})", names.join(", "));
    };
    let n = if c < 128 { 32 } else { 64 };
    let (dt, h) = (dtype.safetensors(), c / n);
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|_| f(&mut rng)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    let s_in = 1.0 / (c as f32).sqrt();
    let s_out = s_in / (2.0 * n_layer as f32).sqrt();
    add("emb.weight".into(), vec![vocab, c], &mut |r| r.uniform(-1e-1, 1e-1));
    for l in 0..n_layer {
        let b = format!("blocks.{l}.");
        let lns: &[&str] = if l == 0 { &["ln0", "ln1", "ln2"] } else { &["ln1", "ln2"] };
        for ln in lns {
            add(format!("{b}{ln}.weight"), vec![c], &mut |_| 1.0);
            add(format!("{b}{ln}.bias"), vec![c], &mut |_| 0.0);
        }
        let a = format!("{b}att.");
        for j in ["r", "w", "k", "v", "a", "g"] {
            add(format!("{a}x_{j}"), vec![1, 1, c], &mut |r| r.uniform(0.0, 1.0));
        }
        // Released files have no layer-0 value LoRA (FAMILIES.md §1.2).
        let loras: &[(&str, usize)] =
            if l == 0 { &[("w", dw), ("a", da), ("g", dg)] } else { &[("w", dw), ("a", da), ("v", dv), ("g", dg)] };
        for &(p, d) in loras {
            if p != "g" {
                add(format!("{a}{p}0"), vec![1, 1, c], &mut |r| r.uniform(-1.0, 1.0));
            }
            add(format!("{a}{p}1"), vec![c, d], &mut |r| r.uniform(-1e-2, 1e-2));
            add(format!("{a}{p}2"), vec![d, c], &mut |r| r.uniform(-1e-1, 1e-1));
        }
        add(format!("{a}k_k"), vec![1, 1, c], &mut |r| r.uniform(0.7, 1.0));
        add(format!("{a}k_a"), vec![1, 1, c], &mut |r| r.uniform(0.9, 1.1));
        add(format!("{a}r_k"), vec![h, n], &mut |r| r.uniform(-0.5, 0.5));
        for p in ["receptance", "key", "value"] {
            add(format!("{a}{p}.weight"), vec![c, c], &mut |r| r.uniform(-s_in, s_in));
        }
        add(format!("{a}output.weight"), vec![c, c], &mut |r| r.uniform(-s_out, s_out));
        add(format!("{a}ln_x.weight"), vec![c], &mut |_| 1.0);
        add(format!("{a}ln_x.bias"), vec![c], &mut |_| 0.0);
        add(format!("{b}ffn.x_k"), vec![1, 1, c], &mut |r| r.uniform(0.0, 1.0));
        add(format!("{b}ffn.key.weight"), vec![f, c], &mut |r| r.uniform(-s_in, s_in));
        let sf = 1.0 / (f as f32).sqrt() / (2.0 * n_layer as f32).sqrt();
        add(format!("{b}ffn.value.weight"), vec![c, f], &mut |r| r.uniform(-sf, sf));
    }
    add("ln_out.weight".into(), vec![c], &mut |_| 1.0);
    add("ln_out.bias".into(), vec![c], &mut |_| 0.0);
    add("head.weight".into(), vec![vocab, c], &mut |r| r.uniform(-s_in, s_in));
    let config = serde_json::json!({
        "model_type": "rwkv7",
        "stuffed_note": "BlinkDL tensor names in safetensors (the .pth layout); LN0 not folded",
        "hidden_size": c, "num_hidden_layers": n_layer, "head_dim": n, "num_heads": h, "intermediate_size": f,
        "decay_low_rank_dim": dw, "a_low_rank_dim": da, "v_low_rank_dim": dv, "gate_low_rank_dim": dg,
        "norm_eps": 1e-5, "vocab_size": vocab,
        "torch_dtype": torch_dtype(dt),
        "stuffed_synth": {"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"},
    });
    write_dir(out, config, &tensors)
}

/// HGRN-2 random weights as fla-hub writes them (`model.safetensors` + `config.json`).
fn hgrn2(preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let Some(&(_, c, n_layer, e, im, vocab)) = HGRN2_PRESETS.iter().find(|x| x.0 == preset) else {
        let names: Vec<_> = HGRN2_PRESETS.iter().map(|x| x.0).collect();
        bail!("unknown HGRN-2 preset '{preset}' (known: {})", names.join(", "));
    };
    let dt = dtype.safetensors();
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|_| f(&mut rng)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    let s_in = 1.0 / (c as f32).sqrt();
    let s_out = s_in / (2.0 * n_layer as f32).sqrt();
    add("model.embeddings.weight".into(), vec![vocab, c], &mut |r| r.uniform(-0.035, 0.035));
    add("model.lower_bounds".into(), vec![n_layer, c], &mut |r| r.uniform(-0.5, 0.5));
    for l in 0..n_layer {
        let p = format!("model.layers.{l}.");
        for nm in ["attn_norm", "mlp_norm", "attn.g_norm"] {
            add(format!("{p}{nm}.weight"), vec![c], &mut |_| 1.0);
        }
        for pr in ["q_proj", "f_proj", "i_proj"] {
            add(format!("{p}attn.{pr}.weight"), vec![c, c], &mut |r| r.uniform(-s_in, s_in));
        }
        add(format!("{p}attn.o_proj.weight"), vec![c, c], &mut |r| r.uniform(-s_out, s_out));
        for pr in ["gate_proj", "up_proj"] {
            add(format!("{p}mlp.{pr}.weight"), vec![im, c], &mut |r| r.uniform(-s_in, s_in));
        }
        let sd = 1.0 / (im as f32).sqrt() / (2.0 * n_layer as f32).sqrt();
        add(format!("{p}mlp.down_proj.weight"), vec![c, im], &mut |r| r.uniform(-sd, sd));
    }
    add("model.norm.weight".into(), vec![c], &mut |_| 1.0);
    add("lm_head.weight".into(), vec![vocab, c], &mut |r| r.uniform(-s_in, s_in));
    let config = serde_json::json!({
        "model_type": "hgrn2", "architectures": ["HGRN2ForCausalLM"],
        "hidden_size": c, "num_hidden_layers": n_layer, "expand_ratio": e, "num_heads": c / e,
        "intermediate_size": im, "hidden_ratio": 4, "use_lower_bound": true, "use_short_conv": false,
        "norm_eps": 1e-6, "attn_mode": "chunk", "attn": null, "tie_word_embeddings": false,
        "vocab_size": vocab, "torch_dtype": torch_dtype(dt),
        "stuffed_synth": {"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"},
    });
    write_dir(out, config, &tensors)
}

/// (name, d_model, n_layer) of the released Mamba-1 sizes (`state-spaces/mamba-*`, FAMILIES.md §3.1;
/// d_state 16, expand 2, conv 4, dt_rank ⌈d/16⌉, 50,280 rows, tied).
pub const MAMBA1_PRESETS: &[(&str, usize, usize)] = &[
    ("tiny", 64, 2),
    ("130m", 768, 24),
    ("370m", 1024, 48),
    ("790m", 1536, 48),
    ("1.4b", 2048, 48),
    ("2.8b", 2560, 64),
];

/// Mamba-1 random weights as HF `MambaForCausalLM` writes them (`model.safetensors` + `config.json`,
/// tied: no `lm_head.weight`); A = −(1..N) per channel (S4D-real), Δ's bias the inverse softplus of
/// a Δ in [0.001, 0.1], D = 1.
fn mamba1(preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let Some(&(_, d, n_layer)) = MAMBA1_PRESETS.iter().find(|x| x.0 == preset) else {
        let names: Vec<_> = MAMBA1_PRESETS.iter().map(|x| x.0).collect();
        bail!("unknown Mamba-1 preset '{preset}' (known: {})", names.join(", "));
    };
    let (di, n, k, r, vocab) = (2 * d, 16, 4, d.div_ceil(16), 50280);
    let dt = dtype.safetensors();
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng, usize) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|i| f(&mut rng, i)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    let (s_in, s_di, s_r) = (1.0 / (d as f32).sqrt(), 1.0 / (di as f32).sqrt(), 1.0 / (r as f32).sqrt());
    let s_out = s_di / (2.0 * n_layer as f32).sqrt();
    add("backbone.embeddings.weight".into(), vec![vocab, d], &mut |g, _| g.uniform(-0.035, 0.035));
    for l in 0..n_layer {
        let p = format!("backbone.layers.{l}.");
        add(format!("{p}norm.weight"), vec![d], &mut |_, _| 1.0);
        add(format!("{p}mixer.in_proj.weight"), vec![2 * di, d], &mut |g, _| g.uniform(-s_in, s_in));
        let sc = 1.0 / (k as f32).sqrt();
        add(format!("{p}mixer.conv1d.weight"), vec![di, 1, k], &mut |g, _| g.uniform(-sc, sc));
        add(format!("{p}mixer.conv1d.bias"), vec![di], &mut |g, _| g.uniform(-sc, sc));
        add(format!("{p}mixer.x_proj.weight"), vec![r + 2 * n, di], &mut |g, _| g.uniform(-s_di, s_di));
        add(format!("{p}mixer.dt_proj.weight"), vec![di, r], &mut |g, _| g.uniform(-s_r, s_r));
        add(format!("{p}mixer.dt_proj.bias"), vec![di], &mut |g, _| {
            let dt = (g.uniform(0.001f32.ln(), 0.1f32.ln())).exp();
            dt + (-(-dt).exp_m1()).ln()
        });
        add(format!("{p}mixer.A_log"), vec![di, n], &mut |_, i| ((i % n + 1) as f32).ln());
        add(format!("{p}mixer.D"), vec![di], &mut |_, _| 1.0);
        add(format!("{p}mixer.out_proj.weight"), vec![d, di], &mut |g, _| g.uniform(-s_out, s_out));
    }
    add("backbone.norm_f.weight".into(), vec![d], &mut |_, _| 1.0);
    let config = serde_json::json!({
        "model_type": "mamba", "architectures": ["MambaForCausalLM"],
        "hidden_size": d, "num_hidden_layers": n_layer, "state_size": n, "expand": 2, "intermediate_size": di,
        "conv_kernel": k, "time_step_rank": r, "use_bias": false, "use_conv_bias": true, "hidden_act": "silu",
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": true, "tie_word_embeddings": true, "vocab_size": vocab,
        "torch_dtype": torch_dtype(dt),
        "stuffed_synth": {"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"},
    });
    write_dir(out, config, &tensors)
}

/// GLA (or, `retnet`, RetNet) random weights as fla 0.6.0 writes them (`model.safetensors` + `config.json`).
fn gla(retnet: bool, preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let (table, fam) = if retnet { (RETNET_PRESETS, "RetNet") } else { (GLA_PRESETS, "GLA") };
    let Some(&(_, c, n_layer, nh, im, vocab)) = table.iter().find(|x| x.0 == preset) else {
        let names: Vec<_> = table.iter().map(|x| x.0).collect();
        bail!("unknown {fam} preset '{preset}' (known: {})", names.join(", "));
    };
    let (kd, vd, rank) = if retnet { (c, 2 * c, 0) } else { (c / 2, c, 16) };
    let dt = dtype.safetensors();
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|_| f(&mut rng)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    let s_in = 1.0 / (c as f32).sqrt();
    let s_out = s_in / (2.0 * n_layer as f32).sqrt();
    add("model.embeddings.weight".into(), vec![vocab, c], &mut |r| r.uniform(-0.035, 0.035));
    for l in 0..n_layer {
        let p = format!("model.layers.{l}.");
        for nm in ["attn_norm", "mlp_norm"] {
            add(format!("{p}{nm}.weight"), vec![c], &mut |_| 1.0);
        }
        add(format!("{p}attn.g_norm_swish_gate.weight"), vec![vd / nh], &mut |_| 1.0);
        for (pr, rows) in [("q_proj", kd), ("k_proj", kd), ("v_proj", vd), ("g_proj", vd)] {
            add(format!("{p}attn.{pr}.weight"), vec![rows, c], &mut |r| r.uniform(-s_in, s_in));
        }
        if !retnet {
            add(format!("{p}attn.gk_proj.0.weight"), vec![rank, c], &mut |r| r.uniform(-s_in, s_in));
            add(format!("{p}attn.gk_proj.1.weight"), vec![kd, rank], &mut |r| r.uniform(-0.25, 0.25));
            add(format!("{p}attn.gk_proj.1.bias"), vec![kd], &mut |r| r.uniform(2.0, 6.0));
        }
        add(format!("{p}attn.o_proj.weight"), vec![c, vd], &mut |r| r.uniform(-s_out, s_out));
        for pr in ["gate_proj", "up_proj"] {
            add(format!("{p}mlp.{pr}.weight"), vec![im, c], &mut |r| r.uniform(-s_in, s_in));
        }
        let sd = 1.0 / (im as f32).sqrt() / (2.0 * n_layer as f32).sqrt();
        add(format!("{p}mlp.down_proj.weight"), vec![c, im], &mut |r| r.uniform(-sd, sd));
    }
    add("model.norm.weight".into(), vec![c], &mut |_| 1.0);
    add("lm_head.weight".into(), vec![vocab, c], &mut |r| r.uniform(-s_in, s_in));
    let stamp = serde_json::json!({"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"});
    if retnet {
        let config = serde_json::json!({
            "model_type": "retnet", "architectures": ["RetNetForCausalLM"],
            "hidden_size": c, "num_hidden_layers": n_layer, "num_heads": nh, "num_kv_heads": null,
            "expand_k": 1, "expand_v": 2, "intermediate_size": im, "hidden_ratio": 2, "use_short_conv": false,
            "use_output_gate": true, "feature_map": null, "hidden_act": "swish", "norm_eps": 1e-6,
            "attn_mode": "chunk", "attn": null, "tie_word_embeddings": false, "vocab_size": vocab,
            "torch_dtype": torch_dtype(dt), "stuffed_synth": stamp,
        });
        return write_dir(out, config, &tensors);
    }
    let config = serde_json::json!({
        "model_type": "gla", "architectures": ["GLAForCausalLM"],
        "hidden_size": c, "num_hidden_layers": n_layer, "num_heads": nh, "num_kv_heads": null,
        "expand_k": 0.5, "expand_v": 1, "intermediate_size": im, "hidden_ratio": 4, "use_short_conv": false,
        "use_output_gate": true, "feature_map": null, "clamp_min": null, "hidden_act": "swish",
        "norm_eps": 1e-6, "attn_mode": "chunk", "attn": null, "tie_word_embeddings": false,
        "vocab_size": vocab, "torch_dtype": torch_dtype(dt), "stuffed_synth": stamp,
    });
    write_dir(out, config, &tensors)
}

/// DeltaNet (`gated` false) or Gated DeltaNet random weights as fla 0.6.0 writes them
/// (`model.safetensors` + `config.json`).
fn delta_net(gated: bool, preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let table = if gated { GDN_PRESETS } else { DELTA_NET_PRESETS };
    let Some(&(_, c, n_layer, nh, nv, dk, dv, im, vocab)) = table.iter().find(|x| x.0 == preset) else {
        let names: Vec<_> = table.iter().map(|x| x.0).collect();
        let fam = if gated { "Gated DeltaNet" } else { "DeltaNet" };
        bail!("unknown {fam} preset '{preset}' (known: {})", names.join(", "));
    };
    let (kd, vd, w) = (nh * dk, nv * dv, 4);
    let dt = dtype.safetensors();
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|_| f(&mut rng)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    let s_in = 1.0 / (c as f32).sqrt();
    let s_out = s_in / (2.0 * n_layer as f32).sqrt();
    add("model.embeddings.weight".into(), vec![vocab, c], &mut |r| r.uniform(-0.035, 0.035));
    for l in 0..n_layer {
        let p = format!("model.layers.{l}.");
        for nm in ["attn_norm", "mlp_norm"] {
            add(format!("{p}{nm}.weight"), vec![c], &mut |_| 1.0);
        }
        add(format!("{p}attn.o_norm.weight"), vec![dv], &mut |_| 1.0);
        let mut proj = vec![("q_proj", kd), ("k_proj", kd), ("v_proj", vd), ("b_proj", nv)];
        if gated {
            proj.extend([("g_proj", vd), ("a_proj", nv)]);
        }
        for (pr, rows) in proj {
            add(format!("{p}attn.{pr}.weight"), vec![rows, c], &mut |r| r.uniform(-s_in, s_in));
        }
        for (cv, rows) in [("q_conv1d", kd), ("k_conv1d", kd), ("v_conv1d", vd)] {
            add(format!("{p}attn.{cv}.weight"), vec![rows, 1, w], &mut |r| r.uniform(-0.5, 0.5));
        }
        if gated {
            // fla's init: A ~ U(0, 16), dt ~ logU(1e-3, 0.1) through the inverse softplus.
            add(format!("{p}attn.A_log"), vec![nv], &mut |r| r.uniform(0.0, 16.0).max(1e-4).ln());
            add(format!("{p}attn.dt_bias"), vec![nv], &mut |r| {
                let dt = (r.uniform(0.001f32.ln(), 0.1f32.ln())).exp();
                dt + (-(-dt).exp_m1()).ln()
            });
        }
        add(format!("{p}attn.o_proj.weight"), vec![c, vd], &mut |r| r.uniform(-s_out, s_out));
        for pr in ["gate_proj", "up_proj"] {
            add(format!("{p}mlp.{pr}.weight"), vec![im, c], &mut |r| r.uniform(-s_in, s_in));
        }
        let sd = 1.0 / (im as f32).sqrt() / (2.0 * n_layer as f32).sqrt();
        add(format!("{p}mlp.down_proj.weight"), vec![c, im], &mut |r| r.uniform(-sd, sd));
    }
    add("model.norm.weight".into(), vec![c], &mut |_| 1.0);
    add("lm_head.weight".into(), vec![vocab, c], &mut |r| r.uniform(-s_in, s_in));
    let note = serde_json::json!({"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"});
    let config = if gated {
        serde_json::json!({
            "model_type": "gated_deltanet", "architectures": ["GatedDeltaNetForCausalLM"],
            "hidden_size": c, "num_hidden_layers": n_layer, "num_heads": nh, "num_v_heads": nv, "head_dim": dk,
            "expand_v": dv as f64 / dk as f64, "use_gate": true, "use_short_conv": true, "conv_size": w,
            "allow_neg_eigval": false, "output_gate_activation": "swish", "intermediate_size": im, "hidden_ratio": 4,
            "hidden_act": "swish", "norm_eps": 1e-6, "attn_mode": "chunk", "attn": null, "tie_word_embeddings": false,
            "vocab_size": vocab, "torch_dtype": torch_dtype(dt), "stuffed_synth": note,
        })
    } else {
        serde_json::json!({
            "model_type": "delta_net", "architectures": ["DeltaNetForCausalLM"],
            "hidden_size": c, "num_hidden_layers": n_layer, "num_heads": nh, "expand_k": (nh * dk) as f64 / c as f64,
            "expand_v": vd as f64 / c as f64, "use_beta": true, "use_gate": false, "use_short_conv": true,
            "conv_size": w, "allow_neg_eigval": false, "qk_activation": "silu", "qk_norm": "l2",
            "use_output_norm": true, "intermediate_size": im, "hidden_ratio": 4, "hidden_act": "swish",
            "norm_eps": 1e-6, "attn_mode": "chunk", "attn": null, "tie_word_embeddings": false,
            "vocab_size": vocab, "torch_dtype": torch_dtype(dt), "stuffed_synth": note,
        })
    };
    write_dir(out, config, &tensors)
}

/// xLSTM random weights as HF `xLSTMForCausalLM` writes them (`weight_mode` single); gate biases as
/// the xLSTM init sets them (input −10, forget 3..6 over the heads), so the state keeps a long memory.
fn xlstm(preset: &str, dtype: StoreDtype, seed: u64, out: &Path) -> Result<()> {
    let Some(&(_, c, n_layer, nh, im, vocab)) = XLSTM_PRESETS.iter().find(|x| x.0 == preset) else {
        let names: Vec<_> = XLSTM_PRESETS.iter().map(|x| x.0).collect();
        bail!("unknown xLSTM preset '{preset}' (known: {})", names.join(", "));
    };
    let (qk, vd) = (c / 2, c);
    let dt = dtype.safetensors();
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(&mut Rng, usize) -> f32| {
        let numel = shape.iter().product();
        let bytes = encode((0..numel).map(|i| f(&mut rng, i)), dt);
        tensors.push(Tensor { name, shape, dtype: dt, bytes });
    };
    let s_in = 1.0 / (c as f32).sqrt();
    let s_out = s_in / (2.0 * n_layer as f32).sqrt();
    add("backbone.embeddings.weight".into(), vec![vocab, c], &mut |r, _| r.uniform(-0.035, 0.035));
    for l in 0..n_layer {
        let p = format!("backbone.blocks.{l}.");
        for nm in ["norm_mlstm", "norm_ffn"] {
            add(format!("{p}{nm}.weight"), vec![c], &mut |_, _| 1.0);
        }
        let m = format!("{p}mlstm_layer.");
        for (pr, rows) in [("q", qk), ("k", qk), ("v", vd), ("ogate_preact", vd)] {
            add(format!("{m}{pr}.weight"), vec![rows, c], &mut |r, _| r.uniform(-s_in, s_in));
        }
        for g in ["igate_preact", "fgate_preact"] {
            add(format!("{m}{g}.weight"), vec![nh, c], &mut |r, _| r.uniform(-s_in, s_in));
        }
        add(format!("{m}igate_preact.bias"), vec![nh], &mut |_, _| -10.0);
        let span = (nh.max(2) - 1) as f32;
        add(format!("{m}fgate_preact.bias"), vec![nh], &mut |_, i| 3.0 + 3.0 * i as f32 / span);
        add(format!("{m}multihead_norm.weight"), vec![vd], &mut |_, _| 1.0);
        add(format!("{m}out_proj.weight"), vec![c, vd], &mut |r, _| r.uniform(-s_out, s_out));
        for pr in ["proj_up_gate", "proj_up"] {
            add(format!("{p}ffn.{pr}.weight"), vec![im, c], &mut |r, _| r.uniform(-s_in, s_in));
        }
        let sd = 1.0 / (im as f32).sqrt() / (2.0 * n_layer as f32).sqrt();
        add(format!("{p}ffn.proj_down.weight"), vec![c, im], &mut |r, _| r.uniform(-sd, sd));
    }
    add("backbone.out_norm.weight".into(), vec![c], &mut |_, _| 1.0);
    add("lm_head.weight".into(), vec![vocab, c], &mut |r, _| r.uniform(-s_in, s_in));
    let config = serde_json::json!({
        "model_type": "xlstm", "architectures": ["xLSTMForCausalLM"],
        "hidden_size": c, "embedding_dim": c, "num_hidden_layers": n_layer, "num_blocks": n_layer,
        "num_heads": nh, "qk_dim_factor": 0.5, "v_dim_factor": 1.0, "ffn_proj_factor": 2.667,
        "ffn_round_up_to_multiple_of": 64, "use_bias": false, "add_out_norm": true, "weight_mode": "single",
        "gate_soft_cap": 15.0, "output_logit_soft_cap": 30.0, "norm_eps": 1e-6, "eps": 1e-6,
        "tie_word_embeddings": false, "vocab_size": vocab, "torch_dtype": torch_dtype(dt),
        "stuffed_synth": {"preset": preset, "seed": seed, "note": "UNTRAINED random weights, for speed and memory benchmarks only"},
    });
    write_dir(out, config, &tensors)
}
