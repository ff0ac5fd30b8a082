//! `stuffed calibrate` flags.
use crate::eval::calibrate::{self, Method, Objective, Options};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Model directory (or checkpoint file): any family with a decay for `dt`, Mamba-1/2 for `decay`.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    input: super::InputArgs,
    /// Which factor each layer gets: dt (Δ′ = s_ℓ·Δ, MambaExtend; the other families' log
    /// decay, log w′ = s_ℓ·log w) or decay (A′ = s_ℓ·A, Mamba-Modulation; Mamba-1/2).
    #[arg(long, value_enum, default_value = "dt")]
    method: Method,
    /// What the factors lower: the text's loss (MambaExtend's perplexity), or the passkey's loss
    /// after passkey prompts of --length tokens (no --text needed).
    #[arg(long, value_enum, default_value = "text")]
    objective: Objective,
    /// The passkey prompts' template (see `stuffed passkey --template`).
    #[arg(long, value_enum, default_value = "code")]
    template: crate::eval::passkey::TemplateName,
    /// Tokens per calibration window (or passkey prompt): the length to extend to.
    #[arg(long, value_parser = crate::text::parse_count)]
    length: u64,
    /// Calibration windows, consecutive from the start of the text (or passkey prompts).
    #[arg(long, default_value_t = 4)]
    windows: usize,
    /// SPSA steps (three loss evaluations each, after the start's grid).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Step size on the gradient estimate over ln s (nats per token per unit of ln s), decayed
    /// as cos(kπ / 2·steps).
    #[arg(long, default_value_t = 0.5)]
    lr: f64,
    /// Perturbation of each ln s at step 0 (0.1: ×1.105), shrinking as (1 + k)^−0.1.
    #[arg(long, default_value_t = 0.1)]
    perturb: f64,
    /// The smallest factor (MambaExtend: 0.01).
    #[arg(long, default_value_t = 0.01)]
    min_factor: f64,
    /// The factor every layer starts from (default: the best of 2⁻⁶ … 2², every layer alike).
    #[arg(long)]
    init: Option<f64>,
    /// Seeds the perturbation signs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512, value_parser = crate::text::parse_chunk)]
    chunk: usize,
    /// Tokenizer (default: the model's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Directory for calibrate.json (and the checkpoint, written after every step).
    #[arg(long, default_value = "calibrate-out")]
    out: PathBuf,
    #[command(flatten)]
    restart: super::Restart,
    /// Stop (with the checkpoint) after this many steps, for batch jobs with time limits;
    /// --resume continues.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Held-out text files: at the end, the loss of no factors, of the grid's best uniform factor
    /// and of the calibrated factors on its first --windows windows (in calibrate.json's
    /// `validation`), with a warning when the uniform factor does better.
    #[arg(long, num_args = 1..)]
    validate: Vec<PathBuf>,
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    let inputs = match (a.objective, a.input.is_empty()) {
        (Objective::Text, true) => anyhow::bail!("calibrate: give the calibration text (--text FILE)"),
        (Objective::Passkey, false) => anyhow::bail!("calibrate --objective passkey builds its own prompts: no --text"),
        (Objective::Passkey, true) => Vec::new(),
        (Objective::Text, false) => a.input.inputs("calibrate")?,
    };
    let length = usize::try_from(a.length).map_err(|_| anyhow::anyhow!("--length {}: too long", a.length))?;
    let o = Options {
        method: a.method,
        objective: a.objective,
        template: a.template,
        length,
        windows: a.windows,
        steps: a.steps,
        lr: a.lr,
        perturb: a.perturb,
        min_factor: a.min_factor,
        init: a.init,
        seed: a.seed,
        chunk: a.chunk,
        tokenizer: a.tokenizer,
        stop_after: a.stop_after,
        validate: a
            .validate
            .iter()
            .map(|p| match p.is_file() {
                true => Ok(crate::text::Input::File(p.clone())),
                false => Err(anyhow::anyhow!("{}: --validate: text file not found", p.display())),
            })
            .collect::<Result<_>>()?,
    };
    calibrate::run(&a.model, &inputs, &o, &a.out, a.restart.cont()?)
}
