//! What every family offers the host: a state it can snapshot, a chunked forward and a token step.
use crate::error::{check_finite, first_non_finite, Error, Site};
use crate::exec::Exec;
use crate::forget::{Cut, Decimated, Decimation, Forget, LayerWindow, Measure, Runs, WindowTail};
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

/// Integers kept in a state as f32 (positions, ring slots), which a stored state type must not
/// round: bf16 holds the integers exactly only to 256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Per layer (e.g. RetNet's rotary position), if any.
    pub layers: Option<Runs>,
    /// At the end of the state (a window's ring position and fill flag); may be empty.
    pub tail: core::ops::Range<usize>,
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
    /// The state a stream starts from, written into `state` ([`Recurrent::state_len`]): zeros, or a
    /// state-tuned model's own (RWKV-5/6's `att.time_state`, as the `rwkv` package starts from it).
    fn initial_state(&self, state: &mut [f32]) {
        state.fill(0.0);
    }
    /// State values that are bookkeeping, not state: a host never rounds or rescales them.
    fn counters(&self) -> Counters {
        Counters { layers: None, tail: self.window_counters() }
    }
    /// A window's (or two staggered states') ring position and fill flag at the end of the state
    /// ([`crate::forget::WINDOW_COUNTERS`]), or an empty range.
    fn window_counters(&self) -> core::ops::Range<usize> {
        let n = self.state_len();
        match self.forget() {
            Forget::Window { .. } | Forget::Staggered { .. } => n.saturating_sub(crate::forget::WINDOW_COUNTERS)..n,
            _ => n..n,
        }
    }
    /// Whether scaling a head's matrix ([`Recurrent::head_state`]) scales what the head holds, as
    /// `--forget state-norm` assumes. Not for xLSTM, whose matrix is stored divided by `e^m` beside
    /// its normaliser.
    fn rescales_heads(&self) -> bool {
        true
    }
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

    /// DeciMamba's prefill, chunked: each decimating layer of `cut` drops the rows whose Δ norm is
    /// below its threshold, and those equal to it past its budget of ties (drawn down here); that
    /// layer's scan and every later layer skip them. With `measure`, the
    /// call stops inside that layer (after `cut`'s earlier layers) once its Δ is known and writes
    /// the norms of the rows that reached it; `state` is then left part-way (the caller restores
    /// it). Otherwise the kept tokens' final-normed rows are at the front of `hidden`, in order (as
    /// many as the last count of [`Decimated::kept`], or every row without a cut); the other rows
    /// mean nothing. Mamba-1 and Mamba-2 (Δ over channels, over heads); elsewhere an error.
    #[allow(clippy::too_many_arguments)]
    fn forward_decimated(
        &self,
        ex: &dyn Exec,
        tokens: &[u32],
        state: &mut [f32],
        scratch: &mut [f32],
        hidden: &mut [f32],
        cut: &mut Decimation,
        measure: Option<Measure<'_>>,
    ) -> Result<Decimated, Error> {
        let _ = (ex, tokens, state, scratch, hidden, cut, measure);
        Err(Error::Config("decimamba ranks tokens by Mamba's Δ (Mamba-1 and Mamba-2); this family has none"))
    }

    /// Whether [`Recurrent::forward_decimated`] runs for this family.
    fn decimates(&self) -> bool {
        false
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

/// What stays the same across the layers of one call, handed to each layer with its index.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    pub ex: &'a dyn Exec,
    /// Tokens in this call.
    pub t: usize,
    pub scan: Scan,
    /// The layer.
    pub l: usize,
}

/// A sliding window's layout in the state: its length and one layer's cache (f32 elements).
#[derive(Clone, Copy)]
pub(crate) struct WindowShape {
    pub r: usize,
    pub layer_len: usize,
}

/// Where one call finds each layer's state and probe sums, and the window's caches after them.
pub(crate) struct StackShape {
    /// f32 elements of every layer's recurrent state together (a window's tail follows).
    pub base_len: usize,
    pub layer_state_len: usize,
    /// Probe values per layer.
    pub probe_per_layer: usize,
    pub window: Option<WindowShape>,
}

/// One family's own parts of a forward call; [`run_stack`] is the rest, the same for every family.
pub(crate) trait Stack: Recurrent {
    /// The call's scratch, split into named buffers.
    type Scratch<'s>;
    /// The state, probe and window layout for a call of `t` tokens (an error where the family cannot
    /// run `t` tokens in one call under its forgetting method).
    fn stack_shape(&self, t: usize) -> Result<StackShape, Error>;
    fn split_scratch<'s>(&self, t: usize, buf: &'s mut [f32]) -> Result<Self::Scratch<'s>, Error>;
    /// `x (t, d_model)`: the tokens' rows entering the first layer.
    fn embed(&self, tokens: &[u32], x: &mut [f32], s: &mut Self::Scratch<'_>);
    /// Layer `call.l` over the rows `x` (in place), from its state `st` (updated), adding its probe
    /// sums and running its window part.
    fn run_layer(
        &self,
        call: Call,
        x: &mut [f32],
        st: &mut [f32],
        s: &mut Self::Scratch<'_>,
        probe: Option<&mut [f32]>,
        window: Option<LayerWindow<'_>>,
    ) -> Result<(), Error>;
    /// The final norm of every row of `x`.
    fn final_norm(&self, x: &mut [f32], s: &mut Self::Scratch<'_>);
    /// [`Stack::run_layer`] under DeciMamba's `cut` (no probe, no window): the rows it leaves, or
    /// under `Cut::Measure` the rows it measured (stopping there). Families whose Δ DeciMamba
    /// ranks (Mamba-1, Mamba-2) only.
    fn run_layer_cut(
        &self,
        _call: Call,
        _x: &mut [f32],
        _st: &mut [f32],
        _s: &mut Self::Scratch<'_>,
        _cut: Cut<'_>,
    ) -> Result<usize, Error> {
        Err(Error::Config("decimamba ranks tokens by Mamba's Δ; this family has none"))
    }
    /// Whether [`Stack::run_layer`] under `scan` fails on a non-finite value of the layer's state
    /// itself (as [`crate::error::check_finite`] with width 1 would, at `Site::State`), found while
    /// writing it, so [`run_stack`] need not read the state once more.
    fn checks_own_state(&self, _scan: Scan) -> bool {
        false
    }
}

/// The error of layer `l` whose state `st` holds a NaN or infinity: what [`run_stack`]'s check
/// reports, for a [`Stack::run_layer`] that checks its own state.
pub(crate) fn non_finite_state(l: usize, st: &[f32]) -> Error {
    Error::NonFinite { site: Site::State(l), index: first_non_finite(st).unwrap_or(0) }
}

/// [`Recurrent::run`] of every family: the call checked, the tokens embedded, each layer run on its
/// state, probe and window parts with its state and output checked finite, the window advanced, the
/// final norm applied and checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_stack<S: Stack + ?Sized>(
    net: &S,
    ex: &dyn Exec,
    tokens: &[u32],
    state: &mut [f32],
    scratch: &mut [f32],
    hidden: &mut [f32],
    probe: Option<&mut [f32]>,
    scan: Scan,
) -> Result<(), Error> {
    run_stack_tapped(net, ex, tokens, state, scratch, hidden, probe, scan, |_: usize, _: &S::Scratch<'_>| {})
}

/// [`run_stack`], calling `tap` after each layer with what it left in the scratch (a family's
/// intermediate values, e.g. Mamba-2's Δ).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_stack_tapped<S: Stack + ?Sized, F: for<'x> FnMut(usize, &S::Scratch<'x>)>(
    net: &S,
    ex: &dyn Exec,
    tokens: &[u32],
    state: &mut [f32],
    scratch: &mut [f32],
    hidden: &mut [f32],
    mut probe: Option<&mut [f32]>,
    scan: Scan,
    mut tap: F,
) -> Result<(), Error> {
    let (t, d) = (tokens.len(), net.d_model());
    check_call(net, tokens, state, hidden, probe.as_deref())?;
    if t == 0 {
        return Ok(());
    }
    let shape = net.stack_shape(t)?;
    let mut s = net.split_scratch(t, scratch)?;
    let x = &mut hidden[..t * d];
    net.embed(tokens, x, &mut s);
    check_finite(x, d, Site::Embedding)?;
    let (base, extra) = state.split_at_mut(shape.base_len);
    let (r, wl) = shape.window.map_or((None, 0), |w| (Some(w.r), w.layer_len));
    let mut tail = WindowTail::split(r, extra, wl);
    let pp = shape.probe_per_layer;
    for (l, st) in base.chunks_exact_mut(shape.layer_state_len).enumerate() {
        let pr = probe.as_deref_mut().map(|p| &mut p[l * pp..(l + 1) * pp]);
        let ws = tail.as_mut().map(|w| w.layer(l));
        net.run_layer(Call { ex, t, scan, l }, x, st, &mut s, pr, ws)?;
        tap(l, &s);
        if !net.checks_own_state(scan) {
            check_finite(st, 1, Site::State(l))?;
        }
        check_finite(x, d, Site::Layer(l))?;
    }
    if let Some(w) = &mut tail {
        w.advance(t);
    }
    net.final_norm(x, &mut s);
    check_finite(x, d, Site::FinalNorm)
}

/// [`Recurrent::forward_decimated`] of the families DeciMamba applies to: the call checked, the
/// tokens embedded, each layer run on its state under its cut (the rows going on shrinking where a
/// layer drops some; a measuring call stopping inside its layer), each layer's state and output
/// checked finite, the final norm over the rows left.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_stack_decimated<S: Stack + ?Sized>(
    net: &S,
    ex: &dyn Exec,
    tokens: &[u32],
    state: &mut [f32],
    scratch: &mut [f32],
    hidden: &mut [f32],
    cut: &mut Decimation,
    mut measure: Option<Measure<'_>>,
) -> Result<Decimated, Error> {
    if net.forget() != Forget::None {
        return Err(Error::Config("decimamba runs without another forgetting method"));
    }
    let n_layer = net.n_layer();
    cut.fits(n_layer)?;
    if let Some(m) = &measure {
        if m.layer >= n_layer || cut.layers().last().is_some_and(|&l| l >= m.layer) {
            return Err(Error::Config("decimamba: the measured layer must follow the decimating layers it is given"));
        }
        crate::error::need("decimamba norms", m.norms.len(), tokens.len())?;
    }
    check_call(net, tokens, state, hidden, None)?;
    let (mut t, d) = (tokens.len(), net.d_model());
    let mut done = Decimated::default();
    if t == 0 {
        return Ok(done);
    }
    let shape = net.stack_shape(t)?;
    let mut s = net.split_scratch(t, scratch)?;
    let x = &mut hidden[..t * d];
    net.embed(tokens, x, &mut s);
    check_finite(x, d, Site::Embedding)?;
    for (l, st) in state[..shape.base_len].chunks_exact_mut(shape.layer_state_len).enumerate() {
        let measuring = measure.as_ref().is_some_and(|m| m.layer == l);
        let at = cut.layers().iter().position(|&x| x == l);
        // Every row dropped: no token reaches the layers left.
        if t == 0 {
            match measuring {
                true => return Ok(done),
                false => continue,
            }
        }
        let tau = at.map_or(0.0, |i| cut.tau_at(i));
        let how = match (&mut measure, at.and_then(|i| cut.ties_mut(i))) {
            (Some(m), _) if measuring => Cut::Measure(&mut m.norms[..t]),
            (_, Some(ties)) => Cut::Drop { tau, ties },
            _ => Cut::Keep,
        };
        let rows = net.run_layer_cut(Call { ex, t, scan: Scan::Chunked, l }, &mut x[..t * d], st, &mut s, how)?;
        if measuring {
            done.measured = rows;
            return Ok(done);
        }
        if let Some(i) = at {
            done.kept[i] = rows;
        }
        t = rows;
        check_finite(st, 1, Site::State(l))?;
        check_finite(&x[..t * d], d, Site::Layer(l))?;
    }
    let x = &mut x[..t * d];
    net.final_norm(x, &mut s);
    check_finite(x, d, Site::FinalNorm)?;
    Ok(done)
}
