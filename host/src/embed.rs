//! The embedding layer under the C ABI (`capi/`) and the Python package (`python/`): a model
//! handle and a recurrent state the caller owns. Every call checks its buffers' sizes and token ids
//! first and answers a typed error with the one-line message the CLI would print; nothing here
//! installs signal handlers (the CLI's `main` does) or sizes the worker pool (one process-wide pool:
//! [`crate::exec::Pool::init_threads`], first call wins).
//!
//! Thread-safety: a [`Handle`] is `Send + Sync`: any number of threads may run calls on one handle at
//! once, each with its own state (a state is one stream: never share one between concurrent calls).
//! [`Handle::set_forget`] and [`Handle::set_chunk`] wait for running calls to end.
use crate::backend::Device;
use crate::forget::ForgetSpec;
use crate::model::Model;
use crate::session::Session;
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::RwLock;

/// What kind of failure a call met (the C ABI's return codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A buffer of the wrong size (state, logits, output), or no tokens.
    Size,
    /// A token id past the model's embedding.
    Range,
    /// Anything else: a file, a model, a tokenizer, a non-finite value, a bad `--forget` string.
    Failed,
}

/// An error: its kind and the CLI's one-line message.
#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Error {
        Error { kind: Kind::Failed, message: format!("{e:#}").replace('\n', " ") }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(kind: Kind, message: String) -> Result<T> {
    Err(Error { kind, message })
}

/// Tokens per forward call unless [`Handle::set_chunk`] says otherwise (the `logits` command's default).
pub const DEFAULT_CHUNK: usize = 256;

/// A loaded model, its tokenizer (when it has one) and the call settings.
pub struct Handle {
    model: RwLock<Settings>,
    tok: std::result::Result<Tokenizer, String>,
    family: String,
}

struct Settings {
    model: Model,
    chunk: usize,
}

/// A model's facts, for the C ABI's `StuffedInfo` and Python's `Model.info`.
#[derive(Clone, Debug)]
pub struct Facts {
    pub family: String,
    pub d_model: usize,
    pub n_layer: usize,
    /// Rows of the embedding and head (padded).
    pub vocab_rows: usize,
    /// Ids that can win a decode or enter a softmax (the tokenizer's size, the config's vocab).
    pub real_vocab: usize,
    /// Floats of the recurrent state under the current forgetting method.
    pub state_len: usize,
    /// N_S as SPEC.md §1 counts it.
    pub paper_state_size: usize,
}

impl Handle {
    /// Opens what `stuffed --model PATH` opens: a directory, a checkpoint file, or `owner/name[@rev]`
    /// in the local Hugging Face cache.
    pub fn open(path: &Path) -> Result<Handle> {
        Handle::open_with_state(path, None)
    }

    /// [`Handle::open`] with an RWKV state-tuning file beside the model (`--state-file`): every
    /// stream starts from its states ([`Handle::initial_state`]).
    pub fn open_with_state(path: &Path, state_file: Option<&Path>) -> Result<Handle> {
        let model = Model::open(path, state_file)?;
        let tok = model.tokenizer(None).map_err(|e| format!("{e:#}"));
        let family = model.info.family.name().to_string();
        Ok(Handle { model: RwLock::new(Settings { model, chunk: DEFAULT_CHUNK }), tok, family })
    }

    fn settings(&self) -> std::sync::RwLockReadGuard<'_, Settings> {
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The model's family name (`mamba2`, `rwkv7`, …).
    pub fn family(&self) -> &str {
        &self.family
    }

    /// The model's facts (`stuffed info`'s), JSON as `info --json` writes them.
    pub fn info_json(&self) -> String {
        serde_json::to_string(&self.settings().model.info).unwrap_or_default()
    }

    pub fn facts(&self) -> Facts {
        let s = self.settings();
        let m = &s.model;
        Facts {
            family: self.family.clone(),
            d_model: m.info.d_model,
            n_layer: m.info.n_layer,
            vocab_rows: m.info.vocab_rows,
            real_vocab: self.real(m),
            state_len: m.net().state_len(),
            paper_state_size: m.info.paper_state_size,
        }
    }

    fn real(&self, m: &Model) -> usize {
        match &self.tok {
            Ok(t) => m.real_vocab(t),
            Err(_) => m.info.config_vocab.map_or(m.info.vocab_rows, |c| c.min(m.info.vocab_rows)),
        }
    }

    /// Floats of a state (they change with [`Handle::set_forget`]: a window caches inputs).
    pub fn state_len(&self) -> usize {
        self.settings().model.net().state_len()
    }

    /// Writes the state a stream starts from into `state` ([`Handle::state_len`] floats): zeros, or a
    /// state-tuned RWKV's own (`att.time_state`).
    pub fn initial_state(&self, state: &mut [f32]) -> Result<()> {
        let s = self.settings();
        let want = s.model.net().state_len();
        if state.len() != want {
            return err(Kind::Size, format!("state: {} floats given, the model's state has {want}", state.len()));
        }
        s.model.net().initial_state(state);
        Ok(())
    }

    /// Sets the forgetting method by the CLI's `--forget` string (`rri:a=0.9999,b=0.75`, …; a
    /// state-norm without `calib=` takes the model's recorded training length, as `ppl` does).
    pub fn set_forget(&self, spec: &str) -> Result<()> {
        let mut s = self.model.write().unwrap_or_else(|p| p.into_inner());
        let f = ForgetSpec::parse(spec)?;
        let train = crate::eval::ppl::recorded_train_len(&crate::model::dir_of(&s.model.info.path));
        let f = f.resolved(train)?;
        s.model.set_forget(f)?;
        Ok(())
    }

    /// Tokens per forward call (1: the token-by-token recurrence, as `logits --chunk 1`).
    pub fn set_chunk(&self, chunk: usize) -> Result<()> {
        if chunk == 0 {
            return err(Kind::Size, "chunk must be positive (1 runs token by token)".into());
        }
        crate::session::check_chunk_len(chunk)?;
        self.model.write().unwrap_or_else(|p| p.into_inner()).chunk = chunk;
        Ok(())
    }

    pub fn chunk(&self) -> usize {
        self.settings().chunk
    }

    /// Checks a caller's state and ids, then runs `f` on a session holding a copy of the state,
    /// which is written back when `f` succeeds (a failed call leaves the caller's state as it was).
    fn with_session<T>(
        &self,
        state: &mut [f32],
        tokens: &[u32],
        whole_chunk: bool,
        f: impl FnOnce(&mut Session, &Model, usize) -> Result<T>,
    ) -> Result<T> {
        let s = self.settings();
        let m = &s.model;
        let want = m.net().state_len();
        if state.len() != want {
            return err(Kind::Size, format!("state: {} floats given, the model's state has {want}", state.len()));
        }
        if tokens.is_empty() {
            return err(Kind::Size, "tokens: none given".into());
        }
        if let Err(e) = m.check_ids(tokens, "tokens") {
            return err(Kind::Range, format!("{e:#}"));
        }
        if matches!(m.forget, ForgetSpec::Reset { .. } | ForgetSpec::StateNorm { .. }) {
            return err(
                Kind::Failed,
                format!(
                    "--forget {}: acts between calls at stream positions the state does not hold; a caller's \
                     state takes none, rri, rri-both, dt, window, staggered (a whole stream's nll takes every method)",
                    m.forget
                ),
            );
        }
        // As the commands size it: `logits` calls of min(chunk, n) tokens (1: the recurrence),
        // `generate` a session of the whole chunk.
        let chunk = if whole_chunk { s.chunk } else { s.chunk.min(tokens.len()) };
        let mut session = Session::new(m, chunk);
        session.state.copy_from_slice(state);
        let out = f(&mut session, m, self.real(m))?;
        state.copy_from_slice(&session.state);
        Ok(out)
    }

    /// Feeds `tokens` from `state` (updated), writing the logits `(n, vocab_rows)` of every position
    /// into `logits` (`all`), or only the last position's `(vocab_rows)`.
    pub fn forward(&self, state: &mut [f32], tokens: &[u32], logits: &mut [f32], all: bool) -> Result<()> {
        let v = self.facts().vocab_rows;
        let want = if all { tokens.len() * v } else { v };
        if logits.len() != want {
            return err(
                Kind::Size,
                format!(
                    "logits: {} floats given, {} tokens need {want}",
                    logits.len(),
                    if all { tokens.len() } else { 1 }
                ),
            );
        }
        self.with_session(state, tokens, false, |s, m, _| {
            let d = m.net().d_model();
            let ex = crate::exec::Pool::new();
            let mut last = vec![0f32; d];
            let mut rows = vec![0f32; if all { s.chunk * v } else { 0 }];
            s.feed(tokens, &mut |off, h| {
                let t = h.len() / d;
                if all {
                    ex.run(|| m.net().logits(&ex, h, t, &mut rows[..t * v]))?;
                    crate::session::check_logits(m, &rows[..t * v], off as u64)?;
                    logits[off * v..(off + t) * v].copy_from_slice(&rows[..t * v]);
                }
                last.copy_from_slice(&h[h.len() - d..]);
                Ok(())
            })?;
            if !all {
                s.logits(&last, 1, logits)?;
            }
            Ok(())
        })
    }

    /// Feeds `tokens` from `state` (updated), writing into `nll[i]` the NLL of `targets[i]` after
    /// `tokens[..=i]` (log-softmax over the real vocab, the `ppl` command's head).
    pub fn nll(&self, state: &mut [f32], tokens: &[u32], targets: &[u32], nll: &mut [f32]) -> Result<()> {
        if targets.len() != tokens.len() || nll.len() != tokens.len() {
            return err(
                Kind::Size,
                format!("targets and nll: {} and {} given for {} tokens", targets.len(), nll.len(), tokens.len()),
            );
        }
        let real = self.facts().real_vocab;
        if let Some((i, &t)) = targets.iter().enumerate().find(|(_, &t)| t as usize >= real) {
            return err(
                Kind::Range,
                format!("targets: token id {t} at position {i} is outside the real vocab ({real} ids)"),
            );
        }
        self.with_session(state, tokens, false, |s, m, real| {
            let d = m.net().d_model();
            let mut head = crate::backend::NllHead::new(m, real);
            s.feed(tokens, &mut |off, h| {
                let t = h.len() / d;
                head.nll(h, &targets[off..off + t], &mut nll[off..off + t], off as u64)
            })?;
            Ok(())
        })
    }

    /// Greedy decoding: feeds `prompt` from `state`, then picks up to `max_new` tokens, each handed
    /// to `each` (which returns whether to go on), as `stuffed generate` does. The state ends past
    /// the prompt and every accepted token but the last.
    pub fn greedy(
        &self,
        state: &mut [f32],
        prompt: &[u32],
        max_new: usize,
        each: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        self.with_session(state, prompt, true, |s, m, real| {
            let d = m.net().d_model();
            let mut last = vec![0f32; d];
            s.feed(prompt, &mut |_, h| {
                last.copy_from_slice(&h[h.len() - d..]);
                Ok(())
            })?;
            s.greedy_each(&last, max_new, real, &mut |t| Ok(each(t)))?;
            Ok(())
        })
    }

    /// Per-position NLL of a whole stream from the zero state, as `ppl --nll-out` writes it: `nll[i]`
    /// is that of `tokens[i + 1]`, computed in calls of the handle's chunk through the same scorer
    /// (every `--forget` method applies, the state-level ones included). `nll` holds `n − 1` floats.
    pub fn nll_stream(&self, tokens: &[u32], chunk: usize, nll: &mut [f32]) -> Result<()> {
        let s = self.settings();
        let m = &s.model;
        if tokens.len() < 2 || nll.len() != tokens.len() - 1 {
            return err(
                Kind::Size,
                format!(
                    "nll: {} floats given for {} tokens (give at least 2 tokens and n − 1 floats)",
                    nll.len(),
                    tokens.len()
                ),
            );
        }
        if chunk == 0 {
            return err(Kind::Size, "chunk must be positive".into());
        }
        if let Err(e) = m.check_ids(tokens, "tokens") {
            return err(Kind::Range, format!("{e:#}"));
        }
        let real = self.real(m);
        let mut b = crate::backend::open(m, chunk, real, Device::Cpu, Default::default())?;
        let mut part = Vec::with_capacity(chunk + 1);
        let mut at = 0;
        for piece in tokens.chunks(chunk) {
            b.score(piece, &mut part)?;
            nll[at..at + part.len()].copy_from_slice(&part);
            at += part.len();
        }
        Ok(())
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tok.as_ref().map_err(|e| Error { kind: Kind::Failed, message: e.clone() })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer()?.encode(text)?)
    }

    /// The text of `ids`; an id past the tokenizer's vocab is a range error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let tok = self.tokenizer()?;
        let n = tok.vocab_size();
        if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= n) {
            return err(
                Kind::Range,
                format!("ids: token id {t} at position {i} is outside the tokenizer's vocab ({n} ids)"),
            );
        }
        Ok(tok.decode(ids)?)
    }

    /// The id of a token string (`<|endoftext|>`), when the tokenizer has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tok.as_ref().ok().and_then(|t| t.token_id(token))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_handle_is_send_and_sync() {
        fn both<T: Send + Sync>() {}
        both::<super::Handle>();
    }
}
