// Mamba-2 forward kernels for the CUDA backend (host/src/cuda/mamba2.rs launches them).
//
// Each kernel's CPU reference is the function of core/src/mamba2.rs (or core/src/ops.rs) named in its
// comment; `stuffed selftest --device cuda` checks the whole chain against it. Activations and the
// recurrent state are f32; `A` is the matmul input type (the weights' storage type: f32 or bf16).
// Shapes: T tokens in the call, d = d_model, di = H·P, cd = di + 2·G·N, nin = 2·di + 2·G·N + H,
// Q = 256 tokens per SSD block, nb = ⌈T/Q⌉.
//
// Regenerate the committed PTX with ptx/build.sh (nvcc 13.0, pinned); CI fails if it is stale.

typedef unsigned short bf16_t;

#define Q 256
#ifndef CUDA_EMU
#include <mma.h>
#endif
using namespace nvcuda;
// Dynamic shared memory (ptx/emu/cuda_emu.h maps it to the emulator's block buffer).
#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ __align__(128) float name[]  // WMMA wants 32-byte aligned tiles
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
// One row, the whole block: orow (d) = xr (d) · rsqrt(mean(xr²) + eps) · w (d).
template <typename A>
__device__ void rmsnorm_row(const float* xr, const float* w, A* orow, int d, float eps) {
    float ss = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) ss += xr[c] * xr[c];
    float inv = rsqrtf(block_sum(ss) / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) from_f32(&orow[c], xr[c] * inv * w[c]);
}
template <typename A>
__device__ void rmsnorm(const float* x, const float* w, A* out, int d, float eps) {
    rmsnorm_row(x + (long)blockIdx.x * d, w, out + (long)blockIdx.x * d, d, eps);
}
extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* o, int d, float eps) { rmsnorm(x, w, o, d, eps); }
extern "C" __global__ void rmsnorm_bf16(const float* x, const float* w, bf16_t* o, int d, float eps) { rmsnorm(x, w, o, d, eps); }

// y (rows, n) += b (n)
extern "C" __global__ void add_bias(float* y, const float* b, long rows, int n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < rows * n) y[i] += b[i % n];
}

// ---- causal depthwise conv + SiLU (Mamba2::conv) ----------------------------------------------------
// silu(bias + Σ_j w[ch, j] · in[t − (k−1) + j]) over xBC = zx[:, di .. di + cd] at token t of the call,
// reading inputs before the call from cs (k−1, cd), oldest first (cb = 0: no bias).
__device__ __forceinline__ float conv_at(const float* zx, const float* cs, const float* cw, const float* cb, int t,
                                         int ch, int nin, int di, int cd, int k) {
    float acc = cb ? cb[ch] : 0.0f;
    for (int j = 0; j < k; j++) {
        int tau = t - (k - 1) + j;
        float v = tau < 0 ? cs[(long)(k - 1 + tau) * cd + ch] : zx[(long)tau * nin + di + ch];
        acc += cw[ch * k + j] * v;
    }
    return silu(acc);
}

// u (T, cd), the B and C channels di .. cd = conv_at, B's (di .. di + gn) scaled by b_scale (RRI's b;
// 1 otherwise). The x channels are convolved by ssd_chunk_state as it stages them (it writes them to
// u for the scan), which saves their separate read.
extern "C" __global__ void conv_bc(const float* zx, const float* cs, const float* cw, const float* cb, float* u, int T,
                                   int nin, int di, int cd, int k, int gn, float b_scale) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)T * (cd - di)) return;
    int t = (int)(i / (cd - di)), ch = di + (int)(i % (cd - di));
    float s = conv_at(zx, cs, cw, cb, t, ch, nin, di, cd, k);
    if (ch < di + gn) s *= b_scale;
    u[(long)t * cd + ch] = s;
}

// The conv history after the call (after the SSD kernels, which read the old one): the last k−1
// inputs. One thread per channel walks j upwards, so a row is read (j + T) before it is overwritten (j).
extern "C" __global__ void conv_state_update(const float* zx, float* cs, int T, int nin, int di, int cd, int k) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= cd) return;
    for (int j = 0; j < k - 1; j++) {
        int tau = T - (k - 1) + j;
        cs[(long)j * cd + ch] = tau < 0 ? cs[(long)(T + j) * cd + ch] : zx[(long)tau * nin + di + ch];
    }
}

// Δ = clamp(softplus(raw + dt_bias), lo, hi) · scale (Δ scaling's c; 1 otherwise); then LongMamba's
// filter where the layer has thresholds `th` (H; null otherwise): Δ ← 0 where Δ ≤ th[h].
__device__ __forceinline__ float delta(float raw, float lo, float hi, float scale, const float* th, int h) {
    float sp = raw > 20.0f ? raw : log1pf(expf(raw));
    float d = fminf(fmaxf(sp, lo), hi) * scale;
    return th && d <= th[h] ? 0.0f : d;
}

// One token (decode; Mamba2::step's conv and Δ): threads ch < cd do conv_silu and conv_state_update
// for T = 1 in one pass (each channel reads its history before shifting it); threads cd + h do Δ of
// head h.
extern "C" __global__ void conv_step(const float* zx, float* cs, const float* cw, const float* cb, float* u,
                                     const float* dt_bias, float* dt, int nin, int di, int cd, int k, int gn, int H,
                                     float b_scale, float lo, float hi, float scale, const float* th) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cd + H) return;
    if (i >= cd) {
        int h = i - cd;
        dt[h] = delta(zx[nin - H + h] + dt_bias[h], lo, hi, scale, th, h);
        return;
    }
    float in = zx[di + i], acc = cb ? cb[i] : 0.0f;
    for (int j = 0; j < k - 1; j++) {
        float v = cs[(long)j * cd + i];
        acc += cw[i * k + j] * v;
        if (j > 0) cs[(long)(j - 1) * cd + i] = v;
    }
    acc += cw[i * k + k - 1] * in;
    if (k > 1) cs[(long)(k - 2) * cd + i] = in;
    float s = silu(acc);
    if (i >= di && i < di + gn) s *= b_scale;
    u[i] = s;
}

// ---- SSD, chunked (Mamba2::ssm_chunked / ssd_head) -----------------------------------------------
// The GPU's SSD block is Q = 256 tokens (the core's is 64; the math is exact for any block): 4× fewer
// block states to write, pass and read, which is the SSD's memory traffic. The three contractions
// (block state, C·S_in, M·x) run on tensor cores in TF32 (bf16 models) or 3xTF32 (`exact`, f32
// models: hi·hi + hi·lo + lo·hi, ≈ f32 accuracy); C·Bᵀ comes from cuBLAS; state passing is f32.

// Δ (Mamba2::layer): dt (T, H) = delta(zx[:, nin − H + h] + dt_bias[h]); and cum (T, H): the
// inclusive cumulative log decay Σ (dt·A + la) within each block of Q tokens. One thread per (block, head).
extern "C" __global__ void ssd_cumsum(const float* zx, const float* dt_bias, const float* a_log, float* dt, float* cum,
                                      int T, int nin, int H, float lo, float hi, float scale, float la,
                                      const float* th) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int nb = (T + Q - 1) / Q;
    if (i >= nb * H) return;
    int c = i / H, h = i % H;
    float a = -expf(a_log[h]), acc = 0.0f;
    int end = min(T, (c + 1) * Q);
    for (int t = c * Q; t < end; t++) {
        float d = delta(zx[(long)t * nin + nin - H + h] + dt_bias[h], lo, hi, scale, th, h);
        dt[(long)t * H + h] = d;
        acc += d * a + la;
        cum[(long)t * H + h] = acc;
    }
}

#define KS 16  // contraction slice staged in shared memory per step
typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> FragC;

// v as TF32 hi + lo parts (lo = 0 unless `exact` needs it).
__device__ __forceinline__ void split_tf32(float v, float* hi, float* lo) {
    float h = wmma::__float_to_tf32(v);
    *hi = h;
    *lo = wmma::__float_to_tf32(v - h);
}

// acc[q] += A · B over one staged slice of KS for the warp's tiles (tile = warp + 8q of `tiles`, in
// rows of `tcols` 16×16 tiles). A (rows, KS) in layout L with leading dimension lda; B (KS, cols)
// row-major, ldb. Every call is warp-uniform.
template <typename L, int MAXT>
__device__ __forceinline__ void mma_slice(FragC* acc, const float* ah, const float* al, int lda, const float* bh,
                                          const float* bl, int ldb, int tiles, int tcols, int exact) {
    int warp = threadIdx.x >> 5;
#pragma unroll
    for (int q = 0; q < MAXT; q++) {
        int tile = warp + 8 * q;
        if (tile >= tiles) break;
        int r0 = tile / tcols * 16, c0 = tile % tcols * 16;
#pragma unroll
        for (int k = 0; k < KS; k += 8) {
            int ao = L::is_row ? r0 * lda + k : k * lda + r0;
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, typename L::frag> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
            wmma::load_matrix_sync(a, ah + ao, lda);
            wmma::load_matrix_sync(b, bh + k * ldb + c0, ldb);
            if (exact) {
                wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, typename L::frag> a2;
                wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b2;
                wmma::load_matrix_sync(a2, al + ao, lda);
                wmma::load_matrix_sync(b2, bl + k * ldb + c0, ldb);
                wmma::mma_sync(acc[q], a2, b, acc[q]);
                wmma::mma_sync(acc[q], a, b2, acc[q]);
            }
            wmma::mma_sync(acc[q], a, b, acc[q]);
        }
    }
}
struct RowA {
    static const bool is_row = true;
    typedef wmma::row_major frag;
};
struct ColA {
    static const bool is_row = false;
    typedef wmma::col_major frag;
};

// The warp's accumulators into out (rows of tcols tiles, leading dimension ldo); shared memory.
template <int MAXT>
__device__ __forceinline__ void store_tiles(FragC* acc, float* out, int ldo, int tiles, int tcols) {
    int warp = threadIdx.x >> 5;
#pragma unroll
    for (int q = 0; q < MAXT; q++) {
        int tile = warp + 8 * q;
        if (tile >= tiles) break;
        wmma::store_matrix_sync(out + tile / tcols * 16 * ldo + tile % tcols * 16, acc[q], ldo, wmma::mem_row_major);
    }
}

// st (nb, H, P, N): each block's own contribution Σ_j exp(cum_last − cum_j)·dt_j·x_jᵀ·B_j (B from u;
// x = conv_at over zx and the conv history cs, also written to u's x channels by the first column
// split), columns n0 .. n0 + nw of it per CUDA block (nw a multiple of 16, Pp·nw ≤ 8192 and
// Pp + nw ≤ 256, so shared memory stays ≤ 33 KiB; Pp = P rounded up to 16).
// Grid (H·⌈N/nw⌉, nb): the heads of one block run together and share its B in L2. 256 threads, at most
// 85 registers (3 blocks per SM, as shared memory allows); dynamic shared memory
// (Q + max(2·KS·(Pp + nw), Pp·nw)) floats.
extern "C" __global__ void __launch_bounds__(256, 3)
    ssd_chunk_state(float* u, const float* zx, const float* cs, const float* cw, const float* cb, const float* dt,
                    const float* cum, float* st, int T, int H, int P, int N, int G, int cd, int di, int nin, int k, int nw,
                    int exact) {
    DYN_SMEM(sm);
    int ns = (N + nw - 1) / nw;
    int c = blockIdx.y, h = blockIdx.x / ns, n0 = blockIdx.x % ns * nw, t0 = c * Q, len = min(Q, T - t0), g = h / (H / G);
    int Pp = (P + 15) & ~15, tiles = (Pp / 16) * (nw / 16), tcols = nw / 16;
    float* w = sm;                                       // (Q)
    float* ah = sm + Q, *al = ah + KS * Pp;              // (KS, Pp): (w·x)ᵀ slice, i.e. A (Pp, KS) column-major
    float* bh = al + KS * Pp, *bl = bh + KS * nw;        // (KS, nw): B slice
    float* out = sm + Q;                                 // (Pp, nw) after the loop
    float last = cum[(long)(t0 + len - 1) * H + h];
    for (int j = threadIdx.x; j < len; j += blockDim.x)
        w[j] = expf(last - cum[(long)(t0 + j) * H + h]) * dt[(long)(t0 + j) * H + h];
    FragC acc[4];
#pragma unroll
    for (int q = 0; q < 4; q++) wmma::fill_fragment(acc[q], 0.0f);
    const float* ub = u + (long)t0 * cd;  // B
    for (int j0 = 0; j0 < len; j0 += KS) {
        __syncthreads();
        for (int e = threadIdx.x; e < KS * Pp; e += blockDim.x) {
            int j = j0 + e / Pp, p = e % Pp;
            float x = 0.0f;
            if (j < len && p < P) {
                x = conv_at(zx, cs, cw, cb, t0 + j, h * P + p, nin, di, cd, k);
                if (n0 == 0) u[(long)(t0 + j) * cd + h * P + p] = x;
            }
            split_tf32(j < len ? w[j] * x : 0.0f, ah + e, al + e);
        }
        for (int e = threadIdx.x; e < KS * nw; e += blockDim.x) {
            int j = j0 + e / nw, n = n0 + e % nw;
            split_tf32(j < len && n < N ? ub[(long)j * cd + di + g * N + n] : 0.0f, bh + e, bl + e);
        }
        __syncthreads();
        mma_slice<ColA, 4>(acc, ah, al, Pp, bh, bl, nw, tiles, tcols, exact);
    }
    __syncthreads();
    store_tiles<4>(acc, out, nw, tiles, tcols);
    __syncthreads();
    float* o = st + ((long)c * H + h) * P * N;
    for (int e = threadIdx.x; e < P * nw; e += blockDim.x) {
        int p = e / nw, n = e % nw;
        if (n0 + n < N) o[(long)p * N + n0 + n] = out[p * nw + n];
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

// y (T, di), head h's P columns, rows i0 .. i0 + ti of block c (ti = 64, 128 or 256 with ti·Pp ≤ 8192,
// so each block state is read by at most Q/ti blocks): y_i = exp(cum_i)·(C_i·S_inᵀ) +
// Σ_{j≤i} M_ij·x_j + D·x_i with M_ij = (C_i·B_j)·exp(cum_i − cum_j)·dt_j, S_in = st[c] (after
// ssd_state_pass) and C·Bᵀ from cb (nb, G, Q, Q). D is (H) or, when d_per_channel, (di).
// Grid (H, nb·Q/ti): the heads of one block run together and share C, B and C·Bᵀ in L2. 256 threads;
// dynamic shared memory (2·Q + max(2·KS·(ti + Pp), ti·Pp)) floats.
extern "C" __global__ void ssd_chunk_scan(const float* u, const float* dt, const float* cum, const float* st,
                                          const float* cb, const float* D, int d_per_channel, float* y, int T, int H,
                                          int P, int N, int G, int cd, int di, int ti, int exact) {
    DYN_SMEM(sm);
    int c = blockIdx.y / (Q / ti), i0 = blockIdx.y % (Q / ti) * ti, h = blockIdx.x;
    int t0 = c * Q, len = min(Q, T - t0);
    if (i0 >= len) return;
    int g = h / (H / G), Pp = (P + 15) & ~15, tiles = (ti / 16) * (Pp / 16), tcols = Pp / 16;
    int rows = min(ti, len - i0);
    float* cj = sm;                                   // (Q): cum_j
    float* dj = sm + Q;                               // (Q): dt_j
    float* ah = sm + 2 * Q, *al = ah + ti * KS;       // (ti, KS): A slice, row-major
    float* bh = al + ti * KS, *bl = bh + KS * Pp;     // (KS, Pp): B slice
    float* out = sm + 2 * Q;                          // (ti, Pp) after the loops
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        cj[j] = cum[(long)(t0 + j) * H + h];
        dj[j] = dt[(long)(t0 + j) * H + h];
    }
    FragC acc[4];
#pragma unroll
    for (int q = 0; q < 4; q++) wmma::fill_fragment(acc[q], 0.0f);
    const float* ub = u + (long)t0 * cd;
    const float* s_in = st + ((long)c * H + h) * P * N;
    int co = di + G * N + g * N;
    // exp(cum_i)·C_i · S_inᵀ, over N in slices
    for (int n0 = 0; n0 < N; n0 += KS) {
        __syncthreads();
        for (int e = threadIdx.x; e < ti * KS; e += blockDim.x) {
            int r = e / KS, n = n0 + e % KS, i = i0 + r;
            split_tf32(r < rows && n < N ? expf(cj[i]) * ub[(long)i * cd + co + n] : 0.0f, ah + e, al + e);
        }
        for (int e = threadIdx.x; e < KS * Pp; e += blockDim.x) {
            int n = e % KS, p = e / KS, o = n * Pp + p;
            split_tf32(p < P && n0 + n < N ? s_in[(long)p * N + n0 + n] : 0.0f, bh + o, bl + o);
        }
        __syncthreads();
        mma_slice<RowA, 4>(acc, ah, al, KS, bh, bl, Pp, tiles, tcols, exact);
    }
    // Σ_{j≤i} M_ij·x_j, over j in slices up to the tile's last row
    const float* cbb = cb + ((long)c * G + g) * Q * Q;
    for (int j0 = 0; j0 < i0 + rows; j0 += KS) {
        __syncthreads();
        for (int e = threadIdx.x; e < ti * KS; e += blockDim.x) {
            int r = e / KS, j = j0 + e % KS, i = i0 + r;
            split_tf32(r < rows && j <= i ? cbb[(long)i * Q + j] * expf(cj[i] - cj[j]) * dj[j] : 0.0f, ah + e, al + e);
        }
        for (int e = threadIdx.x; e < KS * Pp; e += blockDim.x) {
            int j = j0 + e / Pp, p = e % Pp;
            split_tf32(j < len && p < P ? ub[(long)j * cd + h * P + p] : 0.0f, bh + e, bl + e);
        }
        __syncthreads();
        mma_slice<RowA, 4>(acc, ah, al, KS, bh, bl, Pp, tiles, tcols, exact);
    }
    __syncthreads();
    store_tiles<4>(acc, out, Pp, tiles, tcols);
    __syncthreads();
    for (int e = threadIdx.x; e < rows * P; e += blockDim.x) {
        int r = e / P, p = e % P, i = i0 + r;
        float dv = d_per_channel ? D[h * P + p] : D[h];
        y[(long)(t0 + i) * di + h * P + p] = out[r * Pp + p] + dv * ub[(long)i * cd + h * P + p];
    }
}

// One token (decode; Mamba2::step's SSM): s ← exp(dt·A + la)·s + dt·x·Bᵀ, y = C·s + D·x. Grid (H),
// 256 threads: warp w updates rows p ≡ w (mod 8), its lanes striding over n.
extern "C" __global__ void ssd_step(const float* u, const float* dt, const float* a_log, float* ssm, const float* D,
                                    int d_per_channel, float* y, int H, int P, int N, int G, int di, float la) {
    int h = blockIdx.x, g = h / (H / G), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float d = dt[h], decay = expf(d * -expf(a_log[h]) + la);
    const float* x = u + h * P;
    const float* B = u + di + g * N;
    const float* C = u + di + G * N + g * N;
    float* s = ssm + (long)h * P * N;
    for (int p0 = 0; p0 < P; p0 += 8) {
        int p = p0 + warp;
        float acc = 0.0f;
        if (p < P) {
            float xd = d * x[p];
            for (int n = lane; n < N; n += 32) {
                float v = decay * s[(long)p * N + n] + xd * B[n];
                s[(long)p * N + n] = v;
                acc += C[n] * v;
            }
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (p < P && lane == 0) y[h * P + p] = acc + (d_per_channel ? D[h * P + p] : D[h]) * x[p];
    }
}

// ---- sliding window by state difference (Mamba2::window) -----------------------------------------------
// A layer's window cache ws: L (H, P, N) = h_{t−r}, a ring of r slots [log α (H) | dt (H) | B (G·N) |
// x (di)], and the window's log-decay sum (H, 2) as f32 hi + lo. meta = (position mod r, filled) for
// the whole model, read here and advanced by window_meta after the last layer. A call holds t ≤ r
// tokens, so no token reads a slot this call writes (window_store runs after).

// Per head (grid H, 256 threads), token by token: advance L by the cached inputs of token t − r, keep
// W = Σ log α over the window (f64), and subtract exp(W)·(C_t·L) from y_t.
extern "C" __global__ void ssd_window(const float* u, const float* dt, const float* a_log, float* y, float* ws,
                                      const float* meta, int t, int H, int P, int N, int G, int cd, int di, int r,
                                      float la) {
    int h = blockIdx.x, g = h / (H / G), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int pos0 = (int)meta[0], gn = G * N, sl = 2 * H + gn + di;
    bool filled = meta[1] > 0.0f;
    float* lag = ws + (long)h * P * N;
    const float* ring = ws + (long)H * P * N;
    float* wsum = ws + (long)H * P * N + (long)r * sl + 2 * h;
    float a = -expf(a_log[h]);
    double w = (double)wsum[0] + (double)wsum[1];
    for (int tt = 0; tt < t; tt++) {
        int abs = pos0 + tt;
        bool full = filled || abs >= r;
        if (full) {
            const float* slot = ring + (long)(abs % r) * sl;
            float lo = slot[h], dto = slot[H + h], e = expf(lo);
            const float* bo = slot + 2 * H + g * N;
            const float* xo = slot + 2 * H + gn + h * P;
            for (int i = threadIdx.x; i < P * N; i += blockDim.x) lag[i] = lag[i] * e + dto * xo[i / N] * bo[i % N];
            w -= (double)lo;
        }
        w += (double)(dt[(long)tt * H + h] * a + la);
        if (full) {
            __syncthreads();
            float f = expf((float)w);
            const float* ct = u + (long)tt * cd + di + gn + g * N;
            for (int p0 = 0; p0 < P; p0 += 8) {
                int p = p0 + warp;
                float acc = 0.0f;
                if (p < P)
                    for (int n = lane; n < N; n += 32) acc += lag[(long)p * N + n] * ct[n];
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (p < P && lane == 0) y[(long)tt * di + h * P + p] -= f * acc;
            }
            __syncthreads();
        }
    }
    if (threadIdx.x == 0) {
        wsum[0] = (float)w;
        wsum[1] = (float)(w - (double)wsum[0]);
    }
}

// This call's inputs into the ring: one thread per (token, slot value).
extern "C" __global__ void window_store(const float* u, const float* dt, const float* a_log, float* ws,
                                        const float* meta, int t, int H, int P, int N, int G, int cd, int di, int r,
                                        float la) {
    int gn = G * N, sl = 2 * H + gn + di;
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)t * sl) return;
    int tt = (int)(i / sl), k = (int)(i % sl), pos0 = (int)meta[0];
    float* slot = ws + (long)H * P * N + (long)((pos0 + tt) % r) * sl;
    const float* row = u + (long)tt * cd;
    float v;
    if (k < H) v = dt[(long)tt * H + k] * -expf(a_log[k]) + la;
    else if (k < 2 * H) v = dt[(long)tt * H + k - H];
    else if (k < 2 * H + gn) v = row[di + k - 2 * H];
    else v = row[k - 2 * H - gn];
    slot[k] = v;
}

// When the call turned the ring over (pos0 + t ≥ r), per head (grid H, 256 threads), after window_store:
// the layer's state `ssm` (H, P, N) rebuilt from the window's r cached tokens, oldest first, by the
// recurrence from zero; W summed afresh (f64); L ← 0 (Mamba2::window's rebuild: nothing grows with the
// stream for the window's difference to cancel in f32).
extern "C" __global__ void window_rebuild(const float* meta, float* ws, float* ssm, int t, int H, int P, int N, int G,
                                          int di, int r) {
    int h = blockIdx.x, g = h / (H / G), gn = G * N, sl = 2 * H + gn + di, end = (int)meta[0] + t;
    if (end < r) return;
    float* lag = ws + (long)h * P * N;
    const float* ring = ws + (long)H * P * N;
    float* wsum = ws + (long)H * P * N + (long)r * sl + 2 * h;
    float* hs = ssm + (long)h * P * N;
    for (int i = threadIdx.x; i < P * N; i += blockDim.x) {
        float v = 0.0f;
        for (int j = 0; j < r; j++) {
            const float* slot = ring + (long)((end + j) % r) * sl;
            v = v * expf(slot[h]) + slot[H + h] * slot[2 * H + gn + h * P + i / N] * slot[2 * H + g * N + i % N];
        }
        hs[i] = v;
        lag[i] = 0.0f;
    }
    if (threadIdx.x == 0) {
        double w = 0.0;
        for (int j = 0; j < r; j++) w += (double)ring[(long)((end + j) % r) * sl + h];
        wsum[0] = (float)w;
        wsum[1] = (float)(w - (double)wsum[0]);
    }
}

// meta ← ((pos0 + t) mod r, filled or pos0 + t ≥ r), after every layer has read it.
extern "C" __global__ void window_meta(float* meta, int t, int r) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int pos0 = (int)meta[0];
    meta[1] = (meta[1] > 0.0f || pos0 + t >= r) ? 1.0f : 0.0f;
    meta[0] = (float)((pos0 + t) % r);
}

// ---- gated group RMSNorm (Mamba2::layer) --------------------------------------------------------------
// One block per (t, g): out = RMSNorm_group(y ⊙ silu(z)) · w, groups of gs = di/G channels; z = zx[:, :di].
// One group of gs channels, the whole block: out = RMSNorm(yr ⊙ silu(zr)) · w.
template <typename A>
__device__ void gated_group(const float* yr, const float* zr, const float* w, A* out, int gs, float eps) {
    float ss = 0.0f;
    for (int c = threadIdx.x; c < gs; c += blockDim.x) {
        float v = yr[c] * silu(zr[c]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss) / gs + eps);
    for (int c = threadIdx.x; c < gs; c += blockDim.x) from_f32(&out[c], yr[c] * silu(zr[c]) * inv * w[c]);
}
template <typename A>
__device__ void gated_norm(const float* y, const float* zx, const float* w, A* out, int di, int nin, int gs, float eps) {
    long t = blockIdx.x;
    int g0 = blockIdx.y * gs;
    gated_group(y + t * di + g0, zx + t * nin + g0, w + g0, out + t * di + g0, gs, eps);
}
extern "C" __global__ void gated_norm_f32(const float* y, const float* zx, const float* w, float* o, int di, int nin, int gs,
                                          float eps) { gated_norm(y, zx, w, o, di, nin, gs, eps); }
extern "C" __global__ void gated_norm_bf16(const float* y, const float* zx, const float* w, bf16_t* o, int di, int nin,
                                           int gs, float eps) { gated_norm(y, zx, w, o, di, nin, gs, eps); }

// ---- decode projections (t = 1; Mamba2::layer's norm + in_proj, gated norm + out_proj) ----------------
// One token's matmuls read each weight once: memory-bound GEMVs. Each CUDA block recomputes the norm
// of the whole input row into shared memory (a few KB from L2) instead of a separate launch, then its
// warps take rows rpb·blockIdx.x .. + rpb (rpb a multiple of 8), one row at a time, 16-byte weight loads.

// 16 bytes of weights (8 bf16 or 4 f32) at p, 16-byte aligned.
__device__ __forceinline__ uint4 load16(const void* p) {
#ifdef CUDA_EMU
    return emu_load16(p);
#else
    return *(const uint4*)p;
#endif
}
__device__ __forceinline__ float dot16(uint4 v, const float* h, const bf16_t*) {
    unsigned a[4] = {v.x, v.y, v.z, v.w};
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) s += __uint_as_float(a[i] << 16) * h[2 * i] + __uint_as_float(a[i] & 0xffff0000u) * h[2 * i + 1];
    return s;
}
__device__ __forceinline__ float dot16(uint4 v, const float* h, const float*) {
    return __uint_as_float(v.x) * h[0] + __uint_as_float(v.y) * h[1] + __uint_as_float(v.z) * h[2] + __uint_as_float(v.w) * h[3];
}

// out[r] = (accumulate ? out[r] : 0) + W[r, :]·h + bias[r] for this block's rows; W (rows, K) row-major,
// h (K) f32 in shared memory. Loops are uniform across the block (shuffles).
template <typename W>
__device__ void gemv_rows(const W* w, const float* h, const float* bias, float* out, int rows, int K, int accumulate, int rpb) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, per = 16 / (int)sizeof(W);
    int r1 = min(rows, ((int)blockIdx.x + 1) * rpb);
    bool vec = K % per == 0;
    for (int r0 = (int)blockIdx.x * rpb; r0 < r1; r0 += 8) {
        int r = r0 + warp;
        float acc = 0.0f;
        if (r < r1) {
            const W* wr = w + (long)r * K;
            if (vec) {
#pragma unroll 4
                for (int i = lane; i < K / per; i += 32) acc += dot16(load16(wr + (long)i * per), h + i * per, wr);
            } else {
                for (int i = lane; i < K; i += 32) acc += to_f32(wr[i]) * h[i];
            }
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (r < r1 && lane == 0) out[r] = (accumulate ? out[r] : 0.0f) + acc + (bias ? bias[r] : 0.0f);
    }
}

// zx (nin) = RMSNorm(x)·nw · W_inᵀ + bias. Dynamic shared memory d floats.
template <typename W>
__device__ void decode_in(const float* x, const float* nw, const W* w, const float* bias, float* zx, int d, int nin,
                          float eps, int rpb) {
    DYN_SMEM(h);
    rmsnorm_row(x, nw, h, d, eps);
    __syncthreads();
    gemv_rows(w, h, bias, zx, nin, d, 0, rpb);
}
extern "C" __global__ void decode_in_f32(const float* x, const float* nw, const float* w, const float* bias, float* zx,
                                         int d, int nin, float eps, int rpb) { decode_in(x, nw, w, bias, zx, d, nin, eps, rpb); }
extern "C" __global__ void decode_in_bf16(const float* x, const float* nw, const bf16_t* w, const float* bias, float* zx,
                                          int d, int nin, float eps, int rpb) { decode_in(x, nw, w, bias, zx, d, nin, eps, rpb); }

// x (d) += GroupRMSNorm(y ⊙ silu(z))·gw · W_outᵀ + bias; z = zx[:di], groups of gs channels. Dynamic
// shared memory di floats.
template <typename W>
__device__ void decode_out(const float* y, const float* zx, const float* gw, const W* w, const float* bias, float* x,
                           int di, int d, int gs, float eps, int rpb) {
    DYN_SMEM(h);
    for (int g0 = 0; g0 < di; g0 += gs) gated_group(y + g0, zx + g0, gw + g0, h + g0, gs, eps);
    __syncthreads();
    gemv_rows(w, h, bias, x, d, di, 1, rpb);
}
extern "C" __global__ void decode_out_f32(const float* y, const float* zx, const float* gw, const float* w, const float* bias,
                                          float* x, int di, int d, int gs, float eps, int rpb) {
    decode_out(y, zx, gw, w, bias, x, di, d, gs, eps, rpb);
}
extern "C" __global__ void decode_out_bf16(const float* y, const float* zx, const float* gw, const bf16_t* w,
                                           const float* bias, float* x, int di, int d, int gs, float eps, int rpb) {
    decode_out(y, zx, gw, w, bias, x, di, d, gs, eps, rpb);
}

// ---- LM head epilogues (score::NllHead, session::argmax) ---------------------------------------------
// The NLL over vocab tiles, so a tile of logits (rows, n) stays in L2 between the head GEMM that writes
// it and this read: per row (a warp each, 8 a block) the tile's columns v0 .. v0 + n merge into run
// (rows, 3) = (running max, Σ exp(l − max), target logit); `first` starts the run, `last` writes
// nll = max + log(Σ) − l[target].
extern "C" __global__ void lse_tile(const float* logits, int rows, int n, int v0, const unsigned* target, float* run,
                                    float* nll, int first, int last) {
    int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    bool ok = row < rows;  // every lane reaches the shuffles
    const float* l = logits + (long)row * n;
    float m = -INFINITY, s = 0.0f;
    for (int i = lane; ok && i < n; i += 32) m = fmaxf(m, l[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    for (int i = lane; ok && i < n; i += 32) s += expf(l[i] - m);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (!ok || lane != 0) return;
    float* r = run + row * 3;
    float rm = first ? -INFINITY : r[0], rs = first ? 0.0f : r[1], tl = first ? 0.0f : r[2];
    float mm = fmaxf(rm, m);
    rs = (first ? 0.0f : rs * expf(rm - mm)) + s * expf(m - mm);
    int tg = (int)target[row] - v0;
    if (tg >= 0 && tg < n) tl = l[tg];
    if (last) nll[row] = mm + logf(rs) - tl;
    else r[0] = mm, r[1] = rs, r[2] = tl;
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

// ---- state-level forgetting and checks (session::Session::at_boundary / feed) ----------------------------
// One block per (head, layer): the Frobenius norm of the head's SSM state (PN values at layer·ls +
// conv_len + h·PN). clip = 0: tau (n_layer, H) ← norm (calibration); clip = 1: the head is scaled by
// tau/norm when norm > tau (state normalization).
extern "C" __global__ void head_norm(float* state, float* tau, int H, int PN, long ls, long conv_len, int clip) {
    int h = blockIdx.x, l = blockIdx.y;
    float* s = state + l * ls + conv_len + (long)h * PN;
    float ss = 0.0f;
    for (int e = threadIdx.x; e < PN; e += blockDim.x) ss += s[e] * s[e];
    float norm = sqrtf(block_sum(ss));
    float* t = tau + (long)l * H + h;
    if (!clip) {
        if (threadIdx.x == 0) *t = norm;
        return;
    }
    float k = *t / norm;
    if (norm > *t)
        for (int e = threadIdx.x; e < PN; e += blockDim.x) s[e] *= k;
}

// out[block] = how many of the n values that block strides over are NaN or infinite.
extern "C" __global__ void count_nonfinite(const float* v, long n, float* out) {
    float c = 0.0f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        c += isfinite(v[i]) ? 0.0f : 1.0f;
    c = block_sum(c);
    if (threadIdx.x == 0) out[blockIdx.x] = c;
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
