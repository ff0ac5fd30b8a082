//! The CPU backend: a [`Session`] (the core's chunked forward, forgetting boundaries) and the LM
//! head fused with log-softmax and NLL, a sub-chunk of rows at a time, so `[T, V]` logits never
//! exist beyond one sub-chunk.
use super::{Backend, ScorerState};
use crate::exec::Pool;
use crate::model::Model;
use crate::session::Session;
use anyhow::{bail, Result};
use rayon::prelude::*;
use stuffed_core::error::first_non_finite;
use stuffed_core::exec::Exec;
use stuffed_core::ops::log_sum_exp;
use stuffed_core::Recurrent;

/// Rows of logits alive at once.
pub const SUB: usize = 64;

pub struct NllHead<'m> {
    net: &'m dyn Recurrent,
    /// The model's path, for errors.
    model: String,
    ex: Pool,
    /// Ids that may enter the softmax (the tokenizer's vocab); rows past it are padding.
    pub real: usize,
    logits: Vec<f32>,
}

impl<'m> NllHead<'m> {
    pub fn new(model: &'m Model, real: usize) -> Self {
        let net = model.net();
        let model = model.info.path.display().to_string();
        NllHead { net, model, ex: Pool::new(), real, logits: vec![0.0; SUB * net.vocab_rows()] }
    }

    /// `out[i] = logsumexp(head·hidden_i over the real vocab) − logit(targets[i])`; row i is the
    /// hidden row of stream position `pos0 + i`. A non-finite logit or NLL is an error naming it.
    pub fn nll(&mut self, hidden: &[f32], targets: &[u32], out: &mut [f32], pos0: u64) -> Result<()> {
        let (d, v, real) = (self.net.d_model(), self.net.vocab_rows(), self.real);
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= real) {
            bail!("target token {bad} is outside the real vocab ({real} ids)");
        }
        let sub_rows = hidden.chunks(SUB * d).zip(targets.chunks(SUB)).zip(out.chunks_mut(SUB));
        for (k, ((h, tg), o)) in sub_rows.enumerate() {
            let rows = tg.len();
            let logits = &mut self.logits[..rows * v];
            self.net.logits(&self.ex, &h[..rows * d], rows, logits)?;
            let simd = self.ex.simd();
            logits.par_chunks(v).zip(tg.par_iter()).zip(o.par_iter_mut()).for_each(|((row, &t), o)| {
                *o = log_sum_exp(simd, &row[..real]) - row[t as usize];
            });
            // A NaN or infinity among a row's real logits makes its NLL non-finite: checking the
            // NLLs costs `rows` compares, not `rows · vocab`.
            if let Some(i) = first_non_finite(o) {
                let pos = pos0 + (k * SUB + i) as u64;
                let row = &logits[i * v..i * v + real];
                match first_non_finite(row) {
                    Some(id) => bail!(
                        "{}: non-finite logit at position {pos} (id {id}); the LM head's weights or the final hidden row overflowed",
                        self.model
                    ),
                    None => bail!(
                        "{}: non-finite NLL at position {pos} (target id {}): the log-softmax overflowed",
                        self.model,
                        tg[i]
                    ),
                }
            }
        }
        Ok(())
    }
}

/// KL(p ‖ q) of the next-token distributions two streams give at the same positions (the LM head
/// over the real vocab, a sub-chunk of rows at a time), accumulated in f64.
pub struct KlHead<'m> {
    net: &'m dyn Recurrent,
    ex: Pool,
    real: usize,
    logits: Vec<f32>,
}

impl<'m> KlHead<'m> {
    pub fn new(model: &'m Model, real: usize) -> Self {
        let net = model.net();
        KlHead { net, ex: Pool::new(), real, logits: vec![0.0; 2 * SUB * net.vocab_rows()] }
    }

    /// `out[i] = Σ_v p_i(v) (log p_i(v) − log q_i(v))`, p from the hidden rows `p_rows`, q from
    /// `q_rows` (both `(n, d_model)`).
    pub fn kl(&mut self, p_rows: &[f32], q_rows: &[f32], out: &mut Vec<f64>) -> Result<()> {
        let (d, v, real) = (self.net.d_model(), self.net.vocab_rows(), self.real);
        if p_rows.len() != q_rows.len() {
            bail!("the two streams scored {} and {} rows", p_rows.len() / d, q_rows.len() / d);
        }
        out.clear();
        out.resize(p_rows.len() / d, 0.0);
        for ((p, q), o) in p_rows.chunks(SUB * d).zip(q_rows.chunks(SUB * d)).zip(out.chunks_mut(SUB)) {
            let rows = p.len() / d;
            let (lp, lq) = self.logits.split_at_mut(SUB * v);
            self.net.logits(&self.ex, p, rows, &mut lp[..rows * v])?;
            self.net.logits(&self.ex, q, rows, &mut lq[..rows * v])?;
            lp[..rows * v].par_chunks(v).zip(lq[..rows * v].par_chunks(v)).zip(o.par_iter_mut()).for_each(
                |((a, b), o)| {
                    let (a, b) = (&a[..real], &b[..real]);
                    let (za, zb) = (lse64(a), lse64(b));
                    *o = a
                        .iter()
                        .zip(b)
                        .map(|(&x, &y)| {
                            let lx = x as f64 - za;
                            lx.exp() * (lx - (y as f64 - zb))
                        })
                        .sum();
                },
            );
        }
        Ok(())
    }
}

/// log Σ exp(x) in f64 (a KL of two close distributions is far below f32's resolution of it).
fn lse64(x: &[f32]) -> f64 {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// The CPU backend: the session, the NLL head, the rows of the current call and the pending row.
pub struct CpuBackend<'m> {
    session: Box<Session<'m>>,
    head: NllHead<'m>,
    rows: Vec<f32>,
    pending: Option<Vec<f32>>,
    /// Rows the last `score` scored (the first of `rows`).
    scored: usize,
}

impl<'m> CpuBackend<'m> {
    pub fn new(model: &'m Model, chunk: usize, real: usize) -> Result<Self> {
        crate::session::check_chunk(model, chunk)?;
        let session = Box::new(Session::new(model, chunk));
        let d = model.net().d_model();
        Ok(CpuBackend {
            head: NllHead::new(model, real),
            rows: vec![0.0; (chunk.max(1) + 1) * d],
            session,
            pending: None,
            scored: 0,
        })
    }

    /// Feeds `ids` through the session (adding probe sums when asked), keeping the last row pending.
    fn feed_with(&mut self, ids: &[u32], probe: Option<&mut [f32]>) -> Result<()> {
        let d = self.session.net().d_model();
        let mut last = vec![0f32; d];
        let mut sink = |_, h: &[f32]| {
            last.copy_from_slice(&h[h.len() - d..]);
            Ok(())
        };
        match probe {
            Some(p) => self.session.feed_probed(ids, p, &mut sink)?,
            None => self.session.feed(ids, &mut sink)?,
        }
        self.pending = Some(last);
        Ok(())
    }
}

impl Backend for CpuBackend<'_> {
    fn chunk(&self) -> usize {
        self.session.chunk
    }

    fn score(&mut self, ids: &[u32], nll: &mut Vec<f32>) -> Result<bool> {
        nll.clear();
        let CpuBackend { session, head, rows, pending, scored } = self;
        let d = session.net().d_model();
        let t = ids.len();
        let mut targets = Vec::with_capacity(t + 1);
        if rows.len() < (t + 1) * d {
            rows.resize((t + 1) * d, 0.0);
        }
        let had = pending.is_some();
        // Row 0 is the pending row (the position before this call's first token) if any.
        let pos0 = session.pos - had as u64;
        if let Some(p) = pending.take() {
            rows[..d].copy_from_slice(&p);
            targets.push(ids[0]);
        }
        let nrows = targets.len();
        session.feed(ids, &mut |off, h| {
            rows[(nrows + off) * d..(nrows + off) * d + h.len()].copy_from_slice(h);
            Ok(())
        })?;
        targets.extend_from_slice(&ids[1..]);
        nll.resize(targets.len(), 0.0);
        head.nll(&rows[..targets.len() * d], &targets, nll, pos0)?;
        *scored = targets.len();
        *pending = Some(rows[(nrows + t - 1) * d..(nrows + t) * d].to_vec());
        Ok(had)
    }

    fn scored_rows(&self) -> Option<&[f32]> {
        Some(&self.rows[..self.scored * self.session.net().d_model()])
    }

    fn feed(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.feed_with(ids, None)
    }

    fn feed_probed(&mut self, ids: &[u32], probe: &mut [f32]) -> Result<()> {
        self.feed_with(ids, Some(probe))
    }

    fn logits(&mut self, ids: &[u32], sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        let (session, d) = (&mut self.session, self.head.net.d_model());
        let v = self.head.net.vocab_rows();
        let mut out = vec![0f32; session.chunk * v];
        let mut last = vec![0f32; d];
        let (net, ex) = (self.head.net, &self.head.ex);
        let model = session.model;
        session.feed(ids, &mut |start, h| {
            let t = h.len() / d;
            net.logits(ex, h, t, &mut out[..t * v])?;
            crate::session::check_logits(model, &out[..t * v], start as u64)?;
            last.copy_from_slice(&h[h.len() - d..]);
            sink(start, &out[..t * v])
        })?;
        self.pending = Some(last);
        Ok(())
    }

    fn greedy_each(&mut self, max_new: usize, each: &mut dyn FnMut(u32) -> Result<bool>) -> Result<()> {
        let last = self.pending.take().ok_or_else(|| anyhow::anyhow!("greedy decoding needs a prompt first"))?;
        self.session.greedy_each(&last, max_new, self.head.real, each)
    }

    fn reset(&mut self) -> Result<()> {
        self.session.reset();
        self.pending = None;
        Ok(())
    }

    fn state_len(&self) -> usize {
        self.session.state.len()
    }

    fn snapshot(&self) -> Result<ScorerState> {
        let s = &self.session;
        Ok(ScorerState { state: s.state.clone(), pending: self.pending.clone(), tau: s.tau.clone() })
    }

    fn restore(&mut self, from: &ScorerState, pos: u64) -> Result<()> {
        self.session.state.copy_from_slice(&from.state);
        self.session.tau = from.tau.clone();
        self.session.pos = pos;
        self.pending = from.pending.clone();
        Ok(())
    }

    fn device_name(&self) -> String {
        let mode = crate::exec::matmul_mode();
        let simd = crate::exec::default_simd(mode);
        format!("CPU, {} threads, {} kernel, {} matmul", rayon::current_num_threads(), simd.name(), mode.name())
    }

    fn mem_used(&self) -> Result<usize> {
        Ok(crate::report::peak_rss_bytes() as usize)
    }
}

/// What the CPU core finds running `ids` from the zero state (each layer checked; then the NLL
/// head): where a NaN that comes from the weights first appears. A non-finite value that needs the
/// stream's state before the call is not reproduced, and the line says so.
#[cfg_attr(not(gpu), allow(dead_code))]
pub(super) fn cpu_rerun(model: &Model, ids: &[u32], real: usize) -> String {
    let run = || -> Result<()> {
        let mut s = CpuBackend::new(model, ids.len().clamp(1, 512), real)?;
        s.score(ids, &mut Vec::new()).map(|_| ())
    };
    match run() {
        Err(e) => format!("the CPU rerun of this call's {} tokens from the zero state: {e:#}", ids.len()),
        Ok(()) => format!(
            "the CPU rerun of this call's {} tokens from the zero state stays finite (it needs the stream's state)",
            ids.len()
        ),
    }
}
