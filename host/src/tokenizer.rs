//! Tokenizers: GPT-NeoX-20B BPE (Mamba-2) and any tokenizer.json through the `tokenizers` crate;
//! the RWKV World vocab (RWKV-5/6) through [`crate::world`].
use crate::model::{Family, Vocab};
use crate::world::World;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: Inner,
    /// See [`Tokenizer::space_cuts`]; decided once, from the tokenizer.json.
    space_cuts: bool,
    /// Where it came from: a path, or "builtin:gpt-neox-20b".
    pub source: String,
}

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    World(Box<World>),
}

/// The longest added token a tokenizer.json may hold, in characters (real ones hold a few dozen).
pub const MAX_ADDED_TOKEN_CHARS: usize = 1024;

/// Runs `f`, turning a panic inside the `tokenizers` crate (or its regex engine) into one error line.
fn catch<T>(source: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        let msg = msg.unwrap_or_default().replace('\n', " ");
        Err(anyhow!("{source}: {what}: the tokenizers library panicked: {msg}"))
    })
}

impl Tokenizer {
    /// `explicit` (a tokenizer.json, or an RWKV World vocab `*.txt`), else for an RWKV model the
    /// shipped World vocab, else `<model dir>/tokenizer.json`, else (HGRN-2 needs its own: an
    /// error) the shipped GPT-NeoX-20B.
    pub fn for_model(model_dir: Option<&Path>, explicit: Option<&Path>) -> Result<Tokenizer> {
        if let Some(p) = explicit {
            return Self::from_file(p);
        }
        let family = model_dir.and_then(Family::of_dir);
        let vocab = family.map_or(Vocab::NeoxUnlessGiven, Family::vocab);
        if vocab == Vocab::World {
            return Self::world();
        }
        let candidate: Option<PathBuf> = model_dir.map(|d| d.join("tokenizer.json")).filter(|p| p.exists());
        match (candidate, vocab) {
            (Some(p), _) => Self::from_file(&p),
            (None, Vocab::OwnOnly) => bail!(
                "{}: no tokenizer.json in this {} model directory (its vocab is not shipped); put the \
                 checkpoint's tokenizer.json there or pass --tokenizer",
                model_dir.map_or(String::new(), |d| d.display().to_string()),
                family.map_or("", Family::title)
            ),
            // The GPT-NeoX-20B tokenizer, shipped inside the binary so a model dir without one works.
            (None, _) => Self::from_bytes(crate::asset!("20B_tokenizer.json")?, "builtin:gpt-neox-20b"),
        }
    }

    /// The shipped RWKV World tokenizer (rwkv_vocab_v20230424).
    pub fn world() -> Result<Tokenizer> {
        Ok(Tokenizer {
            inner: Inner::World(Box::new(World::builtin()?)),
            space_cuts: false,
            source: "builtin:rwkv_vocab_v20230424".into(),
        })
    }

    /// A tokenizer.json, or an RWKV World vocab file (`*.txt`).
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", path.display()))?;
        let source = path.display().to_string();
        if path.extension().is_some_and(|e| e == "txt") {
            let inner = Inner::World(Box::new(World::parse(&bytes, &source)?));
            return Ok(Tokenizer { inner, space_cuts: false, source });
        }
        Self::from_bytes(&bytes, &source)
    }

    /// True when a text may also be cut before a single space between two non-space characters:
    /// GPT-2-style byte-level BPE (the GPT-NeoX tokenizer), whose regex always starts a pre-token
    /// there, and no added token holds a space among other characters (runs of spaces are fine: a
    /// single space between non-spaces is not one). For texts without line breaks.
    pub fn space_cuts(&self) -> bool {
        self.space_cuts
    }

    /// True for the RWKV World tokenizer.
    pub fn is_world(&self) -> bool {
        matches!(self.inner, Inner::World(_))
    }

    /// For piecewise tokenization ([`crate::text`]): the World tokenizer's safe cut, a byte
    /// offset of `text` (which starts at a token boundary) such that tokenizing `text[..cut]` and
    /// then the rest gives the ids of the whole; `None` for other tokenizers (they use their own rule).
    pub fn world_cut(&self, text: &str) -> Option<usize> {
        match &self.inner {
            Inner::World(w) => Some(w.safe_cut(text)),
            Inner::Hf(_) => None,
        }
    }

    /// A tokenizer.json's bytes; `source` names it in errors. Added tokens longer than
    /// [`MAX_ADDED_TOKEN_CHARS`] are refused before the `tokenizers` crate sees them (it loads one
    /// in time quadratic in its length: 100,000 characters took 42 s), and a panic inside the crate
    /// becomes an error.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Tokenizer> {
        #[derive(serde::Deserialize)]
        struct Added {
            id: serde_json::Value,
            content: String,
        }
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(default)]
            added_tokens: Option<Vec<Added>>,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(|e| anyhow!("{source}: not a tokenizer.json: {e}"))?;
        for a in head.added_tokens.iter().flatten() {
            let n = a.content.chars().count();
            if n > MAX_ADDED_TOKEN_CHARS {
                bail!(
                    "{source}: added token {} is {n} characters long; stuffed refuses added tokens over \
                     {MAX_ADDED_TOKEN_CHARS} characters (loading one takes time quadratic in its length)",
                    a.id
                );
            }
        }
        let inner = catch(source, "cannot load", || {
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| anyhow!("{source}: not a tokenizer.json: {e}"))
        })?;
        use tokenizers::pre_tokenizers::PreTokenizerWrapper;
        let regex = matches!(inner.get_pre_tokenizer(), Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex);
        let added = inner.get_added_tokens_decoder();
        let space_cuts =
            regex && added.values().all(|a| a.content.trim().is_empty() || !a.content.contains(char::is_whitespace));
        Ok(Tokenizer { inner: Inner::Hf(Box::new(inner)), space_cuts, source: source.to_string() })
    }

    /// Ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let inner = match &self.inner {
            Inner::Hf(t) => t,
            Inner::World(w) => return w.encode(text),
        };
        let enc = catch(&self.source, "cannot encode", || {
            inner.encode(text, false).map_err(|e| anyhow!("{}: cannot encode: {e}", self.source))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text` and the byte offset each token starts at.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        let inner = match &self.inner {
            Inner::Hf(t) => t,
            Inner::World(w) => return w.encode_bytes(text.as_bytes()),
        };
        let enc = catch(&self.source, "cannot encode", || {
            inner.encode(text, false).map_err(|e| anyhow!("{}: cannot encode: {e}", self.source))
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().iter().map(|o| o.0).collect()))
    }

    /// The id of a token string (e.g. `<|endoftext|>`), if the vocab has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::World(w) => w.token_id(token),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let inner = match &self.inner {
            Inner::Hf(t) => t,
            Inner::World(w) => return w.decode(ids),
        };
        catch(&self.source, "cannot decode", || {
            inner.decode(ids, false).map_err(|e| anyhow!("{}: cannot decode: {e}", self.source))
        })
    }

    /// Ids the tokenizer can produce (added tokens included): rows past it are padding.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::World(w) => w.vocab_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped tiny models' tokenizer.json with one more added token of `n` characters.
    fn with_added(n: usize) -> Vec<u8> {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mamba2-tiny-l4-t64-a3-4m/tokenizer.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        let added = serde_json::json!({"id": 9000, "content": "x".repeat(n), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": true, "special": false});
        v["added_tokens"].as_array_mut().unwrap().push(added);
        serde_json::to_vec(&v).unwrap()
    }

    /// A 100,000-character added token took 42 s to load (quadratic in the crate); it is refused
    /// with one line before the crate sees it, and one of the limit's length still loads.
    #[test]
    fn long_added_tokens_are_refused() {
        let e = format!("{:#}", Tokenizer::from_bytes(&with_added(100_000), "t.json").err().expect("must fail"));
        assert!(e.starts_with("t.json: added token 9000 is 100000 characters long"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let t = Tokenizer::from_bytes(&with_added(MAX_ADDED_TOKEN_CHARS), "t.json").unwrap();
        assert!(t.token_id(&"x".repeat(MAX_ADDED_TOKEN_CHARS)).is_some());
    }
}
