//! What a passkey prompt is: the templates (the paper's, its released code's, llama.cpp's), the
//! seeded keys, the needle's block at each depth, the prompt text and its ids, and what counts as
//! retrieved. The grid's scheduler and files are in `passkey.rs`.
use super::Options;
use crate::rng::SplitMix64;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TemplateName {
    /// The paper's released code (default; compares with its numbers).
    Code,
    /// The paper's appendix B.1: blocks separated by blank lines.
    Paper,
    /// llama.cpp's passkey example.
    Llamacpp,
}

/// The strings of a prompt; `{key}` in the needle is replaced by the key.
pub struct Template {
    pub prefix: &'static str,
    pub noise: &'static str,
    pub needle: &'static str,
    pub suffix: &'static str,
    /// JRT-Prompt (`--jrt`): the context (the blocks, the needle among them) twice, a newline
    /// between (their `out + "\n" + out + " " + question`).
    pub repeat: bool,
}

pub fn template(t: TemplateName) -> Template {
    match t {
        TemplateName::Code => Template {
            prefix: "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n",
            noise: "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n",
            needle: "The passkey is {key}. Remember it. {key} is the passkey.\n",
            suffix: "\nWhat is the pass key? The passkey is",
            repeat: false,
        },
        TemplateName::Paper => Template {
            prefix: "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n",
            noise: "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n\n",
            needle: "The passkey is {key}. Remember it. {key} is the passkey.\n\n",
            suffix: "What is the passkey? The passkey is",
            repeat: false,
        },
        TemplateName::Llamacpp => Template {
            prefix: "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.",
            noise: " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
            needle: " The pass key is {key}. Remember it. {key} is the pass key.",
            suffix: " What is the pass key? The pass key is",
            repeat: false,
        },
    }
}

/// The template a grid runs: `o.template`, its question preceded under `--oprm-idk WORD` by OPRM's
/// instruction to answer WORD when the key is not in the text (the paper's code asks for
/// "Error" the same way), after the question's leading whitespace and followed by it.
pub fn template_for(o: &Options) -> Template {
    let mut t = template(o.template);
    t.repeat = o.jrt;
    if let Some(word) = o.oprm.as_ref().and_then(|x| x.idk.as_deref()) {
        t.suffix = idk_suffix(t.suffix, word);
    }
    t
}

/// `suffix` with the IDK instruction for `word` inserted (kept once per program: a template's
/// strings are `'static`).
pub fn idk_suffix(suffix: &str, word: &str) -> &'static str {
    static MADE: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let rest = suffix.trim_start();
    let lead = &suffix[..suffix.len() - rest.len()];
    let sep = if lead.is_empty() { " " } else { lead };
    let text = format!("{lead}If the pass key is not in the text above, answer \"{word}\".{sep}{rest}");
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    match made.iter().find(|m| **m == text) {
        Some(m) => m,
        None => {
            let m: &'static str = Box::leak(text.into_boxed_str());
            made.push(m);
            m
        }
    }
}

/// A seeded 5-digit key for (seed, length, sample), independent of sharding and order.
pub fn key(seed: u64, length: u64, sample: usize) -> String {
    let z = seed ^ length.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (sample as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    // Two SplitMix64 rounds, each reseeded with the last output.
    let z = SplitMix64::new(SplitMix64::new(z).next_u64()).next_u64();
    format!("{:05}", z % 100_000)
}

/// The depths of a length's samples.
pub(super) fn depths(o: &Options) -> Vec<f64> {
    match &o.depths {
        Some(d) => d.clone(),
        None => (0..o.samples).map(|i| (i as f64 + 0.5) / o.samples as f64).collect(),
    }
}

/// One sample's prompt before tokenization.
pub(super) struct Prompt {
    pub(super) sample: usize,
    pub(super) depth: f64,
    pub(super) needle_block: usize,
    pub(super) num_blocks: usize,
    pub(super) key: String,
}

/// A prompt's ids and where its parts fall among them.
pub(super) struct PromptIds {
    pub(super) ids: Vec<u32>,
    /// The tokens that hold each copy of the needle (from the first token that starts at or after
    /// its first byte to the first that starts at or after its end); two under JRT.
    pub(super) needles: Vec<std::ops::Range<usize>>,
    /// The question's first token (the first that starts at or after the suffix).
    pub(super) question: usize,
}

impl Prompt {
    /// The prompt's ids (tokenized as one text, in pieces), the needle's and the question's tokens,
    /// with `<|endoftext|>` first when `bos` is given. Built when needed, one prompt at a time.
    pub(super) fn ids(&self, tok: &Tokenizer, tpl: &Template, bos: Option<u32>) -> Result<PromptIds> {
        let (text, needles) = prompt_needles(tpl, self.num_blocks, self.needle_block, &self.key);
        let len = tpl.needle.replace("{key}", &self.key).len();
        let mut marks: Vec<usize> = needles.iter().flat_map(|&n| [n, n + len]).collect();
        marks.push(text.len() - tpl.suffix.len());
        let (ids, at) = crate::text::encode_long_marks(tok, &text, &marks)?;
        let (ids, b) = match bos {
            Some(b) => ([&[b][..], &ids].concat(), 1),
            None => (ids, 0),
        };
        let needles = at.chunks_exact(2).map(|r| r[0] + b..r[1] + b).collect();
        Ok(PromptIds { ids, needles, question: at[at.len() - 1] + b })
    }
}

/// A prompt as OPRM runs it: its prefix, its context (the blocks, the needle among them) and its
/// question, each tokenized alone (as the OPRM paper's code encodes the parts of its prompts), and
/// the needle's tokens in the context.
pub(super) struct Parts {
    /// `<|endoftext|>` with `--bos`, then the template's prefix.
    pub(super) prefix: Vec<u32>,
    pub(super) context: Vec<u32>,
    /// The tokens of the context that hold the needle (from the first token that starts at or
    /// after its first byte to the first that starts at or after its end).
    pub(super) needle: std::ops::Range<usize>,
    pub(super) question: Vec<u32>,
}

impl Prompt {
    /// The prompt in its three parts (OPRM).
    pub(super) fn parts(&self, tok: &Tokenizer, tpl: &Template, bos: Option<u32>) -> Result<Parts> {
        let (text, needle_byte) = prompt_text(tpl, self.num_blocks, self.needle_block, &self.key);
        let (start, end) = (tpl.prefix.len(), text.len() - tpl.suffix.len());
        let needle_end = needle_byte + tpl.needle.replace("{key}", &self.key).len();
        let marks = [needle_byte - start, needle_end - start];
        let (context, at) = crate::text::encode_long_marks(tok, &text[start..end], &marks)?;
        let prefix = [bos.as_slice(), &tok.encode(tpl.prefix)?].concat();
        Ok(Parts { prefix, context, needle: at[0]..at[1], question: tok.encode(tpl.suffix)? })
    }
}

/// `⌊(T − |prefix| − |suffix|) / |noise|⌋`, each part tokenized alone (the paper's code).
pub fn num_blocks(tok: &Tokenizer, tpl: &Template, length: u64) -> Result<usize> {
    let len = |s: &str| tok.encode(s).map(|v| v.len() as u64);
    let (p, n, s) = (len(tpl.prefix)?, len(tpl.noise)?, len(tpl.suffix)?);
    let nb = length.saturating_sub(p + s) / n.max(1);
    if nb < 1 {
        bail!("length {length} is too short for the template ({p} + {s} tokens around {n}-token blocks)");
    }
    Ok(nb as usize)
}

/// The prompt text with the needle replacing block `block` of `nb`, and the needle's byte offset
/// (its first copy's under JRT).
pub fn prompt_text(tpl: &Template, nb: usize, block: usize, key: &str) -> (String, usize) {
    let (text, needles) = prompt_needles(tpl, nb, block, key);
    (text, needles[0])
}

/// [`prompt_text`] with the byte offset of each copy of the needle (two under JRT).
pub fn prompt_needles(tpl: &Template, nb: usize, block: usize, key: &str) -> (String, Vec<usize>) {
    let needle = tpl.needle.replace("{key}", key);
    let copies = if tpl.repeat { 2 } else { 1 };
    let mut text =
        String::with_capacity(tpl.prefix.len() + copies * (tpl.noise.len() * nb + 1) + tpl.suffix.len() + 64);
    text.push_str(tpl.prefix);
    let mut needles = Vec::with_capacity(copies);
    for copy in 0..copies {
        if copy > 0 {
            text.push('\n');
        }
        for _ in 0..block {
            text.push_str(tpl.noise);
        }
        needles.push(text.len());
        text.push_str(&needle);
        for _ in block + 1..nb {
            text.push_str(tpl.noise);
        }
    }
    text.push_str(tpl.suffix);
    (text, needles)
}

/// The needle block of depth `d`: `⌊d·(nb − 1)⌋`.
pub fn needle_block(d: f64, nb: usize) -> usize {
    ((d * (nb - 1) as f64).floor() as usize).min(nb - 1)
}

/// Correct iff the key is a substring of the decoded continuation (strings, never ids: digits split
/// into tokens differently by tokenizer and context).
pub fn is_correct(tok: &Tokenizer, new: &[u32], key: &str) -> Result<(String, bool)> {
    let text = tok.decode(new)?;
    let ok = text.contains(key);
    Ok((text, ok))
}

pub(super) fn prompts(tok: &Tokenizer, tpl: &Template, o: &Options, length: u64) -> Result<Vec<Prompt>> {
    let nb = num_blocks(tok, tpl, length)?;
    Ok(depths(o)
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let block = needle_block(d, nb);
            let k = key(o.seed, length, i);
            Prompt { sample: i, depth: d, needle_block: block, num_blocks: nb, key: k }
        })
        .collect())
}

/// The tokens of ` {key}` as they follow the question: the question and key tokenized together,
/// less the question's own tokens (SentencePiece vocabularies would add a word start to the key
/// tokenized alone); the key alone only where the question's tokens change.
pub fn key_tokens(tok: &Tokenizer, tpl: &Template, key: &str) -> Result<Vec<u32>> {
    let q = tok.encode(tpl.suffix)?;
    let both = tok.encode(&format!("{} {key}", tpl.suffix))?;
    match both.strip_prefix(&q[..]) {
        Some(k) if !k.is_empty() => Ok(k.to_vec()),
        _ => tok.encode(&format!(" {key}")),
    }
}

/// The most ids a key of the grid takes after the question under `tok` (` 98349` is 6 in the shipped
/// passkey model's tokenizer, 2 in GPT-NeoX's): `--max-new`'s default is one more.
pub fn longest_key_ids(tok: &Tokenizer, o: &Options) -> Result<usize> {
    let tpl = template_for(o);
    let (mut seen, mut most) = (BTreeSet::new(), 0);
    for &length in &o.lengths {
        for i in 0..depths(o).len() {
            let k = key(o.seed, length, i);
            if seen.insert(k.clone()) {
                most = most.max(key_tokens(tok, &tpl, &k)?.len());
            }
        }
    }
    Ok(most)
}
