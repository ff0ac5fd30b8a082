//! GPT-NeoX-20B ids equal Python `tokenizers` (tests/data/tokenizer_neox.json, from
//! tools/golden_tokenizer.py) on varied strings; the shipped copy and a model dir's copy agree.
use stuffed::tokenizer::Tokenizer;

#[test]
fn neox_matches_python_tokenizers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tokenizer_neox.json");
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = Tokenizer::for_model(None, None).unwrap();
    assert_eq!(tok.source, "builtin:gpt-neox-20b");
    assert_eq!(tok.vocab_size(), 50277);
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30, "too few cases: {}", cases.len());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "ids differ for {text:?}");
        if text.is_ascii() && !text.contains("<|endoftext|>") {
            assert_eq!(tok.decode(&got).unwrap(), text, "round trip of {text:?}");
        }
    }
}

#[test]
fn formats_test_vectors() {
    let tok = Tokenizer::for_model(None, None).unwrap();
    assert_eq!(tok.encode("The pass key is 71432.").unwrap(), [510, 1509, 2234, 310, 818, 1047, 1237, 15]);
    assert_eq!(tok.encode("Hello\n\n  world<|endoftext|>").unwrap(), [12092, 535, 50276, 10186, 0]);
    assert_eq!(tok.encode(" 71432").unwrap(), [818, 1047, 1237]);
    assert_eq!(tok.encode("71432").unwrap(), [44034, 1237]);
}
