//! The laws' two forms: the paper's coefficients (SPEC.md §3) and least-squares fits of the same
//! forms to measured points. Pure arithmetic: reading outputs and plotting live beside it.
use serde::Serialize;
/// SPEC.md §3's fits for Mamba-2 at state size N_S (elements): the training length past which a
/// model learns to forget, and the longest prompt whose passkey it still recalls (K = 1,024 tokens,
/// the paper's training lengths being powers of two).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Laws {
    pub n_s_millions: f64,
    /// T_forget = 5.172·N_S − 4.469 (K tokens, N_S in millions): a model forgets iff trained longer.
    pub t_forget_k: f64,
    /// T_recall = 4.756·(1.365^N_S − 1) − 0.742 (K tokens).
    pub t_recall_k: f64,
    /// False below N_S ≈ 0.86M, where T_forget ≤ 0: the fits say nothing about such tiny models.
    pub in_range: bool,
}

/// The fits for a model: Mamba-2 only (the paper fitted them on it), `None` for the other families.
pub fn laws_of(m: &crate::model::ModelInfo) -> Option<Laws> {
    (m.family == crate::model::Family::Mamba2).then(|| laws(m.paper_state_size))
}

pub fn laws(n_s: usize) -> Laws {
    let m = n_s as f64 / 1e6;
    let t_forget_k = 5.172 * m - 4.469;
    Laws {
        n_s_millions: m,
        t_forget_k,
        t_recall_k: 4.756 * (1.365f64.powf(m) - 1.0) - 0.742,
        in_range: t_forget_k > 0.0,
    }
}

impl Laws {
    /// The T_forget verdict the fit predicts for a model trained on `train_len` tokens.
    pub fn verdict(&self, train_len: u64) -> &'static str {
        if train_len as f64 > self.t_forget_k * 1024.0 {
            "forgets"
        } else {
            "does not forget"
        }
    }
}

impl std::fmt::Display for Laws {
    /// One line for `info` and `ppl`.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        if !self.in_range {
            return write!(
                f,
                "SPEC.md §3's Mamba-2 fits hold for N_S ≥ 0.86M, not {:.2}M: find this model's training \
                 lengths by experiment",
                self.n_s_millions
            );
        }
        let k = |x: f64| match x {
            x if x < 1e3 => format!("{x:.1}K"),
            x if x < 1e6 => format!("{:.1}M", x / 1e3),
            x => format!("{:.3e}K", x),
        };
        write!(
            f,
            "SPEC.md §3's Mamba-2 fits at N_S {:.2}M: learns to forget iff trained on > T_forget = {} \
             tokens; passkey recall up to T_recall = {} tokens",
            self.n_s_millions,
            k(self.t_forget_k),
            k(self.t_recall_k)
        )
    }
}

/// A least-squares fit of one law's form to measured points `(N_S in millions, T in K tokens)`.
#[derive(Clone, Debug, Serialize)]
pub struct Fit {
    /// The form with its fitted coefficients, as the paper writes it.
    pub formula: String,
    /// `[a, b]` of `a·N_S + b`, or `[a, b, c]` of `a·(b^N_S − 1) + c`.
    pub coef: Vec<f64>,
    /// 1 − SS_res / SS_tot; `None` when every T is the same.
    pub r2: Option<f64>,
    pub points: usize,
    /// Why the fit deserves less trust than its R² suggests, if it does.
    pub note: Option<String>,
}

impl Fit {
    pub fn eval(&self, n: f64) -> f64 {
        match self.coef[..] {
            [a, b] => a * n + b,
            [a, b, c] => a * (b.powf(n) - 1.0) + c,
            _ => f64::NAN,
        }
    }
}

fn signed(c: f64) -> String {
    if c < 0.0 {
        format!("− {:.4}", -c)
    } else {
        format!("+ {c:.4}")
    }
}

fn distinct_n(pts: &[(f64, f64)]) -> usize {
    let mut n: Vec<f64> = pts.iter().map(|p| p.0).collect();
    n.sort_by(f64::total_cmp);
    n.dedup();
    n.len()
}

/// Ordinary least squares `y = a·u + c`: `(a, c, SS_res)`, `None` when every u is the same.
fn ols(u: &[f64], y: &[f64]) -> Option<(f64, f64, f64)> {
    let n = u.len() as f64;
    let (mu, my) = (u.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let suu: f64 = u.iter().map(|v| (v - mu).powi(2)).sum();
    let suy: f64 = u.iter().zip(y).map(|(a, b)| (a - mu) * (b - my)).sum();
    if suu <= f64::EPSILON * mu.abs().max(1.0).powi(2) * n {
        return None;
    }
    let a = suy / suu;
    let c = my - a * mu;
    let res = u.iter().zip(y).map(|(v, w)| (w - a * v - c).powi(2)).sum();
    Some((a, c, res))
}

fn r2(pts: &[(f64, f64)], fit: &Fit) -> Option<f64> {
    let mean = pts.iter().map(|p| p.1).sum::<f64>() / pts.len() as f64;
    let tot: f64 = pts.iter().map(|p| (p.1 - mean).powi(2)).sum();
    let res: f64 = pts.iter().map(|p| (p.1 - fit.eval(p.0)).powi(2)).sum();
    (tot > 0.0).then(|| 1.0 - res / tot)
}

/// T_forget's form, `T = a·N_S + b`; needs two distinct state sizes.
pub fn fit_line(pts: &[(f64, f64)]) -> Option<Fit> {
    let d = distinct_n(pts);
    let (x, y): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
    let (a, b, _) = ols(&x, &y).filter(|_| d >= 2)?;
    let mut fit = Fit {
        formula: format!("T = {a:.4}·N_S {}", signed(b)),
        coef: vec![a, b],
        r2: None,
        points: pts.len(),
        note: (d == 2).then(|| "two state sizes: the line through them, so R² = 1 says nothing".into()),
    };
    fit.r2 = r2(pts, &fit);
    Some(fit)
}

/// T_recall's form, `T = a·(b^N_S − 1) + c` with b > 1; needs three distinct state sizes. For each
/// b the best (a, c) is linear least squares, so only ln b is searched: a log grid, then golden
/// section around its best cell.
pub fn fit_exp(pts: &[(f64, f64)]) -> Option<Fit> {
    let d = distinct_n(pts);
    let n_max = pts.iter().map(|p| p.0).fold(0.0, f64::max);
    if d < 3 || n_max <= 0.0 {
        return None;
    }
    let y: Vec<f64> = pts.iter().map(|p| p.1).collect();
    // Residual of the best (a, c) for k = ln b, searched as ln k.
    let sse = |ln_k: f64| {
        let u: Vec<f64> = pts.iter().map(|p| (ln_k.exp() * p.0).exp_m1()).collect();
        ols(&u, &y).map_or(f64::INFINITY, |f| f.2)
    };
    // k from 1e-6/N_max (all but a line) to 40/N_max (b^N_max = e^40), evenly in ln k.
    let (lo, hi) = ((1e-6 / n_max).ln(), (40.0 / n_max).ln());
    const GRID: usize = 600;
    let at = |i: usize| lo + (hi - lo) * i as f64 / GRID as f64;
    let best = (0..=GRID).min_by(|&i, &j| sse(at(i)).total_cmp(&sse(at(j))))?;
    let (mut left, mut right) = (at(best.saturating_sub(1)), at((best + 1).min(GRID)));
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..100 {
        let (x1, x2) = (right - g * (right - left), left + g * (right - left));
        if sse(x1) < sse(x2) {
            right = x2;
        } else {
            left = x1;
        }
    }
    let k = ((left + right) / 2.0).exp();
    let u: Vec<f64> = pts.iter().map(|p| (k * p.0).exp_m1()).collect();
    let (a, c, _) = ols(&u, &y)?;
    let base = k.exp();
    let note = if best == 0 || best == GRID {
        Some(format!("b = {base:.6} is at the search's bound: the points do not curve as this form wants"))
    } else {
        (d == 3).then(|| "three state sizes: the curve through them, so R² = 1 says nothing".into())
    };
    let mut fit = Fit {
        formula: format!("T = {a:.4}·({base:.4}^N_S − 1) {}", signed(c)),
        coef: vec![a, base, c],
        r2: None,
        points: pts.len(),
        note,
    };
    fit.r2 = r2(pts, &fit);
    Some(fit)
}
