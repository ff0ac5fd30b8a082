//! What every family offers the host: a state it can snapshot, a chunked forward and a token step.
use crate::error::Error;
use crate::exec::Exec;
use crate::forget::{Forget, Runs};
use crate::gemm::matmul;
use crate::weight::Weight;

/// How a family's recurrence runs over a span of tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// Blocks of tokens at once (SSD / GLA chunks).
    Chunked,
    /// The literal recurrence, token after token.
    Recurrent,
}

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
    /// Runs `tokens` from `state` (updated in place) through the chunked or the token-by-token
    /// form; with `probe`, also adds this call's sums of the probe series into it
    /// `(n_layer, series, n_heads, width)`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
        probe: Option<&mut [f32]>,
        scan: Scan,
    ) -> Result<(), Error>;

    /// The chunked (parallel-in-time) form.
    fn forward(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
    ) -> Result<(), Error> {
        self.run(ex, tokens, state, scratch, hidden, None, Scan::Chunked)
    }

    /// The token-by-token recurrence, one token after another through each layer.
    fn forward_recurrent(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
    ) -> Result<(), Error> {
        self.run(ex, tokens, state, scratch, hidden, None, Scan::Recurrent)
    }

    /// The LM head `(vocab_rows, d_model)`.
    fn head(&self) -> &Weight<'_>;

    /// Sets the forgetting method; the state length may change (window caches), so set it before
    /// sizing buffers. Unsupported methods are an error.
    fn set_forget(&mut self, f: Forget) -> Result<(), Error>;
    fn forget(&self) -> Forget;

    fn n_layer(&self) -> usize;
    /// Heads per layer (the unit of retention, state statistics and state normalization).
    fn n_heads(&self) -> usize;
    /// The state range of head `h` of layer `l`'s recurrent matrix.
    fn head_state(&self, layer: usize, head: usize) -> core::ops::Range<usize>;
    /// The conv (Mamba) or token-shift (RWKV) values that belong to head `h` of layer `l`.
    fn conv_state(&self, layer: usize, head: usize) -> Option<Runs>;
    /// Names of the per-(layer, head) sums over tokens that [`Recurrent::forward_probed`] reports,
    /// and how many values each head has per series (1, or the key channels of per-channel decays).
    /// The first series is always the log decay (log retention) summed over tokens.
    fn probe_series(&self) -> (&'static [&'static str], usize);
    /// f32 elements of a probe buffer: `(n_layer, series, n_heads, width)`.
    fn probe_len(&self) -> usize {
        let (names, width) = self.probe_series();
        self.n_layer() * names.len() * self.n_heads() * width
    }
    /// [`Recurrent::forward`] that also adds this call's sums of the probe series into `probe`.
    fn forward_probed(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
        probe: &mut [f32],
    ) -> Result<(), Error> {
        self.run(ex, tokens, state, scratch, hidden, Some(probe), Scan::Chunked)
    }

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
    fn logits(&self, ex: &dyn Exec, hidden: &[f32], t: usize, out: &mut [f32]) -> Result<(), Error> {
        matmul(ex, hidden, t, self.head(), out)
    }
}

/// The checks every family's `run` starts with, before any state is touched: buffer sizes and every
/// token id against the embedding.
pub fn check_call<R: Recurrent + ?Sized>(
    net: &R,
    tokens: &[u32],
    state: &[f32],
    hidden: &[f32],
    probe: Option<&[f32]>,
) -> Result<(), Error> {
    crate::error::need("state", state.len(), net.state_len())?;
    crate::error::need("hidden", hidden.len(), tokens.len() * net.d_model())?;
    if let Some(p) = probe {
        crate::error::need("probe", p.len(), net.probe_len())?;
    }
    check_tokens(tokens, net.vocab_rows())
}

/// Checks every token id against the embedding.
pub fn check_tokens(tokens: &[u32], rows: usize) -> Result<(), Error> {
    match tokens.iter().find(|&&t| t as usize >= rows) {
        Some(&id) => Err(Error::Token { id, rows }),
        None => Ok(()),
    }
}
