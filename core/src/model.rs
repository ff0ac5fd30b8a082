//! What every family offers the host: a state it can snapshot, a chunked forward and a token step.
use crate::error::Error;
use crate::exec::Exec;
use crate::weight::{matmul, Weight};

/// A recurrent language model with a fixed-size f32 state.
///
/// Both forwards continue from whatever `state` holds (zeros = start of a sequence) and leave it at
/// the end of `tokens`; they write the final-normed hidden state of every position into `hidden`
/// `(T, d_model)`, from which [`Recurrent::logits`] (or a fused NLL in the host) reads the head.
pub trait Recurrent: Sync {
    fn d_model(&self) -> usize;
    /// Rows of the embedding and head (the checkpoint's, padded).
    fn vocab_rows(&self) -> usize;
    /// f32 elements of the whole recurrent state (all layers).
    fn state_len(&self) -> usize;
    /// f32 elements of scratch needed to run up to `chunk` tokens in one call.
    fn scratch_len(&self, chunk: usize) -> usize;
    /// The chunked (parallel-in-time) form.
    fn forward(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
    ) -> Result<(), Error>;
    /// The token-by-token recurrence, one token after another through each layer.
    fn forward_recurrent(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
    ) -> Result<(), Error>;
    /// The LM head `(vocab_rows, d_model)`.
    fn head(&self) -> &Weight<'_>;

    /// One token through the recurrence.
    fn step(
        &self,
        ex: &dyn Exec,
        token: u32,
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
    ) -> Result<(), Error> {
        self.forward_recurrent(ex, &[token], state, scratch, hidden)
    }

    /// `logits (t, vocab_rows) = hidden (t, d_model) · headᵀ`.
    fn logits(
        &self,
        ex: &dyn Exec,
        hidden: &[f32],
        t: usize,
        out: &mut [f32],
    ) -> Result<(), Error> {
        matmul(ex, hidden, t, self.head(), out)
    }
}

/// Checks every token id against the embedding before any state is touched.
pub fn check_tokens(tokens: &[u32], rows: usize) -> Result<(), Error> {
    match tokens.iter().find(|&&t| t as usize >= rows) {
        Some(&id) => Err(Error::Token { id, rows }),
        None => Ok(()),
    }
}
