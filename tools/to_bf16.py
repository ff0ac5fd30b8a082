#!/usr/bin/env python3
"""Copy an HF-layout model directory with its safetensors weights stored as bf16 (round to nearest even).

Used to check the GPU's bf16 path on a trained model with the same bf16 weights on both sides:
  python3 tools/to_bf16.py models/mamba2-tiny-l4-t2048-a3-4m /tmp/tiny_bf16
  stuffed selftest --device cuda --model /tmp/tiny_bf16 --tokens 1000 --chunk 300
Needs only numpy and safetensors (tools/requirements.txt).
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def to_bf16_bits(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # finite weights: no NaN case


def main(src, dst):
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for f in dst.glob("*.safetensors"):
        tensors = {k: to_bf16_bits(v) for k, v in load_file(f).items()}
        # safetensors.numpy has no bf16 dtype: write the header by hand, then the raw bits.
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for k, v in tensors.items():
            header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + v.nbytes]}
            off += v.nbytes
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(f, "wb") as out:
            out.write(len(h).to_bytes(8, "little") + h)
            for v in tensors.values():
                out.write(v.tobytes())
    cfg = dst / "config.json"
    c = json.loads(cfg.read_text())
    c["torch_dtype"] = "bfloat16"
    cfg.write_text(json.dumps(c, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
