//! Mamba-2 on the GPU: the launch sequence of `stuffed_core::mamba2::Mamba2::run` (chunked SSD),
//! the LM head with a fused log-softmax/NLL, and greedy argmax. State layout and math are the
//! core's; matmuls go through cuBLAS with the weights in their stored type (bf16, or f32; f16 is
//! widened to f32), activations and state in f32.
use super::{i, Arg, DBuf, DType, Gpu};
use crate::forget::{Boundary, ForgetSpec, Phase};
use crate::gpumem::{self, Sizes, GPU_Q, NLL_ROWS};
use crate::model::Model;
use anyhow::{anyhow, bail, Context, Result};
use half::bf16;
use stuffed_core::mamba2::Config;
use stuffed_core::{Data, Forget, Recurrent, Weight};

mod head;

/// One layer's weights on the device: matrices in the model's matmul type, vectors in f32.
struct Layer {
    norm: DBuf,
    in_proj: DBuf,
    in_bias: Option<DBuf>,
    conv_w: DBuf,
    conv_b: Option<DBuf>,
    dt_bias: DBuf,
    /// A_log, plus ln s under `decay:s` (A′ = s·A: the device copy is derived anyway).
    a_log: DBuf,
    /// The factor on Δ: `dt:c`, or this layer's of `dt:c=…/…`; else 1.
    dt_scale: f32,
    /// LongMamba's thresholds per head (`longmamba:file=…`), one buffer per target length.
    dt_thresholds: Vec<DBuf>,
    d: DBuf,
    d_per_channel: bool,
    gate_norm: DBuf,
    out_proj: DBuf,
    out_bias: Option<DBuf>,
}

pub struct GpuMamba2 {
    pub gpu: Gpu,
    pub cfg: Config,
    /// The matmul operand type.
    pub dt: DType,
    /// Ids that may enter the softmax and the argmax.
    pub real: usize,
    /// The most tokens one call may hold.
    pub chunk: usize,
    /// Rows of logits alive at once.
    pub sub: usize,
    /// The model's path, for errors.
    pub model_path: String,
    embed: DBuf,
    head: Option<DBuf>,
    norm_f: DBuf,
    layers: Vec<Layer>,
    /// The recurrent state, f32, in the core's layout (per layer: conv (k−1, cd), then ssm (H, P, N);
    /// with window forgetting then each layer's window cache and (position mod r, filled)).
    pub state: DBuf,
    state_len: usize,
    /// Whether hidden row 0 holds the previous call's last row (it predicts this call's first token).
    pub has_pending: bool,
    forget: Forget,
    tok: DBuf,    // (chunk) u32
    x: DBuf,      // (chunk, d) f32: the residual stream
    h: DBuf,      // (chunk, max(d, di)) dt: matmul inputs
    zx: DBuf,     // (chunk, nin) f32: z | xBC | dt_raw
    u: DBuf,      // (nb·Q, cd) f32: conv + SiLU output (rows past the call's tokens are never used)
    dtb: DBuf,    // (chunk, H) f32: Δ
    cum: DBuf,    // (chunk, H) f32: cumulative log decay per SSD block
    y: DBuf,      // (chunk, di) f32: SSM output
    st: DBuf,     // (nb, H, P, N) f32: block states; nb = ⌈chunk/Q⌉
    cb: DBuf,     // (nb, G, Q, Q) f32: C·Bᵀ within each block
    hidden: DBuf, // (chunk + 1, d) dt: final-normed rows; row 0 = pending row
    logits: DBuf, // (sub, Vp) f32
    tgt: DBuf,    // (chunk + 1) u32
    nll: DBuf,    // (chunk + 1) f32
    am: DBuf,     // (sub) u32
    lse: DBuf,    // (NLL_ROWS, 3) f32: the NLL's running max, sum and target logit per row
    /// Reset and state normalization act between calls, at document positions (as `Session`).
    spec: ForgetSpec,
    /// Which tokens the next calls feed: LongMamba's thresholds apply where `spec` acts in it.
    pub phase: Phase,
    /// Tokens fed since the last reset: the document position.
    pos: u64,
    tau: DBuf, // (n_layer, H) f32: state normalization's per-head norms, once calibrated
    tau_set: bool,
    bad: DBuf, // (CHECK_BLOCKS) f32: non-finite counts
    /// One-token calls through cuBLAS instead of the fused norm + GEMV kernels (`--gpu-decode-cublas`,
    /// to compare them).
    cublas_decode: bool,
    /// The captured greedy step (`decode_step`), made on first use.
    #[cfg(feature = "cuda")]
    decode_graph: Option<super::Graph>,
}

/// A vector weight as f32 on the device.
fn vec_f32(w: &Weight) -> Result<DBuf> {
    let mut v = vec![0f32; w.len()];
    w.read(0, &mut v);
    DBuf::from(&v)
}

/// A matrix weight on the device in type `dt`; bf16 stays as stored, anything else converts.
fn mat(w: &Weight, dt: DType) -> Result<DBuf> {
    match (dt, w.data) {
        (DType::Bf16, Data::Bf16(s)) => DBuf::from(bytemuck::cast_slice::<bf16, u16>(s)),
        (DType::F32, Data::F32(s)) => DBuf::from(s),
        (DType::F32, _) => vec_f32(w),
        (DType::Bf16, _) => {
            let mut v = vec![0f32; w.len()];
            w.read(0, &mut v);
            let b: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
            DBuf::from(&b)
        }
    }
}

/// Where a weight's data starts (a tied head shares the embedding's).
fn data_ptr(w: &Weight) -> *const u8 {
    match w.data {
        Data::F32(s) => s.as_ptr() as *const u8,
        Data::Bf16(s) => s.as_ptr() as *const u8,
        Data::F16(s) => s.as_ptr() as *const u8,
    }
}

/// Rows `(n, d)` of type `dt` → f32 on the host.
fn rows_to_f32(dt: DType, raw: &[u8]) -> Vec<f32> {
    match dt {
        DType::F32 => bytemuck::pod_collect_to_vec(raw),
        DType::Bf16 => raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

fn rows_from_f32(dt: DType, v: &[f32]) -> Vec<u8> {
    match dt {
        DType::F32 => bytemuck::cast_slice(v).to_vec(),
        DType::Bf16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
    }
}

/// The model's Mamba-2 net, or one error line for the other families.
fn mamba2_of(model: &Model) -> Result<&stuffed_core::mamba2::Mamba2<'_>> {
    model.mamba2().ok_or_else(|| anyhow!("{}: --device cuda runs Mamba-2 models only", model.info.path.display()))
}

/// The matmul type of a model: bf16 when its in_proj is stored bf16 (or `force`), else f32.
pub fn matmul_type(model: &Model, force: Option<DType>) -> Result<DType> {
    let m = mamba2_of(model)?;
    Ok(force.unwrap_or(match m.w.layers[0].in_proj.data {
        Data::Bf16(_) => DType::Bf16,
        _ => DType::F32,
    }))
}

/// The sizes `gpumem::plan` needs for this model.
pub fn sizes(model: &Model, dt: DType) -> Result<Sizes> {
    let m = mamba2_of(model)?;
    Ok(Sizes::mamba2(&m.cfg, dt.size(), data_ptr(&m.w.head) != data_ptr(&m.w.embed)))
}

/// `KS` of ptx/mamba2.cu: the contraction slice staged in shared memory.
const SSD_KS: usize = 16;
/// Rows of a projection per CUDA block in the fused decode kernels (8 warps, 2 rows each).
const DECODE_ROWS: usize = 16;
/// Vocab columns per tile of the NLL head: (NLL_ROWS × VOCAB_TILE) f32 logits = 16 MiB, inside L2.
const VOCAB_TILE: usize = 2048;
/// Blocks of `count_nonfinite`.
const CHECK_BLOCKS: usize = 128;

/// How a chunked-SSD kernel is launched: its grid, dynamic shared memory, and the tile width it takes
/// as an argument (`nw` of ssd_chunk_state, `ti` of ssd_chunk_scan). One place for the engine and the
/// kernel contract tests.
#[derive(Clone, Copy, Debug)]
pub struct SsdLaunch {
    pub grid: (u32, u32),
    pub shared_bytes: u32,
    pub width: usize,
}

/// P rounded up to the 16 of a tensor-core tile.
fn padded_p(p: usize) -> usize {
    p.div_ceil(16) * 16
}

impl SsdLaunch {
    /// ssd_chunk_state over `nb` blocks: the columns of N per CUDA block are a multiple of 16 with
    /// Pp·nw ≤ 8192 and Pp + nw ≤ 256, so output tile and staging fit in shared memory.
    pub fn chunk_state(nh: usize, p: usize, n: usize, nb: usize) -> SsdLaunch {
        let pp = padded_p(p);
        let nw = ((8192 / pp).min(256 - pp) / 16 * 16).min(n.div_ceil(16) * 16);
        let shared = (GPU_Q + (2 * SSD_KS * (pp + nw)).max(pp * nw)) * 4;
        SsdLaunch { grid: ((nh * n.div_ceil(nw)) as u32, nb as u32), shared_bytes: shared as u32, width: nw }
    }

    /// ssd_chunk_scan over `nb` blocks: rows per CUDA block as many as fit 32 output tiles, so each
    /// block state is read few times.
    pub fn chunk_scan(nh: usize, p: usize, nb: usize) -> SsdLaunch {
        let pp = padded_p(p);
        let ti = [256, 128, 64].into_iter().find(|&r| r * pp <= 8192).unwrap_or(64);
        let shared = (2 * GPU_Q + (2 * SSD_KS * (ti + pp)).max(ti * pp)) * 4;
        SsdLaunch { grid: (nh as u32, (nb * GPU_Q / ti) as u32), shared_bytes: shared as u32, width: ti }
    }
}

/// The kernels that read weights or write matmul operands, in the engine's matmul dtype: named
/// once here (candle's `kernel_name::<T>` habit) rather than chosen at each launch.
struct Kernels {
    embed: &'static str,
    rmsnorm: &'static str,
    gated_norm: &'static str,
    decode_in: &'static str,
    decode_out: &'static str,
}

impl Kernels {
    fn of(dt: DType) -> Kernels {
        match dt {
            DType::Bf16 => Kernels {
                embed: "embed_bf16",
                rmsnorm: "rmsnorm_bf16",
                gated_norm: "gated_norm_bf16",
                decode_in: "decode_in_bf16",
                decode_out: "decode_out_bf16",
            },
            DType::F32 => Kernels {
                embed: "embed_f32",
                rmsnorm: "rmsnorm_f32",
                gated_norm: "gated_norm_f32",
                decode_in: "decode_in_f32",
                decode_out: "decode_out_f32",
            },
        }
    }
}

impl GpuMamba2 {
    /// Uploads `model` and sizes every buffer for calls of up to `chunk` tokens (rounded down to fit
    /// `max_mem` bytes, or the free device memory).
    pub fn new(model: &Model, chunk: usize, max_mem: Option<usize>, force: Option<DType>, real: usize) -> Result<Self> {
        let path = model.info.path.display().to_string();
        let m = mamba2_of(model)?;
        let forget = m.forget();
        let c = m.cfg;
        // A window call holds at most r tokens (as on the CPU).
        let chunk = match forget {
            Forget::Window { r } => chunk.clamp(1, r),
            _ => chunk,
        };
        if c.head_dim > 128 || c.n_heads % c.n_groups != 0 {
            bail!("{path}: --device cuda supports head_dim ≤ 128 (this model: {})", c.head_dim);
        }
        let dt = matmul_type(model, force)?;
        let gpu = Gpu::new()?;
        let (free, _) = Gpu::mem_info()?;
        // Leave room for cuBLAS's workspace and the allocator's rounding.
        let budget = max_mem.unwrap_or(usize::MAX).min(free.saturating_sub(512 << 20));
        let mut sz = sizes(model, dt)?;
        // The state as the core lays it out: with window forgetting, each layer's window cache too.
        let state_len = m.state_len();
        sz.state = state_len * 4;
        let plan = gpumem::plan(&sz, chunk, budget).with_context(|| format!("{path} on {}", gpu.name))?;
        let (chunk, sub) = (plan.chunk, plan.sub);
        let (d, di, nh, cd, nin) = (c.d_model, c.d_inner(), c.n_heads, c.conv_dim(), c.in_proj_rows());
        let mut layers = Vec::with_capacity(c.n_layer);
        for (li, l) in m.w.layers.iter().enumerate() {
            let ln_s = forget.a_scale(li).ln();
            let a_log: Vec<f32> = (0..l.a_log.len()).map(|h| l.a_log.get(h) + ln_s).collect();
            layers.push(Layer {
                norm: vec_f32(&l.norm)?,
                in_proj: mat(&l.in_proj, dt)?,
                in_bias: l.in_proj_bias.as_ref().map(vec_f32).transpose()?,
                conv_w: vec_f32(&l.conv_w)?,
                conv_b: l.conv_b.as_ref().map(vec_f32).transpose()?,
                dt_bias: vec_f32(&l.dt_bias)?,
                a_log: DBuf::from(&a_log)?,
                dt_scale: forget.dt_scale(li),
                dt_thresholds: match model.forget {
                    ForgetSpec::LongMamba { table, .. } => {
                        let t = table.table();
                        (0..t.targets.len()).map(|i| DBuf::from(t.thresholds(i)?.layer(li))).collect::<Result<_>>()?
                    }
                    _ => Vec::new(),
                },
                d: vec_f32(&l.d)?,
                d_per_channel: l.d.len() == di,
                gate_norm: vec_f32(&l.gate_norm)?,
                out_proj: mat(&l.out_proj, dt)?,
                out_bias: l.out_proj_bias.as_ref().map(vec_f32).transpose()?,
            });
        }
        let tied = data_ptr(&m.w.head) == data_ptr(&m.w.embed);
        let f = 4usize;
        let nb = chunk.div_ceil(GPU_Q);
        Ok(GpuMamba2 {
            embed: mat(&m.w.embed, dt)?,
            head: if tied { None } else { Some(mat(&m.w.head, dt)?) },
            norm_f: vec_f32(&m.w.norm_f)?,
            layers,
            state: DBuf::zeroed(state_len * f)?,
            state_len,
            has_pending: false,
            forget,
            tok: DBuf::new(chunk * 4)?,
            x: DBuf::new(chunk * d * f)?,
            h: DBuf::new(chunk * d.max(di) * dt.size())?,
            zx: DBuf::new(chunk * nin * f)?,
            u: DBuf::new(nb * GPU_Q * cd * f)?,
            dtb: DBuf::new(chunk * nh * f)?,
            cum: DBuf::new(chunk * nh * f)?,
            y: DBuf::new(chunk * di * f)?,
            st: DBuf::new(nb * c.ssm_len() * f)?,
            cb: DBuf::new(nb * c.n_groups * GPU_Q * GPU_Q * f)?,
            hidden: DBuf::new((chunk + 1) * d * dt.size())?,
            logits: DBuf::new(sub * c.vocab_rows * f)?,
            tgt: DBuf::new((chunk + 1) * 4)?,
            nll: DBuf::new((chunk + 1) * 4)?,
            am: DBuf::new(sub * 4)?,
            lse: DBuf::new(NLL_ROWS * 3 * 4)?,
            spec: model.forget,
            phase: Phase::default(),
            pos: 0,
            tau: DBuf::new(c.n_layer * nh * f)?,
            tau_set: false,
            bad: DBuf::new(CHECK_BLOCKS * f)?,
            cublas_decode: false,
            #[cfg(feature = "cuda")]
            decode_graph: None,
            gpu,
            cfg: c,
            dt,
            real,
            chunk,
            sub,
            model_path: path,
        })
    }

    /// Tokens consumed since the last reset (the stream position of the next token).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether one-token calls go through cuBLAS (else the fused decode kernels).
    pub fn cublas_decode(&self) -> bool {
        self.cublas_decode
    }

    /// Switches one-token calls between cuBLAS and the fused kernels (a captured decode step is
    /// dropped: it holds the other launches).
    pub fn set_cublas_decode(&mut self, on: bool) {
        self.cublas_decode = on;
        #[cfg(feature = "cuda")]
        {
            self.decode_graph = None;
        }
    }

    /// Device bytes this engine holds.
    pub fn bytes(&self) -> usize {
        let bufs = [
            &self.embed,
            &self.norm_f,
            &self.state,
            &self.tok,
            &self.x,
            &self.h,
            &self.zx,
            &self.u,
            &self.dtb,
            &self.cum,
            &self.y,
            &self.st,
            &self.cb,
            &self.hidden,
            &self.logits,
            &self.tgt,
            &self.nll,
            &self.am,
            &self.lse,
            &self.tau,
            &self.bad,
        ];
        let layer = |l: &Layer| {
            [&l.norm, &l.in_proj, &l.conv_w, &l.dt_bias, &l.a_log, &l.d, &l.gate_norm, &l.out_proj]
                .iter()
                .map(|b| b.bytes)
                .sum::<usize>()
                + [&l.in_bias, &l.conv_b, &l.out_bias].iter().filter_map(|b| b.as_ref()).map(|b| b.bytes).sum::<usize>()
        };
        bufs.iter().map(|b| b.bytes).sum::<usize>()
            + self.head.as_ref().map_or(0, |b| b.bytes)
            + self.layers.iter().map(layer).sum::<usize>()
    }

    pub fn reset(&mut self) -> Result<()> {
        self.has_pending = false;
        self.pos = 0;
        self.tau_set = false;
        self.state.zero()
    }

    pub fn state_len(&self) -> usize {
        self.state_len
    }

    pub fn download_state(&self, out: &mut [f32]) -> Result<()> {
        self.gpu.sync()?;
        self.state.download(0, out)
    }

    pub fn upload_state(&mut self, s: &[f32]) -> Result<()> {
        if s.len() != self.state_len() {
            bail!("state has {} values, the model needs {}", s.len(), self.state_len());
        }
        self.gpu.sync()?;
        self.state.upload(0, s)
    }

    /// State normalization's τ per (layer, head), empty until calibrated (a checkpoint's part).
    pub fn tau(&self) -> Result<Vec<f32>> {
        if !self.tau_set {
            return Ok(Vec::new());
        }
        let mut t = vec![0f32; self.cfg.n_layer * self.cfg.n_heads];
        self.gpu.sync()?;
        self.tau.download(0, &mut t)?;
        Ok(t)
    }

    /// Continues at document position `pos` with τ as checkpointed (empty: not calibrated).
    pub fn set_position(&mut self, pos: u64, tau: &[f32]) -> Result<()> {
        self.pos = pos;
        self.tau_set = !tau.is_empty();
        if self.tau_set {
            if tau.len() != self.cfg.n_layer * self.cfg.n_heads {
                bail!("τ has {} values, the model needs {}", tau.len(), self.cfg.n_layer * self.cfg.n_heads);
            }
            self.gpu.sync()?;
            self.tau.upload(0, tau)?;
        }
        Ok(())
    }

    /// The pending row (the last fed token's final-normed hidden row), as f32.
    pub fn pending_row(&self) -> Result<Option<Vec<f32>>> {
        if !self.has_pending {
            return Ok(None);
        }
        Ok(Some(self.hidden_rows(0, 1)?))
    }

    pub fn set_pending_row(&mut self, row: Option<&[f32]>) -> Result<()> {
        self.has_pending = row.is_some();
        if let Some(r) = row {
            self.gpu.sync()?;
            self.hidden.upload(0, &rows_from_f32(self.dt, r))?;
        }
        Ok(())
    }

    /// `count` hidden rows from row `first` (row 0 = pending, rows 1..=t = the last call's), as f32.
    pub fn hidden_rows(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        let rb = self.cfg.d_model * self.dt.size();
        let mut raw = vec![0u8; count * rb];
        self.gpu.sync()?;
        self.hidden.download(first * rb, &mut raw)?;
        Ok(rows_to_f32(self.dt, &raw))
    }

    fn nb(t: usize) -> usize {
        t.div_ceil(GPU_Q)
    }

    /// Runs `tokens` (at most `chunk`, ids checked by the caller) from the state, leaving their
    /// final-normed rows in hidden rows 1..=t. With `probe`, adds the probe sums `(n_layer, 4, H)`
    /// (device, f32) of these tokens.
    pub fn forward(&mut self, tokens: &[u32], probe: Option<&DBuf>) -> Result<()> {
        let t = tokens.len();
        if t == 0 {
            return Ok(());
        }
        if t > self.chunk {
            bail!("CUDA: a call of {t} tokens exceeds the planned chunk of {}", self.chunk);
        }
        self.gpu.sync()?;
        self.tok.upload(0, tokens)?;
        self.run(self.tok.ptr(), t, probe)
    }

    /// [`GpuMamba2::forward`] of `t ≥ 1` token ids already on the device at `tok`; issues work on the
    /// stream only (no host transfers), so a decode step can be captured as a graph.
    fn run(&self, tok: u64, t: usize, probe: Option<&DBuf>) -> Result<()> {
        let c = self.cfg;
        let (d, di, nh, p, n, g) = (c.d_model, c.d_inner(), c.n_heads, c.head_dim, c.d_state, c.n_groups);
        let cd = c.conv_dim();
        let (la, _) = self.forget_params();
        let gpu = &self.gpu;
        let k = Kernels::of(self.dt);
        gpu.launch_n(k.embed, t * d, &[Arg::Ptr(self.embed.ptr()), Arg::Ptr(tok), Arg::Ptr(self.x.ptr()), i(t), i(d)])?;
        let ls = c.layer_state_len();
        for (li, l) in self.layers.iter().enumerate() {
            let cs = self.state.at(li * ls * 4);
            let ssm = self.state.at((li * ls + c.conv_len()) * 4);
            self.in_proj(t, l)?;
            self.mixer(t, l, cs, ssm)?;
            if let Forget::Window { r } = self.forget {
                self.window(li, t, r, l, la, ssm)?;
            }
            if let Some(pb) = probe {
                let off = li * 4 * nh * 4;
                let mut args = vec![
                    Arg::Ptr(self.u.ptr()),
                    Arg::Ptr(self.dtb.ptr()),
                    Arg::Ptr(l.a_log.ptr()),
                    Arg::Ptr(pb.at(off)),
                ];
                args.extend([i(t), i(nh), i(p), i(n), i(g), i(cd), i(di), Arg::F32(la)]);
                gpu.launch("probe_sums", (nh as u32, 1), 256, 0, &args)?;
            }
            self.out_proj(t, l)?;
        }
        if let Forget::Window { r } = self.forget {
            let meta = self.state.at((self.state_len - 2) * 4);
            gpu.launch("window_meta", (1, 1), 32, 0, &[Arg::Ptr(meta), i(t), i(r)])?;
        }
        let row1 = self.hidden.at(d * self.dt.size());
        gpu.launch(
            k.rmsnorm,
            (t as u32, 1),
            256,
            0,
            &[Arg::Ptr(self.x.ptr()), Arg::Ptr(self.norm_f.ptr()), Arg::Ptr(row1), i(d), Arg::F32(c.eps)],
        )
    }

    /// Whether a call of `t` tokens takes the fused decode projections (`decode_in`, `decode_out`):
    /// one token, not switched off, and the normed row (f32) fits 32 KiB of shared memory.
    fn fused_decode(&self, t: usize) -> bool {
        t == 1 && !self.cublas_decode && self.cfg.d_model.max(self.cfg.d_inner()) <= 8192
    }

    /// zx = RMSNorm(x)·W_inᵀ (+ bias) of layer `l` over `t` tokens.
    fn in_proj(&self, t: usize, l: &Layer) -> Result<()> {
        let c = self.cfg;
        let (d, nin, gpu) = (c.d_model, c.in_proj_rows(), &self.gpu);
        let k = Kernels::of(self.dt);
        if self.fused_decode(t) {
            let args = [
                Arg::Ptr(self.x.ptr()),
                Arg::Ptr(l.norm.ptr()),
                Arg::Ptr(l.in_proj.ptr()),
                Arg::Ptr(l.in_bias.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(self.zx.ptr()),
                i(d),
                i(nin),
                Arg::F32(c.eps),
                i(DECODE_ROWS),
            ];
            return gpu.launch(k.decode_in, (nin.div_ceil(DECODE_ROWS) as u32, 1), 256, (d * 4) as u32, &args);
        }
        gpu.launch(
            k.rmsnorm,
            (t as u32, 1),
            256,
            0,
            &[Arg::Ptr(self.x.ptr()), Arg::Ptr(l.norm.ptr()), Arg::Ptr(self.h.ptr()), i(d), Arg::F32(c.eps)],
        )?;
        gpu.timed("gemm in_proj", || {
            gpu.blas.gemm_nt(self.dt, t, nin, d, self.h.ptr(), l.in_proj.ptr(), self.zx.ptr(), 0.0)
        })?;
        self.add_bias(&self.zx, l.in_bias.as_ref(), t, nin)
    }

    /// y (t, n) += bias (n), when the layer has one.
    fn add_bias(&self, y: &DBuf, bias: Option<&DBuf>, t: usize, n: usize) -> Result<()> {
        match bias {
            Some(b) => {
                self.gpu.launch_n("add_bias", t * n, &[Arg::Ptr(y.ptr()), Arg::Ptr(b.ptr()), Arg::I64(t as i64), i(n)])
            }
            None => Ok(()),
        }
    }

    /// x += GroupRMSNorm(y ⊙ silu(z))·W_outᵀ (+ bias) of layer `l` over `t` tokens.
    fn out_proj(&self, t: usize, l: &Layer) -> Result<()> {
        let c = self.cfg;
        let (d, di, g, gpu) = (c.d_model, c.d_inner(), c.n_groups, &self.gpu);
        let k = Kernels::of(self.dt);
        if self.fused_decode(t) {
            let args = [
                Arg::Ptr(self.y.ptr()),
                Arg::Ptr(self.zx.ptr()),
                Arg::Ptr(l.gate_norm.ptr()),
                Arg::Ptr(l.out_proj.ptr()),
                Arg::Ptr(l.out_bias.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(self.x.ptr()),
                i(di),
                i(d),
                i(di / g),
                Arg::F32(c.eps),
                i(DECODE_ROWS),
            ];
            return gpu.launch(k.decode_out, (d.div_ceil(DECODE_ROWS) as u32, 1), 256, (di * 4) as u32, &args);
        }
        gpu.launch(
            k.gated_norm,
            (t as u32, g as u32),
            256,
            0,
            &[
                Arg::Ptr(self.y.ptr()),
                Arg::Ptr(self.zx.ptr()),
                Arg::Ptr(l.gate_norm.ptr()),
                Arg::Ptr(self.h.ptr()),
                i(di),
                i(c.in_proj_rows()),
                i(di / g),
                Arg::F32(c.eps),
            ],
        )?;
        gpu.timed("gemm out_proj", || {
            gpu.blas.gemm_nt(self.dt, t, d, di, self.h.ptr(), l.out_proj.ptr(), self.x.ptr(), 1.0)
        })?;
        self.add_bias(&self.x, l.out_bias.as_ref(), t, d)
    }

    /// One layer's conv, Δ and SSD over `t` tokens (zx → u, dtb → y), from and into its conv state
    /// `cs` and SSM state `ssm`: the recurrent step for one token, the chunked SSD otherwise.
    fn mixer(&self, t: usize, l: &Layer, cs: u64, ssm: u64) -> Result<()> {
        let c = self.cfg;
        let (di, nh, p, n, g, k) = (c.d_inner(), c.n_heads, c.head_dim, c.d_state, c.n_groups, c.d_conv);
        let (cd, nin, gn) = (c.conv_dim(), c.in_proj_rows(), c.n_groups * c.d_state);
        let (la, b_scale) = self.forget_params();
        let th = self.dt_threshold(l);
        let gpu = &self.gpu;
        let cb = l.conv_b.as_ref().map_or(0, |b| b.ptr());
        if t == 1 {
            // Decode: conv, history shift and Δ in one kernel, then the recurrent SSD step.
            gpu.launch_n(
                "conv_step",
                cd + nh,
                &[
                    Arg::Ptr(self.zx.ptr()),
                    Arg::Ptr(cs),
                    Arg::Ptr(l.conv_w.ptr()),
                    Arg::Ptr(cb),
                    Arg::Ptr(self.u.ptr()),
                    Arg::Ptr(l.dt_bias.ptr()),
                    Arg::Ptr(self.dtb.ptr()),
                    i(nin),
                    i(di),
                    i(cd),
                    i(k),
                    i(gn),
                    i(nh),
                    Arg::F32(b_scale),
                    Arg::F32(c.dt_min),
                    Arg::F32(c.dt_max),
                    Arg::F32(l.dt_scale),
                    Arg::Ptr(th),
                ],
            )?;
            gpu.launch(
                "ssd_step",
                (nh as u32, 1),
                256,
                0,
                &[
                    Arg::Ptr(self.u.ptr()),
                    Arg::Ptr(self.dtb.ptr()),
                    Arg::Ptr(l.a_log.ptr()),
                    Arg::Ptr(ssm),
                    Arg::Ptr(l.d.ptr()),
                    Arg::I32(l.d_per_channel as i32),
                    Arg::Ptr(self.y.ptr()),
                    i(nh),
                    i(p),
                    i(n),
                    i(g),
                    i(di),
                    Arg::F32(la),
                ],
            )?;
        } else {
            // conv + SiLU of B and C with the carried history (x's is the block-state kernel's); the
            // SSD; then the new history
            gpu.launch_n(
                "conv_bc",
                t * (cd - di),
                &[
                    Arg::Ptr(self.zx.ptr()),
                    Arg::Ptr(cs),
                    Arg::Ptr(l.conv_w.ptr()),
                    Arg::Ptr(cb),
                    Arg::Ptr(self.u.ptr()),
                    i(t),
                    i(nin),
                    i(di),
                    i(cd),
                    i(k),
                    i(gn),
                    Arg::F32(b_scale),
                ],
            )?;
            self.ssd_chunked(t, l, cs, ssm)?;
            gpu.launch_n(
                "conv_state_update",
                cd,
                &[Arg::Ptr(self.zx.ptr()), Arg::Ptr(cs), i(t), i(nin), i(di), i(cd), i(k)],
            )?;
        }
        Ok(())
    }

    /// Layer `l`'s LongMamba thresholds on the device for this phase's target (the nearest to the
    /// prompt's length), or null where the filter does not act on its tokens (decoded ones, a short
    /// prompt).
    fn dt_threshold(&self, l: &Layer) -> u64 {
        self.spec.longmamba_target(self.phase).and_then(|i| l.dt_thresholds.get(i)).map_or(0, DBuf::ptr)
    }

    /// (log a per token, B scale) of RRI; neutral otherwise. (Δ's factor and thresholds are the
    /// layer's: [`Layer::dt_scale`], [`Layer::dt_thresholds`].)
    fn forget_params(&self) -> (f32, f32) {
        match self.forget {
            Forget::Rri { a, b } => (a.ln(), b),
            _ => (0.0, 1.0),
        }
    }

    /// Window forgetting of layer `li` after its SSD wrote `y` (`Mamba2::window`): the lagged state
    /// read-out subtracted per head, this call's inputs cached in the ring, and, when the ring
    /// turned over, the state `ssm` rebuilt from it.
    fn window(&self, li: usize, t: usize, r: usize, l: &Layer, la: f32, ssm: u64) -> Result<()> {
        let c = self.cfg;
        let (di, nh, cd, gn) = (c.d_inner(), c.n_heads, c.conv_dim(), c.n_groups * c.d_state);
        let slot = 2 * nh + gn + di;
        let wl = c.ssm_len() + r * slot + 2 * nh;
        let ws = self.state.at((c.paper_state_size() + li * wl) * 4);
        let meta = self.state.at((self.state_len - 2) * 4);
        let shape = [i(t), i(nh), i(c.head_dim), i(c.d_state), i(c.n_groups), i(cd), i(di), i(r), Arg::F32(la)];
        let mut args = vec![
            Arg::Ptr(self.u.ptr()),
            Arg::Ptr(self.dtb.ptr()),
            Arg::Ptr(l.a_log.ptr()),
            Arg::Ptr(self.y.ptr()),
            Arg::Ptr(ws),
            Arg::Ptr(meta),
        ];
        args.extend(shape);
        self.gpu.launch("ssd_window", (nh as u32, 1), 256, 0, &args)?;
        args.remove(3);
        self.gpu.launch_n("window_store", t * slot, &args)?;
        let dims = [i(t), i(nh), i(c.head_dim), i(c.d_state), i(c.n_groups), i(di), i(r)];
        let rebuild: Vec<Arg> = [Arg::Ptr(meta), Arg::Ptr(ws), Arg::Ptr(ssm)].into_iter().chain(dims).collect();
        self.gpu.launch("window_rebuild", (nh as u32, 1), 256, 0, &rebuild)
    }

    /// The chunked SSD of one layer over `t` tokens (B, C in `u`; x convolved from `zx` and the conv
    /// history `cs` by the block-state kernel, which writes it to `u`): Δ into `dtb` and its cumulative
    /// decay, C·Bᵀ per block (cuBLAS), block states, state passing from `ssm` (updated), outputs into `y`.
    fn ssd_chunked(&self, t: usize, l: &Layer, cs: u64, ssm: u64) -> Result<()> {
        let c = self.cfg;
        let (di, nh, p, n, g) = (c.d_inner(), c.n_heads, c.head_dim, c.d_state, c.n_groups);
        let (cd, nin, nb, q, gpu) = (c.conv_dim(), c.in_proj_rows(), Self::nb(t), GPU_Q, &self.gpu);
        let (la, _) = self.forget_params();
        // 3xTF32 keeps f32 models at f32 accuracy; bf16 models take plain TF32.
        let exact = self.dt == DType::F32;
        gpu.launch_n(
            "ssd_cumsum",
            nb * nh,
            &[
                Arg::Ptr(self.zx.ptr()),
                Arg::Ptr(l.dt_bias.ptr()),
                Arg::Ptr(l.a_log.ptr()),
                Arg::Ptr(self.dtb.ptr()),
                Arg::Ptr(self.cum.ptr()),
                i(t),
                i(nin),
                i(nh),
                Arg::F32(c.dt_min),
                Arg::F32(c.dt_max),
                Arg::F32(l.dt_scale),
                Arg::F32(la),
                Arg::Ptr(self.dt_threshold(l)),
            ],
        )?;
        for gi in 0..g {
            let (bo, co) = (di + gi * n, di + g * n + gi * n);
            gpu.timed("gemm C·Bᵀ", || {
                gpu.blas.gemm_nt_batched(
                    (q, q, n),
                    (self.u.at(co * 4), self.u.at(bo * 4), self.cb.at(gi * q * q * 4)),
                    [cd, cd, q],
                    [q * cd, q * cd, g * q * q],
                    nb,
                    !exact,
                )
            })?;
        }
        let shape = [i(t), i(nh), i(p), i(n), i(g), i(cd), i(di)];
        let state = SsdLaunch::chunk_state(nh, p, n, nb);
        let mut args = vec![
            Arg::Ptr(self.u.ptr()),
            Arg::Ptr(self.zx.ptr()),
            Arg::Ptr(cs),
            Arg::Ptr(l.conv_w.ptr()),
            Arg::Ptr(l.conv_b.as_ref().map_or(0, |b| b.ptr())),
            Arg::Ptr(self.dtb.ptr()),
            Arg::Ptr(self.cum.ptr()),
            Arg::Ptr(self.st.ptr()),
        ];
        args.extend(shape);
        args.extend([i(nin), i(c.d_conv), i(state.width), Arg::I32(exact as i32)]);
        gpu.launch("ssd_chunk_state", state.grid, 256, state.shared_bytes, &args)?;
        gpu.launch_n(
            "ssd_state_pass",
            nh * p * n,
            &[Arg::Ptr(self.st.ptr()), Arg::Ptr(self.cum.ptr()), Arg::Ptr(ssm), i(t), i(nh), i(p * n)],
        )?;
        let mut args = vec![
            Arg::Ptr(self.u.ptr()),
            Arg::Ptr(self.dtb.ptr()),
            Arg::Ptr(self.cum.ptr()),
            Arg::Ptr(self.st.ptr()),
            Arg::Ptr(self.cb.ptr()),
            Arg::Ptr(l.d.ptr()),
            Arg::I32(l.d_per_channel as i32),
            Arg::Ptr(self.y.ptr()),
        ];
        args.extend(shape);
        let scan = SsdLaunch::chunk_scan(nh, p, nb);
        args.extend([i(scan.width), Arg::I32(exact as i32)]);
        gpu.launch("ssd_chunk_scan", scan.grid, 256, scan.shared_bytes, &args)
    }

    /// Feeds `tokens` (in pieces of at most `chunk`), keeping the last row pending (no head work).
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.feed_pieces(tokens, None)
    }

    /// Runs `tokens` in pieces of at most `chunk`, each piece's last row kept pending.
    fn feed_pieces(&mut self, tokens: &[u32], probe: Option<&DBuf>) -> Result<()> {
        let rb = self.cfg.d_model * self.dt.size();
        let mut off = 0;
        while off < tokens.len() {
            let n = self.piece_len(tokens.len() - off);
            self.forward(&tokens[off..off + n], probe)?;
            self.gpu.copy(self.hidden.ptr(), self.hidden.at(n * rb), rb)?;
            self.has_pending = true;
            self.after_piece(n, true)?;
            off += n;
        }
        Ok(())
    }

    /// Tokens the next piece may hold: at most `left` and `chunk`, ending where reset or state
    /// normalization acts (`Session::next_boundary`).
    fn piece_len(&self, left: usize) -> usize {
        self.spec.piece_len(self.pos, self.chunk, left)
    }

    /// After `n` fed tokens: reset, calibration or normalization when the position sits on their
    /// boundary (`Session::at_boundary`), then, with `check`, one error line if the state holds a
    /// NaN or an infinity.
    fn after_piece(&mut self, n: usize, check: bool) -> Result<()> {
        self.pos += n as u64;
        let c = self.cfg;
        let norm = |clip: bool| {
            self.gpu.launch(
                "head_norm",
                (c.n_heads as u32, c.n_layer as u32),
                256,
                0,
                &[
                    Arg::Ptr(self.state.ptr()),
                    Arg::Ptr(self.tau.ptr()),
                    i(c.n_heads),
                    i(c.ssm_len() / c.n_heads),
                    Arg::I64(c.layer_state_len() as i64),
                    Arg::I64(c.conv_len() as i64),
                    Arg::I32(clip as i32),
                ],
            )
        };
        match self.spec.at(self.pos, self.tau_set) {
            Boundary::Reset => {
                self.gpu.sync()?;
                self.state.zero()?;
            }
            Boundary::Calibrate => {
                norm(false)?;
                self.tau_set = true;
            }
            Boundary::Normalize => norm(true)?,
            Boundary::Nothing => {}
        }
        if check {
            self.check_state()?;
        }
        Ok(())
    }

    /// One error line when the recurrent state holds a NaN or an infinity.
    fn check_state(&self) -> Result<()> {
        self.gpu.launch(
            "count_nonfinite",
            (CHECK_BLOCKS as u32, 1),
            256,
            0,
            &[Arg::Ptr(self.state.ptr()), Arg::I64(self.state_len() as i64), Arg::Ptr(self.bad.ptr())],
        )?;
        let mut counts = [0f32; CHECK_BLOCKS];
        self.gpu.sync()?;
        self.bad.download(0, &mut counts)?;
        let bad: f32 = counts.iter().sum();
        if bad > 0.0 {
            bail!(
                "non-finite value in the recurrent state after token {} ({bad} elements); the model or its input overflowed",
                self.pos
            );
        }
        Ok(())
    }

    /// [`GpuMamba2::feed`] that also adds the probe sums of these tokens into `probe`
    /// `(n_layer, 4, H)` (the core's `forward_probed` layout).
    pub fn feed_probed(&mut self, tokens: &[u32], probe: &mut [f32]) -> Result<()> {
        let len = self.cfg.n_layer * 4 * self.cfg.n_heads;
        if probe.len() != len {
            bail!("probe buffer has {} values, the model needs {len}", probe.len());
        }
        let buf = DBuf::zeroed(len * 4)?;
        self.feed_pieces(tokens, Some(&buf))?;
        let mut sums = vec![0f32; len];
        self.gpu.sync()?;
        buf.download(0, &mut sums)?;
        probe.iter_mut().zip(&sums).for_each(|(p, s)| *p += s);
        Ok(())
    }
}
