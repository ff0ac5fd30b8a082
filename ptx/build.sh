#!/usr/bin/env bash
# Regenerates the committed PTX from the CUDA C sources with the pinned nvcc (13.0.x emits PTX ISA 9.0,
# which the 580 driver of the GPU machines accepts; newer nvcc emits ISA the driver rejects).
# Usage: ptx/build.sh [--check]   (--check: fail if a committed .ptx differs from a fresh build)
# Needs nvcc 13.0 on PATH: tools/provision_cuda_sdk.sh prints the line to export.
set -euo pipefail
cd "$(dirname "$0")"
ver=$(nvcc --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)
[ "$ver" = "13.0" ] || { echo "ptx/build.sh: nvcc release $ver found, 13.0 required" >&2; exit 1; }
status=0
for cu in *.cu; do
  ptx=${cu%.cu}.ptx
  tmp=$(mktemp)
  # compute_80: JIT-compiled by the driver for the GPU it runs on (A100, H100, H200).
  nvcc -ptx -arch=compute_80 -O3 -o "$tmp" "$cu"
  if [ "${1:-}" = "--check" ]; then
    if ! cmp -s "$tmp" "$ptx"; then echo "ptx/$ptx is stale: run ptx/build.sh" >&2; status=1; fi
    rm -f "$tmp"
  else
    mv "$tmp" "$ptx"; chmod 644 "$ptx"
  fi
done
exit $status
