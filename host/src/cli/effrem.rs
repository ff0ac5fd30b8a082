//! `stuffed effrem` flags.
use crate::eval::effrem::{self, Options};
use anyhow::{anyhow, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EffremArgs {
    /// Model directory (or checkpoint file), any family.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    input: super::InputArgs,
    /// Targets: the prediction after T tokens, in the syntax of `passkey --lengths` (`2k,8k`,
    /// `1k..64k:x2`).
    #[arg(long, value_parser = super::values::positions)]
    at: super::values::Positions,
    /// Starts: the truncated contexts drop the first t tokens (same syntax); each runs once per
    /// sequence and serves every target past it. Default: --points.
    #[arg(long, value_parser = super::values::positions, conflicts_with = "points")]
    starts: Option<super::values::Positions>,
    /// Without --starts: each target T's starts T·j/N, j = 1 … N−1 (all targets' merged).
    #[arg(long, default_value_t = 16)]
    points: usize,
    /// Instead of starts: the kept contexts T − t of every target (`64,256,1k,4k`, or
    /// `32..32k:x2`; those ≥ T are skipped): the plot's x axis, at the lengths you choose.
    #[arg(long, value_parser = super::values::positions, conflicts_with_all = ["starts", "points"])]
    kept: Option<super::values::Positions>,
    /// Sequences: consecutive windows of the largest target's length from the start of the text,
    /// each from the zero state; the distances are averaged over them.
    #[arg(long, default_value_t = 4)]
    sequences: usize,
    /// A training-free forgetting method both runs use (see `stuffed ppl --forget`).
    #[arg(long, default_value = "none", value_parser = super::values::forget)]
    forget: crate::forget::ForgetSpec,
    /// The model's training length: a line on the plot where the kept context equals it (and
    /// state-norm's default calibration length).
    #[arg(long, value_parser = crate::text::parse_count)]
    train_len: Option<u64>,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512, value_parser = crate::text::parse_chunk)]
    chunk: usize,
    /// Tokenizer (default: the model's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Directory for effrem.json, effrem.csv and effrem.svg (and the checkpoint, written after
    /// every sequence × start).
    #[arg(long, default_value = "effrem-out")]
    out: PathBuf,
    #[command(flatten)]
    restart: super::Restart,
    /// Stop (with the checkpoint) after this many sequence × start runs; --resume continues.
    #[arg(long)]
    stop_after: Option<usize>,
}

pub fn run(a: EffremArgs) -> Result<()> {
    let inputs = a.input.inputs("effrem")?;
    let usize_of = |v: &[u64], flag: &str| -> Result<Vec<usize>> {
        v.iter().map(|&x| usize::try_from(x).map_err(|_| anyhow!("{flag} {x}: too long"))).collect()
    };
    let at = usize_of(&a.at.0, "--at")?;
    let starts = match (&a.starts, &a.kept) {
        (Some(s), _) => usize_of(&s.0, "--starts")?,
        (None, Some(k)) => Options::kept(&at, &usize_of(&k.0, "--kept")?),
        (None, None) if a.points >= 2 => Options::points(&at, a.points),
        (None, None) => anyhow::bail!("effrem: --points must be ≥ 2"),
    };
    let o = Options {
        at,
        starts,
        sequences: a.sequences,
        forget: a.forget.resolved(a.train_len)?,
        train_len: a.train_len,
        chunk: a.chunk,
        tokenizer: a.tokenizer,
        stop_after: a.stop_after,
    };
    effrem::run(&a.model, &inputs, &o, &a.out, a.restart.cont()?)
}
