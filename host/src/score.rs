//! The LM head fused with log-softmax and NLL, a sub-chunk of rows at a time, so `[T, V]` logits
//! never exist beyond one sub-chunk.
use crate::exec::Pool;
use crate::model::Model;
use crate::session::Session;
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
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

/// Where a command's forward runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA backend (Mamba-2; a binary built with `--features cuda`).
    Cuda,
}

/// GPU options shared by the commands that take `--device`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuOptions {
    /// Bytes the engine's buffers may take (default: the free device memory).
    pub max_mem: Option<usize>,
    /// Run f32-stored matrices in bf16.
    pub bf16: bool,
    /// Run bf16-stored matrices in f32.
    pub f32: bool,
    /// One-token steps through cuBLAS rather than the fused decode kernels.
    pub cublas_decode: bool,
}

/// `40G`, `512M`, `1.5GiB`, or bytes.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok((v * mul as f64) as usize),
        _ => bail!("'{s}' is not a size (e.g. 40G, 512M, 1.5GiB)"),
    }
}

/// What a checkpoint keeps of a scorer, and what [`Scorer::restore`] continues from.
#[derive(Clone, Debug)]
pub struct ScorerState {
    /// Every layer's recurrent state (the model's state layout).
    pub state: Vec<f32>,
    /// The last hidden row, whose prediction the next call scores (none at a document's start).
    pub pending: Option<Vec<f32>>,
    /// State normalization's τ (empty without it).
    pub tau: Vec<f32>,
}

/// The stream loop's engine: the CPU session with the host-side NLL head, or the CUDA backend.
/// Both score every token that has a predicting row and keep the last row pending for the next call.
pub enum Scorer<'m> {
    Cpu {
        session: Box<Session<'m>>,
        head: NllHead<'m>,
        rows: Vec<f32>,
        pending: Option<Vec<f32>>,
    },
    /// The device engine, and the model (the CPU reruns a call whose NLL came back non-finite, to
    /// name the layer).
    #[cfg(gpu)]
    Cuda(Box<crate::cuda::mamba2::GpuMamba2>, &'m Model),
}

impl<'m> Scorer<'m> {
    pub fn new(model: &'m Model, chunk: usize, real: usize, device: Device, gpu: GpuOptions) -> Result<Scorer<'m>> {
        match device {
            Device::Cpu => {
                crate::session::check_chunk(model, chunk)?;
                let session = Box::new(Session::new(model, chunk));
                let d = model.net().d_model();
                Ok(Scorer::Cpu {
                    head: NllHead::new(model, real),
                    rows: vec![0.0; (chunk.max(1) + 1) * d],
                    session,
                    pending: None,
                })
            }
            Device::Cuda => {
                crate::session::check_chunk_len(chunk)?;
                cuda_scorer(model, chunk, real, gpu)
            }
        }
    }

    /// Tokens one call may hold.
    pub fn chunk(&self) -> usize {
        match self {
            Scorer::Cpu { session, .. } => session.chunk,
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => g.chunk,
        }
    }

    /// Feeds `ids` and writes into `nll` the NLL of each token that has a predicting row: all of
    /// them after a pending row (returns true), else all but the first.
    pub fn score(&mut self, ids: &[u32], nll: &mut Vec<f32>) -> Result<bool> {
        nll.clear();
        match self {
            Scorer::Cpu { session, head, rows, pending } => {
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
                *pending = Some(rows[(nrows + t - 1) * d..(nrows + t) * d].to_vec());
                Ok(had)
            }
            #[cfg(gpu)]
            Scorer::Cuda(g, model) => {
                let had = g.has_pending;
                let pos0 = g.position() - had as u64;
                *nll = g.feed_nll(ids)?;
                // Checked per call (the state is checked on the device after every piece).
                if let Some(i) = first_non_finite(nll) {
                    bail!(
                        "{}: non-finite logit or NLL at position {} on the GPU; {}",
                        g.model_path,
                        pos0 + i as u64,
                        cpu_rerun(model, ids, g.real)
                    );
                }
                Ok(had)
            }
        }
    }

    /// Feeds `ids` without scoring; the last row stays pending (for [`Scorer::greedy`]).
    pub fn feed(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self {
            Scorer::Cpu { session, pending, .. } => cpu_feed(session, pending, ids, None),
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => g.feed(ids),
        }
    }

    /// [`Scorer::feed`] that also adds the probe sums of these tokens into `probe` (the layout of
    /// `Recurrent::forward_probed`).
    pub fn feed_probed(&mut self, ids: &[u32], probe: &mut [f32]) -> Result<()> {
        match self {
            Scorer::Cpu { session, pending, .. } => cpu_feed(session, pending, ids, Some(probe)),
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => g.feed_probed(ids, probe),
        }
    }

    /// Greedy decoding of `max_new` tokens from the pending row (as `Session::greedy`).
    pub fn greedy(&mut self, max_new: usize) -> Result<Vec<u32>> {
        match self {
            Scorer::Cpu { session, head, pending, .. } => {
                let last = pending.take().ok_or_else(|| anyhow::anyhow!("greedy decoding needs a prompt first"))?;
                session.greedy(&last, max_new, head.real)
            }
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => g.greedy(max_new),
        }
    }

    /// Back to the zero state at the start of a document.
    pub fn reset(&mut self) -> Result<()> {
        match self {
            Scorer::Cpu { session, pending, .. } => {
                session.reset();
                *pending = None;
                Ok(())
            }
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => g.reset(),
        }
    }

    pub fn state_len(&self) -> usize {
        match self {
            Scorer::Cpu { session, .. } => session.state.len(),
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => g.state_len(),
        }
    }

    /// The state, the pending row and state normalization's τ, for a checkpoint.
    pub fn snapshot(&self) -> Result<ScorerState> {
        match self {
            Scorer::Cpu { session, pending, .. } => {
                Ok(ScorerState { state: session.state.clone(), pending: pending.clone(), tau: session.tau.clone() })
            }
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => {
                let mut s = vec![0f32; g.state_len()];
                g.download_state(&mut s)?;
                Ok(ScorerState { state: s, pending: g.pending_row()?, tau: g.tau()? })
            }
        }
    }

    /// Continues from a checkpoint taken at document position `pos`.
    pub fn restore(&mut self, from: &ScorerState, pos: u64) -> Result<()> {
        match self {
            Scorer::Cpu { session, pending, .. } => {
                session.state.copy_from_slice(&from.state);
                session.tau = from.tau.clone();
                session.pos = pos;
                *pending = from.pending.clone();
                Ok(())
            }
            #[cfg(gpu)]
            Scorer::Cuda(g, _) => {
                g.upload_state(&from.state)?;
                g.set_position(pos, &from.tau)?;
                g.set_pending_row(from.pending.as_deref())
            }
        }
    }
}

/// What the CPU core finds running `ids` from the zero state (each layer checked; then the NLL
/// head): where a NaN that comes from the weights first appears. A non-finite value that needs the
/// stream's state before the call is not reproduced, and the line says so.
#[cfg_attr(not(gpu), allow(dead_code))]
fn cpu_rerun(model: &Model, ids: &[u32], real: usize) -> String {
    let run = || -> Result<()> {
        let mut s = Scorer::new(model, ids.len().clamp(1, 512), real, Device::Cpu, GpuOptions::default())?;
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

/// Feeds `ids` through the CPU session (adding probe sums when asked), keeping the last row pending.
fn cpu_feed(
    session: &mut Session,
    pending: &mut Option<Vec<f32>>,
    ids: &[u32],
    probe: Option<&mut [f32]>,
) -> Result<()> {
    let d = session.net().d_model();
    let mut last = vec![0f32; d];
    let mut sink = |_, h: &[f32]| {
        last.copy_from_slice(&h[h.len() - d..]);
        Ok(())
    };
    match probe {
        Some(p) => session.feed_probed(ids, p, &mut sink)?,
        None => session.feed(ids, &mut sink)?,
    }
    *pending = Some(last);
    Ok(())
}

#[cfg(gpu)]
fn cuda_engine(model: &Model, chunk: usize, real: usize, gpu: GpuOptions) -> Result<crate::cuda::mamba2::GpuMamba2> {
    use crate::cuda::DType;
    let force = if gpu.f32 { Some(DType::F32) } else { gpu.bf16.then_some(DType::Bf16) };
    let mut g = crate::cuda::mamba2::GpuMamba2::new(model, chunk, gpu.max_mem, force, real)?;
    g.set_cublas_decode(gpu.cublas_decode);
    Ok(g)
}

#[cfg(gpu)]
fn cuda_scorer<'m>(model: &'m Model, chunk: usize, real: usize, gpu: GpuOptions) -> Result<Scorer<'m>> {
    Ok(Scorer::Cuda(Box::new(cuda_engine(model, chunk, real, gpu)?), model))
}

/// Logits `(T, vocab_rows)` of every position from the zero state, on the GPU.
#[cfg(gpu)]
pub fn cuda_logits(model: &Model, ids: &[u32], chunk: usize, gpu: GpuOptions) -> Result<Vec<f32>> {
    let mut g = cuda_engine(model, chunk, model.info.vocab_rows, gpu)?;
    let mut all = Vec::with_capacity(ids.len() * model.info.vocab_rows);
    for piece in ids.chunks(g.chunk) {
        g.forward(piece, None)?;
        all.extend(g.logits(1, piece.len())?);
    }
    Ok(all)
}

/// Greedy continuation of `ids` on the GPU.
#[cfg(gpu)]
pub fn cuda_greedy(model: &Model, ids: &[u32], max_new: usize, real: usize, gpu: GpuOptions) -> Result<Vec<u32>> {
    let mut g = cuda_engine(model, 4096, real, gpu)?;
    g.feed(ids)?;
    g.greedy(max_new)
}

#[cfg(not(gpu))]
const NO_CUDA: &str =
    "--device cuda: this binary was built without CUDA (build with `cargo build --release --features cuda`)";

#[cfg(not(gpu))]
fn cuda_scorer<'m>(_: &'m Model, _: usize, _: usize, _: GpuOptions) -> Result<Scorer<'m>> {
    bail!(NO_CUDA)
}

#[cfg(not(gpu))]
pub fn cuda_logits(_: &Model, _: &[u32], _: usize, _: GpuOptions) -> Result<Vec<f32>> {
    bail!(NO_CUDA)
}

#[cfg(not(gpu))]
pub fn cuda_greedy(_: &Model, _: &[u32], _: usize, _: usize, _: GpuOptions) -> Result<Vec<u32>> {
    bail!(NO_CUDA)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_bytes("40G").unwrap(), 40 << 30);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("-1G").is_err() && parse_bytes("G").is_err());
    }
}
