//! State probes (SPEC.md §2.3): retention of the first token, state and conv statistics, per-head
//! input means, and per-channel snapshots, every K tokens over a stream of any length — written to
//! disk as they come, nothing per position kept.
use crate::backend::{Device, GpuOptions, ScorerState};
use crate::forget::ForgetSpec;
use crate::model::Model;
use crate::report::svg::{fmt_tokens, LinePlot, Series};
use crate::report::{self, write_atomic, Values};
use crate::text::Input;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use stuffed_core::Runs;

#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub every: u64,
    pub max_tokens: Option<u64>,
    pub layers: Option<Vec<usize>>,
    /// Layers plotted (default: the first, middle and last recorded); plots do not change the
    /// numbers, so this is not recorded in the fingerprint.
    #[serde(skip)]
    pub plot_layers: Option<Vec<usize>>,
    pub heads: Option<Vec<usize>>,
    pub snapshot_at: Vec<u64>,
    pub train_len: Option<u64>,
    pub forget: ForgetSpec,
    pub chunk: usize,
    pub tokenizer: Option<PathBuf>,
    pub device: Device,
    pub gpu: GpuOptions,
    /// Checkpoint at a report when this many seconds passed since the last one (it does not change
    /// the numbers, so it is not recorded).
    #[serde(skip)]
    pub checkpoint_secs: Option<f64>,
    /// Stop with a checkpoint at the first report at or after this many tokens (for batch jobs
    /// with time limits; not recorded: a resumed probe gives the same files).
    #[serde(skip)]
    pub stop_after: Option<u64>,
}

const CKPT: &str = "probe.checkpoint.safetensors";

/// A long plotted series is thinned evenly to between this many points and twice as many (the CSVs
/// keep every report).
const PLOT_POINTS: usize = 2048;

/// Where a checkpointed probe stands (the state, retention sums and snapshots are its tensors).
#[derive(Serialize, Deserialize)]
struct Snapshot {
    fingerprint: String,
    /// What the fingerprint hashes, so that a refused resume can say what differs.
    key: serde_json::Value,
    /// Tokens consumed; a report was written here.
    pos: u64,
    tau: Vec<f32>,
    /// Byte lengths of retention, state_stats, conv_stats and inputs.csv at `pos`.
    csv_lens: [u64; 4],
    /// Positions of the whole-state snapshots taken so far.
    snapshots: Vec<u64>,
}

/// mean, unbiased variance, RMS, max |v|, Frobenius norm (f64 sums).
pub fn stats(vals: impl Iterator<Item = f32>) -> [f64; 5] {
    let (mut n, mut s, mut s2, mut mx) = (0f64, 0f64, 0f64, 0f64);
    for v in vals {
        let v = v as f64;
        n += 1.0;
        s += v;
        s2 += v * v;
        mx = mx.max(v.abs());
    }
    let mean = s / n.max(1.0);
    let var = if n > 1.0 { ((s2 - s * mean) / (n - 1.0)).max(0.0) } else { 0.0 };
    [mean, var, (s2 / n.max(1.0)).sqrt(), mx, s2.sqrt()]
}

fn runs_values(r: Runs, state: &[f32]) -> Vec<f32> {
    let mut v = Vec::with_capacity(r.len * r.rows);
    r.for_each(state, |x| v.push(x));
    v
}

/// A CSV writer: a new file with its header, or (resuming) the file cut back to `len` bytes.
fn csv(path: &Path, header: &str, len: Option<u64>) -> Result<BufWriter<std::fs::File>> {
    let Some(len) = len else {
        let f = std::fs::File::create(path).map_err(|e| anyhow!("{}: cannot create: {e}", path.display()))?;
        let mut w = BufWriter::new(f);
        writeln!(w, "{header}")?;
        return Ok(w);
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| anyhow!("{}: cannot reopen to resume: {e}", path.display()))?;
    if f.metadata()?.len() < len {
        bail!("{}: shorter than the checkpoint recorded ({len} bytes); cannot resume", path.display());
    }
    f.set_len(len)?;
    f.seek(SeekFrom::Start(len))?;
    Ok(BufWriter::new(f))
}

/// Everything that decides the numbers: the model (by content), the inputs' content and the options.
fn run_key(model: &Model, inputs: &[Input], o: &Options) -> Result<serde_json::Value> {
    let hashes = inputs.iter().map(Input::sha256).collect::<Result<Vec<_>>>()?;
    let mut key = serde_json::json!({
        "model": super::model_key(model),
        "inputs": inputs.iter().map(Input::name).collect::<Vec<_>>(),
        "hashes": hashes,
        "options": o,
    });
    crate::exec::mark_matmul_mode(&mut key);
    Ok(key)
}

/// A checkpointed run: where it stood, its scorer there, the retention sums and the whole-state
/// snapshots taken so far (position, state).
struct Restored {
    snap: Snapshot,
    scorer: ScorerState,
    retention: Vec<f64>,
    snapshots: Vec<(u64, Vec<f32>)>,
}

fn load_checkpoint(out: &Path, fp: &str, key: &serde_json::Value) -> Result<Restored> {
    let path = out.join(CKPT);
    let mut c = report::load_checkpoint::<Snapshot>(&path, "a probe writes one every --checkpoint-secs")?;
    if c.snapshot.fingerprint != fp {
        return Err(super::other_run(&path, &c.snapshot.key, key));
    }
    let (state, retention) = (c.take("state")?, c.take("retention")?);
    let at = c.snapshot.snapshots.clone();
    let snaps = at.into_iter().map(|p| Ok((p, c.take(&format!("state_t{p}"))?))).collect::<Result<Vec<_>>>()?;
    let scorer = ScorerState { state, pending: c.take_opt("pending"), tau: c.snapshot.tau.clone() };
    Ok(Restored { snap: c.snapshot, scorer, retention, snapshots: snaps })
}

/// A plot series thinned evenly as it grows: every `stride`-th point is kept, and when
/// 2·[`PLOT_POINTS`] are kept every other one goes and the stride doubles (so a series of any length
/// holds fewer than 2·PLOT_POINTS points, evenly spaced, plus its last).
#[derive(Default)]
struct Thinned {
    pts: Vec<(f64, f64)>,
    stride: u64,
    seen: u64,
    last: Option<(f64, f64)>,
}

impl Thinned {
    fn push(&mut self, p: (f64, f64)) {
        self.stride = self.stride.max(1);
        if self.seen.is_multiple_of(self.stride) {
            self.pts.push(p);
            if self.pts.len() == 2 * PLOT_POINTS {
                self.pts = self.pts.iter().copied().step_by(2).collect();
                self.stride *= 2;
            }
        }
        self.seen += 1;
        self.last = Some(p);
    }

    fn finish(mut self) -> Vec<(f64, f64)> {
        if self.last.is_some() && self.pts.last() != self.last.as_ref() {
            self.pts.extend(self.last);
        }
        self.pts
    }
}

/// Plot series (thinned) from a probe CSV (`layer,head,t,…`): column `col` against t, for the
/// (layer, head) pairs wanted.
fn csv_series(
    path: &Path,
    col: usize,
    want: impl Fn(usize, usize) -> bool,
) -> Result<BTreeMap<(usize, usize), Thinned>> {
    let text = std::io::BufReader::new(
        std::fs::File::open(path).map_err(|e| anyhow!("{}: cannot read back: {e}", path.display()))?,
    );
    let mut series: BTreeMap<(usize, usize), Thinned> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let line = line?;
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        let (Some(l), Some(h), Some(t), Some(v)) = (num(0), num(1), num(2), num(col)) else {
            bail!("{}: malformed row {line:?}", path.display());
        };
        if want(l as usize, h as usize) {
            series.entry((l as usize, h as usize)).or_default().push((t, v));
        }
    }
    Ok(series)
}

/// `stuffed probe`.
pub fn run(model_path: &Path, inputs: &[Input], o: &Options, out: &Path, cont: super::Continue) -> Result<()> {
    let _armed = crate::interrupt::arm(); // from the start: a signal during loading is caught too
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut model = Model::load(model_path)?;
    model.set_forget(o.forget)?;
    let tok = model.tokenizer(o.tokenizer.as_deref())?;
    let net = model.net();
    let (nl, nh) = (net.n_layer(), net.n_heads());
    let layers: Vec<usize> = o.layers.clone().unwrap_or_else(|| (0..nl).collect());
    let heads: Vec<usize> = o.heads.clone().unwrap_or_else(|| (0..nh).collect());
    if let Some(&l) = layers.iter().find(|&&l| l >= nl) {
        bail!("--layers: layer {l} does not exist (the model has {nl})");
    }
    if let Some(&h) = heads.iter().find(|&&h| h >= nh) {
        bail!("--heads: head {h} does not exist (the model has {nh} per layer)");
    }
    let plot_layers = plotted_layers(&layers, o.plot_layers.as_deref())?;
    let (names, width) = net.probe_series();
    let ns = names.len();
    let key = run_key(&model, inputs, o)?;
    let fp = report::fingerprint(&key)?;
    let restored =
        if cont.resumes("probe", out, &[out.join(CKPT)])? { Some(load_checkpoint(out, &fp, &key)?) } else { None };
    let lens = restored.as_ref().map(|r| r.snap.csv_lens);
    let len = |i: usize| lens.map(|l| l[i]);
    let mut probe = vec![0f32; net.probe_len()];
    let mut ret_csv = csv(&out.join("retention.csv"), "layer,head,t,log_retention_mean,log_retention_max", len(0))?;
    let mut st_csv = csv(&out.join("state_stats.csv"), "layer,head,t,mean,var,rms,maxabs,fro", len(1))?;
    let mut cv_csv = csv(&out.join("conv_stats.csv"), "layer,head,t,mean,var,rms,maxabs,fro", len(2))?;
    let extra: Vec<&str> = names[1..].to_vec();
    let header =
        format!("layer,head,t,{}", extra.iter().map(|n| n.replace("_sum", "_mean")).collect::<Vec<_>>().join(","));
    let mut in_csv = csv(&out.join("inputs.csv"), &header, len(3))?;

    let real = model.info.vocab_rows;
    let mut s = crate::backend::open(&model, o.chunk, real, o.device, o.gpu)?;
    let mut pos = 0u64; // tokens fed
                        // Running Σ log decay per (layer, head, channel), f64.
    let mut retention = vec![0f64; nl * nh * width];
    let mut snapshots: Vec<(u64, Vec<f32>)> = Vec::new();
    if let Some(r) = restored {
        if r.scorer.state.len() != s.state_len() || r.retention.len() != retention.len() {
            bail!("{}: the checkpoint's state does not fit this model", out.join(CKPT).display());
        }
        s.restore(&r.scorer, r.snap.pos)?;
        (pos, retention, snapshots) = (r.snap.pos, r.retention, r.snapshots);
    }
    let stream = crate::eval::ppl::doc_stream(&tok, inputs.to_vec(), o.max_tokens, None);
    let mut feed = crate::eval::ppl::TokenFeed::new(stream, pos);
    let mut since = 0u64; // tokens since the last report
    let mut cadence = super::Cadence::new(o.checkpoint_secs, None);
    let mut snaps = o.snapshot_at.clone();
    snaps.sort_unstable();
    snaps.dedup();
    let mut progress = crate::report::Progress::new("probe", o.max_tokens);
    progress.set(pos);
    loop {
        // Next stop: the report boundary or a snapshot position.
        let next_report = pos + (o.every - since);
        let next = snaps.iter().copied().find(|&p| p > pos).map_or(next_report, |p| p.min(next_report));
        let ids = feed.take((next - pos) as usize)?;
        if ids.is_empty() {
            break;
        }
        crate::model::check_ids(&ids, net.vocab_rows(), "probe input")?;
        s.feed_probed(&ids, &mut probe)?;
        pos += ids.len() as u64;
        since += ids.len() as u64;
        progress.set(pos);
        let at_snapshot = snaps.contains(&pos);
        if since < o.every && !feed.done() && !at_snapshot {
            continue;
        }
        let ScorerState { state, pending, tau } = s.snapshot()?;
        if at_snapshot {
            snapshots.push((pos, state.clone()));
        }
        if since < o.every && !feed.done() {
            continue;
        }
        let t = pos;
        let k = since as f64;
        since = 0;
        for l in 0..nl {
            for h in 0..nh {
                let base = (l * ns) * nh * width;
                for c in 0..width {
                    retention[(l * nh + h) * width + c] += probe[base + h * width + c] as f64;
                }
                if !layers.contains(&l) || !heads.contains(&h) {
                    continue;
                }
                let r = &retention[(l * nh + h) * width..(l * nh + h + 1) * width];
                let mean = r.iter().sum::<f64>() / width as f64;
                let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                writeln!(ret_csv, "{l},{h},{t},{mean},{max}")?;
                let st = stats(state[net.head_state(l, h)].iter().copied());
                writeln!(st_csv, "{l},{h},{t},{},{},{},{},{}", st[0], st[1], st[2], st[3], st[4])?;
                if let Some(runs) = net.conv_state(l, h) {
                    let cs = stats(runs_values(runs, &state).into_iter());
                    writeln!(cv_csv, "{l},{h},{t},{},{},{},{},{}", cs[0], cs[1], cs[2], cs[3], cs[4])?;
                }
                let means: Vec<String> = (1..ns)
                    .map(|si| {
                        let v: f64 = (0..width).map(|c| probe[((l * ns + si) * nh + h) * width + c] as f64).sum();
                        format!("{}", v / width as f64 / k)
                    })
                    .collect();
                writeln!(in_csv, "{l},{h},{t},{}", means.join(","))?;
            }
        }
        probe.fill(0.0);
        if feed.done() {
            break;
        }
        let stop = o.stop_after.is_some_and(|n| pos >= n);
        if let Some(due) = cadence.due(stop) {
            let mut csv_lens = [0u64; 4];
            for (w, n) in [&mut ret_csv, &mut st_csv, &mut cv_csv, &mut in_csv].into_iter().zip(&mut csv_lens) {
                w.flush()?;
                *n = w.get_mut().stream_position()?;
            }
            let snapshots_at = snapshots.iter().map(|(p, _)| *p).collect();
            let snap =
                Snapshot { fingerprint: fp.clone(), key: key.clone(), pos, tau, csv_lens, snapshots: snapshots_at };
            let names: Vec<String> = snapshots.iter().map(|(p, _)| format!("state_t{p}")).collect();
            let mut tensors = vec![("state", Values::F32(&state)), ("retention", Values::F64(&retention))];
            tensors.extend(pending.as_deref().map(|p| ("pending", Values::F32(p))));
            tensors.extend(names.iter().zip(&snapshots).map(|(n, (_, st))| (n.as_str(), Values::F32(st))));
            report::save_checkpoint(&out.join(CKPT), &serde_json::to_string(&snap)?, &tensors)?;
            cadence.saved();
            if let Some(sig) = due.signal {
                progress.finish();
                bail!("{sig} after {pos} tokens: checkpoint in {}; continue with --resume", out.display());
            }
            if stop {
                progress.finish();
                eprintln!("stopped after {pos} tokens; checkpoint in {}; continue with --resume", out.display());
                return Ok(());
            }
        }
    }
    progress.finish();
    for w in [&mut ret_csv, &mut st_csv, &mut cv_csv, &mut in_csv] {
        w.flush()?;
    }
    drop((ret_csv, st_csv, cv_csv, in_csv));
    let tokens = pos;
    write_snapshots(out, &snapshots)?;
    let missed: Vec<u64> = snaps.iter().copied().filter(|&p| !snapshots.iter().any(|(t, _)| *t == p)).collect();
    if !missed.is_empty() {
        eprintln!("probe: no snapshot at {missed:?}: past the stream's end ({tokens} tokens)");
    }
    // Plots for the plotted layers, read back from the CSVs (nothing per report is kept in memory,
    // so a probe's memory does not grow with the stream).
    let vlines: Vec<(f64, String)> = o.train_len.map(|t| (t as f64, format!("train len {t}"))).into_iter().collect();
    let plotted = |l: usize, h: usize| plot_layers.contains(&l) && heads.contains(&h);
    let mut plots = [
        (
            "retention",
            "log retention of the first token (Σ log α)",
            csv_series(&out.join("retention.csv"), 3, plotted)?,
        ),
        ("state_mean", "state mean", csv_series(&out.join("state_stats.csv"), 3, plotted)?),
        ("state_var", "state variance", csv_series(&out.join("state_stats.csv"), 4, plotted)?),
    ];
    for &l in &plot_layers {
        for (file, y, pts) in &mut plots {
            let series: Vec<Series> = heads
                .iter()
                .map(|&h| Series {
                    name: format!("head {h}"),
                    points: pts.remove(&(l, h)).map_or(vec![], Thinned::finish),
                    markers: false,
                })
                .collect();
            let title = format!("Layer {l}: {y}");
            let p = LinePlot {
                title: &title,
                x_label: "tokens consumed",
                y_label: y,
                log_x: false,
                vlines: vlines.clone(),
            };
            write_atomic(&out.join(format!("{file}_L{l}.svg")), p.render(&series).as_bytes())?;
        }
    }
    // Fig. 6: a channel histogram of one head at the first two snapshots.
    if snapshots.len() >= 2 {
        let (l, h) = (plot_layers[plot_layers.len() - 1], heads[0]);
        let r = net.head_state(l, h);
        // One set of bins over both snapshots' values, so the two histograms compare bin by bin.
        let (lo, hi) = snapshots[..2]
            .iter()
            .flat_map(|(_, st)| st[r.clone()].iter())
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let hist = |v: &[f32]| -> Vec<(f64, f64)> {
            let bins = 40;
            let wdt = ((hi - lo) / bins as f32).max(1e-12);
            let mut c = vec![0f64; bins];
            v.iter().for_each(|&x| c[(((x - lo) / wdt) as usize).min(bins - 1)] += 1.0);
            c.iter().enumerate().map(|(i, &n)| ((lo + wdt * (i as f32 + 0.5)) as f64, n)).collect()
        };
        let series: Vec<Series> = snapshots[..2]
            .iter()
            .map(|(t, st)| Series {
                name: format!("t = {}", fmt_tokens(*t)),
                points: hist(&st[r.clone()]),
                markers: false,
            })
            .collect();
        let title = format!("Layer {l}, head {h}: state values");
        let p = LinePlot { title: &title, x_label: "state value", y_label: "count", log_x: false, vlines: Vec::new() };
        write_atomic(&out.join(format!("hist_L{l}_H{h}.svg")), p.render(&series).as_bytes())?;
    }
    let meta = serde_json::json!({
        "command": "probe",
        "model": model.info,
        "precision": {"weights": model.info.weight_dtype, "compute": "f32", "state": "f32", "retention_sum": "f64"},
        "tokenizer": tok.source,
        "inputs": inputs.iter().map(|i| serde_json::json!({"name": i.name(), "sha256": i.sha256().ok()})).collect::<Vec<_>>(),
        "options": o,
        "matmul": (o.device == Device::Cpu).then(crate::exec::matmul_record),
        "forget": o.forget.to_string(),
        "tokens": tokens,
        "snapshots": snapshots.iter().map(|(t, _)| t).collect::<Vec<_>>(),
        "plot_layers": plot_layers,
        "series": names,
        "notes": "t = tokens consumed (from 1); the retention sum includes the first token's own decay; \
                  per-channel decays report the mean and max over key channels; variance is unbiased",
    });
    write_atomic(&out.join("probe.json"), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    let _ = std::fs::remove_file(out.join(CKPT));
    println!("probe: {tokens} tokens; wrote {}/retention.csv, state_stats.csv, conv_stats.csv, inputs.csv, probe.json and plots", out.display());
    let list: Vec<String> = plot_layers.iter().map(|l| l.to_string()).collect();
    println!("probe: plots show layers {} (--plot-layers to choose)", list.join(", "));
    Ok(())
}

/// The layers to plot: `wanted` (each must be recorded), else the first, middle and last recorded.
fn plotted_layers(recorded: &[usize], wanted: Option<&[usize]>) -> Result<Vec<usize>> {
    if recorded.is_empty() {
        bail!("--layers: give at least one layer");
    }
    let Some(wanted) = wanted else {
        let mut l = vec![recorded[0], recorded[recorded.len() / 2], recorded[recorded.len() - 1]];
        l.dedup();
        return Ok(l);
    };
    if wanted.is_empty() {
        bail!("--plot-layers: give at least one layer");
    }
    if let Some(l) = wanted.iter().find(|l| !recorded.contains(l)) {
        bail!("--plot-layers: layer {l} is not recorded (--layers records {recorded:?})");
    }
    let mut l = wanted.to_vec();
    l.sort_unstable();
    l.dedup();
    Ok(l)
}

fn write_snapshots(out: &Path, snaps: &[(u64, Vec<f32>)]) -> Result<()> {
    if snaps.is_empty() {
        return Ok(());
    }
    let views = snaps
        .iter()
        .map(|(t, st)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![st.len()], bytemuck::cast_slice(st))
                .map(|v| (format!("state_t{t}"), v))
                .map_err(|e| anyhow!("snapshot: {e:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| anyhow!("snapshot: {e:?}"))?;
    write_atomic(&out.join("snapshots.safetensors"), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Thinning keeps a long series short, evenly spaced, and ends it at its last point.
    #[test]
    fn thinned_series_stay_short_and_even() {
        for n in [1u64, 10, 4095, 4096, 4097, 100_000] {
            let mut s = Thinned::default();
            (0..n).for_each(|i| s.push((i as f64, 0.0)));
            let stride = s.stride as f64;
            let pts = s.finish();
            assert!(pts.len() <= 2 * PLOT_POINTS, "{n}: {} points", pts.len());
            assert_eq!(pts.last().unwrap().0, (n - 1) as f64, "{n}: ends at the last point");
            let body = &pts[..pts.len() - 1];
            assert!(body.windows(2).all(|w| w[1].0 - w[0].0 == stride), "{n}: even spacing {stride}");
            assert!(n < 2 * PLOT_POINTS as u64 || body.len() >= PLOT_POINTS, "{n}: {} kept", body.len());
        }
    }
}
