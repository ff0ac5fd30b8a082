//! OPRM, overflow prevention for recurrent models (Ben-Kish et al. 2025, arXiv 2505.07793): the
//! prompt's context is cut into chunks of L tokens; each chunk runs from the zero state between the
//! prompt's prefix and its question, `[P, C_i, S]`, and the chunk whose first answer token is the
//! most certain (the least entropy of the next-token distribution after `S`) answers: decoding
//! goes on from its state. No state ever holds more than |P| + L + |S| tokens, so a model whose
//! state overflows past its training length reads the needle's chunk as a short prompt. Memory
//! stays constant: the prefix's state, the best chunk's and the running one.
use super::prompt::Parts;
use crate::backend::{Backend, ScorerState};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `--oprm L`: chunks of `chunk` context tokens.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Oprm {
    pub chunk: usize,
}

/// What OPRM chose for one sample (a results.jsonl line's `oprm`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OprmRecord {
    /// Chunks the context was cut into.
    pub chunks: usize,
    /// The chunk that answered.
    pub chosen: usize,
    /// The entropy (nats) of its first answer token.
    pub entropy: f64,
    /// The chunks holding the needle's first and last token (equal unless a cut splits it).
    pub needle_chunks: [usize; 2],
    /// The entropy of the chunk holding the needle's first token.
    pub needle_entropy: f64,
}

impl OprmRecord {
    /// Whether the chunk that answered holds the needle, or part of it.
    pub fn chose_needle(&self) -> bool {
        (self.needle_chunks[0]..=self.needle_chunks[1]).contains(&self.chosen)
    }
}

/// The chunk with the least entropy so far.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct Best {
    pub(super) chunk: usize,
    pub(super) entropy: f64,
}

/// How far a sample's chunks have run (a checkpoint's record; the best chunk's state is its tensors).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Progress {
    pub(super) sample: usize,
    /// SHA-256 of the prompt's parts: a resume continues only the same prompt.
    pub(super) ids_sha: String,
    /// The next chunk to run.
    pub(super) next: usize,
    pub(super) best: Option<Best>,
    pub(super) needle_entropy: Option<f64>,
}

impl Parts {
    /// SHA-256 of the three parts, each with its length.
    pub(super) fn sha(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.prefix, &self.context, &self.question] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(bytemuck::cast_slice::<u32, u8>(part));
        }
        format!("{:x}", h.finalize())
    }

    /// The stream position after chunk `i` of `len` tokens and the question.
    pub(super) fn answered_at(&self, i: usize, len: usize) -> u64 {
        (self.prefix.len() + self.chunk(i, len).len() + self.question.len()) as u64
    }

    /// The context's tokens of chunk `i` of `len` tokens.
    fn chunk(&self, i: usize, len: usize) -> &[u32] {
        &self.context[i * len..self.context.len().min((i + 1) * len)]
    }
}

/// Entropy (nats) of the softmax of `logits`, in f64.
pub fn entropy(logits: &[f32]) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let (mut z, mut t) = (0f64, 0f64);
    for &x in logits {
        let d = x as f64 - m;
        let e = d.exp();
        z += e;
        if e > 0.0 {
            t += e * d;
        }
    }
    z.ln() - t / z
}

/// What a chunk's run hands on: the progress after it, the best chunk's state, the tokens it fed,
/// and those it would have fed without the chunks seen before.
pub(super) struct Ran<'a> {
    pub(super) progress: &'a Progress,
    pub(super) best: Option<&'a ScorerState>,
    pub(super) fed: u64,
    pub(super) unshared: u64,
}

/// The entropies of chunks already run, by the SHA-256 of their ids: every sample of a grid shares
/// the prefix and the question, and its noise chunks repeat across samples (the same blocks at a
/// few phases), so a chunk seen before need not run again unless it becomes the best.
pub(super) type Seen = std::collections::HashMap<[u8; 32], f64>;

/// One sample's chunk selection: the backend, the prompt, `--oprm`, the real vocabulary (the rows
/// a softmax runs over), and the entropies of chunks seen before (`--no-reuse`: none).
pub(super) struct Chooser<'a> {
    pub(super) s: &'a mut dyn Backend,
    pub(super) parts: &'a Parts,
    pub(super) oprm: Oprm,
    pub(super) real: usize,
    pub(super) seen: Option<&'a mut Seen>,
}

impl Chooser<'_> {
    /// Chunks of the context.
    pub(super) fn chunks(&self) -> usize {
        self.parts.context.len().div_ceil(self.oprm.chunk)
    }

    /// Runs the chunks from `progress` (with the best chunk's state so far, from a checkpoint),
    /// calling `after` once each chunk ran (with the tokens it fed: it checkpoints when due, and
    /// ends the run at a signal), and leaves the backend in the best chunk's state, the question's
    /// last row pending.
    pub(super) fn run(
        &mut self,
        mut progress: Progress,
        mut best_state: Option<ScorerState>,
        after: &mut dyn FnMut(Ran) -> Result<()>,
    ) -> Result<OprmRecord> {
        let (parts, len) = (self.parts, self.oprm.chunk);
        let n = self.chunks();
        let Some((last, question)) = parts.question.split_last() else {
            bail!("OPRM needs a question after the context");
        };
        if n == 0 {
            bail!("OPRM needs a context to cut into chunks");
        }
        let needle_chunks =
            [parts.needle.start / len, parts.needle.end.saturating_sub(1).max(parts.needle.start) / len]
                .map(|c| c.min(n - 1));
        self.s.reset()?;
        self.s.feed(&parts.prefix)?;
        let after_prefix = self.s.snapshot()?;
        let (mut fed, mut unshared) = (parts.prefix.len() as u64, parts.prefix.len() as u64);
        let mut ids = Vec::with_capacity(len + question.len());
        while progress.next < n {
            let i = progress.next;
            let key: [u8; 32] = Sha256::digest(bytemuck::cast_slice::<u32, u8>(parts.chunk(i, len))).into();
            unshared += (parts.chunk(i, len).len() + parts.question.len()) as u64;
            let known = self.seen.as_ref().and_then(|seen| seen.get(&key).copied());
            // A chunk seen before runs again only to become the best (its state is needed then).
            let h = match known {
                Some(h) if progress.best.is_some_and(|b| h >= b.entropy) => h,
                _ => {
                    self.s.restore(&after_prefix, parts.prefix.len() as u64)?;
                    ids.clear();
                    ids.extend_from_slice(parts.chunk(i, len));
                    ids.extend_from_slice(question);
                    self.s.feed(&ids)?;
                    let mut h = f64::NAN;
                    let real = self.real;
                    self.s.logits(&[*last], &mut |_, row| {
                        h = entropy(&row[..real]);
                        Ok(())
                    })?;
                    fed += (ids.len() + 1) as u64;
                    if let Some(seen) = self.seen.as_mut() {
                        seen.insert(key, h);
                    }
                    h
                }
            };
            if progress.best.is_none_or(|b| h < b.entropy) {
                progress.best = Some(Best { chunk: i, entropy: h });
                best_state = Some(self.s.snapshot()?);
            }
            if i == needle_chunks[0] {
                progress.needle_entropy = Some(h);
            }
            progress.next += 1;
            after(Ran {
                progress: &progress,
                best: best_state.as_ref(),
                fed: std::mem::take(&mut fed),
                unshared: std::mem::take(&mut unshared),
            })?;
        }
        let (Some(best), Some(state), Some(needle_entropy)) = (progress.best, best_state, progress.needle_entropy)
        else {
            bail!("OPRM: sample {} ran no chunk", progress.sample);
        };
        self.s.restore(&state, parts.answered_at(best.chunk, len))?;
        Ok(OprmRecord { chunks: n, chosen: best.chunk, entropy: best.entropy, needle_chunks, needle_entropy })
    }
}

#[cfg(test)]
mod tests {
    use super::entropy;

    #[test]
    fn entropy_is_the_definition() {
        assert!((entropy(&[0.0; 8]) - 8f64.ln()).abs() < 1e-12);
        assert!(entropy(&[0.0, f32::NEG_INFINITY]).abs() < 1e-12);
        assert!(entropy(&[100.0, 0.0, 0.0]) < 1e-40);
        // p = (e, 1, 1) / (e + 2).
        let z = 1f64.exp() + 2.0;
        let want = -(1f64.exp() / z * (1f64.exp() / z).ln() + 2.0 / z * (1.0 / z).ln());
        assert!((entropy(&[1.0, 0.0, 0.0]) - want).abs() < 1e-12);
        assert!((entropy(&[11.0, 10.0, 10.0]) - want).abs() < 1e-12, "shift-invariant");
    }
}
