//! State probes (SPEC.md §2.3): retention of the first token, state and conv statistics, per-head
//! input means, and per-channel snapshots, every K tokens over a stream of any length — written to
//! disk as they come, nothing per position kept.
use crate::backend::{Device, GpuOptions, ScorerState};
use crate::forget::ForgetSpec;
use crate::model::Model;
use crate::report::svg::{fmt_tokens, LinePlot, Series};
use crate::report::{self, write_atomic, StateSlot, Values};
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
    /// `--state-dtype` (absent from files and fingerprints when f32).
    #[serde(default, skip_serializing_if = "crate::state_dtype::StatePrecision::is_f32")]
    pub state: crate::state_dtype::StatePrecision,
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
    crate::exec::mark_matmul_mode(&mut key, model.matrix_dtypes());
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
    let retention = c.take("retention")?;
    let at = c.snapshot.snapshots.clone();
    let snaps = at.into_iter().map(|p| Ok((p, c.take(&format!("state_t{p}"))?))).collect::<Result<Vec<_>>>()?;
    let scorer = c.take_state(StateSlot::Run, c.snapshot.tau.clone())?;
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

/// The layers and heads a probe records, and the layers it plots.
struct Selection {
    layers: Vec<usize>,
    heads: Vec<usize>,
    plot_layers: Vec<usize>,
}

impl Selection {
    fn new(net: &dyn stuffed_core::Recurrent, o: &Options) -> Result<Selection> {
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
        Ok(Selection { layers, heads, plot_layers })
    }

    fn records(&self, l: usize, h: usize) -> bool {
        self.layers.contains(&l) && self.heads.contains(&h)
    }
}

/// The four CSVs a probe appends to at each report.
struct Csvs {
    retention: BufWriter<std::fs::File>,
    state: BufWriter<std::fs::File>,
    conv: BufWriter<std::fs::File>,
    inputs: BufWriter<std::fs::File>,
}

impl Csvs {
    /// New files, or (resuming) the files cut back to the lengths a checkpoint recorded.
    fn open(out: &Path, series: &[&str], lens: Option<[u64; 4]>) -> Result<Csvs> {
        let len = |i: usize| lens.map(|l| l[i]);
        let means: Vec<String> = series[1..].iter().map(|n| n.replace("_sum", "_mean")).collect();
        Ok(Csvs {
            retention: csv(&out.join("retention.csv"), "layer,head,t,log_retention_mean,log_retention_max", len(0))?,
            state: csv(&out.join("state_stats.csv"), "layer,head,t,mean,var,rms,maxabs,fro", len(1))?,
            conv: csv(&out.join("conv_stats.csv"), "layer,head,t,mean,var,rms,maxabs,fro", len(2))?,
            inputs: csv(&out.join("inputs.csv"), &format!("layer,head,t,{}", means.join(",")), len(3))?,
        })
    }

    fn all(&mut self) -> [&mut BufWriter<std::fs::File>; 4] {
        [&mut self.retention, &mut self.state, &mut self.conv, &mut self.inputs]
    }

    /// Flushed, and their byte lengths (what a checkpoint records).
    fn lens(&mut self) -> Result<[u64; 4]> {
        let mut lens = [0u64; 4];
        for (w, n) in self.all().into_iter().zip(&mut lens) {
            w.flush()?;
            *n = w.get_mut().stream_position()?;
        }
        Ok(lens)
    }
}

/// What a probe carries along the stream: tokens fed, the retention sums, the whole-state snapshots.
struct Stream {
    pos: u64,
    /// Running Σ log decay per (layer, head, channel), f64.
    retention: Vec<f64>,
    snapshots: Vec<(u64, Vec<f32>)>,
}

/// How the stream loop ended.
enum Ended {
    /// The inputs (or --max-tokens) ran out.
    Done,
    /// --stop-after: a checkpoint was written.
    Stopped,
    /// A signal: a checkpoint was written.
    Signal(&'static str),
}

/// `stuffed probe`: sets up, streams, then writes plots and probe.json.
pub fn run(model_path: &Path, inputs: &[Input], o: &Options, out: &Path, cont: super::Continue) -> Result<()> {
    let _armed = crate::interrupt::arm(); // from the start: a signal during loading is caught too
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut model = Model::load(model_path)?;
    model.set_forget(o.forget)?;
    model.state_precision = o.state;
    let tok = model.tokenizer(o.tokenizer.as_deref())?;
    let net = model.net();
    let sel = Selection::new(net, o)?;
    let (names, width) = net.probe_series();
    let key = run_key(&model, inputs, o)?;
    let fp = report::fingerprint(&key)?;
    let restored =
        if cont.resumes("probe", out, &[out.join(CKPT)])? { Some(load_checkpoint(out, &fp, &key)?) } else { None };
    let mut csvs = Csvs::open(out, names, restored.as_ref().map(|r| r.snap.csv_lens))?;
    let mut s = crate::backend::open(&model, o.chunk, model.info.vocab_rows, o.device, o.gpu)?;
    let retention = vec![0f64; net.n_layer() * net.n_heads() * width];
    let mut st = Stream { pos: 0, retention, snapshots: Vec::new() };
    if let Some(r) = restored {
        if r.scorer.state.len() != s.state_len() || r.retention.len() != st.retention.len() {
            bail!("{}: the checkpoint's state does not fit this model", out.join(CKPT).display());
        }
        s.restore(&r.scorer, r.snap.pos)?;
        st = Stream { pos: r.snap.pos, retention: r.retention, snapshots: r.snapshots };
    }
    let stream = super::feed::doc_stream(&tok, inputs.to_vec(), o.max_tokens, None);
    let mut feed = super::feed::TokenFeed::new(stream, st.pos);
    let saver = |csvs: &mut Csvs, st: &Stream, now: &ScorerState| save(out, &fp, &key, csvs, st, now);
    match stream_probe(net, s.as_mut(), &mut feed, &sel, o, &mut csvs, &mut st, saver)? {
        Ended::Done => {}
        Ended::Signal(sig) => {
            bail!("{sig} after {} tokens: checkpoint in {}; continue with --resume", st.pos, out.display())
        }
        Ended::Stopped => {
            eprintln!("stopped after {} tokens; checkpoint in {}; continue with --resume", st.pos, out.display());
            return Ok(());
        }
    }
    for w in csvs.all() {
        w.flush()?;
    }
    drop(csvs);
    write_snapshots(out, &st.snapshots)?;
    let missed: Vec<u64> =
        snapshot_positions(o).into_iter().filter(|&p| !st.snapshots.iter().any(|(t, _)| *t == p)).collect();
    if !missed.is_empty() {
        eprintln!("probe: no snapshot at {missed:?}: past the stream's end ({} tokens)", st.pos);
    }
    plot_series(out, o, &sel)?;
    plot_histogram(out, net, &sel, &st.snapshots)?;
    let meta = serde_json::json!({
        "command": "probe",
        "model": model.info,
        "precision": {"weights": model.info.weight_dtype, "compute": "f32", "state": o.state.to_string(), "retention_sum": "f64"},
        "tokenizer": tok.source,
        "inputs": inputs.iter().map(|i| serde_json::json!({"name": i.name(), "sha256": i.sha256().ok()})).collect::<Vec<_>>(),
        "options": o,
        "matmul": (o.device == Device::Cpu).then(|| crate::exec::matmul_record(model.matrix_dtypes())),
        "forget": o.forget.to_string(),
        "tokens": st.pos,
        "snapshots": st.snapshots.iter().map(|(t, _)| t).collect::<Vec<_>>(),
        "plot_layers": sel.plot_layers,
        "series": names,
        "notes": "t = tokens consumed (from 1); the retention sum includes the first token's own decay; \
                  per-channel decays report the mean and max over key channels; variance is unbiased",
        "retention_bound": match model.info.family {
            crate::model::Family::Rwkv7 => Some(
                "RWKV-7: the retention is Σ log w along the decay path only; the delta rule's erasure −(S·κ̂)(κ̂⊙a)ᵀ \
                 removes more, so it is an upper bound on the first token's retention (learning_rate_sum: Σ a per channel)"),
            crate::model::Family::GatedDeltaNet => Some(
                "Gated DeltaNet: the retention is Σ log α per value head (α = exp(−exp(A_log)·softplus(·))) along the \
                 decay path only; the delta rule's erasure I − βk̂k̂ᵀ (eigenvalues 1 and 1 − β, non-expansive for β ≤ 2) removes more, so it is an \
                 upper bound on the first token's retention, exact along directions no later key touched (beta_sum: Σ β)"),
            crate::model::Family::DeltaNet => Some(
                "DeltaNet: α ≡ 1, no decay: the retention is 0 (log) everywhere (only RRI's a adds one), a trivial upper \
                 bound; all its forgetting is the delta rule's content-addressed erasure I − βk̂k̂ᵀ (beta_sum: Σ β)"),
            crate::model::Family::RetNet => Some(
                "RetNet: the decay is the model's, not the data's: head h keeps ln(1 − 2^(−5−h)) per token on every key \
                 channel (horizons 1/(1 − γ_h) = 32 … 32·2^(H−1) tokens), so the retention is exact and the same for any \
                 text: a control for the data-dependent families (it cannot fail to forget)"),
            crate::model::Family::Xlstm => Some(
                "xLSTM: the retention is Σ log σ(f) per head (the soft-capped forget gate), exact for the true cell; \
                 the state statistics are of the stored matrix C, which is the true one divided by e^m (the \
                 stabiliser, per head), so their scale follows m as well as the content"),
            _ => None,
        },
    });
    write_atomic(&out.join("probe.json"), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    let _ = std::fs::remove_file(out.join(CKPT));
    println!(
        "probe: {} tokens; wrote {}/retention.csv, state_stats.csv, conv_stats.csv, inputs.csv, probe.json and plots",
        st.pos,
        out.display()
    );
    let list: Vec<String> = sel.plot_layers.iter().map(|l| l.to_string()).collect();
    println!("probe: plots show layers {} (--plot-layers to choose)", list.join(", "));
    Ok(())
}

/// `--snapshot-at`, in order, once each.
fn snapshot_positions(o: &Options) -> Vec<u64> {
    let mut at = o.snapshot_at.clone();
    at.sort_unstable();
    at.dedup();
    at
}

/// Feeds the stream, writing a report every `--every` tokens (and at its end), a whole-state
/// snapshot at each `--snapshot-at`, and a checkpoint (`save`) when the cadence says so.
#[allow(clippy::too_many_arguments)]
fn stream_probe(
    net: &dyn stuffed_core::Recurrent,
    s: &mut dyn crate::backend::Backend,
    feed: &mut super::feed::TokenFeed,
    sel: &Selection,
    o: &Options,
    csvs: &mut Csvs,
    st: &mut Stream,
    save: impl Fn(&mut Csvs, &Stream, &ScorerState) -> Result<()>,
) -> Result<Ended> {
    let mut probe = vec![0f32; net.probe_len()];
    let mut since = 0u64; // tokens since the last report
    let mut cadence = super::Cadence::new(o.checkpoint_secs, None);
    let snaps = snapshot_positions(o);
    let mut progress = crate::report::Progress::new("probe", o.max_tokens);
    progress.set(st.pos);
    loop {
        // Next stop: the report boundary or a snapshot position.
        let next_report = st.pos + (o.every - since);
        let next = snaps.iter().copied().find(|&p| p > st.pos).map_or(next_report, |p| p.min(next_report));
        let ids = feed.take((next - st.pos) as usize)?;
        if ids.is_empty() {
            break;
        }
        crate::model::check_ids(&ids, net.vocab_rows(), "probe input")?;
        s.feed_probed(&ids, &mut probe)?;
        st.pos += ids.len() as u64;
        since += ids.len() as u64;
        progress.set(st.pos);
        let at_snapshot = snaps.contains(&st.pos);
        if since < o.every && !feed.done() && !at_snapshot {
            continue;
        }
        let now = s.snapshot()?;
        if at_snapshot {
            st.snapshots.push((st.pos, now.state.clone()));
        }
        if since < o.every && !feed.done() {
            continue;
        }
        report(net, sel, csvs, st, &probe, &now.state, since as f64)?;
        since = 0;
        probe.fill(0.0);
        if feed.done() {
            break;
        }
        let stop = o.stop_after.is_some_and(|n| st.pos >= n);
        if let Some(due) = cadence.due(stop) {
            save(csvs, st, &now)?;
            cadence.saved();
            if let Some(sig) = due.signal {
                progress.finish();
                return Ok(Ended::Signal(sig));
            }
            if stop {
                progress.finish();
                return Ok(Ended::Stopped);
            }
        }
    }
    progress.finish();
    Ok(Ended::Done)
}

/// One report at `st.pos`: the probe sums of the last `k` tokens into the retention sums, then a row
/// per recorded (layer, head) in each CSV.
fn report(
    net: &dyn stuffed_core::Recurrent,
    sel: &Selection,
    csvs: &mut Csvs,
    st: &mut Stream,
    probe: &[f32],
    state: &[f32],
    k: f64,
) -> Result<()> {
    let (nl, nh) = (net.n_layer(), net.n_heads());
    let (names, width) = net.probe_series();
    let (ns, t) = (names.len(), st.pos);
    for l in 0..nl {
        for h in 0..nh {
            let base = (l * ns) * nh * width;
            for c in 0..width {
                st.retention[(l * nh + h) * width + c] += probe[base + h * width + c] as f64;
            }
            if !sel.records(l, h) {
                continue;
            }
            let r = &st.retention[(l * nh + h) * width..(l * nh + h + 1) * width];
            let mean = r.iter().sum::<f64>() / width as f64;
            let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            writeln!(csvs.retention, "{l},{h},{t},{mean},{max}")?;
            let s = stats(state[net.head_state(l, h)].iter().copied());
            writeln!(csvs.state, "{l},{h},{t},{},{},{},{},{}", s[0], s[1], s[2], s[3], s[4])?;
            if let Some(runs) = net.conv_state(l, h) {
                let cs = stats(runs_values(runs, state).into_iter());
                writeln!(csvs.conv, "{l},{h},{t},{},{},{},{},{}", cs[0], cs[1], cs[2], cs[3], cs[4])?;
            }
            let means: Vec<String> = (1..ns)
                .map(|si| {
                    let v: f64 = (0..width).map(|c| probe[((l * ns + si) * nh + h) * width + c] as f64).sum();
                    format!("{}", v / width as f64 / k)
                })
                .collect();
            writeln!(csvs.inputs, "{l},{h},{t},{}", means.join(","))?;
        }
    }
    Ok(())
}

/// A checkpoint at a report: the CSVs' lengths, the scorer `now`, the retention sums and snapshots.
fn save(out: &Path, fp: &str, key: &serde_json::Value, csvs: &mut Csvs, st: &Stream, now: &ScorerState) -> Result<()> {
    let snapshots = st.snapshots.iter().map(|(p, _)| *p).collect();
    let snap = Snapshot {
        fingerprint: fp.to_string(),
        key: key.clone(),
        pos: st.pos,
        tau: now.tau.clone(),
        csv_lens: csvs.lens()?,
        snapshots,
    };
    let names: Vec<String> = st.snapshots.iter().map(|(p, _)| format!("state_t{p}")).collect();
    let mut tensors = StateSlot::Run.tensors(now);
    tensors.push(("retention", Values::F64(&st.retention)));
    tensors.extend(names.iter().zip(&st.snapshots).map(|(n, (_, s))| (n.as_str(), Values::F32(s))));
    report::save_checkpoint(&out.join(CKPT), &serde_json::to_string(&snap)?, &tensors)
}

/// Plots of the plotted layers, read back from the CSVs (nothing per report is kept in memory, so a
/// probe's memory does not grow with the stream).
fn plot_series(out: &Path, o: &Options, sel: &Selection) -> Result<()> {
    let vlines: Vec<(f64, String)> = o.train_len.map(|t| (t as f64, format!("train len {t}"))).into_iter().collect();
    let plotted = |l: usize, h: usize| sel.plot_layers.contains(&l) && sel.heads.contains(&h);
    let mut plots = [
        (
            "retention",
            "log retention of the first token (Σ log α)",
            csv_series(&out.join("retention.csv"), 3, plotted)?,
        ),
        ("state_mean", "state mean", csv_series(&out.join("state_stats.csv"), 3, plotted)?),
        ("state_var", "state variance", csv_series(&out.join("state_stats.csv"), 4, plotted)?),
    ];
    for &l in &sel.plot_layers {
        for (file, y, pts) in &mut plots {
            let series: Vec<Series> = sel
                .heads
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
    Ok(())
}

/// Fig. 6: a channel histogram of one head at the first two snapshots.
fn plot_histogram(
    out: &Path,
    net: &dyn stuffed_core::Recurrent,
    sel: &Selection,
    snapshots: &[(u64, Vec<f32>)],
) -> Result<()> {
    if snapshots.len() < 2 {
        return Ok(());
    }
    let (l, h) = (sel.plot_layers[sel.plot_layers.len() - 1], sel.heads[0]);
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
        .map(|(t, st)| Series { name: format!("t = {}", fmt_tokens(*t)), points: hist(&st[r.clone()]), markers: false })
        .collect();
    let title = format!("Layer {l}, head {h}: state values");
    let p = LinePlot { title: &title, x_label: "state value", y_label: "count", log_x: false, vlines: Vec::new() };
    write_atomic(&out.join(format!("hist_L{l}_H{h}.svg")), p.render(&series).as_bytes())
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
