//! Inputs as token streams: text files tokenized piece by piece (memory does not grow with the
//! file), the newlines prompt, and repetition — each giving exactly the ids of tokenizing the whole
//! text at once.
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The most tokens a stream, a length, a window or a call may count: 2³² (a prompt's ids alone are
/// 16 GiB), so that sizes derived from them cannot overflow.
pub const MAX_TOKENS: u64 = 1 << 32;

/// A token count as the paper's code writes it: `5000`, `64k` = 65,536, `1m` = 1,048,576, `1.5k`;
/// a whole number from 1 to [`MAX_TOKENS`]. Every flag that counts tokens parses through it.
pub fn parse_count(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mul) = match t.strip_suffix('k') {
        Some(n) => (n, 1u64 << 10),
        None => t.strip_suffix('m').map_or((t.as_str(), 1), |n| (n, 1 << 20)),
    };
    let v = match num.parse::<f64>() {
        Ok(v) if v.is_finite() => v * mul as f64,
        _ => bail!("'{s}' is not a token count (e.g. 5000, 64k, 1m)"),
    };
    if v > MAX_TOKENS as f64 {
        bail!("'{s}' is longer than the {MAX_TOKENS} tokens (4G) a length may be");
    }
    if v < 1.0 || v.fract() != 0.0 {
        bail!("'{s}' is not a whole number of tokens from 1 up");
    }
    Ok(v as u64)
}

/// A `--chunk` (tokens per forward call): a [`parse_count`] (512, 1k; 1 runs token by token), so 0
/// is refused where it is typed rather than taken as 1 by one command and refused by another.
pub fn parse_chunk(s: &str) -> Result<usize> {
    Ok(usize::try_from(parse_count(s)?)?)
}

/// Bytes read from a file per step.
const BLOCK: usize = 1 << 16;

/// One document to score.
#[derive(Clone, Debug)]
pub enum Input {
    File(PathBuf),
    /// SPEC.md §2.3: `"\n" × 300,000` tokenized by the model's tokenizer (`literal`: 300,000 copies
    /// of the single newline token instead).
    Newlines {
        literal: bool,
    },
}

impl Input {
    pub fn name(&self) -> String {
        match self {
            Input::File(p) => p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into()),
            Input::Newlines { literal: false } => "newlines".into(),
            Input::Newlines { literal: true } => "newlines-token".into(),
        }
    }

    /// sha256 of the content (the file's bytes, or the generated text), hex.
    pub fn sha256(&self) -> Result<String> {
        let mut h = Sha256::new();
        match self {
            Input::File(p) => {
                let mut f = open(p)?;
                let mut buf = vec![0u8; BLOCK];
                loop {
                    let n = f.read(&mut buf).map_err(|e| anyhow!("{}: cannot read: {e}", p.display()))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            Input::Newlines { literal } => h.update(format!("newlines x300000 literal={literal}")),
        }
        Ok(format!("{:x}", h.finalize()))
    }
}

/// Opens a text; an empty regular file is an error (a wrong path or redirect, not a document).
fn open(p: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(p).map_err(|e| anyhow!("{}: cannot open text: {e}", p.display()))?;
    if f.metadata().is_ok_and(|m| m.is_file() && m.len() == 0) {
        bail!("{}: empty text (0 bytes)", p.display());
    }
    Ok(f)
}

/// Where a text may be cut without changing its tokens: before a newline that follows a
/// non-whitespace character. For byte-level BPE with the GPT-2 split (GPT-NeoX) no pre-token crosses
/// such a point, no added token (runs of spaces) spans it and NFC cannot compose across it.
fn last_cut(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = bytes.len();
    while let Some(j) = bytes[..i].iter().rposition(|&b| b == b'\n') {
        if j > 0 && text[..j].chars().next_back().is_some_and(|c| !c.is_whitespace()) {
            return Some(j);
        }
        i = j;
    }
    None
}

/// Before the last single space between two non-whitespace characters of `text` (the one after
/// it inside `text`), for tokenizers that allow it ([`Tokenizer::space_cuts`]).
fn last_space_cut(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let nonspace = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace());
    (1..bytes.len().saturating_sub(1)).rev().find(|&j| {
        bytes[j] == b' ' && nonspace(text[..j].chars().next_back()) && nonspace(text[j + 1..].chars().next())
    })
}

/// Where `text`, which may go on, can be cut without changing its tokens: RWKV World's settled
/// greedy match, else [`last_cut`] (before a line break), else, for GPT-NeoX-style tokenizers and a
/// text without line breaks, [`last_space_cut`].
fn safe_cut(tok: &Tokenizer, text: &str) -> Option<usize> {
    let space = || tok.space_cuts().then(|| last_space_cut(text)).flatten();
    tok.world_cut(text).or_else(|| last_cut(text)).or_else(space).filter(|&c| c > 0)
}

/// The longest piece tokenized at once when the text offers no safe cut (no line break, and no
/// space where the tokenizer allows cuts there): it is then cut by force at a char boundary, so the
/// tokenizer's working memory (hundreds of bytes per byte of a piece: 8 GB for a 50 MB line) stays
/// bounded for any text.
pub const MAX_PIECE: usize = 1 << 18;

/// Says once per process, on stderr, that a text was cut by force.
fn note_hard_cut(what: &str) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "stuffed: note: {what}: no line break (or space the tokenizer may be cut at) in {} KiB of text, so it \
             is cut there by force; ids near such cuts may differ from tokenizing the whole text at once",
            MAX_PIECE >> 10
        );
    }
}

/// A forced cut of `text` (longer than [`MAX_PIECE`]): before the last whitespace in its second
/// half, else at the char boundary at [`MAX_PIECE`].
fn hard_cut(text: &str) -> usize {
    let end = text.floor_char_boundary(MAX_PIECE.min(text.len()));
    let head = &text[..end];
    match head.rfind(char::is_whitespace) {
        Some(i) if i >= end / 2 => i,
        _ => end,
    }
}

/// Bytes of the text before a piece that the piece is tokenized after.
const CONTEXT: usize = 256;

/// The last [`CONTEXT`] bytes (or fewer, at a char boundary) of `ctx` followed by `piece`.
fn context_after(ctx: &str, piece: &str) -> String {
    let both = [ctx, piece].concat();
    both[both.ceil_char_boundary(both.len().saturating_sub(CONTEXT))..].to_string()
}

/// The ids of `piece` as they stand after `ctx` in one text, and the byte offset in `piece` the
/// tokenizer gives each: `ctx + piece` tokenized together, less the ids of `ctx` alone (which must
/// lead them, else a token spans the cut), so a tokenizer that marks the start of its input (Llama's
/// "▁" normalizer or Metaspace pre-tokenizer, HGRN-2's kind) marks the context, not the cut. RWKV
/// World's greedy match is settled at the cut and takes the piece alone.
///
/// `forced`: `ctx` ends at a forced cut ([`hard_cut`]), where a token may span it; the piece is then
/// tokenized alone when it does.
fn encode_after(tok: &Tokenizer, ctx: &str, piece: &str, forced: bool) -> Result<(Vec<u32>, Vec<usize>)> {
    if ctx.is_empty() || tok.is_world() {
        return tok.encode_with_offsets(piece);
    }
    let lead = tok.encode(ctx)?;
    let (ids, offsets) = tok.encode_with_offsets(&[ctx, piece].concat())?;
    if !ids.starts_with(&lead) {
        if forced {
            return tok.encode_with_offsets(piece);
        }
        bail!("{}: a token spans a cut, so this tokenizer cannot tokenize a text in pieces", tok.source);
    }
    let n = lead.len();
    Ok((ids[n..].to_vec(), offsets[n..].iter().map(|o| o.saturating_sub(ctx.len())).collect()))
}

/// Ids of a long in-memory `text` (a passkey prompt), tokenized in pieces of about 64 KiB cut where
/// no token can span the cut (as [`TokenStream`] cuts a file), so they equal tokenizing it at once
/// without the tokenizer's working memory for the whole text (hundreds of bytes per token); also the
/// index of the first token that starts at or after byte `mark` (the text's token count when none
/// does).
pub fn encode_long(tok: &Tokenizer, text: &str, mark: usize) -> Result<(Vec<u32>, usize)> {
    let (ids, at) = encode_long_marks(tok, text, &[mark])?;
    Ok((ids, at[0]))
}

/// [`encode_long`] with pieces of about `block` bytes (small blocks make many cuts: for tests).
pub fn encode_long_in(tok: &Tokenizer, text: &str, mark: usize, block: usize) -> Result<(Vec<u32>, usize)> {
    let (ids, at) = encode_long_marks_in(tok, text, &[mark], block)?;
    Ok((ids, at[0]))
}

/// [`encode_long`] with several marks: for each, the index of the first token that starts at or
/// after it (the token count when none does).
pub fn encode_long_marks(tok: &Tokenizer, text: &str, marks: &[usize]) -> Result<(Vec<u32>, Vec<usize>)> {
    encode_long_marks_in(tok, text, marks, BLOCK)
}

/// [`encode_long_marks`] with pieces of about `block` bytes.
fn encode_long_marks_in(tok: &Tokenizer, text: &str, marks: &[usize], block: usize) -> Result<(Vec<u32>, Vec<usize>)> {
    let mut ids = Vec::new();
    let mut at: Vec<Option<usize>> = vec![None; marks.len()];
    let (mut start, mut forced) = (0, false);
    while start < text.len() {
        // Widen the window until it holds a cut (or reaches the end, or MAX_PIECE: a forced cut).
        let mut end = start;
        let (len, hard) = loop {
            end = text.floor_char_boundary((end + block.max(4)).min(text.len()));
            if end == text.len() {
                break (end - start, false);
            }
            if let Some(c) = safe_cut(tok, &text[start..end]) {
                break (c, false);
            }
            if end - start >= MAX_PIECE {
                note_hard_cut("a prompt");
                break (hard_cut(&text[start..end]), true);
            }
        };
        let ctx = &text[text.ceil_char_boundary(start.saturating_sub(CONTEXT))..start];
        let (p_ids, offsets) = encode_after(tok, ctx, &text[start..start + len], forced)?;
        forced = hard;
        for (a, &mark) in at.iter_mut().zip(marks) {
            if a.is_none() && mark < start + len {
                *a = offsets.iter().position(|&o| start + o >= mark).map(|i| ids.len() + i);
            }
        }
        ids.extend(p_ids);
        start += len;
    }
    let at = at.into_iter().map(|a| a.unwrap_or(ids.len())).collect();
    Ok((ids, at))
}

/// Token ids of one input, produced in pieces.
pub struct TokenStream<'t> {
    tok: &'t Tokenizer,
    input: Input,
    file: Option<std::fs::File>,
    /// Bytes read but not yet tokenized (they end after the last safe cut).
    carry: Vec<u8>,
    /// The end of the text already tokenized, which the next piece is tokenized after.
    ctx: String,
    done: bool,
    block: usize,
    /// `ctx` ends at a forced cut.
    forced: bool,
}

impl<'t> TokenStream<'t> {
    pub fn new(tok: &'t Tokenizer, input: &Input) -> Result<Self> {
        Self::with_block(tok, input, BLOCK)
    }

    /// Reads `block` bytes at a time (small blocks make many cuts: for tests).
    pub fn with_block(tok: &'t Tokenizer, input: &Input, block: usize) -> Result<Self> {
        let file = match input {
            Input::File(p) => Some(open(p)?),
            Input::Newlines { .. } => None,
        };
        Ok(TokenStream {
            tok,
            input: input.clone(),
            file,
            carry: Vec::new(),
            ctx: String::new(),
            done: false,
            block: block.max(1),
            forced: false,
        })
    }

    /// The next piece of ids, or `None` at the end.
    pub fn next_piece(&mut self) -> Result<Option<Vec<u32>>> {
        if self.done {
            return Ok(None);
        }
        if let Input::Newlines { literal } = self.input {
            self.done = true;
            return Ok(Some(if literal {
                let nl = self.tok.encode("\n")?;
                if nl.len() != 1 {
                    bail!("{}: a newline is {} tokens, not one", self.tok.source, nl.len());
                }
                vec![nl[0]; 300_000]
            } else {
                self.tok.encode(&"\n".repeat(300_000))?
            }));
        }
        let (Some(f), Input::File(path)) = (self.file.as_mut(), &self.input) else {
            return Ok(None);
        };
        loop {
            let old = self.carry.len();
            self.carry.resize(old + self.block, 0);
            let n = f.read(&mut self.carry[old..]).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
            self.carry.truncate(old + n);
            let eof = n == 0;
            // Longest valid UTF-8 prefix; an invalid byte (not a cut multi-byte char) is an error.
            let valid = match std::str::from_utf8(&self.carry) {
                Ok(s) => s.len(),
                Err(e) if e.error_len().is_none() && !eof => e.valid_up_to(),
                Err(e) => bail!("{}: not UTF-8 text (invalid byte near offset {})", path.display(), e.valid_up_to()),
            };
            let text = std::str::from_utf8(&self.carry[..valid]).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            let mut cut = if eof { Some(text.len()) } else { safe_cut(self.tok, text) };
            let hard = cut.is_none_or(|c| c == 0) && text.len() >= MAX_PIECE;
            if hard {
                note_hard_cut(&path.display().to_string());
                cut = Some(hard_cut(text));
            }
            if let Some(cut) = cut.filter(|&c| c > 0) {
                let (ids, _) = encode_after(self.tok, &self.ctx, &text[..cut], self.forced)?;
                self.forced = hard;
                self.ctx = context_after(&self.ctx, &text[..cut]);
                self.carry.drain(..cut);
                self.done = eof;
                return Ok(Some(ids));
            }
            if eof {
                self.done = true;
                return Ok(None);
            }
        }
    }

    /// All ids (for tests and small inputs).
    pub fn collect_all(mut self) -> Result<Vec<u32>> {
        let mut all = Vec::new();
        while let Some(p) = self.next_piece()? {
            all.extend(p);
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_parse_as_the_paper_counts() {
        let ok = |s: &str| parse_count(s).unwrap();
        assert_eq!(
            (ok("1m"), ok("64k"), ok("5000"), ok("1.5K"), ok(" 2M "), ok("0.5k")),
            (1 << 20, 65536, 5000, 1536, 2 << 20, 512)
        );
        assert_eq!(ok("4096m"), MAX_TOKENS);
        for bad in ["lots", "0", "-3", "1.5", "0.0001k", "nan", "inf", "", "k"] {
            assert!(parse_count(bad).is_err(), "{bad:?} parsed");
        }
        assert!(format!("{}", parse_count("4097m").unwrap_err()).contains("longer than"));
    }

    #[test]
    fn cuts_only_after_non_whitespace() {
        assert_eq!(last_cut("ab\n\ncd\n"), Some(6));
        assert_eq!(last_cut("ab\n\n"), Some(2));
        assert_eq!(last_cut("\n\n\n"), None);
        assert_eq!(last_cut("a \n"), None);
        assert_eq!(last_cut("x\u{3000}\n"), None);
    }
}
