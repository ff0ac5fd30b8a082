#!/usr/bin/env bash
# Builds what a GPU machine needs (it has no cargo) into .gpu/ (git-ignored; add `/.gpu/` to
# .git/info/exclude): the stuffed binary and the GPU test binary, both with `--features cuda`, stripped.
# Then, on the GPU machine, from the repository root:
#   export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:$LD_LIBRARY_PATH
#   mkdir -p "$(dirname "$BUILT_AT")" && ln -sfn "$PWD" "$BUILT_AT"     # test data paths are compiled in
#   .gpu/stuffed selftest --device cuda --model tests/data/mamba2_hf_g1_untied --model tests/data/mamba2_hf_bf16
#   .gpu/gpu_tests --ignored --nocapture
#   .gpu/stuffed bench --device cuda --preset 2.7b --tokens 1m
# where BUILT_AT is the repository path printed below.
set -euo pipefail
cd "$(dirname "$0")/.."
sdk="${XDG_CACHE_HOME:-$HOME/.cache}/stuffed-cuda-sdk-13.0"
bash tools/provision_cuda_sdk.sh "$sdk" >/dev/null
export CUDA_LIBRARY_PATH="$sdk/cuda" PATH="$sdk/cuda/bin:$PATH"
ptx/build.sh --check
export CARGO_TARGET_DIR=target/cuda
cargo build --release -p stuffed --features cuda
tests=$(cargo test --release -p stuffed-tests --features cuda --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu": print(m["executable"])')
mkdir -p .gpu
cp target/cuda/release/stuffed .gpu/stuffed
cp "$tests" .gpu/gpu_tests
strip .gpu/stuffed .gpu/gpu_tests
ls -la .gpu
echo "BUILT_AT=$PWD"
