// Mamba-2 forward kernels for the CUDA backend (host/src/cuda/mamba2.rs launches them).
//
// Each kernel's CPU reference is the function of core/src/mamba2.rs (or core/src/ops.rs) named in its
// comment; `stuffed selftest --device cuda` checks the whole chain against it. Activations and the
// recurrent state are f32; `A` is the matmul input type (the weights' storage type: f32 or bf16).
// Shapes: T tokens in the call, d = d_model, di = H·P, cd = di + 2·G·N, nin = 2·di + 2·G·N + H,
// Q = 64 tokens per SSD block, nb = ⌈T/Q⌉.
//
// Regenerate the committed PTX with ptx/build.sh (nvcc 13.0, pinned); CI fails if it is stale.

typedef unsigned short bf16_t;

#define Q 64
// Dynamic shared memory (ptx/emu/cuda_emu.h maps it to the emulator's block buffer).
#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ float name[]
#endif

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ void from_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void from_f32(bf16_t* p, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *p = (bf16_t)((u >> 16) | 0x40); return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                       // round to nearest even
    *p = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- embedding gather (Mamba2::run: `embed.row`) --------------------------------------------------
// x (T, d) f32 ← emb (rows, d)[tok]; token ids were checked on the host.
template <typename W>
__device__ void embed(const W* emb, const unsigned* tok, float* x, int T, int d) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)T * d) return;
    long t = i / d, c = i % d;
    x[i] = to_f32(emb[(long)tok[t] * d + c]);
}
extern "C" __global__ void embed_f32(const float* e, const unsigned* tok, float* x, int T, int d) { embed(e, tok, x, T, d); }
extern "C" __global__ void embed_bf16(const bf16_t* e, const unsigned* tok, float* x, int T, int d) { embed(e, tok, x, T, d); }

// ---- RMSNorm (ops::rmsnorm) -------------------------------------------------------------------------
// One block per row: out (rows, d) A = x (rows, d) · rsqrt(mean(x²) + eps) · w (d).
template <typename A>
__device__ void rmsnorm(const float* x, const float* w, A* out, int d, float eps) {
    const float* xr = x + (long)blockIdx.x * d;
    A* orow = out + (long)blockIdx.x * d;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) ss += xr[c] * xr[c];
    float inv = rsqrtf(block_sum(ss) / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) from_f32(&orow[c], xr[c] * inv * w[c]);
}
extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* o, int d, float eps) { rmsnorm(x, w, o, d, eps); }
extern "C" __global__ void rmsnorm_bf16(const float* x, const float* w, bf16_t* o, int d, float eps) { rmsnorm(x, w, o, d, eps); }

// y (rows, n) += b (n)
extern "C" __global__ void add_bias(float* y, const float* b, long rows, int n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < rows * n) y[i] += b[i % n];
}

// ---- causal depthwise conv + SiLU (Mamba2::conv) ----------------------------------------------------
// u (T, cd) = silu(bias + Σ_j w[ch, j] · in[t − (k−1) + j]) over xBC = zx[:, di .. di + cd], reading
// inputs before the call from cs (k−1, cd), oldest first. Channels di .. di + gn (B) are then scaled by
// b_scale (RRI's b; 1 otherwise).
extern "C" __global__ void conv_silu(const float* zx, const float* cs, const float* cw, const float* cb, float* u,
                                     int T, int nin, int di, int cd, int k, int gn, float b_scale) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)T * cd) return;
    int t = (int)(i / cd), ch = (int)(i % cd);
    float acc = cb ? cb[ch] : 0.0f;
    for (int j = 0; j < k; j++) {
        int tau = t - (k - 1) + j;
        float v = tau < 0 ? cs[(long)(k - 1 + tau) * cd + ch] : zx[(long)tau * nin + di + ch];
        acc += cw[ch * k + j] * v;
    }
    float s = silu(acc);
    if (ch >= di && ch < di + gn) s *= b_scale;
    u[i] = s;
}

// The conv history after the call: the last k−1 inputs. One thread per channel walks j upwards, so a
// row is read (j + T) before it is overwritten (j).
extern "C" __global__ void conv_state_update(const float* zx, float* cs, int T, int nin, int di, int cd, int k) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= cd) return;
    for (int j = 0; j < k - 1; j++) {
        int tau = T - (k - 1) + j;
        cs[(long)j * cd + ch] = tau < 0 ? cs[(long)(T + j) * cd + ch] : zx[(long)tau * nin + di + ch];
    }
}

// ---- Δ (Mamba2::layer) -------------------------------------------------------------------------------
// dt (T, H) = clamp(softplus(zx[:, nin − H + h] + dt_bias[h]), lo, hi) · scale (Δ scaling's c).
extern "C" __global__ void dt_softplus(const float* zx, const float* dt_bias, float* dt, int T, int nin, int H,
                                       float lo, float hi, float scale) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)T * H) return;
    int t = (int)(i / H), h = (int)(i % H);
    float r = zx[(long)t * nin + nin - H + h] + dt_bias[h];
    float sp = r > 20.0f ? r : log1pf(expf(r));
    dt[i] = fminf(fmaxf(sp, lo), hi) * scale;
}

// ---- SSD, chunked (Mamba2::ssm_chunked / ssd_head) -----------------------------------------------
// cum (T, H): inclusive cumulative log decay Σ (dt·A + la) within each block of Q tokens.
extern "C" __global__ void ssd_cumsum(const float* dt, const float* a_log, float* cum, int T, int H, float la) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int nb = (T + Q - 1) / Q;
    if (i >= nb * H) return;
    int c = i / H, h = i % H;
    float a = -expf(a_log[h]), acc = 0.0f;
    int end = min(T, (c + 1) * Q);
    for (int t = c * Q; t < end; t++) {
        acc += dt[(long)t * H + h] * a + la;
        cum[(long)t * H + h] = acc;
    }
}

// st (nb, H, P, N): each block's own contribution Σ_j exp(cum_last − cum_j)·dt_j·x_j·B_jᵀ.
// Grid (nb, H), 256 threads; dynamic shared memory (Q + Q·P) floats.
extern "C" __global__ void ssd_chunk_state(const float* u, const float* dt, const float* cum, float* st, int T, int H,
                                           int P, int N, int G, int cd, int di) {
    DYN_SMEM(sm);
    int c = blockIdx.x, h = blockIdx.y, t0 = c * Q, len = min(Q, T - t0), g = h / (H / G);
    float* w = sm;       // (Q)
    float* xs = sm + Q;  // (len, P): w_j · x_j
    float last = cum[(long)(t0 + len - 1) * H + h];
    for (int j = threadIdx.x; j < len; j += blockDim.x)
        w[j] = expf(last - cum[(long)(t0 + j) * H + h]) * dt[(long)(t0 + j) * H + h];
    __syncthreads();
    for (int e = threadIdx.x; e < len * P; e += blockDim.x) {
        int j = e / P, p = e % P;
        xs[e] = w[j] * u[(long)(t0 + j) * cd + h * P + p];
    }
    __syncthreads();
    float* out = st + ((long)c * H + h) * P * N;
    for (int e = threadIdx.x; e < P * N; e += blockDim.x) {
        int p = e / N, n = e % N;
        const float* b = u + (long)t0 * cd + di + g * N + n;
        float acc = 0.0f;
        for (int j = 0; j < len; j++) acc += xs[j * P + p] * b[(long)j * cd];
        out[e] = acc;
    }
}

// The state entering each block, in place over st: s ← ssm; for each block c: (st[c], s) ←
// (s, exp(cum_last(c))·s + st[c]); then ssm ← s. One thread per (h, p, n) element.
extern "C" __global__ void ssd_state_pass(float* st, const float* cum, float* ssm, int T, int H, int PN) {
    long e = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (e >= (long)H * PN) return;
    int h = (int)(e / PN), nb = (T + Q - 1) / Q;
    float s = ssm[e];
    for (int c = 0; c < nb; c++) {
        int last = min(T, (c + 1) * Q) - 1;
        float* p = st + (long)c * H * PN + e;
        float mine = *p;
        *p = s;
        s = expf(cum[(long)last * H + h]) * s + mine;
    }
    ssm[e] = s;
}

// y (T, di), head h's P columns, block c: y_i = exp(cum_i)·(S_in·C_i) + Σ_{j≤i} (C_i·B_j)·exp(cum_i − cum_j)·dt_j·x_j
// + D·x_i, with S_in = st[c] (after ssd_state_pass). Grid (nb, H), 256 threads; dynamic shared memory
// (Q·Q + Q·max(P, 64)) floats. D is (H) or, when d_per_channel, (di).
extern "C" __global__ void ssd_chunk_scan(const float* u, const float* dt, const float* cum, const float* st,
                                          const float* D, int d_per_channel, float* y, int T, int H, int P, int N,
                                          int G, int cd, int di) {
    DYN_SMEM(sm);
    int c = blockIdx.x, h = blockIdx.y, t0 = c * Q, len = min(Q, T - t0), g = h / (H / G);
    float* M = sm;              // (Q, Q)
    float* cs = sm + Q * Q;     // (Q, 32) slice of C, then x (Q, P)
    float* bs = cs + Q * 32;    // (Q, 32) slice of B
    const float* ub = u + (long)t0 * cd;
    int bo = di + g * N, co = di + G * N + g * N;
    // C_i·B_j, 16 (i, j) pairs per thread, over slices of 32 state channels.
    float acc[16];
    for (int r = 0; r < 16; r++) acc[r] = 0.0f;
    for (int n0 = 0; n0 < N; n0 += 32) {
        int nw = min(32, N - n0);
        __syncthreads();
        for (int e = threadIdx.x; e < Q * 32; e += blockDim.x) {
            int j = e / 32, n = e % 32;
            bool ok = j < len && n < nw;
            cs[e] = ok ? ub[(long)j * cd + co + n0 + n] : 0.0f;
            bs[e] = ok ? ub[(long)j * cd + bo + n0 + n] : 0.0f;
        }
        __syncthreads();
        for (int r = 0; r < 16; r++) {
            int e = threadIdx.x + r * 256, i = e / Q, j = e % Q;
            float a = 0.0f;
            for (int n = 0; n < 32; n++) a += cs[i * 32 + n] * bs[j * 32 + n];
            acc[r] += a;
        }
    }
    const float* dth = dt + (long)t0 * H + h;
    const float* cum0 = cum + (long)t0 * H + h;
    for (int r = 0; r < 16; r++) {
        int e = threadIdx.x + r * 256, i = e / Q, j = e % Q;
        M[e] = (i < len && j <= i) ? acc[r] * expf(cum0[(long)i * H] - cum0[(long)j * H]) * dth[(long)j * H] : 0.0f;
    }
    __syncthreads();
    float* xs = cs;  // (len, P)
    for (int e = threadIdx.x; e < len * P; e += blockDim.x) {
        int j = e / P, p = e % P;
        xs[e] = ub[(long)j * cd + h * P + p];
    }
    __syncthreads();
    const float* s_in = st + ((long)c * H + h) * P * N;
    for (int e = threadIdx.x; e < len * P; e += blockDim.x) {
        int i = e / P, p = e % P;
        float a = 0.0f;
        for (int j = 0; j <= i; j++) a += M[i * Q + j] * xs[j * P + p];
        const float* ci = ub + (long)i * cd + co;
        const float* sp = s_in + (long)p * N;
        float off = 0.0f;
        for (int n = 0; n < N; n++) off += ci[n] * sp[n];
        float dv = d_per_channel ? D[h * P + p] : D[h];
        y[(long)(t0 + i) * di + h * P + p] = expf(cum0[(long)i * H]) * off + a + dv * xs[e];
    }
}

// ---- gated group RMSNorm (Mamba2::layer) --------------------------------------------------------------
// One block per (t, g): out = RMSNorm_group(y ⊙ silu(z)) · w, groups of gs = di/G channels; z = zx[:, :di].
template <typename A>
__device__ void gated_norm(const float* y, const float* zx, const float* w, A* out, int di, int nin, int gs, float eps) {
    long t = blockIdx.x;
    int g0 = blockIdx.y * gs;
    const float* yr = y + t * di + g0;
    const float* zr = zx + t * nin + g0;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < gs; c += blockDim.x) {
        float v = yr[c] * silu(zr[c]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss) / gs + eps);
    for (int c = threadIdx.x; c < gs; c += blockDim.x) from_f32(&out[t * di + g0 + c], yr[c] * silu(zr[c]) * inv * w[g0 + c]);
}
extern "C" __global__ void gated_norm_f32(const float* y, const float* zx, const float* w, float* o, int di, int nin, int gs,
                                          float eps) { gated_norm(y, zx, w, o, di, nin, gs, eps); }
extern "C" __global__ void gated_norm_bf16(const float* y, const float* zx, const float* w, bf16_t* o, int di, int nin,
                                           int gs, float eps) { gated_norm(y, zx, w, o, di, nin, gs, eps); }

// ---- LM head epilogues (score::NllHead, session::argmax) ---------------------------------------------
// One block per row of logits (rows, V): nll = logsumexp(l[:real]) − l[target].
extern "C" __global__ void lse_nll(const float* logits, const unsigned* target, float* nll, int V, int real) {
    const float* l = logits + (long)blockIdx.x * V;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < real; i += blockDim.x) m = fmaxf(m, l[i]);
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < real; i += blockDim.x) s += expf(l[i] - m);
    s = block_sum(s);
    if (threadIdx.x == 0) nll[blockIdx.x] = m + logf(s) - l[target[blockIdx.x]];
}

// One block of 256 threads per row: the first index of the largest of l[:real].
extern "C" __global__ void argmax_rows(const float* logits, unsigned* out, int V, int real) {
    __shared__ float bv[256];
    __shared__ int bi[256];
    const float* l = logits + (long)blockIdx.x * V;
    float v = -INFINITY;
    int idx = 0;
    for (int i = threadIdx.x; i < real; i += blockDim.x)
        if (l[i] > v) { v = l[i]; idx = i; }
    bv[threadIdx.x] = v;
    bi[threadIdx.x] = idx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = bv[threadIdx.x + s];
            int oi = bi[threadIdx.x + s];
            if (ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x])) {
                bv[threadIdx.x] = ov;
                bi[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = (unsigned)bi[0];
}

// ---- probe series (Mamba2::probe_sums) ------------------------------------------------------------------
// p (4, H) += Σ_t (dt·A + la), Σ_t dt, Σ_t mean(B_t), Σ_t mean(x_t); one block per head.
extern "C" __global__ void probe_sums(const float* u, const float* dt, const float* a_log, float* p, int T, int H,
                                      int P, int N, int G, int cd, int di, float la) {
    int h = blockIdx.x, g = h / (H / G);
    float a = -expf(a_log[h]);
    float ld = 0.0f, sd = 0.0f, sb = 0.0f, sx = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        float d = dt[(long)t * H + h];
        ld += d * a + la;
        sd += d;
        const float* row = u + (long)t * cd;
        float b = 0.0f, x = 0.0f;
        for (int n = 0; n < N; n++) b += row[di + g * N + n];
        for (int q = 0; q < P; q++) x += row[h * P + q];
        sb += b / N;
        sx += x / P;
    }
    ld = block_sum(ld);
    sd = block_sum(sd);
    sb = block_sum(sb);
    sx = block_sum(sx);
    if (threadIdx.x == 0) {
        p[h] += ld;
        p[H + h] += sd;
        p[2 * H + h] += sb;
        p[3 * H + h] += sx;
    }
}
