//! `stuffed probe` flags.
use crate::eval::probe::{self, Options};
use crate::forget::ForgetSpec;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Model directory (or checkpoint file).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    input: super::InputArgs,
    /// Stop after N tokens of the stream.
    #[arg(long, value_parser = crate::text::parse_count)]
    max_tokens: Option<u64>,
    /// Write statistics every K tokens.
    #[arg(long, default_value = "128", value_parser = crate::text::parse_count)]
    every: u64,
    /// Layers to record (default: all), comma-separated.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Layers to plot, among those recorded, comma-separated (default: the first, middle and last
    /// recorded layer).
    #[arg(long, value_delimiter = ',')]
    plot_layers: Option<Vec<usize>>,
    /// Heads to record (default: all), comma-separated.
    #[arg(long, value_delimiter = ',')]
    heads: Option<Vec<usize>>,
    /// Positions (tokens consumed) at which to save the whole state, e.g. 8k,20k.
    #[arg(long, value_parser = super::values::positions)]
    snapshot_at: Option<super::values::Positions>,
    /// Draw the training length on the plots (and the default calibration of state-norm).
    #[arg(long, value_parser = crate::text::parse_count)]
    train_len: Option<u64>,
    /// Training-free forgetting (see `stuffed ppl --help`).
    #[arg(long, default_value = "none", value_parser = super::values::forget)]
    forget: ForgetSpec,
    /// Directory for the CSVs, plots, snapshots.safetensors and the checkpoint.
    #[arg(long, default_value = "probe-out")]
    out: PathBuf,
    /// Tokens per forward call (statistics are taken every K tokens regardless).
    #[arg(long, default_value_t = 512, value_parser = crate::text::parse_chunk)]
    chunk: usize,
    /// Tokenizer (a tokenizer.json or an RWKV World vocab .txt). Default: the model directory's
    /// tokenizer.json, or the shipped one of its family.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Write a resumable checkpoint at a report when this many seconds passed since the last one
    /// (0: never), so a killed probe loses at most that much work.
    #[arg(long, default_value_t = 600.0)]
    checkpoint_secs: f64,
    /// Continue from the checkpoint in --out (same model, inputs and options); with none yet,
    /// start the probe and say so.
    #[arg(long)]
    resume: bool,
    /// Discard a checkpoint left in --out by an unfinished probe (without this or --resume, one
    /// there is refused rather than lost).
    #[arg(long)]
    overwrite: bool,
    /// Stop (with a checkpoint) at the first report at or after N tokens, for batch jobs with time
    /// limits; --resume continues.
    #[arg(long, value_parser = crate::text::parse_count)]
    stop_after: Option<u64>,
    #[command(flatten)]
    device: super::DeviceArgs,
    #[command(flatten)]
    state: super::StateArgs,
}

pub fn run(a: ProbeArgs) -> Result<()> {
    let inputs = a.input.inputs("probe")?;
    let checkpoint_secs = super::checkpoint_secs("probe", a.checkpoint_secs)?;
    let snapshot_at = a.snapshot_at.map(|p| p.0).unwrap_or_default();
    let o = Options {
        every: a.every,
        max_tokens: a.max_tokens,
        layers: a.layers,
        plot_layers: a.plot_layers,
        heads: a.heads,
        snapshot_at,
        train_len: a.train_len,
        forget: a.forget.resolved(a.train_len)?,
        chunk: a.chunk,
        tokenizer: a.tokenizer,
        device: a.device.device,
        gpu: a.device.gpu()?,
        state: a.state.precision(a.device.device)?,
        checkpoint_secs,
        stop_after: a.stop_after,
    };
    probe::run(&a.model, &inputs, &o, &a.out, crate::eval::Continue::from_flags(a.resume, a.overwrite)?)
}
