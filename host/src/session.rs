//! A model plus its state and buffers, sized once: the loop every command drives.
use crate::exec::Pool;
use crate::forget::{Boundary, DeciMamba, DeciProgress, DeciResume, ForgetSpec, Phase};
use crate::model::Model;
use crate::state_dtype::{StatePrecision, StateRound};
use anyhow::{anyhow, bail, Result};
use std::ops::Range;
use stuffed_core::error::first_non_finite;
use stuffed_core::forget::{Decimated, Decimation, Measure};
use stuffed_core::model::Scan;
use stuffed_core::{Recurrent, Site};

pub struct Session<'m> {
    pub model: &'m Model,
    pub ex: Pool,
    /// Tokens per forward call; 1 runs the token-by-token recurrence.
    pub chunk: usize,
    /// The recurrent state (layout: the family's, see core).
    pub state: Vec<f32>,
    /// Tokens consumed since the last reset.
    pub pos: u64,
    scratch: Vec<f32>,
    hidden: Vec<f32>,
    /// The forgetting method (the model already holds its in-recurrence part).
    pub forget: ForgetSpec,
    /// State normalization's τ per (layer, head), once calibrated.
    pub tau: Vec<f32>,
    /// How the state is stored between calls (the model's `--state-dtype`).
    pub precision: StatePrecision,
    /// The state ranges `precision` rounds (none for f32).
    round_ranges: Vec<Range<usize>>,
    /// Which tokens the next calls feed (a prompt's, of unknown length, unless told).
    pub phase: Phase,
}

/// Fails for a `--chunk` longer than any stream (on every device: the GPU plans its own chunk, but
/// a call still queues that many ids).
pub fn check_chunk_len(chunk: usize) -> Result<()> {
    if chunk as u64 > crate::text::MAX_TOKENS {
        bail!("--chunk {chunk}: more tokens a call than any stream has (at most 2^32)");
    }
    Ok(())
}

/// Fails when the CPU buffers for calls of `chunk` tokens would not fit in this machine's memory
/// (before anything allocates them).
pub fn check_chunk(model: &Model, chunk: usize) -> Result<()> {
    check_chunk_len(chunk)?;
    let net = model.net();
    let floats = net.scratch_len(chunk) as u64 + 2 * (chunk as u64 + 1) * net.d_model() as u64;
    if let Some(total) = crate::report::mem_total_bytes().filter(|&t| floats * 4 > t) {
        bail!(
            "--chunk {chunk}: the buffers for {chunk} tokens a call take {:.1} GiB, more than this machine's memory ({:.1} GiB)",
            (floats * 4) as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

impl<'m> Session<'m> {
    /// A session with the model's forgetting method (`Model::set_forget`); a window of r caps the
    /// chunk at r.
    pub fn new(model: &'m Model, chunk: usize) -> Session<'m> {
        let net = model.net();
        let forget = model.forget;
        let chunk = match forget {
            ForgetSpec::Window { r } => chunk.clamp(1, r),
            _ => chunk.max(1),
        };
        let mut state = vec![0.0; net.state_len()];
        net.initial_state(&mut state);
        Session {
            model,
            ex: Pool::new(),
            chunk,
            state,
            pos: 0,
            scratch: vec![0.0; net.scratch_len(chunk)],
            hidden: vec![0.0; chunk * net.d_model()],
            forget,
            tau: Vec::new(),
            precision: model.state_precision,
            round_ranges: match model.state_precision.is_f32() {
                true => Vec::new(),
                false => crate::state_dtype::ranges(net, model.state_precision.all),
            },
            phase: Phase::default(),
        }
    }

    /// The core model for the tokens of the current phase ([`Model::net_in`]).
    pub fn net(&self) -> &'m dyn Recurrent {
        self.model.net_in(self.phase)
    }

    /// Back to the start of a stream: the model's initial state (zeros, or a state-tuned RWKV's).
    pub fn reset(&mut self) {
        self.model.net().initial_state(&mut self.state);
        self.pos = 0;
        self.tau.clear();
    }

    /// Runs `tokens` chunk by chunk from the current state, handing each piece's final-normed hidden
    /// rows `(t, d_model)` to `sink(offset in tokens, rows)`. Pieces also end where a state-level
    /// forgetting method acts. A non-finite value in any layer's output or state is an error naming
    /// the layer and the position (the core checks each layer).
    pub fn feed(&mut self, tokens: &[u32], sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        self.feed_impl(tokens, None, sink)
    }

    /// [`Session::feed`] through the chunked path, adding the probe series (see
    /// `Recurrent::forward_probed`) of these tokens into `probe`.
    pub fn feed_probed(
        &mut self,
        tokens: &[u32],
        probe: &mut [f32],
        sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.feed_impl(tokens, Some(probe), sink)
    }

    /// DeciMamba's prompt but its `last` tokens, from the zero state (the prompt runs alone): for
    /// each decimating layer in turn a measuring pass (the layers before it cut) takes the norms
    /// ‖Δ_t‖₂ of the rows reaching it, whose K largest go on past it ([`DeciMamba::keep`],
    /// [`DeciMamba::threshold`]); then the decimated pass. Returns the positions in `prefix` of the
    /// tokens that left each decimating layer. Their top-K is over the whole prompt, hence the
    /// passes; the norms take 4 bytes a token. `from` continues a checkpoint (its progress, norms
    /// and state); `save` is handed the progress, the norms and the state after every call.
    pub fn decimate(
        &mut self,
        prefix: &[u32],
        d: &DeciMamba,
        from: Option<DeciResume>,
        save: &mut crate::forget::DeciSave<'_>,
    ) -> Result<Vec<Vec<u32>>> {
        let path = self.model.info.path.display().to_string();
        if !self.precision.is_f32() {
            bail!("{path}: --forget {}: runs with an f32 state", self.forget);
        }
        let layers = d.layers.as_slice();
        let (mut p, mut norms) = match from {
            Some(r) => {
                r.check(layers.len(), prefix.len(), self.state.len()).map_err(|e| anyhow!("{path}: {e}"))?;
                self.state.copy_from_slice(&r.state);
                (r.progress, r.norms)
            }
            None => {
                self.model.net().initial_state(&mut self.state);
                (DeciProgress::default(), Vec::new())
            }
        };
        self.pos = p.fed as u64;
        loop {
            let mut cut = d.layers.cut(&p.cuts)?;
            for (i, &t) in p.ties_left.iter().enumerate() {
                cut = cut.with_ties(i, t);
            }
            let measured = layers.get(p.pass).copied();
            p.counts.resize(cut.layers().len(), 0);
            for part in prefix[p.fed..].chunks(self.chunk) {
                let done = self.feed_cut(part, &mut cut, measured.is_some().then_some(&mut norms), measured)?;
                p.fed += part.len();
                p.ties_left = (0..p.cuts.len()).map(|i| cut.ties(i)).collect();
                p.counts.iter_mut().zip(done.kept).for_each(|(k, d)| *k += d);
                save(&p, &norms, &self.state)?;
            }
            // The rows that reached this pass's layer, by position.
            let reach: Vec<u32> = p.kept.last().cloned().unwrap_or_else(|| (0..prefix.len() as u32).collect());
            let Some(layer) = measured else {
                if p.counts.iter().zip(&p.kept).any(|(&c, k)| c != k.len()) {
                    bail!("{path}: decimamba: the decimated pass kept {:?} rows where its thresholds keep {:?} (an internal error)", p.counts, p.kept.iter().map(Vec::len).collect::<Vec<_>>());
                }
                return Ok(p.kept);
            };
            if norms.len() != reach.len() {
                bail!(
                    "{path}: decimamba: layer {layer} measured {} rows, {} reach it (an internal error)",
                    norms.len(),
                    reach.len()
                );
            }
            let th = DeciMamba::threshold(&norms, d.keep(p.pass, norms.len()));
            p.kept.push(th.kept(&norms).map(|i| reach[i]).collect());
            p.cuts.push(th);
            p.ties_left = p.cuts.iter().map(|t| t.ties).collect();
            (p.pass, p.fed, p.counts) = (p.pass + 1, 0, Vec::new());
            norms.clear();
            self.model.net().initial_state(&mut self.state);
            self.pos = 0;
        }
    }

    /// One call of `tokens` through the core's decimated forward (measuring `layer`'s norms onto
    /// `norms` when given).
    fn feed_cut(
        &mut self,
        tokens: &[u32],
        cut: &mut Decimation,
        norms: Option<&mut Vec<f32>>,
        layer: Option<usize>,
    ) -> Result<Decimated> {
        let (net, n) = (self.net(), tokens.len());
        let (state, scratch, ex) = (&mut self.state, &mut self.scratch, &self.ex);
        let hidden = &mut self.hidden[..n * net.d_model()];
        // The norms are written in place after those of the calls before, then cut to the rows measured.
        let (mut norms, at) = match norms {
            Some(v) => {
                let at = v.len();
                v.resize(at + n, 0.0);
                (Some(v), at)
            }
            None => (None, 0),
        };
        let m = layer.zip(norms.as_deref_mut()).map(|(layer, v)| Measure { layer, norms: &mut v[at..] });
        let done = ex
            .run(|| net.forward_decimated(ex, tokens, state, scratch, hidden, cut, m))
            .map_err(|e| explain(self.model, e, self.pos, n))?;
        if let Some(v) = norms {
            v.truncate(at + done.measured);
            if let Some(i) = v[at..].iter().position(|x| !x.is_finite()) {
                bail!(
                    "{}: --forget {}: a non-finite Δ norm in layer {} (row {i} of the call at position {}): the model overflowed",
                    self.model.info.path.display(),
                    self.forget,
                    layer.unwrap_or(0),
                    self.pos
                );
            }
        }
        self.pos += n as u64;
        Ok(done)
    }

    fn feed_impl(
        &mut self,
        tokens: &[u32],
        mut probe: Option<&mut [f32]>,
        sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        // DeciMamba drops tokens by their rank in the whole prompt: a stream cannot be cut so.
        if matches!(self.forget, ForgetSpec::DeciMamba(_)) && self.phase == (Phase::Prompt { len: None }) {
            bail!(
                "{}: --forget {}: DeciMamba ranks the tokens of a whole prompt (passkey); a stream of unknown length cannot be decimated",
                self.model.info.path.display(),
                self.forget
            );
        }
        let net = self.net();
        let d = net.d_model();
        let rounded = !self.precision.is_f32();
        // A state stored rounded after every token runs the token-by-token recurrence whatever the
        // chunk (so `--chunk 64` equals `--chunk 1` bit for bit), rounding after each token.
        let per_token = rounded && self.precision.round == StateRound::Token;
        let mut off = 0;
        while off < tokens.len() {
            let n = self.forget.piece_len(self.pos, self.chunk, tokens.len() - off);
            let part = &tokens[off..off + n];
            let hidden = &mut self.hidden[..n * d];
            if per_token {
                for (i, (&tok, row)) in part.iter().zip(hidden.chunks_exact_mut(d)).enumerate() {
                    let (state, scratch, ex) = (&mut self.state, &mut self.scratch, &self.ex);
                    let probe = probe.as_deref_mut();
                    let ran = ex.run(|| match probe {
                        Some(p) => net.run(ex, &[tok], state, scratch, row, Some(p), Scan::Recurrent),
                        None => net.step(ex, tok, state, scratch, row),
                    });
                    let at = self.pos + i as u64;
                    ran.map_err(|e| explain(self.model, e, at, 1))?;
                    round_state(self.model, &mut self.state, &self.round_ranges, self.precision, at)?;
                }
            } else {
                let (state, scratch, ex, chunk) = (&mut self.state, &mut self.scratch, &self.ex, self.chunk);
                let probe = probe.as_deref_mut();
                let ran = ex.run(|| match probe {
                    Some(p) => net.forward_probed(ex, part, state, scratch, hidden, p),
                    None if chunk == 1 => net.step(ex, part[0], state, scratch, hidden),
                    None => net.forward(ex, part, state, scratch, hidden),
                });
                ran.map_err(|e| explain(self.model, e, self.pos, n))?;
                if rounded {
                    let at = self.pos + n as u64 - 1;
                    round_state(self.model, &mut self.state, &self.round_ranges, self.precision, at)?;
                }
            }
            self.pos += n as u64;
            sink(off, hidden)?;
            off += n;
            // A normalized state is stored (rounded) again.
            if self.at_boundary() && rounded {
                round_state(self.model, &mut self.state, &self.round_ranges, self.precision, self.pos - 1)?;
            }
        }
        Ok(())
    }

    /// Applies reset, calibration or normalization when `pos` sits on their boundary; whether the
    /// state was rescaled (normalization).
    fn at_boundary(&mut self) -> bool {
        let net = self.model.net();
        let heads = (0..net.n_layer()).flat_map(|l| (0..net.n_heads()).map(move |h| (l, h)));
        match self.forget.at(self.pos, !self.tau.is_empty()) {
            Boundary::Reset => net.initial_state(&mut self.state),
            Boundary::Calibrate => self.tau = heads.map(|(l, h)| fro(&self.state[net.head_state(l, h)])).collect(),
            Boundary::Normalize => {
                for ((l, h), &tau) in heads.zip(&self.tau) {
                    let r = net.head_state(l, h);
                    let norm = fro(&self.state[r.clone()]);
                    if norm > tau {
                        let k = tau / norm;
                        self.state[r].iter_mut().for_each(|v| *v *= k);
                    }
                }
                return true;
            }
            Boundary::Nothing => {}
        }
        false
    }

    /// `out (t, vocab_rows)` logits of the last `t` positions fed (their hidden rows); a non-finite
    /// logit is an error.
    pub fn logits(&self, hidden: &[f32], t: usize, out: &mut [f32]) -> Result<()> {
        let (net, ex) = (self.model.net(), &self.ex);
        ex.run(|| net.logits(ex, hidden, t, out))?;
        check_logits(self.model, out, self.pos.saturating_sub(t as u64))
    }
}

impl Session<'_> {
    /// The one greedy loop: each token, as it is chosen, goes to `each`, which returns whether to go
    /// on (a token it refuses is not fed). The state advances through every accepted token but the
    /// last of `max_new`.
    pub fn greedy_each(
        &mut self,
        last: &[f32],
        max_new: usize,
        real: usize,
        each: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<()> {
        let v = self.model.net().vocab_rows();
        let mut logits = vec![0f32; v];
        let mut row = last.to_vec();
        // Each token through the recurrence (`Recurrent::step`), as a decode runs, and as decoded
        // tokens (LongMamba leaves them unfiltered).
        let chunk = std::mem::replace(&mut self.chunk, 1);
        let phase = std::mem::replace(&mut self.phase, Phase::Answer);
        let mut decode = || -> Result<()> {
            for i in 0..max_new {
                self.logits(&row, 1, &mut logits)?;
                let next = argmax(&logits, real);
                if !each(next)? {
                    break;
                }
                if i + 1 < max_new {
                    self.feed(&[next], &mut |_, h| {
                        row.copy_from_slice(h);
                        Ok(())
                    })?;
                }
            }
            Ok(())
        };
        let done = decode();
        self.chunk = chunk;
        self.phase = phase;
        done
    }
}

/// Rounds the `ranges` of `state` to `p`'s dtype (the state after stream position `pos`); a value
/// past the dtype's range is an error naming the position and the layer.
fn round_state(model: &Model, state: &mut [f32], ranges: &[Range<usize>], p: StatePrecision, pos: u64) -> Result<()> {
    for r in ranges {
        if let Some(i) = crate::state_dtype::round_slice(p.dtype, &mut state[r.clone()]) {
            let i = r.start + i;
            let net = model.net();
            let layer = crate::state_dtype::layer_of(net, i).map_or("a window cache".into(), |l| format!("layer {l}"));
            bail!(
                "{}: --state-dtype {}: the state overflows {} after position {pos} in {layer} (value {:e} at state index {i}); \
                 {} holds magnitudes up to {}",
                model.info.path.display(),
                p.dtype,
                p.dtype,
                state[i],
                p.dtype,
                if p.dtype == crate::state_dtype::StateDtype::F16 { "65504" } else { "3.39e38" }
            );
        }
    }
    Ok(())
}

/// Frobenius norm, accumulated in f64.
pub fn fro(v: &[f32]) -> f32 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32
}

/// Index of the largest of the first `n` values (ties: the first), for greedy decoding.
pub fn argmax(v: &[f32], n: usize) -> u32 {
    let mut best = 0;
    for (i, x) in v[..n.min(v.len())].iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The core's non-finite error as one line naming the model and the stream position (the call of
/// `n` tokens started at `pos`); other errors pass through.
fn explain(model: &Model, e: stuffed_core::Error, pos: u64, n: usize) -> anyhow::Error {
    let m = model.info.path.display();
    match e {
        stuffed_core::Error::NonFinite { site: site @ Site::State(_), .. } => anyhow!(
            "{m}: non-finite value in {site} after position {}; the model's weights or its input overflowed",
            pos + n as u64 - 1
        ),
        stuffed_core::Error::NonFinite { site, index } => anyhow!(
            "{m}: non-finite value in {site} at position {}; the model's weights or its input overflowed",
            pos + index as u64
        ),
        e => e.into(),
    }
}

/// Fails at the first NaN or infinity among `logits` `(t, vocab_rows)`, the rows of positions
/// `pos0..`, naming the model and the position.
pub fn check_logits(model: &Model, logits: &[f32], pos0: u64) -> Result<()> {
    match first_non_finite(logits) {
        Some(i) => {
            let v = model.net().vocab_rows();
            bail!(
                "{}: non-finite logit at position {} (id {}); the LM head's weights or the final hidden row overflowed",
                model.info.path.display(),
                pos0 + (i / v) as u64,
                i % v
            )
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use stuffed_core::error::first_non_finite;

    #[test]
    fn first_non_finite_finds_nan_and_infinities_only() {
        let mut v = vec![0.0f32, -0.0, f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0, 1.0];
        assert_eq!(first_non_finite(&v), None);
        assert_eq!(first_non_finite(&[]), None);
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            v[3] = bad;
            v[5] = bad;
            assert_eq!(first_non_finite(&v), Some(3), "{bad}");
            v[3] = 1.0;
            v[5] = 1.0;
        }
    }
}
