//! Passkey retrieval (SPEC.md §2.2): a grid of prompt lengths × needle depths, exact and seeded.
//!
//! All samples of one length share the haystack up to their needle: the haystack streams once, in
//! order of needle position; at each sample's branch point the state is copied, the sample finishes
//! from the copy (needle, the rest, the question, greedy decoding), and the stream continues. The
//! branch point is the longest common token prefix of the sample's whole prompt, tokenized at once,
//! and the haystack's — parts tokenized alone would differ at the seams.
use crate::backend::ScorerState;
use crate::forget::{ForgetSpec, Phase};
use crate::model::{Model, ModelInfo};
use crate::report::svg::{heatmap, LinePlot, Series};
use crate::report::{write_atomic, StateSlot};
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod oprm;
mod prompt;
use super::Cadence;
pub use oprm::{entropy, nll_of, Oprm, OprmRecord, Select as OprmSelect};
use prompt::{depths, prompts, Prompt, PromptIds};
pub use prompt::{
    idk_suffix, is_correct, key, key_tokens, longest_key_ids, needle_block, num_blocks, prompt_needles, prompt_text,
    template, template_for, Template, TemplateName,
};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Options {
    pub lengths: Vec<u64>,
    pub samples: usize,
    /// Explicit needle depths in [0, 1] (instead of `(i + 0.5) / samples`).
    pub depths: Option<Vec<f64>>,
    pub template: TemplateName,
    pub seed: u64,
    pub max_new: usize,
    /// How `max_new` was chosen when it was not given (summary.json's `max_new_note`); not part of
    /// the options a run is fingerprinted by.
    #[serde(skip)]
    pub max_new_note: Option<String>,
    pub bos: bool,
    pub chunk: usize,
    pub tokenizer: Option<PathBuf>,
    /// Share the haystack between samples (off: every sample from the zero state, for checks).
    pub reuse: bool,
    pub forget: crate::forget::ForgetSpec,
    #[serde(default)]
    pub device: crate::backend::Device,
    #[serde(default)]
    pub gpu: crate::backend::GpuOptions,
    /// `--state-dtype` (absent from files and fingerprints when f32).
    #[serde(default, skip_serializing_if = "crate::state_dtype::StatePrecision::is_f32")]
    pub state: crate::state_dtype::StatePrecision,
    /// `--oprm L`: each sample answered from the chunk of L context tokens it is most certain after
    /// (absent from files and fingerprints when off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oprm: Option<Oprm>,
    /// `--jrt`: JRT-Prompt, the context twice before the question (absent from files and
    /// fingerprints when off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jrt: bool,
}

/// One sample's record (one line of results.jsonl).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub length: u64,
    pub sample: usize,
    pub depth: f64,
    pub needle_block: usize,
    pub num_blocks: usize,
    pub needle_pos: usize,
    pub prompt_tokens: usize,
    pub key: String,
    pub continuation: String,
    pub correct: bool,
    /// Tokens this sample shared with the haystack stream (0 when run alone).
    pub shared_prefix: usize,
    /// NLL (nats) of the key's tokens (` {key}` after the question) teacher-forced after the prompt: a graded measure
    /// of retrieval beside the exact match (absent in grids from before it existed).
    #[serde(default)]
    pub key_nll: Option<f64>,
    /// `--oprm`: the chunk that answered, and the needle's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oprm: Option<OprmRecord>,
    /// `--forget decimamba`: the prompt's tokens that went on past each decimating layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decimated: Option<DeciRecord>,
    /// `--jrt`: the first token of the needle's second copy (`needle_pos` is the first's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needle_pos_again: Option<usize>,
}

/// What DeciMamba kept of a prompt, per decimating layer: its tokens, the needle's and the
/// question's (their `generate` keeps only the last token for sure: the question may be cut).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeciRecord {
    pub kept: Vec<usize>,
    pub needle_tokens: usize,
    pub needle_kept: Vec<usize>,
    pub question_tokens: usize,
    pub question_kept: Vec<usize>,
}

impl DeciRecord {
    /// From the positions each layer kept (ascending), the needle's tokens (each copy) and the
    /// question's.
    fn of(kept: &[Vec<u32>], needles: &[std::ops::Range<usize>], question: std::ops::Range<usize>) -> DeciRecord {
        let within = |rs: &[std::ops::Range<usize>]| -> Vec<usize> {
            kept.iter().map(|k| k.iter().filter(|&&p| rs.iter().any(|r| r.contains(&(p as usize)))).count()).collect()
        };
        DeciRecord {
            kept: kept.iter().map(Vec::len).collect(),
            needle_tokens: needles.iter().map(|r| r.len()).sum(),
            needle_kept: within(needles),
            question_tokens: question.len(),
            question_kept: within(std::slice::from_ref(&question)),
        }
    }

    /// Whether a prompt of `tokens` could have left this record: one count per decimating layer,
    /// never growing from one to the next, and no part keeping more than it has.
    fn valid(&self, tokens: usize) -> bool {
        let n = self.kept.len();
        let within = |v: &[usize], most: usize| v.iter().all(|&k| k <= most);
        n > 0
            && self.needle_kept.len() == n
            && self.question_kept.len() == n
            && self.kept.windows(2).all(|w| w[1] <= w[0])
            && within(&self.kept, tokens)
            // Checked: a record read back may hold any count (the long fuzz: a question of
            // 2^64 − 1 tokens overflowed the sum).
            && self.needle_tokens.checked_add(self.question_tokens).is_some_and(|s| s <= tokens)
            && within(&self.needle_kept, self.needle_tokens)
            && within(&self.question_kept, self.question_tokens)
            && self.needle_kept.iter().zip(&self.question_kept).zip(&self.kept).all(|((a, b), k)| a + b <= *k)
    }

    /// The share of the needle's tokens that went on past the last decimating layer.
    pub fn needle_share(&self) -> f64 {
        self.needle_kept.last().map_or(0.0, |&k| k as f64 / self.needle_tokens.max(1) as f64)
    }

    /// Whether all of the needle's tokens went on past the last decimating layer.
    pub fn needle_whole(&self) -> bool {
        self.needle_kept.last().is_some_and(|&k| k == self.needle_tokens)
    }

    /// Whether all of the question's tokens went on past the last decimating layer.
    pub fn question_whole(&self) -> bool {
        self.question_kept.last().is_some_and(|&k| k == self.question_tokens)
    }
}

/// The kind each results.jsonl line is sealed as, and the run file that ties them to their run.
const RECORD_KIND: &str = "passkey-record";
const RUN_FILE: &str = "passkey.run.json";
const RUN_KIND: &str = "passkey-run";
pub const SUMMARY_KIND: &str = "passkey-summary";

/// One results.jsonl line: the record sealed with the fingerprint of the run that made it.
fn record_line(r: &Record, fp: &str) -> Result<String> {
    let mut v = serde_json::to_value(r)?;
    v["run"] = fp.into();
    crate::report::sealed_json(RECORD_KIND, &v, false)
}

/// The records of a results.jsonl, each line's seal checked and its run's fingerprint returned
/// beside it. Only the last line may be torn (a crash mid-write: that sample runs again); any other
/// damaged, older or foreign line is an error naming the file and line.
fn read_records(path: &Path) -> Result<Vec<(Record, String)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("{} line {}", path.display(), i + 1);
        let v = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(_) => line,
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                eprintln!("{what} is incomplete (cut by a crash); that sample runs again");
                continue;
            }
            Err(e) => bail!("{what}: not JSON: {e}"),
        };
        let v = crate::report::unseal(&what, RECORD_KIND, v, crate::report::Older::Refuse)?.doc;
        let run = v["run"].as_str().ok_or_else(|| anyhow!("{what}: no run fingerprint"))?.to_string();
        let r: Record = serde_json::from_value(v).map_err(|e| anyhow!("{what}: {e}"))?;
        if !(r.depth.is_finite() && (0.0..=1.0).contains(&r.depth) && r.needle_block < r.num_blocks.max(1))
            || r.key_nll.is_some_and(|k| !k.is_finite() || k < -1e-3)
            || r.needle_pos > r.prompt_tokens
            || r.needle_pos_again.is_some_and(|p| p <= r.needle_pos || p > r.prompt_tokens)
            || r.oprm.as_ref().is_some_and(|x| !x.valid())
            || r.decimated.as_ref().is_some_and(|x| !x.valid(r.prompt_tokens))
        {
            bail!(
                "{what}: values no passkey run writes (depth {}, block {} of {})",
                r.depth,
                r.needle_block,
                r.num_blocks
            );
        }
        out.push((r, run));
    }
    Ok(out)
}

/// Whether a run under `o` writes a record of `r`'s shape: OPRM's scores as its rule and filter
/// record them (none without `--oprm`), DeciMamba's counts exactly under `--forget decimamba`, the
/// needle's second copy exactly under `--jrt`.
fn made_by(r: &Record, o: &Options) -> bool {
    let oprm = match (&r.oprm, &o.oprm) {
        (Some(x), Some(oprm)) => x.made_by(oprm),
        (None, None) => true,
        _ => false,
    };
    oprm && r.decimated.is_some() == matches!(o.forget, ForgetSpec::DeciMamba(_))
        && r.needle_pos_again.is_some() == o.jrt
}

/// Run facts that differ between shards and reruns (kept out of the comparable summary).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunFacts {
    pub shard: Option<String>,
    pub samples_run: usize,
    /// Prompt and decoded tokens run through the model (the key NLL's few tokens not counted).
    pub tokens_processed: u64,
    /// What running every sample alone would have taken.
    pub tokens_without_reuse: u64,
    pub seconds: f64,
    /// The process's peak resident memory (VmHWM); 0 in summaries written before it was recorded.
    #[serde(default)]
    pub peak_rss_bytes: u64,
}

const CKPT: &str = "passkey.checkpoint.safetensors";
/// The checkpoint of a sample part-way through its OPRM chunks (`--oprm`).
const OPRM_CKPT: &str = "passkey.oprm.checkpoint.safetensors";
/// The checkpoint of a sample part-way through its DeciMamba passes (`--forget decimamba`).
const DECI_CKPT: &str = "passkey.decimamba.checkpoint.safetensors";

/// Tokens fed between two looks at the clock and for a signal (rounded up to a multiple of the
/// scorer's chunk, so calls stay whole): the haystack of a length streams in pieces that end at
/// multiples of this (or at a sample's branch point), so a resumed run splits it exactly as an
/// uninterrupted one did and its answers are the same bit for bit.
const PIECE: usize = 8192;

/// Where an interrupted grid stands: the haystack of `length` streamed to `pos` (the state and the
/// pending row are the checkpoint's tensors), and a sample part-way through its own tail, if one
/// was; finished samples are in results.jsonl.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    fingerprint: String,
    length: u64,
    pos: usize,
    /// SHA-256 of the haystack's first `pos` tokens: a resumed stream continues the same tokens.
    hay_sha: String,
    tau: Vec<f32>,
    #[serde(default)]
    tail: Option<TailSnapshot>,
}

/// A sample stopped in its own tail (needle to question; up to the whole prompt for an early
/// needle): its prompt's first `pos` tokens fed from its branch point (tensors `tail_state`,
/// `tail_pending`).
#[derive(Serialize, Deserialize)]
struct TailSnapshot {
    sample: usize,
    branch: usize,
    pos: usize,
    /// SHA-256 of the prompt's first `pos` tokens (the key among them).
    ids_sha: String,
    tau: Vec<f32>,
}

/// Everything that decides a grid's numbers: the model (by content), the options and the shard.
fn run_key(model: &Model, o: &Options, shard: Option<(usize, usize)>) -> serde_json::Value {
    let mut key = serde_json::json!({"model": super::model_key(model), "options": o, "shard": shard});
    crate::exec::mark_matmul_mode(&mut key, model.matrix_dtypes());
    key
}

fn tokens_sha(ids: &[u32]) -> String {
    format!("{:x}", Sha256::digest(bytemuck::cast_slice::<u32, u8>(ids)))
}

/// A checkpointed grid: where it stood, the scorer at the haystack's position, and in a sample's
/// tail.
struct Restored {
    snap: Snapshot,
    hay: ScorerState,
    tail: Option<ScorerState>,
}

/// A sample in its own tail at a checkpoint: the haystack's state held aside, the prompt fed so far.
struct InTail<'a> {
    hay: &'a ScorerState,
    sample: usize,
    branch: usize,
    fed: &'a [u32],
}

/// The checkpoint in `out` made with fingerprint `fp`, if there is a usable one.
fn load_checkpoint(out: &Path, fp: &str) -> Result<Option<Restored>> {
    let path = out.join(CKPT);
    if !path.exists() {
        return Ok(None);
    }
    let mut c = crate::report::load_checkpoint::<Snapshot>(&path, "passkey writes one every --checkpoint-secs")?;
    if c.snapshot.fingerprint != fp {
        eprintln!("{}: made with another model, options or shard; the haystack starts over", path.display());
        return Ok(None);
    }
    let hay = c.take_state(StateSlot::Run, c.snapshot.tau.clone())?;
    let tail = match &c.snapshot.tail {
        Some(t) => {
            let tau = t.tau.clone();
            Some(c.take_state(StateSlot::Tail, tau)?)
        }
        None => None,
    };
    Ok(Some(Restored { snap: c.snapshot, hay, tail }))
}

/// A sample part-way through its OPRM chunks: the grid's fingerprint, the length, and the chunks'
/// progress (the best chunk's state, with its τ here, is the checkpoint's tensors).
#[derive(Serialize, Deserialize)]
struct OprmSnapshot {
    fingerprint: String,
    length: u64,
    progress: oprm::Progress,
    tau: Vec<f32>,
}

/// An OPRM checkpoint read back.
struct OprmRestored {
    length: u64,
    progress: oprm::Progress,
    best: Option<ScorerState>,
}

impl OprmRestored {
    /// Whether the progress fits a prompt of `chunks` chunks and a state of `state_len` values.
    /// Under `select`, the best chunk's score must be one the rule ranks by.
    fn check(&self, chunks: usize, state_len: usize, select: oprm::Select) -> Result<()> {
        let p = &self.progress;
        let best_ok = match (p.best, &self.best) {
            (Some(b), Some(st)) => {
                b.chunk < p.next
                    && b.scores.valid()
                    && select.rank(b.scores).1.is_finite()
                    && st.state.len() == state_len
            }
            (None, None) => p.next == 0,
            _ => false,
        };
        let needle =
            p.needle_entropy.map(|entropy| oprm::Scores { entropy, query_nll: p.needle_query_nll, idk: false });
        if p.next > chunks || p.idk_chunks > p.next || !best_ok || needle.is_some_and(|n| !n.valid()) {
            bail!("an OPRM checkpoint no run of this prompt writes (chunk {} of {chunks})", p.next);
        }
        Ok(())
    }
}

/// The OPRM checkpoint in `out` made with fingerprint `fp`, if there is a usable one.
fn load_oprm_checkpoint(out: &Path, fp: &str) -> Result<Option<OprmRestored>> {
    let path = out.join(OPRM_CKPT);
    if !path.exists() {
        return Ok(None);
    }
    let mut c =
        crate::report::load_checkpoint::<OprmSnapshot>(&path, "passkey --oprm writes one every --checkpoint-secs")?;
    if c.snapshot.fingerprint != fp {
        eprintln!("{}: made with another model, options or shard; the sample starts over", path.display());
        return Ok(None);
    }
    let best = match c.snapshot.progress.best {
        Some(_) => Some(c.take_state(StateSlot::Run, c.snapshot.tau.clone())?),
        None => None,
    };
    Ok(Some(OprmRestored { length: c.snapshot.length, progress: c.snapshot.progress, best }))
}

/// A sample part-way through its DeciMamba passes (`--forget decimamba`): its prompt (by SHA-256)
/// and progress; the tensors are the state and the norms measured so far in the pass.
#[derive(Serialize, Deserialize)]
struct DeciSnapshot {
    fingerprint: String,
    length: u64,
    sample: usize,
    ids_sha: String,
    progress: crate::forget::DeciProgress,
}

/// A DeciMamba checkpoint read back.
struct DeciRestored {
    length: u64,
    sample: usize,
    ids_sha: String,
    resume: crate::forget::DeciResume,
}

fn load_deci_checkpoint(out: &Path, fp: &str) -> Result<Option<DeciRestored>> {
    let path = out.join(DECI_CKPT);
    if !path.exists() {
        return Ok(None);
    }
    let mut c = crate::report::load_checkpoint::<DeciSnapshot>(
        &path,
        "passkey --forget decimamba writes one every --checkpoint-secs",
    )?;
    if c.snapshot.fingerprint != fp {
        eprintln!("{}: made with another model, options or shard; the sample starts over", path.display());
        return Ok(None);
    }
    let (state, norms) = (c.take("state")?, c.take("norms")?);
    let DeciSnapshot { length, sample, ids_sha, progress, .. } = c.snapshot;
    Ok(Some(DeciRestored { length, sample, ids_sha, resume: crate::forget::DeciResume { progress, norms, state } }))
}

/// `stuffed passkey`. With `checkpoint_secs`, the haystack's stream and the sample in its tail are
/// checkpointed that often (and at SIGINT/SIGTERM, which then end the run), so `resume` loses
/// neither samples nor stream.
pub fn run(
    model_path: &Path,
    o: &Options,
    out: &Path,
    cont: super::Continue,
    shard: Option<(usize, usize)>,
    checkpoint_secs: Option<f64>,
) -> Result<()> {
    let _armed = crate::interrupt::arm();
    if o.jrt && o.oprm.is_some() {
        bail!("passkey: --jrt repeats the whole context and --oprm runs it in chunks: choose one");
    }
    if let ForgetSpec::DeciMamba(_) = o.forget {
        if o.oprm.is_some() {
            bail!("passkey: --forget decimamba ranks a whole prompt's tokens and --oprm runs it in chunks: choose one");
        }
        if o.device != crate::backend::Device::Cpu {
            bail!("passkey: --forget decimamba runs on the CPU");
        }
    }
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut model = Model::load(model_path)?;
    model.set_forget(o.forget)?;
    model.state_precision = o.state;
    let tok = model.tokenizer(o.tokenizer.as_deref())?;
    let key = run_key(&model, o, shard);
    let fp = crate::report::fingerprint(&key)?;
    let bos = if o.bos {
        Some(tok.token_id("<|endoftext|>").ok_or_else(|| anyhow!("{}: no <|endoftext|> token for --bos", tok.source))?)
    } else {
        None
    };
    let real = model.real_vocab(&tok);
    // (A word the filter cannot use fails here, before any work.)
    let idk = oprm::idk_ids(&tok, o.oprm.as_ref().and_then(|x| x.idk.as_deref()))?;
    let asks = Asks { tok: &tok, tpl: template_for(o), o, bos, vocab_rows: model.info.vocab_rows, real, idk };
    let mut run_file = RunFile { path: out.join(RUN_FILE), fp: &fp, key: &key, earlier: Vec::new() };
    let (resume, mut log) = Log::open(out, o, cont, &mut run_file, shard)?;
    let seen: BTreeSet<(u64, usize)> = log.done.iter().map(|r| (r.length, r.sample)).collect();
    let mut restored = if resume { load_checkpoint(out, &fp)? } else { None };
    let mut oprm_restored = if resume { load_oprm_checkpoint(out, &fp)? } else { None };
    let mut deci_restored = if resume { load_deci_checkpoint(out, &fp)? } else { None };
    let mut chunks_seen = oprm::Seen::new();
    let mut cadence = super::Cadence::new(checkpoint_secs, None);
    let started = Instant::now();
    let mut s = crate::backend::open(&model, o.chunk, real, o.device, o.gpu)?;
    let n_per = depths(o).len();
    for (li, &length) in o.lengths.iter().enumerate() {
        // Every sample of the length in needle order, up to the last this run holds: the others'
        // branch points cut the haystack too, so a shard or a resume feeds it in the same pieces
        // as one whole run and gets its states, answers and key NLLs bit for bit.
        let mine = |p: &Prompt| {
            shard.is_none_or(|(k, n)| (li * n_per + p.sample) % n == k - 1) && !seen.contains(&(length, p.sample))
        };
        let Some(todo) = plan(&tok, &asks.tpl, o, length, &mine)? else {
            continue;
        };
        // The prompts of this length (LongMamba filters them from its `min` tokens up).
        s.set_phase(Phase::Prompt { len: Some(length) });
        if o.oprm.is_some() {
            let saver = Saver { out, fp: &fp, length, hay: &[], started, run_file: &run_file };
            let mut g = Grid { s: s.as_mut(), pos: 0, piece: PIECE, cadence: &mut cadence };
            for p in todo.iter().filter(|p| mine(p)) {
                let from = oprm_restored.take_if(|c| c.length == length && c.progress.sample == p.sample);
                asks.oprm_sample(&mut g, p, from, &saver, &mut log, o.reuse.then_some(&mut chunks_seen))?;
            }
            continue;
        }
        let hay = haystack(&tok, &asks.tpl, bos, todo[todo.len() - 1].needle_block)?;
        s.reset()?;
        let piece = PIECE.next_multiple_of(s.chunk());
        let mut g = Grid { s: s.as_mut(), pos: 0, piece, cadence: &mut cadence };
        let saver = Saver { out, fp: &fp, length, hay: &hay, started, run_file: &run_file };
        let mut tail = g.resume(restored.take_if(|r| r.snap.length == length), &saver)?;
        for p in todo {
            asks.sample(&mut g, &saver, &p, mine(&p), (&mut tail, &mut deci_restored), &mut log)?;
        }
    }
    let _ = std::fs::remove_file(out.join(CKPT));
    let _ = std::fs::remove_file(out.join(OPRM_CKPT));
    let _ = std::fs::remove_file(out.join(DECI_CKPT));
    log.facts.seconds = started.elapsed().as_secs_f64();
    log.facts.peak_rss_bytes = crate::report::peak_rss_bytes();
    let matmul = (o.device == crate::backend::Device::Cpu).then(|| crate::exec::matmul_record(model.matrix_dtypes()));
    write_summary(out, &model.info, o, &log.done, &[run_file.earlier, vec![log.facts]].concat(), matmul)
}

/// The grid's records: results.jsonl (a resumed grid's kept lines rewritten, then appended), every
/// record of the grid so far, and this process's facts.
struct Log {
    file: std::fs::File,
    done: Vec<Record>,
    facts: RunFacts,
}

impl Log {
    /// Whether the grid in `out` resumes (records without a summary are an unfinished grid too: its
    /// checkpoint may not be written yet; a finished grid keeps its run file and records, as
    /// rerunning it is no loss), its records read back and rewritten (dropping a torn last line).
    fn open(
        out: &Path,
        o: &Options,
        cont: super::Continue,
        run_file: &mut RunFile,
        shard: Option<(usize, usize)>,
    ) -> Result<(bool, Log)> {
        let jsonl = out.join("results.jsonl");
        let mut unfinished = vec![out.join(CKPT), out.join(OPRM_CKPT)];
        if !out.join("summary.json").exists() {
            unfinished.extend([out.join(RUN_FILE), jsonl.clone()]);
        }
        let resume = cont.resumes("passkey", out, &unfinished)?;
        let done = if resume { run_file.read_back(&jsonl)? } else { Vec::new() };
        if let Some(r) = done.iter().find(|r| !made_by(r, o)) {
            bail!(
                "{}: sample {} of length {} is not a record this run's options write (its OPRM scores, DeciMamba counts or JRT needle)",
                jsonl.display(),
                r.sample,
                r.length
            );
        }
        run_file.write(None)?;
        let mut file = std::fs::File::create(&jsonl).map_err(|e| anyhow!("{}: cannot create: {e}", jsonl.display()))?;
        for r in &done {
            writeln!(file, "{}", record_line(r, run_file.fp)?)?;
        }
        let facts = RunFacts { shard: shard.map(|(k, n)| format!("{k}/{n}")), ..Default::default() };
        Ok((resume, Log { file, done, facts }))
    }

    /// A finished sample: its line appended (flushed) and said.
    fn add(&mut self, rec: Record, fp: &str) -> Result<()> {
        writeln!(self.file, "{}", record_line(&rec, fp)?)?;
        self.file.flush()?;
        rec.say();
        self.done.push(rec);
        Ok(())
    }
}

/// How a run asks: the tokenizer and template its prompts are made with, its options, the BOS id
/// (`--bos`), and the model's vocabulary rows every prompt id must fall in.
struct Asks<'a> {
    tok: &'a Tokenizer,
    tpl: Template,
    o: &'a Options,
    bos: Option<u32>,
    vocab_rows: usize,
    /// The ids a softmax runs over (OPRM's entropies).
    real: usize,
    /// The ids of `--oprm-idk`'s word ([`oprm::idk_ids`]; empty without it).
    idk: Vec<u32>,
}

impl Asks<'_> {
    /// Sample `p` of a length's grid: the haystack fed to its branch point, and when the sample is
    /// this run's (`mine`), its tail run from there (or from `tail`, a checkpoint inside it),
    /// recorded, and checkpointed on the cadence.
    fn sample(
        &self,
        g: &mut Grid,
        saver: &Saver,
        p: &Prompt,
        mine: bool,
        (tail, deci): (&mut Option<(TailSnapshot, ScorerState)>, &mut Option<DeciRestored>),
        log: &mut Log,
    ) -> Result<()> {
        let (tok, tpl, bos) = (self.tok, &self.tpl, self.bos);
        // This run's sample, tokenized as one text; another run's gives only its cut (from its
        // record when a resume has one).
        let prompt = if mine {
            let x = p.ids(tok, tpl, bos)?;
            crate::model::check_ids(&x.ids, self.vocab_rows, "passkey prompt")?;
            Some(x)
        } else {
            None
        };
        let lcp = match &prompt {
            Some(x) => self.shared_prefix(&x.ids, saver.hay),
            None => match log.done.iter().find(|r| (r.length, r.sample) == (saver.length, p.sample)) {
                Some(r) => r.shared_prefix,
                None => self.shared_prefix(&p.ids(tok, tpl, bos)?.ids, saver.hay),
            },
        };
        let branch = g.advance(saver.hay, lcp, saver, &mut log.facts)?;
        let Some(PromptIds { ids, needles, question }) = prompt else {
            return Ok(());
        };
        let resumed = tail.take().filter(|(t, _)| {
            t.sample == p.sample && t.branch == branch && t.pos <= ids.len() && tokens_sha(&ids[..t.pos]) == t.ids_sha
        });
        // (A DeciMamba checkpoint of this prompt continues its passes.)
        let ids_sha = tokens_sha(&ids);
        let deci = deci.take_if(|d| (d.length, d.sample, &d.ids_sha) == (saver.length, p.sample, &ids_sha));
        let sample = Sample { p, ids: &ids, needles, question, branch };
        let resumed = Resumed { tail: resumed, deci: deci.map(|d| d.resume) };
        let rec = g.run_sample(sample, resumed, saver, &mut log.facts, self.o, |new| self.judge(p, new))?;
        log.add(rec, saver.fp)?;
        saver.at(g.s, g.pos, None, g.cadence, &log.facts)
    }

    /// Sample `p` answered by OPRM (`--oprm`): its chunks run (from `from`, a checkpoint inside
    /// them, when it is this prompt's; those in `seen` only to become the best), checkpointed on
    /// the cadence, then the chosen chunk decodes and scores the key as a whole prompt would.
    fn oprm_sample(
        &self,
        g: &mut Grid,
        p: &Prompt,
        from: Option<OprmRestored>,
        saver: &Saver,
        log: &mut Log,
        seen: Option<&mut oprm::Seen>,
    ) -> Result<()> {
        let oprm = self.o.oprm.as_ref().ok_or_else(|| anyhow!("passkey: an OPRM sample without --oprm"))?;
        let (tok, tpl) = (self.tok, &self.tpl);
        let parts = p.parts(tok, tpl, self.bos)?;
        for part in [&parts.prefix, &parts.context, &parts.question] {
            crate::model::check_ids(part, self.vocab_rows, "passkey prompt")?;
        }
        let ids_sha = parts.sha();
        let (real, vocab_rows) = (self.real, self.vocab_rows);
        let idk = &self.idk;
        let mut c = oprm::Chooser { s: &mut *g.s, parts: &parts, oprm, real, vocab_rows, seen, idk };
        let (progress, best) = match from.filter(|r| r.progress.ids_sha == ids_sha) {
            Some(r) => {
                r.check(c.chunks(), c.s.state_len(), oprm.select)
                    .map_err(|e| anyhow!("{}: {e}", saver.out.join(OPRM_CKPT).display()))?;
                eprintln!(
                    "passkey {}: sample {} resumes at OPRM chunk {} of {}",
                    saver.length,
                    p.sample,
                    r.progress.next,
                    c.chunks()
                );
                (r.progress, r.best)
            }
            None => {
                let progress = oprm::Progress {
                    sample: p.sample,
                    ids_sha,
                    next: 0,
                    best: None,
                    needle_entropy: None,
                    needle_query_nll: None,
                    idk_chunks: 0,
                };
                (progress, None)
            }
        };
        let chunks = c.chunks();
        let facts = &mut log.facts;
        let cadence = &mut *g.cadence;
        let chosen = c.run(progress, best, &mut |ran| {
            facts.tokens_processed += ran.fed;
            facts.tokens_without_reuse += ran.unshared;
            saver.oprm_at(ran.progress, ran.best, chunks, cadence, facts)
        })?;
        let a = answer(c.s, self.o.max_new, parts.answered_at(chosen.chosen, oprm.chunk), |new| self.judge(p, new))?;
        log.facts.tokens_processed += a.decoded as u64;
        log.facts.tokens_without_reuse += a.decoded as u64;
        log.facts.samples_run += 1;
        let prompt_tokens = parts.prefix.len() + parts.context.len() + parts.question.len();
        let rec = Record {
            length: saver.length,
            sample: p.sample,
            depth: p.depth,
            needle_block: p.needle_block,
            num_blocks: p.num_blocks,
            needle_pos: parts.prefix.len() + parts.needle.start,
            prompt_tokens,
            correct: a.correct,
            key: p.key.clone(),
            continuation: a.continuation,
            shared_prefix: 0,
            key_nll: Some(a.key_nll),
            oprm: Some(chosen),
            decimated: None,
            needle_pos_again: None,
        };
        log.add(rec, saver.fp)
    }

    /// The key's ids as they follow the question, and the verdict of the decoded tokens `new`.
    fn judge(&self, p: &Prompt, new: &[u32]) -> Result<(Vec<u32>, String, bool)> {
        let key_ids = key_tokens(self.tok, &self.tpl, &p.key)?;
        let (continuation, correct) = is_correct(self.tok, new, &p.key)?;
        Ok((key_ids, continuation, correct))
    }

    /// The prompt's tokens shared with the haystack, at most all but its last (`--reuse`; else 0).
    fn shared_prefix(&self, ids: &[u32], hay: &[u32]) -> usize {
        // (DeciMamba's cut depends on the whole prompt: nothing of it is shared.)
        if self.o.reuse && !matches!(self.o.forget, ForgetSpec::DeciMamba(_)) {
            ids.iter().zip(hay).take_while(|(a, b)| a == b).count().min(ids.len() - 1)
        } else {
            0
        }
    }
}

/// This run's prompts of `length` (`mine` says which), with every other sample before the last of
/// them, in needle order; None when it holds none of this length.
fn plan(
    tok: &Tokenizer,
    tpl: &Template,
    o: &Options,
    length: u64,
    mine: &dyn Fn(&Prompt) -> bool,
) -> Result<Option<Vec<Prompt>>> {
    let mut todo = prompts(tok, tpl, o, length)?;
    todo.sort_by_key(|p| (p.needle_block, p.sample));
    let Some(last_mine) = todo.iter().rposition(mine) else {
        return Ok(None);
    };
    todo.truncate(last_mine + 1);
    Ok(Some(todo))
}

/// The haystack up to needle block `last`: the prompts' blocks with no needle.
fn haystack(tok: &Tokenizer, tpl: &Template, bos: Option<u32>, last: usize) -> Result<Vec<u32>> {
    let text: String = [tpl.prefix].into_iter().chain(std::iter::repeat_n(tpl.noise, last + 1)).collect();
    Ok([bos.as_slice(), &crate::text::encode_long(tok, &text, 0)?.0].concat())
}

impl Record {
    /// One line on stderr as a sample finishes.
    fn say(&self) {
        eprintln!(
            "passkey {}: sample {} depth {:.3} key {} → {:?} {}",
            self.length,
            self.sample,
            self.depth,
            self.key,
            self.continuation,
            if self.correct { "✓" } else { "✗" }
        );
    }
}

/// The run file: which run a directory holds, and the facts of every process of it so far
/// (rewritten at each checkpoint, so a killed process's facts up to then are kept).
struct RunFile<'a> {
    path: PathBuf,
    fp: &'a str,
    key: &'a serde_json::Value,
    /// The facts of the earlier processes of this grid (a resumed run keeps them all).
    earlier: Vec<RunFacts>,
}

impl RunFile<'_> {
    /// A resumed grid's records (`jsonl`), checked to be this run's, and its earlier processes' facts.
    fn read_back(&mut self, jsonl: &Path) -> Result<Vec<Record>> {
        if !self.path.exists() && !jsonl.exists() {
            return Ok(Vec::new());
        }
        if !self.path.exists() {
            bail!(
                "{}: records without {RUN_FILE}: written by an older stuffed; rerun (or --overwrite)",
                jsonl.display()
            );
        }
        let run = crate::report::read_sealed(&self.path, RUN_KIND, crate::report::Older::Refuse)?.doc;
        if run["fingerprint"].as_str() != Some(self.fp) {
            return Err(super::other_run(&self.path, &run["key"], self.key));
        }
        if !run["runs"].is_null() {
            self.earlier = serde_json::from_value(run["runs"].clone())
                .map_err(|e| anyhow!("{}: runs: {e}", self.path.display()))?;
        }
        let mut done = Vec::new();
        for (r, run) in read_records(jsonl)? {
            if run != self.fp {
                bail!(
                    "{}: holds sample {} of length {} from another run than {}",
                    jsonl.display(),
                    r.sample,
                    r.length,
                    self.path.display()
                );
            }
            done.push(r);
        }
        Ok(done)
    }

    /// Writes the earlier processes' facts and this one's (`facts`, when given).
    fn write(&self, facts: Option<&RunFacts>) -> Result<()> {
        let runs: Vec<&RunFacts> = self.earlier.iter().chain(facts).collect();
        let doc = serde_json::json!({"fingerprint": self.fp, "key": self.key, "runs": runs});
        crate::report::write_sealed(&self.path, RUN_KIND, &doc)
    }
}

/// Checkpoints of one length's haystack.
struct Saver<'a> {
    out: &'a Path,
    fp: &'a str,
    length: u64,
    hay: &'a [u32],
    started: Instant,
    run_file: &'a RunFile<'a>,
}

impl Saver<'_> {
    /// When the cadence says so, saves the haystack at `pos` (the scorer stands there, or `tail.hay`
    /// holds it while the scorer runs a sample's tail); a signal then ends the run.
    fn at(
        &self,
        s: &dyn crate::backend::Backend,
        pos: usize,
        tail: Option<InTail>,
        cadence: &mut Cadence,
        facts: &RunFacts,
    ) -> Result<()> {
        let Some(due) = cadence.due(false) else { return Ok(()) };
        let now = s.snapshot()?;
        let (held, tail_held) = match &tail {
            Some(t) => (t.hay, Some(&now)),
            None => (&now, None),
        };
        let snap = Snapshot {
            fingerprint: self.fp.to_string(),
            length: self.length,
            pos,
            hay_sha: tokens_sha(&self.hay[..pos]),
            tau: held.tau.clone(),
            tail: tail.as_ref().map(|t| TailSnapshot {
                sample: t.sample,
                branch: t.branch,
                pos: t.fed.len(),
                ids_sha: tokens_sha(t.fed),
                tau: now.tau.clone(),
            }),
        };
        let mut tensors = StateSlot::Run.tensors(held);
        tensors.extend(tail_held.map(|t| StateSlot::Tail.tensors(t)).unwrap_or_default());
        self.save(CKPT, &serde_json::to_string(&snap)?, &tensors, cadence, facts)?;
        if let Some(sig) = due.signal {
            let at = match tail {
                Some(t) => format!("prompt token {} of sample {}", t.fed.len(), t.sample),
                None => format!("haystack token {pos}"),
            };
            bail!(
                "{sig} after {at} of length {}: checkpoint in {}; continue with --resume",
                self.length,
                self.out.display()
            );
        }
        Ok(())
    }
}

impl Saver<'_> {
    /// Writes checkpoint `file` (its snapshot and tensors), this process's facts first — whoever
    /// sees the checkpoint finds them too — and restarts the cadence.
    fn save(
        &self,
        file: &str,
        snapshot: &str,
        tensors: &[(&str, crate::report::Values)],
        cadence: &mut Cadence,
        facts: &RunFacts,
    ) -> Result<()> {
        let now = RunFacts {
            seconds: self.started.elapsed().as_secs_f64(),
            peak_rss_bytes: crate::report::peak_rss_bytes(),
            ..facts.clone()
        };
        self.run_file.write(Some(&now))?;
        crate::report::save_checkpoint(&self.out.join(file), snapshot, tensors)?;
        cadence.saved();
        Ok(())
    }

    /// When the cadence says so, saves a sample's DeciMamba progress (its state and the norms
    /// measured so far); a signal then ends the run.
    fn deci_at(&self, at: DeciAt, cadence: &mut Cadence, facts: &RunFacts) -> Result<()> {
        let Some(due) = cadence.due(false) else { return Ok(()) };
        let snap = DeciSnapshot {
            fingerprint: self.fp.to_string(),
            length: self.length,
            sample: at.sample,
            ids_sha: at.ids_sha.to_string(),
            progress: at.progress.clone(),
        };
        let tensors =
            [("state", crate::report::Values::F32(at.state)), ("norms", crate::report::Values::F32(at.norms))];
        self.save(DECI_CKPT, &serde_json::to_string(&snap)?, &tensors, cadence, facts)?;
        if let Some(sig) = due.signal {
            bail!(
                "{sig} after decimamba pass {} token {} of sample {} of length {}: checkpoint in {}; continue with --resume",
                at.progress.pass,
                at.progress.fed,
                at.sample,
                self.length,
                self.out.display()
            );
        }
        Ok(())
    }

    /// When the cadence says so, saves a sample's OPRM progress and its best chunk's state so far
    /// (of `chunks`); a signal then ends the run.
    fn oprm_at(
        &self,
        progress: &oprm::Progress,
        best: Option<&ScorerState>,
        chunks: usize,
        cadence: &mut Cadence,
        facts: &RunFacts,
    ) -> Result<()> {
        let Some(due) = cadence.due(false) else { return Ok(()) };
        let snap = OprmSnapshot {
            fingerprint: self.fp.to_string(),
            length: self.length,
            progress: progress.clone(),
            tau: best.map(|b| b.tau.clone()).unwrap_or_default(),
        };
        let tensors = best.map(|b| StateSlot::Run.tensors(b)).unwrap_or_default();
        self.save(OPRM_CKPT, &serde_json::to_string(&snap)?, &tensors, cadence, facts)?;
        if let Some(sig) = due.signal {
            bail!(
                "{sig} after OPRM chunk {} of {chunks} of sample {} of length {}: checkpoint in {}; continue with --resume",
                progress.next,
                progress.sample,
                self.length,
                self.out.display()
            );
        }
        Ok(())
    }
}

/// One length's stream: the backend, the haystack tokens fed so far, the piece a feed takes at most
/// between checkpoints.
struct Grid<'s, 'c> {
    s: &'s mut dyn crate::backend::Backend,
    pos: usize,
    piece: usize,
    cadence: &'c mut Cadence,
}

/// What a sample continues from a checkpoint: a point in its tail, or in its DeciMamba passes.
struct Resumed {
    tail: Option<(TailSnapshot, ScorerState)>,
    deci: Option<crate::forget::DeciResume>,
}

/// A DeciMamba prompt's place, handed to [`Saver::deci_at`] after every call.
struct DeciAt<'a> {
    sample: usize,
    ids_sha: &'a str,
    progress: &'a crate::forget::DeciProgress,
    norms: &'a [f32],
    state: &'a [f32],
}

/// A sample to run from its branch point.
struct Sample<'a> {
    p: &'a Prompt,
    ids: &'a [u32],
    /// The needle's tokens (each copy) and the question's first.
    needles: Vec<std::ops::Range<usize>>,
    question: usize,
    branch: usize,
}

impl Grid<'_, '_> {
    /// Continues the haystack from a checkpoint of this length, when it streamed the same tokens;
    /// returns the sample part-way through its tail then, if one was.
    fn resume(&mut self, r: Option<Restored>, saver: &Saver) -> Result<Option<(TailSnapshot, ScorerState)>> {
        let Some(r) =
            r.filter(|r| r.snap.pos <= saver.hay.len() && tokens_sha(&saver.hay[..r.snap.pos]) == r.snap.hay_sha)
        else {
            return Ok(None);
        };
        self.s.restore(&r.hay, r.snap.pos as u64)?;
        self.pos = r.snap.pos;
        eprintln!("passkey {}: the haystack resumes at token {}", saver.length, self.pos);
        Ok(r.snap.tail.zip(r.tail))
    }

    /// Feeds the haystack up to a sample's branch point `lcp` (checkpointed) and returns the branch:
    /// `lcp`, or 0 when the haystack already passed it (the sample then runs alone).
    fn advance(&mut self, hay: &[u32], lcp: usize, saver: &Saver, facts: &mut RunFacts) -> Result<usize> {
        if lcp < self.pos {
            return Ok(0);
        }
        facts.tokens_processed += (lcp - self.pos) as u64;
        while self.pos < lcp {
            let end = lcp.min((self.pos / self.piece + 1) * self.piece);
            self.s.feed(&hay[self.pos..end])?;
            self.pos = end;
            saver.at(self.s, self.pos, None, self.cadence, facts)?;
        }
        Ok(lcp)
    }

    /// Runs a sample's own tail (up to the whole prompt for an early needle) in pieces from its
    /// branch point, checkpointed like the haystack (or from `resumed`, a checkpoint inside it),
    /// decodes greedily, scores the key (`judge` gives the key's ids and the verdict of the decoded
    /// tokens), and puts the haystack's state back.
    fn run_sample(
        &mut self,
        x: Sample,
        Resumed { tail: resumed, deci: deci_from }: Resumed,
        saver: &Saver,
        facts: &mut RunFacts,
        o: &Options,
        judge: impl FnOnce(&[u32]) -> Result<(Vec<u32>, String, bool)>,
    ) -> Result<Record> {
        let (p, ids, branch) = (x.p, x.ids, x.branch);
        let saved = self.s.snapshot()?;
        if branch == 0 {
            self.s.reset()?;
        }
        let mut fed = branch;
        if let Some((t, held)) = resumed {
            self.s.restore(&held, t.pos as u64)?;
            fed = t.pos;
            eprintln!("passkey {}: sample {} resumes at prompt token {fed}", saver.length, p.sample);
        }
        let mut tail_start = fed;
        // DeciMamba ranks the whole prompt's tokens: the prompt runs alone, in its passes.
        let decimated = match o.forget {
            ForgetSpec::DeciMamba(d) => {
                let passes = d.layers.as_slice().len() + 1;
                let before = deci_from.as_ref().map_or(0, |r| r.progress.pass * ids.len() + r.progress.fed);
                if let Some(r) = &deci_from {
                    let (pass, at) = (r.progress.pass, r.progress.fed);
                    eprintln!(
                        "passkey {}: sample {} resumes at decimamba pass {pass} token {at}",
                        saver.length, p.sample
                    );
                }
                let (s, cadence, ids_sha, now) = (&mut *self.s, &mut *self.cadence, tokens_sha(ids), &*facts);
                let kept = s.feed_decimated(ids, deci_from, &mut |progress, norms, state| {
                    saver.deci_at(DeciAt { sample: p.sample, ids_sha: &ids_sha, progress, norms, state }, cadence, now)
                })?;
                // (Every pass's tokens, less those a checkpoint had run; none counted again below.)
                facts.tokens_processed += (passes * ids.len()).saturating_sub(before) as u64;
                (fed, tail_start) = (ids.len(), ids.len());
                Some(DeciRecord::of(&kept, &x.needles, x.question..ids.len()))
            }
            _ => None,
        };
        while fed < ids.len() {
            let end = ids.len().min(fed + self.piece);
            self.s.feed(&ids[fed..end])?;
            fed = end;
            if fed < ids.len() {
                let tail = InTail { hay: &saved, sample: p.sample, branch, fed: &ids[..fed] };
                saver.at(self.s, self.pos, Some(tail), self.cadence, facts)?;
            }
        }
        let a = answer(self.s, o.max_new, ids.len() as u64, judge)?;
        self.s.restore(&saved, self.pos as u64)?;
        facts.tokens_processed += (ids.len() - tail_start + a.decoded) as u64;
        facts.tokens_without_reuse += (ids.len() + a.decoded) as u64;
        facts.samples_run += 1;
        Ok(Record {
            length: saver.length,
            sample: p.sample,
            depth: p.depth,
            needle_block: p.needle_block,
            num_blocks: p.num_blocks,
            needle_pos: x.needles[0].start,
            prompt_tokens: ids.len(),
            correct: a.correct,
            key: p.key.clone(),
            continuation: a.continuation,
            shared_prefix: branch,
            key_nll: Some(a.key_nll),
            oprm: None,
            decimated,
            needle_pos_again: x.needles.get(1).map(|r| r.start),
        })
    }
}

/// A sample's answer: the decoded text, its verdict, the key's NLL and the tokens decoded.
struct Answer {
    continuation: String,
    correct: bool,
    key_nll: f64,
    decoded: usize,
}

/// Decodes greedily from the prompted state `s` stands in (at stream position `pos`), judges the
/// tokens (`judge` gives the key's ids and the verdict), and scores the key teacher-forced from the
/// same state.
fn answer(
    s: &mut dyn crate::backend::Backend,
    max_new: usize,
    pos: u64,
    judge: impl FnOnce(&[u32]) -> Result<(Vec<u32>, String, bool)>,
) -> Result<Answer> {
    let prompted = s.snapshot()?;
    let new = s.greedy(max_new)?;
    s.restore(&prompted, pos)?;
    let (key_ids, continuation, correct) = judge(&new)?;
    let mut nll = Vec::new();
    // The key in the decoded tokens' place: the answer's phase.
    let phase = s.phase();
    s.set_phase(Phase::Answer);
    let scored = s.score(&key_ids, &mut nll);
    s.set_phase(phase);
    scored?;
    Ok(Answer { continuation, correct, key_nll: nll.iter().map(|&v| v as f64).sum(), decoded: new.len() })
}

/// Depth bins: one per explicit depth, else min(samples, 10) equal bins over [0, 1].
fn depth_bins(o: &Options) -> Vec<(f64, f64)> {
    match &o.depths {
        Some(d) => {
            let mut d = d.clone();
            d.sort_by(f64::total_cmp);
            d.dedup();
            d.iter().map(|&v| (v, v)).collect()
        }
        None => {
            let nb = o.samples.clamp(1, 10);
            (0..nb).map(|i| (i as f64 / nb as f64, (i + 1) as f64 / nb as f64)).collect()
        }
    }
}

fn in_bin(depth: f64, bin: (f64, f64), last: bool) -> bool {
    if bin.0 == bin.1 {
        (depth - bin.0).abs() < 1e-12
    } else {
        depth >= bin.0 && (depth < bin.1 || (last && depth <= bin.1))
    }
}

/// summary.json (comparable across shards: run facts apart), summary.csv, heatmap.svg, last_r.svg.
/// `matmul`: the CPU kernel and mode the records' products ran in (none on the GPU).
pub fn write_summary(
    out: &Path,
    info: &ModelInfo,
    o: &Options,
    records: &[Record],
    runs: &[RunFacts],
    matmul: Option<serde_json::Value>,
) -> Result<()> {
    let mut recs = records.to_vec();
    recs.sort_by_key(|r| (r.length, r.sample));
    recs.dedup_by_key(|r| (r.length, r.sample));
    let bins = depth_bins(o);
    // (samples, accuracy, mean key NLL) of some records.
    let acc = |rs: &mut dyn Iterator<Item = &Record>| {
        let (mut n, mut c, mut k, mut ks) = (0usize, 0usize, 0usize, 0f64);
        for r in rs {
            (n, c) = (n + 1, c + r.correct as usize);
            if let Some(v) = r.key_nll {
                (k, ks) = (k + 1, ks + v);
            }
        }
        (n, (n > 0).then(|| c as f64 / n as f64), (k > 0).then(|| ks / k as f64))
    };
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    let mut per_length = Vec::new();
    let mut grid = Vec::new();
    let mut csv = String::from("length,depth_lo,depth_hi,n,accuracy,mean_key_nll\n");
    let mut t_recall = None;
    for &l in &o.lengths {
        let (n, a, k) = acc(&mut recs.iter().filter(|r| r.length == l));
        if a.is_some_and(|a| a > 0.95) {
            t_recall = Some(t_recall.map_or(l, |t: u64| t.max(l)));
        }
        let mut row = serde_json::json!({"length": l, "n": n, "accuracy": a, "mean_key_nll": k});
        if let (crate::forget::ForgetSpec::LongMamba { table, .. }, None) = (o.forget, &o.oprm) {
            // The target whose thresholds filtered this length's prompts (null: under `min`, none).
            let target = o.forget.longmamba_target(Phase::Prompt { len: Some(l) }).map(|i| table.table().targets[i]);
            row["longmamba_target"] = target.into();
        }
        if let crate::forget::ForgetSpec::DeciMamba(d) = o.forget {
            // The prompt's tokens that went on past each decimating layer, on average; the share of
            // the needle's tokens that went on past the last, and how often the whole needle and
            // the whole question did.
            let ours: Vec<&DeciRecord> =
                recs.iter().filter(|r| r.length == l).filter_map(|r| r.decimated.as_ref()).collect();
            let n = ours.len() as f64;
            let mean = |i: usize| (n > 0.0).then(|| ours.iter().map(|k| k.kept[i] as f64).sum::<f64>() / n);
            row["decimamba_kept"] = (0..d.layers.as_slice().len()).map(mean).collect::<Vec<_>>().into();
            let share =
                |f: &dyn Fn(&DeciRecord) -> bool| (n > 0.0).then(|| ours.iter().filter(|x| f(x)).count() as f64 / n);
            let needle = (n > 0.0).then(|| ours.iter().map(|x| x.needle_share()).sum::<f64>() / n);
            row["decimamba_needle_share"] = needle.into();
            row["decimamba_needle_whole"] = share(&DeciRecord::needle_whole).into();
            row["decimamba_question_whole"] = share(&DeciRecord::question_whole).into();
        }
        if o.oprm.is_some() {
            // How often the chunk that answered held the needle, and how often a chunk boundary
            // cut the needle (no chunk then holds all of it).
            let ours: Vec<&OprmRecord> =
                recs.iter().filter(|r| r.length == l).filter_map(|r| r.oprm.as_ref()).collect();
            let share = |f: &dyn Fn(&OprmRecord) -> bool| {
                (!ours.is_empty()).then(|| ours.iter().filter(|x| f(x)).count() as f64 / ours.len() as f64)
            };
            row["oprm_chose_needle"] = share(&|x| x.chose_needle()).into();
            row["oprm_needle_split"] = share(&|x| x.needle_chunks[0] != x.needle_chunks[1]).into();
            if o.oprm.as_ref().is_some_and(|x| x.idk.is_some()) {
                // The IDK filter: the share of chunks that said "I don't know", and of samples where
                // every chunk did (the answer then came from one of them).
                let (said, chunks) =
                    ours.iter().fold((0, 0), |(s, c), x| (s + x.idk_chunks.unwrap_or(0), c + x.chunks));
                row["oprm_idk_chunks"] = (chunks > 0).then(|| said as f64 / chunks as f64).into();
                row["oprm_all_idk"] = share(&|x| x.idk_chunks == Some(x.chunks)).into();
            }
        }
        per_length.push(row);
        for (bi, &b) in bins.iter().enumerate() {
            let last = bi + 1 == bins.len();
            let (n, a, k) = acc(&mut recs.iter().filter(|r| r.length == l && in_bin(r.depth, b, last)));
            csv += &format!("{l},{},{},{n},{},{}\n", b.0, b.1, opt(a), opt(k));
            grid.push(
                serde_json::json!({"length": l, "depth_lo": b.0, "depth_hi": b.1, "n": n, "accuracy": a, "mean_key_nll": k}),
            );
        }
    }
    // Accuracy with the needle within the last r tokens (SPEC.md §2.2): over the whole grid, and
    // per length (one curve per r on last_r.svg).
    // (Under --jrt, the copy nearer the question.)
    let within = |x: &Record, r: usize| x.prompt_tokens.saturating_sub(x.needle_pos_again.unwrap_or(x.needle_pos)) <= r;
    let mut curves = Vec::new();
    let last_r: Vec<_> = [1024usize, 2048, 4096, 8192]
        .iter()
        .map(|&r| {
            let (n, a, _) = acc(&mut recs.iter().filter(|x| within(x, r)));
            let per: Vec<_> = o
                .lengths
                .iter()
                .map(|&l| (l, acc(&mut recs.iter().filter(|x| x.length == l && within(x, r)))))
                .collect();
            let points: Vec<(f64, f64)> = per.iter().filter_map(|&(l, (_, a, _))| a.map(|a| (l as f64, a))).collect();
            let name = format!("needle in the last {}", crate::report::svg::fmt_tokens(r as u64));
            curves.push(Series { name, markers: points.len() == 1, points });
            let per: Vec<_> =
                per.iter().map(|&(l, (n, a, _))| serde_json::json!({"length": l, "n": n, "accuracy": a})).collect();
            serde_json::json!({"r": r, "n": n, "accuracy": a, "per_length": per})
        })
        .collect();
    let summary = serde_json::json!({
        "command": "passkey",
        "model": info,
        "precision": {"weights": info.weight_dtype, "compute": "f32", "state": o.state.to_string()},
        "options": o,
        "matmul": matmul,
        "forget": o.forget.to_string(),
        "samples": recs.len(),
        "accuracy_per_length": per_length,
        "accuracy_per_length_depth": grid,
        "t_recall": t_recall,
        "t_recall_rule": "largest length with accuracy > 0.95 over its samples",
        // SPEC.md §3's Mamba-2 fits, to set the measured T_recall beside (null for other families).
        "laws": crate::eval::laws::laws_of(info),
        "needle_within_last_r": last_r,
        "scoring": "greedy decoding of max_new tokens; correct iff the key string is a substring of the decoded continuation",
        "oprm": o.oprm.as_ref().map(|x| format!(
            "OPRM (arXiv 2505.07793): prefix, context and question tokenized alone; the context cut into chunks of {} tokens, \
             each run from the zero state as [prefix, chunk, question]; {}{}; needle_pos and prompt_tokens count the parts",
            x.chunk,
            x.select.describe(),
            x.idk.as_ref().map_or(String::new(), |w| format!(
                "; IDK filter: the question asks for \"{w}\" when the key is not in the text, and a chunk whose first \
                 greedy answer token begins \"{w}\" answers only if every chunk's does"
            ))
        )),
        "max_new_note": o.max_new_note,
        "runs": runs,
    });
    crate::report::write_sealed(&out.join("summary.json"), SUMMARY_KIND, &summary)?;
    write_atomic(&out.join("summary.csv"), csv.as_bytes())?;
    let x: Vec<String> = o.lengths.iter().map(|&l| crate::report::svg::fmt_tokens(l)).collect();
    let y: Vec<String> = bins
        .iter()
        .map(|b| if b.0 == b.1 { format!("{:.2}", b.0) } else { format!("{:.2}–{:.2}", b.0, b.1) })
        .collect();
    let cells: Vec<Vec<Option<f64>>> = o
        .lengths
        .iter()
        .map(|&l| {
            bins.iter()
                .enumerate()
                .map(|(bi, &b)| {
                    acc(&mut recs.iter().filter(|r| r.length == l && in_bin(r.depth, b, bi + 1 == bins.len()))).1
                })
                .collect()
        })
        .collect();
    let title = format!("Passkey retrieval — {}", info.path.display());
    write_atomic(
        &out.join("heatmap.svg"),
        heatmap(&title, "prompt length (tokens)", "needle depth", &x, &y, &cells).as_bytes(),
    )?;
    let title = format!("Accuracy with the needle in the last r tokens — {}", info.path.display());
    let plot =
        LinePlot { title: &title, x_label: "prompt length (tokens)", y_label: "accuracy", log_x: true, vlines: vec![] };
    write_atomic(&out.join("last_r.svg"), plot.render(&curves).as_bytes())
}

/// `stuffed merge`: shard outputs → one summary and heatmap, as an unsharded run writes them.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<()> {
    if dirs.is_empty() {
        bail!("merge: give the shard directories");
    }
    let mut records = Vec::new();
    let mut runs = Vec::new();
    let mut first: Option<(ModelInfo, Options)> = None;
    let mut matmuls = Vec::new();
    for d in dirs {
        let sp = d.join("summary.json");
        let v = crate::report::read_sealed(&sp, SUMMARY_KIND, crate::report::Older::Refuse)?.doc;
        let info: ModelInfo =
            serde_json::from_value(v["model"].clone()).with_context(|| format!("{}: no model facts", sp.display()))?;
        info.check_read_back(&sp)?;
        let mut opts: Options =
            serde_json::from_value(v["options"].clone()).with_context(|| format!("{}: no options", sp.display()))?;
        opts.max_new_note = v["max_new_note"].as_str().map(String::from);
        let shard_runs: Vec<RunFacts> = serde_json::from_value(v["runs"].clone()).unwrap_or_default();
        match &first {
            None => first = Some((info, opts)),
            Some((i0, o0)) => {
                if *o0 != opts || i0.path != info.path {
                    bail!("{}: made with another model or options than {}", sp.display(), dirs[0].display());
                }
            }
        }
        runs.extend(shard_runs);
        matmuls.push((sp.clone(), v.get("matmul").filter(|m| !m.is_null()).cloned()));
        let run = crate::report::read_sealed(&d.join(RUN_FILE), RUN_KIND, crate::report::Older::Refuse)?.doc;
        let o = first.as_ref().map(|f| &f.1).expect("the first shard's options");
        for (r, fp) in read_records(&d.join("results.jsonl"))? {
            if run["fingerprint"].as_str() != Some(fp.as_str()) {
                bail!(
                    "{}: a record from another run than {}",
                    d.join("results.jsonl").display(),
                    d.join(RUN_FILE).display()
                );
            }
            if !made_by(&r, o) {
                bail!(
                    "{}: sample {} of length {} is not a record its run's options write (its OPRM scores, DeciMamba counts or JRT needle)",
                    d.join("results.jsonl").display(),
                    r.sample,
                    r.length
                );
            }
            records.push((r, fp));
        }
    }
    let Some((info, opts)) = first else { bail!("merge: nothing to merge") };
    let shard_records: Vec<(&Path, Option<&serde_json::Value>)> =
        matmuls.iter().map(|(p, m)| (p.as_path(), m.as_ref())).collect();
    let matmul = super::merged_matmul(&shard_records)?;
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    records.sort_by_key(|r| (r.0.length, r.0.sample));
    records.dedup_by_key(|r| (r.0.length, r.0.sample));
    let mut lines = String::new();
    for (r, fp) in &records {
        lines += &record_line(r, fp)?;
        lines.push('\n');
    }
    write_atomic(&out.join("results.jsonl"), lines.as_bytes())?;
    let records: Vec<Record> = records.into_iter().map(|r| r.0).collect();
    write_summary(out, &info, &opts, &records, &runs, matmul)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored(next: usize, best: Option<(usize, usize)>) -> OprmRestored {
        let progress = oprm::Progress {
            sample: 0,
            ids_sha: String::new(),
            next,
            best: best.map(|(chunk, _)| oprm::Best {
                chunk,
                scores: oprm::Scores { entropy: 0.5, query_nll: None, idk: false },
            }),
            needle_entropy: None,
            needle_query_nll: None,
            idk_chunks: 0,
        };
        let best = best.map(|(_, len)| ScorerState { state: vec![0.0; len], pending: None, tau: Vec::new() });
        OprmRestored { length: 1024, progress, best }
    }

    /// A resumed OPRM sample takes only progress its own run could have written: chunks it has,
    /// a best chunk among those run, a state of the model's size.
    #[test]
    fn oprm_checkpoints_are_checked_before_use() {
        assert!(restored(0, None).check(5, 10, oprm::Select::Entropy).is_ok());
        assert!(restored(3, Some((2, 10))).check(5, 10, oprm::Select::Entropy).is_ok());
        assert!(restored(5, Some((4, 10))).check(5, 10, oprm::Select::Entropy).is_ok());
        assert!(restored(6, Some((4, 10))).check(5, 10, oprm::Select::Entropy).is_err(), "past the last chunk");
        assert!(restored(3, Some((3, 10))).check(5, 10, oprm::Select::Entropy).is_err(), "a best chunk not yet run");
        assert!(restored(3, Some((2, 9))).check(5, 10, oprm::Select::Entropy).is_err(), "another state size");
        assert!(restored(3, None).check(5, 10, oprm::Select::Entropy).is_err(), "chunks run without a best");
        let mut idk = restored(3, Some((2, 10)));
        idk.progress.idk_chunks = 3;
        assert!(idk.check(5, 10, oprm::Select::Entropy).is_ok());
        idk.progress.idk_chunks = 4;
        assert!(idk.check(5, 10, oprm::Select::Entropy).is_err(), "more IDK chunks than chunks run");
        let query = |best_nll: Option<f64>| {
            let mut r = restored(3, Some((2, 10)));
            r.progress.best.as_mut().unwrap().scores.query_nll = best_nll;
            r.check(5, 10, oprm::Select::Query)
        };
        assert!(query(Some(1.5)).is_ok());
        assert!(query(None).is_err(), "the query rule's best without the question's NLL");
        assert!(query(Some(f64::NAN)).is_err(), "a NLL that is not finite");
    }

    /// A DeciMamba record read back is refused when no prompt of its length could have left it,
    /// whatever its counts (the long fuzz: `question_tokens` 2^64 − 1 overflowed the check).
    #[test]
    fn decimamba_records_are_checked_without_overflow() {
        let record = |needle_tokens: usize, question_tokens: usize| DeciRecord {
            kept: vec![68, 38],
            needle_tokens,
            needle_kept: vec![10, 4],
            question_kept: vec![8, 8],
            question_tokens,
        };
        assert!(record(36, 18).valid(170));
        assert!(!record(36, 18).valid(53), "needle and question longer than the prompt");
        assert!(!record(36, usize::MAX).valid(170), "a question of 2^64 - 1 tokens");
        assert!(!record(usize::MAX, 1).valid(170), "a needle of 2^64 - 1 tokens");
    }
}
