//! The CUDA backend: Mamba-2's launch sequence on the device (`cuda::mamba2`), the NLL head fused
//! there. A non-finite NLL is rerun on the CPU from the zero state to name where it first appears.
use super::{cpu::cpu_rerun, Backend, GpuOptions, ScorerState};
use crate::cuda::mamba2::GpuMamba2;
use crate::cuda::DType;
use crate::forget::Phase;
use crate::model::Model;
use anyhow::{bail, Result};
use stuffed_core::error::first_non_finite;

pub struct CudaBackend<'m> {
    g: Box<GpuMamba2>,
    /// For the CPU rerun of a call whose NLL came back non-finite.
    model: &'m Model,
}

impl<'m> CudaBackend<'m> {
    pub fn new(model: &'m Model, chunk: usize, real: usize, gpu: GpuOptions) -> Result<Self> {
        let force = if gpu.f32 { Some(DType::F32) } else { gpu.bf16.then_some(DType::Bf16) };
        let mut g = GpuMamba2::new(model, chunk, gpu.max_mem, force, real)?;
        g.set_cublas_decode(gpu.cublas_decode);
        Ok(CudaBackend { g: Box::new(g), model })
    }
}

impl Backend for CudaBackend<'_> {
    fn chunk(&self) -> usize {
        self.g.chunk
    }

    fn score(&mut self, ids: &[u32], nll: &mut Vec<f32>) -> Result<bool> {
        let g = &mut self.g;
        let had = g.has_pending;
        let pos0 = g.position() - had as u64;
        *nll = g.feed_nll(ids)?;
        // Checked per call (the state is checked on the device after every piece).
        if let Some(i) = first_non_finite(nll) {
            bail!(
                "{}: non-finite logit or NLL at position {} on the GPU; {}",
                g.model_path,
                pos0 + i as u64,
                cpu_rerun(self.model, ids, g.real)
            );
        }
        Ok(had)
    }

    fn feed(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.g.feed(ids)
    }

    fn feed_probed(&mut self, ids: &[u32], probe: &mut [f32]) -> Result<()> {
        self.g.feed_probed(ids, probe)
    }

    fn logits(&mut self, ids: &[u32], sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        let chunk = self.g.chunk;
        for (k, piece) in ids.chunks(chunk).enumerate() {
            self.g.forward(piece, None)?;
            let rows = self.g.logits(1, piece.len())?;
            crate::session::check_logits(self.model, &rows, (k * chunk) as u64)?;
            sink(k * chunk, &rows)?;
        }
        Ok(())
    }

    /// The device decodes all `max_new` tokens; `each` sees them in order until it stops.
    fn greedy_each(&mut self, max_new: usize, each: &mut dyn FnMut(u32) -> Result<bool>) -> Result<()> {
        for t in self.g.greedy(max_new)? {
            if !each(t)? {
                break;
            }
        }
        Ok(())
    }

    fn set_phase(&mut self, phase: Phase) {
        self.g.phase = phase;
    }

    fn phase(&self) -> Phase {
        self.g.phase
    }

    fn reset(&mut self) -> Result<()> {
        self.g.reset()
    }

    fn state_len(&self) -> usize {
        self.g.state_len()
    }

    fn snapshot(&self) -> Result<ScorerState> {
        let mut s = vec![0f32; self.g.state_len()];
        self.g.download_state(&mut s)?;
        Ok(ScorerState { state: s, pending: self.g.pending_row()?, tau: self.g.tau()? })
    }

    fn restore(&mut self, from: &ScorerState, pos: u64) -> Result<()> {
        self.g.upload_state(&from.state)?;
        self.g.set_position(pos, &from.tau)?;
        self.g.set_pending_row(from.pending.as_deref())
    }

    fn device_name(&self) -> String {
        let g = &self.g;
        let gib = g.bytes() as f64 / (1u64 << 30) as f64;
        format!("{} (CUDA, {:?} matmuls; engine buffers {gib:.3} GiB, chunk {})", g.gpu.name, g.dt, g.chunk)
    }

    fn mem_used(&self) -> Result<usize> {
        crate::cuda::Gpu::mem_info().map(|(free, total)| total - free)
    }

    fn decode_path(&self) -> &'static str {
        if self.g.cublas_decode() {
            "cuBLAS projections"
        } else {
            "fused projections"
        }
    }

    fn switch_decode_path(&mut self) -> bool {
        let was = self.g.cublas_decode();
        self.g.set_cublas_decode(!was);
        true
    }

    fn take_profile(&self) -> Vec<(&'static str, u64, f64)> {
        self.g.gpu.prof.take().unwrap_or_default()
    }
}
