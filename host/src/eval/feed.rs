//! The token feed every evaluator reads: a document's inputs tokenized piece by piece, repeated or
//! cut to a length, handed out in calls of any size, the ids a resumed run already fed skipped — so a
//! stream of any length is never held whole.
use crate::text::{Input, TokenStream};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use std::collections::VecDeque;

/// The ids of one document: its inputs in order, repeated up to `repeat_to`, cut at `max_tokens`.
pub struct DocStream<'t> {
    tok: &'t Tokenizer,
    parts: Vec<Input>,
    next_part: usize,
    cur: Option<TokenStream<'t>>,
    limit: Option<u64>,
    repeat: bool,
    produced: u64,
    /// Ids produced in the current pass over the parts (an empty pass means nothing to repeat).
    pass_len: u64,
    /// Whole passes over the parts so far, and whether the limit cut ids of the first.
    passes: u64,
    cut_first_pass: bool,
}

/// A document's ids handed out in calls of any size: the stream's pieces queued as they are
/// tokenized, the first `skip` ids (those a resumed run already fed) dropped.
pub struct TokenFeed<'t> {
    stream: DocStream<'t>,
    queue: VecDeque<u32>,
    to_skip: u64,
    exhausted: bool,
}

impl<'t> TokenFeed<'t> {
    pub fn new(stream: DocStream<'t>, skip: u64) -> Self {
        TokenFeed { stream, queue: VecDeque::new(), to_skip: skip, exhausted: false }
    }

    /// The next `n` ids (fewer at the stream's end; none once it is over).
    pub fn take(&mut self, n: usize) -> Result<Vec<u32>> {
        while self.queue.len() < n && !self.exhausted {
            match self.stream.next_piece()? {
                Some(p) => {
                    let drop = (self.to_skip as usize).min(p.len());
                    self.to_skip -= drop as u64;
                    self.queue.extend(&p[drop..]);
                }
                None => self.exhausted = true,
            }
        }
        Ok(self.queue.drain(..n.min(self.queue.len())).collect())
    }

    /// Whether every id of the stream was taken.
    pub fn done(&self) -> bool {
        self.exhausted && self.queue.is_empty()
    }

    pub fn stream(&self) -> &DocStream<'t> {
        &self.stream
    }
}

/// The stream of `parts` in order, repeated up to `repeat_to` tokens, cut at `max_tokens`.
pub fn doc_stream(
    tok: &Tokenizer,
    parts: Vec<Input>,
    max_tokens: Option<u64>,
    repeat_to: Option<u64>,
) -> DocStream<'_> {
    let limit = match (max_tokens, repeat_to) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    DocStream {
        tok,
        parts,
        next_part: 0,
        cur: None,
        limit,
        repeat: repeat_to.is_some(),
        produced: 0,
        pass_len: 0,
        passes: 0,
        cut_first_pass: false,
    }
}

impl DocStream<'_> {
    /// Whether the limit cut the document before its end (seen when the cut fell inside a piece).
    pub fn cut_before_end(&self) -> bool {
        self.cut_first_pass
    }

    pub fn next_piece(&mut self) -> Result<Option<Vec<u32>>> {
        loop {
            if self.limit.is_some_and(|l| self.produced >= l) {
                return Ok(None);
            }
            if self.cur.is_none() {
                if self.next_part == self.parts.len() {
                    if !self.repeat || self.pass_len == 0 {
                        return Ok(None);
                    }
                    (self.next_part, self.pass_len, self.passes) = (0, 0, self.passes + 1);
                }
                self.cur = Some(TokenStream::new(self.tok, &self.parts[self.next_part])?);
                self.next_part += 1;
            }
            match self.cur.as_mut().and_then(|s| s.next_piece().transpose()) {
                Some(piece) => {
                    let mut piece = piece?;
                    if let Some(l) = self.limit {
                        let keep = (l - self.produced) as usize;
                        self.cut_first_pass |= self.passes == 0 && piece.len() > keep;
                        piece.truncate(keep);
                    }
                    self.produced += piece.len() as u64;
                    self.pass_len += piece.len() as u64;
                    return Ok(Some(piece));
                }
                None => self.cur = None,
            }
        }
    }
}
