#!/usr/bin/env bash
# What issue 22 leaves for a CPU with AMX (`lscpu`: amx_tile, amx_bf16): the AMX kernel
# (core/src/gemm/amx.rs) has so far run only over a scalar model of the tiles and, its compiled
# instructions, through the SIGILL trap emulator of host/src/amx_emu.rs. On such a machine, from a fresh
# clone, in this order (each step prints what ran; the first failure stops the script):
#   1. the CPU's flags, and whether Linux grants the tile state (the kernel-contract test panics
#      with the reason when the CPU advertises AMX and the OS refuses it);
#   2. the kernel contract (tests/tests/gemm.rs: the nasty shapes on every level, AMX exact and fast,
#      the shipped models' mean NLL on every exact path within 1e-5 of the portable one, and every
#      kernel reading only the panel bytes it wrote; it fails if the CPU advertises AMX and the AMX
#      path did not run or the OS refused it);
#   3. every golden test (they run on every level the CPU has, AMX included), the fast-matmul test,
#      and tests/kernels.rs (the core's forward on a 32 KiB stack, AMX level included);
#   4. `gemm_sweep` at the released shapes on the avx512, avx512bf16 and amx levels, exact and fast,
#      and `gemm_sweep amx`: the AMX kernel's plans side by side (one C tile or four per tile-config
#      block; scalar or AVX-512 packing and adding), GFLOP/s on one thread — the kernel runs
#      `Plan::BEST` (core/src/gemm/amx.rs), chosen on a CPU without AMX: keep it only if it wins here;
#      and `gemm_sweep amx-f32`: f32-stored weights on the AVX-512 f32 kernel (what runs them below
#      AMX) against their bf16 hi + lo halves on the tiles (what `matmul` runs on the amx level),
#      made once (as `matmul` keeps them) or in each call; then the same end to end: `stuffed bench`
#      on the 130m f32 synth under STUFFED_SIMD=amx against avx512bf16, alternating, 3 pairs — if
#      the tiles lose, turn f32 off them in `split_halves` (core/src/gemm/mod.rs);
#   5. (`full` only) `tools/bench_cpu_peers.sh` with `STUFFED_SIMD=amx` against llama.cpp (≈ 20–30
#      minutes, downloads llama.cpp's sdist and a converter venv on the first run).
# Then: tune the AMX blocking from step 4, make AMX the default where it wins (host/src/exec.rs:
# `detect_simd`), rewrite README's CPU tables from step 5, and close issue 22 with the numbers.
#
# Usage: tools/amx_check.sh [quick|full]   (default quick: steps 1–4, ≈ 6 minutes on the 2-core VM)
#        STUFFED_AMX_CHECK_ANYWAY=1 tools/amx_check.sh quick   runs the steps on a CPU without AMX
#        (to check the script itself): steps 1-3 with `--features amx-emu`, so the AMX level runs
#        through the trap emulator; step 4's `amx` rows fall back to avx512bf16 (no emulated timing).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
case "$mode" in quick | full) ;; *) echo "usage: tools/amx_check.sh [quick|full]" >&2; exit 2 ;; esac

flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512f|avx512_bf16|amx_tile|amx_bf16|amx_int8)$' | sort | tr '\n' ' ')
model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo "amx_check: $model; flags: $flags; $(nproc) cores"
emu=""
if [[ $flags != *amx_tile* || $flags != *amx_bf16* ]]; then
    if [[ ${STUFFED_AMX_CHECK_ANYWAY:-} != 1 ]]; then
        echo "amx_check: this CPU has no AMX (amx_tile / amx_bf16 absent): nothing to check here" >&2
        exit 3
    fi
    echo "amx_check: no AMX here; running the steps anyway (STUFFED_AMX_CHECK_ANYWAY=1), AMX through the trap emulator"
    emu="--features amx-emu"
fi

step() { echo; echo "== amx_check step $1: $2"; }

step 1-2 "kernel contract on every level (nasty shapes, AMX exact and fast, shipped models' mean NLL)"
# shellcheck disable=SC2086 # $emu: no words, or the feature flag's two
cargo test --release -p stuffed-tests $emu --test gemm -- --nocapture --test-threads=1 2>&1 | grep -vE '^\s*$|^ +(Compiling|Finished|Running)'

step 3 "golden tests on every level, and --fast-matmul"
# shellcheck disable=SC2086
cargo test --release -p stuffed-tests $emu --test golden_mamba2 --test golden_mamba1 --test golden_rwkv \
    --test golden_rwkv7 --test golden_gla --test golden_hgrn2 --test golden_delta_net --test kernels \
    --test fast_matmul 2>&1 | grep -E '^test result|FAILED|panicked'

step 4 "gemm_sweep, 2 threads: avx512 / avx512bf16 / amx, exact and fast"
cargo build --release --example gemm_sweep --quiet
sweep=target/release/examples/gemm_sweep
for level in avx512 avx512bf16 amx; do
    for fast in 0 1; do
        [[ $level == avx512 && $fast == 1 ]] && continue
        echo "-- STUFFED_SIMD=$level STUFFED_FAST_MATMUL=$fast"
        STUFFED_SIMD=$level STUFFED_FAST_MATMUL=$fast RAYON_NUM_THREADS=2 "$sweep" bf16
    done
done
echo "-- the AMX kernel's plans (on a CPU without AMX: their non-tile work only)"
RAYON_NUM_THREADS=1 "$sweep" amx
echo "-- f32 weights: the AVX-512 f32 kernel against their bf16 hi + lo split on the tiles, made once or in the call"
"$sweep" amx-f32
echo "-- f32 weights end to end (130m f32 synth, 4,096 tokens, 2 threads): amx (halves on the tiles) vs avx512bf16 (AVX-512 f32)"
cargo build --release -p stuffed --quiet
for pair in 1 2 3; do
    for level in amx avx512bf16; do
        echo "pair $pair, STUFFED_SIMD=$level:"
        STUFFED_SIMD=$level target/release/stuffed bench --preset 130m --tokens 4k --decode 0 --dtype f32 --threads 2 |
            grep -E '^(device|tokens|memory)'
    done
done

if [[ $mode == full ]]; then
    step 5 "side by side with llama.cpp, STUFFED_SIMD=amx (default and --fast-matmul columns)"
    STUFFED_SIMD=amx bash tools/bench_cpu_peers.sh --pairs 3
fi
echo
echo "amx_check: done ($mode)"
