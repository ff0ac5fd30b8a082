//! RWKV World tokenizer against the `rwkv` package's TRIE_TOKENIZER (tests/data/tokenizer_world.json,
//! from tools/golden_world.py): FORMATS.md §5.3 vectors, varied strings, and the whole shipped corpus
//! (token count + sha256 of the id sequence + the first 2,000 ids), whole and streamed in pieces.
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use stuffed::text::{Input, TokenStream};
use stuffed::tokenizer::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn golden() -> serde_json::Value {
    let p = root().join("tests/data/tokenizer_world.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn sha(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

#[test]
fn world_vectors() {
    let tok = Tokenizer::world().unwrap();
    assert_eq!(tok.vocab_size(), 65530);
    let g = golden();
    for c in g["vectors"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "ids differ for {text:?}");
        assert_eq!(tok.decode(&got).unwrap(), text, "round trip of {text:?}");
    }
    assert_eq!(tok.encode("The pass key is 71432.").unwrap(), [6699, 31635, 21952, 4600, 3544, 663, 51, 47]);
    assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.encode("\n").unwrap().len(), 1);
}

#[test]
fn world_crlf_vocab_file_is_the_same() {
    let lf = std::fs::read(root().join("host/assets/rwkv_vocab_v20230424.txt")).unwrap();
    let mut crlf = Vec::new();
    for line in lf.split_inclusive(|&b| b == b'\n') {
        crlf.extend_from_slice(&line[..line.len() - 1]);
        crlf.extend_from_slice(b"\r\n");
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vocab.txt");
    std::fs::write(&p, &crlf).unwrap();
    let a = Tokenizer::from_file(&p).unwrap();
    let b = Tokenizer::world().unwrap();
    let text = "CRLF vocab: the same ids.\r\nYes\tindeed — 71432 ✓";
    assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap());
}

fn corpus_text(file: &Path) -> Option<Vec<u8>> {
    if file.extension().is_some_and(|e| e == "gz") {
        let out = std::process::Command::new("gzip").arg("-dc").arg(file).output().ok()?;
        out.status.success().then_some(out.stdout)
    } else {
        Some(std::fs::read(file).unwrap())
    }
}

#[test]
fn world_whole_corpus_matches_package() {
    let tok = Tokenizer::world().unwrap();
    let g = golden();
    let mut total = 0;
    for c in g["corpus"].as_array().unwrap() {
        let file = root().join(c["file"].as_str().unwrap());
        let Some(bytes) = corpus_text(&file) else {
            eprintln!("skipping {} (no gzip)", file.display());
            continue;
        };
        assert_eq!(bytes.len() as u64, c["bytes"].as_u64().unwrap());
        let text = String::from_utf8(bytes).unwrap();
        let ids = tok.encode(&text).unwrap();
        let head = ids_of(&c["head"]);
        assert_eq!(&ids[..head.len()], &head[..], "{}: first ids", file.display());
        assert_eq!(ids.len() as u64, c["tokens"].as_u64().unwrap(), "{}", file.display());
        assert_eq!(sha(&ids), c["sha256"].as_str().unwrap(), "{}", file.display());
        total += ids.len();
        // Streamed in pieces (as `ppl` reads files): the same ids.
        if file.extension().is_some_and(|e| e == "txt") {
            for block in [1000, 1 << 16] {
                let input = Input::File(file.clone());
                let got = TokenStream::with_block(&tok, &input, block).unwrap().collect_all().unwrap();
                assert_eq!(got.len(), ids.len(), "streamed, block {block}");
                assert_eq!(sha(&got), sha(&ids), "streamed, block {block}");
            }
        }
    }
    assert!(total > 100_000);
}
