//! A model plus its state and buffers, sized once: the loop every command drives.
use crate::exec::Pool;
use crate::model::Model;
use anyhow::{bail, Result};
use stuffed_core::Recurrent;

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
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, chunk: usize) -> Session<'m> {
        let net = model.net();
        let chunk = chunk.max(1);
        Session {
            model,
            ex: Pool::new(),
            chunk,
            state: vec![0.0; net.state_len()],
            pos: 0,
            scratch: vec![0.0; net.scratch_len(chunk)],
            hidden: vec![0.0; chunk * net.d_model()],
        }
    }

    pub fn net(&self) -> &'m dyn Recurrent {
        self.model.net()
    }

    pub fn reset(&mut self) {
        self.state.fill(0.0);
        self.pos = 0;
    }

    /// Runs `tokens` chunk by chunk from the current state, handing each chunk's final-normed hidden
    /// rows `(t, d_model)` to `sink(offset in tokens, rows)`. A non-finite state is an error.
    pub fn feed(
        &mut self,
        tokens: &[u32],
        sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let net = self.model.net();
        let d = net.d_model();
        for (i, part) in tokens.chunks(self.chunk).enumerate() {
            let hidden = &mut self.hidden[..part.len() * d];
            if self.chunk == 1 {
                net.step(
                    &self.ex,
                    part[0],
                    &mut self.state,
                    &mut self.scratch,
                    hidden,
                )?;
            } else {
                net.forward(&self.ex, part, &mut self.state, &mut self.scratch, hidden)?;
            }
            self.pos += part.len() as u64;
            if let Some(bad) = self.state.iter().position(|v| !v.is_finite()) {
                bail!(
                    "non-finite value in the recurrent state after token {} (state element {bad}); \
                     the model or its input overflowed",
                    self.pos
                );
            }
            sink(i * self.chunk, hidden)?;
        }
        Ok(())
    }

    /// `out (t, vocab_rows)` logits of `t` hidden rows.
    pub fn logits(&self, hidden: &[f32], t: usize, out: &mut [f32]) -> Result<()> {
        Ok(self.model.net().logits(&self.ex, hidden, t, out)?)
    }
}

impl Session<'_> {
    /// Greedy decoding of `max_new` tokens after a prompt whose last hidden row is `last`; the state
    /// advances through the generated tokens (all but the last, which is never fed).
    pub fn greedy(&mut self, last: &[f32], max_new: usize, real: usize) -> Result<Vec<u32>> {
        let v = self.model.net().vocab_rows();
        let mut logits = vec![0f32; v];
        let mut row = last.to_vec();
        let mut out = Vec::with_capacity(max_new);
        for i in 0..max_new {
            self.logits(&row, 1, &mut logits)?;
            let next = argmax(&logits, real);
            out.push(next);
            if i + 1 < max_new {
                self.feed(&[next], &mut |_, h| {
                    row.copy_from_slice(h);
                    Ok(())
                })?;
            }
        }
        Ok(out)
    }
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
