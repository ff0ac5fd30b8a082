#!/usr/bin/env python3
"""Golden reference tensors for RWKV-6 (x060) and RWKV-5.2 (x052) from the `rwkv` pip package (CPU, f32).

Writes, under tests/data/ (FORMATS.md §3, §8):

  rwkv6_tiny/       tiny x060 model, f32 .pth (BlinkDL key names, torch.save zip)
  rwkv6_tiny_bf16/  the same weights stored bf16; reference = the package on that .pth
                    (it folds LN0 into emb in bf16, then upcasts everything to f32)
  rwkv5_tiny/       tiny x052 model, f32 .pth
  rwkv6_tiny_hf/    rwkv6_tiny converted to the HF `RWKV/v6-Finch-*-HF` key names (FORMATS §3.5),
                    model.safetensors + config.json (no ref: the tests use rwkv6_tiny's; LN0 not folded)
  rwkv5_tiny_hf/    the same for rwkv5_tiny (`RWKV/v5-Eagle-*-HF`)
  rwkv6_bf16_m{Dm}_d{Dd}/  small x060 models stored bf16 with odd LoRA ranks (Dm, Dd) = (3, 5),
                    (5, 7), (7, 3): V 32, C 32, L 2, N 16, F 64, tens of KB each. Each seed is the
                    first (from a per-case start) whose LN0 fold, as the package computes it, rounds
                    some element (|x| ≥ 0.5) of a row the ids use to the other bf16 neighbour than a
                    plain f32 LayerNorm would (a boundary case: FORMATS.md §3.2); ids = randint(0, 32, ...).
  rwkv6_time_state/, rwkv5_time_state/  small f32 state-tuned models (V 32, C 32, L 2, N 16, F 64; x060
                    with Dm 4, Dd 8): every layer's `blocks.N.att.time_state` [H, N, N] (RWKV-PEFT's state
                    tuning merged into the .pth), which the package transposes into the state every
                    stream starts from (rwkv/model.py `if args.time_state:`); ids = randint(0, 32, ...).
                    Beside each, <case>_file/state.pth: only those time_state tensors, as RWKV-PEFT saves a state and
                    RWKV-Runner loads it beside a model (`stuffed --state-file`; the package on the model
                    without them, started from time_state.transpose(1, 2), gives the same logits exactly).

each holding model.pth (or model.safetensors) and ref.safetensors:
  input_ids        i64 [1, T]
  logits           [T, V] model.forward(ids, None, full_output=True)  (package "seq" mode)
  logits_stepwise  [T, V] model.forward([tok], state) token after token  ("one" mode)
  logits_split     [T, V] forward(ids[:40], full_output) then forward(ids[40:], state, full_output)
  att_shift        [L, C]        final token-shift of the time mix (the last ln1 output)
  wkv_state        [L, H, N, N]  final S, [head][key][value]
  ffn_shift        [L, C]        final token-shift of the channel mix (the last ln2 output)
  emb_ln0          [V, C]        (bf16 cases) the package's embedding with LN0 folded in, as f32
metadata "reference": JSON with the recipe and spreads.

Run from the repository root with the rwkv wheel installed (--no-deps) into /root/pyref:

    RWKV_CUDA_ON=0 RWKV_JIT_ON=0 /root/pyref/bin/python tools/golden_rwkv.py [CASE ...]

(with case names, only those are written). The fold is torch's CPU LayerNorm kernel, whose f32
operation order depends on the kernel torch dispatches (x86-64 torch 2.15 here: 8 float lanes, fused
multiply-adds); stuffed follows that one (core/src/rwkv.rs `layer_norm_torch_reduced`).

Tiny shapes (FORMATS §8): V 256, C 64, L 2, N 16 (H 4), F 224, Dm 32, Dd 64.  Recipe:
torch.manual_seed(1234) init (Linear N(0, 1/in), LN weight 1 / bias 0, decay U(-6, 0.5),
maa/mix U(0,1), u 0.5·N(0,1), LoRA N(0, 0.1)), then every tensor += 0.1·N(0,1) from one
generator seeded 42 in key order; ids = randint(0, 256, (1, 61), generator=manual_seed(7)).
"""
import json
import os
import tempfile
import sys

os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ.setdefault("RWKV_JIT_ON", "0")

import numpy as np
import torch
import torch.nn.functional as F_
from safetensors.torch import save_file

from rwkv.model import RWKV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
V, C, L, N, F, DM, DD = TINY = (256, 64, 2, 16, 224, 32, 64)
H = C // N
# The bf16 files with odd LoRA ranks: small shapes (tens of KB each), (Dm, Dd, first seed tried).
SMALL_V, SMALL_C, SMALL_F = 32, 32, 64
ODD_RANKS = ((3, 5, 100), (5, 7, 200), (7, 3, 300))
T, SPLIT = 61, 40
torch.set_num_threads(1)


def build(version, dims=TINY, seed=1234, noise_seed=42):
    V, C, L, N, F, DM, DD = dims
    H = C // N
    torch.manual_seed(seed)
    w = {}

    def lin(o, i):
        return torch.randn(o, i) / i**0.5

    w["emb.weight"] = torch.randn(V, C) * 0.5
    for l in range(L):
        b = f"blocks.{l}."
        if l == 0:
            w[b + "ln0.weight"] = torch.ones(C)
            w[b + "ln0.bias"] = torch.zeros(C)
        for n in ("ln1", "ln2"):
            w[b + n + ".weight"] = torch.ones(C)
            w[b + n + ".bias"] = torch.zeros(C)
        a = b + "att."
        if version == 6:
            for j in "xwkvrg":
                w[a + f"time_maa_{j}"] = torch.rand(1, 1, C)
            w[a + "time_maa_w1"] = torch.randn(C, 5 * DM) * 0.1
            w[a + "time_maa_w2"] = torch.randn(5, DM, C) * 0.1
            w[a + "time_decay"] = torch.rand(1, 1, C) * 6.5 - 6
            w[a + "time_decay_w1"] = torch.randn(C, DD) * 0.1
            w[a + "time_decay_w2"] = torch.randn(DD, C) * 0.1
        else:
            for j in "kvrg":
                w[a + f"time_mix_{j}"] = torch.rand(1, 1, C)
            w[a + "time_decay"] = torch.rand(H, N) * 6.5 - 6
        w[a + "time_faaaa"] = torch.randn(H, N) * 0.5
        for n in ("receptance", "key", "value", "gate", "output"):
            w[a + n + ".weight"] = lin(C, C)
        w[a + "ln_x.weight"] = torch.ones(C)
        w[a + "ln_x.bias"] = torch.zeros(C)
        f = b + "ffn."
        pre = "time_maa_" if version == 6 else "time_mix_"
        w[f + pre + "k"] = torch.rand(1, 1, C)
        w[f + pre + "r"] = torch.rand(1, 1, C)
        w[f + "key.weight"] = lin(F, C)
        w[f + "receptance.weight"] = lin(C, C)
        w[f + "value.weight"] = lin(C, F)
    w["ln_out.weight"] = torch.ones(C)
    w["ln_out.bias"] = torch.zeros(C)
    w["head.weight"] = lin(V, C)
    g = torch.Generator().manual_seed(noise_seed)
    for k in w:
        w[k] = (w[k] + 0.1 * torch.randn(w[k].shape, generator=g)).contiguous()
    return w


def run(path, ids):
    m = RWKV(model=path, strategy="cpu fp32", verbose=False)
    full, st = m.forward(ids, None, full_output=True)
    steps, s = [], None
    for t in ids:
        o, s = m.forward([t], s)
        steps.append(o)
    a, s2 = m.forward(ids[:SPLIT], None, full_output=True)
    b, s2 = m.forward(ids[SPLIT:], s2, full_output=True)
    split = torch.cat([a, b])
    return m, full.float(), torch.stack(steps).float(), split.float(), st


def save_case(name, wfile_writer, ids_t, m, full, step, split, st, recipe, extra=None):
    d = os.path.join(DATA, name)
    os.makedirs(d, exist_ok=True)
    nl = m.args.n_layer
    att = torch.stack([st[3 * l].float() for l in range(nl)])
    wkv = torch.stack([st[3 * l + 1].float() for l in range(nl)])
    ffn = torch.stack([st[3 * l + 2].float() for l in range(nl)])
    stats = {
        "max_abs_logits": full.abs().max().item(),
        "max_full_minus_stepwise": (full - step).abs().max().item(),
        "max_full_minus_split": (full - split).abs().max().item(),
        "version": m.version,
        "fingerprint": full[0, :5].tolist(),
    }
    meta = {"reference": json.dumps({"recipe": recipe, "T": T, "split": SPLIT, "stats": stats})}
    save_file(
        {
            "input_ids": ids_t,
            "logits": full.contiguous(),
            "logits_stepwise": step.contiguous(),
            "logits_split": split.contiguous(),
            "att_shift": att.contiguous(),
            "wkv_state": wkv.contiguous(),
            "ffn_shift": ffn.contiguous(),
            **(extra or {}),
        },
        os.path.join(d, "ref.safetensors"),
        metadata=meta,
    )
    print(name, json.dumps(stats))


def hf_name(k, version):
    if k == "emb.weight":
        return "rwkv.embeddings.weight"
    if k.startswith("ln_out."):
        return "rwkv." + k
    if k == "head.weight":
        return k
    parts = k.split(".")
    l, rest = parts[1], ".".join(parts[2:])
    if rest.startswith("ln0."):
        return f"rwkv.blocks.{l}.pre_ln." + rest[4:]
    if rest.startswith("att."):
        rest = "attention." + rest[4:]
        if version == 5:
            for a, b in (("k", "key"), ("v", "value"), ("r", "receptance"), ("g", "gate")):
                rest = rest.replace(f"time_mix_{a}", f"time_mix_{b}") if rest.endswith(f"time_mix_{a}") else rest
    elif rest.startswith("ffn."):
        rest = "feed_forward." + rest[4:]
        if version == 5:
            for a, b in (("k", "key"), ("r", "receptance")):
                rest = rest.replace(f"time_mix_{a}", f"time_mix_{b}") if rest.endswith(f"time_mix_{a}") else rest
    return f"rwkv.blocks.{l}.{rest}"


def naive_fold(w):
    """LN0 folded into emb as a plain f32 LayerNorm would (sequential sums, two passes,
    `((x - mean)·rstd)·γ + β` rounded separately), then rounded to bf16: what stuffed did before it
    followed torch's kernel. Used only to pick seeds whose package fold differs from it."""
    f32 = np.float32
    e = w["emb.weight"].float().numpy()
    g = w["blocks.0.ln0.weight"].float().numpy()
    b = w["blocks.0.ln0.bias"].float().numpy()
    n = f32(e.shape[1])
    mean = (np.cumsum(e, axis=1, dtype=f32)[:, -1] / n).astype(f32)[:, None]
    d = (e - mean).astype(f32)
    var = (np.cumsum((d * d).astype(f32), axis=1, dtype=f32)[:, -1] / n).astype(f32)
    rstd = (f32(1) / np.sqrt((var + f32(1e-5)).astype(f32))).astype(f32)[:, None]
    y = ((((d * rstd).astype(f32)) * g).astype(f32) + b).astype(f32)
    return torch.from_numpy(y).bfloat16()


def package_fold(w):
    """The package's fold of a bf16 file (RWKV.__init__: F.layer_norm on the bf16 tensors)."""
    C = w["emb.weight"].shape[1]
    return F_.layer_norm(w["emb.weight"], (C,), weight=w["blocks.0.ln0.weight"], bias=w["blocks.0.ln0.bias"])


def boundary_seed(dims, first, ids):
    """The first seed from `first` on whose bf16 weights the package's LN0 fold and a naive f32
    fold round some element (|x| ≥ 0.5) of a row that `ids` uses to different bf16 values."""
    for seed in range(first, first + 2000):
        w = {k: v.to(torch.bfloat16) for k, v in build(6, dims, seed=seed, noise_seed=seed + 1).items()}
        pf = package_fold(w)
        # Only elements large enough (|x| ≥ 0.5: a bf16 step ≥ 2^-9) to move the logits past the bound.
        diff = ((pf != naive_fold(w)) & (pf.float().abs() >= 0.5)).any(dim=1)
        rows = sorted(set(r for r in ids if diff[r]))
        if rows:
            return seed, rows
    raise SystemExit(f"no boundary case in 2000 seeds from {first}")


def bf16_odd_cases(want):
    """Small bf16 RWKV-6 files with odd LoRA ranks, each with a seed whose LN0 fold has a
    rounding boundary case (see boundary_seed) in a row the ids use; the reference also holds the
    package's folded embedding (`emb_ln0`), which the tests compare bit for bit."""
    for dm, dd, first in ODD_RANKS:
        dims = (SMALL_V, SMALL_C, 2, 16, SMALL_F, dm, dd)
        case = f"rwkv6_bf16_m{dm}_d{dd}"
        if not want(case):
            continue
        ids_t = torch.randint(0, SMALL_V, (1, T), generator=torch.manual_seed(7))
        ids = ids_t[0].tolist()
        seed, rows = boundary_seed(dims, first, ids)
        d = os.path.join(DATA, case)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "model.pth")
        w = build(6, dims, seed=seed, noise_seed=seed + 1)
        torch.save({k: v.to(torch.bfloat16) for k, v in w.items()}, path)
        m, full, step, split, st = run(path, ids)
        assert m.version == 6.0, m.version
        recipe = (f"RWKV-6 V {dims[0]}, C {dims[1]}, L 2, N 16, F {dims[4]}, Dm {dm}, Dd {dd}; init seed {seed} "
                  f"(first from {first} whose LN0 fold rounds an element ≥ 0.5 differently from a naive f32 "
                  f"fold in rows {rows} of the ids), +0.1 N(0,1) seed {seed + 1}; stored bf16")
        emb = m.w["emb.weight"].float().contiguous()
        save_case(case, None, ids_t, m, full, step, split, st, recipe, {"emb_ln0": emb})


def state_file(d, w, ids, merged_full):
    """`<case>_file/state.pth` beside a state-tuned case (its own directory, so the case's stays one
    .pth): only its `blocks.N.att.time_state`, as RWKV-PEFT's state
    tuning saves it and RWKV-Runner loads it beside a model (`stuffed --state-file`). Checks RWKV-Runner's
    way of using it, the package on the model without the state started from `time_state.transpose(1, 2)`,
    gives the merged file's logits exactly, so the merged case's references serve the separate file."""
    state = {k: v for k, v in w.items() if k.endswith("att.time_state")}
    os.makedirs(d + "_file", exist_ok=True)
    torch.save(state, os.path.join(d + "_file", "state.pth"))
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.pth")
        torch.save({k: v for k, v in w.items() if k not in state}, base)
        m = RWKV(model=base, strategy="cpu fp32", verbose=False)
        assert not m.args.time_state
        s0 = []
        for l in range(len(state)):
            c = m.args.n_embd
            s0 += [torch.zeros(c), state[f"blocks.{l}.att.time_state"].transpose(1, 2).float().contiguous(), torch.zeros(c)]
        full, _ = m.forward(ids, s0, full_output=True)
        assert torch.equal(full.float(), merged_full), (full.float() - merged_full).abs().max()


def time_state_cases(want):
    """Small f32 RWKV-6 and RWKV-5.2 files carrying a tuned initial state in every layer."""
    for version in (6, 5):
        case = f"rwkv{version}_time_state"
        if not want(case):
            continue
        dims = (SMALL_V, SMALL_C, 2, 16, SMALL_F, 4, 8)
        w = build(version, dims, seed=500 + version, noise_seed=600 + version)
        g = torch.Generator().manual_seed(700 + version)
        for l in range(dims[2]):
            w[f"blocks.{l}.att.time_state"] = torch.randn(SMALL_C // 16, 16, 16, generator=g)
        ids_t = torch.randint(0, SMALL_V, (1, T), generator=torch.manual_seed(7))
        d = os.path.join(DATA, case)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "model.pth")
        torch.save(w, path)
        m, full, step, split, st = run(path, ids_t[0].tolist())
        assert m.version == (6.0 if version == 6 else 5.2) and m.args.time_state, (m.version, m.args.time_state)
        state_file(d, w, ids_t[0].tolist(), full)
        recipe = (f"RWKV-{m.version} V 32, C 32, L 2, N 16, F 64 (Dm 4, Dd 8); init seed {500 + version}, +0.1 N(0,1) "
                  f"seed {600 + version}; att.time_state N(0,1) [2, 16, 16] per layer, seed {700 + version}; f32")
        save_case(case, None, ids_t, m, full, step, split, st, recipe)


def main():
    # Case names on the command line: write only those (default: all).
    names = set(sys.argv[1:])
    want = lambda case: not names or case in names
    bf16_odd_cases(want)
    time_state_cases(want)
    ids_t = torch.randint(0, 256, (1, T), generator=torch.manual_seed(7))
    ids = ids_t[0].tolist()
    assert ids[:16] == [175, 196, 25, 246, 67, 211, 151, 103, 92, 185, 142, 23, 72, 89, 110, 42], ids[:16]
    recipe = "FORMATS §8 RWKV tiny: V 256, C 64, L 2, N 16, F 224, Dm 32, Dd 64; seed 1234 init, +0.1 N(0,1) seed 42"
    for version, name in ((6, "rwkv6_tiny"), (5, "rwkv5_tiny")):
        w = build(version)
        for dtype, case in ((torch.float32, name), (torch.bfloat16, name + "_bf16")):
            if dtype == torch.bfloat16 and version == 5 or not want(case):
                continue
            d = os.path.join(DATA, case)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, "model.pth")
            torch.save({k: v.to(dtype) for k, v in w.items()}, path)
            m, full, step, split, st = run(path, ids)
            assert m.version == (6.0 if version == 6 else 5.2), m.version
            extra = {"emb_ln0": m.w["emb.weight"].float().contiguous()} if dtype == torch.bfloat16 else None
            save_case(case, None, ids_t, m, full, step, split, st, recipe + f"; stored {dtype}", extra)
            if dtype == torch.float32 and want(case + "_hf"):
                # HF-format copy: renamed keys, LN0 kept as pre_ln (not folded), same reference.
                hd = os.path.join(DATA, case + "_hf")
                os.makedirs(hd, exist_ok=True)
                save_file({hf_name(k, version): v.contiguous() for k, v in w.items()},
                          os.path.join(hd, "model.safetensors"), metadata={"format": "pt"})
                cfg = {
                    "model_type": "rwkv6" if version == 6 else "rwkv5",
                    "architectures": ["Rwkv6ForCausalLM" if version == 6 else "Rwkv5ForCausalLM"],
                    "hidden_size": C, "attention_hidden_size": C, "head_size": N, "head_size_divisor": 8,
                    "intermediate_size": F, "num_hidden_layers": L, "layer_norm_epsilon": 1e-5,
                    "rescale_every": 6, "vocab_size": V, "tie_word_embeddings": False,
                }
                with open(os.path.join(hd, "config.json"), "w") as f:
                    json.dump(cfg, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
