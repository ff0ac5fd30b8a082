//! `stuffed longmamba`: LongMamba's calibration (Ye et al., ICLR 2025, arXiv 2504.16053; read from
//! GATECH-EIC/LongMamba 5da3e17, `load_align_target.py` L26–101 and `mamba_ssm/modules/mamba2.py`
//! L234–300). On `windows` windows of the training length T, evenly spaced through the text (window
//! i starts at ⌊N·i/windows⌋ + 10, as theirs), each from the zero state, it records Δ per token,
//! layer and head (Mamba-2's Δ tap, chunked calls), then per (layer, head):
//!
//! - clamps Δ from above at its k-th largest value, k = max(1, ⌊T·top⌋) (their `clampTop`);
//! - the window's retention exp(A·Σ_t Δ̃_t): a head is *global* when it exceeds `c` (at use);
//! - the threshold θ(L) for the target length L: Δ̃ sorted descending, stretched to L points by
//!   linear interpolation (`F.interpolate`, `align_corners=False`), cumulated; with i the first
//!   index where the cumulative sum exceeds Σ_t Δ̃_t (the training window's total), θ = the stretched
//!   value at i + 1 (their `top_k = argmax(...) + 1`, then `gather`); θ = 0 when L ≤ T;
//!
//! then aggregates both over the windows (mean or max, both written by their script), θ for each
//! of the target lengths (their grid of lengths). At use,
//! `--forget longmamba:file=longmamba.json,b=1,c=0.05,min=3000` sets Δ ← 0 on global heads wherever
//! Δ ≤ b·θ (`get_channelwise_dt_threshold`, `slow_factor 0`), with θ of the target nearest the
//! prompt's length (theirs: `min(available_values, key=|seqlen − x|)`; the longest for a stream of
//! unknown length), on prompts of at least `min` tokens and never on decoded tokens (as theirs).
use super::Continue;
use crate::model::{Family, Model};
use crate::report::{self, Older};
use crate::text::Input;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use stuffed_core::Recurrent;

pub const RESULT: &str = "longmamba.json";
const KIND: &str = "stuffed-longmamba";
const CKPT: &str = "longmamba.checkpoint.json";
const CKPT_KIND: &str = "stuffed-longmamba-checkpoint";

/// How the windows' retentions and thresholds combine (their script writes both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Mean,
    Max,
}

#[derive(Clone, Debug, Serialize)]
pub struct Options {
    /// Tokens per calibration window: the model's training length (LongMamba: 2,000 for Mamba-2).
    pub train_len: usize,
    /// The lengths to extend to (L), ascending: a threshold table for each.
    pub targets: Vec<usize>,
    pub windows: usize,
    /// The share of each window's largest Δ that the clamp flattens (LongMamba ablates 0.10–0.20).
    pub top: f64,
    pub aggregate: Aggregate,
    #[serde(skip)]
    pub tokenizer: Option<PathBuf>,
    /// Stop (with the checkpoint) once this many windows are done; `--resume` continues.
    #[serde(skip)]
    pub stop_after: Option<usize>,
}

/// One window's measurement, per (layer, head) row-major; thresholds per target.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Window {
    retention: Vec<f64>,
    thresholds: Vec<Vec<f64>>,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    fingerprint: String,
    key: serde_json::Value,
    windows: Vec<Window>,
}

/// `dt` clamped from above at its k-th largest value, k = max(1, ⌊len·top⌋).
pub fn clamp_top(dt: &[f64], top: f64) -> Vec<f64> {
    let k = ((dt.len() as f64 * top) as usize).max(1).min(dt.len());
    let mut sorted = dt.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let cap = sorted[k - 1];
    dt.iter().map(|&v| v.min(cap)).collect()
}

/// `src` stretched to `len` points as `torch.nn.functional.interpolate(mode="linear",
/// align_corners=False)`: point i reads src at x = (i + ½)·|src|/len − ½ (clamped at 0), linearly.
pub fn interpolate_linear(src: &[f64], len: usize) -> Vec<f64> {
    let n = src.len();
    let scale = n as f64 / len as f64;
    (0..len)
        .map(|i| {
            let x = (scale * (i as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (x as usize).min(n - 1);
            let i1 = if i0 + 1 < n { i0 + 1 } else { i0 };
            let w = x - i0 as f64;
            (1.0 - w) * src[i0] + w * src[i1]
        })
        .collect()
}

/// θ(L) of one (layer, head) from its clamped Δ over a training window (module doc); 0 when
/// `target` ≤ the window's length.
pub fn threshold(clamped: &[f64], target: usize) -> f64 {
    if target <= clamped.len() {
        return 0.0;
    }
    let total: f64 = clamped.iter().sum();
    let mut sorted = clamped.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let stretched = interpolate_linear(&sorted, target);
    let mut cum = 0.0;
    let first = stretched
        .iter()
        .position(|v| {
            cum += v;
            cum > total
        })
        .unwrap_or(0);
    stretched[(first + 1).min(target - 1)]
}

/// Tokens per forward call of the calibration.
const CHUNK: usize = 512;

/// Δ of one window from the zero state, per (layer, head) row-major, each over the window's tokens
/// in order: Mamba-2's Δ tap ([`stuffed_core::mamba2::Mamba2::forward_dt`]) over calls of
/// [`CHUNK`] tokens.
fn window_dt(ex: &dyn stuffed_core::Exec, m2: &stuffed_core::mamba2::Mamba2<'_>, ids: &[u32]) -> Result<Vec<Vec<f64>>> {
    let (nl, nh, d) = (m2.cfg.n_layer, m2.cfg.n_heads, m2.cfg.d_model);
    let chunk = CHUNK.min(ids.len());
    let mut state = vec![0f32; m2.state_len()];
    let mut scratch = vec![0f32; m2.scratch_len(chunk)];
    let mut hidden = vec![0f32; chunk * d];
    let mut dt = vec![0f32; nl * chunk * nh];
    let mut cols = vec![Vec::with_capacity(ids.len()); nl * nh];
    for piece in ids.chunks(chunk) {
        let t = piece.len();
        m2.forward_dt(ex, piece, &mut state, &mut scratch, &mut hidden[..t * d], &mut dt[..nl * t * nh])?;
        for (i, col) in cols.iter_mut().enumerate() {
            let (l, h) = (i / nh, i % nh);
            col.extend((0..t).map(|tt| dt[l * t * nh + tt * nh + h] as f64));
        }
        if let Some(sig) = crate::interrupt::raised() {
            bail!("{sig}");
        }
    }
    Ok(cols)
}

/// One window's retention and threshold per (layer, head) from its Δ columns; `a` holds A per
/// (layer, head).
fn measure(cols: &[Vec<f64>], a: &[f64], o: &Options) -> Window {
    let (mut retention, mut thresholds) = (Vec::new(), vec![Vec::new(); o.targets.len()]);
    for (col, &ai) in cols.iter().zip(a) {
        let clamped = clamp_top(col, o.top);
        retention.push((ai * clamped.iter().sum::<f64>()).exp());
        for (t, &target) in thresholds.iter_mut().zip(&o.targets) {
            t.push(threshold(&clamped, target));
        }
    }
    Window { retention, thresholds }
}

fn aggregate<'w>(ws: &'w [Window], how: Aggregate, pick: impl Fn(&'w Window) -> &'w Vec<f64>) -> Vec<f64> {
    let n = pick(&ws[0]).len();
    (0..n)
        .map(|i| {
            let vals = ws.iter().map(|w| pick(w)[i]);
            match how {
                Aggregate::Mean => vals.sum::<f64>() / ws.len() as f64,
                Aggregate::Max => vals.fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect()
}

pub fn run(model_path: &Path, inputs: &[Input], o: &Options, out: &Path, cont: Continue) -> Result<()> {
    let _armed = crate::interrupt::arm();
    if o.train_len < 2 || o.windows == 0 {
        bail!("longmamba: --train-len must be ≥ 2 and --windows ≥ 1");
    }
    if o.targets.is_empty() || !o.targets.windows(2).all(|w| w[0] < w[1]) {
        bail!("longmamba: --target takes ascending lengths (2k,4k,8k)");
    }
    if o.targets[0] <= o.train_len {
        bail!(
            "longmamba: --target {} must exceed --train-len {} (LongMamba leaves prompts within the training length alone)",
            o.targets[0],
            o.train_len
        );
    }
    if !(o.top > 0.0 && o.top <= 1.0) {
        bail!("longmamba: --top must be in (0, 1]");
    }
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let model = Model::load(model_path)?;
    let path = model.info.path.display().to_string();
    let Some(m2) = model.mamba2().filter(|_| model.info.family == Family::Mamba2) else {
        bail!("{path}: LongMamba filters Mamba-2 heads (its code's); this is {}", model.info.family.title());
    };
    let a: Vec<f64> =
        m2.w.layers.iter().flat_map(|l| (0..m2.cfg.n_heads).map(|h| -(l.a_log.get(h) as f64).exp())).collect();
    let tok = model.tokenizer(o.tokenizer.as_deref())?;
    let stream = super::feed::doc_stream(&tok, inputs.to_vec(), None, None);
    let ids = super::feed::TokenFeed::new(stream, 0).take(usize::MAX)?;
    let start = |i: usize| ids.len() * i / o.windows + 10;
    if start(o.windows - 1) + o.train_len > ids.len() {
        bail!(
            "longmamba: the text has {} tokens; {} windows of {} spread through it need about {} (give more text, or fewer windows)",
            ids.len(),
            o.windows,
            o.train_len,
            (o.windows * (o.train_len + 10)).max(o.train_len + 10)
        );
    }
    let hashes = inputs.iter().map(Input::sha256).collect::<Result<Vec<_>>>()?;
    let (key, fp) = super::run_key(&model, inputs, &hashes, o)?;
    let ckpt = out.join(CKPT);
    let width = a.len();
    let mut done: Vec<Window> =
        match super::resume_sealed::<Checkpoint>("longmamba", cont, out, &ckpt, CKPT_KIND, (&key, &fp))? {
            Some(c) => {
                let fits = |w: &Window| {
                    w.retention.len() == width
                        && w.thresholds.len() == o.targets.len()
                        && w.thresholds.iter().all(|t| t.len() == width)
                        && w.retention.iter().chain(w.thresholds.iter().flatten()).all(|v| v.is_finite() && *v >= 0.0)
                };
                if c.windows.len() > o.windows || !c.windows.iter().all(fits) {
                    bail!("{}: not a checkpoint of this calibration (windows or values out of range)", ckpt.display());
                }
                eprintln!("longmamba: resuming after window {} of {}", c.windows.len(), o.windows);
                c.windows
            }
            None => Vec::new(),
        };
    let started = std::time::Instant::now();
    let ex = crate::exec::Pool::new();
    let mut this_run = 0;
    while done.len() < o.windows {
        if o.stop_after.is_some_and(|s| this_run >= s) {
            eprintln!(
                "longmamba: stopped after window {} of {}; checkpoint in {}; continue with --resume",
                done.len(),
                o.windows,
                out.display()
            );
            return Ok(());
        }
        let i = done.len();
        let dt =
            window_dt(&ex, m2, &ids[start(i)..start(i) + o.train_len]).map_err(|e| {
                match crate::interrupt::raised() {
                    Some(sig) => anyhow!(
                        "{sig}: the finished windows are checkpointed in {}; continue with --resume",
                        out.display()
                    ),
                    None => e,
                }
            })?;
        done.push(measure(&dt, &a, o));
        this_run += 1;
        let c = Checkpoint { fingerprint: fp.clone(), key: key.clone(), windows: done.clone() };
        report::write_sealed(&ckpt, CKPT_KIND, &c)?;
        eprintln!("longmamba: window {}/{} ({} tokens)", done.len(), o.windows, o.train_len);
    }
    let retention = aggregate(&done, o.aggregate, |w| &w.retention);
    let thresholds: Vec<Vec<f64>> =
        (0..o.targets.len()).map(|i| aggregate(&done, o.aggregate, |w| &w.thresholds[i])).collect();
    let nh = m2.cfg.n_heads;
    let rows = |v: &[f64]| v.chunks(nh).map(<[f64]>::to_vec).collect::<Vec<_>>();
    let global = retention.iter().filter(|&&r| r > DEFAULT_C).count();
    let doc = serde_json::json!({
        "command": "longmamba",
        "model": model.info,
        "content": model.content_id(),
        "inputs": inputs.iter().zip(&hashes).map(|(i, h)| serde_json::json!({"name": i.name(), "sha256": h})).collect::<Vec<_>>(),
        "options": o,
        "heads": nh,
        "retention": rows(&retention),
        "targets": o.targets,
        "threshold": thresholds.iter().map(|t| rows(t)).collect::<Vec<_>>(),
        "windows": done,
        "seconds_this_run": started.elapsed().as_secs_f64(),
        "notes": "per layer, one value per head; retention: exp(A·Σ Δ clamped at its top share) over a training-length window, \
                  a head is global where it exceeds c; threshold: for each of targets, θ(target) from the clamped Δ sorted, \
                  stretched to the target length and cumulated (LongMamba's load_align_target.py); both aggregated over the windows",
    });
    report::write_sealed(&out.join(RESULT), KIND, &doc)?;
    std::fs::remove_file(&ckpt).map_err(|e| anyhow!("{}: cannot remove: {e}", ckpt.display()))?;
    println!(
        "longmamba: {global} of {} heads global at c = {DEFAULT_C} ({} windows of {} tokens, targets {:?}); use --forget longmamba:file={}",
        retention.len(),
        o.windows,
        o.train_len,
        o.targets,
        out.join(RESULT).display()
    );
    Ok(())
}

/// LongMamba's defaults at use (`my_evaluation.py`): c = 0.05 (the retention above which a head
/// is global), b = 1 (the factor on θ).
pub const DEFAULT_C: f64 = 0.05;
pub const DEFAULT_B: f64 = 1.0;

/// What `--forget longmamba:file=F` reads: the model's content id, the heads per layer, and the
/// retention and threshold per (layer, head), row-major.
pub struct Table {
    pub content: String,
    pub heads: usize,
    pub retention: Vec<f64>,
    /// The target lengths, ascending, and θ for each, per (layer, head) row-major.
    pub targets: Vec<u64>,
    pub thresholds: Vec<Vec<f64>>,
}

pub fn read_table(file: &Path) -> Result<Table> {
    let doc = report::read_sealed(file, KIND, Older::Refuse)?.doc;
    let bad = |what: &str| anyhow!("{}: not a longmamba.json ({what})", file.display());
    let content = doc.get("content").and_then(|v| v.as_str()).ok_or_else(|| bad("no content id"))?.to_string();
    let heads = doc.get("heads").and_then(|v| v.as_u64()).ok_or_else(|| bad("no heads"))? as usize;
    let rows = |k: &str, v: &serde_json::Value| -> Result<Vec<f64>> {
        let v: Vec<Vec<f64>> = serde_json::from_value(v.clone()).map_err(|_| bad(k))?;
        if heads == 0 || v.is_empty() || v.iter().any(|r| r.len() != heads) {
            return Err(bad(&format!("{k}: rows of {heads} values")));
        }
        let flat: Vec<f64> = v.concat();
        if flat.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(bad(&format!("{k}: values must be finite and ≥ 0")));
        }
        Ok(flat)
    };
    let field = |k: &str| doc.get(k).ok_or_else(|| bad(k));
    let retention = rows("retention", field("retention")?)?;
    // One table per target; a file of one target before targets were a list holds its rows alone.
    let (targets, thresholds) = match doc.get("targets") {
        Some(t) => {
            let targets: Vec<u64> = serde_json::from_value(t.clone()).map_err(|_| bad("targets"))?;
            let tables = field("threshold")?.as_array().ok_or_else(|| bad("threshold"))?;
            let tables = tables.iter().map(|t| rows("threshold", t)).collect::<Result<Vec<_>>>()?;
            (targets, tables)
        }
        None => {
            let target = doc.pointer("/options/target_len").and_then(|v| v.as_u64()).ok_or_else(|| bad("no target"))?;
            (vec![target], vec![rows("threshold", field("threshold")?)?])
        }
    };
    if targets.is_empty() || targets.len() != thresholds.len() || !targets.windows(2).all(|w| w[0] < w[1]) {
        return Err(bad("targets: ascending lengths, one threshold table each"));
    }
    if thresholds.iter().any(|t| t.len() != retention.len()) {
        return Err(bad("retention and threshold differ in length"));
    }
    Ok(Table { content, heads, retention, targets, thresholds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_flattens_the_top_share() {
        let dt = [5.0, 1.0, 4.0, 2.0, 3.0];
        // k = ⌊5·0.4⌋ = 2: capped at the 2nd largest, 4.
        assert_eq!(clamp_top(&dt, 0.4), [4.0, 1.0, 4.0, 2.0, 3.0]);
        // k ≥ 1 however small the share.
        assert_eq!(clamp_top(&dt, 0.01), dt);
        assert_eq!(clamp_top(&dt, 1.0), [1.0; 5]);
    }

    /// PyTorch's `nn.Upsample` documentation: [[1, 2], [3, 4]] doubled with `mode="bilinear"`
    /// (`align_corners=False`) has first row [1.0, 1.25, 1.75, 2.0], which is the linear mode on
    /// [1, 2]; x = (i + ½)·|src|/len − ½ is clamped at 0 on the left and the last point repeats.
    #[test]
    fn interpolation_is_torchs() {
        assert_eq!(interpolate_linear(&[1.0, 2.0], 4), [1.0, 1.25, 1.75, 2.0]);
        assert_eq!(interpolate_linear(&[3.0, 4.0], 4), [3.0, 3.25, 3.75, 4.0]);
        // Same length: the identity; one point: a constant.
        assert_eq!(interpolate_linear(&[1.0, 3.0, 2.0], 3), [1.0, 3.0, 2.0]);
        assert_eq!(interpolate_linear(&[5.0], 3), [5.0; 3]);
    }

    /// Δ̃ = [4, 3, 2, 1] (total 10) stretched to 8 points: [4, 3.75, 3.25, 2.75, 2.25, 1.75, 1.25,
    /// 1]; cumulated 4, 7.75, 11, … first past 10 at index 2, so θ = the value at 3, 2.75.
    #[test]
    fn threshold_is_the_value_past_the_training_total() {
        assert_eq!(interpolate_linear(&[4.0, 3.0, 2.0, 1.0], 8), [4.0, 3.75, 3.25, 2.75, 2.25, 1.75, 1.25, 1.0]);
        assert_eq!(threshold(&[1.0, 4.0, 2.0, 3.0], 8), 2.75);
        // Within the training length: no filtering.
        assert_eq!(threshold(&[1.0, 4.0, 2.0, 3.0], 4), 0.0);
        // A longer target keeps a smaller share of the tokens: a higher threshold.
        assert!(threshold(&[1.0, 4.0, 2.0, 3.0], 64) > 2.75);
    }
}
