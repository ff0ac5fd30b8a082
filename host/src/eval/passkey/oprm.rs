//! OPRM, overflow prevention for recurrent models (Ben-Kish et al. 2025, arXiv 2505.07793): the
//! prompt's context is cut into chunks of L tokens; each chunk runs from the zero state between the
//! prompt's prefix and its question, `[P, C_i, S]`, and the chunk whose first answer token is the
//! most certain (the least entropy of the next-token distribution after `S`; or, `--oprm-select
//! query`, the chunk after which the question is the most likely, the paper's `Pr(S | P, C_i)`)
//! answers: decoding goes on from its state. No state ever holds more than |P| + L + |S| tokens,
//! so a model whose state overflows past its training length reads the needle's chunk as a short
//! prompt. Memory stays constant: the prefix's state, the best chunk's and the running one.
use super::prompt::Parts;
use crate::backend::{Backend, ScorerState};
use crate::forget::Phase;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `--oprm L`: chunks of `chunk` context tokens, the one that answers chosen by `select`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Oprm {
    pub chunk: usize,
    /// Absent from files and fingerprints for the entropy rule (as before the rule was a choice).
    #[serde(default, skip_serializing_if = "Select::is_entropy")]
    pub select: Select,
    /// `--oprm-idk WORD`: the paper's IDK filter. The question asks for WORD when the key is not in
    /// the text, and a chunk whose greedy first answer token is WORD's first (alone or after a
    /// space) answers only if every chunk's is. Absent from files without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idk: Option<String>,
}

/// The ids that begin `word` as an answer: its first token alone and after a space (the paper's
/// code lists both, `'Error'` and `' Error'`), but not a token of whitespace alone (a tokenizer
/// that splits the space off would make every answer "I don't know"); none without the filter.
pub(super) fn idk_ids(tok: &crate::tokenizer::Tokenizer, word: Option<&str>) -> Result<Vec<u32>> {
    let Some(word) = word else { return Ok(Vec::new()) };
    let mut ids = Vec::new();
    for text in [word.to_string(), format!(" {word}")] {
        if let Some(&id) = tok.encode(&text)?.first() {
            if !ids.contains(&id) && !tok.decode(&[id])?.trim().is_empty() {
                ids.push(id);
            }
        }
    }
    if ids.is_empty() {
        bail!("--oprm-idk {word:?}: the word begins with no token but whitespace");
    }
    Ok(ids)
}

/// `--oprm-select`: OPRM's two rules for the chunk that answers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// The least entropy of the first answer token after `[P, C_i, S]`.
    #[default]
    Entropy,
    /// The most likely question: the least NLL of the question's tokens after `[P, C_i]`.
    Query,
}

impl Select {
    fn is_entropy(&self) -> bool {
        *self == Select::Entropy
    }

    /// What the rule minimises over the chunks (NaN where the scores lack it), after the IDK
    /// filter: a chunk that answers "I don't know" ranks after every chunk that does not.
    pub(super) fn rank(self, s: Scores) -> (bool, f64) {
        let score = match self {
            Select::Entropy => s.entropy,
            Select::Query => s.query_nll.unwrap_or(f64::NAN),
        };
        (s.idk, score)
    }

    /// The rule in words (summary.json).
    pub fn describe(self) -> &'static str {
        match self {
            Select::Entropy => "the chunk with the least entropy of its first answer token decodes",
            Select::Query => {
                "the chunk after which the question is the most likely (the least NLL of its tokens after \
                 [prefix, chunk]) decodes"
            }
        }
    }
}

/// What one chunk's run measured: the entropy of the first answer token, and under
/// [`Select::Query`] the question's NLL after `[P, C_i]` (nats, summed over its tokens).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct Scores {
    pub(super) entropy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) query_nll: Option<f64>,
    /// `--oprm-idk`: the greedy first answer token begins the IDK word.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) idk: bool,
}

impl Scores {
    /// Finite, and a query NLL (where there is one) not below zero.
    pub(super) fn valid(&self) -> bool {
        self.entropy.is_finite() && self.query_nll.is_none_or(|q| q.is_finite() && q >= -1e-3)
    }
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
    /// `--oprm-select query`: the question's NLL (nats) after the chunk that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_nll: Option<f64>,
    /// The chunks holding the needle's first and last token (equal unless a cut splits it).
    pub needle_chunks: [usize; 2],
    /// The entropy of the chunk holding the needle's first token.
    pub needle_entropy: f64,
    /// `--oprm-select query`: the question's NLL after the chunk holding the needle's first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needle_query_nll: Option<f64>,
    /// `--oprm-idk`: the chunks whose first answer token began the IDK word (all of them when the
    /// chunk that answered is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idk_chunks: Option<usize>,
}

impl OprmRecord {
    /// Whether the chunk that answered holds the needle, or part of it.
    pub fn chose_needle(&self) -> bool {
        (self.needle_chunks[0]..=self.needle_chunks[1]).contains(&self.chosen)
    }

    /// Whether a run under `oprm` writes a record of this shape: the query rule's NLLs exactly
    /// under the query rule, the IDK count exactly under the filter.
    pub fn made_by(&self, oprm: &Oprm) -> bool {
        (self.query_nll.is_some() && self.needle_query_nll.is_some()) == (oprm.select == Select::Query)
            && self.idk_chunks.is_some() == oprm.idk.is_some()
    }

    /// The values a run can write: chunks in range, finite scores.
    pub fn valid(&self) -> bool {
        let chosen = Scores { entropy: self.entropy, query_nll: self.query_nll, idk: false };
        let needle = Scores { entropy: self.needle_entropy, query_nll: self.needle_query_nll, idk: false };
        self.chosen < self.chunks
            && self.idk_chunks.is_none_or(|n| n <= self.chunks)
            && self.needle_chunks[0] <= self.needle_chunks[1]
            && self.needle_chunks[1] < self.chunks
            && chosen.valid()
            && needle.valid()
    }
}

/// The chunk the rule ranks first so far.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct Best {
    pub(super) chunk: usize,
    /// (Flattened: a checkpoint's `best` reads `{chunk, entropy[, query_nll]}`.)
    #[serde(flatten)]
    pub(super) scores: Scores,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) needle_query_nll: Option<f64>,
    /// `--oprm-idk`: the chunks run so far whose answer began the IDK word.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) idk_chunks: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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

/// NLL (nats) of `target` under the softmax of `logits`, in f64.
pub fn nll_of(logits: &[f32], target: usize) -> f64 {
    crate::eval::log_sum_exp(logits) - logits[target] as f64
}

/// Whether the greedy token of `logits` (as decoding picks it) is one of `idk`.
fn says_idk(logits: &[f32], idk: &[u32]) -> bool {
    !idk.is_empty() && idk.contains(&crate::session::argmax(logits, logits.len()))
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

/// The scores of chunks already run, by the SHA-256 of their ids: every sample of a grid shares
/// the prefix and the question, and its noise chunks repeat across samples (the same blocks at a
/// few phases), so a chunk seen before need not run again unless it becomes the best.
pub(super) type Seen = std::collections::HashMap<[u8; 32], Scores>;

/// One sample's chunk selection: the backend, the prompt, `--oprm`, the real vocabulary (the rows
/// a softmax runs over) and the logits' row stride, and the scores of chunks seen before
/// (`--no-reuse`: none).
pub(super) struct Chooser<'a> {
    pub(super) s: &'a mut dyn Backend,
    pub(super) parts: &'a Parts,
    pub(super) oprm: &'a Oprm,
    pub(super) real: usize,
    pub(super) vocab_rows: usize,
    pub(super) seen: Option<&'a mut Seen>,
    /// [`idk_ids`] of `--oprm-idk` (empty without it).
    pub(super) idk: &'a [u32],
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
        let (parts, len, select) = (self.parts, self.oprm.chunk, self.oprm.select);
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
        // Each chunk runs as a prompt of its own, `[prefix, chunk, question]` (LongMamba filters it
        // from its `min` tokens up; the prefix is shared, so a short last chunk counts as whole).
        let prompt = parts.prefix.len() + len + parts.question.len();
        self.s.set_phase(Phase::Prompt { len: Some(prompt as u64) });
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
            let rank = |s: Scores| select.rank(s);
            // A chunk seen before runs again only to become the best (its state is needed then).
            let scores = match known {
                Some(k) if progress.best.is_some_and(|b| rank(k) >= rank(b.scores)) => k,
                _ => {
                    self.s.restore(&after_prefix, parts.prefix.len() as u64)?;
                    let scores = match select {
                        Select::Entropy => {
                            ids.clear();
                            ids.extend_from_slice(parts.chunk(i, len));
                            ids.extend_from_slice(question);
                            self.s.feed(&ids)?;
                            let (mut h, mut idk) = (f64::NAN, false);
                            let (real, idk_ids) = (self.real, self.idk);
                            self.s.logits(&[*last], &mut |_, row| {
                                (h, idk) = (entropy(&row[..real]), says_idk(&row[..real], idk_ids));
                                Ok(())
                            })?;
                            Scores { entropy: h, query_nll: None, idk }
                        }
                        Select::Query => self.query(parts.chunk(i, len), &mut ids)?,
                    };
                    fed += (parts.chunk(i, len).len() + parts.question.len()) as u64;
                    if !scores.valid() {
                        bail!("OPRM: chunk {i} of sample {}: a score that is not finite ({scores:?})", progress.sample);
                    }
                    if let Some(seen) = self.seen.as_mut() {
                        seen.insert(key, scores);
                    }
                    scores
                }
            };
            if progress.best.is_none_or(|b| rank(scores) < rank(b.scores)) {
                progress.best = Some(Best { chunk: i, scores });
                best_state = Some(self.s.snapshot()?);
            }
            progress.idk_chunks += scores.idk as usize;
            if i == needle_chunks[0] {
                progress.needle_entropy = Some(scores.entropy);
                progress.needle_query_nll = scores.query_nll;
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
        Ok(OprmRecord {
            chunks: n,
            chosen: best.chunk,
            entropy: best.scores.entropy,
            query_nll: best.scores.query_nll,
            needle_chunks,
            needle_entropy,
            needle_query_nll: progress.needle_query_nll,
            idk_chunks: (!self.idk.is_empty()).then_some(progress.idk_chunks),
        })
    }

    /// [`Select::Query`]'s run of one chunk after the prefix's state: the chunk but its last token
    /// fed, then that token and the question with every row's logits (`ids` is scratch). Row j
    /// predicts the question's token j; the last row, after the question, gives the entropy and
    /// stays pending for the answer.
    fn query(&mut self, chunk: &[u32], ids: &mut Vec<u32>) -> Result<Scores> {
        let Some((last, head)) = chunk.split_last() else { bail!("OPRM: an empty chunk") };
        if !head.is_empty() {
            self.s.feed(head)?;
        }
        ids.clear();
        ids.push(*last);
        ids.extend_from_slice(&self.parts.question);
        let (ids, real, stride, idk_ids) = (&ids[..], self.real, self.vocab_rows, self.idk);
        let (mut nll, mut h, mut idk) = (0f64, f64::NAN, false);
        self.s.logits(ids, &mut |off, rows| {
            for (j, row) in rows.chunks_exact(stride).enumerate() {
                match ids.get(off + j + 1) {
                    Some(&next) if (next as usize) < real => nll += nll_of(&row[..real], next as usize),
                    Some(&next) => bail!("OPRM: question token {next} outside the real vocabulary ({real})"),
                    None => (h, idk) = (entropy(&row[..real]), says_idk(&row[..real], idk_ids)),
                }
            }
            Ok(())
        })?;
        Ok(Scores { entropy: h, query_nll: Some(nll), idk })
    }
}

#[cfg(test)]
mod tests {
    use super::{entropy, nll_of};

    #[test]
    fn nll_is_the_definition() {
        assert!((nll_of(&[0.0; 8], 3) - 8f64.ln()).abs() < 1e-12);
        // p = (e, 1, 1) / (e + 2): −ln p₀ = ln(e + 2) − 1, shift-invariant.
        let want = (1f64.exp() + 2.0).ln() - 1.0;
        assert!((nll_of(&[1.0, 0.0, 0.0], 0) - want).abs() < 1e-12);
        assert!((nll_of(&[101.0, 100.0, 100.0], 0) - want).abs() < 1e-12);
        assert!((nll_of(&[1.0, 0.0, 0.0], 1) - (want + 1.0)).abs() < 1e-12);
    }

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
