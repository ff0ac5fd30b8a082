//! `stuffed passkey`: prompt construction (SPEC.md §2.2 lengths), seeded keys, string scoring,
//! shared-prefix reuse equal to from-scratch runs, shards merged equal to one run, resume.
use std::path::{Path, PathBuf};
use stuffed::cli::values::parse_lengths;
use stuffed::cli::{run, Cli};
use stuffed::eval::passkey::{
    idk_suffix, is_correct, key, key_tokens, needle_block, num_blocks, prompt_text, template, Record, Template,
    TemplateName,
};
use stuffed::tokenizer::Tokenizer;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mamba2_neox_tiny")
}

fn cli(args: &[&str]) {
    cli_result(args).unwrap();
}

fn cli_result(args: &[&str]) -> anyhow::Result<()> {
    use clap::Parser;
    run(Cli::try_parse_from(std::iter::once("stuffed").chain(args.iter().copied()))?)
}

/// A grid is resumed only by the run that made it: another model (by content), seed, template or
/// max-new is refused, saying what differs; an unfinished grid is never lost without a flag; a
/// damaged record (not the torn last line of a crash) is an error naming its line.
#[test]
fn resume_refuses_another_grid_saying_what_differs() {
    let (tmp, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let o = out.path().to_str().unwrap();
    let m = model();
    let base = ["passkey", "--lengths", "256", "--samples", "2", "--out", o];
    let with = |m: &Path, extra: &[&str]| {
        let mut a = vec!["passkey", "--model", m.to_str().unwrap()];
        a.extend(&base[1..]);
        a.extend(extra);
        cli_result(&a).map_err(|e| format!("{e:#}"))
    };
    with(&m, &[]).unwrap();
    with(&m, &[]).unwrap(); // a finished grid may be run again without a flag
                            // Killed before its summary: the records are an unfinished grid.
    std::fs::remove_file(out.path().join("summary.json")).unwrap();
    let e = with(&m, &[]).unwrap_err();
    assert!(
        e.contains("holds an unfinished passkey run") && e.contains("--resume") && e.contains("--overwrite"),
        "{e}"
    );
    for (extra, want) in [
        (&["--seed", "1"][..], "options.seed: 0 → 1"),
        (&["--template", "paper"][..], "options.template: \"code\" → \"paper\""),
        (&["--max-new", "7"][..], " → 7"),
        (&["--bos"][..], "options.bos: false → true"),
    ] {
        let e = with(&m, &[extra, &["--resume"]].concat()).unwrap_err();
        let field = format!("options.{}:", extra[0].trim_start_matches("--").replace('-', "_"));
        assert!(e.contains("refusing to resume") && e.contains(&field) && e.contains(want), "{extra:?}: {e}");
    }
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(m.join(f), copy.join(f)).unwrap();
    }
    with(&copy, &["--resume"]).unwrap(); // the same model by another path: resumes
    std::fs::remove_file(out.path().join("summary.json")).unwrap();
    let f = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let e = with(&copy, &["--resume"]).unwrap_err();
    assert!(e.contains("model.content"), "{e}");
    // A record edited by hand, not the last line: refused by its checksum, naming the line.
    let jsonl = out.path().join("results.jsonl");
    let text = std::fs::read_to_string(&jsonl).unwrap();
    std::fs::write(&jsonl, text.replacen("\"correct\":false", "\"correct\":true", 1)).unwrap();
    let e = with(&m, &["--resume"]).unwrap_err();
    assert!(e.contains("results.jsonl line 1: checksum mismatch"), "{e}");
    with(&m, &["--overwrite"]).unwrap();
    assert!(out.path().join("summary.json").exists());
}

fn records(dir: &Path) -> Vec<Record> {
    let mut v: Vec<Record> = std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    v.sort_by_key(|r| (r.length, r.sample));
    v
}

fn summary(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("runs");
    v.as_object_mut().unwrap().remove("checksum"); // it covers the run facts too
    v
}

#[test]
fn prompt_lengths_match_spec() {
    let tok = Tokenizer::for_model(None, None).unwrap();
    let tpl = template(TemplateName::Code);
    let want = [(1024, 1001), (2048, 2026), (8192, 8176), (16384, 16376), (32768, 32751), (131072, 131051)];
    for (t, n) in want {
        let nb = num_blocks(&tok, &tpl, t).unwrap();
        let b = needle_block(0.5, nb);
        let (p, _) = prompt_text(&tpl, nb, b, "34847");
        assert_eq!(tok.encode(&p).unwrap().len(), n, "T = {t}, key 34847");
        let (p, _) = prompt_text(&tpl, nb, b, "71432");
        assert_eq!(tok.encode(&p).unwrap().len(), n + 2, "T = {t}, key 71432");
    }
}

/// A prompt tokenized in pieces (as passkey does, to keep the tokenizer's memory small) has the
/// ids and needle position of the whole text tokenized at once: every template, the three kinds of
/// tokenizer (GPT-NeoX byte-level BPE, RWKV World, Llama-style), pieces from a few bytes (cuts
/// everywhere) to whole.
#[test]
fn prompts_in_pieces_equal_whole() {
    let llama = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer_llama_style/tokenizer.json");
    for tok in
        [Tokenizer::for_model(None, None).unwrap(), Tokenizer::world().unwrap(), Tokenizer::from_file(&llama).unwrap()]
    {
        for name in [TemplateName::Code, TemplateName::Paper, TemplateName::Llamacpp] {
            let tpl = template(name);
            let nb = num_blocks(&tok, &tpl, 4096).unwrap();
            for (block, key) in [(0, "34847"), (nb / 2, "71432"), (nb - 1, "00012")] {
                let (text, needle_byte) = prompt_text(&tpl, nb, block, key);
                let (ids, offsets) = tok.encode_with_offsets(&text).unwrap();
                let needle = offsets.iter().position(|&o| o >= needle_byte).unwrap();
                for piece in [5, 64, 700, 1 << 16] {
                    let got = stuffed::text::encode_long_in(&tok, &text, needle_byte, piece).unwrap();
                    assert!(
                        got == (ids.clone(), needle),
                        "{name:?}, {}, needle block {block}, pieces of {piece}",
                        tok.source
                    );
                }
            }
        }
    }
}

#[test]
fn lengths_keys_and_scoring() {
    assert_eq!(parse_lengths("1k,2k,8k").unwrap(), [1024, 2048, 8192]);
    assert_eq!(parse_lengths("1k..4k:1k").unwrap(), [1024, 2048, 3072, 4096]);
    assert_eq!(parse_lengths("1k..1m:x2").unwrap().len(), 11);
    assert_eq!(*parse_lengths("1k..1m:x2").unwrap().last().unwrap(), 1 << 20);
    assert!(parse_lengths("1k..2k").is_err() && parse_lengths("abc").is_err());
    // Keys: 5 digits, zero-padded, deterministic per seed, varied.
    let a: Vec<String> = (0..50).map(|i| key(7, 1024, i)).collect();
    assert_eq!(a, (0..50).map(|i| key(7, 1024, i)).collect::<Vec<_>>());
    assert!(a.iter().all(|k| k.len() == 5 && k.bytes().all(|b| b.is_ascii_digit())));
    assert_ne!(a, (0..50).map(|i| key(8, 1024, i)).collect::<Vec<_>>());
    assert!(a.iter().collect::<std::collections::BTreeSet<_>>().len() > 45);
    // A key split over three tokens is still found; a near miss is not.
    let tok = Tokenizer::for_model(None, None).unwrap();
    assert!(is_correct(&tok, &[818, 1047, 1237, 15], "71432").unwrap().1);
    assert!(!is_correct(&tok, &[818, 1047, 15], "71432").unwrap().1);
}

#[test]
fn reuse_equals_from_scratch_and_counts_tokens() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let m = model();
    let args = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "1k,3k", "--samples", "6", "--seed", "3"];
    cli(&[&args[..], &["--out", a.path().to_str().unwrap()]].concat());
    cli(&[&args[..], &["--out", b.path().to_str().unwrap(), "--no-reuse"]].concat());
    let (ra, rb) = (records(a.path()), records(b.path()));
    assert_eq!(ra.len(), 12);
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(
            (x.length, x.sample, &x.key, &x.continuation, x.correct),
            (y.length, y.sample, &y.key, &y.continuation, y.correct)
        );
        assert!(x.shared_prefix > 0 && y.shared_prefix == 0);
        assert!(x.needle_pos <= x.shared_prefix + 1 && x.shared_prefix <= x.needle_pos + 2, "{x:?}");
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.path().join("summary.json")).unwrap()).unwrap();
    // Needle within the last r tokens, per length: counted again from the records.
    for lr in s["needle_within_last_r"].as_array().unwrap() {
        let r = lr["r"].as_u64().unwrap() as usize;
        for pl in lr["per_length"].as_array().unwrap() {
            let l = pl["length"].as_u64().unwrap();
            let hit: Vec<_> = ra.iter().filter(|x| x.length == l && x.prompt_tokens - x.needle_pos <= r).collect();
            assert_eq!(pl["n"].as_u64(), Some(hit.len() as u64), "r {r}, length {l}");
            let acc = (!hit.is_empty()).then(|| hit.iter().filter(|x| x.correct).count() as f64 / hit.len() as f64);
            assert_eq!(pl["accuracy"].as_f64(), acc, "r {r}, length {l}");
        }
    }
    let n_at_3k = |i: usize| s["needle_within_last_r"][i]["per_length"][1]["n"].as_u64().unwrap();
    assert!(n_at_3k(0) < 6 && n_at_3k(3) == 6, "3k prompts: some needles are past the last 1k, none past 8k");
    assert!(std::fs::read_to_string(a.path().join("last_r.svg")).unwrap().contains("needle in the last 8k"));
    let (with, without) =
        (s["runs"][0]["tokens_processed"].as_u64().unwrap(), s["runs"][0]["tokens_without_reuse"].as_u64().unwrap());
    // About n·T/2 + T against n·T.
    let max_new = s["options"]["max_new"].as_u64().unwrap();
    let naive: u64 = ra.iter().map(|r| r.prompt_tokens as u64 + max_new).sum();
    assert_eq!(without, naive);
    assert!((with as f64) < 0.7 * without as f64, "reuse {with} vs {without}");
}

#[test]
fn shards_merge_to_the_unsharded_result_and_resume_loses_nothing() {
    let m = model();
    let base = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "1k,2k", "--samples", "5"];
    let full = tempfile::tempdir().unwrap();
    cli(&[&base[..], &["--out", full.path().to_str().unwrap()]].concat());
    let shards: Vec<_> = (1..=3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (k, d) in shards.iter().enumerate() {
        let sh = format!("{}/3", k + 1);
        cli(&[&base[..], &["--out", d.path().to_str().unwrap(), "--shard", &sh]].concat());
        assert!(records(d.path()).len() < 10);
    }
    let merged = tempfile::tempdir().unwrap();
    let mut args = vec!["merge"];
    let paths: Vec<String> = shards.iter().map(|d| d.path().display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    args.extend(["--out", merged.path().to_str().unwrap()]);
    cli(&args);
    assert_eq!(records(merged.path()), records(full.path()));
    assert_eq!(summary(merged.path()), summary(full.path()));
    for svg in ["heatmap.svg", "last_r.svg"] {
        assert_eq!(std::fs::read(merged.path().join(svg)).unwrap(), std::fs::read(full.path().join(svg)).unwrap());
    }
    // The merge records its shards' matmul mode (above: the same as the unsharded run's), and
    // refuses shards whose products ran in different modes (one's summary says fast, sealed again).
    let fast_shard = tempfile::tempdir().unwrap();
    for f in ["results.jsonl", "passkey.run.json", "summary.json"] {
        std::fs::copy(shards[2].path().join(f), fast_shard.path().join(f)).unwrap();
    }
    let sp = fast_shard.path().join("summary.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    v["matmul"] = serde_json::json!({"simd": "avx512bf16", "mode": "fast"});
    std::fs::write(&sp, stuffed::report::reseal("passkey-summary", v, true).unwrap()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let e = format!(
        "{:#}",
        cli_result(&["merge", &paths[0], &paths[1], fast_shard.path().to_str().unwrap(), "--out", o]).unwrap_err()
    );
    assert!(e.contains("summary.json: its products ran in fast mode") && e.contains("share a matmul mode"), "{e}");
    // A run killed mid-way: 4 lines kept and a torn fifth; --resume finishes the rest.
    let part = tempfile::tempdir().unwrap();
    let lines: Vec<String> =
        std::fs::read_to_string(full.path().join("results.jsonl")).unwrap().lines().map(String::from).collect();
    let torn = format!("{}\n{}", lines[..4].join("\n"), &lines[4][..20]);
    std::fs::write(part.path().join("results.jsonl"), torn).unwrap();
    std::fs::copy(full.path().join("passkey.run.json"), part.path().join("passkey.run.json")).unwrap();
    cli(&[&base[..], &["--out", part.path().to_str().unwrap(), "--resume"]].concat());
    assert_eq!(records(part.path()), records(full.path()));
    assert_eq!(summary(part.path()), summary(full.path()));
    let _ = stuffed::cli::values::parse_shard("2/3").unwrap();
    assert!(stuffed::cli::values::parse_shard("4/3").is_err());
}

/// The key scored for `key_nll` is ` {key}` as it follows the question, for both shipped vocabularies
/// and every template.
#[test]
fn key_tokens_follow_the_question() {
    for tok in [Tokenizer::for_model(None, None).unwrap(), Tokenizer::world().unwrap()] {
        for name in [TemplateName::Code, TemplateName::Paper, TemplateName::Llamacpp] {
            for k in ["34847", "71432", "00475"] {
                let ids = key_tokens(&tok, &template(name), k).unwrap();
                assert_eq!(tok.decode(&ids).unwrap(), format!(" {k}"), "{}", tok.source);
                let (q, all) = (template(name).suffix, format!("{} {k}", template(name).suffix));
                assert_eq!([tok.encode(q).unwrap(), ids].concat(), tok.encode(&all).unwrap());
            }
        }
    }
}

/// The shipped passkey model (trained on 256-token windows).
fn passkey_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-passkey")
}

/// A passkey grid on the shipped passkey model (1k and 2k tokens, seed 5) with `extra` flags into
/// `out`: its records and the `max_new` it chose.
fn oprm_grid(extra: &[&str], out: &Path) -> (Vec<Record>, usize) {
    let m = passkey_model();
    let args = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "1k,2k", "--seed", "5"];
    cli(&[&args[..], extra, &["--out", out.to_str().unwrap()]].concat());
    (records(out), summary(out)["options"]["max_new"].as_u64().unwrap() as usize)
}

/// The prefix, context and question of record `r`'s prompt (under `tpl`), each tokenized alone as
/// OPRM runs them, and the context's tokens before the needle.
fn oprm_parts(tok: &Tokenizer, tpl: &Template, r: &Record) -> ([Vec<u32>; 3], usize) {
    let (text, needle_byte) = prompt_text(tpl, r.num_blocks, r.needle_block, &r.key);
    let ctx = &text[tpl.prefix.len()..text.len() - tpl.suffix.len()];
    let needle_tok = tok.encode(&ctx[..needle_byte - tpl.prefix.len()]).unwrap().len();
    ([tpl.prefix, ctx, tpl.suffix].map(|t| tok.encode(t).unwrap()), needle_tok)
}

/// The logits over the real vocabulary after `[prefix, chunk, question]` from the zero state, run
/// in one call (the first answer token's distribution, as OPRM scores a chunk).
fn answer_row(s: &mut dyn stuffed::backend::Backend, parts: [&[u32]; 3], rows: usize, real: usize) -> Vec<f32> {
    s.reset().unwrap();
    let mut last = Vec::new();
    s.logits(&parts.concat(), &mut |_, l| {
        last = l[l.len() - rows..][..real].to_vec();
        Ok(())
    })
    .unwrap();
    last
}

/// Equal within the OPRM tests' tolerance (the chunk rerun in one call against the run's pieces).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(1.0)
}

/// `--oprm L` answers from the chunk whose first answer token is the most certain: each chunk's
/// `[prefix, chunk, question]` run again here from the zero state in one call (the context
/// tokenized whole, every position's logits) gives the record's entropies, the chunk that answered
/// has the least of them, and its greedy answer and the needle's position are the record's.
#[test]
fn oprm_answers_from_the_chunk_of_least_entropy() {
    use stuffed::backend::{Device, GpuOptions};
    let len = 120; // (four of the eight needles are cut by a chunk boundary)
    let (m, out) = (passkey_model(), tempfile::tempdir().unwrap());
    let (recs, max_new) = oprm_grid(&["--samples", "4", "--oprm", &len.to_string()], out.path());
    assert_eq!(recs.len(), 8);
    let model = stuffed::model::Model::load(&m).unwrap();
    let tok = model.tokenizer(None).unwrap();
    let (real, rows) = (model.real_vocab(&tok), model.info.vocab_rows);
    let mut s = stuffed::backend::open(&model, 512, real, Device::Cpu, GpuOptions::default()).unwrap();
    let (mut chose_needle, mut split) = (0, 0);
    for r in &recs {
        let x = r.oprm.as_ref().expect("an OPRM record");
        let ([p, c, q], needle_tok) = oprm_parts(&tok, &template(TemplateName::Code), r);
        assert_eq!((r.needle_pos, r.prompt_tokens), (p.len() + needle_tok, p.len() + c.len() + q.len()), "{r:?}");
        assert_eq!((x.chunks, x.needle_chunks[0]), (c.len().div_ceil(len), needle_tok / len), "{r:?}");
        let entropies: Vec<f64> = c
            .chunks(len)
            .map(|chunk| stuffed::eval::passkey::entropy(&answer_row(s.as_mut(), [&p, chunk, &q], rows, real)))
            .collect();
        let least = entropies.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(close(entropies[x.chosen], x.entropy) && close(x.entropy, least), "{x:?} vs {entropies:?}");
        assert!(close(entropies[x.needle_chunks[0]], x.needle_entropy), "{x:?} vs {entropies:?}");
        s.reset().unwrap();
        s.feed(&[&p[..], c.chunks(len).nth(x.chosen).unwrap(), &q[..]].concat()).unwrap();
        let answer = tok.decode(&s.greedy(max_new).unwrap()).unwrap();
        assert_eq!(answer, r.continuation, "{r:?}");
        chose_needle += x.chose_needle() as usize;
        split += (x.needle_chunks[0] != x.needle_chunks[1]) as usize;
    }
    // The summary counts how often the answering chunk held the needle, and a boundary cut it.
    let s = summary(out.path());
    let total = |key: &str| -> usize {
        let per: f64 =
            s["accuracy_per_length"].as_array().unwrap().iter().map(|l| l[key].as_f64().unwrap() * 4.0).sum();
        per.round() as usize
    };
    assert_eq!(total("oprm_chose_needle"), chose_needle);
    assert_eq!(total("oprm_needle_split"), split);
    assert!(split > 0, "a needle cut by a chunk boundary");
}

/// `--oprm-select query` answers from the chunk after which the question is the most likely: each
/// chunk's `[prefix, chunk]` run again here from the zero state and the question scored after it
/// (`score`, the engine's own NLL) gives the record's query NLLs, the chunk that answered has the
/// least of them, its entropy is that of `[prefix, chunk, question]`'s last row, and its greedy
/// answer is the record's.
#[test]
fn oprm_query_rule_answers_from_the_chunk_the_question_is_likeliest_after() {
    use stuffed::backend::{Device, GpuOptions};
    let len = 120;
    let (m, out) = (passkey_model(), tempfile::tempdir().unwrap());
    let rule = ["--samples", "3", "--oprm", &len.to_string(), "--oprm-select", "query"];
    let (recs, max_new) = oprm_grid(&rule, out.path());
    assert_eq!(recs.len(), 6);
    assert_eq!(summary(out.path())["options"]["oprm"], serde_json::json!({"chunk": len, "select": "query"}));
    let model = stuffed::model::Model::load(&m).unwrap();
    let tok = model.tokenizer(None).unwrap();
    let (real, rows) = (model.real_vocab(&tok), model.info.vocab_rows);
    let mut s = stuffed::backend::open(&model, 512, real, Device::Cpu, GpuOptions::default()).unwrap();
    for r in &recs {
        let x = r.oprm.as_ref().expect("an OPRM record");
        let ([p, c, q], _) = oprm_parts(&tok, &template(TemplateName::Code), r);
        let query_nlls: Vec<f64> = c
            .chunks(len)
            .map(|chunk| {
                s.reset().unwrap();
                s.feed(&[&p[..], chunk].concat()).unwrap();
                let mut nll = Vec::new();
                assert!(s.score(&q, &mut nll).unwrap(), "the chunk's last row predicts the question's first token");
                assert_eq!(nll.len(), q.len());
                nll.iter().map(|&v| v as f64).sum()
            })
            .collect();
        let least = query_nlls.iter().copied().fold(f64::INFINITY, f64::min);
        let (got, needle) = (x.query_nll.expect("the question's NLL"), x.needle_query_nll.expect("the needle's"));
        assert!(close(query_nlls[x.chosen], got) && close(got, least), "{x:?} vs {query_nlls:?}");
        assert!(close(query_nlls[x.needle_chunks[0]], needle), "{x:?} vs {query_nlls:?}");
        s.reset().unwrap();
        let mut last = Vec::new();
        s.logits(&[&p[..], c.chunks(len).nth(x.chosen).unwrap(), &q[..]].concat(), &mut |_, l| {
            last = l[l.len() - rows..][..real].to_vec();
            Ok(())
        })
        .unwrap();
        assert!(close(stuffed::eval::passkey::entropy(&last), x.entropy), "{x:?}");
        s.reset().unwrap();
        s.feed(&[&p[..], c.chunks(len).nth(x.chosen).unwrap(), &q[..]].concat()).unwrap();
        assert_eq!(tok.decode(&s.greedy(max_new).unwrap()).unwrap(), r.continuation, "{r:?}");
    }
    // The entropy rule's records carry no query NLL, and its options read as before the choice.
    let plain = tempfile::tempdir().unwrap();
    let (plain_recs, _) = oprm_grid(&["--samples", "3", "--oprm", &len.to_string()], plain.path());
    assert!(plain_recs.iter().all(|r| r.oprm.as_ref().unwrap().query_nll.is_none()));
    assert_eq!(summary(plain.path())["options"]["oprm"], serde_json::json!({"chunk": len}));
}

/// The shipped passkey model loses keys past its 256-token training windows; OPRM with chunks
/// inside them finds them again (the paper's claim, on the smallest model that shows it).
#[test]
fn oprm_retrieves_past_the_training_length() {
    let m = passkey_model();
    let (plain, oprm) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "4k,8k", "--samples", "10", "--max-new", "8"];
    cli(&[&args[..], &["--out", plain.path().to_str().unwrap()]].concat());
    cli(&[&args[..], &["--oprm", "160", "--out", oprm.path().to_str().unwrap()]].concat());
    let acc = |d: &Path| -> Vec<f64> {
        summary(d)["accuracy_per_length"].as_array().unwrap().iter().map(|l| l["accuracy"].as_f64().unwrap()).collect()
    };
    let (a, b) = (acc(plain.path()), acc(oprm.path()));
    eprintln!("accuracy at 4k, 8k: plain {a:?}, OPRM {b:?}");
    for (a, b) in a.iter().zip(&b) {
        assert!(*a <= 0.5 && *b >= 0.9, "plain {a}, OPRM {b}");
    }
}

/// `--oprm` runs a chunk whose ids it ran before (the noise at a phase already seen, in this sample
/// or an earlier one) only when it would become the best: the records equal running every chunk
/// (`--no-reuse`) bit for bit, for a fraction of the tokens.
#[test]
fn oprm_reuse_equals_every_chunk_run() {
    // The passkey model answers from the needle's chunk (never seen before); the random model's
    // least-entropy chunk is often noise seen in an earlier sample, which must run again to
    // give its state.
    // Both rules: a seen chunk is skipped by the score the run ranks with.
    for (m, rule) in [passkey_model(), model()].into_iter().flat_map(|m| [(m.clone(), "entropy"), (m, "query")]) {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let args = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "2k,8k", "--samples", "5", "--oprm", "160"];
        let args = [&args[..], &["--oprm-select", rule]].concat();
        cli(&[&args[..], &["--out", a.path().to_str().unwrap()]].concat());
        cli(&[&args[..], &["--no-reuse", "--out", b.path().to_str().unwrap()]].concat());
        assert_eq!(records(a.path()), records(b.path()), "{} {rule}", m.display());
        let facts = |d: &Path| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap();
            let r = &v["runs"][0];
            (r["tokens_processed"].as_u64().unwrap(), r["tokens_without_reuse"].as_u64().unwrap())
        };
        let ((ra, wa), (rb, wb)) = (facts(a.path()), facts(b.path()));
        assert_eq!((wa, rb), (wb, wb), "without reuse every chunk runs");
        assert!(ra * 3 < wa, "{} {rule}: reuse ran {ra} of {wa} tokens", m.display());
    }
}

/// `--oprm-idk WORD` (the paper's IDK filter): the question asks for WORD when the key is not in
/// the text, and a chunk whose greedy first answer token begins WORD (alone or after a space)
/// answers only if every chunk's does. Each chunk's `[prefix, chunk, question]` run again here
/// under that question gives the record's choice — the least entropy among the chunks that do not
/// say WORD — and its count of those that do; the filter changes the choice in some records. On
/// the 64-token text model, whose answer after "The passkey is" is often " a".
#[test]
fn oprm_idk_filter_answers_from_the_least_uncertain_chunk_that_knows() {
    use stuffed::backend::{Device, GpuOptions};
    let (len, word) = (100, "a");
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba2-tiny-l4-t64-a3-4m");
    let out = tempfile::tempdir().unwrap();
    let args = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "512,1k", "--samples", "3", "--seed", "5"];
    let more = ["--max-new", "4", "--oprm", "100", "--oprm-idk", word, "--out", out.path().to_str().unwrap()];
    cli(&[&args[..], &more[..]].concat());
    let recs = records(out.path());
    assert_eq!(recs.len(), 6);
    let model = stuffed::model::Model::load(&m).unwrap();
    let tok = model.tokenizer(None).unwrap();
    let (real, rows) = (model.real_vocab(&tok), model.info.vocab_rows);
    let mut s = stuffed::backend::open(&model, 512, real, Device::Cpu, GpuOptions::default()).unwrap();
    let code = template(TemplateName::Code);
    let tpl = Template { suffix: idk_suffix(code.suffix, word), ..code };
    let idk = [tok.encode(word).unwrap()[0], tok.encode(&format!(" {word}")).unwrap()[0]];
    let mut changed = 0;
    for r in &recs {
        let x = r.oprm.as_ref().expect("an OPRM record");
        let ([p, c, q], _) = oprm_parts(&tok, &tpl, r);
        let runs: Vec<(bool, f64)> = c
            .chunks(len)
            .map(|chunk| {
                let last = answer_row(s.as_mut(), [&p, chunk, &q], rows, real);
                (idk.contains(&stuffed::session::argmax(&last, real)), stuffed::eval::passkey::entropy(&last))
            })
            .collect();
        // The first chunk of the least key (IDK flag first, then entropy; or entropy alone).
        let first_least = |filter: bool| {
            let key = |i: usize| (filter && runs[i].0, runs[i].1);
            (0..runs.len()).fold(0, |b, i| if key(i) < key(b) { i } else { b })
        };
        let (filtered, plain) = (first_least(true), first_least(false));
        let says = runs.iter().filter(|r| r.0).count();
        assert_eq!((x.chosen, x.idk_chunks), (filtered, Some(says)), "{x:?} vs {runs:?}");
        assert!(close(runs[x.chosen].1, x.entropy), "{x:?} vs {runs:?}");
        changed += (plain != filtered) as usize;
    }
    assert!(changed > 0, "the filter changed no choice");
    // The summary's share of chunks that said the word, per length, from the records.
    for row in summary(out.path())["accuracy_per_length"].as_array().unwrap() {
        let ours: Vec<_> = recs.iter().filter(|r| r.length == row["length"].as_u64().unwrap()).collect();
        let said: usize = ours.iter().map(|r| r.oprm.as_ref().unwrap().idk_chunks.unwrap()).sum();
        let chunks: usize = ours.iter().map(|r| r.oprm.as_ref().unwrap().chunks).sum();
        assert_eq!(row["oprm_idk_chunks"].as_f64(), Some(said as f64 / chunks as f64), "{row}");
    }
}

/// A resumed or merged grid takes only records its options write: under `--oprm-select query` a
/// record without the question's NLL (sealed again, as only an edit on purpose could make it) is
/// refused, naming the file and the sample, where the resume once skipped it as done.
#[test]
fn oprm_records_of_another_rule_are_refused() {
    let out = tempfile::tempdir().unwrap();
    let m = passkey_model();
    let o = out.path().to_str().unwrap();
    let args = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "1k", "--samples", "2", "--seed", "5"];
    let more = ["--max-new", "8", "--oprm", "160", "--oprm-select", "query", "--out", o];
    cli(&[&args[..], &more[..]].concat());
    let jsonl = out.path().join("results.jsonl");
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    first["oprm"].as_object_mut().unwrap().remove("query_nll");
    lines[0] = stuffed::report::reseal("passkey-record", first, false).unwrap();
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    // (Without its summary the grid is unfinished: a resume reads its records back.)
    std::fs::remove_file(out.path().join("summary.json")).unwrap();
    let err = format!("{:#}", cli_result(&[&args[..], &more[..], &["--resume"]].concat()).unwrap_err());
    assert!(err.contains("results.jsonl") && err.contains("not a record this run's options write"), "{err}");
}

/// `--jrt` (JRT-Prompt): the context twice, a newline between, then the question, as the JRT
/// code's `*_twice` tasks; the prompt's ids hold the needle where each copy's byte offset says;
/// records give both copies, shared-prefix reuse equals every sample run alone, the needle within
/// the last r tokens counts the second copy; `--oprm` refuses it.
#[test]
fn jrt_reads_the_context_twice() {
    let tok = Tokenizer::for_model(None, None).unwrap();
    let mut tpl = template(TemplateName::Code);
    let (plain, at) = prompt_text(&tpl, 5, 2, "34847");
    tpl.repeat = true;
    let (twice, needles) = stuffed::eval::passkey::prompt_needles(&tpl, 5, 2, "34847");
    let (body, q) = (&plain[tpl.prefix.len()..plain.len() - tpl.suffix.len()], tpl.suffix);
    assert_eq!(twice, format!("{}{body}\n{body}{q}", tpl.prefix));
    assert_eq!(needles, [at, at + body.len() + 1]);
    for &n in &needles {
        assert!(twice[n..].starts_with("The passkey is 34847."));
    }

    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let m = model();
    let args = ["passkey", "--model", m.to_str().unwrap(), "--lengths", "1k", "--samples", "4", "--jrt"];
    cli(&[&args[..], &["--out", a.path().to_str().unwrap()]].concat());
    cli(&[&args[..], &["--out", b.path().to_str().unwrap(), "--no-reuse"]].concat());
    let (ra, rb) = (records(a.path()), records(b.path()));
    let plain_len = num_blocks(&tok, &tpl, 1024).unwrap();
    for (x, y) in ra.iter().zip(&rb) {
        // (Calls cut the stream elsewhere: the key's NLL to rounding.)
        assert_eq!(x.continuation, y.continuation, "reuse changes a JRT answer");
        assert!(close(x.key_nll.unwrap(), y.key_nll.unwrap()), "{x:?} {y:?}");
        let again = x.needle_pos_again.unwrap();
        // The second copy sits one context (and the newline) after the first.
        let context = (x.prompt_tokens - again) + (again - x.needle_pos);
        assert!(again > x.needle_pos && x.prompt_tokens > 1900 && x.prompt_tokens < 2100, "{x:?}");
        assert!(context > 900, "{x:?}");
        assert_eq!(x.num_blocks, plain_len, "the context is the plain prompt's");
    }
    let s = summary(a.path());
    assert_eq!(s["options"]["jrt"], true);
    for lr in s["needle_within_last_r"].as_array().unwrap() {
        let r = lr["r"].as_u64().unwrap() as usize;
        let n = ra.iter().filter(|x| x.prompt_tokens - x.needle_pos_again.unwrap() <= r).count();
        assert_eq!(lr["per_length"][0]["n"].as_u64(), Some(n as u64), "r {r}");
    }
    let err = cli_result(&[&args[..], &["--out", b.path().to_str().unwrap(), "--oprm", "200", "--overwrite"]].concat())
        .unwrap_err();
    assert!(format!("{err:#}").contains("choose one"), "{err:#}");
}
