//! SPEC.md §3's scaling laws. The paper's two fits (printed by `info`, `ppl` and `passkey` beside a
//! model), and `stuffed laws`, which fits the same two forms to what `ppl` and `passkey` measured
//! over models of several state sizes: T_forget from the T_forget verdicts of a training-length
//! sweep, T_recall from passkey grids. Units are the paper's: T in K = 1,024 tokens, N_S in millions.
use crate::report::write_atomic;
use crate::report::Older;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod fit;
mod plot;
pub use fit::{fit_exp, fit_line, laws, laws_of, Fit, Laws};
use plot::plot;

/// One `ppl` run's T_forget verdict.
#[derive(Clone, Debug, Serialize)]
pub struct VerdictObs {
    pub model: String,
    pub train_len: u64,
    pub verdict: String,
    pub evaluated_len: u64,
    pub source: String,
}

/// One `passkey` grid's T_recall.
#[derive(Clone, Debug, Serialize)]
pub struct RecallObs {
    pub model: String,
    /// The largest length with accuracy > 0.95; `None` when no length reached it.
    pub t_recall: Option<u64>,
    pub shortest: u64,
    pub longest: u64,
    pub source: String,
}

#[derive(Default)]
struct Obs {
    verdicts: Vec<VerdictObs>,
    recalls: Vec<RecallObs>,
}

/// What the observations of one state size say.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub family: String,
    pub n_s: u64,
    pub n_s_millions: f64,
    /// The longest training length whose model did not forget, and the shortest whose did:
    /// T_forget lies in `[lo, hi)`.
    pub forget_lo: Option<u64>,
    pub forget_hi: Option<u64>,
    /// The point fitted (K tokens): `hi`, the shortest training length that forgets (as the paper
    /// reads its points off training lengths that are powers of two); `None` unless bracketed.
    pub t_forget_k: Option<f64>,
    pub t_forget: String,
    /// The largest T_recall measured (K tokens); `None` when censored or absent.
    pub t_recall_k: Option<f64>,
    pub t_recall: String,
    /// The paper's fits at this N_S: Mamba-2's only (the paper fitted no other family).
    pub paper: Option<Laws>,
    pub verdicts: Vec<VerdictObs>,
    pub recalls: Vec<RecallObs>,
}

/// " from 2 verdicts", " from 1 grid"; nothing for none.
fn from(n: usize, what: &str) -> String {
    match n {
        0 => String::new(),
        1 => format!(" from 1 {what}"),
        n => format!(" from {n} {what}s"),
    }
}

fn point(family: &str, n_s: u64, o: Obs) -> Point {
    let lo = o.verdicts.iter().filter(|v| v.verdict == "does not forget").map(|v| v.train_len).max();
    let hi = o.verdicts.iter().filter(|v| v.verdict == "forgets").map(|v| v.train_len).min();
    let (t_forget_k, t_forget) = match (lo, hi) {
        (Some(l), Some(h)) if l < h => {
            // "Forgets" is only conclusive on 1M-token prompts (SPEC.md §2.1); "does not forget" is
            // conclusive once seen.
            let seen = o.verdicts.iter().filter(|v| v.train_len == h && v.verdict == "forgets");
            let longest = seen.map(|v| v.evaluated_len).max().unwrap_or(0);
            let short = if longest < 1 << 20 {
                format!(" (forgetting seen over {longest} tokens; the criterion wants 1M)")
            } else {
                String::new()
            };
            (Some(h as f64 / 1024.0), format!("in [{l}, {h}) tokens{short}"))
        }
        (Some(l), Some(h)) => (None, format!("unknown: trained on {l} does not forget, on {h} forgets")),
        (None, Some(h)) => (None, format!("< {h} tokens (every model forgets)")),
        (Some(l), None) => (None, format!("≥ {l} tokens (no model forgets)")),
        (None, None) => (None, "unknown (no ppl verdicts)".into()),
    };
    let t_forget = format!("{t_forget}{}", from(o.verdicts.len(), "verdict"));
    let best = o.recalls.iter().filter_map(|r| r.t_recall.map(|t| (t, r.longest))).max();
    let (t_recall_k, t_recall) = match best {
        Some((t, longest)) if t < longest => (Some(t as f64 / 1024.0), format!("{t} tokens")),
        Some((t, _)) => (None, format!("≥ {t} tokens (recalled at the longest length tried)")),
        None if o.recalls.is_empty() => (None, "unknown (no passkey grids)".into()),
        None => {
            let s = o.recalls.iter().map(|r| r.shortest).min().unwrap_or(0);
            (None, format!("< {s} tokens (no length recalled)"))
        }
    };
    let t_recall = format!("{t_recall}{}", from(o.recalls.len(), "grid"));
    Point {
        family: family.into(),
        n_s,
        n_s_millions: n_s as f64 / 1e6,
        forget_lo: lo,
        forget_hi: hi,
        t_forget_k,
        t_forget,
        t_recall_k,
        t_recall,
        paper: (family == "mamba2").then(|| laws(n_s as usize)),
        verdicts: o.verdicts,
        recalls: o.recalls,
    }
}

fn field<'a>(v: &'a Value, key: &str, file: &Path) -> Result<&'a Value> {
    v.get(key)
        .filter(|x| !x.is_null())
        .ok_or_else(|| anyhow!("{}: no '{key}' (not a stuffed ppl or passkey output)", file.display()))
}

fn u64_of(v: &Value, key: &str, file: &Path) -> Result<u64> {
    field(v, key, file)?.as_u64().ok_or_else(|| anyhow!("{}: '{key}' is not a count", file.display()))
}

/// `(family, N_S, model path)` of a model-facts object.
fn model_of(m: &Value, file: &Path) -> Result<(String, u64, String)> {
    let s = |k: &str| field(m, k, file).map(|v| v.as_str().unwrap_or_default().to_string());
    Ok((s("family")?, u64_of(m, "paper_state_size", file)?, s("path")?))
}

/// Reads one `ppl` results.json or `passkey` summary.json (or the directory holding one) into `obs`,
/// keyed by (family, N_S). Runs with a forgetting method are left out (they measure the method, not
/// the model), as are ppl runs without `--train-len`; each such is one line in `skipped`.
fn read(path: &Path, obs: &mut BTreeMap<(String, u64), Obs>, skipped: &mut Vec<String>, which: &str) -> Result<()> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    let file = if path.is_dir() {
        ["summary.json", "results.json"].iter().map(|f| path.join(f)).find(|f| f.is_file()).ok_or_else(|| {
            anyhow!("{}: no results.json (ppl) or summary.json (passkey) in this directory", path.display())
        })?
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| anyhow!("{}: cannot read: {e}", file.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    let source = file.display().to_string();
    let command = field(&v, "command", &file)?.as_str().map(str::to_string);
    let (kind, older) = match command.as_deref() {
        Some("ppl") => (crate::eval::ppl::RESULTS_KIND, Older::Accept),
        Some("passkey") => (crate::eval::passkey::SUMMARY_KIND, Older::Refuse),
        _ => bail!("{}: neither a ppl results.json nor a passkey summary.json", file.display()),
    };
    let sealed = crate::report::unseal(&source, kind, &text, older)?;
    if sealed.older {
        eprintln!("laws: {source} was written by an older stuffed (no format version or checksum); read as it stands");
    }
    let v = sealed.doc;
    match command.as_deref() {
        Some("ppl") => {
            if v["options"]["shard"].is_array() {
                bail!("{}: one shard of a sharded run; `stuffed merge` the shards first", file.display());
            }
            let runs = field(&v, "runs", &file)?
                .as_array()
                .ok_or_else(|| anyhow!("{}: 'runs' is not a list", file.display()))?;
            for r in runs {
                let (family, n_s, model) = model_of(field(r, "model", &file)?, &file)?;
                let forget = r["forget"].as_str().unwrap_or("none");
                if forget != "none" {
                    skipped.push(format!("{source}: {model} with --forget {forget}"));
                    continue;
                }
                let Some(paper) = r.get("t_forget").filter(|t| !t.is_null()) else {
                    skipped.push(format!("{source}: {model} has no T_forget verdict (no --train-len)"));
                    continue;
                };
                // `--verdict paper` reads the paper's fields; the robust variant reads its own.
                let t = if which == "paper" {
                    paper
                } else {
                    match paper.get("robust").filter(|q| q["name"].as_str() == Some(which)) {
                        Some(q) => q,
                        None => {
                            skipped
                                .push(format!("{source}: {model} has no {which} verdict (an older stuffed wrote it)"));
                            continue;
                        }
                    }
                };
                let Some(verdict) = t.get("verdict").and_then(Value::as_str).map(str::to_string) else {
                    bail!(
                        "{source}: {model} has a training length but no verdict; refusing a damaged result (rerun it)"
                    );
                };
                if verdict == "undetermined" {
                    skipped.push(format!("{source}: {model}'s verdict is {verdict}"));
                    continue;
                }
                let nll = |k: &str| t.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
                let (Some(l_in), Some(l_out)) = (nll("l_in"), nll("l_out")) else {
                    bail!(
                        "{source}: {model}'s verdict '{verdict}' stands on a null or non-finite L_in or L_out ({}, {}); refusing it (rerun that model)",
                        t["l_in"],
                        t["l_out"]
                    );
                };
                if verdict != ["does not forget", "forgets"][(l_out <= 2.0 * l_in) as usize] {
                    bail!("{source}: {model}'s verdict '{verdict}' contradicts its L_in {l_in} and L_out {l_out}");
                }
                let obs_v = VerdictObs {
                    model,
                    train_len: u64_of(paper, "train_len", &file)?,
                    verdict,
                    evaluated_len: u64_of(paper, "evaluated_len", &file)?,
                    source: source.clone(),
                };
                obs.entry((family, n_s)).or_default().verdicts.push(obs_v);
            }
        }
        Some("passkey") => {
            let (family, n_s, model) = model_of(field(&v, "model", &file)?, &file)?;
            let forget = v["forget"].as_str().unwrap_or("none");
            if forget != "none" {
                skipped.push(format!("{source}: {model} with --forget {forget}"));
                return Ok(());
            }
            let lengths: Vec<u64> = field(&v, "accuracy_per_length", &file)?
                .as_array()
                .map(|a| a.iter().filter_map(|x| x["length"].as_u64()).collect())
                .unwrap_or_default();
            let opts = field(&v, "options", &file)?;
            let per =
                opts["depths"].as_array().map_or_else(|| opts["samples"].as_u64().unwrap_or(0), |d| d.len() as u64);
            let (have, want) = (u64_of(&v, "samples", &file)?, per * lengths.len() as u64);
            if lengths.is_empty() || have < want {
                bail!(
                    "{}: holds {have} of the grid's {want} samples (a shard or an unfinished run); merge or finish it first",
                    file.display()
                );
            }
            let obs_r = RecallObs {
                model,
                t_recall: v["t_recall"].as_u64(),
                shortest: lengths.iter().copied().min().unwrap_or(0),
                longest: lengths.iter().copied().max().unwrap_or(0),
                source,
            };
            obs.entry((family, n_s)).or_default().recalls.push(obs_r);
        }
        _ => {}
    }
    Ok(())
}

/// One family's points and the two fits.
#[derive(Clone, Debug, Serialize)]
pub struct FamilyLaws {
    pub family: String,
    pub points: Vec<Point>,
    pub t_forget_fit: Option<Fit>,
    pub t_recall_fit: Option<Fit>,
}

/// Fits both laws per family over the given outputs.
pub fn fit(results: &[PathBuf], verdict: &str) -> Result<(Vec<FamilyLaws>, Vec<String>)> {
    let mut obs = BTreeMap::new();
    let mut skipped = Vec::new();
    for p in results {
        read(p, &mut obs, &mut skipped, verdict)?;
    }
    let mut fams: Vec<FamilyLaws> = Vec::new();
    for ((family, n_s), o) in obs {
        let p = point(&family, n_s, o);
        match fams.last_mut() {
            Some(f) if f.family == family => f.points.push(p),
            _ => fams.push(FamilyLaws { family, points: vec![p], t_forget_fit: None, t_recall_fit: None }),
        }
    }
    for f in &mut fams {
        f.t_forget_fit = fit_line(&Law::Forget.points(f));
        f.t_recall_fit = fit_exp(&Law::Recall.points(f));
    }
    Ok((fams, skipped))
}

/// `stuffed laws`: fits, a line per state size and per fit, laws.json, laws.csv and two plots.
/// `verdict`: the T_forget criterion read from each ppl run, `paper` or the robust variant's name.
pub fn run(results: &[PathBuf], out: &Path, verdict: &str) -> Result<()> {
    let robust = crate::eval::ppl::ROBUST.0;
    if verdict != "paper" && verdict != robust {
        bail!("laws: --verdict {verdict}: paper or {robust}");
    }
    let (fams, skipped) = fit(results, verdict)?;
    for s in &skipped {
        eprintln!("laws: left out {s}");
    }
    if fams.is_empty() {
        bail!("laws: no T_forget verdict and no passkey grid in the given outputs");
    }
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut csv =
        String::from("family,n_s,forget_lo,forget_hi,t_forget_k,t_recall_k,paper_t_forget_k,paper_t_recall_k\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    let optu = |v: Option<u64>| v.map_or(String::new(), |x| x.to_string());
    for f in &fams {
        for p in &f.points {
            println!("{} N_S {:.4}M: T_forget {}; T_recall {}", f.family, p.n_s_millions, p.t_forget, p.t_recall);
            csv += &format!(
                "{},{},{},{},{},{},{},{}\n",
                f.family,
                p.n_s,
                optu(p.forget_lo),
                optu(p.forget_hi),
                opt(p.t_forget_k),
                opt(p.t_recall_k),
                p.paper.as_ref().map_or(String::new(), |l| l.t_forget_k.to_string()),
                p.paper.as_ref().map_or(String::new(), |l| l.t_recall_k.to_string())
            );
        }
        let papers = |law: Law| match f.family.as_str() {
            "mamba2" => law.paper_formula().to_string(),
            _ => "none (the paper fitted Mamba-2 only)".into(),
        };
        for law in [Law::Forget, Law::Recall] {
            match law.fitted(f) {
                Some(fit) => println!(
                    "{} {}: {} (R² {}, {} points{}); the paper's: {}",
                    f.family,
                    law.name(),
                    fit.formula,
                    fit.r2.map_or("undefined".into(), |r| format!("{r:.4}")),
                    fit.points,
                    fit.note.as_ref().map_or(String::new(), |n| format!("; {n}")),
                    papers(law)
                ),
                None => println!(
                    "{} {}: no fit (needs {}); the paper's: {}",
                    f.family,
                    law.name(),
                    law.needs(),
                    papers(law)
                ),
            }
        }
    }
    let json = serde_json::json!({
        "command": "laws",
        "inputs": results,
        "units": "T in K = 1,024 tokens; N_S in millions of state elements (SPEC.md §1)",
        "paper": {"t_forget": Law::Forget.paper_formula(), "t_recall": Law::Recall.paper_formula(), "family": "mamba2"},
        "verdict": verdict,
        "t_forget_rule": "a ppl --train-len verdict per model (forget none); T_forget lies between the longest training length that does not forget and the shortest that does; the shortest that forgets is the point fitted",
        "t_recall_rule": "the largest passkey length with accuracy > 0.95 (forget none, whole grids); censored when every length tried passes or none does",
        "families": fams,
        "skipped": skipped,
    });
    write_atomic(&out.join("laws.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    write_atomic(&out.join("laws.csv"), csv.as_bytes())?;
    let mut wrote = vec!["laws.json".to_string(), "laws.csv".into()];
    for law in [Law::Forget, Law::Recall] {
        if let Some(svg) = plot(law, &fams) {
            let name = format!("{}.svg", law.name().to_lowercase());
            write_atomic(&out.join(&name), svg.as_bytes())?;
            wrote.push(name);
        }
    }
    println!("wrote {}/{}", out.display(), wrote.join(", "));
    Ok(())
}

/// One of the two laws: where its measured points, fit and the paper's curve come from.
#[derive(Clone, Copy)]
enum Law {
    Forget,
    Recall,
}

impl Law {
    fn name(self) -> &'static str {
        match self {
            Law::Forget => "T_forget",
            Law::Recall => "T_recall",
        }
    }
    fn needs(self) -> &'static str {
        match self {
            Law::Forget => "2 state sizes with T_forget bracketed",
            Law::Recall => "3 state sizes with T_recall measured",
        }
    }
    fn paper_formula(self) -> &'static str {
        match self {
            Law::Forget => "T = 5.172·N_S − 4.469 (Mamba-2)",
            Law::Recall => "T = 4.756·(1.365^N_S − 1) − 0.742 (Mamba-2)",
        }
    }
    /// The paper's T (K tokens) at `n` million state elements.
    fn paper(self, n: f64) -> f64 {
        let l = laws((n * 1e6).round() as usize);
        match self {
            Law::Forget => l.t_forget_k,
            Law::Recall => l.t_recall_k,
        }
    }
    /// `(N_S millions, T K tokens)` of a family's points where this law's T is known.
    fn points(self, f: &FamilyLaws) -> Vec<(f64, f64)> {
        let t = |p: &Point| match self {
            Law::Forget => p.t_forget_k,
            Law::Recall => p.t_recall_k,
        };
        f.points.iter().filter_map(|p| t(p).map(|t| (p.n_s_millions, t))).collect()
    }
    fn fitted(self, f: &FamilyLaws) -> Option<&Fit> {
        match self {
            Law::Forget => f.t_forget_fit.as_ref(),
            Law::Recall => f.t_recall_fit.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The fits reproduce SPEC.md §3's read-off points: 130M (N_S 4.8M) T_forget 20.4K by the fit,
    /// 370M (12.9M) T_recall ≈ 256K.
    #[test]
    fn laws_match_the_spec() {
        let l = super::laws(4_800_000);
        assert!((l.t_forget_k - 20.3566).abs() < 1e-9 && l.in_range, "{l:?}");
        assert!((l.t_recall_k - 15.68).abs() < 0.01, "{l:?}");
        assert!((super::laws(12_900_000).t_recall_k - 257.8).abs() < 0.1);
        assert!(!super::laws(864_000).in_range && super::laws(864_100).in_range);
        assert!(super::laws(4_800_000)
            .to_string()
            .contains("T_forget = 20.4K tokens; passkey recall up to T_recall = 15.7K"));
        assert!(super::laws(70_144).to_string().contains("not 0.07M"));
        assert_eq!((l.verdict(20 * 1024), l.verdict(21 * 1024)), ("does not forget", "forgets"));
    }

    fn paper_points(ns: &[f64], law: fn(&super::Laws) -> f64) -> Vec<(f64, f64)> {
        ns.iter().map(|&n| (n, law(&super::laws((n * 1e6).round() as usize)))).collect()
    }

    /// Points on the paper's own laws give back its coefficients; a point off the line lowers R².
    #[test]
    fn fits_recover_the_papers_laws() {
        let ns = [1.5, 4.8, 12.9, 19.3, 30.0];
        let f = super::fit_line(&paper_points(&ns, |l| l.t_forget_k)).unwrap();
        assert!((f.coef[0] - 5.172).abs() < 1e-9 && (f.coef[1] + 4.469).abs() < 1e-9, "{f:?}");
        assert!((f.r2.unwrap() - 1.0).abs() < 1e-12 && f.note.is_none(), "{f:?}");
        assert_eq!(f.formula, "T = 5.1720·N_S − 4.4690");
        let r = super::fit_exp(&paper_points(&ns, |l| l.t_recall_k)).unwrap();
        let want = [4.756, 1.365, -0.742];
        assert!(r.coef.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5 * w.abs().max(1.0)), "{r:?}");
        assert!(r.r2.unwrap() > 1.0 - 1e-12 && r.note.is_none(), "{r:?}");
        let mut off = paper_points(&ns, |l| l.t_forget_k);
        off[2].1 += 40.0;
        let f = super::fit_line(&off).unwrap();
        assert!(f.r2.unwrap() < 0.99 && f.r2.unwrap() > 0.5, "{f:?}");
    }

    /// Too few state sizes give no fit, or a note that the fit is exact by construction; points on a
    /// straight line give the exponential form's bound; one repeated T has no R².
    #[test]
    fn fits_say_when_they_mean_little() {
        assert!(super::fit_line(&[(1.0, 2.0), (1.0, 3.0)]).is_none());
        let two = super::fit_line(&[(1.0, 2.0), (3.0, 8.0)]).unwrap();
        assert!(two.note.as_deref().unwrap().contains("two state sizes"), "{two:?}");
        assert!(super::fit_exp(&[(1.0, 2.0), (2.0, 3.0), (2.0, 4.0)]).is_none());
        let three = super::fit_exp(&paper_points(&[2.0, 6.0, 13.0], |l| l.t_recall_k)).unwrap();
        assert!(three.note.as_deref().unwrap().contains("three state sizes"), "{three:?}");
        let line = super::fit_exp(&[(1.0, 3.0), (2.0, 5.0), (3.0, 7.0), (4.0, 9.0)]).unwrap();
        assert!(line.note.as_deref().unwrap().contains("bound"), "{line:?}");
        assert!((line.eval(2.5) - 6.0).abs() < 1e-3, "{line:?}");
        assert!(super::fit_line(&[(1.0, 2.0), (3.0, 2.0)]).unwrap().r2.is_none());
    }

    fn verdict(train_len: u64, v: &str) -> super::VerdictObs {
        let (model, source) = (format!("m{train_len}"), "r.json".into());
        super::VerdictObs { model, train_len, verdict: v.into(), evaluated_len: 1 << 20, source }
    }

    fn recall(t: Option<u64>, shortest: u64, longest: u64) -> super::RecallObs {
        super::RecallObs { model: "m".into(), t_recall: t, shortest, longest, source: "s.json".into() }
    }

    /// t_forget.svg draws a measured T_forget as its bracket (two ends at one N_S, not a point) and
    /// never the paper's line at negative tokens (below N_S ≈ 0.86M the fit is negative).
    #[test]
    fn t_forget_plot_draws_brackets_and_no_negative_tokens() {
        let (yes, no) = ("forgets", "does not forget");
        let obs = super::Obs { verdicts: vec![verdict(64, no), verdict(2048, yes)], recalls: vec![] };
        let fam = super::FamilyLaws {
            family: "mamba2".into(),
            points: vec![super::point("mamba2", 70_144, obs)],
            t_forget_fit: None,
            t_recall_fit: None,
        };
        let svg = super::plot(super::Law::Forget, &[fam]).unwrap();
        let plot = &svg[..svg.find("<g class=\"legend\">").unwrap()];
        // y tick labels (right-aligned at the axis): none negative.
        let labels: Vec<&str> = plot
            .lines()
            .filter_map(|l| l.split(r#"text-anchor="end">"#).nth(1))
            .map(|l| l.split('<').next().unwrap())
            .collect();
        assert!(!labels.is_empty() && labels.iter().all(|l| !l.starts_with('-')), "{labels:?}");
        // The measured bracket: one line from 64 to 2048 tokens at one x.
        let lines: Vec<Vec<(f64, f64)>> = plot
            .lines()
            .filter_map(|l| l.split(r#"points=""#).nth(1).filter(|_| l.starts_with("<polyline")))
            .map(|p| {
                let pts = p.split('"').next().unwrap().split(' ').filter(|s| !s.is_empty());
                pts.map(|xy| {
                    let (x, y) = xy.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
            })
            .collect();
        let bracket = lines.iter().find(|l| l.len() == 2 && l[0].0 == l[1].0);
        assert!(bracket.is_some_and(|b| b[0].1 != b[1].1), "no vertical bracket in {lines:?}");
        assert!(svg.contains("mamba2 measured bracket [lo, hi)"), "{svg}");
    }

    /// T_forget is bracketed by the longest training length that does not forget and the shortest that
    /// does, and fitted at the latter; contradictions and one-sided sets give no point. T_recall is
    /// censored when the longest length tried passes or none does.
    #[test]
    fn points_bracket_and_censor() {
        let (yes, no) = ("forgets", "does not forget");
        let obs = |v: Vec<super::VerdictObs>, r: Vec<super::RecallObs>| super::Obs { verdicts: v, recalls: r };
        let p = super::point(
            "mamba2",
            4_800_000,
            obs(
                vec![verdict(64, no), verdict(2048, yes), verdict(512, no), verdict(4096, yes)],
                vec![recall(Some(2048), 1024, 8192), recall(Some(4096), 1024, 16384)],
            ),
        );
        assert_eq!((p.forget_lo, p.forget_hi, p.t_forget_k), (Some(512), Some(2048), Some(2.0)));
        assert_eq!(p.t_forget, "in [512, 2048) tokens from 4 verdicts");
        let mut short = verdict(2048, yes);
        short.evaluated_len = 8192;
        let p8k = super::point("m", 1, obs(vec![verdict(512, no), short], vec![]));
        assert_eq!(
            p8k.t_forget,
            "in [512, 2048) tokens (forgetting seen over 8192 tokens; the criterion wants 1M) from 2 verdicts"
        );
        assert_eq!((p.t_recall_k, p.t_recall.as_str()), (Some(4.0), "4096 tokens from 2 grids"));
        assert!((p.paper.as_ref().unwrap().t_forget_k - 20.3566).abs() < 1e-9);
        let p = super::point(
            "m",
            1,
            obs(vec![verdict(4096, no), verdict(2048, yes)], vec![recall(Some(8192), 1024, 8192)]),
        );
        assert_eq!((p.t_forget_k, p.t_recall_k), (None, None));
        assert!(p.t_forget.starts_with("unknown: trained on 4096 does not forget, on 2048 forgets"), "{}", p.t_forget);
        assert!(p.t_recall.starts_with("≥ 8192 tokens"), "{}", p.t_recall);
        let p = super::point("m", 1, obs(vec![verdict(64, yes)], vec![recall(None, 1024, 8192)]));
        assert_eq!(
            (p.t_forget.as_str(), p.t_recall.as_str()),
            ("< 64 tokens (every model forgets) from 1 verdict", "< 1024 tokens (no length recalled) from 1 grid")
        );
        let p = super::point("m", 1, obs(vec![verdict(64, no)], vec![]));
        assert_eq!(
            (p.t_forget.as_str(), p.t_recall.as_str()),
            ("≥ 64 tokens (no model forgets) from 1 verdict", "unknown (no passkey grids)")
        );
    }
}
