//! The one seam between CPU and CUDA: a [`Backend`] runs a model's tokens from its state into what
//! the evaluators consume (NLLs with the LM head fused, probe sums, logits, greedy tokens), and keeps
//! the last hidden row pending so a stream can be cut anywhere. Evaluators hold a [`Scorer`] and
//! never know which backend runs it.
mod cpu;
#[cfg(gpu)]
mod cuda;

pub use cpu::{NllHead, PairHead};

use crate::forget::Phase;
use crate::model::Model;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The rows one call scored, in order: hidden rows `(n, d_model)`, the token each predicts, and
/// the stream position of row 0.
#[derive(Clone, Copy)]
pub struct ScoredRows<'a> {
    pub rows: &'a [f32],
    pub targets: &'a [u32],
    pub pos0: u64,
}

/// A backend, as the evaluators hold it.
pub type Scorer<'m> = Box<dyn Backend + 'm>;

/// Runs tokens through a model from the backend's state. Every call continues the stream; a
/// state-level forgetting method acts where its boundaries fall (`ForgetSpec::piece_len` / `at`).
pub trait Backend {
    /// Tokens one call may hold.
    fn chunk(&self) -> usize;

    /// Feeds `ids` and writes into `nll` the NLL of each token that has a predicting row: all of
    /// them after a pending row (returns true), else all but the first.
    fn score(&mut self, ids: &[u32], nll: &mut Vec<f32>) -> Result<bool>;

    /// [`Backend::score`] without the head: feeds `ids` and keeps the rows it would score, with
    /// their targets, for [`Backend::scored_rows`] (`--vs-state` scores two streams in one head).
    fn feed_rows(&mut self, _ids: &[u32]) -> Result<bool> {
        bail!("this backend keeps no hidden rows on the host (CPU only)")
    }

    /// The rows the last [`Backend::score`] or [`Backend::feed_rows`] scored, where the backend
    /// keeps them on the host (the CPU).
    fn scored_rows(&self) -> Option<ScoredRows<'_>> {
        None
    }

    /// Feeds `ids` without scoring; the last row stays pending (for [`Backend::greedy_each`]).
    fn feed(&mut self, ids: &[u32]) -> Result<()>;

    /// A prompt under DeciMamba (`--forget decimamba`): all but its `last` tokens through
    /// [`crate::session::Session::decimate`], those fed as any prompt's (never dropped: their
    /// `generate` keeps the last), the last row pending; the positions of the prompt's tokens that
    /// left each decimating layer, the kept last ones among them.
    /// `from` continues a checkpoint of this prompt; `save` is handed the progress, the norms
    /// and the state after every call (to keep when a checkpoint is due).
    fn feed_decimated(
        &mut self,
        _ids: &[u32],
        _from: Option<crate::forget::DeciResume>,
        _save: &mut crate::forget::DeciSave<'_>,
    ) -> Result<Vec<Vec<u32>>> {
        bail!("--forget decimamba runs on the CPU")
    }

    /// [`Backend::feed`] that also adds the probe sums of these tokens into `probe` (the layout of
    /// `Recurrent::forward_probed`).
    fn feed_probed(&mut self, ids: &[u32], probe: &mut [f32]) -> Result<()>;

    /// Feeds `ids`, handing each call's logits `(t, vocab_rows)` to `sink(offset in ids, logits)`.
    fn logits(&mut self, ids: &[u32], sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()>;

    /// Greedy decoding of up to `max_new` tokens from the pending row: each token, as it is chosen,
    /// goes to `each`, which returns whether to go on. The state advances through the accepted
    /// tokens but the last.
    fn greedy_each(&mut self, max_new: usize, each: &mut dyn FnMut(u32) -> Result<bool>) -> Result<()>;

    /// Which tokens the next calls feed: LongMamba filters a long prompt's and not a short one's,
    /// nor those decoded or scored as the answer after it (greedy decoding is always the answer's).
    fn set_phase(&mut self, phase: Phase);

    /// The phase the next calls feed in.
    fn phase(&self) -> Phase;

    /// Back to the state a stream starts from (zeros, or a state-tuned RWKV's) at the start of a document.
    fn reset(&mut self) -> Result<()>;

    /// Floats of the recurrent state.
    fn state_len(&self) -> usize;

    /// The state, the pending row and state normalization's τ, for a checkpoint.
    fn snapshot(&self) -> Result<ScorerState>;

    /// Continues from a checkpoint taken at document position `pos`.
    fn restore(&mut self, from: &ScorerState, pos: u64) -> Result<()>;

    /// Where it runs, in words (`bench`).
    fn device_name(&self) -> String;

    /// Bytes in use: on the device (CUDA: total − free, the whole process), or the peak RSS (CPU).
    fn mem_used(&self) -> Result<usize>;

    /// How one-token steps run, when a backend has more than one way (`bench`); empty otherwise.
    fn decode_path(&self) -> &'static str {
        ""
    }

    /// Switches to the other way of running one-token steps; false when there is none.
    fn switch_decode_path(&mut self) -> bool {
        false
    }

    /// Time per kernel since the last call, `(name, calls, seconds)` (the GPU with `STUFFED_PROFILE=1`).
    fn take_profile(&self) -> Vec<(&'static str, u64, f64)> {
        Vec::new()
    }
}

impl dyn Backend + '_ {
    /// [`Backend::greedy_each`], every token kept.
    pub fn greedy(&mut self, max_new: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(max_new);
        self.greedy_each(max_new, &mut |t| {
            out.push(t);
            Ok(true)
        })?;
        Ok(out)
    }
}

/// The backend `device` names for `model`, with calls of up to `chunk` tokens and `real` ids that
/// may enter a softmax or win a decode.
pub fn open<'m>(model: &'m Model, chunk: usize, real: usize, device: Device, gpu: GpuOptions) -> Result<Scorer<'m>> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuBackend::new(model, chunk, real)?)),
        Device::Cuda => {
            model.state_precision.check_cpu(device)?;
            crate::session::check_chunk_len(chunk)?;
            open_cuda(model, chunk, real, gpu)
        }
    }
}

#[cfg(gpu)]
fn open_cuda<'m>(model: &'m Model, chunk: usize, real: usize, gpu: GpuOptions) -> Result<Scorer<'m>> {
    Ok(Box::new(cuda::CudaBackend::new(model, chunk, real, gpu)?))
}

#[cfg(not(gpu))]
fn open_cuda<'m>(_: &'m Model, _: usize, _: usize, _: GpuOptions) -> Result<Scorer<'m>> {
    bail!("--device cuda: this binary was built without CUDA (build with `cargo build --release --features cuda`)")
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

/// What a checkpoint keeps of a scorer, and what [`Backend::restore`] continues from.
#[derive(Clone, Debug)]
pub struct ScorerState {
    /// Every layer's recurrent state (the model's state layout).
    pub state: Vec<f32>,
    /// The last hidden row, whose prediction the next call scores (none at a document's start).
    pub pending: Option<Vec<f32>>,
    /// State normalization's τ (empty without it).
    pub tau: Vec<f32>,
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
