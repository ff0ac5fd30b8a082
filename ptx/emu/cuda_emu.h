// A CPU stand-in for the CUDA C that ptx/*.cu use, so the same kernel source runs in `cargo test` on
// machines without a GPU (feature `cuda-emu`). Each block runs its threads as fibers switched at every
// __syncthreads; warp shuffles go through block-wide shared slots (every call site is reached by all
// threads of the block); `__shared__` statics are shared because blocks run one at a time.
// Not emulated: the PTX compiler, timing, and races the barriers do not expose.
#pragma once
#include <algorithm>
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
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define DYN_SMEM(name) float* name = emu_dyn_smem()

float* emu_dyn_smem();
void __syncthreads();
float emu_shfl_xor(float v, int lane_mask);
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_shfl_xor(v, o); }

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
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
using std::max;
using std::min;
