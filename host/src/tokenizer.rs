//! Tokenizers: GPT-NeoX-20B BPE (Mamba-2) through the `tokenizers` crate.
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};

/// The GPT-NeoX-20B tokenizer, shipped inside the binary so a model dir without one still works.
const NEOX: &[u8] = include_bytes!("../assets/20B_tokenizer.json");

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from: a path, or "builtin:gpt-neox-20b".
    pub source: String,
}

impl Tokenizer {
    /// `explicit`, else `<model dir>/tokenizer.json`, else the shipped GPT-NeoX-20B.
    pub fn for_model(model_dir: Option<&Path>, explicit: Option<&Path>) -> Result<Tokenizer> {
        let candidate: Option<PathBuf> = explicit
            .map(Path::to_path_buf)
            .or_else(|| model_dir.map(|d| d.join("tokenizer.json")).filter(|p| p.exists()));
        match candidate {
            Some(p) => Self::from_file(&p),
            None => Self::from_bytes(NEOX, "builtin:gpt-neox-20b"),
        }
    }

    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    fn from_bytes(bytes: &[u8], source: &str) -> Result<Tokenizer> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| anyhow!("{source}: not a tokenizer.json: {e}"))?;
        Ok(Tokenizer { inner, source: source.to_string() })
    }

    /// Ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("{}: cannot encode: {e}", self.source))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text` and the byte offset each token starts at.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("{}: cannot encode: {e}", self.source))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().iter().map(|o| o.0).collect()))
    }

    /// The id of a token string (e.g. `<|endoftext|>`), if the vocab has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("{}: cannot decode: {e}", self.source))
    }

    /// Ids the tokenizer can produce (added tokens included): rows past it are padding.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
