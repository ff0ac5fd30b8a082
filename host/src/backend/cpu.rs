//! The CPU backend: a [`Session`] (the core's chunked forward, forgetting boundaries) and the LM
//! head fused with log-softmax and NLL, a sub-chunk of rows at a time, so `[T, V]` logits never
//! exist beyond one sub-chunk.
use super::{Backend, ScoredRows, ScorerState};
use crate::exec::Pool;
use crate::forget::{ForgetSpec, Phase};
use crate::model::Model;
use crate::session::Session;
use anyhow::{bail, Result};
use rayon::prelude::*;
use stuffed_core::error::first_non_finite;
use stuffed_core::exec::{map_rows, Exec, Simd};
use stuffed_core::ops::log_sum_exp;
use stuffed_core::Recurrent;

/// Rows of logits alive at once.
pub const SUB: usize = 64;

pub struct NllHead<'m> {
    net: &'m dyn Recurrent,
    /// The model's path, for errors.
    model: String,
    ex: Pool,
    /// Ids that may enter the softmax (the tokenizer's vocab); rows past it are padding.
    pub real: usize,
    logits: Vec<f32>,
}

impl<'m> NllHead<'m> {
    pub fn new(model: &'m Model, real: usize) -> Self {
        let net = model.net();
        let model = model.info.path.display().to_string();
        NllHead { net, model, ex: Pool::new(), real, logits: vec![0.0; SUB * net.vocab_rows()] }
    }

    /// `out[i] = logsumexp(head·hidden_i over the real vocab) − logit(targets[i])`; row i is the
    /// hidden row of stream position `pos0 + i`. A non-finite logit or NLL is an error naming it.
    pub fn nll(&mut self, hidden: &[f32], targets: &[u32], out: &mut [f32], pos0: u64) -> Result<()> {
        let (d, v) = (self.net.d_model(), self.net.vocab_rows());
        self.check_targets(targets)?;
        let ex = self.ex;
        ex.run(|| {
            let sub_rows = hidden.chunks(SUB * d).zip(targets.chunks(SUB)).zip(out.chunks_mut(SUB));
            for (k, ((h, tg), o)) in sub_rows.enumerate() {
                let rows = tg.len();
                self.net.logits(&ex, &h[..rows * d], rows, &mut self.logits[..rows * v])?;
                self.nll_of(&self.logits[..rows * v], tg, o, pos0 + (k * SUB) as u64)?;
            }
            Ok(())
        })
    }

    fn check_targets(&self, targets: &[u32]) -> Result<()> {
        match targets.iter().find(|&&t| t as usize >= self.real) {
            Some(&bad) => bail!("target token {bad} is outside the real vocab ({} ids)", self.real),
            None => Ok(()),
        }
    }

    /// The NLLs of one sub-chunk from its logits `(rows, vocab_rows)`; row 0 is at `pos0`.
    fn nll_of(&self, logits: &[f32], tg: &[u32], o: &mut [f32], pos0: u64) -> Result<()> {
        let (v, real, simd) = (self.net.vocab_rows(), self.real, self.ex.simd());
        // Through the executor, not rayon: inside `Pool::run` its team holds the workers.
        map_rows(&self.ex, o, 1, tg.len(), &|i, o| {
            let row = &logits[i * v..(i + 1) * v];
            o[0] = log_sum_exp(simd, &row[..real]) - row[tg[i] as usize];
        });
        // A NaN or infinity among a row's real logits makes its NLL non-finite: checking the
        // NLLs costs `rows` compares, not `rows · vocab`.
        if let Some(i) = first_non_finite(o) {
            let pos = pos0 + i as u64;
            let row = &logits[i * v..i * v + real];
            match first_non_finite(row) {
                Some(id) => bail!(
                    "{}: non-finite logit at position {pos} (id {id}); the LM head's weights or the final hidden row overflowed",
                    self.model
                ),
                None => bail!(
                    "{}: non-finite NLL at position {pos} (target id {}): the log-softmax overflowed",
                    self.model,
                    tg[i]
                ),
            }
        }
        Ok(())
    }
}

/// Two streams over the same tokens (`--vs-state`, `--vs-model`), each through its own model's
/// head: each stream's NLLs, exactly what [`NllHead::nll`] gives it alone, and KL(p ‖ q) of their
/// next-token distributions, from one LM head pass per stream (a sub-chunk of rows at a time).
pub struct PairHead<'m> {
    p: NllHead<'m>,
    q: NllHead<'m>,
}

impl<'m> PairHead<'m> {
    /// Stream p's rows through `p`'s head, q's through `q`'s, over the same `real` ids.
    pub fn new(p: &'m Model, q: &'m Model, real: usize) -> Self {
        PairHead { p: NllHead::new(p, real), q: NllHead::new(q, real) }
    }

    /// NLLs of the rows `p` and `q` scored into `nll_p` and `nll_q`, and `kl[i]` = KL(p_i ‖ q_i)
    /// over the real vocab in f64.
    pub fn score(
        &mut self,
        p: ScoredRows,
        q: ScoredRows,
        nll_p: &mut Vec<f32>,
        nll_q: &mut Vec<f32>,
        kl: &mut Vec<f64>,
    ) -> Result<()> {
        let (hp, hq) = (&mut self.p, &mut self.q);
        let (dp, dq, n) = (hp.net.d_model(), hq.net.d_model(), p.targets.len());
        if p.targets != q.targets || p.rows.len() != n * dp || q.rows.len() != n * dq {
            bail!("the two streams scored different positions");
        }
        let (vp, vq, real) = (hp.net.vocab_rows(), hq.net.vocab_rows(), hp.real);
        hp.check_targets(p.targets)?;
        for out in [&mut *nll_p, &mut *nll_q] {
            out.clear();
            out.resize(n, 0.0);
        }
        kl.clear();
        kl.resize(n, 0.0);
        for a in (0..n).step_by(SUB) {
            let b = (a + SUB).min(n);
            let rows = b - a;
            let (lp, lq) = (&mut hp.logits[..rows * vp], &mut hq.logits[..rows * vq]);
            let (np, nq, ex) = (hp.net, hq.net, hp.ex);
            ex.run(|| {
                np.logits(&ex, &p.rows[a * dp..b * dp], rows, lp)?;
                nq.logits(&ex, &q.rows[a * dq..b * dq], rows, lq)
            })?;
            let (lp, lq) = (&hp.logits[..rows * vp], &hq.logits[..rows * vq]);
            hp.nll_of(lp, &p.targets[a..b], &mut nll_p[a..b], p.pos0 + a as u64)?;
            hq.nll_of(lq, &q.targets[a..b], &mut nll_q[a..b], q.pos0 + a as u64)?;
            let simd = hp.ex.simd();
            // Outside `Pool::run`, so rayon's workers are free.
            lp.par_chunks(vp).zip(lq.par_chunks(vq)).zip(kl[a..b].par_iter_mut()).for_each(|((x, y), o)| {
                *o = kl_row(simd, &x[..real], &y[..real]);
            });
        }
        Ok(())
    }
}

/// KL(softmax(x) ‖ softmax(y)) in f64 (a KL of two close distributions is far below f32's
/// resolution): with `e = exp(x − max x)`, `Σ e·(x − y) / Σ e − (log Σ eˣ − log Σ eʸ)`, two
/// exponentials per id through [`exp64`], in lanes the compiler vectorises.
fn kl_row(simd: Simd, x: &[f32], y: &[f32]) -> f64 {
    #[inline(always)]
    fn max8(x: &[f32]) -> f64 {
        let mut mx = [f32::NEG_INFINITY; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                mx[l] = mx[l].max(c[l]);
            }
        }
        chunks.remainder().iter().chain(&mx).fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64
    }
    #[inline(always)]
    fn body(x: &[f32], y: &[f32]) -> f64 {
        let (mx, my) = (max8(x), max8(y));
        let (mut sx, mut sy, mut t) = ([0f64; 8], [0f64; 8], [0f64; 8]);
        let mut add = |l: usize, a: f32, b: f32| {
            let (a, b) = (a as f64, b as f64);
            let e = exp64(a - mx);
            sx[l] += e;
            t[l] += e * (a - b);
            sy[l] += exp64(b - my);
        };
        let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
        let tail = cx.remainder().iter().zip(cy.remainder());
        for (a, b) in cx.zip(cy) {
            for l in 0..8 {
                add(l, a[l], b[l]);
            }
        }
        for (l, (&a, &b)) in tail.enumerate() {
            add(l, a, b);
        }
        let (sx, sy, t): (f64, f64, f64) = (sx.iter().sum(), sy.iter().sum(), t.iter().sum());
        t / sx - ((mx - my) + (sx / sy).ln())
    }
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx512() {
        #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
        unsafe fn avx512(x: &[f32], y: &[f32]) -> f64 {
            body(x, y)
        }
        // SAFETY: the host reported AVX2, FMA and AVX-512F/VL at run time.
        return unsafe { avx512(x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd.has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], y: &[f32]) -> f64 {
            body(x, y)
        }
        // SAFETY: the host reported AVX2 and FMA at run time.
        return unsafe { avx2(x, y) };
    }
    let _ = simd;
    body(x, y)
}

/// `eˣ` in f64 for x ≤ 0 (below −708 it gives 2⁻¹⁰²¹·eʳ instead of a smaller number): branch-free,
/// so it vectorises — range reduction by ln 2 (fdlibm's hi/lo split), Taylor series to r¹² on
/// |r| ≤ ln 2 / 2 (truncation ≤ 2·10⁻¹⁶ relative), the exponent from the rounded float's bits.
#[inline(always)]
fn exp64(x: f64) -> f64 {
    // fdlibm's ln 2 split: LN2_HI has 32 trailing zero bits, so n·LN2_HI is exact for |n| < 2¹¹.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²: adding it rounds to an integer
    let x = x.clamp(-708.0, 0.0);
    let t = x * core::f64::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(1023);
    let r = x - n * LN2_HI - n * LN2_LO;
    // 1/12!, …, 1/2!, 1/1!, 1/0!
    const C: [f64; 13] = [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let mut p = C[0];
    for &c in &C[1..] {
        p = p * r + c;
    }
    p * f64::from_bits(biased << 52)
}

/// The CPU backend: the session, the NLL head, the rows of the current call and the pending row.
pub struct CpuBackend<'m> {
    session: Box<Session<'m>>,
    head: NllHead<'m>,
    rows: Vec<f32>,
    pending: Option<Vec<f32>>,
    /// The token each of the last call's scored rows predicts (the first rows of `rows`).
    targets: Vec<u32>,
    /// The stream position of the last call's row 0.
    pos0: u64,
}

impl<'m> CpuBackend<'m> {
    pub fn new(model: &'m Model, chunk: usize, real: usize) -> Result<Self> {
        crate::session::check_chunk(model, chunk)?;
        let session = Box::new(Session::new(model, chunk));
        let d = model.net().d_model();
        Ok(CpuBackend {
            head: NllHead::new(model, real),
            rows: vec![0.0; (chunk.max(1) + 1) * d],
            session,
            pending: None,
            targets: Vec::with_capacity(chunk.max(1) + 1),
            pos0: 0,
        })
    }

    /// Feeds `ids` through the session (adding probe sums when asked), keeping the last row pending.
    fn feed_with(&mut self, ids: &[u32], probe: Option<&mut [f32]>) -> Result<()> {
        let d = self.session.net().d_model();
        let mut last = vec![0f32; d];
        let mut sink = |_, h: &[f32]| {
            last.copy_from_slice(&h[h.len() - d..]);
            Ok(())
        };
        match probe {
            Some(p) => self.session.feed_probed(ids, p, &mut sink)?,
            None => self.session.feed(ids, &mut sink)?,
        }
        self.pending = Some(last);
        Ok(())
    }
}

impl Backend for CpuBackend<'_> {
    fn chunk(&self) -> usize {
        self.session.chunk
    }

    fn feed_decimated(
        &mut self,
        ids: &[u32],
        from: Option<crate::forget::DeciResume>,
        save: &mut crate::forget::DeciSave<'_>,
    ) -> Result<Vec<Vec<u32>>> {
        let ForgetSpec::DeciMamba(d) = self.session.forget else {
            bail!("a decimated prompt without --forget decimamba");
        };
        if ids.is_empty() {
            bail!("--forget decimamba: an empty prompt");
        }
        // Their `resp_len` last tokens are never dropped (at least the last: its row answers).
        let (prefix, last) = ids.split_at(ids.len() - (d.last as usize).clamp(1, ids.len()));
        let mut kept = self.session.decimate(prefix, &d, from, save)?;
        self.feed_with(last, None)?;
        kept.iter_mut().for_each(|k| k.extend(prefix.len() as u32..ids.len() as u32));
        Ok(kept)
    }

    fn score(&mut self, ids: &[u32], nll: &mut Vec<f32>) -> Result<bool> {
        let had = self.feed_rows(ids)?;
        let n = self.targets.len();
        nll.clear();
        nll.resize(n, 0.0);
        let d = self.session.net().d_model();
        self.head.nll(&self.rows[..n * d], &self.targets, nll, self.pos0)?;
        Ok(had)
    }

    fn feed_rows(&mut self, ids: &[u32]) -> Result<bool> {
        let CpuBackend { session, rows, pending, targets, pos0, .. } = self;
        let d = session.net().d_model();
        let t = ids.len();
        targets.clear();
        if rows.len() < (t + 1) * d {
            rows.resize((t + 1) * d, 0.0);
        }
        let had = pending.is_some();
        // Row 0 is the pending row (the position before this call's first token) if any.
        *pos0 = session.pos - had as u64;
        if let Some(p) = pending.take() {
            rows[..d].copy_from_slice(&p);
            targets.push(ids[0]);
        }
        let nrows = targets.len();
        session.feed(ids, &mut |off, h| {
            rows[(nrows + off) * d..(nrows + off) * d + h.len()].copy_from_slice(h);
            Ok(())
        })?;
        targets.extend_from_slice(&ids[1..]);
        *pending = Some(rows[(nrows + t - 1) * d..(nrows + t) * d].to_vec());
        Ok(had)
    }

    fn scored_rows(&self) -> Option<ScoredRows<'_>> {
        let n = self.targets.len();
        Some(ScoredRows {
            rows: &self.rows[..n * self.session.net().d_model()],
            targets: &self.targets,
            pos0: self.pos0,
        })
    }

    fn feed(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.feed_with(ids, None)
    }

    fn feed_probed(&mut self, ids: &[u32], probe: &mut [f32]) -> Result<()> {
        self.feed_with(ids, Some(probe))
    }

    fn logits(&mut self, ids: &[u32], sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        let (session, d) = (&mut self.session, self.head.net.d_model());
        let v = self.head.net.vocab_rows();
        let mut out = vec![0f32; session.chunk * v];
        let mut last = vec![0f32; d];
        let (net, ex) = (self.head.net, &self.head.ex);
        let model = session.model;
        session.feed(ids, &mut |start, h| {
            let t = h.len() / d;
            ex.run(|| net.logits(ex, h, t, &mut out[..t * v]))?;
            crate::session::check_logits(model, &out[..t * v], start as u64)?;
            last.copy_from_slice(&h[h.len() - d..]);
            sink(start, &out[..t * v])
        })?;
        self.pending = Some(last);
        Ok(())
    }

    fn greedy_each(&mut self, max_new: usize, each: &mut dyn FnMut(u32) -> Result<bool>) -> Result<()> {
        let last = self.pending.take().ok_or_else(|| anyhow::anyhow!("greedy decoding needs a prompt first"))?;
        self.session.greedy_each(&last, max_new, self.head.real, each)
    }

    fn set_phase(&mut self, phase: Phase) {
        self.session.phase = phase;
    }

    fn phase(&self) -> Phase {
        self.session.phase
    }

    fn reset(&mut self) -> Result<()> {
        self.session.reset();
        self.pending = None;
        Ok(())
    }

    fn state_len(&self) -> usize {
        self.session.state.len()
    }

    fn snapshot(&self) -> Result<ScorerState> {
        let s = &self.session;
        Ok(ScorerState { state: s.state.clone(), pending: self.pending.clone(), tau: s.tau.clone() })
    }

    fn restore(&mut self, from: &ScorerState, pos: u64) -> Result<()> {
        let d = self.head.net.d_model();
        if from.state.len() != self.session.state.len() || from.pending.as_ref().is_some_and(|p| p.len() != d) {
            bail!(
                "a saved state of {} values (pending row {:?}), where the model's state has {} (rows of {d})",
                from.state.len(),
                from.pending.as_ref().map(Vec::len),
                self.session.state.len()
            );
        }
        self.session.state.copy_from_slice(&from.state);
        self.session.tau = from.tau.clone();
        self.session.pos = pos;
        self.pending = from.pending.clone();
        Ok(())
    }

    fn device_name(&self) -> String {
        let record = crate::exec::matmul_record(self.session.model.matrix_dtypes());
        let asked = match record.get("fast_matmul") {
            Some(_) => " (--fast-matmul changes nothing here: no bf16 products)",
            None => "",
        };
        format!(
            "CPU, {} threads, {} kernel, {} matmul{asked}, {} prefetch",
            rayon::current_num_threads(),
            record["simd"].as_str().unwrap_or("?"),
            record["mode"].as_str().unwrap_or("?"),
            stuffed_core::gemm::prefetch().name()
        )
    }

    fn mem_used(&self) -> Result<usize> {
        Ok(crate::report::peak_rss_bytes() as usize)
    }
}

/// What the CPU core finds running `ids` from the zero state (each layer checked; then the NLL
/// head): where a NaN that comes from the weights first appears. A non-finite value that needs the
/// stream's state before the call is not reproduced, and the line says so.
#[cfg_attr(not(gpu), allow(dead_code))]
pub(super) fn cpu_rerun(model: &Model, ids: &[u32], real: usize) -> String {
    let run = || -> Result<()> {
        let mut s = CpuBackend::new(model, ids.len().clamp(1, 512), real)?;
        s.score(ids, &mut Vec::new()).map(|_| ())
    };
    match run() {
        Err(e) => format!("the CPU rerun of this call's {} tokens from the zero state: {e:#}", ids.len()),
        Ok(()) => format!(
            "the CPU rerun of this call's {} tokens from the zero state stays finite (it needs the stream's state)",
            ids.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{exp64, kl_row};
    use stuffed_core::exec::Simd;

    #[test]
    fn exp64_is_libm_to_an_ulp_or_two() {
        let mut worst = 0f64;
        let mut x = -708.0f64;
        while x <= 0.0 {
            let (a, b) = (exp64(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.000_913_7;
        }
        assert!(worst < 4.5e-16, "worst relative error {worst}");
        assert_eq!(exp64(0.0), 1.0);
        assert!(exp64(f64::NEG_INFINITY) < 1e-307 && exp64(f64::NAN).is_nan());
    }

    /// `n` seeded logits, uniform in [−scale/2, scale/2).
    fn logits(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * scale - scale / 2.0).collect()
    }

    /// The definition, Σ p (log p − log q), with libm exponentials and compensated sums.
    fn kl_reference(x: &[f32], y: &[f32]) -> f64 {
        fn kahan(it: impl Iterator<Item = f64>) -> f64 {
            let (mut s, mut c) = (0f64, 0f64);
            for v in it {
                let t = s + (v - c);
                c = (t - s) - (v - c);
                s = t;
            }
            s
        }
        let lse = |v: &[f32]| {
            let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            m + kahan(v.iter().map(|&t| (t as f64 - m).exp())).ln()
        };
        let (zx, zy) = (lse(x), lse(y));
        kahan(x.iter().zip(y).map(|(&a, &b)| {
            let la = a as f64 - zx;
            la.exp() * (la - (b as f64 - zy))
        }))
    }

    /// Every SIMD path the machine has, on vocab sizes with and without a tail of 8, from equal
    /// distributions (KL 0, also under a constant shift) to far apart ones.
    #[test]
    fn kl_row_matches_the_definition() {
        let cpu = crate::exec::cpu_simd();
        let paths = [(Simd::Portable, true), (Simd::Avx2, cpu.has_avx2()), (Simd::Avx512, cpu.has_avx512())];
        for simd in paths.into_iter().filter(|p| p.1).map(|p| p.0) {
            for n in [1usize, 7, 8, 17, 50_277] {
                let x = logits(n as u64, n, 20.0);
                let near: Vec<f32> = x.iter().zip(logits(7, n, 1e-3)).map(|(a, d)| a + d).collect();
                let far = logits(99, n, 20.0);
                let shifted: Vec<f32> = x.iter().map(|a| a + 3.0).collect();
                for (y, what) in [(&x, "equal"), (&shifted, "shifted"), (&near, "near"), (&far, "far")] {
                    let (got, want) = (kl_row(simd, &x, y), kl_reference(&x, y));
                    let tol = 1e-14 + 1e-10 * want.abs();
                    assert!((got - want).abs() <= tol, "{simd:?} n {n} {what}: {got:e} vs {want:e}");
                }
            }
        }
    }
}
