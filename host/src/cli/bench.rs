//! `stuffed bench` (streamed NLL speed and memory over a synth preset or a model) and `stuffed
//! selftest` (one device against the CPU core on the same weights and tokens).
use crate::backend::{Device, Scorer};
use crate::model::Model;
use crate::session::Session;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use stuffed_core::gemm::Prefetch;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A synth preset of --family (mamba2: 130m, 370m, 780m, 1.3b, 2.7b; tiny, small, p128; the others:
    /// see `stuffed synth --help`): seeded random weights, made once in the cache.
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    /// The family of --preset (the GPU runs Mamba-2 only).
    #[arg(long, value_enum, default_value = "mamba2", conflicts_with = "model")]
    family: crate::model::Family,
    /// Or a model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Storage type of a synth preset's weights.
    #[arg(long, value_enum, default_value_t = crate::synth::StoreDtype::Bf16)]
    dtype: crate::synth::StoreDtype,
    /// Tokens to stream (e.g. 1m = 1,048,576, 64k): one seeded random stream, the same whatever
    /// --chunk and --device, so the mean NLL printed compares across them.
    #[arg(long, default_value = "64k", value_parser = crate::text::parse_count)]
    tokens: u64,
    /// Tokens per forward call (default: 65,536 on the GPU, 512 on the CPU).
    #[arg(long, value_parser = crate::text::parse_chunk)]
    chunk: Option<usize>,
    /// Greedy decode steps to time (ms/token).
    #[arg(long, default_value_t = 64)]
    decode: usize,
    #[command(flatten)]
    device: super::DeviceArgs,
}

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Model directories to check (the golden checkpoints under tests/data, a synth preset dir, …).
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// Random tokens (seeded) to run.
    #[arg(long, default_value_t = 1000)]
    tokens: usize,
    /// Tokens per call: an odd size exercises partial SSD blocks and the carried state.
    #[arg(long, default_value_t = 300, value_parser = crate::text::parse_chunk)]
    chunk: usize,
    #[command(flatten)]
    device: super::DeviceArgs,
}

/// Seeded token ids below `real` (SplitMix64).
pub fn random_ids(n: usize, real: usize, seed: u64) -> Vec<u32> {
    let mut ids = vec![0; n];
    fill_ids(&mut crate::rng::SplitMix64::new(seed), real, &mut ids);
    ids
}

/// The next `ids.len()` ids of a seeded stream below `real`.
fn fill_ids(rng: &mut crate::rng::SplitMix64, real: usize, ids: &mut [u32]) {
    for id in ids {
        *id = rng.below(real) as u32;
    }
}

/// Matmul and SSD FLOPs per token of a Mamba-2 model, LM head included; the SSD counted at the core's
/// 64-token blocks (the GPU's 256-token blocks spend more on the intra-block part: not counted).
pub fn flops_per_token(c: &stuffed_core::mamba2::Config) -> f64 {
    let (d, di, nh, q) = (c.d_model as f64, c.d_inner() as f64, c.n_heads as f64, 64.0);
    let (p, n, g) = (c.head_dim as f64, c.d_state as f64, c.n_groups as f64);
    let mats = 2.0 * (c.in_proj_rows() as f64 * d + d * di);
    // C·Bᵀ per group, the causal M·X, the block state and the read of the entering state, per head.
    let ssd = g * 2.0 * q * n + nh * (q * p + 4.0 * p * n);
    c.n_layer as f64 * (mats + ssd) + 2.0 * c.vocab_rows as f64 * d
}

/// FLOPs per token of any family: Mamba-2 by [`flops_per_token`]; the others as 2 per weight (the
/// untied input embedding excepted: a lookup) plus 4 per recurrent-state element (decay-update and
/// read of the token step; the chunked form's intra-chunk part is not counted).
fn model_flops_per_token(model: &Model) -> f64 {
    if let Some(m) = model.mamba2() {
        return flops_per_token(&m.cfg);
    }
    let i = &model.info;
    let lookup = if i.tied_embeddings { 0 } else { i.vocab_rows * i.d_model };
    2.0 * (i.params - lookup) as f64 + 4.0 * i.paper_state_size as f64
}

/// Dense bf16 tensor-core FLOP/s a device can reach (measured cuBLAS, GPU.md §4), for % of floor.
fn floor_flops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    (n.contains("H100") || n.contains("H200")).then_some(800e12)
}

fn bench_model(a: &BenchArgs) -> Result<PathBuf> {
    match (&a.preset, &a.model) {
        (_, Some(m)) => Ok(m.clone()),
        (Some(p), None) => {
            let (f, dt) = (a.family, a.dtype);
            let dir = crate::defaults::cache_root().join("synth").join(format!("{f}-{p}-{dt}"));
            if !dir.join("model.safetensors").exists() {
                eprintln!("bench: writing synth preset {f} {p} ({dt}) to {}", dir.display());
                crate::synth::write(f, p, dt, 0, &dir)?;
            }
            Ok(dir)
        }
        (None, None) => bail!("bench: give --preset NAME or --model DIR"),
    }
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let tokens = a.tokens;
    let path = bench_model(&a)?;
    let model = Model::load(&path)?;
    let real = model.info.config_vocab.unwrap_or(model.info.vocab_rows).min(model.info.vocab_rows);
    let want = a.chunk.unwrap_or(if a.device.device == Device::Cuda { 65536 } else { 512 });
    let mut sc = crate::backend::open(&model, want, real, a.device.device, a.device.gpu()?)?;
    let chunk = sc.chunk();
    let mut ids = random_ids(chunk.max(1), real, 1);
    let mut nll = Vec::new();
    // Warm-up: one call (kernels JIT-compiled, cuBLAS heuristics), then the state from zero.
    sc.score(&ids[..chunk.min(ids.len())], &mut nll)?;
    sc.reset()?;
    // The stream continues from call to call (not one chunk of ids again and again), so its mean
    // NLL is the same for every chunk size and device: a check of the chunked form against the
    // token-by-token one (`--chunk 1`) on the user's own model.
    let mut stream = crate::rng::SplitMix64::new(1);
    let (mut done, mut mem_64k, mut sum) = (0u64, None, 0f64);
    let t0 = Instant::now();
    while done < tokens {
        let n = (tokens - done).min(chunk as u64) as usize;
        fill_ids(&mut stream, real, &mut ids[..n]);
        sc.score(&ids[..n], &mut nll)?;
        sum += nll.iter().map(|&v| v as f64).sum::<f64>();
        done += n as u64;
        if mem_64k.is_none() && done >= 65536 {
            mem_64k = Some(sc.mem_used()?);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mem_end = sc.mem_used()?;
    let fpt = model_flops_per_token(&model);
    let tps = tokens as f64 / secs;
    let weights = model.info.weight_bytes as f64;
    println!(
        "model        {} ({}, {} layers, d {}, {})",
        path.display(),
        model.info.family,
        model.info.n_layer,
        model.info.d_model,
        model.info.weight_dtype
    );
    println!("device       {}", sc.device_name());
    println!(
        "tokens       {tokens} in {secs:.3} s: {tps:.0} tok/s (chunk {chunk}); mean NLL {:.4}",
        sum / tokens as f64
    );
    let rate = match fpt * tps {
        r if r >= 1e12 => format!("{:.1} TFLOP/s", r / 1e12),
        r => format!("{:.1} GFLOP/s", r / 1e9),
    };
    println!("compute      {rate} achieved ({:.2} GFLOP/token)", fpt / 1e9);
    if let Some(f) = floor_flops(&sc.device_name()) {
        println!("floor        {:.1} % of {:.0} TFLOP/s (bf16 tensor cores)", 100.0 * fpt * tps / f, f / 1e12);
    }
    println!(
        "weights      {:.2} GB streamed per call: {:.1} GB/s",
        weights / 1e9,
        weights * (tokens as f64 / chunk as f64) / secs / 1e9
    );
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    match mem_64k {
        Some(m64) => {
            println!("memory       {:.3} GiB used at 64k tokens, {:.3} GiB at {tokens}", gib(m64), gib(mem_end))
        }
        None => println!("memory       {:.3} GiB used at {tokens} tokens", gib(mem_end)),
    }
    print_profile(&sc, "streamed NLL");
    if a.decode > 0 {
        // On the CPU a one-token step reads every weight it multiplies once: its bound is the
        // machine's read bandwidth at the same thread count, measured here beside it.
        let bound = (a.device.device == Device::Cpu).then(|| {
            let threads = rayon::current_num_threads();
            let bw = ReadBandwidth::measure(threads);
            println!("{bw}");
            DecodeBound { weights: decode_bytes(&model.info), state: model.info.state_bytes, bw }
        });
        time_decode(&mut sc, &ids[..1], a.decode, bound.as_ref())?;
        // The other decode path (on the GPU: fused projections against cuBLAS's), side by side.
        if sc.switch_decode_path() {
            time_decode(&mut sc, &ids[..1], a.decode, None)?;
            sc.switch_decode_path();
        }
    }
    Ok(())
}

/// Weight bytes one decode step reads: every weight, but of an untied input embedding only its row.
fn decode_bytes(i: &crate::model::ModelInfo) -> usize {
    let elem = match i.weight_dtype.as_str() {
        "f32" => 4,
        "bf16" | "f16" => 2,
        _ => 0,
    };
    let lookup = if i.tied_embeddings { 0 } else { i.vocab_rows * i.d_model * elem };
    i.weight_bytes.saturating_sub(lookup)
}

/// The machine's read bandwidth, STREAM-style: one thread, and `threads` threads each summing its
/// share of a buffer far past any cache (bytes/s, best of three passes).
struct ReadBandwidth {
    one: f64,
    threads: usize,
    all: f64,
}

/// The bytes a decode step must move (its weights once; its state read and written) and the
/// bandwidth that bounds it.
struct DecodeBound {
    weights: usize,
    state: usize,
    bw: ReadBandwidth,
}

impl ReadBandwidth {
    const BYTES: usize = 512 << 20;

    fn measure(threads: usize) -> ReadBandwidth {
        let buf: Vec<u64> = (0..(Self::BYTES / 8) as u64).collect();
        let one = Self::pass(&buf, 1);
        let all = if threads > 1 { Self::pass(&buf, threads) } else { one };
        ReadBandwidth { one, threads, all }
    }

    /// The best of three passes under each [`Prefetch`] hint: the bound is the fastest read this
    /// machine gave, whichever way the GEMVs are set to ask (on a Zen 4 EPYC the one-stream sum
    /// read up to 25 GB/s a core with `l1` in some runs, where the four-stream GEMV reads 11–16
    /// with it and 20–24 with `l2`).
    fn pass(buf: &[u64], threads: usize) -> f64 {
        let mut best = 0f64;
        for hint in Prefetch::ALL {
            for _ in 0..3 {
                let t0 = Instant::now();
                let sum = std::thread::scope(|s| {
                    let parts: Vec<_> = buf
                        .chunks(buf.len().div_ceil(threads))
                        .map(|part| s.spawn(move || sum_words(part, hint)))
                        .collect();
                    parts.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
                });
                std::hint::black_box(sum);
                best = best.max((buf.len() * 8) as f64 / t0.elapsed().as_secs_f64());
            }
        }
        best
    }
}

/// A wrapping sum in eight independent lanes (so the loop vectorises and the loads dominate), each
/// cache line asked for as far ahead as the GEMV asks for its weights, as `hint` says (without a
/// prefetch the sum read 11–12 GB/s a Xeon core where the prefetching GEMV streamed more: the bound
/// was below the step).
fn sum_words(p: &[u64], hint: Prefetch) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = p.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(0u64, |a, &b| a.wrapping_add(b));
    for c in chunks {
        stuffed_core::gemm::prefetch_line_ahead(c.as_ptr() as *const u8, hint);
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(v);
        }
    }
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

impl std::fmt::Display for ReadBandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bandwidth    read {:.1} GB/s on 1 thread", self.one / 1e9)?;
        if self.threads > 1 {
            write!(f, ", {:.1} GB/s on {}", self.all / 1e9, self.threads)?;
        }
        write!(f, " (a sum over {} MiB, best of 3 under each prefetch hint)", Self::BYTES >> 20)
    }
}

/// Greedy decode of `steps` tokens after `prompt`, timed after a warm-up (on the GPU the decode
/// step's CUDA graph is captured there, not in the timing).
fn time_decode(sc: &mut Scorer, prompt: &[u32], steps: usize, bound: Option<&DecodeBound>) -> Result<()> {
    let what = match sc.decode_path() {
        "" => String::new(),
        path => format!(", {path}"),
    };
    decode_steps(sc, prompt, steps.min(8))?;
    print_profile(sc, "");
    let t1 = Instant::now();
    let n = decode_steps(sc, prompt, steps)?;
    let per = t1.elapsed().as_secs_f64() / n as f64;
    let rate = match bound {
        Some(b) => {
            let (w, all) = (b.weights as f64 / per, (b.weights + 2 * b.state) as f64 / per);
            format!(
                ": weights read at {:.1} GB/s; with the state read and written {:.1} GB/s, {:.0} % of the read bandwidth",
                w / 1e9,
                all / 1e9,
                100.0 * all / b.bw.all
            )
        }
        None => String::new(),
    };
    println!("decode       {:.3} ms/token (greedy, batch 1, {n} tokens{what}){rate}", per * 1e3);
    print_profile(sc, "decode");
    Ok(())
}

/// With `STUFFED_PROFILE=1` on the GPU: time per kernel and GEMM since the last call (each timed
/// alone, so the sum exceeds the run's wall time a little); `what` empty discards it.
fn print_profile(sc: &Scorer, what: &str) {
    let rows = sc.take_profile();
    let total: f64 = rows.iter().map(|r| r.2).sum();
    if what.is_empty() || total == 0.0 {
        return;
    }
    println!("profile      {what}: {total:.3} s in {} ops (STUFFED_PROFILE: each op timed alone)", rows.len());
    for (name, calls, secs) in rows {
        println!("  {name:<20} {calls:>8} calls {secs:>9.4} s {:>5.1} %", 100.0 * secs / total);
    }
}

/// Greedy decoding after `prompt`, one token per step; returns the steps taken.
fn decode_steps(sc: &mut Scorer, prompt: &[u32], steps: usize) -> Result<usize> {
    sc.reset()?;
    sc.feed(prompt)?;
    Ok(sc.greedy(steps)?.len())
}

/// Largest |a − b| / max |b|, and the NMSE Σ(a − b)² / Σ b².
fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut mx, mut mref, mut se, mut sr) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let dlt = (x as f64 - y as f64).abs();
        mx = mx.max(dlt);
        mref = mref.max((y as f64).abs());
        se += dlt * dlt;
        sr += y as f64 * y as f64;
    }
    (mx / mref.max(1e-30), se / sr.max(1e-30))
}

pub fn selftest(a: SelftestArgs) -> Result<()> {
    if a.device.device == Device::Cpu {
        bail!("selftest: give --device cuda (it checks a device against the CPU core)");
    }
    let mut failed = 0;
    for path in &a.model {
        let model = Model::load(path)?;
        let real = model.info.vocab_rows;
        let ids = random_ids(a.tokens, real, 7);
        let mut cpu = crate::backend::open(&model, a.chunk, real, Device::Cpu, Default::default())?;
        let mut dev = crate::backend::open(&model, a.chunk, real, a.device.device, a.device.gpu()?)?;
        let bf16 = !a.device.gpu_f32 && (a.device.gpu_bf16 || model.info.weight_dtype == "bf16");
        let (mut nc, mut nd, mut all_c, mut all_d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for piece in ids.chunks(a.chunk) {
            cpu.score(piece, &mut nc)?;
            dev.score(piece, &mut nd)?;
            all_c.extend_from_slice(&nc);
            all_d.extend_from_slice(&nd);
        }
        let dn: Vec<f64> = all_c.iter().zip(&all_d).map(|(x, y)| (*x as f64 - *y as f64).abs()).collect();
        let (max_dn, mean_dn) = (dn.iter().cloned().fold(0.0, f64::max), dn.iter().sum::<f64>() / dn.len() as f64);
        let (c, d) = (cpu.snapshot()?, dev.snapshot()?);
        let (state_rel, _) = compare(&d.state, &c.state);
        // Logits of the last row: the CPU session's head against the device's.
        let (pc, pd) = (c.pending, d.pending);
        let (pc, pd) = (pc.unwrap_or_default(), pd.unwrap_or_default());
        let mut lc = vec![0f32; model.info.vocab_rows];
        let mut ld = vec![0f32; model.info.vocab_rows];
        let s = Session::new(&model, 1);
        s.logits(&pc, 1, &mut lc)?;
        s.logits(&pd, 1, &mut ld)?;
        let (logit_rel, logit_nmse) = compare(&ld, &lc);
        let ok = if bf16 {
            logit_nmse <= 1e-4 && mean_dn <= 1e-2
        } else {
            logit_rel <= 1e-4 && max_dn <= 1e-3 && state_rel <= 1e-4
        };
        failed += !ok as usize;
        println!(
            "{} {} ({}, {} tokens, chunk {}): NLL max|Δ| {max_dn:.2e} mean|Δ| {mean_dn:.2e}; last-row logits rel {logit_rel:.2e} NMSE {logit_nmse:.2e}; state rel {state_rel:.2e}; bound {}",
            if ok { "PASS" } else { "FAIL" },
            path.display(),
            model.info.weight_dtype,
            a.tokens,
            a.chunk,
            if bf16 { "NMSE ≤ 1e-4, mean|ΔNLL| ≤ 1e-2 (bf16)" } else { "rel ≤ 1e-4, max|ΔNLL| ≤ 1e-3 (f32)" }
        );
    }
    if failed > 0 {
        bail!("selftest: {failed} of {} models outside the bound", a.model.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_per_token_of_2_7b_is_twice_its_parameters_plus_the_scan() {
        let c = crate::synth::mamba2_config("2.7b").unwrap();
        let f = flops_per_token(&c);
        // ≈ 2 · 2.7e9 for the matmuls, plus a few hundred MFLOP for the SSD.
        assert!((5.4e9..6.2e9).contains(&f), "{f:e}");
    }
}
