//! `stuffed ppl` flags.
use crate::eval::ppl::{self, Options};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PplArgs {
    /// Model directory; repeat to compare models on one plot.
    #[arg(long)]
    model: Vec<PathBuf>,
    #[command(flatten)]
    input: super::InputArgs,
    /// Cut each document (or the concatenated stream) at N tokens (5000, 64k, 1m: every count
    /// takes k = 1,024 and m = 1,048,576).
    #[arg(long, value_parser = crate::text::parse_count)]
    max_tokens: Option<u64>,
    /// Stream all documents as one sequence (the paper's code) instead of each from the zero state.
    #[arg(long)]
    concat: bool,
    /// Repeat each document (or the stream) up to N tokens.
    #[arg(long, value_parser = crate::text::parse_count)]
    repeat_to: Option<u64>,
    /// Width of the linear buckets, in tokens.
    #[arg(long, default_value = "512", value_parser = crate::text::parse_count)]
    bucket: u64,
    /// The model's training length: draws a line on the plot and gives the T_forget verdict.
    #[arg(long, value_parser = crate::text::parse_count)]
    train_len: Option<u64>,
    /// Directory for results.json, loss.csv, loss.svg and the checkpoint.
    #[arg(long, default_value = "ppl-out")]
    out: PathBuf,
    /// Stream per-position NLL (raw little-endian f32, positions 1, 2, …) to this file or directory.
    #[arg(long)]
    nll_out: Option<PathBuf>,
    /// Write a resumable checkpoint every N tokens.
    #[arg(long, value_parser = crate::text::parse_count)]
    checkpoint_every: Option<u64>,
    /// Also write one when this many seconds passed since the last (0: only by tokens), so a killed
    /// run loses at most that much work; --resume continues it.
    #[arg(long, default_value_t = 600.0)]
    checkpoint_secs: f64,
    /// Score only the documents i with i mod n = k − 1 (k/n, 1 ≤ k ≤ n: one share of an array
    /// job); `stuffed merge --out DIR SHARD_DIRS…` pools the shards into the unsharded result.
    #[arg(long, value_parser = super::values::shard)]
    shard: Option<super::values::Shard>,
    /// Continue from the checkpoint in --out (with none yet, start the run and say so).
    #[arg(long)]
    resume: bool,
    /// Discard a checkpoint left in --out by an unfinished run (without this or --resume, one there
    /// is refused rather than lost).
    #[arg(long)]
    overwrite: bool,
    /// Stop (with a checkpoint) after N tokens, for batch jobs with time limits.
    #[arg(long, value_parser = crate::text::parse_count)]
    stop_after: Option<u64>,
    /// Tokens per forward call (1 = token by token).
    #[arg(long, default_value_t = 512, value_parser = crate::text::parse_chunk)]
    chunk: usize,
    /// Tokenizer (a tokenizer.json or an RWKV World vocab .txt). Default: the model directory's
    /// tokenizer.json, or the shipped one of its family.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Plot against log2(position), from the power-of-two buckets.
    #[arg(long)]
    log_x: bool,
    /// Training-free forgetting: none, rri:a=0.9999,b=0.75, rri-both:a=…,b=… (DeltaNet, GDN),
    /// dt:c=0.5, decay:s=0.5 (Mamba-1/2: A′ = s·A), window:r=N, staggered:r=N (RWKV-7, DeltaNet, GDN),
    /// state-norm:every=128[,calib=T] (calib defaults to --train-len), reset:every=N,
    /// longmamba:file=longmamba.json[,b=1,c=0.05,min=3000] (Mamba-2; `stuffed longmamba` writes
    /// the file; a stream is a prompt of unknown length: filtered from its first token);
    /// decimamba (DeciMamba) is `passkey`'s only: it ranks a whole prompt's tokens.
    /// Repeat to compare methods: every model runs under each, one curve per run.
    #[arg(long, default_value = "none", value_parser = super::values::forget)]
    forget: Vec<crate::forget::ForgetSpec>,
    #[command(flatten)]
    device: super::DeviceArgs,
    #[command(flatten)]
    state: super::StateArgs,
    /// Stream a second copy of each run with the state in this type (f32 against a --state-dtype
    /// bf16 run) over the same tokens: per bucket both mean NLLs, ΔNLL with its standard error and
    /// the mean KL(p_this ‖ p_state-dtype), into drift.csv and drift.svg. Keeps no checkpoint.
    #[arg(long, value_enum)]
    vs_state: Option<crate::state_dtype::StateDtype>,
    /// Stream a reference model over the same tokens beside each run (the same model in another
    /// format, dtype or implementation; any model with the same vocabulary): per bucket both mean
    /// NLLs, ΔNLL = NLL(this) − NLL(reference) with its standard error and the mean
    /// KL(p_reference ‖ p_this), into drift.csv and drift.svg. CPU only; keeps no checkpoint.
    #[arg(long, conflicts_with = "vs_state")]
    vs_model: Option<PathBuf>,
}

pub fn run(mut a: PplArgs) -> Result<()> {
    let mut cont = crate::eval::Continue::from_flags(a.resume, a.overwrite)?;
    let default_run = a.model.is_empty() && a.input.is_empty();
    let inputs = if default_run {
        // The shipped default: the short- and long-trained tiny pair on the held-out novel.
        let (models, text) = crate::defaults::materialize()?;
        eprintln!(
            "ppl: no --model and no --text: running the shipped pair (trained on 64- and 2,048-token windows) on {}",
            text.display()
        );
        a.model = models;
        a.log_x = true;
        // The no-argument run continues its own checkpoint, if an earlier one was killed.
        if cont == crate::eval::Continue::Refuse {
            cont = crate::eval::Continue::Auto;
        }
        vec![crate::text::Input::File(text)]
    } else if a.model.is_empty() {
        bail!("ppl: give --model DIR (repeat it to compare models)");
    } else {
        a.input.inputs("ppl")?
    };
    if a.chunk == 0 {
        bail!("ppl: --chunk must be positive");
    }
    let checkpoint_secs = super::checkpoint_secs("ppl", a.checkpoint_secs)?;
    if a.shard.is_some() && a.concat {
        bail!("ppl: --shard splits documents; with --concat there is one");
    }
    let forget = a.forget.iter().map(|f| f.resolved(a.train_len)).collect::<Result<Vec<_>>>()?;
    let state = a.state.precision(a.device.device)?;
    if let Some(vs) = a.vs_state {
        if vs == state.dtype {
            bail!("ppl: --vs-state {vs} is the run's own --state-dtype; compare two different types");
        }
        crate::state_dtype::StatePrecision { dtype: vs, ..state }.check_cpu(a.device.device)?;
    }
    if let Some(flag) = [(a.vs_state.is_some(), "--vs-state"), (a.vs_model.is_some(), "--vs-model")]
        .iter()
        .find_map(|&(on, flag)| on.then_some(flag))
    {
        if a.device.device != crate::backend::Device::Cpu {
            bail!("ppl: {flag} runs on the CPU only");
        }
        let no_ckpt = [
            (a.resume, "--resume"),
            (a.stop_after.is_some(), "--stop-after"),
            (a.checkpoint_every.is_some(), "--checkpoint-every"),
            (a.shard.is_some(), "--shard"),
            (a.nll_out.is_some(), "--nll-out"),
        ];
        if let Some((_, no)) = no_ckpt.iter().find(|(on, _)| *on) {
            bail!("ppl: {flag} runs two streams in one pass and keeps no checkpoint; it does not take {no}");
        }
    }
    let o = Options {
        chunk: a.chunk,
        bucket: a.bucket,
        train_len: a.train_len,
        max_tokens: a.max_tokens,
        concat: a.concat,
        repeat_to: a.repeat_to,
        checkpoint_every: a.checkpoint_every,
        checkpoint_secs,
        shard: a.shard.map(super::values::Shard::pair),
        stop_after: a.stop_after,
        nll_out: a.nll_out,
        tokenizer: a.tokenizer,
        log_x: a.log_x,
        forget,
        device: a.device.device,
        gpu: a.device.gpu()?,
        state,
        vs_state: a.vs_state,
        vs_model: a.vs_model,
    };
    let runs = ppl::run(&a.model, &inputs, &o, &a.out, cont)?;
    for r in &runs {
        // Rows name the model by its directory (the shipped pair lives in a cache) and the method.
        println!(
            "{}: {} tokens scored, mean NLL {:.4} (ppl {:.2}), {:.0} tok/s",
            r.label(),
            r.tokens_scored,
            r.mean_nll,
            r.ppl,
            r.tokens_per_s
        );
        if let Some(d) = &r.drift {
            let last = d.buckets_log2.last();
            println!(
                "{}: against {} over {} tokens: last log2 bucket ΔNLL {:+.3e} ± {:.1e}, KL {:.3e}; \
                 mean ΔNLL > 0.01 nats {}, > 0.1 nats {}",
                r.label(),
                if o.vs_model.is_some() { format!("model {}", d.reference) } else { format!("state {}", d.reference) },
                d.evaluated_len,
                last.map_or(f64::NAN, |b| b.delta_nll),
                last.map_or(f64::NAN, |b| b.delta_stderr),
                last.map_or(f64::NAN, |b| b.kl),
                crate::eval::ppl::Drift::first_over_text(d.first_over_0_01, d.evaluated_len),
                crate::eval::ppl::Drift::first_over_text(d.first_over_0_1, d.evaluated_len),
            );
        }
        if let Some(v) = &r.t_forget {
            let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.4}"));
            println!(
                "{}: T_forget (train len {}, buckets of {}): L_in {}, L_out {} → {} ({})",
                r.label(),
                v.train_len,
                v.bucket_width,
                f(v.l_in),
                f(v.l_out),
                v.verdict,
                v.note
            );
            let m = |m: &Option<crate::eval::ppl::Margin>| {
                m.as_ref().map_or("margin -".into(), |m| {
                    format!("margin L_out/(2·L_in) {:.4} [{:.4}, {:.4}] → {}", m.ratio, m.lo, m.hi, m.verdict)
                })
            };
            println!(
                "{}: paper: L_in ± {}, L_out ± {} (bucket standard errors); {} (95% block bootstrap, seed {})",
                r.label(),
                f(v.l_in_stderr),
                f(v.l_out_stderr),
                m(&v.margin),
                crate::eval::ppl::BOOTSTRAP.0
            );
            if let Some(q) = &v.robust {
                println!(
                    "{}: {} (90th percentile of the bucket means on each side): L_in {}, L_out {} → {}; {}",
                    r.label(),
                    q.name,
                    f(q.l_in),
                    f(q.l_out),
                    q.verdict,
                    m(&q.margin)
                );
            }
            if let Some(l) = crate::eval::laws::laws_of(&r.model).filter(|l| l.in_range) {
                println!(
                    "{}: SPEC.md §3's fit predicts \"{}\" (T_forget = {:.1}K tokens at N_S {:.2}M)",
                    r.label(),
                    l.verdict(v.train_len),
                    l.t_forget_k,
                    l.n_s_millions
                );
            }
        }
    }
    let two = o.vs_state.is_some() || o.vs_model.is_some();
    if runs.len() == a.model.len() * if two { 2 } else { 1 } {
        let logx = if o.log_x { "" } else { ", loss_logx.svg" };
        let drift = if two { ", drift.csv, drift.svg" } else { "" };
        println!("wrote {}/results.json, loss.csv, loss.svg{logx}{drift}", a.out.display());
    }
    Ok(())
}
