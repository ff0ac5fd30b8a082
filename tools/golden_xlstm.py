#!/usr/bin/env python3
"""Golden reference tensors for xLSTM from HF transformers' xLSTMForCausalLM on CPU (FAMILIES.md §7).

Without the `xlstm` package, transformers runs its native torch kernels: full calls through
`wrap_chunkwise_arbitrary_sequence_length` (the chunkwise kernel over whole chunks of 16 tokens,
then the recurrent sequence kernel over the rest), token steps through `mlstm_recurrent_step_native`.
Config `autocast_kernel_dtype` float32 (the default, bfloat16, would round q, k, v in the chunkwise
kernel), `inference_state_dtype` float32. A direct float64 recurrence written from the equations
(`direct`) recomputes the model from the saved weights and must agree with HF's logits.

Writes tests/data/xlstm_tiny/: config.json + model.safetensors (save_pretrained; weights stored bf16,
the references from those values upcast to f32) + ref.safetensors:
  input_ids i64 [1, T]; logits / logits_stepwise / logits_split f32 [T, V] (soft-capped, as HF
  returns them); state f32 [L, S_l]: per layer C [H, dk, dv], then n [H, dk], then m [H] (stuffed's
  layout; HF's cache (C, n, m) per layer, from the one-call run).
T = 61: the one-call run takes three chunks of 16 and a recurrent tail of 13; the split is 40 + 21.

    /tmp/tv/bin/python tools/golden_xlstm.py
(a venv with torch 2.15 CPU, transformers 5.25, numpy; no `xlstm` package.)

Tiny config: V 64, C 64, 2 blocks, 2 heads, qk_dim_factor 1 (dk 32), v_dim_factor 2 (dv 64: dk ≠ dv,
so a transposed C fails), ffn_proj_factor 0.5 rounded to 16 (I 32), untied, norm_eps 1e-6, eps 1e-6,
soft caps 15 / 30. (HF's xLSTMCache sizes its states by the config's qk_head_dim, which rounds
C·qk_dim_factor up to a multiple of 64 while the layer uses it unrounded: the widths here are
multiples of 64 so the two agree.) Recipe: torch.manual_seed(1234); build (HF init); then, from one
generator seeded 42 in named_parameters() order, every parameter += 0.1·N(0,1), the gate weights
×2 + N(0,1) (their pre-activations reach 19–25, past the soft cap of 15), the gate biases 2·N(0,1)
(so the stabiliser m moves both ways), and lm_head ×4 (logits to ±12.7, which the cap of 30 bends by
~5 %); ids = randint(0, 64, (1, T), manual_seed(7)).
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import xLSTMConfig, xLSTMForCausalLM
from transformers.models.xlstm.modeling_xlstm import xLSTMCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, C, L, H = 64, 64, 2, 2
T, SPLIT = 61, 40
torch.set_num_threads(1)


def build():
    torch.manual_seed(1234)
    cfg = xLSTMConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_heads=H, qk_dim_factor=1.0,
                      v_dim_factor=2.0, ffn_proj_factor=0.5, ffn_round_up_to_multiple_of=16, chunk_size=16,
                      autocast_kernel_dtype="float32", inference_state_dtype="float32", norm_eps=1e-6, eps=1e-6,
                      tie_word_embeddings=False, weight_mode="single", use_bias=False)
    m = xLSTMForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if "gate_preact.weight" in name:
                p.mul_(2.0).add_(torch.randn(p.shape, generator=g))
            if "gate_preact.bias" in name:
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            if name == "lm_head.weight":
                p.mul_(4.0)
    return cfg, m


def direct(sd, ids):
    """The model from its weights in float64, token by token, from the equations."""
    w = {k: v.double() for k, v in sd.items()}
    dk, dv = C // H, 2 * C // H

    def rms(x, wt, eps=1e-6):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * wt

    def cap(x, c):
        return c * torch.tanh(x / c)

    x = w["backbone.embeddings.weight"][ids[0]]
    for l in range(L):
        p = f"backbone.blocks.{l}."
        h = rms(x, w[p + "norm_mlstm.weight"])
        q, k, v, o = (h @ w[p + f"mlstm_layer.{n}.weight"].T for n in ("q", "k", "v", "ogate_preact"))
        i = cap(h @ w[p + "mlstm_layer.igate_preact.weight"].T + w[p + "mlstm_layer.igate_preact.bias"], 15.0)
        f = cap(h @ w[p + "mlstm_layer.fgate_preact.weight"].T + w[p + "mlstm_layer.fgate_preact.bias"], 15.0)
        out = torch.zeros(T, H, dv, dtype=torch.float64)
        for hd in range(H):
            Cm = torch.zeros(dk, dv, dtype=torch.float64)
            n = torch.zeros(dk, dtype=torch.float64)
            mm = 0.0
            for t in range(T):
                fl = torch.nn.functional.logsigmoid(f[t, hd]).item()
                it = i[t, hd].item()
                mn = max(fl + mm, it)
                Fa, Ia = math.exp(fl + mm - mn), math.exp(it - mn)
                mm = mn
                kt, vt = k[t, hd * dk:(hd + 1) * dk], v[t, hd * dv:(hd + 1) * dv]
                Cm = Fa * Cm + Ia * torch.outer(kt, vt)
                n = Fa * n + Ia * kt
                qs = q[t, hd * dk:(hd + 1) * dk] / math.sqrt(dk)
                den = max(abs((qs @ n).item()), math.exp(-mn)) + 1e-6
                out[t, hd] = (qs @ Cm) / den
        out = (out - out.mean(-1, keepdim=True)) / torch.sqrt(out.var(-1, unbiased=False, keepdim=True) + 1e-6)
        out = out.reshape(T, H * dv) * w[p + "mlstm_layer.multihead_norm.weight"]
        x = x + (torch.sigmoid(o) * out) @ w[p + "mlstm_layer.out_proj.weight"].T
        h2 = rms(x, w[p + "norm_ffn.weight"])
        up = torch.nn.functional.silu(h2 @ w[p + "ffn.proj_up_gate.weight"].T) * (h2 @ w[p + "ffn.proj_up.weight"].T)
        x = x + up @ w[p + "ffn.proj_down.weight"].T
    x = rms(x, w["backbone.out_norm.weight"])
    return cap(x @ w["lm_head.weight"].T, 30.0)


def state_of(cache):
    """Per layer C [H, dk, dv], n [H, dk], m [H], flattened and concatenated (stuffed's layout)."""
    rows = []
    for l in range(L):
        c, n, m = cache.rnn_state[l]
        rows.append(torch.cat([c[0].reshape(-1), n[0].reshape(-1), m[0].reshape(-1)]).float())
    return torch.stack(rows)


def main():
    cfg, m = build()
    # Stored bf16; the references from those values upcast to f32.
    m.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
    ids = torch.randint(0, V, (1, T), generator=torch.manual_seed(7))
    new_cache = lambda: xLSTMCache(cfg, 1, dtype=torch.float32)
    with torch.no_grad():
        cache = new_cache()
        full = m(ids, cache=cache, use_cache=True).logits[0].float()
        state = state_of(cache)
        cache, steps = new_cache(), []
        for t in range(T):
            steps.append(m(ids[:, t:t + 1], cache=cache, use_cache=True).logits[0, -1])
        step = torch.stack(steps).float()
        step_state = state_of(cache)
        cache = new_cache()
        a = m(ids[:, :SPLIT], cache=cache, use_cache=True).logits[0]
        b = m(ids[:, SPLIT:], cache=cache, use_cache=True).logits[0]
        split = torch.cat([a, b]).float()
        want = direct(m.state_dict(), ids)
    stats = {
        "max_abs_logits": full.abs().max().item(),
        "max_full_minus_stepwise": (full - step).abs().max().item(),
        "max_full_minus_split": (full - split).abs().max().item(),
        "max_state_full_minus_stepwise": (state - step_state).abs().max().item(),
        "max_direct_f64_minus_hf": (want - full.double()).abs().max().item(),
        "m_range": [state[:, -H:].min().item(), state[:, -H:].max().item()],
        "fingerprint": full[0, :5].tolist(),
    }
    print(json.dumps(stats))
    assert stats["max_direct_f64_minus_hf"] < 1e-4 * stats["max_abs_logits"], stats
    recipe = ("xLSTM tiny: V 64, C 64, L 2, H 2, dk 32, dv 64, I 32, caps 15/30; seed 1234 HF init, +0.1 N(0,1) "
              "seed 42, gate weights x2 + N(0,1), gate biases 2 N(0,1), lm_head x4; weights bf16")
    out = os.path.join(ROOT, "tests", "data", "xlstm_tiny")
    os.makedirs(out, exist_ok=True)
    m.to(torch.bfloat16).save_pretrained(out)
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)  # not read by stuffed
    ref = {"input_ids": ids, "logits": full.contiguous(), "logits_stepwise": step.contiguous(),
           "logits_split": split.contiguous(), "state": state.contiguous()}
    save_file(ref, os.path.join(out, "ref.safetensors"),
              metadata={"reference": json.dumps({"recipe": recipe, "T": T, "split": SPLIT, "stats": stats})})
    print(sorted(os.listdir(out)))


if __name__ == "__main__":
    sys.exit(main())
