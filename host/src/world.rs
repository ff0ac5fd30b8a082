//! The RWKV World tokenizer (RWKV-5/6): a vocab of byte strings, greedy longest match over the
//! UTF-8 bytes of the text (a trie), decode = the tokens' bytes concatenated. FORMATS.md §5.2.
//!
//! Vocab file: one line per id, `<id> <python literal> <byte length>`, LF or CRLF. The literal is
//! `'…'`, `"…"` or `b'…'`; it is found by splitting at the first and the last space (literals may
//! hold spaces). In a str literal `\xNN` is the code point U+00NN (UTF-8 encoded); in a bytes
//! literal it is a raw byte. Id 0 (end of text) is not in the file and decodes to nothing.
use anyhow::{anyhow, bail, Result};

/// The vocab `rwkv_vocab_v20230424.txt` (65,529 tokens), shipped inside the binary (a lean build
/// reads it from its source tree: [`crate::asset!`]).
pub fn vocab_v20230424() -> Result<&'static [u8]> {
    crate::asset!("rwkv_vocab_v20230424.txt")
}

/// The longest token the greedy match may need to look ahead over (bytes).
pub const MAX_TOKEN_BYTES: usize = 128;

pub struct World {
    /// Token bytes by id (id 0 = end of text, empty).
    tokens: Vec<Vec<u8>>,
    /// Trie nodes: `(first child, child count)` into `edges`, and the id ending here (0 = none).
    nodes: Vec<Node>,
    /// Children of every node, sorted by byte within a node: `(byte, node index)`.
    edges: Vec<(u8, u32)>,
    /// Direct child of the root for each first byte (0 = none).
    root: [u32; 256],
}

#[derive(Clone, Copy, Default)]
struct Node {
    first: u32,
    count: u32,
    id: u32,
}

impl World {
    /// The shipped v20230424 vocab.
    pub fn builtin() -> Result<World> {
        Self::parse(vocab_v20230424()?, "builtin:rwkv_vocab_v20230424")
    }

    /// Parses a vocab file's bytes; `source` names it in errors.
    pub fn parse(bytes: &[u8], source: &str) -> Result<World> {
        let text = std::str::from_utf8(bytes).map_err(|e| anyhow!("{source}: vocab is not UTF-8: {e}"))?;
        // A vocab lists ids 1, 2, … one a line: an id past the file's line count cannot be one (and
        // would size the table by a number the file does not back: 2^64 − 1 ids, or 10^8 × 24 bytes).
        let max_id = text.lines().count();
        let mut tokens: Vec<Vec<u8>> = vec![Vec::new()];
        for (n, line) in text.lines().enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let bad = |what: &str| anyhow!("{source}: line {}: {what}", n + 1);
            let (Some(a), Some(b)) = (line.find(' '), line.rfind(' ')) else {
                bail!(bad("expected '<id> <literal> <length>'"));
            };
            if a >= b {
                bail!(bad("expected '<id> <literal> <length>'"));
            }
            let id: usize = line[..a].parse().map_err(|_| bad("bad id"))?;
            if id == 0 || id > max_id {
                bail!(bad(&format!("id {} is not in 1..={max_id} (ids count the file's {max_id} lines)", &line[..a])));
            }
            let len: usize = line[b + 1..].parse().map_err(|_| bad("bad byte length"))?;
            let tok = parse_literal(&line[a + 1..b]).map_err(|e| bad(&e))?;
            if tok.len() != len {
                bail!(bad(&format!("literal has {} bytes, the line says {len}", tok.len())));
            }
            if tok.is_empty() {
                bail!(bad("empty token"));
            }
            if id >= tokens.len() {
                tokens.resize(id + 1, Vec::new());
            }
            if !tokens[id].is_empty() {
                bail!(bad("duplicate id"));
            }
            tokens[id] = tok;
        }
        let mut w = World { tokens, nodes: vec![Node::default()], edges: Vec::new(), root: [0; 256] };
        w.build()?;
        Ok(w)
    }

    /// Builds the trie from the sorted token list (children stored contiguously per node).
    fn build(&mut self) -> Result<()> {
        let mut order: Vec<u32> =
            (1..self.tokens.len() as u32).filter(|&i| !self.tokens[i as usize].is_empty()).collect();
        order.sort_by(|&a, &b| self.tokens[a as usize].cmp(&self.tokens[b as usize]));
        // Insert in sorted order through a temporary map-based trie, then flatten.
        let mut kids: Vec<Vec<(u8, u32)>> = vec![Vec::new()];
        let mut ids: Vec<u32> = vec![0];
        for &id in &order {
            let mut node = 0usize;
            for &b in &self.tokens[id as usize] {
                let next = match kids[node].iter().find(|e| e.0 == b) {
                    Some(e) => e.1 as usize,
                    None => {
                        kids.push(Vec::new());
                        ids.push(0);
                        let n = kids.len() - 1;
                        kids[node].push((b, n as u32));
                        n
                    }
                };
                node = next;
            }
            if ids[node] != 0 {
                bail!("vocab: ids {} and {id} are the same bytes", ids[node]);
            }
            ids[node] = id;
        }
        self.nodes = Vec::with_capacity(kids.len());
        self.edges.clear();
        for (k, &id) in kids.iter_mut().zip(&ids) {
            k.sort_unstable();
            self.nodes.push(Node { first: self.edges.len() as u32, count: k.len() as u32, id });
            self.edges.extend_from_slice(k);
        }
        for &(b, n) in &kids[0] {
            self.root[b as usize] = n;
        }
        Ok(())
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        if node == 0 {
            let n = self.root[b as usize];
            return (n != 0).then_some(n as usize);
        }
        let nd = self.nodes[node];
        let e = &self.edges[nd.first as usize..(nd.first + nd.count) as usize];
        e.binary_search_by_key(&b, |x| x.0).ok().map(|i| e[i].1 as usize)
    }

    /// The longest token at the start of `bytes`: (id, length).
    fn longest(&self, bytes: &[u8]) -> Option<(u32, usize)> {
        let (mut node, mut best) = (0usize, None);
        for (i, &b) in bytes.iter().enumerate() {
            match self.child(node, b) {
                Some(n) => node = n,
                None => break,
            }
            let id = self.nodes[node].id;
            if id != 0 {
                best = Some((id, i + 1));
            }
        }
        best
    }

    /// Greedy longest-match ids of `bytes`, each with the byte offset it starts at.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<(Vec<u32>, Vec<usize>)> {
        let (mut ids, mut offs) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < bytes.len() {
            let Some((id, n)) = self.longest(&bytes[i..]) else {
                bail!("world tokenizer: no token for byte 0x{:02x}", bytes[i]);
            };
            ids.push(id);
            offs.push(i);
            i += n;
        }
        Ok((ids, offs))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_bytes(text.as_bytes())?.0)
    }

    /// The bytes of `ids` concatenated (an unknown id is an error).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            let t = self
                .tokens
                .get(id as usize)
                .filter(|t| !t.is_empty() || id == 0)
                .ok_or_else(|| anyhow!("world tokenizer: unknown token id {id}"))?;
            out.extend_from_slice(t);
        }
        Ok(out)
    }

    /// Decoded text; bytes that are not UTF-8 (a token may end mid-character) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// Ids 0..n (0 = end of text included).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token's exact bytes (`<|endoftext|>` names id 0).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        if token == "<|endoftext|>" {
            return Some(0);
        }
        self.longest(token.as_bytes()).filter(|&(_, n)| n == token.len()).map(|(id, _)| id)
    }

    /// The largest cut `c ≤ text.len()` (a char boundary, 0 if none) such that the ids of
    /// `text[..c]` followed by those of any continuation are the ids of the whole text: a token
    /// start whose greedy match is decided within `text` (at least [`MAX_TOKEN_BYTES`] bytes
    /// before its end). `text` must start at a token boundary.
    pub fn safe_cut(&self, text: &str) -> usize {
        let b = text.as_bytes();
        let mut i = 0;
        let mut cut = 0;
        while i + MAX_TOKEN_BYTES <= b.len() {
            if text.is_char_boundary(i) {
                cut = i;
            }
            match self.longest(&b[i..]) {
                Some((_, n)) => i += n,
                None => break,
            }
        }
        cut
    }
}

/// The bytes a Python str or bytes literal stands for (the escapes the vocab uses, and the rest of
/// Python's simple escapes).
fn parse_literal(lit: &str) -> std::result::Result<Vec<u8>, String> {
    let (is_bytes, body) = match lit.strip_prefix('b') {
        Some(r) => (true, r),
        None => (false, lit),
    };
    let q = body.chars().next().ok_or("empty literal")?;
    if (q != '\'' && q != '"') || body.len() < 2 || !body.ends_with(q) {
        return Err(format!("not a quoted literal: {lit}"));
    }
    let inner = &body[1..body.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut it = inner.chars();
    let push_cp = |out: &mut Vec<u8>, cp: u32| -> std::result::Result<(), String> {
        let c = char::from_u32(cp).ok_or(format!("bad code point {cp:#x}"))?;
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        Ok(())
    };
    while let Some(c) = it.next() {
        if c != '\\' {
            if is_bytes && !c.is_ascii() {
                return Err("non-ASCII character in a bytes literal".into());
            }
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let e = it.next().ok_or("dangling backslash")?;
        let mut hex = |n: usize| -> std::result::Result<u32, String> {
            let s: String = it.by_ref().take(n).collect();
            if s.len() != n {
                return Err("short hex escape".into());
            }
            u32::from_str_radix(&s, 16).map_err(|_| format!("bad hex escape {s}"))
        };
        match e {
            'x' => {
                let v = hex(2)?;
                if is_bytes {
                    out.push(v as u8);
                } else {
                    push_cp(&mut out, v)?;
                }
            }
            'u' if !is_bytes => {
                let v = hex(4)?;
                push_cp(&mut out, v)?;
            }
            'U' if !is_bytes => {
                let v = hex(8)?;
                push_cp(&mut out, v)?;
            }
            'n' => out.push(b'\n'),
            't' => out.push(b'\t'),
            'r' => out.push(b'\r'),
            '0' => out.push(0),
            'a' => out.push(7),
            'b' => out.push(8),
            'f' => out.push(12),
            'v' => out.push(11),
            '\\' => out.push(b'\\'),
            '\'' => out.push(b'\''),
            '"' => out.push(b'"'),
            other => return Err(format!("unknown escape \\{other}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse_literal(r"'\x80'").unwrap(), "\u{80}".as_bytes());
        assert_eq!(parse_literal(r"b'\x80'").unwrap(), [0x80]);
        assert_eq!(parse_literal(r#""it's""#).unwrap(), b"it's");
        assert_eq!(parse_literal(r"'a\'b\\\n'").unwrap(), b"a'b\\\n");
        assert_eq!(parse_literal(r"'\u3000'").unwrap(), "\u{3000}".as_bytes());
        assert!(parse_literal("abc").is_err());
    }

    #[test]
    fn crlf_and_spaces() {
        let v = b"1 ' ' 1\r\n2 'a b' 3\r\n3 'a' 1\r\n4 b'\\xff' 1\r\n";
        let w = World::parse(v, "t").unwrap();
        assert_eq!(w.encode("a ba").unwrap(), [2, 3]);
        assert_eq!(w.decode_bytes(&[4, 0, 1]).unwrap(), [0xff, b' ']);
        assert!(World::parse(b"1 'ab' 3\n", "t").is_err());
    }

    /// Ids past the file's line count are refused with one line: 2^64 − 1 panicked (index out of
    /// bounds), 2^63 panicked (capacity overflow), 99999999999 aborted allocating 2.4 TB and 10^8
    /// took 2.3 GB.
    #[test]
    fn ids_past_the_file_are_refused() {
        for id in ["18446744073709551615", "9223372036854775808", "99999999999", "100000000", "3", "0"] {
            let v = format!("1 'a' 1\n{id} 'b' 1\n");
            let e = format!("{:#}", World::parse(v.as_bytes(), "v.txt").err().expect("must fail"));
            assert!(e.starts_with("v.txt: line 2: id ") && e.contains("not in 1..=2"), "{e}");
        }
        assert!(World::parse(b"2 'b' 1\n1 'a' 1\n", "t").is_ok());
    }
}
