//! `stuffed effrem`: effective remembrance (Buitrago & Gu, "Understanding and Improving Length
//! Generalization in Recurrent Models", ICML 2025, arXiv 2507.02782): how much the prediction after
//! T tokens still depends on the first t of them,
//!
//! EffRem_T(t) = TV(q(· | x₀ … x_{T−1}), q(· | x_t … x_{T−1})),  TV(p, q) = ½ Σ_v |p_v − q_v|,
//!
//! both runs from the zero state. A model that forgets has EffRem_T(t) ≈ 0 once T − t is well past
//! what it needs; the paper finds models that fail past their training length depend strongly on
//! the earliest tokens (high EffRem at small t). Beside TV, KL(q_full ‖ q_truncated) in nats.
//!
//! Every start t runs once per sequence, from the zero state to the largest target, and gives the
//! truncated distribution at every target T > t on the way; the full context's distributions come
//! from one run of the sequence. Memory is the state and one distribution per target, whatever T.
//! A checkpoint follows every (sequence, start); a resumed run recomputes the sequence's full
//! distributions and writes what an uninterrupted one does, bit for bit.
use crate::backend::{Device, Scorer};
use crate::forget::ForgetSpec;
use crate::model::Model;
use crate::report;
use crate::text::Input;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const RESULT: &str = "effrem.json";
const CKPT: &str = "effrem.checkpoint.json";
const KIND: &str = "effrem";
const CKPT_KIND: &str = "effrem-checkpoint";

#[derive(Clone, Debug, Serialize)]
pub struct Options {
    /// Targets: the prediction after T tokens (ascending, distinct).
    pub at: Vec<usize>,
    /// Starts: the truncated context drops the first t tokens (ascending, distinct, 0 < t < max T).
    pub starts: Vec<usize>,
    /// Sequences: consecutive windows of max T tokens of the text, each from the zero state.
    pub sequences: usize,
    pub forget: ForgetSpec,
    /// Draws a line where the kept context equals the training length (the plot).
    pub train_len: Option<u64>,
    pub chunk: usize,
    #[serde(skip)]
    pub tokenizer: Option<PathBuf>,
    /// Stop (with the checkpoint) after this many (sequence, start) runs; `--resume` continues.
    #[serde(skip)]
    pub stop_after: Option<usize>,
}

impl Options {
    /// The starts of `--points n`: each target's T·j/n for j = 1 … n−1, merged.
    pub fn points(at: &[usize], n: usize) -> Vec<usize> {
        let mut s: Vec<usize> =
            at.iter().flat_map(|&t| (1..n).map(move |j| (t as u128 * j as u128 / n as u128) as usize)).collect();
        s.retain(|&v| v > 0);
        s.sort_unstable();
        s.dedup();
        s
    }

    /// The starts of `--kept`: T − k for every target T and kept context k < T, merged.
    pub fn kept(at: &[usize], kept: &[usize]) -> Vec<usize> {
        let mut s: Vec<usize> =
            at.iter().flat_map(|&t| kept.iter().filter(move |&&k| k < t).map(move |&k| t - k)).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// The (sequence, start) runs in the order they run.
    fn units(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.sequences).flat_map(|s| self.starts.iter().map(move |&t| (s, t)))
    }

    fn max_at(&self) -> usize {
        self.at.last().copied().unwrap_or(0)
    }
}

/// One (target, start) of one sequence.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub at: usize,
    pub tv: f64,
    pub kl: f64,
}

/// One start's run over one sequence: its distances at every target past the start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Unit {
    pub sequence: usize,
    pub start: usize,
    pub points: Vec<Point>,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    fingerprint: String,
    key: serde_json::Value,
    units: Vec<Unit>,
}

/// Whether `u` is run (sequence `s`, start `t`) of `o`: a point at every target past `t`, in order,
/// with 0 ≤ TV ≤ 1 and a finite KL ≥ 0 (a checkpoint holds nothing else).
fn fits(u: &Unit, s: usize, t: usize, o: &Options) -> bool {
    let targets = o.at.iter().filter(|&&a| a > t);
    u.sequence == s
        && u.start == t
        && u.points.len() == targets.clone().count()
        && u.points
            .iter()
            .zip(targets)
            .all(|(p, &a)| p.at == a && (0.0..=1.0 + 1e-9).contains(&p.tv) && p.kl >= 0.0 && p.kl.is_finite())
}

/// Log-probabilities of a logits row over the first `real` ids, in f64.
fn log_softmax(logits: &[f32], real: usize) -> Vec<f64> {
    let row = &logits[..real];
    let lse = super::log_sum_exp(row);
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// TV(p, q) and KL(p ‖ q) of two log-probability vectors.
pub fn distances(p: &[f64], q: &[f64]) -> (f64, f64) {
    let (mut tv, mut kl) = (0f64, 0f64);
    for (&a, &b) in p.iter().zip(q) {
        let (pa, qb) = (a.exp(), b.exp());
        tv += (pa - qb).abs();
        if pa > 0.0 {
            kl += pa * (a - b);
        }
    }
    (0.5 * tv, kl.max(0.0))
}

/// Runs `ids[start..]` from the zero state and hands `each(target index, log-probabilities)` the
/// prediction after every target T > start (the context x_start … x_{T−1}).
fn stream(
    b: &mut Scorer,
    ids: &[u32],
    start: usize,
    at: &[usize],
    real: usize,
    each: &mut dyn FnMut(usize, Vec<f64>) -> Result<()>,
) -> Result<()> {
    b.reset()?;
    let chunk = b.chunk();
    let mut pos = start;
    for (i, &t) in at.iter().enumerate().filter(|(_, &t)| t > start) {
        for piece in ids[pos..t - 1].chunks(chunk) {
            b.feed(piece)?;
            if let Some(sig) = crate::interrupt::raised() {
                bail!("{sig}");
            }
        }
        let mut row = None;
        b.logits(&ids[t - 1..t], &mut |_, l| {
            row = Some(log_softmax(l, real));
            Ok(())
        })?;
        each(i, row.ok_or_else(|| anyhow!("effrem: no logits at {t}"))?)?;
        pos = t;
    }
    Ok(())
}

/// The full context's log-probabilities at every target of one sequence.
fn full(b: &mut Scorer, ids: &[u32], at: &[usize], real: usize) -> Result<Vec<Vec<f64>>> {
    let mut q = vec![Vec::new(); at.len()];
    stream(b, ids, 0, at, real, &mut |i, lp| {
        q[i] = lp;
        Ok(())
    })?;
    Ok(q)
}

/// One start's distances at every target past it, against the full context's `q`.
fn truncated(
    b: &mut Scorer,
    ids: &[u32],
    start: usize,
    at: &[usize],
    q: &[Vec<f64>],
    real: usize,
) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    stream(b, ids, start, at, real, &mut |i, lp| {
        let (tv, kl) = distances(&q[i], &lp);
        if !(tv.is_finite() && kl.is_finite()) {
            bail!("effrem: a non-finite distance at {} tokens, start {start}", at[i]);
        }
        points.push(Point { at: at[i], tv, kl });
        Ok(())
    })?;
    Ok(points)
}

/// Mean and standard error (None for one value).
fn mean_se(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let se = (v.len() > 1).then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt());
    (mean, se)
}

/// The distances of every (target, start) over the sequences.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub at: usize,
    pub start: usize,
    /// Tokens of the truncated context: T − t.
    pub kept: usize,
    pub tv_mean: f64,
    pub tv_se: Option<f64>,
    pub kl_mean: f64,
    pub kl_se: Option<f64>,
    pub sequences: usize,
}

pub fn summarize(units: &[Unit], o: &Options) -> Vec<Summary> {
    let mut out = Vec::new();
    for &t in &o.at {
        for &s in o.starts.iter().filter(|&&s| s < t) {
            let pts: Vec<Point> = units
                .iter()
                .filter(|u| u.start == s)
                .flat_map(|u| u.points.iter().copied())
                .filter(|p| p.at == t)
                .collect();
            if pts.is_empty() {
                continue;
            }
            let (tv_mean, tv_se) = mean_se(&pts.iter().map(|p| p.tv).collect::<Vec<_>>());
            let (kl_mean, kl_se) = mean_se(&pts.iter().map(|p| p.kl).collect::<Vec<_>>());
            out.push(Summary { at: t, start: s, kept: t - s, tv_mean, tv_se, kl_mean, kl_se, sequences: pts.len() });
        }
    }
    out
}

fn check(o: &Options) -> Result<()> {
    if o.at.is_empty() || o.at.windows(2).any(|w| w[0] >= w[1]) || o.at[0] < 2 {
        bail!("effrem: --at takes ascending, distinct token counts ≥ 2");
    }
    if o.starts.is_empty() {
        bail!("effrem: no start to measure (give --starts, --points, or --kept values below a target)");
    }
    if o.starts.windows(2).any(|w| w[0] >= w[1]) || o.starts[0] == 0 {
        bail!("effrem: the starts must be ascending, distinct and ≥ 1 (0 is the full context)");
    }
    if let Some(&s) = o.starts.iter().find(|&&s| s >= o.max_at()) {
        bail!("effrem: start {s} leaves no context before the largest target ({})", o.max_at());
    }
    if o.sequences == 0 {
        bail!("effrem: --sequences must be ≥ 1");
    }
    Ok(())
}

pub fn run(model_path: &Path, inputs: &[Input], o: &Options, out: &Path, cont: super::Continue) -> Result<()> {
    let _armed = crate::interrupt::arm();
    check(o)?;
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut model = Model::load(model_path)?;
    model.set_forget(o.forget)?;
    let tok = model.tokenizer(o.tokenizer.as_deref())?;
    let real = model.real_vocab(&tok);
    let w = o.max_at();
    let need = o.sequences * w;
    let stream_ids = super::feed::doc_stream(&tok, inputs.to_vec(), Some(need as u64), None);
    let ids = super::feed::TokenFeed::new(stream_ids, 0).take(need)?;
    if ids.len() < need {
        bail!(
            "effrem: the text has {} tokens; {} sequences of {w} need {need} (give more text, or fewer/shorter sequences)",
            ids.len(),
            o.sequences
        );
    }
    model.check_ids(&ids, "the text")?;
    let hashes = inputs.iter().map(Input::sha256).collect::<Result<Vec<_>>>()?;
    let (key, fp) = super::run_key(&model, inputs, &hashes, o)?;
    let ckpt = out.join(CKPT);
    let mut units: Vec<Unit> =
        if let Some(c) = super::resume_sealed::<Checkpoint>("effrem", cont, out, &ckpt, CKPT_KIND, (&key, &fp))? {
            if c.units.len() > o.units().count() || !c.units.iter().zip(o.units()).all(|(u, (s, t))| fits(u, s, t, o)) {
                bail!("{}: not a checkpoint of this run (its runs or distances are not this run's)", ckpt.display());
            }
            eprintln!("effrem: resuming after {} of {} runs", c.units.len(), o.sequences * o.starts.len());
            c.units
        } else {
            Vec::new()
        };
    let started = std::time::Instant::now();
    let mut b = crate::backend::open(&model, o.chunk, real, Device::Cpu, Default::default())?;
    let interrupted = |e: anyhow::Error| match crate::interrupt::raised() {
        Some(sig) => anyhow!("{sig}: the finished runs are checkpointed in {}; continue with --resume", out.display()),
        None => e,
    };
    let total = o.units().count();
    // The full context's distributions of the sequence being run (recomputed after a resume).
    let mut full_of: Option<(usize, Vec<Vec<f64>>)> = None;
    for (n, (s, t)) in o.units().skip(units.len()).enumerate() {
        if o.stop_after.is_some_and(|stop| n >= stop) {
            eprintln!(
                "effrem: stopped after {} of {total} runs; checkpoint in {}; continue with --resume",
                units.len(),
                out.display()
            );
            return Ok(());
        }
        let seq = &ids[s * w..(s + 1) * w];
        let q = match full_of.take() {
            Some((of, q)) if of == s => q,
            _ => full(&mut b, seq, &o.at, real).map_err(interrupted)?,
        };
        let points = truncated(&mut b, seq, t, &o.at, &q, real).map_err(interrupted)?;
        full_of = Some((s, q));
        units.push(Unit { sequence: s, start: t, points });
        let c = Checkpoint { fingerprint: fp.clone(), key: key.clone(), units: units.clone() };
        report::write_sealed(&ckpt, CKPT_KIND, &c)?;
        eprintln!("effrem: sequence {}/{}, start {t}: done ({}/{total})", s + 1, o.sequences, units.len());
    }
    let summary = summarize(&units, o);
    write_outputs(&model, inputs, &hashes, o, &units, &summary, out, started.elapsed().as_secs_f64())?;
    if ckpt.exists() {
        std::fs::remove_file(&ckpt).map_err(|e| anyhow!("{}: cannot remove: {e}", ckpt.display()))?;
    }
    print_table(o, &summary);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(
    model: &Model,
    inputs: &[Input],
    hashes: &[String],
    o: &Options,
    units: &[Unit],
    summary: &[Summary],
    out: &Path,
    secs: f64,
) -> Result<()> {
    let doc = serde_json::json!({
        "command": "effrem",
        "model": model.info,
        "inputs": inputs.iter().zip(hashes).map(|(i, h)| serde_json::json!({"name": i.name(), "sha256": h})).collect::<Vec<_>>(),
        "options": o,
        "forget": o.forget.to_string(),
        "matmul": crate::exec::matmul_record(model.matrix_dtypes()),
        "summary": summary,
        "units": units,
        "seconds_this_run": secs,
        "notes": "EffRem_T(t) = TV(q(·|x_0..x_{T-1}), q(·|x_t..x_{T-1})) (Buitrago & Gu 2025), both from the zero state; \
                  kl: KL(q_full ‖ q_truncated) in nats; softmax over the tokenizer's real vocabulary in f64; \
                  at: T, the tokens before the prediction; start: t, the tokens dropped; kept: T − t; \
                  mean and standard error over the sequences (consecutive windows of max T tokens)",
    });
    report::write_sealed(&out.join(RESULT), KIND, &doc)?;
    let mut csv = String::from("at,start,kept,tv_mean,tv_se,kl_mean,kl_se,sequences\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6e}"));
    for r in summary {
        csv += &format!(
            "{},{},{},{:.6e},{},{:.6e},{},{}\n",
            r.at,
            r.start,
            r.kept,
            r.tv_mean,
            opt(r.tv_se),
            r.kl_mean,
            opt(r.kl_se),
            r.sequences
        );
    }
    report::write_atomic(&out.join("effrem.csv"), csv.as_bytes())?;
    let series: Vec<report::svg::Series> =
        o.at.iter()
            .map(|&t| report::svg::Series {
                name: format!("T = {}", report::svg::fmt_tokens(t as u64)),
                points: summary.iter().filter(|r| r.at == t).map(|r| (r.kept as f64, r.tv_mean)).collect(),
                markers: false,
            })
            .collect();
    let svg = report::svg::LinePlot {
        title: "Effective remembrance: TV(full context, last T − t tokens)",
        x_label: "tokens kept, T − t (log scale)",
        y_label: "EffRem_T(t), mean TV",
        log_x: true,
        vlines: o.train_len.map(|l| (l as f64, format!("train len {l}"))).into_iter().collect(),
    }
    .render(&series);
    report::write_atomic(&out.join("effrem.svg"), svg.as_bytes())
}

/// Per target, the TV at the kept contexts nearest T, T/2, T/4, … (all of them are in effrem.csv).
fn print_table(o: &Options, summary: &[Summary]) {
    println!("effrem: mean TV between the full context's prediction and the last `kept` tokens' ({} sequences, --forget {}):", o.sequences, o.forget);
    for &t in &o.at {
        let rows: Vec<&Summary> = summary.iter().filter(|r| r.at == t).collect();
        let mut shown: Vec<&Summary> = Vec::new();
        for k in 0..12 {
            let want = (t >> k).max(1) as f64;
            let near = rows
                .iter()
                .min_by(|a, b| (a.kept as f64 / want).ln().abs().total_cmp(&(b.kept as f64 / want).ln().abs()));
            if let Some(&r) = near.filter(|r| !shown.iter().any(|s| s.start == r.start)) {
                shown.push(r);
            }
        }
        let cells: Vec<String> =
            shown.iter().map(|r| format!("{} {:.3}", report::svg::fmt_tokens(r.kept as u64), r.tv_mean)).collect();
        println!("  T = {:>6}: kept {}", report::svg::fmt_tokens(t as u64), cells.join(" | "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_of_known_distributions() {
        let p = [0.5f64, 0.5, 0.0].map(f64::ln);
        let q = [0.25f64, 0.25, 0.5].map(f64::ln);
        let (tv, kl) = distances(&p, &q);
        assert!((tv - 0.5).abs() < 1e-15, "{tv}");
        assert!((kl - 2f64.ln()).abs() < 1e-15, "{kl}");
        assert_eq!(distances(&q, &q), (0.0, 0.0));
        let lp = log_softmax(&[1.0, 2.0, 3.0, 100.0], 3);
        assert!((lp.iter().map(|v| v.exp()).sum::<f64>() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn points_split_each_target() {
        assert_eq!(Options::points(&[8, 16], 4), vec![2, 4, 6, 8, 12]);
        assert_eq!(Options::points(&[3], 4), vec![1, 2]);
        assert_eq!(Options::kept(&[8, 16], &[4, 8, 16]), vec![4, 8, 12]);
    }
}
