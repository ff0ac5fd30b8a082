//! `info`, `tokenize`, `logits`, `generate`.
use crate::checkpoint::Checkpoint;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::Path;

pub fn info(path: &Path, json: bool) -> Result<()> {
    let m = Model::load(path)?;
    let i = &m.info;
    let laws = crate::eval::laws::laws_of(i);
    // f32 matrices on the AMX level multiply as bf16 halves, made at first use (issue 22).
    let halves = m.split_bytes_at_most();
    if json {
        let mut v = serde_json::to_value(i)?;
        v["laws"] = serde_json::to_value(&laws)?;
        if halves > 0 {
            v["amx_f32_halves_bytes_at_most"] = halves.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model        {}", i.path.display());
    println!("family       {} ({})", i.family, i.format);
    if let Some(f) = &i.state_file {
        println!("start state  {} (--state-file)", f.display());
    }
    println!("dimensions   d_model {}, layers {}, {}", i.d_model, i.n_layer, i.layout);
    println!("parameters   {} ({:.1}M)", i.params, i.params as f64 / 1e6);
    println!("weights      {}, {} bytes", i.weight_dtype, i.weight_bytes);
    if halves > 0 {
        println!(
            "             on the AMX kernel (STUFFED_SIMD=amx) its f32 matrices multiply as bf16 hi + lo \
             halves, made at first use: up to {halves} bytes ({:.1} MiB) more",
            halves as f64 / (1u64 << 20) as f64
        );
    }
    println!(
        "state        {} bytes f32 per sequence; N_S = {} ({:.2}M, as the paper counts)",
        i.state_bytes,
        i.paper_state_size,
        i.paper_state_size as f64 / 1e6
    );
    if let Some(l) = laws {
        println!("laws         {l}");
    }
    let tok = match m.tokenizer(None) {
        Ok(t) => t,
        Err(e) => {
            // HGRN-2 without its tokenizer.json: the model itself is fine.
            println!("vocab        {} rows; no tokenizer ({e})", i.vocab_rows);
            return Ok(());
        }
    };
    println!(
        "vocab        {} rows (padded); {} real ids ({}){}",
        i.vocab_rows,
        m.real_vocab(&tok),
        tok.source,
        i.config_vocab.map_or(String::new(), |v| format!("; config vocab_size {v}"))
    );
    println!("embeddings   {}", if i.tied_embeddings { "tied" } else { "untied" });
    Ok(())
}

pub fn tokenize(
    model: Option<&Path>,
    tokenizer: Option<&Path>,
    text: Option<String>,
    file: Option<&Path>,
) -> Result<()> {
    let tok = Tokenizer::for_model(model.map(crate::model::dir_of).as_deref(), tokenizer)?;
    let text = match (text, file) {
        (Some(t), _) => t,
        (None, Some(f)) => read_text(f)?,
        (None, None) => bail!("tokenize: give --text or --file"),
    };
    let ids = tok.encode(&text)?;
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    print_out(&line.join(" "), true)
}

/// Writes to stdout; a closed pipe (`| head`) ends the command quietly instead of panicking.
pub fn print_out(text: &str, newline: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let r = out
        .write_all(text.as_bytes())
        .and_then(|_| if newline { out.write_all(b"\n") } else { Ok(()) })
        .and_then(|_| out.flush());
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

/// A UTF-8 text file, or a one-line error naming it.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 text ({e})", path.display()))
}

/// Token ids from a text file of integers, or a safetensors file holding `input_ids`.
pub fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let raw: Vec<i64> = if path.extension().is_some_and(|e| e == "safetensors") {
        let ck = Checkpoint::open(path)?;
        ck.require("input_ids")?.to_i64_vec()?
    } else {
        let text = String::from_utf8(bytes).map_err(|_| anyhow!("{}: ids file is not text", path.display()))?;
        text.split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, s)| {
                s.parse::<i64>().map_err(|_| anyhow!("{}: item {i} ('{s}') is not an integer token id", path.display()))
            })
            .collect::<Result<_>>()?
    };
    if raw.is_empty() {
        bail!("{}: no token ids", path.display());
    }
    raw.iter()
        .enumerate()
        .map(|(i, &v)| {
            u32::try_from(v)
                .map_err(|_| anyhow!("{}: token id {v} at position {i} is negative or too large", path.display()))
        })
        .collect()
}

pub fn logits(model: &Path, ids_path: &Path, out: &Path, chunk: usize, dev: &super::DeviceArgs) -> Result<()> {
    if chunk == 0 {
        bail!("logits: --chunk must be positive (1 runs token by token)");
    }
    // Checked before the run, so a typo in --out does not cost the computed logits.
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("{}: cannot write: {} is not a directory", out.display(), dir.display());
    }
    let m = Model::load(model)?;
    let ids = read_ids(ids_path)?;
    m.check_ids(&ids, &ids_path.display().to_string())?;
    let v = m.info.vocab_rows;
    let mut b = crate::backend::open(&m, chunk.min(ids.len()), v, dev.device, dev.gpu()?)?;
    let mut all = vec![0f32; ids.len() * v];
    let t0 = std::time::Instant::now();
    b.logits(&ids, &mut |start, rows| {
        all[start * v..start * v + rows.len()].copy_from_slice(rows);
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    write_f32(out, "logits", &[ids.len(), v], &all)?;
    eprintln!(
        "{} tokens in {:.3} s ({:.0} tok/s), chunk {}, on {}",
        ids.len(),
        secs,
        ids.len() as f64 / secs,
        b.chunk(),
        b.device_name()
    );
    Ok(())
}

/// Writes one f32 tensor to a safetensors file.
pub fn write_f32(path: &Path, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), bytes)
        .map_err(|e| anyhow!("{}: {e:?}", path.display()))?;
    safetensors::serialize_to_file([(name, view)], None, path)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    crate::report::set_created_mode(path)
}

pub fn generate(
    model: &Path,
    prompt: &str,
    max_new: usize,
    tokenizer: Option<&Path>,
    dev: &super::DeviceArgs,
    state: &super::StateArgs,
) -> Result<()> {
    let mut m = Model::load(model)?;
    m.state_precision = state.precision(dev.device)?;
    let tok = m.tokenizer(tokenizer)?;
    let ids = tok.encode(prompt)?;
    if ids.is_empty() {
        bail!("generate: the prompt is empty after tokenization");
    }
    m.check_ids(&ids, "prompt")?;
    let real = m.real_vocab(&tok);
    // Generation ends at the tokenizer's end of text (not printed).
    let eot = tok.token_id("<|endoftext|>");
    let mut b = crate::backend::open(&m, 256, real, dev.device, dev.gpu()?)?;
    b.feed(&ids)?;
    let (mut out, mut printed) = (Vec::new(), 0);
    b.greedy_each(max_new, &mut |next| {
        if Some(next) == eot {
            return Ok(false);
        }
        out.push(next);
        // Print whole characters only: a token may end mid-way through a UTF-8 sequence.
        let text = tok.decode(&out)?;
        if !text.ends_with('\u{FFFD}') {
            print_out(&text[printed.min(text.len())..], false)?;
            printed = text.len();
        }
        Ok(true)
    })?;
    print_out("", true)
}
