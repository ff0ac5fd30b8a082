//! `stuffed calibrate`: one Δ factor (MambaExtend, Azizi et al., ICLR 2025) or one A factor
//! (Mamba-Modulation, arXiv 2509.19633) per layer of a Mamba-1/2 model — or one log-decay factor
//! per layer of the other families (`dt`: log w′ = c_ℓ·log w) — found on calibration
//! windows of the target length in two stages: one factor for every layer from a grid of powers of
//! two (unless `--init` gives it), then per layer by the zeroth-order search of MambaExtend's code
//! (SPSA: two perturbed evaluations a step estimate the gradient over all layers at once), here
//! on the factors' logarithms (the factors span 0.01 to 10, and a step is then a ratio).
//! The loss is the mean NLL (nats per predicted token) over the windows, each run from the zero
//! state. The result is the best factors seen (the all-ones start included), so calibration never
//! reports factors worse than none on its own windows; `--forget dt:file=calibrate.json` uses them.
use crate::backend::Device;
use crate::forget::{ForgetSpec, Scales};
use crate::model::{Family, Model};
use crate::report::{self, Older};
use crate::text::Input;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const RESULT: &str = "calibrate.json";
const CKPT: &str = "calibrate.checkpoint.json";
const KIND: &str = "calibrate";
const CKPT_KIND: &str = "calibrate-checkpoint";

/// The uniform factors tried before the per-layer search: 2⁻⁶ … 2².
pub const GRID: [f64; 9] = [1.0 / 64.0, 1.0 / 32.0, 1.0 / 16.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0];

/// One uniform factor and its loss.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct GridPoint {
    pub factor: f64,
    pub loss: f64,
}

/// The grid point of least loss; on a tie the factor nearer 1 (the smaller change).
fn least(grid: &[GridPoint]) -> Option<GridPoint> {
    let nearer_one = |p: &GridPoint| p.factor.ln().abs();
    grid.iter().copied().min_by(|a, b| a.loss.total_cmp(&b.loss).then(nearer_one(a).total_cmp(&nearer_one(b))))
}
/// Which factor a layer gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Δ′ = s_ℓ·Δ (MambaExtend): `--forget dt:c=…`.
    Dt,
    /// A′ = s_ℓ·A (Mamba-Modulation): `--forget decay:s=…`.
    Decay,
}

impl Method {
    /// The `--forget` method's name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dt => "dt",
            Method::Decay => "decay",
        }
    }

    /// The forgetting method that applies `s` (one factor per layer).
    pub fn spec(self, s: &[f32]) -> Result<ForgetSpec> {
        let t = Scales::new(s)?;
        Ok(match self {
            Method::Dt => ForgetSpec::DtLayers { c: t },
            Method::Decay => ForgetSpec::DecayLayers { s: t },
        })
    }
}

/// What the factors lower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// The mean NLL of every token of `--windows` windows of the text (MambaExtend's perplexity).
    Text,
    /// The mean NLL of the passkey's tokens after `--windows` passkey prompts of `--length`
    /// tokens, needles at depths (i + ½)/windows, keys drawn from `--seed` (not `passkey`'s).
    Passkey,
}

impl Objective {
    /// What its samples are called in messages.
    fn samples(self) -> &'static str {
        match self {
            Objective::Text => "windows",
            Objective::Passkey => "passkey prompts",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub method: Method,
    pub objective: Objective,
    /// The passkey prompts' template (`--objective passkey`).
    pub template: crate::eval::passkey::TemplateName,
    /// Tokens per calibration window (the target length).
    pub length: usize,
    /// Calibration windows, consecutive in the text.
    pub windows: usize,
    /// SPSA steps (three loss evaluations each).
    pub steps: usize,
    /// Step size a_k = lr·cos(kπ / 2·steps) on the gradient estimate over ln s.
    pub lr: f64,
    /// Perturbation of ln s: c_k = perturb / (1 + k)^0.1 (MambaExtend's schedule).
    pub perturb: f64,
    /// The smallest factor (MambaExtend clamps at 0.01).
    pub min_factor: f64,
    /// The factor every layer starts from; `None`: the best of [`GRID`].
    pub init: Option<f64>,
    /// Seeds the perturbation signs (step k draws from seed and k alone).
    pub seed: u64,
    pub chunk: usize,
    #[serde(skip)]
    pub tokenizer: Option<PathBuf>,
    /// Stop (with the checkpoint) once this many steps are done; `--resume` continues.
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// Held-out text: at the end, the loss of no factors, of the grid's best uniform factor and of
    /// the calibrated factors on its first windows (text objective).
    #[serde(skip)]
    pub validate: Vec<Input>,
}

/// One SPSA step, as recorded: the factors it ended at and the three losses it saw.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub step: usize,
    pub loss_plus: f64,
    pub loss_minus: f64,
    /// The loss after the gradient step.
    pub loss_stepped: f64,
    /// The loss of the factors the next step starts from (the least of the three).
    pub loss: f64,
    pub factors: Vec<f64>,
}

/// Where a search stands after `steps.len()` steps.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Search {
    /// The factors the next step starts from.
    pub at: Vec<f64>,
    /// The least loss seen and its factors (the start included).
    pub best_loss: f64,
    pub best: Vec<f64>,
    /// The loss with every factor 1 (no forgetting), and at the start (every factor `--init`, or
    /// the best of the grid).
    pub loss_none: f64,
    pub loss_start: f64,
    /// The uniform factors tried (empty with `--init`).
    pub grid: Vec<GridPoint>,
    pub steps: Vec<Step>,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    fingerprint: String,
    key: serde_json::Value,
    search: Search,
}

/// Step k's perturbation signs, one per layer: from the seed and k alone, so a resumed search
/// draws what an uninterrupted one would.
pub fn signs(seed: u64, k: usize, n: usize) -> Vec<f64> {
    let mut r = crate::rng::SplitMix64::new(seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..n).map(|_| if r.next_u64() >> 63 == 0 { 1.0 } else { -1.0 }).collect()
}

/// The SPSA search over factors with `loss` the function to lower; continues `search` (which
/// holds the start's loss) for the steps it lacks, handing each finished step to `saved`.
/// Returns whether every step is done (false: stopped at `--stop-after`).
pub fn spsa(
    o: &Options,
    search: &mut Search,
    loss: &mut dyn FnMut(&[f64]) -> Result<f64>,
    saved: &mut dyn FnMut(&Search) -> Result<()>,
) -> Result<bool> {
    let n = search.at.len();
    // Steps act on ln s: a perturbation or a step multiplies a factor.
    let floor = |t: f64, by: f64| (t * by.exp()).max(o.min_factor);
    for k in search.steps.len()..o.steps {
        if o.stop_after.is_some_and(|s| k >= s) {
            return Ok(false);
        }
        let ck = o.perturb / (1.0 + k as f64).powf(0.1);
        let ak = o.lr * (k as f64 * std::f64::consts::PI / (2.0 * o.steps as f64)).cos();
        let d = signs(o.seed, k, n);
        let plus: Vec<f64> = search.at.iter().zip(&d).map(|(t, s)| floor(*t, ck * s)).collect();
        let minus: Vec<f64> = search.at.iter().zip(&d).map(|(t, s)| floor(*t, -ck * s)).collect();
        let (lp, lm) = (loss(&plus)?, loss(&minus)?);
        let g = (lp - lm) / (2.0 * ck);
        let stepped: Vec<f64> = search.at.iter().zip(&d).map(|(t, s)| floor(*t, -ak * g * s)).collect();
        let ls = loss(&stepped)?;
        // As MambaExtend's code: the next step starts from the least of the three.
        let (loss_next, next) = [(ls, stepped), (lp, plus), (lm, minus)]
            .into_iter()
            .fold(None::<(f64, Vec<f64>)>, |m, c| match m {
                Some(m) if m.0 <= c.0 => Some(m),
                _ => Some(c),
            })
            .expect("three candidates");
        if loss_next < search.best_loss {
            (search.best_loss, search.best) = (loss_next, next.clone());
        }
        search.steps.push(Step {
            step: k,
            loss_plus: lp,
            loss_minus: lm,
            loss_stepped: ls,
            loss: loss_next,
            factors: next.clone(),
        });
        search.at = next;
        saved(search)?;
    }
    Ok(true)
}

/// One calibration sample: the ids fed from the zero state, and the answer scored after them (for
/// the text objective none: the ids' own tokens are scored).
struct Sample {
    ids: Vec<u32>,
    answer: Vec<u32>,
}

/// The calibration samples of the objective: the first `windows × length` ids of the inputs, cut
/// in order; or `windows` passkey prompts of `length` tokens with their keys.
fn samples(model: &Model, tok: &Tokenizer, inputs: &[Input], o: &Options) -> Result<Vec<Sample>> {
    let samples = match o.objective {
        Objective::Text => {
            let need = o.windows * o.length;
            let stream = super::feed::doc_stream(tok, inputs.to_vec(), Some(need as u64), None);
            let ids = super::feed::TokenFeed::new(stream, 0).take(need)?;
            if ids.len() < need {
                bail!(
                    "calibrate: the text has {} tokens; {} windows of {} need {need} (give more text, or fewer/shorter windows)",
                    ids.len(),
                    o.windows,
                    o.length
                );
            }
            ids.chunks(o.length).map(|w| Sample { ids: w.to_vec(), answer: Vec::new() }).collect()
        }
        Objective::Passkey => {
            use crate::eval::passkey as pk;
            let tpl = pk::template(o.template);
            let nb = pk::num_blocks(tok, &tpl, o.length as u64)?;
            let mut v = Vec::with_capacity(o.windows);
            for i in 0..o.windows {
                let block = pk::needle_block((i as f64 + 0.5) / o.windows as f64, nb);
                let key = pk::key(o.seed ^ PASSKEY_SEED, o.length as u64, i);
                let (text, at) = pk::prompt_text(&tpl, nb, block, &key);
                let (ids, _) = crate::text::encode_long(tok, &text, at)?;
                v.push(Sample { ids, answer: pk::key_tokens(tok, &tpl, &key)? });
            }
            v
        }
    };
    for s in &samples {
        model.check_ids(&s.ids, "the calibration samples")?;
        model.check_ids(&s.answer, "a passkey")?;
    }
    Ok(samples)
}

/// Mixed into `--seed` for the passkey objective's keys, so that they differ from those of a
/// `passkey` run with the same seed.
pub const PASSKEY_SEED: u64 = 0xca11_b4a7_e5ee_d000;

/// Mean NLL of the samples' scored tokens (each sample from the zero state) with the model's
/// forgetting method, the softmax over the `real` ids (as `ppl`).
fn mean_nll(model: &Model, samples: &[Sample], chunk: usize, real: usize) -> Result<f64> {
    let mut b = crate::backend::open(model, chunk, real, Device::Cpu, Default::default())?;
    let (mut sum, mut n) = (0f64, 0usize);
    let mut nll = Vec::new();
    let mut add = |nll: &[f32]| {
        sum += nll.iter().map(|&v| v as f64).sum::<f64>();
        n += nll.len();
    };
    for w in samples {
        b.reset()?;
        for piece in w.ids.chunks(chunk) {
            if w.answer.is_empty() {
                b.score(piece, &mut nll)?;
                add(&nll);
            } else {
                b.feed(piece)?;
            }
            if let Some(sig) = crate::interrupt::raised() {
                bail!("{sig}");
            }
        }
        if !w.answer.is_empty() {
            b.score(&w.answer, &mut nll)?;
            add(&nll);
        }
    }
    let mean = sum / n as f64;
    if !mean.is_finite() {
        bail!("calibrate: the loss is {mean} ({n} tokens scored)");
    }
    Ok(mean)
}

/// The loss of `factors` (one per layer) on `samples`: the model's forgetting method set to them.
fn loss_of(model: &mut Model, o: &Options, factors: &[f64], samples: &[Sample], real: usize) -> Result<f64> {
    let s: Vec<f32> = factors.iter().map(|&v| v as f32).collect();
    model.set_forget(o.method.spec(&s)?)?;
    mean_nll(model, samples, o.chunk, real)
}

/// Inputs as the result records them: name and SHA-256 (`hashes`, in order).
fn inputs_record(inputs: &[Input], hashes: &[String]) -> serde_json::Value {
    inputs.iter().zip(hashes).map(|(i, h)| serde_json::json!({"name": i.name(), "sha256": h})).collect()
}

pub fn run(model_path: &Path, inputs: &[Input], o: &Options, out: &Path, cont: super::Continue) -> Result<()> {
    let _armed = crate::interrupt::arm();
    if o.length < 2 || o.windows == 0 || o.steps == 0 {
        bail!("calibrate: --length must be ≥ 2, --windows and --steps ≥ 1");
    }
    if !o.validate.is_empty() && o.objective != Objective::Text {
        bail!("calibrate: --validate takes held-out text for the text objective");
    }
    if !(o.lr >= 0.0 && o.lr.is_finite() && o.perturb > 0.0 && o.perturb.is_finite()) {
        bail!("calibrate: --lr must be ≥ 0 and --perturb > 0 (finite)");
    }
    if !(o.min_factor > 0.0 && o.min_factor.is_finite() && o.init.is_none_or(|i| i >= o.min_factor && i.is_finite())) {
        bail!("calibrate: --min-factor must be > 0 and --init ≥ it");
    }
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut model = Model::load(model_path)?;
    let path = model.info.path.display().to_string();
    if o.method == Method::Decay && !matches!(model.info.family, Family::Mamba1 | Family::Mamba2) {
        bail!(
            "{path}: --method decay scales Mamba's A (Mamba-1, Mamba-2); this is {}, whose log decay --method dt scales",
            model.info.family.title()
        );
    }
    let n_layer = model.net().n_layer();
    // The family takes the method (DeltaNet has no decay to scale) before any text is read.
    model.set_forget(o.method.spec(&vec![1.0; n_layer])?)?;
    let tok = model.tokenizer(o.tokenizer.as_deref())?;
    let real = model.real_vocab(&tok);
    let wins = samples(&model, &tok, inputs, o)?;
    let hashes = inputs.iter().map(Input::sha256).collect::<Result<Vec<_>>>()?;
    let (key, fp) = super::run_key(&model, inputs, &hashes, o)?;
    let ckpt = out.join(CKPT);
    let mut search = if let Some(c) =
        super::resume_sealed::<Checkpoint>("calibrate", cont, out, &ckpt, CKPT_KIND, (&key, &fp))?
    {
        let s = &c.search;
        let fits = |v: &[f64]| v.len() == n_layer && v.iter().all(|f| f.is_finite() && *f >= o.min_factor);
        if !(fits(&s.at) && fits(&s.best) && s.steps.len() <= o.steps && s.steps.iter().all(|st| fits(&st.factors))) {
            bail!("{}: not a checkpoint of this search (factors or steps out of range)", ckpt.display());
        }
        eprintln!("calibrate: resuming after step {} of {}", c.search.steps.len(), o.steps);
        c.search
    } else {
        Search {
            at: Vec::new(),
            best_loss: f64::INFINITY,
            best: Vec::new(),
            loss_none: f64::NAN,
            loss_start: f64::NAN,
            grid: Vec::new(),
            steps: Vec::new(),
        }
    };
    let started = std::time::Instant::now();
    let mut evals = 0usize;
    let mut loss = |f: &[f64]| -> Result<f64> {
        evals += 1;
        loss_of(&mut model, o, f, &wins, real).map_err(|e| match crate::interrupt::raised() {
            Some(sig) => {
                anyhow!("{sig}: the last finished step is checkpointed in {}; continue with --resume", out.display())
            }
            None => e,
        })
    };
    let save = |s: &Search| -> Result<()> {
        let c = Checkpoint { fingerprint: fp.clone(), key: key.clone(), search: s.clone() };
        report::write_sealed(&ckpt, CKPT_KIND, &c)
    };
    if search.at.is_empty() {
        let none = loss(&vec![1.0; n_layer])?;
        let mut grid = Vec::new();
        let start = match o.init {
            Some(i) => i,
            None => {
                for &f in GRID.iter().filter(|&&f| f >= o.min_factor) {
                    let l = if f == 1.0 { none } else { loss(&vec![f; n_layer])? };
                    eprintln!("calibrate: every layer {f}: loss {l:.6}");
                    grid.push(GridPoint { factor: f, loss: l });
                }
                least(&grid).map_or(1.0, |p| p.factor)
            }
        };
        let l0 = match grid.iter().find(|p| p.factor == start) {
            Some(p) => p.loss,
            None if start == 1.0 => none,
            None => loss(&vec![start; n_layer])?,
        };
        let (best_loss, best) = if none <= l0 { (none, vec![1.0; n_layer]) } else { (l0, vec![start; n_layer]) };
        search = Search {
            at: vec![start; n_layer],
            best_loss,
            best,
            loss_none: none,
            loss_start: l0,
            grid,
            steps: Vec::new(),
        };
        save(&search)?;
    }
    eprintln!(
        "calibrate: {} {} of {} tokens; loss without factors {:.6}, at the start (every layer {}) {:.6}",
        o.windows,
        o.objective.samples(),
        o.length,
        search.loss_none,
        search.at.first().copied().unwrap_or(1.0),
        search.loss_start
    );
    let mut report_step = |s: &Search| -> Result<()> {
        let st = s.steps.last().expect("a step");
        eprintln!(
            "calibrate: step {}/{}: loss {:.6} (+ {:.6}, − {:.6}, stepped {:.6}); best {:.6}",
            st.step + 1,
            o.steps,
            st.loss,
            st.loss_plus,
            st.loss_minus,
            st.loss_stepped,
            s.best_loss
        );
        save(s)
    };
    if !spsa(o, &mut search, &mut loss, &mut report_step)? {
        eprintln!(
            "calibrate: stopped after step {} of {}; checkpoint in {}; continue with --resume",
            search.steps.len(),
            o.steps,
            out.display()
        );
        return Ok(());
    }
    let best32: Vec<f32> = search.best.iter().map(|&v| v as f32).collect();
    let spec = o.method.spec(&best32)?;
    let validation = if o.validate.is_empty() {
        None
    } else {
        let held = samples(&model, &tok, &o.validate, o)?;
        let mut val = |f: &[f64]| loss_of(&mut model, o, f, &held, real);
        let none = val(&vec![1.0; n_layer])?;
        let uniform = least(&search.grid)
            .map(|p| Ok::<_, anyhow::Error>(GridPoint { factor: p.factor, loss: val(&vec![p.factor; n_layer])? }))
            .transpose()?;
        let calibrated = val(&search.best)?;
        eprintln!(
            "calibrate: on the validation text: none {none:.6}{}, the calibrated factors {calibrated:.6}",
            uniform.map_or(String::new(), |u| format!(", every layer {} {:.6}", u.factor, u.loss))
        );
        if let Some(u) = uniform.filter(|u| u.loss < calibrated) {
            eprintln!(
                "calibrate: the grid's uniform factor {} does better on the validation text than the per-layer factors ({:.6} < {calibrated:.6})",
                u.factor, u.loss
            );
        }
        let held_hashes = o.validate.iter().map(Input::sha256).collect::<Result<Vec<_>>>()?;
        Some(serde_json::json!({
            "inputs": inputs_record(&o.validate, &held_hashes),
            "loss_none": none,
            "uniform": uniform,
            "loss_calibrated": calibrated,
        }))
    };
    let doc = serde_json::json!({
        "command": "calibrate",
        "model": model.info,
        "inputs": inputs_record(inputs, &hashes),
        "options": o,
        "matmul": crate::exec::matmul_record(model.matrix_dtypes()),
        "forget": spec.to_string(),
        "factors": shortest(&best32),
        "loss_none": search.loss_none,
        "loss_start": search.loss_start,
        "grid": search.grid,
        "loss_best": search.best_loss,
        "steps": search.steps,
        "validation": validation,
        "evaluations_this_run": evals,
        "seconds_this_run": started.elapsed().as_secs_f64(),
        "notes": "loss: mean NLL in nats per predicted token over the windows (objective text) or of the keys after \
                  the passkey prompts (objective passkey), each from the zero state; \
                  the factors are the best seen (the all-ones start included); \
                  the start: --init, or the best uniform factor of the grid; then SPSA as MambaExtend's code on ln s: c_k = perturb/(1+k)^0.1, a_k = lr·cos(kπ/2·steps), the next step from the least of three",
    });
    report::write_sealed(&out.join(RESULT), KIND, &doc)?;
    std::fs::remove_file(&ckpt).map_err(|e| anyhow!("{}: cannot remove: {e}", ckpt.display()))?;
    println!(
        "calibrate: loss {:.6} → {:.6} on {} {} of {} tokens; use --forget {}:file={}",
        search.loss_none,
        search.best_loss,
        o.windows,
        o.objective.samples(),
        o.length,
        o.method.name(),
        out.join(RESULT).display()
    );
    Ok(())
}

/// f32 values as JSON numbers that print as the f32 does (0.01, not its widened 0.009999999776482582),
/// the digits of the `forget` string.
fn shortest(v: &[f32]) -> Vec<serde_json::Value> {
    v.iter()
        .map(|x| x.to_string().parse::<serde_json::Number>().map_or(serde_json::Value::Null, serde_json::Value::Number))
        .collect()
}

/// The factors a `calibrate.json` holds, as its `forget` method (checked against its seal).
pub fn read_result(file: &Path) -> Result<String> {
    let doc = report::read_sealed(file, KIND, Older::Refuse)?.doc;
    doc.get("forget")
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: a calibrate.json without its \"forget\" method", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(steps: usize) -> Options {
        Options {
            method: Method::Dt,
            objective: Objective::Text,
            template: crate::eval::passkey::TemplateName::Code,
            length: 2,
            windows: 1,
            steps,
            lr: 0.5,
            perturb: 0.1,
            min_factor: 0.01,
            init: Some(1.0),
            seed: 7,
            chunk: 1,
            tokenizer: None,
            stop_after: None,
            validate: Vec::new(),
        }
    }

    /// A loss whose minimum sits at other factors per layer: (ln s_ℓ − ln m_ℓ)².
    fn bowl(f: &[f64]) -> f64 {
        let m = [0.2, 3.0, 1.0, 0.05];
        f.iter().zip(m).map(|(s, m)| (s.ln() - f64::ln(m)).powi(2)).sum()
    }

    fn start(n: usize) -> Search {
        let l = bowl(&vec![1.0; n]);
        Search {
            at: vec![1.0; n],
            best_loss: l,
            best: vec![1.0; n],
            loss_none: l,
            loss_start: l,
            grid: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// The search lowers the loss, keeps the best seen, steps a factor by a ratio, and never goes
    /// below the floor.
    #[test]
    fn spsa_descends_and_keeps_the_best() {
        let o = options(60);
        let mut s = start(4);
        spsa(&o, &mut s, &mut |f| Ok(bowl(f)), &mut |_| Ok(())).unwrap();
        assert_eq!(s.steps.len(), 60);
        let seen = s.steps.iter().map(|st| st.loss).fold(s.loss_none, f64::min);
        assert_eq!(s.best_loss, seen, "the best is the least loss seen");
        assert_eq!(bowl(&s.best), s.best_loss);
        assert!(s.best_loss < 0.25 * s.loss_none, "{} → {}", s.loss_none, s.best_loss);
        assert!(s.steps.iter().all(|st| st.factors.iter().all(|&f| f >= o.min_factor)));
        // Step 0 perturbs each factor by the ratio e^{±perturb}.
        let d = signs(o.seed, 0, 4);
        let plus: Vec<f64> = d.iter().map(|s| (s * o.perturb).exp()).collect();
        assert_eq!(s.steps[0].loss_plus, bowl(&plus));
    }

    /// A search stopped by an error (a signal) after any step and continued from what it saved
    /// ends where an uninterrupted one does, bit for bit.
    #[test]
    fn a_stopped_search_resumes_to_the_same_result() {
        let o = options(12);
        let mut whole = start(4);
        spsa(&o, &mut whole, &mut |f| Ok(bowl(f)), &mut |_| Ok(())).unwrap();
        for stop_at in [1, 5, 17, 35] {
            let mut saved = start(4);
            let mut evals = 0;
            let mut s = start(4);
            let r = spsa(
                &o,
                &mut s,
                &mut |f| {
                    evals += 1;
                    if evals == stop_at {
                        bail!("SIGINT")
                    }
                    Ok(bowl(f))
                },
                &mut |now| {
                    saved = now.clone();
                    Ok(())
                },
            );
            assert!(r.is_err(), "stopped at evaluation {stop_at}");
            spsa(&o, &mut saved, &mut |f| Ok(bowl(f)), &mut |_| Ok(())).unwrap();
            assert_eq!(saved, whole, "stopped at evaluation {stop_at}");
        }
    }

    /// A one-layer model's result prints its table as one value (`dt:c=0.5`), which parses as the
    /// uniform method: `dt:file=` still reads it as a table of one.
    #[test]
    fn a_one_layer_result_reads_back_as_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("calibrate.json");
        for (method, forget) in [(Method::Dt, "dt:c=0.5"), (Method::Decay, "decay:s=0.5")] {
            report::write_sealed(&f, KIND, &serde_json::json!({"forget": forget})).unwrap();
            let spec = ForgetSpec::parse(&format!("{}:file={}", method.name(), f.display())).unwrap();
            assert_eq!(spec, method.spec(&[0.5]).unwrap(), "{forget}");
        }
    }

    #[test]
    fn signs_depend_on_seed_and_step_alone() {
        assert_eq!(signs(3, 5, 64), signs(3, 5, 64));
        assert_ne!(signs(3, 5, 64), signs(3, 6, 64));
        assert_ne!(signs(3, 5, 64), signs(4, 5, 64));
        let s = signs(0, 0, 1000);
        let pos = s.iter().filter(|&&v| v == 1.0).count();
        assert!(s.iter().all(|v| v.abs() == 1.0) && (400..600).contains(&pos), "{pos}");
    }
}
