#!/usr/bin/env python3
"""Golden reference tensors for RWKV-7 (x070) from the `rwkv` 0.8.32 pip package (CPU, f32).

Writes, under tests/data/ (FAMILIES.md §1, FORMATS.md §8):

  rwkv7_tiny/       tiny x070 model, f32 .pth (BlinkDL key names, final "rc4a" layout, torch.save
                    zip), with layer 0's unused att.v0/v1/v2 PRESENT (random values the math ignores)
  rwkv7_tiny_bf16/  the same weights stored bf16, layer 0's v0/v1/v2 ABSENT; reference = the package
                    on that .pth (x070 casts to fp32 first and folds LN0 after, so nothing rounds to bf16)
  rwkv7_time_state/ a small state-tuned x070 file (`time_state_case`); rwkv7_time_state_file/state.pth: its
                    time_state alone, as RWKV-Runner loads a state beside a model (`stuffed --state-file`)
  rwkv7_tiny_fla/   rwkv7_tiny_bf16 in the fla / HF layout (`fla-hub/rwkv7-*`, FAMILIES.md §1.3):
                    model.safetensors (bf16) + config.json, LoRAs transposed (Linear layout), LN0 as
                    pre_norm (no ref: the tests use rwkv7_tiny_bf16's)

each .pth case holding model.pth and ref.safetensors:
  input_ids        i64 [1, T]
  logits           [T, V] model.forward(ids, None, full_output=True)  (package "seq" mode)
  logits_stepwise  [T, V] model.forward([tok], state) token after token  ("one" mode)
  logits_split     [T, V] forward(ids[:40], full_output) then forward(ids[40:], state, full_output)
  att_shift        [L, C]        final token-shift of the time mix (the last ln1 output)
  wkv_state        [L, H, N, N]  final S, [head][value][key] (the package's x070 layout)
  ffn_shift        [L, C]        final token-shift of the channel mix (the last ln2 output)
metadata "reference": JSON with the recipe and spreads.

Every case is cross-checked against a direct recurrence written here from the equations of
FAMILIES.md §1.4 (`direct`, float64): the script fails unless the package's logits and final state
agree with it within rel 1e-5.

Run from the repository root with the rwkv wheel (0.8.32, ../shared/wheels) installed beside
torch 2.15.0 (here: /work/venv-b, which has torch 2.15.0 + rwkv 0.8.32 + numpy + safetensors):

    /work/venv-b/bin/python tools/golden_rwkv7.py

Tiny shapes (the odd ranks issue #24 asks for): V 256, C 128, L 2, N 64 (H 2), F 200 (not 4C: read
from the shapes), LoRA ranks decay 24 / a 20 / v 12 / gate 36.  Recipe: torch.manual_seed(1234) init
(Linear N(0, 1/in), LN weight 1 / bias 0, mix coefficients U(0,1), w0 U(-2,1), a0/v0 N(0,1), k_k
0.85+0.1·N, k_a 1+0.1·N, r_k 0.5·N, LoRA N(0, 0.1)), then every tensor += 0.1·N(0,1) from one
generator seeded 42 in key order; ids = randint(0, 256, (1, 61), generator=manual_seed(7)).
"""
import json
import os
import sys

os.environ["RWKV_V7_ON"] = "1"
os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ.setdefault("RWKV_JIT_ON", "0")

import torch
from safetensors.torch import save_file

from rwkv.model import RWKV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
V, C, L, N, F = 256, 128, 2, 64, 200
DW, DA, DV, DG = 24, 20, 12, 36
H = C // N
T, SPLIT = 61, 40
LAYER0_V = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
torch.set_num_threads(1)


def build(seed=1234, noise_seed=42):
    torch.manual_seed(seed)
    w = {}

    def lin(o, i):
        return torch.randn(o, i) / i**0.5

    def vec(x):
        return x.reshape(1, 1, C)

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
        for j in "rwkvag":
            w[a + f"x_{j}"] = vec(torch.rand(C))
        w[a + "w0"] = vec(torch.rand(C) * 3 - 2)
        w[a + "w1"] = torch.randn(C, DW) * 0.1
        w[a + "w2"] = torch.randn(DW, C) * 0.1
        w[a + "a0"] = vec(torch.randn(C))
        w[a + "a1"] = torch.randn(C, DA) * 0.1
        w[a + "a2"] = torch.randn(DA, C) * 0.1
        # Layer 0's value-residual LoRA is unused; the f32 file keeps it, the bf16 file drops it.
        w[a + "v0"] = vec(torch.randn(C))
        w[a + "v1"] = torch.randn(C, DV) * 0.1
        w[a + "v2"] = torch.randn(DV, C) * 0.1
        w[a + "g1"] = torch.randn(C, DG) * 0.1
        w[a + "g2"] = torch.randn(DG, C) * 0.1
        w[a + "k_k"] = vec(0.85 + 0.1 * torch.randn(C))
        w[a + "k_a"] = vec(1 + 0.1 * torch.randn(C))
        w[a + "r_k"] = torch.randn(H, N) * 0.5
        for n in ("receptance", "key", "value", "output"):
            w[a + n + ".weight"] = lin(C, C)
        w[a + "ln_x.weight"] = torch.ones(C)
        w[a + "ln_x.bias"] = torch.zeros(C)
        f = b + "ffn."
        w[f + "x_k"] = vec(torch.rand(C))
        w[f + "key.weight"] = lin(F, C)
        w[f + "value.weight"] = lin(C, F)
    w["ln_out.weight"] = torch.ones(C)
    w["ln_out.bias"] = torch.zeros(C)
    w["head.weight"] = lin(V, C)
    g = torch.Generator().manual_seed(noise_seed)
    for k in w:
        w[k] = (w[k] + 0.1 * torch.randn(w[k].shape, generator=g)).contiguous()
    return w


def direct(w, ids, S0=None):
    """FAMILIES.md §1.4 written out in float64, one token at a time: logits [T, V] and the final
    state as (att_shift [L, C], S [L, H, N(value), N(key)], ffn_shift [L, C]); S starts at S0
    (default zeros)."""
    z = {k: v.double().reshape(-1) if v.dim() == 3 else v.double() for k, v in w.items()}
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (C,), z[p + ".weight"], z[p + ".bias"], 1e-5)
    att = torch.zeros(L, C, dtype=torch.float64)
    ffn = torch.zeros(L, C, dtype=torch.float64)
    S = torch.zeros(L, H, N, N, dtype=torch.float64) if S0 is None else S0.double().clone()
    out = []
    for tok in ids:
        x = ln(z["emb.weight"][tok], "blocks.0.ln0")
        v_first = None
        for l in range(L):
            a_ = f"blocks.{l}.att."
            xx = ln(x, f"blocks.{l}.ln1")
            d = att[l] - xx
            att[l] = xx
            m = {j: xx + d * z[a_ + "x_" + j] for j in "rwkvag"}
            r = z[a_ + "receptance.weight"] @ m["r"]
            k = z[a_ + "key.weight"] @ m["k"]
            v = z[a_ + "value.weight"] @ m["v"]
            wd = torch.exp(-torch.exp(torch.tensor(-0.5, dtype=torch.float64))
                           * torch.sigmoid(z[a_ + "w0"] + torch.tanh(m["w"] @ z[a_ + "w1"]) @ z[a_ + "w2"]))
            a = torch.sigmoid(z[a_ + "a0"] + (m["a"] @ z[a_ + "a1"]) @ z[a_ + "a2"])
            g = torch.sigmoid(m["g"] @ z[a_ + "g1"]) @ z[a_ + "g2"]
            kk = (k * z[a_ + "k_k"]).view(H, N)
            kk = (kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(C)
            k = k * (1 + (a - 1) * z[a_ + "k_a"])
            if l == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(z[a_ + "v0"] + (m["v"] @ z[a_ + "v1"]) @ z[a_ + "v2"])
            y = torch.zeros(C, dtype=torch.float64)
            for h in range(H):
                sl = slice(h * N, (h + 1) * N)
                Sh = S[l, h]
                Sh = Sh * wd[sl][None, :] - torch.outer(Sh @ kk[sl], kk[sl] * a[sl]) + torch.outer(v[sl], k[sl])
                S[l, h] = Sh
                yh = Sh @ r[sl]
                yh = (yh - yh.mean()) / torch.sqrt(yh.var(unbiased=False) + 64e-5)
                yh = yh * z[a_ + "ln_x.weight"][sl] + z[a_ + "ln_x.bias"][sl]
                y[sl] = yh + (r[sl] * k[sl] * z[a_ + "r_k"][h]).sum() * v[sl]
            x = x + z[a_ + "output.weight"] @ (y * g)
            f_ = f"blocks.{l}.ffn."
            xx = ln(x, f"blocks.{l}.ln2")
            d = ffn[l] - xx
            ffn[l] = xx
            kf = torch.relu(z[f_ + "key.weight"] @ (xx + d * z[f_ + "x_k"])) ** 2
            x = x + z[f_ + "value.weight"] @ kf
        out.append(z["head.weight"] @ ln(x, "ln_out"))
    return torch.stack(out), (att, S, ffn)


def run(path, ids, S0=None):
    """The package's logits in one call, token by token and split, from the zero state or, given
    S0 [L, H, N, N], from that S (shifts zero: the state a state-tuned file starts from)."""
    m = RWKV(model=path[: -len(".pth")], strategy="cpu fp32")

    def start():
        if S0 is None:
            return None
        st = []
        for l in range(L):
            st += [torch.zeros(C), S0[l].float().clone(), torch.zeros(C)]
        return st

    full, st = m.forward(ids, start(), full_output=True)
    steps, s = [], start()
    for t in ids:
        o, s = m.forward([t], s)
        steps.append(o)
    a, s2 = m.forward(ids[:SPLIT], start(), full_output=True)
    b, s2 = m.forward(ids[SPLIT:], s2, full_output=True)
    split = torch.cat([a, b])
    return m, full.float(), torch.stack(steps).float(), split.float(), st


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def save_case(name, ids_t, m, full, step, split, st, recipe, check):
    d = os.path.join(DATA, name)
    nl = m.args.n_layer
    att = torch.stack([st[3 * l].float() for l in range(nl)])
    wkv = torch.stack([st[3 * l + 1].float() for l in range(nl)])
    ffn = torch.stack([st[3 * l + 2].float() for l in range(nl)])
    dl, (datt, dS, dffn) = check
    stats = {
        "max_abs_logits": full.abs().max().item(),
        "max_full_minus_stepwise": (full - step).abs().max().item(),
        "max_full_minus_split": (full - split).abs().max().item(),
        "rel_logits_vs_direct": rel(full, dl),
        "rel_stepwise_vs_direct": rel(step, dl),
        "rel_state_vs_direct": max(rel(att, datt), rel(wkv, dS), rel(ffn, dffn)),
        "fingerprint": full[0, :5].tolist(),
    }
    for k in ("rel_logits_vs_direct", "rel_stepwise_vs_direct", "rel_state_vs_direct"):
        assert stats[k] <= 1e-5, (name, k, stats[k])
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
        },
        os.path.join(d, "ref.safetensors"),
        metadata=meta,
    )
    print(name, json.dumps(stats))


def fla_name(k):
    """BlinkDL → fla names (FAMILIES.md §1.3); LoRAs come back as (name, transpose?)."""
    if k == "emb.weight":
        return "model.embeddings.weight"
    if k.startswith("ln_out."):
        return "model.norm." + k.split(".", 1)[1]
    if k == "head.weight":
        return "lm_head.weight"
    _, l, rest = k.split(".", 2)
    p = f"model.layers.{l}."
    table = {
        "ln0.weight": "pre_norm.weight", "ln0.bias": "pre_norm.bias",
        "ln1.weight": "attn_norm.weight", "ln1.bias": "attn_norm.bias",
        "ln2.weight": "ffn_norm.weight", "ln2.bias": "ffn_norm.bias",
        "att.w1": "attn.w_lora.lora.0.weight", "att.w2": "attn.w_lora.lora.2.weight", "att.w0": "attn.w_lora.lora.2.bias",
        "att.a1": "attn.a_lora.lora.0.weight", "att.a2": "attn.a_lora.lora.2.weight", "att.a0": "attn.a_lora.lora.2.bias",
        "att.v1": "attn.v_lora.lora.0.weight", "att.v2": "attn.v_lora.lora.2.weight", "att.v0": "attn.v_lora.lora.2.bias",
        "att.g1": "attn.g_lora.lora.0.weight", "att.g2": "attn.g_lora.lora.2.weight",
        "att.receptance.weight": "attn.r_proj.weight", "att.key.weight": "attn.k_proj.weight",
        "att.value.weight": "attn.v_proj.weight", "att.output.weight": "attn.o_proj.weight",
        "att.ln_x.weight": "attn.g_norm.weight", "att.ln_x.bias": "attn.g_norm.bias",
        "ffn.key.weight": "ffn.key.weight", "ffn.value.weight": "ffn.value.weight",
    }
    if rest in table:
        return p + table[rest]
    return p + rest.replace("att.", "attn.")


def to_fla(w):
    out = {}
    for k, v in w.items():
        if k in LAYER0_V:  # layer 0 has no value LoRA in fla
            continue
        n = fla_name(k)
        if k.split(".")[-1] in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            v = v.t()
        elif k.split(".")[-1] in ("w0", "a0", "v0", "k_k", "k_a") or k.endswith("ffn.x_k"):
            v = v.reshape(C)
        out[n] = v.contiguous()
    return out


def time_state_case():
    """rwkv7_time_state/: a small x070 file (V 32, C 64, L 2, N 32 (H 2), F 64, ranks 8/8/4/8; weights bf16)
    with every layer's `att.time_state` [H, N, N] (RWKV-PEFT's state tuning merged in). The package
    loads no x070 time_state, so its references start it explicitly from S = time_state as stored
    ([head][value][key], the package's own x070 state layout: RWKV-Runner's convention)."""
    global V, C, L, N, F, DW, DA, DV, DG, H
    saved = (V, C, L, N, F, DW, DA, DV, DG, H)
    V, C, L, N, F, DW, DA, DV, DG = 32, 64, 2, 32, 64, 8, 8, 4, 8
    H = C // N
    try:
        w = build(seed=800, noise_seed=801)
        g = torch.Generator().manual_seed(802)
        S0 = torch.randn(L, H, N, N, generator=g)
        w = {k: v.to(torch.bfloat16).float() for k, v in w.items()}  # stored bf16 (the state f32)
        for l in range(L):
            w[f"blocks.{l}.att.time_state"] = S0[l].clone()
        d = os.path.join(DATA, "rwkv7_time_state")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "model.pth")
        torch.save({k: v if k.endswith("time_state") else v.to(torch.bfloat16) for k, v in w.items()}, path)
        # The state alone, as RWKV-PEFT saves it and RWKV-Runner loads it beside a model (`--state-file`);
        # the references below already start from it.
        os.makedirs(d + "_file", exist_ok=True)
        torch.save({k: v for k, v in w.items() if k.endswith("time_state")}, os.path.join(d + "_file", "state.pth"))
        ids_t = torch.randint(0, V, (1, T), generator=torch.manual_seed(7))
        ids = ids_t[0].tolist()
        m, full, step, split, st = run(path, ids, S0)
        check = direct({k: v.float() for k, v in w.items() if not k.endswith("time_state")}, ids, S0)
        recipe = ("RWKV-7 V 32, C 64, L 2, N 32, F 64, ranks w 8 a 8 v 4 g 8; seed 800 init, +0.1 N(0,1) seed 801; "
                  "att.time_state N(0,1) [2, 32, 32] per layer, seed 802; weights stored bf16, the state f32; references "
                  "from S = time_state")
        save_case("rwkv7_time_state", ids_t, m, full, step, split, st, recipe, check)
    finally:
        V, C, L, N, F, DW, DA, DV, DG, H = saved


def main():
    names = set(sys.argv[1:])
    want = lambda case: not names or case in names
    if want("rwkv7_time_state"):
        time_state_case()
    ids_t = torch.randint(0, 256, (1, T), generator=torch.manual_seed(7))
    ids = ids_t[0].tolist()
    assert ids[:16] == [175, 196, 25, 246, 67, 211, 151, 103, 92, 185, 142, 23, 72, 89, 110, 42], ids[:16]
    recipe = (f"issue #24 RWKV-7 tiny: V {V}, C {C}, L {L}, N {N}, F {F}, ranks w {DW} a {DA} v {DV} g {DG}; "
              "seed 1234 init, +0.1 N(0,1) seed 42")
    w = build()
    for dtype, case, keep_v0 in ((torch.float32, "rwkv7_tiny", True), (torch.bfloat16, "rwkv7_tiny_bf16", False)):
        if not want(case):
            continue
        d = os.path.join(DATA, case)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "model.pth")
        stored = {k: v.to(dtype) for k, v in w.items() if keep_v0 or k not in LAYER0_V}
        torch.save(stored, path)
        m, full, step, split, st = run(path, ids)
        check = direct({k: v.float() for k, v in stored.items()}, ids)
        save_case(case, ids_t, m, full, step, split, st, recipe + f"; stored {dtype}; layer-0 v0/v1/v2 "
                  + ("present" if keep_v0 else "absent"), check)
    if want("rwkv7_tiny_fla"):
        d = os.path.join(DATA, "rwkv7_tiny_fla")
        os.makedirs(d, exist_ok=True)
        save_file(to_fla({k: v.to(torch.bfloat16) for k, v in w.items()}), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        cfg = {
            "model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"],
            "hidden_size": C, "num_hidden_layers": L, "head_dim": N, "num_heads": H,
            "decay_low_rank_dim": DW, "a_low_rank_dim": DA, "v_low_rank_dim": DV, "gate_low_rank_dim": DG,
            "hidden_ratio": 4, "intermediate_size": F, "hidden_act": "sqrelu",
            "norm_eps": 1e-5, "norm_bias": True, "norm_first": True, "fuse_norm": False,
            "value_dim": [C] * L, "vocab_size": V, "tie_word_embeddings": False,
        }
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
