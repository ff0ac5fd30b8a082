//! `stuffed passkey` and `stuffed merge` flags.
use crate::eval::passkey::{self, parse_lengths, parse_shard, Options, TemplateName};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PasskeyArgs {
    /// Model directory (or checkpoint file).
    #[arg(long)]
    model: PathBuf,
    /// Target prompt lengths in tokens: `1k,2k,8k`, `1k..32k:1k`, `1k..1m:x2` (k = 1,024, m = 1,048,576).
    #[arg(long)]
    lengths: String,
    /// Samples per length, at depths (i + 0.5)/n.
    #[arg(long, default_value_t = 20, conflicts_with = "depths")]
    samples: usize,
    /// Explicit needle depths in [0, 1], comma-separated (instead of --samples).
    #[arg(long, value_delimiter = ',')]
    depths: Option<Vec<f64>>,
    /// The prompt's wording (SPEC.md §2.2).
    #[arg(long, value_enum, default_value_t = TemplateName::Code)]
    template: TemplateName,
    /// Seed of the 5-digit keys: one key per (seed, length, sample), whatever the sharding.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens decoded greedily after the prompt.
    #[arg(long, default_value_t = 5)]
    max_new: usize,
    /// Start the prompt with <|endoftext|>.
    #[arg(long)]
    bos: bool,
    /// Directory for results.jsonl, summary.json, summary.csv, heatmap.svg and last_r.svg.
    #[arg(long, default_value = "passkey-out")]
    out: PathBuf,
    /// Skip samples already in --out/results.jsonl, and continue the haystack's stream from the
    /// checkpoint when there is one (with neither, start the grid and say so). A grid made with
    /// another model, template, seed, lengths or options is refused, saying what differs.
    #[arg(long)]
    resume: bool,
    /// Discard an unfinished grid left in --out (its checkpoint and records); without this or
    /// --resume one there is refused rather than lost.
    #[arg(long)]
    overwrite: bool,
    /// Checkpoint the haystack's stream and the running sample when this many seconds passed since
    /// the last checkpoint (0: never), so a killed grid loses at most that much of either; finished
    /// samples are never lost.
    #[arg(long, default_value_t = 600.0)]
    checkpoint_secs: f64,
    /// Run a deterministic share k/n of the (length, sample) pairs (merge shards with `stuffed merge`).
    #[arg(long)]
    shard: Option<String>,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Tokenizer (a tokenizer.json or an RWKV World vocab .txt). Default: the model directory's
    /// tokenizer.json, or the shipped one of its family.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run every sample from the zero state (no shared haystack): slower, for checking reuse.
    #[arg(long)]
    no_reuse: bool,
    /// Training-free forgetting (see `stuffed ppl --help`); state-norm needs calib=N here.
    #[arg(long, default_value = "none")]
    forget: String,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub fn run(a: PasskeyArgs) -> Result<()> {
    let lengths = parse_lengths(&a.lengths)?;
    if let Some(d) = &a.depths {
        if d.is_empty() || d.iter().any(|v| !(0.0..=1.0).contains(v)) {
            bail!("--depths: each depth must be in [0, 1]");
        }
    }
    if a.samples == 0 || a.chunk == 0 || a.max_new == 0 {
        bail!("--samples, --chunk and --max-new must be positive");
    }
    if a.samples > 1 << 20 {
        bail!("--samples {}: at most 1,048,576 a length", a.samples);
    }
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    let o = Options {
        lengths,
        samples: a.samples,
        depths: a.depths,
        template: a.template,
        seed: a.seed,
        max_new: a.max_new,
        bos: a.bos,
        chunk: a.chunk,
        tokenizer: a.tokenizer,
        reuse: !a.no_reuse,
        forget: crate::forget::ForgetSpec::parse(&a.forget)?.resolved(None)?,
        device: a.device.device,
        gpu: a.device.gpu()?,
    };
    passkey::run(
        &a.model,
        &o,
        &a.out,
        crate::eval::Continue::from_flags(a.resume, a.overwrite)?,
        shard,
        super::checkpoint_secs("passkey", a.checkpoint_secs)?,
    )?;
    println!("wrote {}/results.jsonl, summary.json, summary.csv, heatmap.svg, last_r.svg", a.out.display());
    Ok(())
}
