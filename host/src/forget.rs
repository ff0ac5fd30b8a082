//! `--forget METHOD`: parsing, and the methods that act on the state between calls (state
//! normalization, periodic reset). The in-recurrence methods (RRI, Δ scaling, window) live in the core.
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use stuffed_core::forget::{Decimation, DtThresholds, LayerScales};
use stuffed_core::Forget;

/// A LongMamba table as `--forget longmamba:file=F,b=B,c=C` made it from `stuffed longmamba`'s
/// file: b·θ on the global heads (retention > c), 0 on the others. Kept once for the program's life
/// (the core borrows it as `&'static`, so that its `Forget` stays `Copy`); equal tables are one.
#[derive(Debug, PartialEq, Serialize)]
pub struct LongMamba {
    pub file: String,
    pub b: f32,
    pub c: f32,
    /// The calibrated model's content id ([`crate::model::Model::content_id`]).
    pub content: String,
    pub heads: usize,
    /// The target lengths, ascending (one table each).
    pub targets: &'static [u64],
    /// `(targets, layers, heads)`, row-major.
    pub theta: &'static [f32],
}

impl LongMamba {
    /// The thresholds of target `i` (`(layers, heads)`).
    pub fn thresholds(&'static self, i: usize) -> Result<DtThresholds> {
        let per = self.theta.len() / self.targets.len();
        let rows = self.theta.get(i * per..(i + 1) * per).ok_or_else(|| anyhow!("{}: no target {i}", self.file))?;
        DtThresholds::new(rows, self.heads).map_err(|e| anyhow!("{}: {e}", self.file))
    }
}

/// The handle a [`ForgetSpec`] holds: the table, and the thresholds of its longest target (those
/// of a prompt of unknown length).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LongMambaRef(&'static LongMamba, DtThresholds);

impl LongMambaRef {
    /// The one copy of the tables `theta (targets, layers, heads)` (checked: finite, ≥ 0, whole
    /// rows, ascending targets).
    pub fn new(
        file: String,
        b: f32,
        c: f32,
        content: String,
        heads: usize,
        targets: Vec<u64>,
        theta: Vec<f32>,
    ) -> Result<Self> {
        static TABLES: std::sync::Mutex<Vec<&'static LongMamba>> = std::sync::Mutex::new(Vec::new());
        let mut tables = TABLES.lock().map_err(|_| anyhow!("longmamba: the table store is poisoned"))?;
        let found = tables
            .iter()
            .find(|t| {
                t.file == file
                    && t.b == b
                    && t.c == c
                    && t.content == content
                    && t.heads == heads
                    && *t.targets == targets[..]
                    && *t.theta == theta[..]
            })
            .copied();
        let t = match found {
            Some(t) => t,
            None => {
                if heads == 0
                    || targets.is_empty()
                    || !targets.windows(2).all(|w| w[0] < w[1])
                    || theta.is_empty()
                    || !theta.len().is_multiple_of(heads * targets.len())
                    || theta.iter().any(|v| !(*v >= 0.0 && v.is_finite()))
                {
                    bail!("{file}: Δ thresholds: ascending targets, each whole rows of {heads} finite values ≥ 0");
                }
                let targets: &'static [u64] = Box::leak(targets.into_boxed_slice());
                let theta: &'static [f32] = Box::leak(theta.into_boxed_slice());
                let t: &'static LongMamba =
                    Box::leak(Box::new(LongMamba { file, b, c, content, heads, targets, theta }));
                tables.push(t);
                t
            }
        };
        Ok(LongMambaRef(t, t.thresholds(t.targets.len() - 1)?))
    }

    pub fn table(&self) -> &'static LongMamba {
        self.0
    }

    /// The target nearest `len` (their `min(available_values, key=|seqlen − x|)`: on a tie the
    /// shorter), or the longest for a length not known.
    pub fn nearest(&self, len: Option<u64>) -> usize {
        let targets = self.0.targets;
        match len {
            None => targets.len() - 1,
            Some(l) => {
                (0..targets.len()).fold(0, |b, i| if targets[i].abs_diff(l) < targets[b].abs_diff(l) { i } else { b })
            }
        }
    }
}

impl Serialize for LongMambaRef {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(ser)
    }
}

impl<'de> Deserialize<'de> for LongMambaRef {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<LongMambaRef, D::Error> {
        #[derive(Deserialize)]
        struct Plain {
            file: String,
            b: f32,
            c: f32,
            content: String,
            heads: usize,
            /// (Absent before targets were a list: one table, its length not recorded.)
            #[serde(default)]
            targets: Vec<u64>,
            theta: Vec<f32>,
        }
        let p = Plain::deserialize(de)?;
        let targets = if p.targets.is_empty() { vec![0] } else { p.targets };
        LongMambaRef::new(p.file, p.b, p.c, p.content, p.heads, targets, p.theta).map_err(serde::de::Error::custom)
    }
}

/// One factor per layer (`dt:c=0.9/1.2/…`, `decay:s=…`): serialized as a list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scales(pub LayerScales);

impl Scales {
    pub fn new(s: &[f32]) -> Result<Scales> {
        LayerScales::new(s).map(Scales).map_err(|e| anyhow!("{e}"))
    }

    pub fn as_slice(&self) -> &[f32] {
        self.0.as_slice()
    }
}

impl Serialize for Scales {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        self.as_slice().serialize(ser)
    }
}

impl<'de> Deserialize<'de> for Scales {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Scales, D::Error> {
        let v = Vec::<f32>::deserialize(de)?;
        Scales::new(&v).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Scales {
    /// `0.9/1.2/…`: each factor in the shortest form that parses back to the same f32.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, v) in self.as_slice().iter().enumerate() {
            write!(f, "{}{v}", if i > 0 { "/" } else { "" })?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum ForgetSpec {
    #[default]
    None,
    Rri {
        a: f32,
        b: f32,
    },
    /// The delta rule's RRI that scales the erasure with the write: α′ = a·α, β′ = b·β (DeltaNet, GDN).
    RriBoth {
        a: f32,
        b: f32,
    },
    Dt {
        c: f32,
    },
    /// Mamba-Modulation: A′ = s·A (α′ = α^s, the write Δ·B unchanged); Mamba-1 and Mamba-2.
    Decay {
        s: f32,
    },
    /// MambaExtend: Δ′ = c_ℓ·Δ, one factor per layer (`dt:c=0.9/1.2/…`); the per-channel
    /// families scale their log decay by c_ℓ, as `Dt`.
    DtLayers {
        c: Scales,
    },
    /// Mamba-Modulation per layer: A′ = s_ℓ·A (`decay:s=0.9/1.2/…`); Mamba-1 and Mamba-2.
    DecayLayers {
        s: Scales,
    },
    Window {
        r: usize,
    },
    /// Two staggered states (FAMILIES.md §9.3): the window of non-diagonal transitions (RWKV-7),
    /// where the window by state difference is not exact; the read-out holds the last r+1 to 2r tokens.
    Staggered {
        r: usize,
    },
    /// τ = ‖h‖_F per (layer, head) after `calib` tokens (default: --train-len); then every `every`
    /// tokens h ← h·min(1, τ/‖h‖_F).
    StateNorm {
        every: u64,
        calib: Option<u64>,
    },
    /// Zero the whole state every `every` tokens.
    Reset {
        every: u64,
    },
    /// LongMamba (Ye et al., ICLR 2025): Δ ← 0 where Δ ≤ b·θ on the global heads, from the table
    /// `stuffed longmamba` calibrated (`longmamba:file=longmamba.json,b=1,c=0.05,min=3000`), on the
    /// tokens of a prompt of at least `min` tokens and never on those decoded after it (their
    /// `forward` filters when `int(seqlen/1e3) > 2`, their `step` never). Mamba-2 only.
    #[serde(rename = "longmamba")]
    LongMamba {
        table: LongMambaRef,
        #[serde(default = "longmamba_min_default")]
        min: u64,
    },
    /// DeciMamba (Ben-Kish et al., ICLR 2025): in each decimating layer only the prompt's
    /// K_s = ⌊max(min(L, base·β^s), min)⌋ tokens of largest ‖Δ_t‖₂ go on (s: the layer's index
    /// among them; L: the tokens reaching it; the prompt's `last` tokens always), that layer's scan and
    /// the later layers skipping the rest; decoded tokens are never dropped. Their top-K is over
    /// the whole prompt, so `passkey` runs each prompt alone in two passes or more (one measuring
    /// pass per decimating layer). Mamba-1 (their code: Δ over its channels) and Mamba-2 (over its
    /// heads); `passkey` only.
    #[serde(rename = "decimamba")]
    DeciMamba(DeciMamba),
}

/// DeciMamba's settings (`decimamba:layers=12,base=6000,beta=0.5,min=20,last=1`: their evaluation
/// config's `decimation_max_p_L_base`, `decimation_beta`, `decimation_min_seq_len`, and their
/// `resp_len`, the prompt's last tokens never dropped: 1 in their `generate`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeciMamba {
    pub layers: DeciLayers,
    pub base: f64,
    pub beta: f64,
    pub min: u64,
    #[serde(default = "deci_last_default")]
    pub last: u64,
}

fn deci_last_default() -> u64 {
    1
}

impl DeciMamba {
    /// Tokens kept of the `l` that reach the `s`-th decimating layer (the prompt's last token
    /// not counted): their `int(max(min(L_for_dec, L_base·β^s), min_seq_len))`, at most `l`.
    pub fn keep(&self, s: usize, l: usize) -> usize {
        let k = (l as f64).min(self.base * self.beta.powi(s as i32)).max(self.min as f64);
        (k as usize).min(l)
    }

    /// The cut that keeps exactly the `k` largest of `norms`: the k-th largest as the threshold,
    /// and as many of the norms equal to it as `k` leaves after the larger ones (the earliest kept);
    /// every token when k covers them, none when k is 0.
    pub fn threshold(norms: &[f32], k: usize) -> Threshold {
        if k >= norms.len() {
            return Threshold { tau: 0.0, ties: usize::MAX };
        }
        if k == 0 {
            return Threshold { tau: f32::MAX, ties: 0 };
        }
        let mut v = norms.to_vec();
        let (_, kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let tau = *kth;
        Threshold { tau, ties: k - norms.iter().filter(|&&x| x > tau).count() }
    }
}

/// Where a DeciMamba prompt stands ([`crate::session::Session::decimate`]): the pass under way
/// (s below the decimating layers' count: measuring the s-th; at it: the decimated pass), the
/// prompt's tokens fed in it, the cuts found (one per finished measuring pass) with the ties each
/// has left at `fed`, the positions each kept, and the rows the decimated pass kept so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeciProgress {
    pub pass: usize,
    pub fed: usize,
    pub cuts: Vec<Threshold>,
    pub ties_left: Vec<usize>,
    pub kept: Vec<Vec<u32>>,
    pub counts: Vec<usize>,
}

/// What a DeciMamba prompt hands over after every call, for a checkpoint when one is due: its
/// progress, the norms measured so far in the pass, and the state.
pub type DeciSave<'a> = dyn FnMut(&DeciProgress, &[f32], &[f32]) -> Result<()> + 'a;

/// A DeciMamba checkpoint: the progress, the norms measured so far in its pass, and the state.
pub struct DeciResume {
    pub progress: DeciProgress,
    pub norms: Vec<f32>,
    pub state: Vec<f32>,
}

impl DeciResume {
    /// Refuses a checkpoint that does not fit a prompt of `prefix` tokens under `layers`
    /// decimating layers and a state of `state_len` values.
    pub fn check(&self, layers: usize, prefix: usize, state_len: usize) -> Result<()> {
        let p = &self.progress;
        let measuring = p.pass < layers;
        let reach = p.kept.last().map_or(prefix, Vec::len);
        let ok = p.pass <= layers
            && p.cuts.len() == p.pass
            && p.kept.len() == p.pass
            && p.ties_left.len() == p.pass
            && p.fed <= prefix
            && p.kept
                .iter()
                .all(|k| k.windows(2).all(|w| w[0] < w[1]) && k.last().is_none_or(|&x| (x as usize) < prefix))
            && p.cuts.iter().all(|t| t.tau >= 0.0 && t.tau.is_finite())
            && (if measuring { self.norms.len() <= p.fed.min(reach) } else { self.norms.is_empty() })
            && self.state.len() == state_len
            && self.state.iter().all(|v| v.is_finite());
        if !ok {
            bail!("a decimamba checkpoint that does not fit this prompt (pass {}, {} tokens fed)", p.pass, p.fed);
        }
        Ok(())
    }
}

/// One decimating layer's cut: the threshold and how many norms equal to it go on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub tau: f32,
    pub ties: usize,
}

impl Threshold {
    /// The indices of the rows of `norms` this cut keeps, in order (as the core decides: above
    /// the threshold, or equal to it while the ties last).
    pub fn kept<'a>(&self, norms: &'a [f32]) -> impl Iterator<Item = usize> + 'a {
        let (tau, mut ties) = (self.tau, self.ties);
        norms.iter().enumerate().filter_map(move |(i, &v)| match v > tau || (v == tau && ties > 0) {
            true => {
                if v == tau {
                    ties -= 1;
                }
                Some(i)
            }
            false => None,
        })
    }
}

/// The decimating layers, ascending (at most [`stuffed_core::forget::MAX_DECIMATING`]);
/// serialized as a list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeciLayers(Decimation);

impl DeciLayers {
    pub fn new(layers: &[usize]) -> Result<DeciLayers> {
        if layers.is_empty() {
            bail!("decimamba: give the decimating layers (layers=12 or layers=6/12)");
        }
        Decimation::new(layers, &vec![0.0; layers.len()]).map(DeciLayers).map_err(|e| anyhow!("{e}"))
    }

    pub fn as_slice(&self) -> &[usize] {
        self.0.layers()
    }

    /// The cut of the first layers, one threshold each.
    pub fn cut(&self, th: &[Threshold]) -> Result<Decimation> {
        let tau: Vec<f32> = th.iter().map(|t| t.tau).collect();
        let cut = Decimation::new(&self.as_slice()[..th.len()], &tau).map_err(|e| anyhow!("{e}"))?;
        Ok(th.iter().enumerate().fold(cut, |c, (i, t)| c.with_ties(i, t.ties)))
    }
}

impl Serialize for DeciLayers {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        self.as_slice().serialize(ser)
    }
}

impl<'de> Deserialize<'de> for DeciLayers {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<DeciLayers, D::Error> {
        DeciLayers::new(&Vec::<usize>::deserialize(de)?).map_err(serde::de::Error::custom)
    }
}

/// LongMamba's shortest filtered prompt: their `forward` filters when `int(seqlen / 1e3) > 2`.
pub const LONGMAMBA_MIN: u64 = 3000;

fn longmamba_min_default() -> u64 {
    LONGMAMBA_MIN
}

/// Which tokens a call feeds, for a method that acts on part of a sequence only (LongMamba filters
/// the tokens of a long prompt, not those decoded after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A prompt's tokens; `len`: the prompt's whole length, when the command knows it (unknown is
    /// taken as long: an embedding's calls, a stream of unknown end).
    Prompt { len: Option<u64> },
    /// Tokens decoded after the prompt, or an answer scored teacher-forced in their place.
    Answer,
}

impl Default for Phase {
    fn default() -> Phase {
        Phase::Prompt { len: None }
    }
}

impl ForgetSpec {
    /// `none`, `rri:a=0.9999,b=0.75`, `dt:c=0.5`, `decay:s=0.5`, `window:r=4096`, `staggered:r=4096`,
    /// `state-norm:every=128,calib=8k`, `reset:every=4k` (token counts take k and m as every count flag does).
    /// `dt:c=0.9/1.2/…` and `decay:s=…` give one factor per layer; `dt:file=F` and `decay:file=F`
    /// read them from the `calibrate.json` that `stuffed calibrate` wrote.
    pub fn parse(s: &str) -> Result<ForgetSpec> {
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let mut kv = BTreeMap::new();
        for part in args.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| anyhow!("--forget {s}: '{part}' is not key=value"))?;
            kv.insert(k.trim().to_string(), v.trim().to_string());
        }
        let num = |k: &str| -> Result<Option<f64>> {
            kv.get(k)
                .map(|v| v.parse::<f64>().map_err(|_| anyhow!("--forget {s}: {k}={v} is not a number")))
                .transpose()
        };
        let known: &[&str] = match name {
            "none" => &[],
            "rri" | "rri-both" => &["a", "b"],
            "dt" => &["c", "file"],
            "decay" => &["s", "file"],
            "window" | "staggered" => &["r"],
            "state-norm" => &["every", "calib"],
            "reset" => &["every"],
            "longmamba" => &["file", "b", "c", "min"],
            "decimamba" => &["layers", "base", "beta", "min", "last"],
            other => {
                bail!("--forget: unknown method '{other}' (none, rri, rri-both, dt, decay, window, staggered, state-norm, reset, longmamba, decimamba)")
            }
        };
        if let Some(k) = kv.keys().find(|k| !known.contains(&k.as_str())) {
            bail!("--forget {s}: unknown parameter '{k}'");
        }
        // Token counts (r, every, calib) as every count flag takes them: 4096, 4k, 1m.
        let count = |k: &str| -> Result<Option<u64>> {
            kv.get(k).map(|v| crate::text::parse_count(v).map_err(|e| anyhow!("--forget {s}: {k}: {e}"))).transpose()
        };
        let need_count = |k: &str| count(k)?.ok_or_else(|| anyhow!("--forget {s}: missing {k}="));
        // A factor per layer: `c=0.9/1.2/…`, or `file=calibrate.json`.
        let factors = |k: &str| -> Result<Option<Scales>> {
            if let Some(f) = kv.get("file") {
                if kv.contains_key(k) {
                    bail!("--forget {s}: give {k}= or file=, not both");
                }
                return calibrated(name, std::path::Path::new(f)).map(Some);
            }
            match kv.get(k) {
                Some(v) if v.contains('/') => {
                    let vals = v
                        .split('/')
                        .map(|x| {
                            x.trim().parse::<f32>().map_err(|_| anyhow!("--forget {s}: {k}: '{x}' is not a number"))
                        })
                        .collect::<Result<Vec<f32>>>()?;
                    Scales::new(&vals).map(Some).map_err(|e| anyhow!("--forget {s}: {e}"))
                }
                _ => Ok(None),
            }
        };
        Ok(match name {
            "none" => ForgetSpec::None,
            "rri" => ForgetSpec::Rri { a: num("a")?.unwrap_or(0.9999) as f32, b: num("b")?.unwrap_or(0.75) as f32 },
            "rri-both" => {
                ForgetSpec::RriBoth { a: num("a")?.unwrap_or(0.9999) as f32, b: num("b")?.unwrap_or(0.75) as f32 }
            }
            "dt" => match factors("c")? {
                Some(c) => ForgetSpec::DtLayers { c },
                None => ForgetSpec::Dt { c: num("c")?.unwrap_or(0.5) as f32 },
            },
            "decay" => match factors("s")? {
                Some(s) => ForgetSpec::DecayLayers { s },
                None => ForgetSpec::Decay { s: num("s")?.unwrap_or(0.5) as f32 },
            },
            "window" => ForgetSpec::Window { r: need_count("r")? as usize },
            "staggered" => ForgetSpec::Staggered { r: need_count("r")? as usize },
            "state-norm" => ForgetSpec::StateNorm { every: count("every")?.unwrap_or(128), calib: count("calib")? },
            "longmamba" => {
                use crate::eval::longmamba::{read_table, DEFAULT_B, DEFAULT_C};
                let file = kv.get("file").ok_or_else(|| {
                    anyhow!("--forget {s}: missing file= (the longmamba.json `stuffed longmamba` wrote)")
                })?;
                let (b, c) = (num("b")?.unwrap_or(DEFAULT_B), num("c")?.unwrap_or(DEFAULT_C));
                if !(b > 0.0 && b.is_finite() && c >= 0.0 && c.is_finite()) {
                    bail!("--forget {s}: b must be > 0 and c ≥ 0 (finite)");
                }
                let t = read_table(std::path::Path::new(file))?;
                let theta = t
                    .thresholds
                    .iter()
                    .flat_map(|table| table.iter().zip(&t.retention))
                    .map(|(th, r)| if *r > c { (b * th) as f32 } else { 0.0 })
                    .collect();
                ForgetSpec::LongMamba {
                    table: LongMambaRef::new(file.clone(), b as f32, c as f32, t.content, t.heads, t.targets, theta)?,
                    // 0: every prompt, whatever its length.
                    min: match kv.get("min").map(String::as_str) {
                        Some("0") => 0,
                        _ => count("min")?.unwrap_or(LONGMAMBA_MIN),
                    },
                }
            }
            "decimamba" => {
                let layers = kv
                    .get("layers")
                    .ok_or_else(|| anyhow!("--forget {s}: missing layers= (the decimating layers, e.g. layers=12)"))?
                    .split('/')
                    .map(|x| {
                        x.trim().parse::<usize>().map_err(|_| anyhow!("--forget {s}: layers: '{x}' is not a layer"))
                    })
                    .collect::<Result<Vec<usize>>>()?;
                let (base, beta) = (num("base")?.unwrap_or(6000.0), num("beta")?.unwrap_or(0.5));
                if !(base >= 0.0 && base.is_finite() && beta > 0.0 && beta <= 1.0) {
                    bail!("--forget {s}: base must be ≥ 0 and 0 < beta ≤ 1");
                }
                let layers = DeciLayers::new(&layers).map_err(|e| anyhow!("--forget {s}: {e}"))?;
                let min = match kv.get("min").map(String::as_str) {
                    Some("0") => 0,
                    _ => count("min")?.unwrap_or(20),
                };
                let last = count("last")?.unwrap_or(1);
                ForgetSpec::DeciMamba(DeciMamba { layers, base, beta, min, last })
            }
            _ => ForgetSpec::Reset { every: need_count("every")? },
        })
    }

    /// The part the core applies inside the recurrence.
    pub fn core(&self) -> Forget {
        match *self {
            ForgetSpec::Rri { a, b } => Forget::Rri { a, b },
            ForgetSpec::RriBoth { a, b } => Forget::RriBoth { a, b },
            ForgetSpec::Dt { c } => Forget::Dt { c },
            ForgetSpec::Decay { s } => Forget::Decay { s },
            ForgetSpec::DtLayers { c } => Forget::DtLayers(c.0),
            ForgetSpec::DecayLayers { s } => Forget::DecayLayers(s.0),
            ForgetSpec::Window { r } => Forget::Window { r },
            ForgetSpec::Staggered { r } => Forget::Staggered { r },
            ForgetSpec::LongMamba { table, .. } => Forget::DtThreshold(table.1),
            _ => Forget::None,
        }
    }

    /// LongMamba's target for the tokens of `phase` (the nearest to the prompt's length, the
    /// longest for an unknown one), where its filter acts there; `None` otherwise.
    pub fn longmamba_target(&self, phase: Phase) -> Option<usize> {
        match (*self, phase) {
            (ForgetSpec::LongMamba { table, .. }, Phase::Prompt { len }) if self.acts_in(phase) => {
                Some(table.nearest(len))
            }
            _ => None,
        }
    }

    /// Whether the in-recurrence part acts on the tokens of `phase`: everywhere, but LongMamba's
    /// filter only on a prompt of at least `min` tokens (or of unknown length).
    pub fn acts_in(&self, phase: Phase) -> bool {
        match (*self, phase) {
            (ForgetSpec::LongMamba { min, .. }, Phase::Prompt { len }) => len.is_none_or(|l| l >= min),
            (ForgetSpec::LongMamba { .. }, Phase::Answer) => false,
            _ => true,
        }
    }

    /// Tokens the next call from position `pos` may hold: at most `left` and `chunk`, ending where
    /// a state-level method (reset, state normalization) acts. Both backends cut their calls here.
    pub fn piece_len(&self, pos: u64, chunk: usize, left: usize) -> usize {
        let n = chunk.min(left);
        let next = |every: u64| (pos / every + 1) * every;
        let boundary = match *self {
            ForgetSpec::Reset { every } => next(every),
            ForgetSpec::StateNorm { every, calib: Some(c) } if pos < c => next(every).min(c),
            ForgetSpec::StateNorm { every, .. } => next(every),
            _ => return n,
        };
        n.min((boundary - pos) as usize)
    }

    /// What a state-level method does once the stream reaches `pos` (a call ends there), given
    /// whether state normalization's τ is set yet.
    pub fn at(&self, pos: u64, tau_set: bool) -> Boundary {
        match *self {
            ForgetSpec::Reset { every } if pos.is_multiple_of(every) => Boundary::Reset,
            ForgetSpec::StateNorm { calib, .. } if calib == Some(pos) => Boundary::Calibrate,
            ForgetSpec::StateNorm { every, .. } if tau_set && pos.is_multiple_of(every) => Boundary::Normalize,
            _ => Boundary::Nothing,
        }
    }

    /// With the calibration length resolved (state-norm's default is the training length).
    pub fn resolved(self, train_len: Option<u64>) -> Result<ForgetSpec> {
        match self {
            ForgetSpec::StateNorm { every, calib: None } => match train_len {
                Some(t) => Ok(ForgetSpec::StateNorm { every, calib: Some(t) }),
                None => bail!("--forget state-norm: give calib=N or --train-len (the calibration prefix)"),
            },
            s => Ok(s),
        }
    }
}

/// The per-layer factors of method `name` (`dt` or `decay`) that `stuffed calibrate` wrote to
/// `file` (its `forget` field).
fn calibrated(name: &str, file: &std::path::Path) -> Result<Scales> {
    let spec = crate::eval::calibrate::read_result(file)?;
    if spec.contains("file=") {
        bail!("{}: its \"forget\" names another file; give the factors themselves", file.display());
    }
    // A one-layer model's table prints as one value, which parses as the uniform method.
    match (name, ForgetSpec::parse(&spec).map_err(|e| anyhow!("{}: {e}", file.display()))?) {
        ("dt", ForgetSpec::DtLayers { c }) | ("decay", ForgetSpec::DecayLayers { s: c }) => Ok(c),
        ("dt", ForgetSpec::Dt { c }) | ("decay", ForgetSpec::Decay { s: c }) => Scales::new(&[c]),
        (_, other) => bail!("{}: calibrated {other}, not per-layer {name} factors", file.display()),
    }
}

/// What acts on the state at the end of a call ([`ForgetSpec::at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    Nothing,
    /// Zero the whole state.
    Reset,
    /// τ ← ‖h‖_F per (layer, head).
    Calibrate,
    /// h ← h·min(1, τ/‖h‖_F) per (layer, head).
    Normalize,
}

impl std::fmt::Display for ForgetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForgetSpec::None => write!(f, "none"),
            ForgetSpec::Rri { a, b } => write!(f, "rri:a={a},b={b}"),
            ForgetSpec::RriBoth { a, b } => write!(f, "rri-both:a={a},b={b}"),
            ForgetSpec::Dt { c } => write!(f, "dt:c={c}"),
            ForgetSpec::Decay { s } => write!(f, "decay:s={s}"),
            ForgetSpec::DtLayers { c } => write!(f, "dt:c={c}"),
            ForgetSpec::DecayLayers { s } => write!(f, "decay:s={s}"),
            ForgetSpec::Window { r } => write!(f, "window:r={r}"),
            ForgetSpec::Staggered { r } => write!(f, "staggered:r={r}"),
            ForgetSpec::StateNorm { every, calib } => {
                write!(f, "state-norm:every={every}")?;
                calib.map_or(Ok(()), |c| write!(f, ",calib={c}"))
            }
            ForgetSpec::Reset { every } => write!(f, "reset:every={every}"),
            ForgetSpec::LongMamba { table, min } => {
                let t = table.table();
                write!(f, "longmamba:file={},b={},c={},min={min}", t.file, t.b, t.c)
            }
            ForgetSpec::DeciMamba(d) => {
                let layers = d.layers.as_slice().iter().map(|l| l.to_string()).collect::<Vec<_>>().join("/");
                write!(f, "decimamba:layers={layers},base={},beta={},min={},last={}", d.base, d.beta, d.min, d.last)
            }
        }
    }
}
