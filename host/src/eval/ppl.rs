//! Loss against position (SPEC.md §2.1): teacher-forced NLL of every token, the state carried across
//! the whole stream, reduced into buckets of positions as it goes — nothing per position is kept.
//!
//! Tokens go through the model in chunks aligned to multiples of `chunk` from each document's start,
//! so a resumed run splits the stream exactly as an uninterrupted one and gives identical numbers.
use super::feed::{doc_stream, DocStream, TokenFeed};
use super::Continue;
use crate::backend::{Device, GpuOptions, ScorerState};
use crate::model::dir_of;
use crate::model::{Model, ModelInfo};
use crate::report::{self, peak_rss_bytes, write_atomic, Progress, StateSlot};
use crate::rng::SplitMix64 as Mix;
use crate::state_dtype::{StateDtype, StatePrecision};
use crate::text::Input;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    pub chunk: usize,
    pub bucket: u64,
    pub train_len: Option<u64>,
    pub max_tokens: Option<u64>,
    pub concat: bool,
    pub repeat_to: Option<u64>,
    pub checkpoint_every: Option<u64>,
    /// Also checkpoint when this many seconds passed since the last one (so a killed run loses at
    /// most that much work even without `checkpoint_every`).
    #[serde(default)]
    pub checkpoint_secs: Option<f64>,
    pub stop_after: Option<u64>,
    pub nll_out: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub log_x: bool,
    /// Forgetting methods: every model runs once under each (`none` = as trained).
    pub forget: Vec<crate::forget::ForgetSpec>,
    #[serde(default)]
    pub device: Device,
    #[serde(default)]
    pub gpu: GpuOptions,
    /// `--shard k/n`: only documents i with i mod n = k − 1 (merge the shards with `stuffed merge`).
    #[serde(default)]
    pub shard: Option<(usize, usize)>,
    /// `--state-dtype` (absent when f32).
    #[serde(default, skip_serializing_if = "StatePrecision::is_f32")]
    pub state: StatePrecision,
    /// `--vs-state`: a second stream with the state in this type, over the same tokens (drift).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_state: Option<StateDtype>,
    /// `--vs-model`: a second stream through this model (the reference) over the same tokens: the
    /// drift between two checkpoints (another format, dtype or implementation of the same model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_model: Option<PathBuf>,
}

/// Running NLL sums over buckets of positions: linear (`width` > 0) or powers of two (`width` = 0).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Buckets {
    pub width: u64,
    sum: Vec<f64>,
    sq: Vec<f64>,
    count: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BucketRow {
    pub start: u64,
    pub end: u64,
    pub count: u64,
    pub mean_nll: f64,
    pub ppl: f64,
    pub stderr: f64,
}

impl Buckets {
    pub fn new(width: u64) -> Buckets {
        Buckets { width, sum: Vec::new(), sq: Vec::new(), count: Vec::new() }
    }

    fn index(&self, pos: u64) -> usize {
        match pos.checked_div(self.width) {
            Some(i) => i as usize,
            None => 63 - pos.max(1).leading_zeros() as usize,
        }
    }

    /// `[start, end)` of bucket `i`.
    pub fn bounds(&self, i: usize) -> (u64, u64) {
        if self.width > 0 {
            (i as u64 * self.width, (i as u64 + 1) * self.width)
        } else {
            (1 << i, 1 << (i + 1))
        }
    }

    pub fn add(&mut self, pos: u64, nll: f32) {
        self.add_f64(pos, nll as f64)
    }

    /// [`Buckets::add`] of an f64 value (a difference, a KL).
    pub fn add_f64(&mut self, pos: u64, v: f64) {
        let i = self.index(pos);
        if i >= self.count.len() {
            self.grow(i + 1);
        }
        self.sum[i] += v;
        self.sq[i] += v * v;
        self.count[i] += 1;
    }

    /// Checks sums read back from a file: one sum, square sum and count per bucket, finite
    /// non-negative sums (an NLL is ≥ 0, less rounding), square sums that can belong to the sums
    /// (n·Σx² ≥ (Σx)²), counts below 2^53. Returns the total count and sum.
    fn validate(&self, what: &str) -> Result<(u64, f64)> {
        let n = self.count.len();
        if self.sum.len() != n || self.sq.len() != n {
            bail!("{what}: {} sums, {} square sums and {n} counts", self.sum.len(), self.sq.len());
        }
        let (mut count, mut sum) = (0u64, 0f64);
        for i in 0..n {
            let (c, s, q) = (self.count[i], self.sum[i], self.sq[i]);
            let cf = c as f64;
            let ok = c < 1 << 53
                && s.is_finite()
                && q.is_finite()
                && s >= -1e-3 * cf
                && q >= 0.0
                && (c > 0 || (s == 0.0 && q == 0.0))
                && cf * q >= s * s * (1.0 - 1e-9) - 1e-9;
            if !ok {
                bail!("{what}: bucket {i} holds count {c}, sum {s}, square sum {q}, which no run can produce");
            }
            count = count.checked_add(c).ok_or_else(|| anyhow!("{what}: counts overflow"))?;
            sum += s;
        }
        Ok((count, sum))
    }

    /// Room for `n` buckets, grown in steps of [`BUCKET_STEP`] rather than doubled: a long run's
    /// fine verdict buckets (16 tokens each for a 64-token training length) are the one thing that
    /// grows with the stream, so their slack is kept small.
    fn grow(&mut self, n: usize) {
        let cap = n.div_ceil(BUCKET_STEP) * BUCKET_STEP;
        for v in [&mut self.sum, &mut self.sq] {
            v.reserve_exact(cap.saturating_sub(v.len()));
            v.resize(n, 0.0);
        }
        self.count.reserve_exact(cap.saturating_sub(self.count.len()));
        self.count.resize(n, 0);
    }

    /// Adds `other`'s sums (the same scheme) bucket by bucket.
    fn merge(&mut self, other: &Buckets) -> Result<()> {
        if other.width != self.width {
            bail!("bucket widths differ ({} vs {})", self.width, other.width);
        }
        self.validate("bucket sums")?;
        other.validate("bucket sums")?;
        let n = self.count.len().max(other.count.len());
        self.sum.resize(n, 0.0);
        self.sq.resize(n, 0.0);
        self.count.resize(n, 0);
        for i in 0..other.count.len() {
            self.sum[i] += other.sum[i];
            self.sq[i] += other.sq[i];
            self.count[i] = added(self.count[i], other.count[i], "bucket counts")?;
        }
        Ok(())
    }

    pub fn rows(&self) -> Vec<BucketRow> {
        self.rows_iter().collect()
    }

    /// [`Buckets::rows`] one at a time (the verdict's fine buckets are many).
    pub fn rows_iter(&self) -> impl Iterator<Item = BucketRow> + '_ {
        (0..self.count.len()).filter(|&i| self.count[i] > 0).map(|i| {
            let (start, end) = self.bounds(i);
            let n = self.count[i] as f64;
            let mean = self.sum[i] / n;
            let var = if n > 1.0 { ((self.sq[i] - self.sum[i] * mean) / (n - 1.0)).max(0.0) } else { 0.0 };
            BucketRow { start, end, count: self.count[i], mean_nll: mean, ppl: mean.exp(), stderr: (var / n).sqrt() }
        })
    }
}

/// Buckets are added this many at a time (see [`Buckets::grow`]).
const BUCKET_STEP: usize = 4096;

/// SPEC.md §2.1's T_forget criterion on buckets of width `w = min(512, max(16, T_train/8))`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub train_len: u64,
    pub bucket_width: u64,
    /// Largest bucket mean among buckets ending ≤ T_train (the first bucket dropped).
    pub l_in: Option<f64>,
    /// Largest bucket mean among buckets starting ≥ T_train.
    pub l_out: Option<f64>,
    /// "forgets", "does not forget", or "undetermined" (no bucket on one side).
    pub verdict: String,
    pub evaluated_len: u64,
    pub note: String,
    /// Standard errors of the bucket means that are L_in and L_out (their buckets' NLL spread).
    #[serde(default)]
    pub l_in_stderr: Option<f64>,
    #[serde(default)]
    pub l_out_stderr: Option<f64>,
    /// The paper's criterion as a margin, L_out / (2·L_in), with its bootstrap interval.
    #[serde(default)]
    pub margin: Option<Margin>,
    /// The variant robust to the number of buckets (README "A verdict with its uncertainty").
    #[serde(default)]
    pub robust: Option<RobustVerdict>,
}

/// A criterion's margin L_out / (2·L_in) (≤ 1: forgets) and its 95% interval from a seeded
/// moving-block bootstrap over the verdict buckets on each side of T_train (blocks of `block`
/// consecutive buckets, `replicates` resamples): "forgets" when the whole interval is ≤ 1, "does
/// not forget" when it is > 1, else "undecided".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Margin {
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    pub verdict: String,
    pub seed: u64,
    pub replicates: usize,
    pub block: usize,
}

/// The robust variant: L_in and L_out as the `q`-quantile of the bucket means on each side (not
/// their largest), the same buckets and rule (forgets iff L_out ≤ 2·L_in).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RobustVerdict {
    pub name: String,
    pub l_in: Option<f64>,
    pub l_out: Option<f64>,
    pub verdict: String,
    pub margin: Option<Margin>,
}

/// The robust variant's name and quantile.
pub const ROBUST: (&str, f64) = ("q90", 0.9);
/// The verdicts' bootstrap: seed and resamples.
pub const BOOTSTRAP: (u64, usize) = (25, 1000);

/// The `q`-quantile of `v` (linear interpolation between order statistics; reorders `v`).
pub fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let h = q * (v.len() - 1) as f64;
    let (i, f) = (h.floor() as usize, h - h.floor());
    let (_, &mut a, above) = v.select_nth_unstable_by(i, f64::total_cmp);
    Some(match above.iter().copied().reduce(f64::min) {
        Some(b) if f > 0.0 => a + f * (b - a),
        _ => a,
    })
}

/// The largest of `v` (a NaN only where every value is one).
fn largest(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

/// [`largest`] in the shape [`margin`] takes a statistic.
fn max_of(v: &mut [f64]) -> Option<f64> {
    largest(v)
}

/// The rule on (L_in, L_out), as the paper's verdict states it.
fn rule(l_in: Option<f64>, l_out: Option<f64>) -> &'static str {
    match (l_in, l_out) {
        (Some(i), Some(o)) if !(i.is_finite() && o.is_finite()) => "undetermined",
        (Some(i), Some(o)) if o <= 2.0 * i => "forgets",
        (Some(_), Some(_)) => "does not forget",
        _ => "undetermined",
    }
}

/// A moving-block resample of `v` (same length; blocks of `block` consecutive values) into `out`.
fn resample(v: &[f64], block: usize, rng: &mut Mix, out: &mut Vec<f64>) {
    out.clear();
    let starts = v.len() - block + 1;
    while out.len() < v.len() {
        let s = rng.below(starts);
        let take = block.min(v.len() - out.len());
        out.extend_from_slice(&v[s..s + take]);
    }
}

/// The margin of `stat` (the largest, or a quantile) over the bucket means `ins` and `outs`, with
/// its seeded moving-block bootstrap interval (blocks of ⌈n^(1/3)⌉ buckets on each side).
///
/// `buf` is scratch (the out side's length: a long run has many buckets, so one buffer serves).
pub fn margin(
    ins: &[f64],
    outs: &[f64],
    stat: fn(&mut [f64]) -> Option<f64>,
    seed: u64,
    reps: usize,
    buf: &mut Vec<f64>,
) -> Option<Margin> {
    let mut stat_of = |v: &[f64]| {
        buf.clear();
        buf.extend_from_slice(v);
        stat(buf)
    };
    let (i, o) = (stat_of(ins)?, stat_of(outs)?);
    if !(i.is_finite() && o.is_finite()) || i <= 0.0 {
        return None;
    }
    let block_of = |n: usize| ((n as f64).cbrt().ceil() as usize).clamp(1, n);
    let (bi, bo) = (block_of(ins.len()), block_of(outs.len()));
    let mut rng = Mix::new(seed);
    let mut ri = Vec::new();
    let mut ratios: Vec<f64> = (0..reps)
        .filter_map(|_| {
            resample(ins, bi, &mut rng, &mut ri);
            resample(outs, bo, &mut rng, buf);
            Some(stat(buf)? / (2.0 * stat(&mut ri)?))
        })
        .collect();
    let lo = quantile(&mut ratios, 0.025)?;
    let hi = quantile(&mut ratios, 0.975)?;
    let verdict = if hi <= 1.0 {
        "forgets"
    } else if lo > 1.0 {
        "does not forget"
    } else {
        "undecided"
    };
    Some(Margin { ratio: o / (2.0 * i), lo, hi, verdict: verdict.into(), seed, replicates: reps, block: bo })
}

pub fn verdict_width(train_len: u64) -> u64 {
    (train_len / 8).clamp(16, 512)
}

pub fn t_forget(b: &Buckets, train_len: u64, evaluated_len: u64) -> Verdict {
    let is_in = |r: &BucketRow| r.start > 0 && r.end <= train_len;
    let is_out = |r: &BucketRow| r.start >= train_len;
    // The bucket means on each side (8 bytes a bucket: a long run's verdict buckets are many).
    let mi: Vec<f64> = b.rows_iter().filter(is_in).map(|r| r.mean_nll).collect();
    let mo: Vec<f64> = b.rows_iter().filter(is_out).map(|r| r.mean_nll).collect();
    let (l_in, l_out) = (largest(&mi), largest(&mo));
    // Never a verdict from a NaN or an infinity (the run stops before one could reach a bucket).
    let verdict = rule(l_in, l_out);
    // The standard errors of the two buckets that are L_in and L_out.
    let se_of = |side: &dyn Fn(&BucketRow) -> bool, l: Option<f64>| {
        b.rows_iter().filter(|r| side(r)).find(|r| Some(r.mean_nll) == l).map(|r| r.stderr)
    };
    let (seed, reps) = BOOTSTRAP;
    let mut buf = Vec::with_capacity(mo.len());
    let mut q = |v: &[f64]| {
        buf.clear();
        buf.extend_from_slice(v);
        quantile(&mut buf, ROBUST.1)
    };
    let (rq_in, rq_out) = (q(&mi), q(&mo));
    let robust = RobustVerdict {
        name: ROBUST.0.into(),
        l_in: rq_in,
        l_out: rq_out,
        verdict: rule(rq_in, rq_out).into(),
        margin: margin(&mi, &mo, |v| quantile(v, ROBUST.1), seed, reps, &mut buf),
    };
    let note = if evaluated_len < 1 << 20 {
        format!("evaluated up to {evaluated_len} tokens (the paper's criterion uses 1M-token prompts)")
    } else {
        format!("evaluated over {evaluated_len} tokens")
    };
    Verdict {
        train_len,
        bucket_width: b.width,
        l_in,
        l_out,
        verdict: verdict.into(),
        evaluated_len,
        note,
        l_in_stderr: se_of(&is_in, l_in),
        l_out_stderr: se_of(&is_out, l_out),
        margin: margin(&mi, &mo, max_of, seed, reps, &mut buf),
        robust: Some(robust),
    }
}

/// Accumulators of one model's run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Acc {
    linear: Buckets,
    log2: Buckets,
    verdict: Option<Buckets>,
    sum: f64,
    count: u64,
    /// Longest document (or stream) seen, in tokens.
    longest: u64,
    seconds: f64,
    tokens_fed: u64,
    nll_files: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub model: ModelInfo,
    /// The forgetting method (SPEC.md §2.4), `none` by default.
    pub forget: String,
    pub precision: serde_json::Value,
    pub tokenizer: String,
    pub tokens_scored: u64,
    pub tokens_fed: u64,
    pub mean_nll: f64,
    pub ppl: f64,
    pub buckets_linear: Vec<BucketRow>,
    pub buckets_log2: Vec<BucketRow>,
    /// `--train-len`, else the model directory's training.json.
    pub train_len: Option<u64>,
    pub t_forget: Option<Verdict>,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub nll_out: Vec<String>,
    /// The raw sums behind every number above (what `stuffed merge` adds up across shards).
    pub acc: Acc,
    /// `--vs-state`: this stream against the reference stream over the same tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
}

/// `--vs-state`'s running sums: per position, ΔNLL = NLL(this stream) − NLL(reference) and
/// KL(p_reference ‖ p_this), into linear and power-of-two buckets.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DriftAcc {
    /// The reference stream's state storage (`f32`).
    pub reference: String,
    delta_linear: Buckets,
    delta_log2: Buckets,
    kl_linear: Buckets,
    kl_log2: Buckets,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets::new(0)
    }
}

impl DriftAcc {
    fn new(reference: String, width: u64) -> DriftAcc {
        DriftAcc {
            reference,
            delta_linear: Buckets::new(width),
            delta_log2: Buckets::new(0),
            kl_linear: Buckets::new(width),
            kl_log2: Buckets::new(0),
        }
    }

    fn add(&mut self, pos: u64, delta: f64, kl: f64) {
        self.delta_linear.add_f64(pos, delta);
        self.delta_log2.add_f64(pos, delta);
        self.kl_linear.add_f64(pos, kl);
        self.kl_log2.add_f64(pos, kl);
    }
}

/// One bucket of a drift: both streams' mean NLL, their difference with its standard error, and
/// the mean KL(p_reference ‖ p_this).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DriftRow {
    pub start: u64,
    pub end: u64,
    pub count: u64,
    pub mean_nll: f64,
    pub mean_nll_ref: f64,
    pub delta_nll: f64,
    pub delta_stderr: f64,
    pub kl: f64,
}

/// `--vs-state`'s report, derived from its sums.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Drift {
    pub reference: String,
    pub buckets_linear: Vec<DriftRow>,
    pub buckets_log2: Vec<DriftRow>,
    /// Start of the first linear bucket whose mean ΔNLL exceeds 0.01 nats (none: not within
    /// `evaluated_len` tokens).
    pub first_over_0_01: Option<u64>,
    /// The same for 0.1 nats.
    pub first_over_0_1: Option<u64>,
    pub evaluated_len: u64,
    pub acc: DriftAcc,
}

/// The drift rows of one scheme: this stream's buckets `nll` beside the ΔNLL and KL sums.
fn drift_rows(nll: &Buckets, delta: &Buckets, kl: &Buckets) -> Vec<DriftRow> {
    nll.rows_iter()
        .zip(delta.rows_iter())
        .zip(kl.rows_iter())
        .map(|((n, d), k)| DriftRow {
            start: n.start,
            end: n.end,
            count: n.count,
            mean_nll: n.mean_nll,
            mean_nll_ref: n.mean_nll - d.mean_nll,
            delta_nll: d.mean_nll,
            delta_stderr: d.stderr,
            kl: k.mean_nll,
        })
        .collect()
}

impl Drift {
    /// Every number from the sums `acc` and this stream's `nll` sums.
    fn derive(acc: DriftAcc, nll: &Acc) -> Drift {
        let linear = drift_rows(&nll.linear, &acc.delta_linear, &acc.kl_linear);
        let first = |t: f64| linear.iter().find(|r| r.delta_nll > t).map(|r| r.start);
        Drift {
            reference: acc.reference.clone(),
            first_over_0_01: first(0.01),
            first_over_0_1: first(0.1),
            buckets_log2: drift_rows(&nll.log2, &acc.delta_log2, &acc.kl_log2),
            buckets_linear: linear,
            evaluated_len: nll.longest,
            acc,
        }
    }

    /// `start 1024`, or `not within N tokens`.
    pub fn first_over_text(at: Option<u64>, evaluated: u64) -> String {
        at.map_or(format!("not within {evaluated} tokens"), |s| format!("from the bucket at {s}"))
    }
}

/// What a checkpoint holds besides the state and the pending hidden row.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Snapshot {
    fingerprint: String,
    /// What the fingerprint hashes, so that a refused resume can say what differs.
    key: serde_json::Value,
    model_index: usize,
    doc_index: usize,
    doc_pos: u64,
    acc: Acc,
    finished: Vec<RunResult>,
    /// (file, bytes written) of the current run's NLL stream.
    nll_len: Option<(String, u64)>,
    /// State normalization's calibrated τ, if any.
    tau: Vec<f32>,
}

/// Documents with their index among all of them: one per input, or one stream of all of them
/// (`--concat`); with a shard, only its share. Also how many there are in all.
fn documents(inputs: &[Input], o: &Options) -> (Vec<(usize, Vec<Input>)>, usize) {
    let all: Vec<Vec<Input>> =
        if o.concat { vec![inputs.to_vec()] } else { inputs.iter().map(|i| vec![i.clone()]).collect() };
    let (total, mine) = (all.len(), |i: usize| o.shard.is_none_or(|(k, n)| i % n == k - 1));
    (all.into_iter().enumerate().filter(|(i, _)| mine(*i)).collect(), total)
}

/// Everything that decides the numbers: models (by content), inputs' content, options, and whether
/// `--fast-matmul` changes the products of the models' matrix `dtypes`.
fn run_key(
    models: &[serde_json::Value],
    dtypes: &[&str],
    inputs: &[Input],
    hashes: &[String],
    o: &Options,
) -> serde_json::Value {
    let mut key = serde_json::json!({
        "models": models,
        "inputs": inputs.iter().map(Input::name).collect::<Vec<_>>(),
        "hashes": hashes,
        "options": deciding(o), "nll_out": o.nll_out, "shard": o.shard,
    });
    crate::exec::mark_matmul_mode(&mut key, dtypes.iter().copied());
    key
}

/// The options that decide the numbers of a run (not where it writes, when it checkpoints, or its share).
fn deciding(o: &Options) -> serde_json::Value {
    let mut v = serde_json::json!({
        "chunk": o.chunk, "bucket": o.bucket, "train_len": o.train_len, "max_tokens": o.max_tokens,
        "concat": o.concat, "repeat_to": o.repeat_to, "tokenizer": o.tokenizer,
        "forget": o.forget.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
    });
    // Only when asked for: an f32 run keeps the fingerprint it had before the flag existed.
    if !o.state.is_f32() {
        v["state"] = serde_json::json!(o.state);
    }
    if let Some(s) = o.vs_state {
        v["vs_state"] = serde_json::json!(s);
    }
    if let Some(m) = &o.vs_model {
        v["vs_model"] = serde_json::json!(m);
    }
    v
}

/// `a + b` of two shards' counts, or an error: counts read back may hold anything below 2^64, and
/// their sum past it is no run's (the long fuzz: two shards' scored tokens overflowed the merge).
fn added(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_add(b).ok_or_else(|| anyhow!("the shards' {what} add up past 2^64 - 1, which no run can produce"))
}

const CKPT: &str = "ppl.checkpoint.safetensors";

fn save_checkpoint(out: &Path, snap: &Snapshot, scorer: &ScorerState) -> Result<()> {
    report::save_checkpoint(&out.join(CKPT), &serde_json::to_string(snap)?, &StateSlot::Run.tensors(scorer))
}

/// A checkpoint read back: where the run stood, and its scorer there.
struct Resumed {
    snap: Snapshot,
    scorer: ScorerState,
}

fn load_checkpoint(out: &Path) -> Result<Resumed> {
    let path = out.join(CKPT);
    let writes = "a run writes one every --checkpoint-secs, --checkpoint-every tokens and at --stop-after";
    let mut c = report::load_checkpoint::<Snapshot>(&path, writes)?;
    let scorer = c.take_state(StateSlot::Run, c.snapshot.tau.clone())?;
    Ok(Resumed { snap: c.snapshot, scorer })
}

/// Which run a checkpoint belongs to: its fingerprint and the key it hashes.
#[derive(Clone, Copy)]
struct RunAt<'a> {
    fp: &'a str,
    key: &'a serde_json::Value,
}

/// How the stream of one run ended.
enum Flow {
    Done,
    Stopped,
}

/// `stuffed ppl`: every model over every document; writes results.json, loss.csv, loss.svg.
/// `cont` says what to do with a checkpoint already in `out`.
pub fn run(models: &[PathBuf], inputs: &[Input], o: &Options, out: &Path, cont: Continue) -> Result<Vec<RunResult>> {
    let _armed = crate::interrupt::arm(); // from the start: a signal during loading is caught too
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let hashes = inputs.iter().map(Input::sha256).collect::<Result<Vec<_>>>()?;
    // Every model, tokenizer and method is checked before the first run, so that a bad last one does
    // not end the command after the others' work (the checkpoint writes no results.json).
    let (mut model_keys, mut dtypes) = (Vec::new(), Vec::new());
    for mpath in models {
        let model = Model::load(mpath)?;
        for forget in &o.forget {
            Model::load(mpath)?.set_forget(*forget)?;
        }
        model.tokenizer(o.tokenizer.as_deref())?;
        model_keys.push(super::model_key(&model));
        dtypes.extend(model.matrix_dtypes());
    }
    // A reference model's products count as much (`--fast-matmul` may round its activations alone).
    if let Some(m) = &o.vs_model {
        dtypes.extend(Model::load(m)?.matrix_dtypes());
    }
    let key = run_key(&model_keys, &dtypes, inputs, &hashes, o);
    let fp = report::fingerprint(&key)?;
    let ckpt = out.join(CKPT);
    if cont == Continue::Resume && !ckpt.exists() {
        // A requeued job whose run already finished: its results stand.
        if let Some(runs) = finished_runs(out, &fp)? {
            eprintln!("ppl: {} already holds this run's results; nothing to resume", out.display());
            return Ok(runs);
        }
    }
    let mut snap = if cont.resumes("ppl", out, std::slice::from_ref(&ckpt))? {
        let r = load_checkpoint(out)?;
        if r.snap.fingerprint != fp {
            return Err(super::other_run(&ckpt, &r.snap.key, &key));
        }
        for (i, f) in r.snap.finished.iter().enumerate() {
            f.acc.validate(&format!("{}: finished run {i}", ckpt.display()), o.bucket, f.train_len)?;
        }
        Some(r)
    } else {
        None
    };
    let mut finished: Vec<RunResult> = snap.as_ref().map(|s| s.snap.finished.clone()).unwrap_or_default();
    let first_model = finished.len();
    let mut processed = 0u64;
    // One run per (model, forgetting method), model-major.
    let jobs: Vec<(&PathBuf, crate::forget::ForgetSpec)> =
        models.iter().flat_map(|m| o.forget.iter().map(move |f| (m, *f))).collect();
    for (mi, (mpath, forget)) in jobs.iter().enumerate().skip(first_model) {
        let mut model = Model::load(mpath)?;
        model.set_forget(*forget)?;
        model.state_precision = o.state;
        // `--vs-state`: the same model, its state stored in the other type; `--vs-model`: the
        // reference model, under the same method and state type.
        let vs_model = match (o.vs_state, &o.vs_model) {
            (Some(dtype), _) => {
                let mut m = Model::load(mpath)?;
                m.set_forget(*forget)?;
                m.state_precision = StatePrecision { dtype, ..o.state };
                Some(m)
            }
            (None, Some(path)) => {
                let mut m = Model::load(path)?;
                m.set_forget(*forget)?;
                m.state_precision = o.state;
                Some(m)
            }
            (None, None) => None,
        };
        let tok = model.tokenizer(o.tokenizer.as_deref())?;
        let resumed = snap.take().filter(|s| s.snap.model_index == mi);
        let at = RunAt { fp: &fp, key: &key };
        let job = Job {
            model: &model,
            vs_model: vs_model.as_ref(),
            tok: &tok,
            mi,
            n_models: jobs.len(),
            inputs,
            o,
            out,
            at,
            finished: &finished,
        };
        match run_model(&job, resumed, &mut processed)? {
            (Flow::Done, r, vs) => {
                finished.push(r);
                finished.extend(vs);
            }
            (Flow::Stopped, ..) => {
                eprintln!("stopped after {processed} tokens; checkpoint in {}; continue with --resume", out.display());
                return Ok(finished);
            }
        }
    }
    let inputs_json = inputs
        .iter()
        .zip(&hashes)
        .map(|(i, h)| serde_json::json!({"name": i.name(), "input": input_source(i), "sha256": h}))
        .collect();
    let matmul = (o.device == Device::Cpu).then(|| crate::exec::matmul_record(dtypes.iter().copied()));
    write_outputs(out, serde_json::Value::Array(inputs_json), o, &finished, Some(&fp), None, matmul)?;
    let _ = std::fs::remove_file(out.join(CKPT));
    Ok(finished)
}

/// `--repeat-to` shorter than a document repeats nothing: it cuts, and says so (once per document).
fn say_if_cut(stream: &DocStream, o: &Options, parts: &[Input]) {
    if let Some(n) = o.repeat_to.filter(|&n| stream.cut_before_end() && o.max_tokens.is_none_or(|m| n <= m)) {
        let doc = if parts.len() == 1 { parts[0].name() } else { "the concatenated stream".into() };
        eprintln!("ppl: --repeat-to {n} is shorter than {doc}: it is cut at {n} tokens, not repeated");
    }
}

/// An input as results.json names it: a file's path as a plain string, else the input's name.
fn input_source(i: &Input) -> String {
    match i {
        Input::File(p) => p.display().to_string(),
        other => other.name(),
    }
}

/// One (model, method) run of `ppl`: what it reads, where it writes, and the runs finished before it.
struct Job<'a> {
    model: &'a Model,
    /// `--vs-state`'s reference stream's model.
    vs_model: Option<&'a Model>,
    tok: &'a Tokenizer,
    mi: usize,
    n_models: usize,
    inputs: &'a [Input],
    o: &'a Options,
    out: &'a Path,
    at: RunAt<'a>,
    finished: &'a [RunResult],
}

/// A job under way: its scorer, accumulators and checkpoint cadence, carried across documents.
struct Streaming<'a> {
    job: &'a Job<'a>,
    scorer: crate::backend::Scorer<'a>,
    acc: Acc,
    cadence: super::Cadence,
    progress: Progress,
    started: Instant,
    seconds_before: f64,
    /// One call's NLL values.
    nll: Vec<f32>,
    /// `--vs-state`: the reference stream.
    vs: Option<Vs<'a>>,
}

/// `--vs-state`: the reference stream (the same tokens, the state in the other type), its sums,
/// and the two streams' differences.
struct Vs<'a> {
    scorer: crate::backend::Scorer<'a>,
    acc: Acc,
    nll: Vec<f32>,
    head: crate::backend::PairHead<'a>,
    kl: Vec<f64>,
    drift: DriftAcc,
}

/// Runs `job` over its documents from where `resumed` stood (or the start); `processed` counts the
/// tokens this process fed, for `--stop-after`.
#[allow(clippy::type_complexity)]
fn run_model(job: &Job, resumed: Option<Resumed>, processed: &mut u64) -> Result<(Flow, RunResult, Option<RunResult>)> {
    let (model, o) = (job.model, job.o);
    let (docs, n_docs) = documents(job.inputs, o);
    let train_len = o.train_len.or_else(|| recorded_train_len(&dir_of(&model.info.path)));
    let scorer = crate::backend::open(model, o.chunk, model.real_vocab(job.tok), o.device, o.gpu)?;
    let Start { acc, first_doc, mut skip, mut restore, mut nll_len } =
        start(resumed, scorer.state_len(), o, train_len, &job.out.join(CKPT), job.mi)?;
    let vs = match job.vs_model {
        Some(m) => {
            if restore.is_some() {
                bail!("ppl --vs-state and --vs-model keep no checkpoint; there is nothing to resume");
            }
            let real = m.real_vocab(job.tok);
            if real != model.real_vocab(job.tok) || m.net().vocab_rows() < real {
                bail!(
                    "{}: --vs-model: {} ids enter its softmax under this tokenizer, {} for {}: the two models must share a vocabulary",
                    m.info.path.display(),
                    real,
                    model.real_vocab(job.tok),
                    model.info.path.display()
                );
            }
            let reference = match &o.vs_model {
                Some(p) => p.display().to_string(),
                None => m.state_precision.to_string(),
            };
            Some(Vs {
                scorer: crate::backend::open(m, o.chunk, real, o.device, o.gpu)?,
                acc: acc.clone(),
                nll: Vec::with_capacity(o.chunk + 1),
                head: crate::backend::PairHead::new(m, model, real),
                kl: Vec::new(),
                drift: DriftAcc::new(reference, o.bucket),
            })
        }
        None => None,
    };
    // The two streams are not checkpointed (a signal ends the run without one).
    let cadence = match vs {
        Some(_) => super::Cadence::new(None, None),
        None => super::Cadence::new(o.checkpoint_secs, o.checkpoint_every),
    };
    let label = format!("ppl [{}/{}] {} [{}]", job.mi + 1, job.n_models, model.info.path.display(), model.forget);
    let mut run = Streaming {
        job,
        nll: Vec::with_capacity(scorer.chunk() + 1),
        scorer,
        progress: Progress::new(&label, o.repeat_to.or(o.max_tokens).map(|n| n * docs.len() as u64)),
        seconds_before: acc.seconds,
        acc,
        cadence,
        started: Instant::now(),
        vs,
    };
    for (k, (di, parts)) in docs.iter().enumerate().skip(first_doc) {
        let nll_path = nll_path(o, job.mi, job.n_models, *di, n_docs, model, parts);
        let nll_len = nll_len.take().filter(|(f, _)| nll_path.as_deref() == Some(Path::new(f))).map(|x| x.1);
        match restore.take() {
            Some(st) if skip > 0 => run.scorer.restore(&st, skip)?,
            _ => run.scorer.reset()?,
        }
        if let Some(vs) = run.vs.as_mut() {
            vs.scorer.reset()?;
        }
        let doc = Doc { index: k, parts, nll_path, nll_len, skip: std::mem::take(&mut skip) };
        if let Some(flow) = run.document(doc, processed)? {
            return Ok((flow, result(model, job.tok, &run.acc, train_len), None));
        }
    }
    run.progress.finish();
    run.acc.seconds = run.seconds_before + run.started.elapsed().as_secs_f64();
    let Some(mut vs) = run.vs else {
        return Ok((Flow::Done, result_of(model, job.tok, run.acc, train_len), None));
    };
    vs.acc.seconds = run.acc.seconds;
    let reference = result_of(job.vs_model.unwrap_or(model), job.tok, vs.acc, train_len);
    let mut r = result_of(model, job.tok, run.acc, train_len);
    r.drift = Some(Drift { acc: vs.drift, ..Drift::default() });
    Ok((Flow::Done, r.derived(), Some(reference)))
}

/// A document of a job: its index among the job's documents, its inputs, its NLL file (and that
/// file's length at the checkpoint), and the ids a resumed run already fed.
struct Doc<'p> {
    index: usize,
    parts: &'p [Input],
    nll_path: Option<PathBuf>,
    nll_len: Option<u64>,
    skip: u64,
}

impl Streaming<'_> {
    /// Scores `doc` in calls of `--chunk` from `doc.skip` (the scorer stands there), appends its NLL
    /// file, and checkpoints at call boundaries on the cadence; `Some(Flow::Stopped)` when
    /// `--stop-after` ends the run here.
    fn document(&mut self, doc: Doc, processed: &mut u64) -> Result<Option<Flow>> {
        let (job, o) = (self.job, self.job.o);
        let mut nll_file = match &doc.nll_path {
            Some(p) => Some(open_nll(p, doc.nll_len)?),
            None => None,
        };
        if let Some(s) = doc.nll_path.as_ref().map(|p| p.display().to_string()) {
            if !self.acc.nll_files.contains(&s) {
                self.acc.nll_files.push(s);
            }
        }
        let mut feed = TokenFeed::new(doc_stream(job.tok, doc.parts.to_vec(), o.max_tokens, o.repeat_to), doc.skip);
        let mut pos = doc.skip; // doc position of the next token to feed
        loop {
            let ids = feed.take(o.chunk)?;
            if ids.is_empty() {
                break;
            }
            crate::model::check_ids(&ids, job.model.net().vocab_rows(), &doc.parts[0].name())?;
            self.score(&ids, pos, nll_file.as_mut())?;
            let t = ids.len() as u64;
            pos += t;
            self.acc.longest = self.acc.longest.max(pos);
            self.acc.tokens_fed += t;
            if let Some(vs) = self.vs.as_mut() {
                vs.acc.longest = vs.acc.longest.max(pos);
                vs.acc.tokens_fed += t;
            }
            *processed += t;
            self.cadence.fed(t);
            self.progress.set(self.acc.tokens_fed);
            let stop = o.stop_after.is_some_and(|n| *processed >= n);
            let at_boundary = ids.len() == o.chunk && !feed.done();
            if let Some(due) = self.cadence.due(stop).filter(|_| self.vs.is_some()) {
                if let Some(sig) = due.signal {
                    self.progress.finish();
                    bail!("{sig} after {processed} tokens: ppl --vs-state and --vs-model keep no checkpoint; run it again");
                }
                continue;
            }
            if let Some(due) = self.cadence.due(stop).filter(|_| at_boundary) {
                let at = DocAt { model_index: job.mi, doc_index: doc.index, doc_pos: pos };
                self.checkpoint(at, doc.nll_path.as_deref().zip(nll_file.as_mut()))?;
                if let Some(sig) = due.signal {
                    self.progress.finish();
                    bail!(
                        "{sig} after {processed} tokens: checkpoint in {}; continue with --resume",
                        job.out.display()
                    );
                }
                if stop {
                    self.progress.finish();
                    return Ok(Some(Flow::Stopped));
                }
            }
        }
        if let Some(mut f) = nll_file {
            f.flush()?;
        }
        say_if_cut(feed.stream(), o, doc.parts);
        Ok(None)
    }

    /// One call of `ids` at document position `pos`: every token after the pending last row of the
    /// previous call is scored (else all but the first), into the accumulators and the NLL file.
    fn score(&mut self, ids: &[u32], pos: u64, nll_file: Option<&mut BufWriter<std::fs::File>>) -> Result<()> {
        let had_pending = match self.vs.as_mut() {
            None => self.scorer.score(ids, &mut self.nll)?,
            // The reference stream over the same ids in its own session (its sums are a separate
            // run's); one head scores both streams' rows and their KL.
            Some(vs) => {
                let had = self.scorer.feed_rows(ids)?;
                if vs.scorer.feed_rows(ids)? != had {
                    bail!("ppl --vs-state, --vs-model: the two streams scored different positions");
                }
                let (reference, this) = (scored_rows(vs.scorer.as_ref())?, scored_rows(self.scorer.as_ref())?);
                vs.head.score(reference, this, &mut vs.nll, &mut self.nll, &mut vs.kl)?;
                had
            }
        };
        // Position of the first target: the pending row predicts `pos`, else the call's second token.
        let first = if had_pending { pos } else { pos + 1 };
        self.acc.add(first, &self.nll);
        if let Some(f) = nll_file {
            f.write_all(bytemuck::cast_slice(&self.nll))?;
        }
        if let Some(vs) = self.vs.as_mut() {
            vs.acc.add(first, &vs.nll);
            for (i, (&a, &b)) in self.nll.iter().zip(&vs.nll).enumerate() {
                vs.drift.add(first + i as u64, a as f64 - b as f64, vs.kl[i]);
            }
        }
        Ok(())
    }

    /// A checkpoint at a call boundary (`nll`: the document's NLL file, flushed and its length kept).
    fn checkpoint(&mut self, doc: DocAt, nll: Option<(&Path, &mut BufWriter<std::fs::File>)>) -> Result<()> {
        self.cadence.saved();
        self.acc.seconds = self.seconds_before + self.started.elapsed().as_secs_f64();
        let job = self.job;
        save_at(job.out, &job.at, doc, &self.acc, job.finished, nll, self.scorer.as_ref())
    }
}

/// The rows a backend's last call scored (`--vs-state` runs on the CPU, which keeps them).
fn scored_rows(s: &dyn crate::backend::Backend) -> Result<crate::backend::ScoredRows<'_>> {
    s.scored_rows().ok_or_else(|| anyhow!("ppl --vs-state and --vs-model run on the CPU only"))
}

/// Where a model's run starts: its accumulators, the document and position to continue from, the
/// scorer state there and the NLL file's length (a resume), or the beginning.
struct Start {
    acc: Acc,
    first_doc: usize,
    skip: u64,
    restore: Option<ScorerState>,
    nll_len: Option<(String, u64)>,
}

/// [`Start`] from the checkpoint `ckpt` (checked against model `mi`'s state size and the options),
/// or fresh.
fn start(
    resumed: Option<Resumed>,
    state_len: usize,
    o: &Options,
    train_len: Option<u64>,
    ckpt: &Path,
    mi: usize,
) -> Result<Start> {
    let Some(Resumed { snap: s, scorer: st }) = resumed else {
        let acc = Acc {
            linear: Buckets::new(o.bucket),
            log2: Buckets::new(0),
            verdict: train_len.map(|t| Buckets::new(verdict_width(t))),
            sum: 0.0,
            count: 0,
            longest: 0,
            seconds: 0.0,
            tokens_fed: 0,
            nll_files: Vec::new(),
        };
        return Ok(Start { acc, first_doc: 0, skip: 0, restore: None, nll_len: None });
    };
    if st.state.len() != state_len {
        bail!("{}: checkpoint state has {} values, the model needs {state_len}", ckpt.display(), st.state.len());
    }
    s.acc.validate(&format!("{}: model {mi}", ckpt.display()), o.bucket, train_len)?;
    Ok(Start { acc: s.acc, first_doc: s.doc_index, skip: s.doc_pos, restore: Some(st), nll_len: s.nll_len })
}

/// Where in the run a checkpoint stands: model, document and position in it.
struct DocAt {
    model_index: usize,
    doc_index: usize,
    doc_pos: u64,
}

/// A checkpoint at a call boundary: the accumulators, the finished models' results, the NLL file's
/// length (flushed) and the scorer's state.
fn save_at(
    out: &Path,
    at: &RunAt,
    doc: DocAt,
    acc: &Acc,
    finished: &[RunResult],
    nll: Option<(&Path, &mut BufWriter<std::fs::File>)>,
    scorer: &dyn crate::backend::Backend,
) -> Result<()> {
    let nll_len = match nll {
        Some((p, f)) => {
            f.flush()?;
            Some((p.display().to_string(), f.get_mut().stream_position()?))
        }
        None => None,
    };
    let now = scorer.snapshot()?;
    let snap = Snapshot {
        fingerprint: at.fp.to_string(),
        key: at.key.clone(),
        model_index: doc.model_index,
        doc_index: doc.doc_index,
        doc_pos: doc.doc_pos,
        acc: acc.clone(),
        finished: finished.to_vec(),
        nll_len,
        tau: now.tau.clone(),
    };
    save_checkpoint(out, &snap, &now)
}

fn open_nll(path: &Path, resume_len: Option<u64>) -> Result<BufWriter<std::fs::File>> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| anyhow!("{}: cannot create: {e}", parent.display()))?;
    }
    let f = match resume_len {
        Some(len) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| anyhow!("{}: cannot reopen: {e}", path.display()))?;
            f.set_len(len)?;
            let mut f = f;
            f.seek(std::io::SeekFrom::Start(len))?;
            f
        }
        None => std::fs::File::create(path).map_err(|e| anyhow!("{}: cannot create: {e}", path.display()))?,
    };
    Ok(BufWriter::new(f))
}

/// `--nll-out PATH`: the file itself for one model and one stream, else `PATH/<model>__<doc>.f32`.
fn nll_path(
    o: &Options,
    mi: usize,
    n_models: usize,
    di: usize,
    n_docs: usize,
    model: &Model,
    parts: &[Input],
) -> Option<PathBuf> {
    let base = o.nll_out.as_ref()?;
    if n_models == 1 && n_docs == 1 {
        return Some(base.clone());
    }
    let doc = if parts.len() == 1 { parts[0].name() } else { "concat".into() };
    // The method in a file name: `rri:a=0.9999,b=0.75` → `rri-a0.9999_b0.75`.
    let method: String = model.forget.to_string().replace(':', "-").replace(',', "_").replace('=', "");
    Some(base.join(format!("{mi:02}_{}__{method}__{di:03}_{doc}.f32", model_name(&model.info))))
}

/// A model's directory (or file) name, as rows and file names show it (a cached snapshot: the model's name).
pub fn model_name(info: &ModelInfo) -> String {
    if let Some(name) = crate::hub::snapshot_name(&info.path) {
        return name; // a model from the HF cache: its name, not its snapshot's commit
    }
    info.path.file_name().map_or("model".into(), |n| n.to_string_lossy().to_string())
}

/// The training length a model directory records (`training.json`, as tools/train_tiny.py writes).
pub fn recorded_train_len(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("training.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("train_len")?.as_u64()
}

fn result(model: &Model, tok: &Tokenizer, acc: &Acc, train_len: Option<u64>) -> RunResult {
    result_of(model, tok, acc.clone(), train_len)
}

/// [`result`] taking the accumulators (no second copy of a long run's buckets).
fn result_of(model: &Model, tok: &Tokenizer, acc: Acc, train_len: Option<u64>) -> RunResult {
    RunResult {
        model: model.info.clone(),
        precision: serde_json::json!({
            "weights": model.info.weight_dtype, "compute": "f32",
            "state": model.state_precision.to_string(), "accumulators": "f64"
        }),
        forget: model.forget.to_string(),
        tokenizer: tok.source.clone(),
        tokens_scored: 0,
        tokens_fed: 0,
        mean_nll: f64::NAN,
        ppl: f64::NAN,
        buckets_linear: Vec::new(),
        buckets_log2: Vec::new(),
        train_len,
        t_forget: None,
        seconds: 0.0,
        tokens_per_s: 0.0,
        nll_out: Vec::new(),
        acc,
        drift: None,
    }
    .derived()
}

impl RunResult {
    /// The model's directory name and the forgetting method, as every printed row, CSV row, plot
    /// legend and NLL file names a run: `mamba2-tiny [rri:a=0.9999,b=0.75]`.
    pub fn label(&self) -> String {
        match self.precision["state"].as_str().filter(|&s| s != "f32") {
            Some(state) => format!("{} [{}] state {state}", model_name(&self.model), self.forget),
            None => format!("{} [{}]", model_name(&self.model), self.forget),
        }
    }

    /// Every number that follows from the accumulators, (re)computed from them.
    fn derived(mut self) -> RunResult {
        let acc = &self.acc;
        self.mean_nll = if acc.count > 0 { acc.sum / acc.count as f64 } else { f64::NAN };
        self.ppl = self.mean_nll.exp();
        (self.tokens_scored, self.tokens_fed) = (acc.count, acc.tokens_fed);
        (self.buckets_linear, self.buckets_log2) = (acc.linear.rows(), acc.log2.rows());
        self.t_forget = self.train_len.zip(acc.verdict.as_ref()).map(|(t, b)| t_forget(b, t, acc.longest));
        self.seconds = acc.seconds;
        self.tokens_per_s = acc.tokens_fed as f64 / acc.seconds.max(1e-9);
        self.nll_out = acc.nll_files.clone();
        self.drift = self.drift.take().map(|d| Drift::derive(d.acc, &self.acc));
        self
    }
}

/// The kind a ppl results.json is sealed as (`report::seal`).
pub const RESULTS_KIND: &str = "ppl-results";

/// The runs of a finished results.json in `out` made with fingerprint `fp`; a damaged one is an error.
fn finished_runs(out: &Path, fp: &str) -> Result<Option<Vec<RunResult>>> {
    let path = out.join("results.json");
    if !path.exists() {
        return Ok(None);
    }
    let v = report::read_sealed(&path, RESULTS_KIND, report::Older::Refuse)?.doc;
    if v["fingerprint"].as_str() != Some(fp) {
        return Ok(None);
    }
    let runs = read_runs(&path, &v)?;
    Ok(Some(runs))
}

/// The runs of a results.json document `v` read from `path`, each one's sums validated against the
/// options it records and every derived number recomputed from them.
fn read_runs(path: &Path, v: &serde_json::Value) -> Result<Vec<RunResult>> {
    let o: Options =
        serde_json::from_value(v["options"].clone()).map_err(|e| anyhow!("{}: options: {e}", path.display()))?;
    let runs: Vec<RunResult> =
        serde_json::from_value(v["runs"].clone()).map_err(|e| anyhow!("{}: runs: {e}", path.display()))?;
    for (i, r) in runs.iter().enumerate() {
        r.acc.validate(&format!("{}: run {i}", path.display()), o.bucket, r.train_len)?;
        r.model.check_read_back(path)?;
    }
    Ok(runs.into_iter().map(RunResult::derived).collect())
}

/// results.json, loss.csv and loss.svg; `fp` (a run's fingerprint, not a merge's) lets a later
/// `--resume` of the same run see that it finished.
fn write_outputs(
    out: &Path,
    inputs: serde_json::Value,
    o: &Options,
    runs: &[RunResult],
    fp: Option<&str>,
    shards: Option<&[serde_json::Value]>,
    matmul: Option<serde_json::Value>,
) -> Result<()> {
    // Streamed, not built as a JSON tree: the runs' accumulators grow with the stream's length (the
    // tree and its text took ≈ 15 bytes a token past 1M tokens). Keys in the order a JSON map sorts them.
    #[derive(Serialize)]
    struct Results<'a> {
        command: &'a str,
        fingerprint: Option<&'a str>,
        inputs: serde_json::Value,
        /// The CPU matrix kernel and mode (`{"simd", "mode"}`); absent for CUDA runs.
        #[serde(skip_serializing_if = "Option::is_none")]
        matmul: Option<serde_json::Value>,
        options: &'a Options,
        peak_rss_bytes: u64,
        runs: &'a [RunResult],
        scoring: &'a str,
        /// A merge's shards, each with its own process facts (path, peak memory, seconds, tokens).
        #[serde(skip_serializing_if = "Option::is_none")]
        shards: Option<&'a [serde_json::Value]>,
        stuffed_version: &'a str,
    }
    let json = Results {
        command: "ppl",
        fingerprint: fp,
        stuffed_version: env!("CARGO_PKG_VERSION"),
        options: o,
        matmul,
        scoring: "NLL = −log softmax(logits at t−1)[token t] over the real vocab, positions t ≥ 1; \
                    bucket means pool every (document, position) pair in the bucket",
        inputs,
        runs,
        peak_rss_bytes: peak_rss_bytes(),
        shards,
    };
    report::write_sealed(&out.join("results.json"), RESULTS_KIND, &json)?;
    report::write_atomic_with(&out.join("loss.csv"), |csv| {
        writeln!(csv, "model,method,scheme,start,end,count,mean_nll,ppl,stderr")?;
        for r in runs {
            let name = r.model.path.display().to_string().replace(',', ";");
            let method = r.forget.replace(',', ";");
            for (scheme, rows) in
                [(format!("linear{}", o.bucket), &r.buckets_linear), ("log2".to_string(), &r.buckets_log2)]
            {
                for b in rows {
                    writeln!(
                        csv,
                        "{name},{method},{scheme},{},{},{},{:.6},{:.4},{:.6}",
                        b.start, b.end, b.count, b.mean_nll, b.ppl, b.stderr
                    )?;
                }
            }
        }
        Ok(())
    })?;
    write_atomic(&out.join("loss.svg"), plot(runs, o).as_bytes())?;
    write_drift(out, runs, o)?;
    write_logx_plot(out, runs, o)
}

/// `--vs-state`: drift.csv (every bucket of both schemes) and drift.svg (ΔNLL and KL against
/// log2(position)).
fn write_drift(out: &Path, runs: &[RunResult], o: &Options) -> Result<()> {
    let drifts: Vec<(&RunResult, &Drift)> = runs.iter().filter_map(|r| r.drift.as_ref().map(|d| (r, d))).collect();
    if drifts.is_empty() {
        return Ok(());
    }
    report::write_atomic_with(&out.join("drift.csv"), |csv| {
        writeln!(
            csv,
            "model,method,state,reference,scheme,start,end,count,mean_nll,mean_nll_ref,delta_nll,delta_stderr,kl"
        )?;
        for (r, d) in &drifts {
            let name = r.model.path.display().to_string().replace(',', ";");
            let method = r.forget.replace(',', ";");
            let state = r.precision["state"].as_str().unwrap_or("?");
            for (scheme, rows) in
                [(format!("linear{}", o.bucket), &d.buckets_linear), ("log2".to_string(), &d.buckets_log2)]
            {
                for b in rows {
                    writeln!(
                        csv,
                        "{name},{method},{state},{},{scheme},{},{},{},{:.6},{:.6},{:.3e},{:.3e},{:.3e}",
                        d.reference,
                        b.start,
                        b.end,
                        b.count,
                        b.mean_nll,
                        b.mean_nll_ref,
                        b.delta_nll,
                        b.delta_stderr,
                        b.kl
                    )?;
                }
            }
        }
        Ok(())
    })?;
    use crate::report::svg::{LinePlot, Series};
    let mid = |b: &DriftRow| (b.start + b.end) as f64 / 2.0;
    let series: Vec<Series> = drifts
        .iter()
        .flat_map(|(r, d)| {
            [
                Series {
                    name: format!("{} ΔNLL vs {}", r.label(), d.reference),
                    points: d.buckets_log2.iter().map(|b| (mid(b), b.delta_nll)).collect(),
                    markers: false,
                },
                Series {
                    name: format!("{} KL({} ‖ this)", r.label(), d.reference),
                    points: d.buckets_log2.iter().map(|b| (mid(b), b.kl)).collect(),
                    markers: false,
                },
            ]
        })
        .collect();
    let svg = LinePlot {
        title: if o.vs_model.is_some() { "Drift against a reference model" } else { "State-precision drift" },
        x_label: "position (tokens, log scale)",
        y_label: "mean ΔNLL and mean KL (nats)",
        log_x: true,
        vlines: Vec::new(),
    }
    .render(&series);
    write_atomic(&out.join("drift.svg"), svg.as_bytes())
}

/// Beside a linear loss.svg, the same curves against log2(position) (loss_logx.svg), as the
/// no-argument run draws: past a short training length a linear axis squeezes the transition
/// into its first pixels.
fn write_logx_plot(out: &Path, runs: &[RunResult], o: &Options) -> Result<()> {
    if o.log_x {
        return Ok(());
    }
    write_atomic(&out.join("loss_logx.svg"), plot(runs, &Options { log_x: true, ..o.clone() }).as_bytes())
}

/// Loss against position, one curve per model; log-x uses the power-of-two buckets.
pub fn plot(runs: &[RunResult], o: &Options) -> String {
    use crate::report::svg::{LinePlot, Series};
    let series: Vec<Series> = runs
        .iter()
        .map(|r| {
            let rows = if o.log_x { &r.buckets_log2 } else { &r.buckets_linear };
            Series {
                name: r.label(),
                points: rows.iter().map(|b| ((b.start + b.end) as f64 / 2.0, b.mean_nll)).collect(),
                markers: false,
            }
        })
        .collect();
    LinePlot {
        title: "Loss against position",
        x_label: if o.log_x { "position (tokens, log scale)" } else { "position (tokens)" },
        y_label: "mean NLL (nats)",
        log_x: o.log_x,
        vlines: {
            let mut t: Vec<u64> = runs.iter().filter_map(|r| r.train_len).collect();
            t.sort_unstable();
            t.dedup();
            t.into_iter().map(|t| (t as f64, format!("train len {t}"))).collect()
        },
    }
    .render(&series)
}

impl Acc {
    /// The NLLs of consecutive targets from stream position `first` into every scheme's buckets.
    fn add(&mut self, first: u64, nll: &[f32]) {
        for (i, &v) in nll.iter().enumerate() {
            let q = first + i as u64;
            self.linear.add(q, v);
            self.log2.add(q, v);
            if let Some(b) = self.verdict.as_mut() {
                b.add(q, v);
            }
            self.sum += v as f64;
        }
        self.count += nll.len() as u64;
    }

    /// Checks accumulators read back from a file (a checkpoint or a shard's results.json) against
    /// the options they were made with: bucket widths, each scheme's sums (see `Buckets::validate`)
    /// adding up to the totals, a verdict's sums present iff there is a training length.
    fn validate(&self, what: &str, bucket: u64, train_len: Option<u64>) -> Result<()> {
        if self.linear.width != bucket || self.log2.width != 0 {
            bail!(
                "{what}: bucket widths {} and {} where the run has {bucket} and 0",
                self.linear.width,
                self.log2.width
            );
        }
        let schemes = [Some(&self.linear), Some(&self.log2), self.verdict.as_ref()];
        for (name, b) in ["linear", "log2", "verdict"].iter().zip(schemes) {
            let Some(b) = b else { continue };
            let (count, sum) = b.validate(&format!("{what}: {name} buckets"))?;
            let close = (sum - self.sum).abs() <= 1e-9 * self.sum.abs().max(1.0) * (1 + b.count.len()) as f64;
            if count != self.count || !close {
                bail!(
                    "{what}: the {name} buckets add up to {count} tokens and {sum} nats, the totals say {} and {}",
                    self.count,
                    self.sum
                );
            }
        }
        match (train_len, &self.verdict) {
            (Some(0), _) => bail!("{what}: training length 0 (--train-len takes a positive count)"),
            (Some(t), Some(v)) if v.width == verdict_width(t) => {}
            (Some(t), Some(v)) => {
                bail!("{what}: verdict buckets of {} tokens where --train-len {t} gives {}", v.width, verdict_width(t))
            }
            (Some(t), None) => bail!("{what}: no verdict sums although the run has a training length ({t})"),
            (None, Some(_)) => bail!("{what}: verdict sums although the run has no training length"),
            (None, None) => {}
        }
        if self.count > self.tokens_fed || self.longest > self.tokens_fed || self.seconds.is_nan() || self.seconds < 0.0
        {
            bail!(
                "{what}: {} tokens scored, {} fed, longest document {}, {} s: not what a run writes",
                self.count,
                self.tokens_fed,
                self.longest,
                self.seconds
            );
        }
        Ok(())
    }

    /// Pools another shard's sums into these.
    fn merge(&mut self, o: &Acc) -> Result<()> {
        self.linear.merge(&o.linear)?;
        self.log2.merge(&o.log2)?;
        match (self.verdict.as_mut(), o.verdict.as_ref()) {
            (Some(a), Some(b)) => a.merge(b)?,
            (None, None) => {}
            _ => bail!("one shard has a --train-len verdict and another not"),
        }
        let (count, fed) =
            (added(self.count, o.count, "scored tokens")?, added(self.tokens_fed, o.tokens_fed, "fed tokens")?);
        (self.sum, self.count, self.longest) = (self.sum + o.sum, count, self.longest.max(o.longest));
        (self.seconds, self.tokens_fed) = (self.seconds + o.seconds, fed);
        self.nll_files.extend(o.nll_files.iter().cloned());
        Ok(())
    }
}

/// `stuffed merge` of `ppl --shard k/n` outputs: every shard present once, made with the same models,
/// inputs and options; their sums pooled and every number recomputed, as one unsharded run.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let mut shards = Vec::new();
    for d in dirs {
        let p = d.join("results.json");
        let v = report::read_sealed(&p, RESULTS_KIND, report::Older::Refuse)?.doc;
        let o: Options =
            serde_json::from_value(v["options"].clone()).with_context(|| format!("{}: no options", p.display()))?;
        let runs = read_runs(&p, &v)?;
        let Some((k, n)) = o.shard else { bail!("{}: not a --shard run", p.display()) };
        if k == 0 || k > n {
            bail!("{}: shard {k}/{n} is not a share (need 1 ≤ k ≤ n)", p.display());
        }
        let facts = serde_json::json!({"peak_rss_bytes": v["peak_rss_bytes"], "matmul": v.get("matmul")});
        shards.push((p, k, n, o, v["inputs"].clone(), runs, facts));
    }
    let Some((p0, _, n, o0, inputs, mut runs, _)) = shards.first().cloned() else {
        bail!("merge: give the shard directories")
    };
    // A set, not n flags: n is read from a file.
    let mut seen = std::collections::BTreeSet::new();
    for (i, (p, k, nk, o, inp, rs, _)) in shards.iter().enumerate() {
        if *nk != n || deciding(o) != deciding(&o0) || *inp != inputs {
            bail!("{}: made with other inputs or options than {}", p.display(), p0.display());
        }
        if !seen.insert(*k) {
            bail!("{}: shard {k}/{n} is given twice", p.display());
        }
        let same = |a: &RunResult, b: &RunResult| a.model.path == b.model.path && a.forget == b.forget;
        if rs.len() != runs.len() || !rs.iter().zip(&runs).all(|(a, b)| same(a, b)) {
            bail!("{}: other models or forgetting methods than {}", p.display(), p0.display());
        }
        if i > 0 {
            for (r, s) in runs.iter_mut().zip(rs) {
                r.acc.merge(&s.acc).with_context(|| format!("{}", p.display()))?;
            }
        }
    }
    if seen.len() < n {
        let k = (1..).find(|k| !seen.contains(k)).unwrap_or(n);
        bail!("merge: shard {k}/{n} is missing");
    }
    let runs: Vec<RunResult> = runs.into_iter().map(RunResult::derived).collect();
    let records: Vec<(&Path, Option<&serde_json::Value>)> =
        shards.iter().map(|(p, .., v)| (p.as_path(), v.get("matmul").filter(|m| !m.is_null()))).collect();
    let matmul = super::merged_matmul(&records)?;
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let facts: Vec<serde_json::Value> = shards
        .iter()
        .map(|(p, k, n, _, _, rs, v)| {
            serde_json::json!({
                "shard": format!("{k}/{n}"), "results": p, "peak_rss_bytes": v["peak_rss_bytes"],
                "matmul": v["matmul"],
                "seconds": rs.iter().map(|r| r.seconds).sum::<f64>(),
                "tokens_fed": rs.iter().map(|r| r.tokens_fed).sum::<u64>(),
            })
        })
        .collect();
    write_outputs(out, inputs, &Options { shard: None, nll_out: None, ..o0 }, &runs, None, Some(&facts), matmul)?;
    println!("merged {n} shards into {}/results.json, loss.csv, loss.svg and loss_logx.svg", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded pseudo-noise in [−0.5, 0.5).
    fn noise(n: usize, seed: u64) -> Vec<f64> {
        let mut r = Mix::new(seed);
        (0..n).map(|_| r.below(1 << 20) as f64 / (1 << 20) as f64 - 0.5).collect()
    }

    /// The bootstrap is reproducible with its seed (the same interval twice), moves with another
    /// seed, and brackets the margin itself; a constant series has no spread.
    #[test]
    fn bootstrap_is_seeded() {
        let ins: Vec<f64> = noise(7, 1).iter().map(|x| 5.0 + x).collect();
        let outs: Vec<f64> = noise(500, 2).iter().map(|x| 10.5 + x).collect();
        let a = margin(&ins, &outs, max_of, 25, 300, &mut Vec::new()).unwrap();
        assert_eq!(a, margin(&ins, &outs, max_of, 25, 300, &mut Vec::new()).unwrap());
        let b = margin(&ins, &outs, max_of, 26, 300, &mut Vec::new()).unwrap();
        assert!((a.lo, a.hi) != (b.lo, b.hi), "{a:?} {b:?}");
        assert!(a.lo <= a.ratio && a.ratio <= a.hi + 1e-12, "{a:?}");
        let flat = margin(&[5.0; 4], &[9.0; 40], max_of, 25, 50, &mut Vec::new()).unwrap();
        assert_eq!((flat.lo, flat.hi, flat.ratio, flat.verdict.as_str()), (0.9, 0.9, 0.9, "forgets"));
        let flat = margin(&[5.0; 4], &[11.0; 40], max_of, 25, 50, &mut Vec::new()).unwrap();
        assert_eq!(flat.verdict, "does not forget");
        // L_out near 2·L_in with spread on both sides: undecided.
        let outs: Vec<f64> = noise(500, 3).iter().map(|x| 9.8 + x).collect();
        assert_eq!(margin(&ins, &outs, max_of, 25, 300, &mut Vec::new()).unwrap().verdict, "undecided");
    }

    #[test]
    fn quantile_interpolates() {
        assert_eq!(quantile(&mut [3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&mut [4.0, 1.0, 2.0, 3.0], 0.9), Some(3.7));
        assert_eq!(quantile(&mut [1.0], 0.9), Some(1.0));
        assert_eq!(quantile(&mut [], 0.9), None);
    }

    /// Why the robust variant: over i.i.d. noisy buckets the largest mean grows with their number
    /// (the paper's L_out), the 90th percentile does not.
    #[test]
    fn q90_does_not_grow_with_the_number_of_buckets() {
        let (few, many) = (noise(400, 4), noise(40_000, 5));
        let (m1, m2) = (max_of(&mut few.clone()).unwrap(), max_of(&mut many.clone()).unwrap());
        let (q1, q2) = (quantile(&mut few.clone(), 0.9).unwrap(), quantile(&mut many.clone(), 0.9).unwrap());
        assert!(m2 > m1, "{m1} {m2}");
        assert!((q1 - q2).abs() < 0.03, "{q1} {q2}");
    }

    /// The paper's fields are what they were (the largest bucket means, the 2·L_in rule), beside
    /// the standard errors of those two buckets and the robust variant.
    #[test]
    fn paper_verdict_and_its_neighbours() {
        let mut b = Buckets::new(16);
        for pos in 0..64 * 40 {
            let x = if pos < 64 { 3.0 } else { 5.0 + (pos % 7) as f32 * 0.1 + if pos / 16 == 100 { 3.0 } else { 0.0 } };
            b.add(pos, x + (pos % 3) as f32 * 0.01);
        }
        let v = t_forget(&b, 64, 64 * 40);
        assert_eq!((v.verdict.as_str(), v.bucket_width), ("does not forget", 16));
        assert!((v.l_out.unwrap() - 8.3).abs() < 0.05 && (v.l_in.unwrap() - 3.01).abs() < 0.01, "{v:?}");
        assert!(v.l_in_stderr.unwrap() > 0.0 && v.l_out_stderr.unwrap() > 0.0);
        let q = v.robust.unwrap();
        assert_eq!((q.name.as_str(), q.verdict.as_str()), ("q90", "forgets"));
        assert!(q.l_out.unwrap() < 5.9, "{q:?}");
    }
}
