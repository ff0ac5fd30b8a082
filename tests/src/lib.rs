//! What the golden-data tests share: paths, the error bound of FORMATS.md §8, and running a model
//! over ids in pieces. The tests themselves live in tests/tests/*.rs.
use std::path::PathBuf;
use stuffed::exec::Pool;
use stuffed::model::Model;
use stuffed::session::Session;

/// Logits and final states against an official reference: max|Δ| / max|reference| (FORMATS.md §8).
pub const REL: f32 = 1e-4;

/// `tests/data/<case>`.
pub fn data(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data").join(case)
}

pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// max|a − b| / max|b|.
pub fn rel(ours: &[f32], reference: &[f32]) -> f32 {
    let err = ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / max_abs(reference)
}

/// Asserts rel ≤ [`REL`], printing the error; returns it.
pub fn assert_close(what: &str, ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let r = rel(ours, reference);
    println!("{what}: max abs err {:.3e}, rel {r:.3e}", r * max_abs(reference));
    assert!(r <= REL, "{what}: rel error {r:.3e} > {REL:e}");
    r
}

/// Runs `ids` through a fresh session in pieces of `splits` tokens (then the rest), `chunk` tokens
/// per call, on `pool`; returns all logits `(T, vocab_rows)` and the final state.
pub fn run(m: &Model, pool: Pool, ids: &[u32], chunk: usize, splits: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let v = m.info.vocab_rows;
    let mut s = Session::new(m, chunk);
    s.ex = pool;
    let mut logits = vec![0f32; ids.len() * v];
    let (ex, net, d) = (Pool::new(), m.net(), m.info.d_model);
    let mut start = 0;
    for &len in splits.iter().chain(std::iter::once(&usize::MAX)) {
        let end = start + len.min(ids.len() - start);
        s.feed(&ids[start..end], &mut |off, h| {
            let t = h.len() / d;
            let at = start + off;
            Ok(net.logits(&ex, h, t, &mut logits[at * v..(at + t) * v])?)
        })
        .unwrap();
        start = end;
        if start == ids.len() {
            break;
        }
    }
    (logits, s.state)
}

/// Logits of every position from the zero state, `chunk` tokens per call.
pub fn logits(m: &Model, ids: &[u32], chunk: usize) -> Vec<f32> {
    run(m, Pool::new(), ids, chunk, &[]).0
}

/// The CLI in-process: `stuffed ARGS…`.
pub fn cli(args: &[&str]) -> anyhow::Result<()> {
    use clap::Parser;
    stuffed::cli::run(stuffed::cli::Cli::try_parse_from(std::iter::once("stuffed").chain(args.iter().copied()))?)
}
