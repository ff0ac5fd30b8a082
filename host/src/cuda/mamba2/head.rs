//! Mamba-2's LM head on the device: NLL of every fed token (logits tiled over the vocabulary so
//! each tile stays in L2 from the GEMM to `lse_tile`), logits downloaded, greedy decoding (argmax
//! on the device, one step captured as a CUDA graph). The launch sequence of the layers is in
//! `mamba2.rs`.
use super::{GpuMamba2, VOCAB_TILE};
use crate::cuda::{i, Arg, DBuf};
use crate::forget::Phase;
use crate::gpumem::NLL_ROWS;
use anyhow::{bail, Result};

impl GpuMamba2 {
    /// The LM head's weights (the embedding when tied).
    pub(super) fn head_ptr(&self) -> u64 {
        self.head.as_ref().unwrap_or(&self.embed).ptr()
    }

    /// Logits `(count, Vp)` of hidden rows `first..first + count` into the logits buffer
    /// (`count ≤ sub`).
    pub(super) fn head_rows(&self, first: usize, count: usize) -> Result<()> {
        let (d, v) = (self.cfg.d_model, self.cfg.vocab_rows);
        let x = self.hidden.at(first * d * self.dt.size());
        let gpu = &self.gpu;
        gpu.timed("gemm lm_head", || gpu.blas.gemm_nt(self.dt, count, v, d, x, self.head_ptr(), self.logits.ptr(), 0.0))
    }

    /// Feeds `tokens` (in pieces of at most `chunk`) and returns the NLL of every token that has a
    /// predicting row: all of them when a previous call left its last row pending, else all but the
    /// first. The last row stays pending for the next call.
    pub fn feed_nll(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(tokens.len());
        let mut off = 0;
        while off < tokens.len() {
            let n = self.piece_len(tokens.len() - off);
            out.extend(self.feed_nll_piece(&tokens[off..off + n])?);
            self.after_piece(n, true)?;
            off += n;
        }
        Ok(out)
    }

    fn feed_nll_piece(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        self.forward(tokens, None)?;
        let (first, targets) = if self.has_pending { (0, tokens) } else { (1, &tokens[1..]) };
        let count = targets.len();
        self.gpu.sync()?;
        self.tgt.upload(0, targets)?;
        // Rows × vocab tiles of logits, each tile small enough to stay in L2 from the GEMM to lse_tile;
        // many rows a tile, so the head's weights are read once per NLL_ROWS tokens.
        let (d, el, gpu) = (self.cfg.d_model, self.dt.size(), &self.gpu);
        let vt = VOCAB_TILE.min(self.real);
        let rows = (self.sub * self.cfg.vocab_rows / vt).clamp(1, NLL_ROWS);
        for s in (0..count).step_by(rows) {
            let r = rows.min(count - s);
            let x = self.hidden.at((first + s) * d * el);
            for v0 in (0..self.real).step_by(vt) {
                let n = vt.min(self.real - v0);
                let w = self.head_ptr() + (v0 * d * el) as u64;
                gpu.timed("gemm lm_head", || gpu.blas.gemm_nt(self.dt, r, n, d, x, w, self.logits.ptr(), 0.0))?;
                let args = [
                    Arg::Ptr(self.logits.ptr()),
                    i(r),
                    i(n),
                    i(v0),
                    Arg::Ptr(self.tgt.at(s * 4)),
                    Arg::Ptr(self.lse.ptr()),
                    Arg::Ptr(self.nll.at(s * 4)),
                    Arg::I32((v0 == 0) as i32),
                    Arg::I32((v0 + n == self.real) as i32),
                ];
                gpu.launch("lse_tile", (r.div_ceil(8) as u32, 1), 256, 0, &args)?;
            }
        }
        let mut out = vec![0f32; count];
        self.gpu.sync()?;
        self.nll.download(0, &mut out)?;
        let rb = self.cfg.d_model * self.dt.size();
        self.gpu.copy(self.hidden.ptr(), self.hidden.at(t * rb), rb)?;
        self.has_pending = true;
        Ok(out)
    }

    /// Logits `(count, Vp)` of hidden rows `first..first + count`, downloaded.
    pub fn logits(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        let v = self.cfg.vocab_rows;
        let mut out = vec![0f32; count * v];
        for s in (0..count).step_by(self.sub) {
            let r = self.sub.min(count - s);
            self.head_rows(first + s, r)?;
            self.gpu.sync()?;
            self.logits.download(0, &mut out[s * v..(s + r) * v])?;
        }
        Ok(out)
    }

    /// Greedy decoding of `max_new` tokens from the pending row; the state advances through all but
    /// the last generated token (as `Session::greedy_each`). Each step reads its token from the device,
    /// so the host only waits once, at the end.
    pub fn greedy(&mut self, max_new: usize) -> Result<Vec<u32>> {
        if !self.has_pending {
            bail!("greedy decoding needs a prompt first");
        }
        let out = DBuf::new(max_new * 4)?;
        // Decoded tokens (LongMamba leaves them unfiltered; the captured step is always this phase's).
        let phase = std::mem::replace(&mut self.phase, Phase::Answer);
        let decoded = (0..max_new).try_for_each(|k| {
            if k + 1 < max_new {
                self.decode_step()?;
                self.after_piece(1, false)?;
            } else {
                self.argmax_pending()?;
            }
            self.gpu.copy(out.at(k * 4), self.am.ptr(), 4)
        });
        self.phase = phase;
        decoded?;
        let mut ids = vec![0u32; max_new];
        self.gpu.sync()?;
        out.download(0, &mut ids)?;
        self.check_state()?;
        Ok(ids)
    }

    /// The argmax of the pending row's logits into `am[0]`.
    fn argmax_pending(&self) -> Result<()> {
        self.head_rows(0, 1)?;
        let v = self.cfg.vocab_rows;
        self.gpu.launch(
            "argmax_rows",
            (1, 1),
            256,
            0,
            &[Arg::Ptr(self.logits.ptr()), Arg::Ptr(self.am.ptr()), i(v), i(self.real)],
        )
    }

    /// One greedy step: argmax of the pending row, then that token fed from the device, its row
    /// pending. On the GPU the step is captured once as a CUDA graph (≈ 6 launches per layer
    /// replayed without host overhead); the emulator issues the same ops each time.
    pub(super) fn decode_step(&mut self) -> Result<()> {
        let rb = self.cfg.d_model * self.dt.size();
        let ops = |m: &Self| -> Result<()> {
            m.argmax_pending()?;
            m.run(m.am.ptr(), 1, None)?;
            m.gpu.copy(m.hidden.ptr(), m.hidden.at(rb), rb)
        };
        #[cfg(feature = "cuda")]
        {
            if self.decode_graph.is_none() {
                let g = self.gpu.capture(|| ops(self))?;
                self.decode_graph = Some(g);
            }
            self.gpu.launch_graph(self.decode_graph.as_ref().expect("captured above"))
        }
        #[cfg(not(feature = "cuda"))]
        ops(self)
    }
}
