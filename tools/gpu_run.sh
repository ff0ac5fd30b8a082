#!/usr/bin/env bash
# Every GPU check and benchmark in one device call. Here first: tools/gpu_bundle.sh (it fills .gpu/: the
# binaries, the build path; with --peers also the peers' wheels); then, through the device tool, carrying .gpu:
#   bash tools/gpu_run.sh quick    # carry .gpu: FIRST on a fresh loan — the kernel contracts, selftest on the
#                                  # golden models, the ignored GPU tests, bench 130m at 256k: ≤ 320 s of steps (a 15-minute loan
#                                  # leaves room to fix something and run it again)
#   bash tools/gpu_run.sh check    # carry .gpu: selftest + the ignored GPU tests + bench 130m/2.7b at 1M, 2.7b at 4M
#   bash tools/gpu_run.sh peers    # carry .gpu: tools/bench_peers.py (mamba_ssm, HF) with stuffed in the same call,
#                                  # and a per-kernel time breakdown of 2.7b (STUFFED_PROFILE=1)
#   bash tools/gpu_run.sh sanitize # carry .gpu: compute-sanitizer's four tools over the tiny checkpoints
# Step limits sum to at most 590 s, inside the device's 600 s a call. Logs go to $OUT (the device tool's folder; ./gpu-out elsewhere), each step's also tarred in gpu-<what>.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-check}
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out/logs"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
for f in .gpu/*.xz; do [ -e "$f" ] && xz -d -k -f "$f"; done
# The GPU test binary reads tests/data through paths compiled in at the build path.
built=$(cat .gpu/built_at)
if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -sfn "$PWD" "$built"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/logs/nvidia-smi.csv" 2>&1
# step NAME SECONDS CMD…: one check, its log kept even when it hangs past its time.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1
  local rc=$?
  echo "rc $rc, $((SECONDS - t0)) s" >> "$out/logs/$name.log"
  tail -n 25 "$out/logs/$name.log"
}
bin=.gpu/stuffed
golden="--model tests/data/mamba2_hf_g1_untied --model tests/data/mamba2_hf_g2_tied --model tests/data/mamba2_hf_bf16 --model tests/data/mamba2_official --model tests/data/mamba2_neox_tiny"
# correctness SELFTEST_S NAMED_S TESTS_S: each kernel alone against its reference (a wrong kernel is
# named here first), selftest on the golden models (a failure rerun with every op synced, which names
# the kernel: a fault surfaces at a later sync), then the ignored GPU tests.
correctness() {
  step contracts 30 .gpu/kernel_contracts --ignored --test-threads 1
  step selftest "$1" $bin selftest --device cuda $golden
  grep -q "^rc 0," "$out/logs/selftest.log" ||
    step selftest-named "$2" env STUFFED_PROFILE=1 $bin selftest --device cuda --model tests/data/mamba2_official --tokens 300 --chunk 100
  step tests "$3" .gpu/gpu_tests --ignored --nocapture --test-threads 1
}
case $what in
  quick)
    correctness 60 40 150
    step bench-130m 40 $bin bench --device cuda --preset 130m --tokens 256k --decode 64
    ;;
  check)
    # On an H200 (2026-12-04): contracts 3 s, selftest 1 s, tests 14 s, 130m 7 s, 2.7b 75 s (writing the
    # synth preset included), 2.7b at 4M 187 s of tokens.
    correctness 40 30 80
    step bench-130m 30 $bin bench --device cuda --preset 130m --tokens 1m --decode 256
    step bench-2.7b 110 $bin bench --device cuda --preset 2.7b --tokens 1m --decode 256
    step bench-2.7b-4m 260 $bin bench --device cuda --preset 2.7b --tokens 4m --decode 0
    ;;
  peers)
    ls .gpu/wheels/*.whl > /dev/null || { echo "peers: bundle with tools/gpu_bundle.sh --peers" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    step peers-2.7b 300 python3 tools/bench_peers.py --preset 2.7b --tokens 1m --stuffed $bin --out "$out/logs/peers-2.7b.json"
    step profile-2.7b 90 env STUFFED_PROFILE=1 $bin bench --device cuda --preset 2.7b --tokens 256k --decode 32
    step peers-130m 120 python3 tools/bench_peers.py --preset 130m --tokens 1m --stuffed $bin --out "$out/logs/peers-130m.json"
    ;;
  sanitize)
    # compute-sanitizer (on the Firecracker machines; gVisor refuses it): out-of-bounds and misaligned
    # accesses, shared-memory races, reads of never-written device memory, barrier misuse, on the tiny
    # golden checkpoints (f32 and bf16), chunked with a partial block and token by token.
    cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    st="selftest --device cuda --tokens 300"
    step memcheck 100 "$cs" --tool memcheck --error-exitcode 9 $bin $st --chunk 100 --model tests/data/mamba2_official --model tests/data/mamba2_hf_bf16
    step memcheck-decode 90 "$cs" --tool memcheck --error-exitcode 9 $bin $st --chunk 1 --model tests/data/mamba2_hf_g2_tied
    step racecheck 120 "$cs" --tool racecheck --error-exitcode 9 $bin $st --chunk 100 --model tests/data/mamba2_official
    # initcheck does not see the stores of cuBLAS's Hopper kernels (the probe: a GemmEx bf16 output is
    # reported unwritten, an SGEMM's is not); STUFFED_SANITIZE_INIT=1 clears each GEMM's output range
    # first, so what initcheck still reports is ours.
    step initcheck-probe 30 "$cs" --tool initcheck --print-limit 4 python3 tools/initcheck_probe.py 256 64 64
    step initcheck 90 env STUFFED_SANITIZE_INIT=1 "$cs" --tool initcheck --print-limit 20 --error-exitcode 9 $bin $st --chunk 100 --model tests/data/mamba2_hf_bf16 --model tests/data/mamba2_official
    step initcheck-decode 60 env STUFFED_SANITIZE_INIT=1 "$cs" --tool initcheck --print-limit 20 --error-exitcode 9 $bin $st --chunk 1 --model tests/data/mamba2_hf_bf16
    step synccheck 60 "$cs" --tool synccheck --error-exitcode 9 $bin $st --chunk 100 --model tests/data/mamba2_official
    ;;
  *) echo "usage: tools/gpu_run.sh quick|check|peers|sanitize" >&2; exit 2 ;;
esac
tar czf "$out/gpu-$what.tar.gz" -C "$out" logs
