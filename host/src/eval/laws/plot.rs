//! t_forget.svg and t_recall.svg: measured points (T_forget as brackets), each family's fit and the
//! paper's curve.
use super::{FamilyLaws, Law};
use crate::report::svg::{LinePlot, Series};

/// Measured points (dots), each family's fit and the paper's curve over `0..1.05·max N_S`; `None`
/// when no family has a point for this law.
pub(super) fn plot(law: Law, fams: &[FamilyLaws]) -> Option<String> {
    let n_max = fams.iter().flat_map(|f| law.points(f)).map(|p| p.0).reduce(f64::max)?;
    let xs: Vec<f64> = (0..=60).map(|i| n_max * 1.05 * i as f64 / 60.0).collect();
    let curve = |name: String, t: &dyn Fn(f64) -> f64| Series {
        name,
        points: xs.iter().map(|&x| (x, t(x))).collect(),
        markers: false,
    };
    let mut series = Vec::new();
    for f in fams {
        let points = law.points(f);
        if points.is_empty() {
            continue;
        }
        match law {
            // A measured T_forget is an interval, [longest that does not forget, shortest that
            // does): drawn as that bracket at its N_S (the fit uses its upper end).
            Law::Forget => {
                let brackets = f.points.iter().filter(|p| p.t_forget_k.is_some());
                let bracket_pts = brackets
                    .filter_map(|p| Some((p.n_s_millions, p.forget_lo? as f64 / 1024.0, p.forget_hi? as f64 / 1024.0)))
                    .flat_map(|(n, lo, hi)| [(n, lo), (n, hi), (f64::NAN, f64::NAN)])
                    .collect();
                let name = format!("{} measured bracket [lo, hi)", f.family);
                series.push(Series { name, points: bracket_pts, markers: false });
            }
            Law::Recall => series.push(Series { name: format!("{} measured", f.family), points, markers: true }),
        }
        if let Some(fit) = law.fitted(f) {
            series.push(curve(format!("{} fit", f.family), &|x| fit.eval(x)));
        }
    }
    // The paper's fit where it gives a positive number of tokens (T_forget is negative below
    // N_S ≈ 0.86M, where the fit says nothing).
    let mut paper = curve("paper (Mamba-2)".into(), &|x| law.paper(x));
    paper.points.retain(|p| p.1 >= 0.0);
    series.push(paper);
    let title = format!("{} against state size", law.name());
    let plot = LinePlot {
        title: &title,
        x_label: "state size N_S (millions)",
        y_label: "tokens (K = 1,024)",
        log_x: false,
        vlines: vec![],
    };
    Some(plot.render(&series))
}
