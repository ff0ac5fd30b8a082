// The emulator's runtime: runs one kernel launch as grid blocks, one after another, each block's
// threads as fibers, and dispatches by kernel name (emu_launch, called from host/src/cuda/emu.rs).
#include "cuda_emu.h"

#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <ucontext.h>
#include <vector>

// Threads of a block are fibers on one OS thread, switched at barriers: `__syncthreads` (the block)
// and warp-collective points (shuffles, WMMA loads and stores). Between two block barriers the warps
// run one after another, all the way through their shuffles, in one order in a segment and the
// reverse in the next; inside a warp the lanes run in turn between warp barriers, also alternating.
// So a read of another thread's write that lacks its barrier sees stale data in one of the orders:
// between warps, a shuffle is no barrier (as on the hardware, where warps run independently), and
// between lanes only a warp-collective point is. A shuffle not reached by every lane of its warp is
// an error. Fibers start with makecontext/setcontext once per launch and then switch with the
// compiler's __builtin_setjmp/__builtin_longjmp (stack, frame and instruction pointers only; the
// compiler saves what else is live): glibc's _longjmp also walks the pthread cleanup handlers on
// every switch, a fifth of the GPU tests' time. Each fiber walks all blocks of the launch.

dim3 emu_threadIdx, emu_blockIdx, emu_blockDim, emu_gridDim;

struct Jmp {
    void* b[5];
};
// Where a fiber stopped: runnable, at a warp barrier, at a block barrier, or done with the block.
enum Wait : char { RUN, WARP, BLOCK, END };
static std::vector<float> g_smem;  // dynamic shared memory, its start 32-byte aligned
static float* g_smem0;
static std::vector<float> g_shfl;     // two slot sets of a block's threads (emu_shfl_xor)
static std::vector<char> g_shfl_set;  // the set each thread's last shuffle wrote
static std::vector<ucontext_t> g_ctx;
static std::vector<std::vector<char>> g_stacks;
static std::vector<Jmp> g_jb;
static std::vector<Wait> g_wait;
static std::vector<char> g_started;
static Jmp g_main;
static unsigned g_cur, g_nblocks;
static const std::function<void()>* g_body;
static const size_t STACK = 128 << 10;

float* emu_dyn_smem() { return g_smem0; }
// A jump to where `j` was saved (its own function: a function may not both save and jump).
__attribute__((noinline)) static void jump(Jmp& j) { __builtin_longjmp(j.b, 1); }
static void wait_at(Wait w) {
    g_wait[g_cur] = w;
    if (!__builtin_setjmp(g_jb[g_cur].b)) jump(g_main);
}
void __syncthreads() { wait_at(BLOCK); }
void emu_syncwarp() { wait_at(WARP); }
// A shuffle is one warp barrier: each lane writes its value to one of two slot sets, alternating
// per shuffle, and reads its partner's after the barrier. A lane that goes on to its next shuffle
// writes the other set, so it cannot overwrite a value a slower lane has yet to read; the set after
// that is written only past the next barrier, which every lane reaches after its read.
float emu_shfl_xor(float v, int o) {
    unsigned t = threadIdx.x;
    float* set = g_shfl.data() + (g_shfl_set[t] ^= 1) * emu_blockDim.x;
    set[t] = v;
    emu_syncwarp();
    return set[t ^ (unsigned)o];
}

static void fiber_entry() {
    for (unsigned b = 0; b < g_nblocks; b++) {
        (*g_body)();
        wait_at(END);
    }
    jump(g_main);  // never resumed after the last block
}

static void resume(unsigned t) {
    g_cur = t;
    emu_threadIdx = dim3{t, 0, 0};
    g_wait[t] = RUN;
    if (!__builtin_setjmp(g_main.b)) {
        if (!g_started[t]) {
            g_started[t] = 1;
            setcontext(&g_ctx[t]);
        }
        jump(g_jb[t]);
    }
}

// Runs warp `w` up to its next block barrier (or the end of the block): its lanes in turn, released
// together at each warp barrier. False if some lanes wait at a warp barrier the others never reach.
static bool run_warp(unsigned w, unsigned block, unsigned order) {
    unsigned lo = w * 32, hi = std::min(lo + 32, block);
    for (unsigned sub = order;; sub++) {
        for (unsigned i = lo; i < hi; i++) {
            unsigned t = sub % 2 ? hi - 1 - (i - lo) : i;
            if (g_wait[t] == RUN) resume(t);
        }
        unsigned at_warp = 0;
        for (unsigned t = lo; t < hi; t++) at_warp += g_wait[t] == WARP;
        if (at_warp == 0) return true;
        if (at_warp != hi - lo) return false;
        for (unsigned t = lo; t < hi; t++) g_wait[t] = RUN;
    }
}

// Runs a launch; false if a warp's lanes diverged at a collective point (said on stderr).
static bool run(unsigned gx, unsigned gy, unsigned block, unsigned shared, const std::function<void()>& body) {
    g_body = &body;
    g_nblocks = gx * gy;
    g_smem.assign(shared / 4 + 9, 0.0f);
    g_smem0 = (float*)(((uintptr_t)g_smem.data() + 31) & ~(uintptr_t)31);
    g_shfl.assign(2 * block, 0.0f);
    g_shfl_set.assign(block, 0);
    g_ctx.resize(block);
    g_jb.resize(block);
    g_started.assign(block, 0);
    while (g_stacks.size() < block) g_stacks.emplace_back(STACK);
    emu_blockDim = dim3{block, 1, 1};
    emu_gridDim = dim3{gx, gy, 1};
    for (unsigned t = 0; t < block; t++) {
        getcontext(&g_ctx[t]);
        g_ctx[t].uc_stack.ss_sp = g_stacks[t].data();
        g_ctx[t].uc_stack.ss_size = STACK;
        g_ctx[t].uc_link = nullptr;
        makecontext(&g_ctx[t], fiber_entry, 0);
    }
    unsigned warps = (block + 31) / 32;
    for (unsigned b = 0; b < g_nblocks; b++) {
        emu_blockIdx = dim3{b % gx, b / gx, 0};
        g_wait.assign(block, RUN);
        // A block's dynamic shared memory starts as garbage on the hardware: NaN here.
        std::fill(g_smem.begin(), g_smem.end(), __uint_as_float(0x7fffffffu));
        for (unsigned seg = b;; seg++) {
            for (unsigned i = 0; i < warps; i++) {
                if (!run_warp(seg % 2 ? warps - 1 - i : i, block, seg)) {
                    std::fprintf(stderr, "cuda-emu: block %u: a warp's lanes diverge at a shuffle or WMMA op\n", b);
                    return false;
                }
            }
            bool more = false;
            for (unsigned t = 0; t < block; t++)
                if (g_wait[t] == BLOCK) g_wait[t] = RUN, more = true;
            if (!more) break;
        }
    }
    return true;
}

#include "../mamba2.cu"

// Argument i of the launch, as the driver reads it: a pointer to the value.
#define A(i, T) (*(T*)args[i])
typedef unsigned short u16;

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned block, unsigned shared, void** args) {
    std::string n(name);
    std::function<void()> f;
    if (n == "embed_f32") f = [&] { embed_f32(A(0, const float*), A(1, const unsigned*), A(2, float*), A(3, int), A(4, int)); };
    else if (n == "embed_bf16") f = [&] { embed_bf16(A(0, const u16*), A(1, const unsigned*), A(2, float*), A(3, int), A(4, int)); };
    else if (n == "rmsnorm_f32") f = [&] { rmsnorm_f32(A(0, const float*), A(1, const float*), A(2, float*), A(3, int), A(4, float)); };
    else if (n == "rmsnorm_bf16") f = [&] { rmsnorm_bf16(A(0, const float*), A(1, const float*), A(2, u16*), A(3, int), A(4, float)); };
    else if (n == "add_bias") f = [&] { add_bias(A(0, float*), A(1, const float*), A(2, long), A(3, int)); };
    else if (n == "conv_bc")
        f = [&] {
            conv_bc(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*), A(4, float*), A(5, int),
                    A(6, int), A(7, int), A(8, int), A(9, int), A(10, int), A(11, float));
        };
    else if (n == "conv_state_update")
        f = [&] { conv_state_update(A(0, const float*), A(1, float*), A(2, int), A(3, int), A(4, int), A(5, int), A(6, int)); };
    else if (n == "conv_step")
        f = [&] {
            conv_step(A(0, const float*), A(1, float*), A(2, const float*), A(3, const float*), A(4, float*), A(5, const float*),
                      A(6, float*), A(7, int), A(8, int), A(9, int), A(10, int), A(11, int), A(12, int), A(13, float),
                      A(14, float), A(15, float), A(16, float), A(17, const float*));
        };
    else if (n == "ssd_cumsum")
        f = [&] {
            ssd_cumsum(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, float*), A(5, int),
                       A(6, int), A(7, int), A(8, float), A(9, float), A(10, float), A(11, float), A(12, const float*));
        };
    else if (n == "ssd_chunk_state")
        f = [&] {
            ssd_chunk_state(A(0, float*), A(1, const float*), A(2, const float*), A(3, const float*), A(4, const float*),
                            A(5, const float*), A(6, const float*), A(7, float*), A(8, int), A(9, int), A(10, int), A(11, int),
                            A(12, int), A(13, int), A(14, int), A(15, int), A(16, int), A(17, int), A(18, int));
        };
    else if (n == "ssd_state_pass")
        f = [&] { ssd_state_pass(A(0, float*), A(1, const float*), A(2, float*), A(3, int), A(4, int), A(5, int)); };
    else if (n == "ssd_chunk_scan")
        f = [&] {
            ssd_chunk_scan(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*), A(4, const float*),
                           A(5, const float*), A(6, int), A(7, float*), A(8, int), A(9, int), A(10, int), A(11, int), A(12, int),
                           A(13, int), A(14, int), A(15, int), A(16, int));
        };
    else if (n == "ssd_step")
        f = [&] {
            ssd_step(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, const float*), A(5, int),
                     A(6, float*), A(7, int), A(8, int), A(9, int), A(10, int), A(11, int), A(12, float));
        };
    else if (n == "gated_norm_f32")
        f = [&] {
            gated_norm_f32(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, int), A(5, int),
                           A(6, int), A(7, float));
        };
    else if (n == "gated_norm_bf16")
        f = [&] {
            gated_norm_bf16(A(0, const float*), A(1, const float*), A(2, const float*), A(3, u16*), A(4, int), A(5, int),
                            A(6, int), A(7, float));
        };
    else if (n == "decode_in_f32")
        f = [&] {
            decode_in_f32(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*), A(4, float*), A(5, int),
                          A(6, int), A(7, float), A(8, int));
        };
    else if (n == "decode_in_bf16")
        f = [&] {
            decode_in_bf16(A(0, const float*), A(1, const float*), A(2, const u16*), A(3, const float*), A(4, float*), A(5, int),
                           A(6, int), A(7, float), A(8, int));
        };
    else if (n == "decode_out_f32")
        f = [&] {
            decode_out_f32(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*), A(4, const float*),
                           A(5, float*), A(6, int), A(7, int), A(8, int), A(9, float), A(10, int));
        };
    else if (n == "decode_out_bf16")
        f = [&] {
            decode_out_bf16(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const u16*), A(4, const float*),
                            A(5, float*), A(6, int), A(7, int), A(8, int), A(9, float), A(10, int));
        };
    else if (n == "lse_tile")
        f = [&] {
            lse_tile(A(0, const float*), A(1, int), A(2, int), A(3, int), A(4, const unsigned*), A(5, float*), A(6, float*),
                     A(7, int), A(8, int));
        };
    else if (n == "argmax_rows") f = [&] { argmax_rows(A(0, const float*), A(1, unsigned*), A(2, int), A(3, int)); };
    else if (n == "ssd_window")
        f = [&] {
            ssd_window(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, float*),
                       A(5, const float*), A(6, int), A(7, int), A(8, int), A(9, int), A(10, int), A(11, int), A(12, int),
                       A(13, int), A(14, float));
        };
    else if (n == "window_rebuild")
        f = [&] {
            window_rebuild(A(0, const float*), A(1, float*), A(2, float*), A(3, int), A(4, int), A(5, int), A(6, int),
                           A(7, int), A(8, int), A(9, int));
        };
    else if (n == "window_store")
        f = [&] {
            window_store(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, const float*),
                         A(5, int), A(6, int), A(7, int), A(8, int), A(9, int), A(10, int), A(11, int), A(12, int),
                         A(13, float));
        };
    else if (n == "window_meta")
        f = [&] { window_meta(A(0, float*), A(1, int), A(2, int)); };
    else if (n == "head_norm")
        f = [&] { head_norm(A(0, float*), A(1, float*), A(2, int), A(3, int), A(4, long), A(5, long), A(6, int)); };
    else if (n == "count_nonfinite") f = [&] { count_nonfinite(A(0, const float*), A(1, long), A(2, float*)); };
    else if (n == "probe_sums")
        f = [&] {
            probe_sums(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, int), A(5, int), A(6, int),
                       A(7, int), A(8, int), A(9, int), A(10, int), A(11, float));
        };
    else {
        std::fprintf(stderr, "cuda-emu: unknown kernel %s\n", name);
        return 1;
    }
    // One launch at a time: the fiber scheduler's state is global (tests run launches from several threads).
    static std::mutex lock;
    std::lock_guard<std::mutex> guard(lock);
    return run(gx, gy, block, shared, f) ? 0 : 1;
}
