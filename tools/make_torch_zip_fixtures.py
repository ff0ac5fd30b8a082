#!/usr/bin/env python3
"""Write small torch-zip checkpoints to tests/data/torch_zip/ for host/src/checkpoint/torch_zip.rs.

Run with the reference venv: /root/pyref/bin/python tools/make_torch_zip_fixtures.py
Writes: dtypes.pth, shared.pth, hf/pytorch_model.bin, transposed.pth, evil.pth, zip64.pth, expected.json.
"""
import io
import json
import os
import pickle
import struct
import zipfile
import zlib

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "torch_zip")
DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
         torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def describe(sd):
    return {k: {"shape": list(v.shape), "dtype": DTYPE[v.dtype],
                "first": [float(x) for x in v.detach().flatten()[:4].float().tolist()]}
            for k, v in sd.items() if isinstance(v, torch.Tensor)}


def save(rel, sd):
    path = os.path.join(OUT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sd, path)
    assert os.path.getsize(path) < 20_000, rel
    return describe(sd)


def zip64(path, members):
    """Stored-only ZIP whose central directory and end record use ZIP64 for every size and offset,
    with torch-like padding in the local extra field (so local and central extra lengths differ)."""
    out = io.BytesIO()
    central = []
    for name, data in members:
        name_b = name.encode()
        off = out.tell()
        extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))  # zip64: uncompressed, compressed
        pad = (-(off + 30 + len(name_b) + len(extra) + 4)) % 64
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding, as torch writes
        crc = zlib.crc32(data)
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                              len(name_b), len(extra)) + name_b + extra)
        assert out.tell() % 64 == 0
        out.write(data)
        cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), off)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc,
                                   0xFFFFFFFF, 0xFFFFFFFF, len(name_b), len(cextra), 0, 0, 0, 0,
                                   0xFFFFFFFF) + name_b + cextra)
    cd_off = out.tell()
    for c in central:
        out.write(c)
    cd_size = out.tell() - cd_off
    z64_off = out.tell()
    n = len(members)
    out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_off))
    out.write(struct.pack("<IIQI", 0x07064B50, 0, z64_off, 1))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    with open(path, "wb") as f:
        f.write(out.getvalue())


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    exp = {}
    exp["dtypes.pth"] = save("dtypes.pth", {
        "w.f32": torch.randn(3, 5),
        "w.bf16": torch.randn(4, 2).to(torch.bfloat16),
        "w.f16": torch.randn(7).to(torch.float16),
        "ids": torch.tensor([5, -3, 50276, 0], dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    })
    base = torch.arange(12, dtype=torch.float32)
    exp["shared.pth"] = save("shared.pth", {
        "emb": base.view(3, 4),
        "head": base.view(3, 4),  # tied: the same storage, same offset
        "mid": base[4:10].view(2, 3),  # storage_offset 4
        "param": torch.nn.Parameter(torch.ones(2, 2)),  # _rebuild_parameter
        "step": 7,  # non-tensor value: skipped
    })
    # A module state_dict: an OrderedDict whose `_metadata` arrives through BUILD.
    exp["hf/pytorch_model.bin"] = save("hf/pytorch_model.bin", torch.nn.Sequential(torch.nn.Linear(3, 2)).state_dict())
    save("transposed.pth", {"ok": torch.zeros(2), "t": torch.arange(6.0).reshape(2, 3).t()})

    # A torch-looking zip whose pickle calls os.system: a loader must refuse it without running it.
    pkl = pickle.dumps({"x": Evil()}, protocol=2)
    with zipfile.ZipFile(os.path.join(OUT, "evil.pth"), "w", zipfile.ZIP_STORED) as z:
        z.writestr("evil/data.pkl", pkl)
        z.writestr("evil/byteorder", "little")
        z.writestr("evil/version", "3\n")

    # ZIP64 copy of dtypes.pth, members renamed to another stem.
    with zipfile.ZipFile(os.path.join(OUT, "dtypes.pth")) as z:
        members = [("big/" + i.filename.split("/", 1)[1], z.read(i)) for i in z.infolist()]
    zip64(os.path.join(OUT, "zip64.pth"), members)
    exp["zip64.pth"] = exp["dtypes.pth"]

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
