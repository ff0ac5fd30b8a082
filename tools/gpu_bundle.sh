#!/usr/bin/env bash
# Builds what a GPU machine needs (it has no cargo) into .gpu/ (git-ignored: the device tool carries
# it only when named, `carry: [".gpu"]`): the stuffed binary and the GPU test binaries (the chain, tests/gpu.rs, and the
# per-kernel contracts, tests/kernel_contracts.rs), all with `--features cuda`, stripped;
# the build path (the test binary's data paths are compiled in); with --peers, the peers' wheels
# (mamba_ssm, causal_conv1d) from ../shared/wheels, for `gpu_run.sh peers` only. Then run
# tools/gpu_run.sh on the GPU machine (`quick` first). Fails if the tree the device tool carries plus
# the bundle pass 56 MiB (its limit is 64 MiB a call).
#   tools/gpu_bundle.sh [--peers]
set -euo pipefail
cd "$(dirname "$0")/.."
peers=${1:-}
sdk="${XDG_CACHE_HOME:-$HOME/.cache}/stuffed-cuda-sdk-13.0"
bash tools/provision_cuda_sdk.sh "$sdk" >/dev/null
export CUDA_LIBRARY_PATH="$sdk/cuda" PATH="$sdk/cuda/bin:$PATH"
ptx/build.sh --check
# Lean (no shipped models embedded) and xz-compressed: the device takes 64 MiB a call, tree included.
export CARGO_TARGET_DIR=target/cuda-lean STUFFED_LEAN=1
cargo build --release -p stuffed --features cuda
# The test binaries by target name: gpu (the chain) → .gpu/gpu_tests, kernel_contracts → .gpu/kernel_contracts.
cargo test --release -p stuffed-tests --features cuda --test gpu --test kernel_contracts --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("gpu", "kernel_contracts"):
        print(m["target"]["name"], m["executable"])' > target/cuda-lean/test-binaries
rm -rf .gpu
mkdir -p .gpu
cp target/cuda-lean/release/stuffed .gpu/stuffed
while read -r name exe; do
  case $name in gpu) cp "$exe" .gpu/gpu_tests ;; *) cp "$exe" ".gpu/$name" ;; esac
done < target/cuda-lean/test-binaries
[ -e .gpu/gpu_tests ] && [ -e .gpu/kernel_contracts ] || { echo "gpu_bundle: a test binary did not build" >&2; exit 1; }
strip .gpu/stuffed .gpu/gpu_tests .gpu/kernel_contracts
xz -T0 -6 .gpu/stuffed .gpu/gpu_tests .gpu/kernel_contracts
echo "$PWD" > .gpu/built_at
if [ "$peers" = --peers ]; then
  mkdir -p .gpu/wheels
  cp ../shared/wheels/mamba_ssm-*.whl ../shared/wheels/causal_conv1d-*.whl .gpu/wheels/
fi
du -sh .gpu; ls -la .gpu
# What the device tool carries: tracked files, untracked ones git does not ignore, and .gpu.
tree=$(git ls-files -z --cached --others --exclude-standard -- . ':!.gpu' | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
bundle=$(du -sb .gpu | cut -f1)
total=$(( (tree + bundle) / 1048576 ))
echo "tree $(( tree / 1048576 )) MiB + bundle $(( bundle / 1048576 )) MiB = $total MiB (limit 56)"
[ "$total" -lt 56 ] || { echo "gpu_bundle: tree + bundle over 56 MiB" >&2; exit 1; }
