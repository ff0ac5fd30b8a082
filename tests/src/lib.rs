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

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `models/<name>`: a shipped model.
pub fn shipped(name: &str) -> PathBuf {
    root().join("models").join(name)
}

/// The public-domain novel the shipped models are measured on.
pub fn persuasion() -> String {
    root().join("host/assets/corpus/austen_persuasion.txt").to_str().expect("utf-8 path").to_string()
}

/// A JSON file the CLI wrote.
pub fn read_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("readable")).expect("JSON")
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
    // The LM head on the same kernel as the body.
    let (ex, net, d) = (pool, m.net(), m.info.d_model);
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
    // On the AMX level, f32 weights multiply as their bf16 halves: a chunk must have made them.
    if stuffed_core::Exec::simd(&pool) == stuffed_core::exec::Simd::Amx
        && m.info.weight_dtype == "f32"
        && chunk > 1
        && ids.len() > 1
    {
        assert!(m.split_bytes() > 0, "f32 weights on the AMX level ran without their bf16 halves");
    }
    (logits, s.state)
}

/// A golden case's `ref.safetensors` (tools/golden_*.py): the ids, the logits of the whole sequence
/// (`logits`), token by token (`logits_stepwise`) and split after 40 tokens (`logits_split`), and
/// the family's own final-state tensors.
pub struct Golden {
    ck: stuffed::checkpoint::Checkpoint,
    pub ids: Vec<u32>,
}

impl Golden {
    pub fn load(case: &str) -> Golden {
        let ck = stuffed::checkpoint::Checkpoint::open(&data(case).join("ref.safetensors")).unwrap();
        let ids = ck.require("input_ids").unwrap().to_i64_vec().unwrap().iter().map(|&v| v as u32).collect();
        Golden { ck, ids }
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.ck.require(name).unwrap().as_f32().unwrap().to_vec()
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.ck.require(name).unwrap().shape.to_vec()
    }
}

/// The one golden test body of every family, on `pool`: the forward as one call, in chunks of 16,
/// token by token, split after 40 tokens, and split 1 + 13 + rest in chunks of 7, each against the
/// reference; `state` checks the final state of the one-call and the token-by-token runs.
pub fn check_forms(case: &str, m: &Model, g: &Golden, pool: fn() -> Pool, state: impl Fn(&[f32])) {
    let (ids, logits) = (&g.ids, g.f32("logits"));
    let (full, st) = run(m, pool(), ids, 256, &[]);
    assert_close(&format!("{case} chunked vs reference"), &full, &logits);
    state(&st);
    let (small, _) = run(m, pool(), ids, 16, &[]);
    assert_close(&format!("{case} chunk 16 vs reference"), &small, &logits);
    let (step, st) = run(m, pool(), ids, 1, &[]);
    assert_close(&format!("{case} token-by-token vs reference stepwise"), &step, &g.f32("logits_stepwise"));
    assert_close(&format!("{case} token-by-token vs ours chunked"), &step, &full);
    state(&st);
    let (split, _) = run(m, pool(), ids, 256, &[40]);
    assert_close(&format!("{case} split 40+{} vs reference", ids.len() - 40), &split, &g.f32("logits_split"));
    let (odd, _) = run(m, pool(), ids, 7, &[1, 13]);
    assert_close(&format!("{case} splits 1+13+{}, chunk 7", ids.len() - 14), &odd, &logits);
}

/// Chunked equals token by token (logits and final state) over 300 tokens, longer than the golden
/// sequences, for each of `chunks` (one call, several blocks, partial ones).
pub fn chunked_equals_step(case: &str, chunks: &[usize]) {
    let m = Model::load(&data(case)).unwrap();
    let rows = m.info.vocab_rows.min(256) as u32;
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % rows).collect();
    let (step, step_state) = run(&m, Pool::new(), &ids, 1, &[]);
    for &chunk in chunks {
        let (chunked, state) = run(&m, Pool::new(), &ids, chunk, &[]);
        assert_close(&format!("{case} T=300 chunk {chunk} vs step"), &chunked, &step);
        assert_close(&format!("{case} T=300 chunk {chunk} state vs step"), &state, &step_state);
    }
}

/// Logits of every position from the zero state, `chunk` tokens per call.
pub fn logits(m: &Model, ids: &[u32], chunk: usize) -> Vec<f32> {
    run(m, Pool::new(), ids, chunk, &[]).0
}

/// A copy of the files of `tests/data/<case>` in a temporary directory.
pub fn copy_of(case: &str) -> tempfile::TempDir {
    let (src, dir) = (data(case), tempfile::tempdir().unwrap());
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// `tests/data/<case>/model.pth` without its `att.time_state` tensors: the model a state file
/// (`--state-file`) goes beside. Written as safetensors (BlinkDL names; read by its magic bytes)
/// named `model.pth` in a temporary directory.
pub fn without_time_state(case: &str) -> (tempfile::TempDir, PathBuf) {
    use safetensors::Dtype;
    let ck = stuffed::checkpoint::Checkpoint::open(&data(case).join("model.pth")).unwrap();
    let kept: Vec<_> = ck.names().filter(|n| !n.ends_with("att.time_state")).map(|n| ck.peek(n).unwrap()).collect();
    assert!(kept.len() < ck.names().count(), "{case} has no att.time_state");
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = kept
        .iter()
        .map(|t| {
            let dtype = match t.dtype.name() {
                "F32" => Dtype::F32,
                "BF16" => Dtype::BF16,
                other => panic!("{other}"),
            };
            (t.name.to_string(), safetensors::tensor::TensorView::new(dtype, t.shape.to_vec(), t.bytes).unwrap())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pth");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    (dir, path)
}

/// The state-tuned `case` as a user with a separate state file has it: the model without its
/// states ([`without_time_state`]) opened with `tests/data/<case>_file/state.pth` beside it (written by
/// the golden tool: the case's `att.time_state` tensors alone, checked here byte for byte). The
/// model without the file misses the case's references, so a test that passes with it needed it.
pub fn beside_state_file(case: &str) -> (tempfile::TempDir, Model) {
    use stuffed::checkpoint::Checkpoint;
    let (dir, base) = without_time_state(case);
    let state = data(&format!("{case}_file")).join("state.pth");
    let (merged, alone) = (Checkpoint::open(&data(case).join("model.pth")).unwrap(), Checkpoint::open(&state).unwrap());
    let tuned: Vec<&str> = merged.names().filter(|n| n.ends_with("att.time_state")).collect();
    assert_eq!(alone.names().collect::<Vec<_>>(), tuned, "{case}: the state file's tensors");
    for n in tuned {
        assert_eq!(alone.peek(n).unwrap().bytes, merged.peek(n).unwrap().bytes, "{case}: {n}");
    }
    let g = Golden::load(case);
    let plain = Model::open(&base, None).unwrap();
    assert!(
        rel(&logits(&plain, &g.ids, 256), &g.f32("logits")) > 0.01,
        "{case}: the base model alone meets the references"
    );
    let m = Model::open(&base, Some(&state)).unwrap();
    assert_eq!(m.info.state_file.as_deref(), Some(state.as_path()));
    assert!(m.info.format.contains("state-tuned"), "{}", m.info.format);
    (dir, m)
}

/// A safetensors file's header, and where its data start in `bytes`.
pub fn safetensors_header(bytes: &[u8]) -> (serde_json::Value, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

/// A copy of `tests/data/<case>` with element `index` of tensor `name` set to `value` in the file's
/// own dtype (bf16 or f32), written in place in the bytes.
pub fn poisoned(case: &str, name: &str, index: usize, value: f32) -> tempfile::TempDir {
    let dir = copy_of(case);
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let (header, data) = safetensors_header(&bytes);
    let start = data + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let patch = match header[name]["dtype"].as_str().unwrap() {
        "BF16" => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        "F32" => value.to_le_bytes().to_vec(),
        other => panic!("{other}"),
    };
    let at = start + index * patch.len();
    bytes[at..at + patch.len()].copy_from_slice(&patch);
    std::fs::write(&file, bytes).unwrap();
    dir
}

/// The CLI in-process: `stuffed ARGS…`.
pub fn cli(args: &[&str]) -> anyhow::Result<()> {
    stuffed::cli::run(stuffed::cli::parse_from(std::iter::once("stuffed").chain(args.iter().copied()))?)
}

/// Seeded values in [−1, 1) (the kernel tests' operands).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Whether this CPU runs the AMX kernel (AMX-TILE and AMX-BF16, the tile state granted).
pub fn has_amx() -> bool {
    stuffed::exec::cpu_simd() == stuffed_core::exec::Simd::Amx
}

/// Runs `check` (a golden case on the AMX level) where this CPU runs that level, and returns how
/// many `tdpbf16ps` it sent through the trap where the tiles are emulated (`--features amx-emu` on a
/// CPU without AMX; 0 elsewhere): [`amx_tiles_reached`] then tells whether the cases reached the
/// tiles at all (only products of bf16 weights with more than one activation row do).
pub fn on_amx(check: impl FnOnce()) -> u64 {
    if !has_amx() {
        return 0;
    }
    let before = tile_products();
    check();
    tile_products() - before
}

/// `tdpbf16ps` run through the trap emulator so far in this process (0 where nothing is emulated).
fn tile_products() -> u64 {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if *stuffed::exec::amx_state() == stuffed::exec::AmxState::Emulated {
        return stuffed::amx_emu::counts().tdpbf16ps;
    }
    0
}

/// Fails where the tiles are emulated and a test's AMX-level cases ([`on_amx`]'s sum) sent no
/// product to them: the level ran, but not its kernel.
pub fn amx_tiles_reached(what: &str, products: u64) {
    if has_amx() && *stuffed::exec::amx_state() == stuffed::exec::AmxState::Emulated {
        assert!(products > 0, "{what}: the AMX level ran but no tile product reached the AMX kernel");
        println!("{what}: {products} tdpbf16ps on the emulated AMX tiles");
    }
}

/// Every matrix kernel this CPU runs: portable (serial and pooled), then each level up to the best;
/// with `fast`, also the AVX512-BF16 and AMX levels in `--fast-matmul` mode where the CPU has them.
pub fn kernel_pools(fast: bool) -> Vec<Pool> {
    use stuffed_core::exec::{Exec, MatmulMode, Simd};
    let mut p = vec![Pool::serial_portable(), Pool::with_simd(Simd::Portable)];
    for s in [Simd::Avx2, Simd::Avx512, Simd::Avx512Bf16, Simd::Amx] {
        if Pool::with_simd(s).simd() == s {
            p.push(Pool::with_simd(s));
        }
    }
    for s in [Simd::Avx512Bf16, Simd::Amx] {
        if fast && Pool::with_simd(s).simd() == s {
            p.push(Pool::with_simd(s).with_mode(MatmulMode::Fast));
        }
    }
    p
}

/// A copy of `case` with `shift(l)` added to every value of layer l's `A_log` (f32), so that
/// A = −exp(A_log) is scaled by exp(shift(l)): what `decay:s` must equal.
pub fn a_log_shifted(case: &str, shift: &dyn Fn(usize) -> f32) -> tempfile::TempDir {
    shifted(case, "A_log", shift)
}

/// A copy of `case` with `shift(l)` added to every value of each f32 tensor of layer l (the index
/// after `layers.` or `blocks.` in its name) whose name ends with `suffix`.
pub fn shifted(case: &str, suffix: &str, shift: &dyn Fn(usize) -> f32) -> tempfile::TempDir {
    let dir = copy_of(case);
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let (header, data) = safetensors_header(&bytes);
    let mut done = 0;
    for (name, t) in header.as_object().unwrap() {
        if !name.ends_with(suffix) {
            continue;
        }
        assert_eq!(t["dtype"], "F32", "{case} {name}");
        let layer: usize = name
            .split('.')
            .skip_while(|p| *p != "layers" && *p != "blocks")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{case}: {name}: no layer index"));
        let (a, b) = (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
        for v in bytes[data + a..data + b].chunks_exact_mut(4) {
            let x = f32::from_le_bytes(v.try_into().unwrap()) + shift(layer);
            v.copy_from_slice(&x.to_le_bytes());
        }
        done += 1;
    }
    assert!(done > 0, "{case}: no tensor named *{suffix}");
    std::fs::write(&file, bytes).unwrap();
    dir
}
