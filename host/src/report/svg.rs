//! Small, dependency-free SVG charts: line plots (loss against position) and heatmaps.
use std::fmt::Write;

/// One named curve.
#[derive(Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Points as dots, not joined (measurements beside fitted curves).
    pub markers: bool,
}

pub struct LinePlot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    /// Dashed vertical markers, e.g. training lengths.
    pub vlines: Vec<(f64, String)>,
}

const PALETTE: &[&str] =
    &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
/// Dash patterns by series (the first solid), so curves that coincide stay distinguishable.
const DASHES: &[&str] = &["", "8,4", "2,3", "12,3,3,3", "5,2", "1,4"];
/// Lines with at most this many points also get a marker at each, shaped by series.
const MARKED_MAX: usize = 64;

/// Marker `shape` (circle, square, triangle, diamond, inverted triangle) of radius `r` at (x, y):
/// hollow on lines, filled for point series.
fn marker(s: &mut String, shape: usize, x: f64, y: f64, r: f64, color: &str, filled: bool) {
    let fill = if filled { color } else { "white" };
    let style = format!(r#"fill="{fill}" stroke="{color}" stroke-width="1.5""#);
    let _ = match shape % 5 {
        0 => writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r:.1}" {style}/>"#),
        1 => writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" {style}/>"#,
            x - r,
            y - r,
            2.0 * r,
            2.0 * r
        ),
        2 => writeln!(
            s,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" {style}/>"#,
            x,
            y - r * 1.2,
            x - r * 1.1,
            y + r * 0.8,
            x + r * 1.1,
            y + r * 0.8
        ),
        3 => writeln!(
            s,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" {style}/>"#,
            x,
            y - r * 1.3,
            x + r * 1.3,
            y,
            x,
            y + r * 1.3,
            x - r * 1.3,
            y
        ),
        _ => writeln!(
            s,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" {style}/>"#,
            x,
            y + r * 1.2,
            x - r * 1.1,
            y - r * 0.8,
            x + r * 1.1,
            y - r * 0.8
        ),
    };
}

/// Width of the plot area.
const PW: f64 = 570.0;
const H: f64 = 480.0;
/// Margins: left, right (legend), top, bottom.
const L: f64 = 70.0;
const T: f64 = 40.0;
const B: f64 = 55.0;

/// "Nice" tick values covering `lo..=hi`, and the decimals their labels need.
fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, usize) {
    // A span below the values' own precision (one point, a flat series) gets a step f64 can count in.
    let span = (hi - lo).max(lo.abs().max(hi.abs()) * 1e-6).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil();
    let out = (0..=n + 1).map(|k| (first + k as f64) * step + 0.0).take_while(|&v| v <= hi + step * 1e-9).collect();
    // The decimals the step itself has (2.5 needs one, 0.025 three), so no label rounds its tick.
    let decimals = (0..15).find(|&d| {
        let scaled = step * 10f64.powi(d);
        (scaled - scaled.round()).abs() <= scaled.abs() * 1e-9
    });
    (out, decimals.unwrap_or(15) as usize)
}

/// A linear axis's tick label: the value with `decimals`, thousands as k and millions as M
/// (decimal: a linear axis's ticks are multiples of 1, 2, 2.5 or 5 × 10^e, never of 1,024).
fn fmt_tick(v: f64, decimals: usize) -> String {
    let a = v.abs();
    if decimals == 0 && a >= 1e6 {
        format!("{}M", v / 1e6)
    } else if decimals == 0 && a >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v:.decimals$}")
    }
}

const MI: f64 = (1u64 << 20) as f64;

/// Positions as 512, 8k, 1M; other values with `decimals`.
fn fmt_num(v: f64, decimals: usize) -> String {
    let a = v.abs();
    if a >= MI && (v / MI).fract().abs() < 1e-9 {
        format!("{}M", v / MI)
    } else if a >= 1e6 && (v / 1e6).fract().abs() < 1e-9 {
        format!("{}M", v / 1e6)
    } else if a >= 1024.0 && (v / 1024.0).fract().abs() < 1e-9 && decimals == 0 && v.log2().fract() == 0.0 {
        format!("{}k", v / 1024.0)
    } else if a >= 1e3 && decimals == 0 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v:.decimals$}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl LinePlot<'_> {
    pub fn render(&self, series: &[Series]) -> String {
        // The legend gets room for its longest name.
        let longest = series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0);
        #[allow(non_snake_case)]
        let R = (50.0 + 7.0 * longest as f64).max(180.0);
        #[allow(non_snake_case)]
        let W = L + PW + R;
        let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            if self.log_x && x <= 0.0 {
                continue;
            }
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (1.0, 2.0, 0.0, 1.0);
        }
        // A log axis cannot show a line at 0 or below (nor a non-finite one): those are left out.
        let vlines: Vec<&(f64, String)> =
            self.vlines.iter().filter(|(v, _)| v.is_finite() && (!self.log_x || *v > 0.0)).collect();
        for &&(v, _) in &vlines {
            (x0, x1) = (x0.min(v), x1.max(v));
        }
        let pad = (y1 - y0).max(1e-6) * 0.05;
        let (y0, y1) = (y0 - pad, y1 + pad);
        let fx = |x: f64| -> f64 {
            let (a, b, v) = if self.log_x {
                (x0.log2(), x1.log2().max(x0.log2() + 1e-9), x.log2())
            } else {
                (x0, x1.max(x0 + 1e-9), x)
            };
            L + (v - a) / (b - a) * (W - L - R)
        };
        let fy = |y: f64| T + (y1 - y) / (y1 - y0) * (H - T - B);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
            (L + W - R) / 2.0,
            esc(self.title)
        );
        // Axes and ticks.
        let _ = writeln!(
            s,
            r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            W - L - R,
            H - T - B
        );
        let (yt, yd) = ticks(y0, y1, 6);
        for y in yt {
            let py = fy(y);
            let _ = writeln!(
                s,
                r##"<line x1="{L}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - R,
                L - 6.0,
                py + 4.0,
                fmt_tick(y, yd)
            );
        }
        let (xt, xd): (Vec<f64>, usize) = if self.log_x {
            let (a, b) = (x0.log2().floor() as i32, x1.log2().ceil() as i32);
            let step = ((i64::from(b) - i64::from(a)) / 8).max(1);
            ((a..=b).step_by(step as usize).map(|e| 2f64.powi(e)).filter(|&v| v >= x0 && v <= x1).collect(), 0)
        } else {
            ticks(x0, x1, 8)
        };
        for x in xt {
            let px = fx(x);
            let label = if self.log_x { fmt_num(x, xd) } else { fmt_tick(x, xd) };
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" x2="{px:.1}" y1="{T}" y2="{}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                H - B,
                H - B + 16.0,
                label
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (L + W - R) / 2.0,
            H - 12.0,
            esc(self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
            (T + H - B) / 2.0,
            (T + H - B) / 2.0,
            esc(self.y_label)
        );
        for (i, (v, label)) in vlines.into_iter().enumerate() {
            let px = fx(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" x2="{px:.1}" y1="{T}" y2="{}" stroke="#555" stroke-dasharray="6,4"/><text x="{:.1}" y="{}" font-size="11">{}</text>"##,
                H - B,
                px + 4.0,
                T + 14.0 + 14.0 * i as f64,
                esc(label)
            );
        }
        // Curves, then the legend. Each series has its color, dash pattern and marker shape (later
        // ones drawn smaller), so curves that coincide stay distinguishable.
        let style = |i: usize| {
            let dash = match DASHES[i % DASHES.len()] {
                "" => String::new(),
                d => format!(r#" stroke-dasharray="{d}""#),
            };
            (PALETTE[i % PALETTE.len()], dash, (4.5 - 0.5 * (i % 4) as f64).max(2.5))
        };
        for (i, se) in series.iter().enumerate() {
            let (color, dash, r) = style(i);
            let pts: Vec<(f64, f64)> = se
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!self.log_x || p.0 > 0.0))
                .map(|&(x, y)| (fx(x), fy(y)))
                .collect();
            if !se.markers {
                // A non-finite point breaks the line (one series can hold separate segments).
                for piece in se.points.split(|p| !(p.0.is_finite() && p.1.is_finite())) {
                    let path: Vec<String> = piece
                        .iter()
                        .filter(|p| !self.log_x || p.0 > 0.0)
                        .map(|&(x, y)| format!("{:.1},{:.1}", fx(x), fy(y)))
                        .collect();
                    if path.is_empty() {
                        continue;
                    }
                    let _ = writeln!(
                        s,
                        r#"<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{}"/>"#,
                        path.join(" ")
                    );
                }
            }
            if se.markers || pts.len() <= MARKED_MAX {
                for &(x, y) in &pts {
                    marker(&mut s, i, x, y, r, color, se.markers);
                }
            }
        }
        s.push_str("<g class=\"legend\">\n");
        for (i, se) in series.iter().enumerate() {
            let (color, dash, r) = style(i);
            let n_pts = se.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).count();
            let ly = T + 10.0 + 18.0 * i as f64;
            let (x0, x1) = (W - R + 10.0, W - R + 30.0);
            if !se.markers {
                let _ = write!(
                    s,
                    r#"<line x1="{x0}" x2="{x1}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/>"#
                );
            }
            if se.markers || n_pts <= MARKED_MAX {
                marker(&mut s, i, (x0 + x1) / 2.0, ly, r, color, se.markers);
            }
            let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, W - R + 35.0, ly + 4.0, esc(&se.name));
        }
        s.push_str("</g>\n</svg>\n");
        s
    }
}

/// 1024 → "1k", 1048576 → "1M", else the number.
pub fn fmt_tokens(v: u64) -> String {
    if v >= 1 << 20 && v.is_multiple_of(1 << 20) {
        format!("{}M", v >> 20)
    } else if v >= 1024 && v.is_multiple_of(1024) {
        format!("{}k", v >> 10)
    } else {
        v.to_string()
    }
}

/// A grid of values in [0, 1] (None = no sample), red (0) → yellow → green (1), as the paper draws
/// passkey accuracy: `cells[x][y]`, x left to right, y top to bottom.
pub fn heatmap(
    title: &str,
    x_label: &str,
    y_label: &str,
    xs: &[String],
    ys: &[String],
    cells: &[Vec<Option<f64>>],
) -> String {
    let (cw, ch) =
        (((640.0 / xs.len().max(1) as f64).clamp(28.0, 90.0)), ((360.0 / ys.len().max(1) as f64).clamp(16.0, 40.0)));
    let (l, t) = (110.0, 40.0);
    let (w, h) = (l + cw * xs.len() as f64 + 30.0, t + ch * ys.len() as f64 + 60.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{:.1}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for (xi, col) in cells.iter().enumerate() {
        for (yi, v) in col.iter().enumerate() {
            let (x, y) = (l + cw * xi as f64, t + ch * yi as f64);
            let fill = match v {
                None => "#eeeeee".to_string(),
                Some(a) => {
                    let a = a.clamp(0.0, 1.0);
                    // red (215,48,39) → yellow (254,224,139) → green (26,152,80)
                    let (r, g, b) = if a < 0.5 {
                        let k = a / 0.5;
                        (215.0 + k * 39.0, 48.0 + k * 176.0, 39.0 + k * 100.0)
                    } else {
                        let k = (a - 0.5) / 0.5;
                        (254.0 - k * 228.0, 224.0 - k * 72.0, 139.0 - k * 59.0)
                    };
                    format!("rgb({r:.0},{g:.0},{b:.0})")
                }
            };
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{cw:.1}" height="{ch:.1}" fill="{fill}" stroke="white"/>"##
            );
            if let Some(a) = v {
                if ch >= 14.0 && cw >= 26.0 {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{:.0}</text>"#,
                        x + cw / 2.0,
                        y + ch / 2.0 + 3.0,
                        a * 100.0
                    );
                }
            }
        }
    }
    for (xi, lab) in xs.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            l + cw * (xi as f64 + 0.5),
            t + ch * ys.len() as f64 + 14.0,
            esc(lab)
        );
    }
    for (yi, lab) in ys.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            l - 6.0,
            t + ch * (yi as f64 + 0.5) + 4.0,
            esc(lab)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
        l + cw * xs.len() as f64 / 2.0,
        h - 14.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="14" y="{:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {:.1})">{}</text>"#,
        t + ch * ys.len() as f64 / 2.0,
        t + ch * ys.len() as f64 / 2.0,
        esc(y_label)
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ticks stay few and in range for ordinary, flat, one-point and far-from-zero ranges (a single
    /// point at t = 10,000 used to loop forever: the tick counter stopped counting past 2⁵³).
    #[test]
    fn ticks_are_few_and_in_range() {
        for (lo, hi) in [(0.0, 1.0), (3.2, 9.7), (1e4, 1e4), (5e16, 5e16 + 1.0), (-2.0, -2.0), (0.0, 0.0)] {
            let (t, _) = ticks(lo, hi, 8);
            assert!(t.len() <= 10, "{lo}..{hi}: {} ticks", t.len());
            assert!(
                t.iter().all(|&v| v >= lo - 1e-9 * lo.abs().max(1.0) && v <= hi + 1e-6 * hi.abs().max(1.0)),
                "{lo}..{hi}: {t:?}"
            );
        }
        let (t, d) = ticks(0.0, 1.0, 5);
        assert_eq!((t.len(), d), (6, 1));
        assert!(t.iter().enumerate().all(|(i, v)| (v - 0.2 * i as f64).abs() < 1e-12), "{t:?}");
        let one = Series { name: "one".into(), points: vec![(10_000.0, 2.5)], markers: false };
        let p = LinePlot { title: "t", x_label: "x", y_label: "y", log_x: false, vlines: Vec::new() };
        assert!(p.render(std::slice::from_ref(&one)).contains("</svg>"));
        // Lines a log axis cannot show (0 from a damaged file panicked: log2(0) as i32 − …) are left
        // out; on a linear axis 0 is drawn.
        for log_x in [true, false] {
            let vlines = vec![(0.0, "zero".into()), (-1.0, "neg".into()), (f64::NAN, "nan".into()), (64.0, "t".into())];
            let p = LinePlot { title: "t", x_label: "x", y_label: "y", log_x, vlines };
            let svg = p.render(std::slice::from_ref(&one));
            assert_eq!((svg.contains(">zero<"), svg.contains(">nan<"), svg.contains(">t<")), (!log_x, false, true));
        }
    }

    /// A label read back as a number ("7.5k" = 7,500).
    fn label_value(l: &str) -> f64 {
        let (num, scale) = match (l.strip_suffix('k'), l.strip_suffix('M')) {
            (Some(v), _) => (v, 1e3),
            (_, Some(v)) => (v, 1e6),
            _ => (l, 1.0),
        };
        num.parse::<f64>().unwrap_or_else(|e| panic!("label {l:?}: {e}")) * scale
    }

    /// Every linear tick's label reads back as the tick's value, over many ranges and tick counts
    /// (a step of 2.5 labelled 7.5 and 12.5 as "8" and "12", 0.025 as "0.03"), and no two labels of
    /// an axis are the same.
    #[test]
    fn tick_labels_show_their_values() {
        let mut axes = 0;
        for e in -7..=10 {
            for m in [1.0, 1.3, 2.0, 2.2, 2.5, 3.7, 5.0, 6.1, 7.5, 9.9] {
                for at in [0.0, -0.3, 0.1, 3.0, 7.0, -12.0, 1000.0] {
                    for n in [4, 5, 6, 8] {
                        let span = m * 10f64.powi(e);
                        let (lo, hi) = (at * span, at * span + span);
                        let (t, d) = ticks(lo, hi, n);
                        let labels: Vec<String> = t.iter().map(|&v| fmt_tick(v, d)).collect();
                        for (v, l) in t.iter().zip(&labels) {
                            let back = label_value(l);
                            assert!(
                                (back - v).abs() <= 1e-9 * v.abs().max(span),
                                "{lo}..{hi} ({n} ticks): tick {v} labelled {l:?}"
                            );
                        }
                        let mut uniq = labels.clone();
                        uniq.sort();
                        uniq.dedup();
                        assert_eq!(uniq.len(), labels.len(), "{lo}..{hi}: {labels:?}");
                        axes += 1;
                    }
                }
            }
        }
        assert_eq!(axes, 18 * 10 * 7 * 4);
        // The issue's cases, in a rendered plot: y from 0 to 12.5 gets a step of 2.5.
        let (t, d) = ticks(0.0, 0.1, 4);
        assert_eq!(
            t.iter().map(|&v| fmt_tick(v, d)).collect::<Vec<_>>(),
            ["0.000", "0.025", "0.050", "0.075", "0.100"]
        );
        let s = Series { name: "s".into(), points: vec![(0.0, 0.0), (1.0, 12.5)], markers: false };
        let p = LinePlot { title: "t", x_label: "x", y_label: "y", log_x: false, vlines: Vec::new() };
        let svg = p.render(&[s]);
        for want in [">2.5<", ">7.5<", ">12.5<"] {
            assert!(svg.contains(want), "no {want} label in {svg}");
        }
        assert!(!svg.contains(">8<") && !svg.contains(">12<"), "{svg}");
    }

    /// Curves with the same points (last_r.svg's, when every r gives the same accuracy) differ in
    /// dash pattern and marker shape, as lines and as point series.
    #[test]
    fn coinciding_curves_stay_distinguishable() {
        for markers in [false, true] {
            let series: Vec<Series> = (0..4)
                .map(|i| Series { name: format!("s{i}"), points: vec![(1024.0, 0.5), (4096.0, 1.0)], markers })
                .collect();
            let p = LinePlot { title: "t", x_label: "x", y_label: "y", log_x: true, vlines: Vec::new() };
            let svg = p.render(&series);
            let svg = &svg[..svg.find("<g class=\"legend\">").unwrap()];
            // What each series draws on the plot, its color taken out.
            let style_of = |i: usize| -> String {
                let color = PALETTE[i];
                let lines: Vec<&str> = svg.lines().filter(|l| l.contains(color)).collect();
                assert!(!lines.is_empty(), "series {i} not drawn: {svg}");
                lines.iter().map(|l| l.replace(color, "C")).collect::<Vec<_>>().join("\n")
            };
            let styles: Vec<String> = (0..4).map(style_of).collect();
            for a in 0..4 {
                for b in a + 1..4 {
                    assert_ne!(styles[a], styles[b], "series {a} and {b} are drawn alike (markers {markers})");
                }
            }
            let shapes = ["<circle", "<rect x", "<polygon"];
            assert!(shapes.iter().all(|sh| svg.contains(sh)), "{svg}");
        }
    }
}
