// A CPU stand-in for the CUDA C that ptx/*.cu use, so the same kernel source runs in `cargo test` on
// machines without a GPU (feature `cuda-emu`). Each block runs its threads as fibers switched at every
// __syncthreads and warp-collective point (emu.cpp schedules them); warp shuffles go through per-thread
// slots; `__shared__` statics are shared because blocks run one at a time.
// WMMA fragments hold their whole tile and lane 0 of each warp does the warp's load/mma/store (kernels
// must not touch fragment elements); loads and stores check the hardware's alignment rules.
// Not emulated: the PTX compiler, timing, and races that neither order (forward, backward) exposes.
#pragma once
#define CUDA_EMU
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern dim3 emu_threadIdx, emu_blockIdx, emu_blockDim, emu_gridDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim

#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define DYN_SMEM(name) float* name = emu_dyn_smem()

float* emu_dyn_smem();
void __syncthreads();
void emu_syncwarp();
inline void __syncwarp(unsigned = 0xffffffffu) { emu_syncwarp(); }
float emu_shfl_xor(float v, int lane_mask);
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_shfl_xor(v, o); }

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::isfinite;
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
struct uint4 {
    unsigned x, y, z, w;
};
// A 16-byte vector load; the hardware wants the address 16-byte aligned.
inline uint4 emu_load16(const void* p) {
    if ((uintptr_t)p % 16 != 0) {
        std::fprintf(stderr, "cuda-emu: 16-byte load from %p is misaligned\n", p);
        std::abort();
    }
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}
using std::max;
using std::min;

// ---- nvcuda::wmma, m16n16k8 TF32 (the shape the kernels use) ---------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest, ties away from zero.
inline float __float_to_tf32(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    return __uint_as_float((u + 0x1000u) & 0xffffe000u);
}
// What the tensor cores read of an f32 register holding a TF32 operand.
inline float emu_tf32_trunc(float x) { return __uint_as_float(__float_as_uint(x) & 0xffffe000u); }

template <typename Use, int M, int N, int K> struct emu_dims;
template <int M, int N, int K> struct emu_dims<matrix_a, M, N, K> { enum { R = M, C = K }; };
template <int M, int N, int K> struct emu_dims<matrix_b, M, N, K> { enum { R = K, C = N }; };
template <int M, int N, int K> struct emu_dims<accumulator, M, N, K> { enum { R = M, C = N }; };

template <typename Use, int M, int N, int K, typename T, typename L = void>
struct fragment {
    enum { R = emu_dims<Use, M, N, K>::R, C = emu_dims<Use, M, N, K>::C };
    float v[R * C];  // row-major, the whole tile
};

inline bool emu_lane0() { return (threadIdx.x & 31) == 0; }
inline void emu_check(const void* p, unsigned ldm) {
    if ((uintptr_t)p % 32 != 0 || ldm % 4 != 0) {
        std::fprintf(stderr, "cuda-emu: wmma pointer %p / ldm %u breaks the 256-bit / 16-byte alignment rule\n", p, ldm);
        std::abort();
    }
}
template <typename L> inline bool emu_is_row();
template <> inline bool emu_is_row<row_major>() { return true; }
template <> inline bool emu_is_row<col_major>() { return false; }

template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const float* p, unsigned ldm) {
    emu_check(p, ldm);
    // Warp-collective: it reads after every lane arrives, and no lane goes on before it has read.
    emu_syncwarp();
    typedef fragment<Use, M, N, K, T, L> F;
    if (emu_lane0())
        for (int r = 0; r < F::R; r++)
            for (int c = 0; c < F::C; c++) f.v[r * F::C + c] = emu_is_row<L>() ? p[r * ldm + c] : p[c * ldm + r];
    emu_syncwarp();
}
template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float x) {
    if (!emu_lane0()) return;
    for (float& e : f.v) e = x;
}
template <int M, int N, int K, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    if (!emu_lane0()) return;
    float out[M * N];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float acc = c.v[i * N + j];
            for (int k = 0; k < K; k++) acc += emu_tf32_trunc(a.v[i * K + k]) * emu_tf32_trunc(b.v[k * N + j]);
            out[i * N + j] = acc;
        }
    std::memcpy(d.v, out, sizeof out);
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
    emu_check(p, ldm);
    if (emu_lane0())
        for (int r = 0; r < M; r++)
            for (int c = 0; c < N; c++) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * N + c];
    emu_syncwarp();  // warp-collective: the tile is whole when any lane goes on
}
}  // namespace wmma
}  // namespace nvcuda
