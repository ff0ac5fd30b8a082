//! The LM head fused with log-softmax and NLL, a sub-chunk of rows at a time, so `[T, V]` logits
//! never exist beyond one sub-chunk.
use crate::exec::Pool;
use anyhow::{bail, Result};
use rayon::prelude::*;
use stuffed_core::exec::Exec;
use stuffed_core::ops::log_sum_exp;
use stuffed_core::Recurrent;

/// Rows of logits alive at once.
pub const SUB: usize = 64;

pub struct NllHead<'m> {
    net: &'m dyn Recurrent,
    ex: Pool,
    /// Ids that may enter the softmax (the tokenizer's vocab); rows past it are padding.
    pub real: usize,
    logits: Vec<f32>,
}

impl<'m> NllHead<'m> {
    pub fn new(net: &'m dyn Recurrent, real: usize) -> Self {
        NllHead { net, ex: Pool::new(), real, logits: vec![0.0; SUB * net.vocab_rows()] }
    }

    /// `out[i] = logsumexp(head·hidden_i over the real vocab) − logit(targets[i])`.
    pub fn nll(&mut self, hidden: &[f32], targets: &[u32], out: &mut [f32]) -> Result<()> {
        let (d, v, real) = (self.net.d_model(), self.net.vocab_rows(), self.real);
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= real) {
            bail!("target token {bad} is outside the real vocab ({real} ids)");
        }
        for ((h, tg), o) in hidden.chunks(SUB * d).zip(targets.chunks(SUB)).zip(out.chunks_mut(SUB)) {
            let rows = tg.len();
            let logits = &mut self.logits[..rows * v];
            self.net.logits(&self.ex, &h[..rows * d], rows, logits)?;
            let simd = self.ex.simd();
            logits.par_chunks(v).zip(tg.par_iter()).zip(o.par_iter_mut()).for_each(|((row, &t), o)| {
                *o = log_sum_exp(simd, &row[..real]) - row[t as usize];
            });
        }
        Ok(())
    }
}
