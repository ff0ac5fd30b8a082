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
  # What the driver's JIT will do on the GPU machines, done here: the PTX must assemble for Ampere and
  # Hopper (a PTX the JIT rejects fails only at module load on the GPU). Spills are reported.
  for sm in sm_80 sm_90; do
    if ! info=$(ptxas -arch=$sm -v -o /dev/null "$tmp" 2>&1); then
      echo "ptx/$ptx: ptxas -arch=$sm failed:" >&2; echo "$info" >&2; status=1
    elif grep -q '[1-9][0-9]* bytes spill' <<< "$info"; then
      echo "ptx/$ptx: warning: register spills on $sm:" >&2; grep -B2 '[1-9][0-9]* bytes spill' <<< "$info" >&2
    fi
  done
  if [ "${1:-}" = "--check" ]; then
    if ! cmp -s "$tmp" "$ptx"; then echo "ptx/$ptx is stale: run ptx/build.sh" >&2; status=1; fi
    rm -f "$tmp"
  else
    mv "$tmp" "$ptx"; chmod 644 "$ptx"
  fi
done
exit $status
