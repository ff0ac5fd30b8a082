//! `stuffed passkey` and `stuffed merge` flags.
use crate::eval::passkey::{self, Options, TemplateName};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PasskeyArgs {
    /// Model directory (or checkpoint file).
    #[arg(long)]
    model: PathBuf,
    /// Target prompt lengths in tokens: `1k,2k,8k`, `1k..32k:1k`, `1k..1m:x2` (k = 1,024, m = 1,048,576).
    #[arg(long, value_parser = super::values::lengths)]
    lengths: super::values::Lengths,
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
    /// Tokens decoded greedily after the prompt. Default: the most ids a key of the grid takes
    /// under the model's tokenizer, plus one.
    #[arg(long)]
    max_new: Option<usize>,
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
    #[arg(long, value_parser = super::values::shard)]
    shard: Option<super::values::Shard>,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512, value_parser = crate::text::parse_chunk)]
    chunk: usize,
    /// Tokenizer (a tokenizer.json or an RWKV World vocab .txt). Default: the model directory's
    /// tokenizer.json, or the shipped one of its family.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run every sample from the zero state (no shared haystack; with --oprm, every chunk of every
    /// sample): slower, for checking reuse.
    #[arg(long)]
    no_reuse: bool,
    /// OPRM (Ben-Kish et al. 2025, arXiv 2505.07793): cut each prompt's context into chunks of
    /// this many tokens, run each from the zero state between the prompt's prefix and its
    /// question, and answer from the chunk whose first answer token has the least entropy (or, with
    /// --oprm-select query, after which the question is the most likely). The
    /// prefix, context and question are tokenized alone, as the paper's code does; a chunk whose
    /// ids were run before in the grid runs again only to become the best (--no-reuse: every
    /// chunk runs). Records say which chunk answered and which held the needle.
    #[arg(long, value_parser = crate::text::parse_chunk)]
    oprm: Option<usize>,
    /// OPRM's rule for the chunk that answers: `entropy` (the least entropy of the first answer
    /// token) or `query` (the paper's other rule: the chunk after which the question is the most
    /// likely, the least NLL of its tokens after [prefix, chunk]).
    #[arg(long, value_enum, default_value_t = passkey::OprmSelect::Entropy, requires = "oprm")]
    oprm_select: passkey::OprmSelect,
    /// OPRM's IDK filter (the paper's code, for instruction-tuned models): the question asks the
    /// model to answer WORD (default "Error") when the key is not in the text, and a chunk whose
    /// greedy first answer token begins WORD answers only if every chunk's does. Records count
    /// those chunks (`idk_chunks`).
    #[arg(long, value_name = "WORD", num_args = 0..=1, default_missing_value = "Error", requires = "oprm")]
    oprm_idk: Option<String>,
    /// JRT-Prompt (Arora et al., "Just read twice", 2024): the context (the blocks, the needle among
    /// them) twice, a newline between, then the question, as their `*_twice` tasks build prompts.
    /// `--lengths` stays the context's length without the repeat, so prompts are about twice as
    /// long; records give the second copy's position (`needle_pos_again`).
    #[arg(long)]
    jrt: bool,
    /// Training-free forgetting (see `stuffed ppl --help`); state-norm needs calib=N here. Also
    /// decimamba:layers=L[/L2…][,base=6000,beta=0.5,min=20,last=1] (Mamba-1/2, DeciMamba: in each
    /// decimating layer only the prompt's K tokens of largest Δ norm go on; each prompt runs alone,
    /// one pass per decimating layer + 1).
    #[arg(long, default_value = "none", value_parser = super::values::forget)]
    forget: crate::forget::ForgetSpec,
    #[command(flatten)]
    device: super::DeviceArgs,
    #[command(flatten)]
    state: super::StateArgs,
}

pub fn run(a: PasskeyArgs) -> Result<()> {
    let lengths = a.lengths.0;
    if let Some(d) = &a.depths {
        if d.is_empty() || d.iter().any(|v| !(0.0..=1.0).contains(v)) {
            bail!("--depths: each depth must be in [0, 1]");
        }
    }
    if a.samples == 0 || a.chunk == 0 || a.max_new == Some(0) || a.oprm == Some(0) {
        bail!("--samples, --chunk, --max-new and --oprm must be positive");
    }
    if a.samples > 1 << 20 {
        bail!("--samples {}: at most 1,048,576 a length", a.samples);
    }
    let shard = a.shard.map(super::values::Shard::pair);
    let o = Options {
        lengths,
        samples: a.samples,
        depths: a.depths,
        template: a.template,
        seed: a.seed,
        max_new: 0,
        max_new_note: None,
        bos: a.bos,
        chunk: a.chunk,
        tokenizer: a.tokenizer,
        reuse: !a.no_reuse,
        forget: a.forget.resolved(None)?,
        device: a.device.device,
        gpu: a.device.gpu()?,
        state: a.state.precision(a.device.device)?,
        oprm: a.oprm.map(|chunk| passkey::Oprm { chunk, select: a.oprm_select, idk: a.oprm_idk.clone() }),
        jrt: a.jrt,
    };
    let mut o = o;
    let tok = crate::tokenizer::Tokenizer::for_model(Some(&crate::model::dir_of(&a.model)), o.tokenizer.as_deref())?;
    let longest = passkey::longest_key_ids(&tok, &o)?;
    drop(tok);
    o.max_new = a.max_new.unwrap_or(longest + 1);
    if a.max_new.is_none() {
        o.max_new_note = Some(format!(
            "--max-new {} by default: the grid's longest key is {longest} ids under this tokenizer, + 1",
            o.max_new
        ));
    } else if o.max_new < longest {
        eprintln!(
            "passkey: warning: --max-new {} is shorter than the grid's longest key ({longest} ids): such answers are cut and scored wrong",
            o.max_new
        );
    }
    let cont = crate::eval::Continue::from_flags(a.resume, a.overwrite)?;
    passkey::run(&a.model, &o, &a.out, cont, shard, super::checkpoint_secs("passkey", a.checkpoint_secs)?)?;
    if let Some(note) = &o.max_new_note {
        println!("passkey: {note}");
    }
    print_accuracy_table(&a.out)?;
    println!("wrote {}/results.jsonl, summary.json, summary.csv, heatmap.svg, last_r.svg", a.out.display());
    Ok(())
}

/// The grid's accuracy (%) from `dir`/summary.json: a row per depth bin, a column per length, and
/// each length's accuracy over all depths ("-": no sample).
pub fn print_accuracy_table(dir: &std::path::Path) -> Result<()> {
    let path = dir.join("summary.json");
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
    let empty = Vec::new();
    let (per_length, cells) = (
        v["accuracy_per_length"].as_array().unwrap_or(&empty),
        v["accuracy_per_length_depth"].as_array().unwrap_or(&empty),
    );
    let lengths: Vec<u64> = per_length.iter().filter_map(|r| r["length"].as_u64()).collect();
    let mut bins: Vec<(f64, f64)> = Vec::new();
    for c in cells {
        let b = (c["depth_lo"].as_f64().unwrap_or(f64::NAN), c["depth_hi"].as_f64().unwrap_or(f64::NAN));
        if !bins.contains(&b) {
            bins.push(b);
        }
    }
    let pct = |a: &serde_json::Value| a.as_f64().map_or("-".to_string(), |a| format!("{:.0}", a * 100.0));
    let fmt = crate::report::svg::fmt_tokens;
    println!("accuracy (%) by needle depth (rows) and prompt length (columns):");
    let head: String = lengths.iter().map(|&l| format!("{:>7}", fmt(l))).collect();
    println!("{:>11}{head}", "depth");
    for b in &bins {
        let label = if b.0 == b.1 { format!("{:.2}", b.0) } else { format!("{:.2}–{:.2}", b.0, b.1) };
        let row: String = lengths
            .iter()
            .map(|&l| {
                let c = cells.iter().find(|c| {
                    c["length"].as_u64() == Some(l)
                        && c["depth_lo"].as_f64() == Some(b.0)
                        && c["depth_hi"].as_f64() == Some(b.1)
                });
                format!("{:>7}", c.map_or("-".to_string(), |c| pct(&c["accuracy"])))
            })
            .collect();
        println!("{label:>11}{row}");
    }
    let all: String = per_length.iter().map(|r| format!("{:>7}", pct(&r["accuracy"]))).collect();
    println!("{:>11}{all}", "all");
    if per_length.iter().any(|r| r.get("oprm_chose_needle").is_some()) {
        let chose: String = per_length.iter().map(|r| format!("{:>7}", pct(&r["oprm_chose_needle"]))).collect();
        println!("{:>11}{chose}   (% of samples whose answering OPRM chunk held the needle or part of it)", "needle");
    }
    if per_length.iter().any(|r| r.get("decimamba_needle_share").is_some()) {
        let row = |k: &str| per_length.iter().map(|r| format!("{:>7}", pct(&r[k]))).collect::<String>();
        let last = "past the last decimating layer";
        println!(
            "{:>11}{}   (% of the needle's tokens that went on {last}, mean)",
            "needle",
            row("decimamba_needle_share")
        );
        println!(
            "{:>11}{}   (% of samples whose whole question went on {last})",
            "question",
            row("decimamba_question_whole")
        );
    }
    if per_length.iter().any(|r| r.get("oprm_idk_chunks").is_some()) {
        let said: String = per_length.iter().map(|r| format!("{:>7}", pct(&r["oprm_idk_chunks"]))).collect();
        println!("{:>11}{said}   (% of OPRM chunks whose first answer token said the IDK word)", "idk");
    }
    Ok(())
}
