//! `stuffed longmamba` flags.
use crate::eval::longmamba::{self, Aggregate, Options};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct LongMambaArgs {
    /// Mamba-2 model directory (or checkpoint file).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    input: super::InputArgs,
    /// Tokens per calibration window: the model's training length (LongMamba: 2,000 for Mamba-2).
    #[arg(long, value_parser = crate::text::parse_count)]
    train_len: u64,
    /// The lengths to extend to (one, or a list: 2k,4k,8k): each head's threshold keeps, of a
    /// stream this long, about as much Δ as a training window holds. At use, a prompt takes the
    /// nearest target's thresholds (as LongMamba's grid of lengths), a stream of unknown length the
    /// longest's.
    #[arg(long, value_parser = super::values::lengths)]
    target: super::values::Lengths,
    /// Calibration windows, spread evenly through the text (LongMamba: 100).
    #[arg(long, default_value_t = 100)]
    windows: usize,
    /// The share of each window's largest Δ that the clamp flattens (LongMamba ablates 0.10, 0.15,
    /// 0.20).
    #[arg(long, default_value_t = 0.15)]
    top: f64,
    /// How the windows' retentions and thresholds combine (LongMamba's script writes both).
    #[arg(long, value_enum, default_value = "mean")]
    aggregate: Aggregate,
    /// Tokenizer (default: the model's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Directory for longmamba.json (and the checkpoint, written after every window).
    #[arg(long, default_value = "longmamba-out")]
    out: PathBuf,
    #[command(flatten)]
    restart: super::Restart,
    /// Stop (with the checkpoint) after this many windows; --resume continues.
    #[arg(long)]
    stop_after: Option<usize>,
}

pub fn run(a: LongMambaArgs) -> Result<()> {
    if a.input.is_empty() {
        anyhow::bail!("longmamba: give the calibration text (--text FILE)");
    }
    let inputs = a.input.inputs("longmamba")?;
    let len = |v: u64, flag: &str| usize::try_from(v).map_err(|_| anyhow::anyhow!("--{flag} {v}: too long"));
    let o = Options {
        train_len: len(a.train_len, "train-len")?,
        targets: a.target.0.iter().map(|&t| len(t, "target")).collect::<Result<Vec<_>>>()?,
        windows: a.windows,
        top: a.top,
        aggregate: a.aggregate,
        tokenizer: a.tokenizer,
        stop_after: a.stop_after,
    };
    longmamba::run(&a.model, &inputs, &o, &a.out, a.restart.cont()?)
}
