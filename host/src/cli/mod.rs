//! Command-line flags and the flow of each command.
pub mod basic;
mod bench;
mod calibrate;
mod effrem;
mod longmamba;
mod passkey;
mod ppl;
mod probe;
pub mod values;

use crate::text::Input;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "stuffed",
    version,
    about = "Stream millions of tokens through recurrent LMs and measure how their state fails"
)]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Check every torch zip (`.pth`, `pytorch_model.bin`) member's data against its CRC-32 when a
    /// model is opened: reads the whole file first (off by default; safetensors has no checksum).
    #[arg(long, global = true)]
    pub verify_weights: bool,
    /// Round activations to bf16 once in the bf16 matrix kernel (AVX512-BF16 or AMX CPUs, bf16
    /// weights; on AMX also f32 weights, as bf16 hi + lo halves); mean NLL moves by 1e-4 to 6e-4 (README). Faster only where bf16 dot products run
    /// at full rate: on a Xeon without AMX it scored at 0.6× the default's tok/s, its token step
    /// at 0.93× the default's time; on a Zen 4 EPYC a scoring run took 0.76× the default's time
    /// (README, CPU speed).
    /// Default: hi + lo split, within the f32 tolerances. `STUFFED_FAST_MATMUL=1` does the same.
    /// Outputs record it (`matmul.mode`).
    #[arg(long, global = true)]
    pub fast_matmul: bool,
    /// An RWKV-5/6/7 state-tuning file (RWKV-PEFT's `blocks.N.att.time_state`, as RWKV-Runner loads
    /// it beside a `.pth` model): every stream of every model the command opens starts from it, as
    /// from a state merged into the model. Outputs name it (`state_file`).
    #[arg(long, global = true, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The text a streaming command reads.
#[derive(Args, Debug)]
pub struct InputArgs {
    /// UTF-8 text files (`--text books/*.txt`, or repeat the flag); a directory stands for its
    /// `*.txt` files in name order.
    #[arg(long, num_args = 1..)]
    text: Vec<PathBuf>,
    /// SPEC.md's newlines prompt ("\n" × 300,000, tokenized).
    #[arg(long)]
    newlines: bool,
    /// With --newlines: 300,000 copies of the single newline token instead.
    #[arg(long, requires = "newlines")]
    newline_token: bool,
}

impl InputArgs {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && !self.newlines
    }

    /// The inputs in order (a directory's `*.txt` files in name order); files must exist.
    pub fn inputs(&self, cmd: &str) -> anyhow::Result<Vec<Input>> {
        let mut inputs = Vec::new();
        for p in &self.text {
            if p.is_dir() {
                let read = std::fs::read_dir(p).map_err(|e| anyhow::anyhow!("{}: cannot list: {e}", p.display()))?;
                let mut files = Vec::new();
                for e in read {
                    let f = e.map_err(|e| anyhow::anyhow!("{}: cannot list: {e}", p.display()))?.path();
                    if f.is_file() && f.extension().is_some_and(|x| x == "txt") {
                        files.push(f);
                    }
                }
                if files.is_empty() {
                    anyhow::bail!("{}: a directory with no .txt files", p.display());
                }
                files.sort();
                inputs.extend(files.into_iter().map(Input::File));
            } else if p.is_file() {
                inputs.push(Input::File(p.clone()));
            } else {
                anyhow::bail!("{}: text file not found", p.display());
            }
        }
        if self.newlines {
            inputs.push(Input::Newlines { literal: self.newline_token });
        }
        if inputs.is_empty() {
            anyhow::bail!("{cmd}: give --text FILE… (or a directory of .txt files) or --newlines");
        }
        Ok(inputs)
    }
}

/// `--resume` / `--overwrite` of a command whose run checkpoints into its --out.
#[derive(Args, Debug)]
pub struct Restart {
    /// Continue the run checkpointed in --out (same model, text and options).
    #[arg(long)]
    resume: bool,
    /// Discard a checkpoint left in --out by an unfinished run.
    #[arg(long)]
    overwrite: bool,
}

impl Restart {
    pub fn cont(&self) -> anyhow::Result<crate::eval::Continue> {
        crate::eval::Continue::from_flags(self.resume, self.overwrite)
    }
}

/// `--device` and the GPU's options.
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Store the recurrent state in this type between calls, as serving stacks do: f32 (default),
    /// bf16 or f16, rounded to nearest (ties to even); all arithmetic stays f32. CPU only.
    #[arg(long, value_enum, default_value_t = crate::state_dtype::StateDtype::F32)]
    pub state_dtype: crate::state_dtype::StateDtype,
    /// Where a bf16 / f16 state is rounded: token (default; after every token, decode-like: runs
    /// the token-by-token recurrence whatever --chunk) or chunk (after every --chunk call,
    /// prefill-like).
    #[arg(long, value_enum)]
    pub state_round: Option<crate::state_dtype::StateRound>,
    /// Round the conv and token-shift values too (default: only the recurrent matrices).
    #[arg(long)]
    pub state_dtype_all: bool,
}

impl StateArgs {
    /// The state storage asked for, refused with a device other than the CPU and with rounding
    /// flags that would round nothing.
    pub fn precision(&self, device: crate::backend::Device) -> anyhow::Result<crate::state_dtype::StatePrecision> {
        let p = crate::state_dtype::StatePrecision {
            dtype: self.state_dtype,
            round: self.state_round.unwrap_or_default(),
            all: self.state_dtype_all,
        };
        if p.is_f32() && (self.state_round.is_some() || self.state_dtype_all) {
            anyhow::bail!("--state-round and --state-dtype-all need --state-dtype bf16 or f16");
        }
        p.check_cpu(device)?;
        Ok(p)
    }
}

#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Where the forward runs: cpu, or cuda (Mamba-2; a binary built with `--features cuda`).
    #[arg(long, value_enum, default_value_t = crate::backend::Device::Cpu)]
    pub device: crate::backend::Device,
    /// With --device cuda: the most GPU memory the engine's buffers may take (e.g. 40G); the chunk
    /// shrinks to fit. Default: the free memory.
    #[arg(long, value_parser = values::bytes)]
    pub max_gpu_mem: Option<usize>,
    /// With --device cuda: run f32-stored weights as bf16 (bf16-stored ones always are, unless
    /// --gpu-f32).
    #[arg(long, conflicts_with = "gpu_f32")]
    pub gpu_bf16: bool,
    /// With --device cuda: run bf16-stored weights as f32 (upcast on the device: twice the weight
    /// memory, full-f32 GEMMs, several times slower), for the CPU's NLL to f32 accuracy rather than
    /// bf16's.
    #[arg(long)]
    pub gpu_f32: bool,
    /// With --device cuda: one-token steps (decode) through cuBLAS instead of the fused norm + GEMV
    /// kernels, to compare the two.
    #[arg(long)]
    pub gpu_decode_cublas: bool,
}

impl DeviceArgs {
    pub fn gpu(&self) -> anyhow::Result<crate::backend::GpuOptions> {
        let max_mem = self.max_gpu_mem;
        Ok(crate::backend::GpuOptions {
            max_mem,
            bf16: self.gpu_bf16,
            f32: self.gpu_f32,
            cublas_decode: self.gpu_decode_cublas,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Family, dimensions, parameters, dtype, state size and vocab of a checkpoint.
    Info {
        /// Model directory (or checkpoint file).
        #[arg(long)]
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of a text, space-separated.
    Tokenize {
        /// Model directory whose tokenizer to use.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Tokenizer (a tokenizer.json or an RWKV World vocab .txt). Default: the model directory's
        /// tokenizer.json, or the shipped one of its family.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The text itself.
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        text: Option<String>,
        /// A UTF-8 text file to tokenize instead of --text.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Logits of every position from the zero state, written as safetensors `logits` [T, V] f32.
    Logits {
        /// Model directory (or checkpoint file).
        #[arg(long)]
        model: PathBuf,
        /// Integers (whitespace- or comma-separated) or a safetensors file with `input_ids`.
        #[arg(long)]
        ids: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Tokens per forward call; 1 runs token by token.
        #[arg(long, default_value_t = 256, value_parser = crate::text::parse_chunk)]
        chunk: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Greedy continuation of a prompt.
    Generate {
        /// Model directory (or checkpoint file).
        #[arg(long)]
        model: PathBuf,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate, greedily.
        #[arg(long, default_value_t = 32)]
        max_new: usize,
        /// Tokenizer (a tokenizer.json or an RWKV World vocab .txt). Default: the model directory's
        /// tokenizer.json, or the shipped one of its family.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Loss against position, streamed over millions of tokens in constant memory. With no
    /// arguments (no --model, no --text): the shipped pair of tiny models, trained on 64- and
    /// 2,048-token windows, on a held-out novel, into ppl-out/ (log-x plot, verdicts).
    Ppl(ppl::PplArgs),
    /// Retention, state statistics and snapshots every K tokens, with plots.
    Probe(probe::ProbeArgs),
    /// Per-layer Δ or A factors for Mamba-1/2 (MambaExtend, Mamba-Modulation), or log-decay
    /// factors for the other families, at a target length, by zeroth-order search on calibration
    /// text; `--forget dt:file=calibrate.json` applies them.
    Calibrate(calibrate::CalibrateArgs),
    /// Effective remembrance (Buitrago & Gu 2025): the total variation between the prediction
    /// after T tokens and after only the last T − t of them, against t, averaged over sequences.
    Effrem(effrem::EffremArgs),
    /// LongMamba's calibration (Ye et al., ICLR 2025) for Mamba-2: per (layer, head) the retention
    /// of a training window and the Δ threshold for a target length, from Δ recorded on windows of
    /// calibration text; `--forget longmamba:file=longmamba.json` applies them.
    #[command(name = "longmamba")]
    LongMamba(longmamba::LongMambaArgs),
    /// Passkey retrieval over a grid of prompt lengths × needle depths.
    Passkey(passkey::PasskeyArgs),
    /// Combine `passkey --shard` outputs (one summary and heatmap) or `ppl --shard` outputs (one
    /// results.json, loss.csv and plot, as the unsharded run).
    Merge {
        /// Shard output directories.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Directory for the merged outputs.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fit SPEC.md §3's laws (T_forget and T_recall against state size) to the `ppl` verdicts and
    /// `passkey` grids of models of several state sizes.
    Laws {
        /// `ppl` output directories (results.json, made with --train-len) and `passkey` ones
        /// (summary.json), or those files.
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Directory for laws.json, laws.csv, t_forget.svg and t_recall.svg.
        #[arg(long, default_value = "laws-out")]
        out: PathBuf,
        /// Which T_forget verdict of each ppl run to fit: paper (the paper's: the largest bucket
        /// mean on each side) or q90 (their 90th percentiles; README "A verdict with its uncertainty").
        #[arg(long, default_value = "paper")]
        verdict: String,
    },
    /// Streamed-NLL speed and memory on a synth preset (or a model), and decode ms/token.
    Bench(bench::BenchArgs),
    /// Check a device (--device cuda) against the CPU core on the same weights and tokens.
    Selftest(bench::SelftestArgs),
    /// Write an HF-format directory of seeded random (UNTRAINED) weights at a published shape.
    Synth {
        /// The model family.
        #[arg(long, value_enum, default_value = "mamba2")]
        family: crate::model::Family,
        /// A published size (mamba2: 130m 370m 780m 1.3b 2.7b; rwkv6: 1.6b 3b 7b; rwkv5: 0.4b 1.5b 3b
        /// 7b; hgrn2: 1.3b; mamba1: 130m 370m 790m 1.4b 2.8b; rwkv7: 0.1b 0.4b 1.5b 2.9b 7.2b pile-168m
        /// pile-421m pile-1.47b; gla: 1.3b 2.7b; retnet: 1.3b; delta_net: 1.3b 2.7b;
        /// gated_deltanet: 1.3b; xlstm: 7b) or a test shape (tiny; for mamba2 also small and p128).
        #[arg(long)]
        preset: String,
        /// Weight dtype.
        #[arg(long, value_enum, default_value_t = crate::synth::StoreDtype::Bf16)]
        dtype: crate::synth::StoreDtype,
        /// Seed of the weights: the same seed gives the same bytes on every machine.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory to write (config.json, model.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
}

/// A command line parsed, or one error line: clap's first (which names the flag, the value and the
/// problem), without its usage hint — as every other error of the tool is one line.
pub fn parse_from<I: IntoIterator<Item = T>, T: Into<std::ffi::OsString> + Clone>(args: I) -> anyhow::Result<Cli> {
    Cli::try_parse_from(args).map_err(|e| anyhow::anyhow!(one_line(&e)))
}

/// A clap error as one line (`invalid value 'x' for '--shard <SHARD>': --shard takes k/n, …`): its
/// first line, with the indented lines right under it that it introduces (`the following required
/// arguments were not provided: --model <MODEL>, --out <OUT>`), without the tips and usage after.
pub fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let first = lines.next().unwrap_or_default().trim_start_matches("error: ").trim();
    let listed: Vec<&str> =
        lines.take_while(|l| l.starts_with(char::is_whitespace) && !l.trim().is_empty()).map(str::trim).collect();
    match listed.is_empty() {
        true => first.to_string(),
        false => format!("{first} {}", listed.join(", ")),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::exec::Pool::init_threads(cli.threads)?;
    crate::exec::Pool::init_matmul(cli.fast_matmul);
    crate::checkpoint::set_verify_weights(cli.verify_weights);
    crate::model::set_state_file(cli.state_file);
    match cli.cmd {
        Cmd::Info { model, json } => basic::info(&model, json),
        Cmd::Tokenize { model, tokenizer, text, file } => {
            basic::tokenize(model.as_deref(), tokenizer.as_deref(), text, file.as_deref())
        }
        Cmd::Logits { model, ids, out, chunk, device } => basic::logits(&model, &ids, &out, chunk, &device),
        Cmd::Generate { model, prompt, max_new, tokenizer, device, state } => {
            basic::generate(&model, &prompt, max_new, tokenizer.as_deref(), &device, &state)
        }
        Cmd::Ppl(a) => ppl::run(a),
        Cmd::Passkey(a) => passkey::run(a),
        Cmd::Probe(a) => probe::run(a),
        Cmd::Calibrate(a) => calibrate::run(a),
        Cmd::Effrem(a) => effrem::run(a),
        Cmd::LongMamba(a) => longmamba::run(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Selftest(a) => bench::selftest(a),
        Cmd::Merge { dirs, out } => {
            if dirs.first().is_some_and(|d| d.join("summary.json").exists()) {
                crate::eval::passkey::merge(&dirs, &out)?;
                passkey::print_accuracy_table(&out)
            } else {
                crate::eval::ppl::merge(&dirs, &out)
            }
        }
        Cmd::Laws { results, out, verdict } => crate::eval::laws::run(&results, &out, &verdict),
        Cmd::Synth { family, preset, dtype, seed, out } => crate::synth::write(family, &preset, dtype, seed, &out),
    }
}

/// `--checkpoint-secs S` of `cmd`: seconds between timed checkpoints, `None` for 0 (off).
fn checkpoint_secs(cmd: &str, s: f64) -> anyhow::Result<Option<f64>> {
    if s.is_nan() || s < 0.0 {
        anyhow::bail!("{cmd}: --checkpoint-secs must be a number of seconds ≥ 0");
    }
    Ok(Some(s).filter(|&s| s > 0.0))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every option and positional of every command says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for s in cmd.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "stuffed", &mut missing);
        assert!(missing.is_empty(), "arguments without help:\n{}", missing.join("\n"));
    }

    /// `synth --preset`'s help names every preset of every family.
    #[test]
    fn synth_help_lists_every_preset() {
        use crate::synth::*;
        let cmd = super::Cli::command();
        let synth = cmd.find_subcommand("synth").unwrap();
        let preset = synth.get_arguments().find(|a| a.get_id() == "preset").unwrap();
        let help = preset.get_help().unwrap().to_string();
        let names = MAMBA2_PRESETS.iter().map(|p| p.0).chain(RWKV6_PRESETS.iter().map(|p| p.0));
        let names = names.chain(RWKV5_PRESETS.iter().map(|p| p.0)).chain(HGRN2_PRESETS.iter().map(|p| p.0));
        let names = names.chain(MAMBA1_PRESETS.iter().map(|p| p.0));
        let names = names.chain(RWKV7_PRESETS.iter().map(|p| p.0));
        let names = names.chain(GLA_PRESETS.iter().map(|p| p.0)).chain(RETNET_PRESETS.iter().map(|p| p.0));
        let names = names.chain(DELTA_NET_PRESETS.iter().map(|p| p.0)).chain(GDN_PRESETS.iter().map(|p| p.0));
        let names = names.chain(XLSTM_PRESETS.iter().map(|p| p.0));
        for n in names {
            assert!(
                help.split(|c: char| !(c.is_alphanumeric() || c == '.' || c == '-')).any(|w| w == n),
                "{n} not in: {help}"
            );
        }
    }
}
