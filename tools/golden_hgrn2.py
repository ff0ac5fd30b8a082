#!/usr/bin/env python3
"""Golden reference tensors for HGRN-2 from fla 0.6.0's HGRN2ForCausalLM on CPU (FORMATS.md §4, §8).

fla's model kernels are Triton, so before building the model this script patches (FORMATS §4):
  fla.layers.hgrn2.{fused_recurrent_gla, chunk_gla, fused_chunk_gla} -> naive_recurrent_gla
      (fla.ops.gla.naive; scale K^-0.5, state [B,H,K,V], transposed when state_v_first)
  fla.layers.hgrn2.rms_norm_linear -> torch RMSNorm (eps 1e-5) + linear
  fla.layers.hgrn2.swish -> F.silu;  fla.modules.mlp.swiglu -> silu(gate)*up
and builds with fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False.

Writes tests/data/hgrn2_tiny/ (and tests/data/hgrn2_tiny_bf16/: the same model stored in bf16, its
references from fla on those bf16 values upcast to f32; `--bf16-only` writes only that one):
config.json + model.safetensors (save_pretrained) + ref.safetensors:
  input_ids i64 [1, T]; logits / logits_stepwise / logits_split f32 [T, V];
  state f32 [L, H, K, V] (the final recurrent state, [head][key][value]).
T = 97 > 64, so the full-sequence call takes the model's chunk branch (here the same naive op),
the split is 40 + 57.

    /root/pyref_fla/bin/python tools/golden_hgrn2.py
(a venv with fla-core/flash-linear-attention 0.6.0 installed --no-deps and a .pth pointing at
/root/pyref's site-packages: torch 2.15, transformers 5.23).

Tiny config (FORMATS §8): V 256, C 64, L 2, expand_ratio 16 (H 4), I 256, use_lower_bound,
norm_eps 1e-6.  Recipe: torch.manual_seed(1234); build; every parameter += 0.1*N(0,1) from one
generator seeded 42 in named_parameters() order; ids = randint(0, 256, (1, T), manual_seed(7)).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import fla.layers.hgrn2 as hl
import fla.modules.mlp as mlp
from fla.ops.gla.naive import naive_recurrent_gla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "hgrn2_tiny")
V, C, L, E, I = 256, 64, 2, 16, 256
T, SPLIT = 97, 40
torch.set_num_threads(1)


def gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, state_v_first=False, **kw):
    gk = gk if gk is not None else g
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    o, h = naive_recurrent_gla(q, k, v, gk, initial_state=initial_state, output_final_state=True)
    if state_v_first:
        h = h.transpose(-1, -2).contiguous()
    return o, (h if output_final_state else None)


def rms_norm_linear(x, w, b, lw, lb, eps=1e-5, **kw):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * w).to(x.dtype)
    if b is not None:
        y = y + b
    return F.linear(y, lw, lb)


hl.fused_recurrent_gla = gla
hl.chunk_gla = gla
hl.fused_chunk_gla = gla
hl.rms_norm_linear = rms_norm_linear
hl.swish = F.silu
mlp.swiglu = lambda gate, y: F.silu(gate) * y

from fla.models import HGRN2Config, HGRN2ForCausalLM  # noqa: E402


def state_of(pkv, l):
    st = pkv[l]["recurrent_state"]  # [B, H, V, K] (state_v_first)
    return st[0].transpose(-1, -2).float()  # [H, K, V]


def references(m, ids):
    """The reference tensors of model `m` on `ids` (f32 on CPU), and their stats."""
    with torch.no_grad():
        o = m(ids, use_cache=True)
        full = o.logits[0].float()
        state = torch.stack([state_of(o.past_key_values, l) for l in range(L)])
        steps = []
        s = m(ids[:, :1], use_cache=True)
        steps.append(s.logits[0, -1])
        for t in range(1, T):
            s = m(ids[:, t:t + 1], past_key_values=s.past_key_values, use_cache=True)
            steps.append(s.logits[0, -1])
        step = torch.stack(steps).float()
        step_state = torch.stack([state_of(s.past_key_values, l) for l in range(L)])
        a = m(ids[:, :SPLIT], use_cache=True)
        b = m(ids[:, SPLIT:], past_key_values=a.past_key_values, use_cache=True)
        split = torch.cat([a.logits[0], b.logits[0]]).float()
    stats = {
        "max_abs_logits": full.abs().max().item(),
        "max_full_minus_stepwise": (full - step).abs().max().item(),
        "max_full_minus_split": (full - split).abs().max().item(),
        "max_state_full_minus_stepwise": (state - step_state).abs().max().item(),
        "fingerprint": full[0, :5].tolist(),
    }
    ref = {"input_ids": ids, "logits": full.contiguous(), "logits_stepwise": step.contiguous(),
           "logits_split": split.contiguous(), "state": state.contiguous()}
    return ref, stats


def write(m, out, recipe, ids, ref_model=None):
    """Saves `m` to `out` with the references of `ref_model` (default `m`) on `ids`."""
    ref, stats = references(ref_model if ref_model is not None else m, ids)
    print(os.path.basename(out), json.dumps(stats))
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out)
    gen = os.path.join(out, "generation_config.json")  # not read by stuffed
    if os.path.exists(gen):
        os.remove(gen)
    from safetensors.torch import save_file
    save_file(ref, os.path.join(out, "ref.safetensors"),
              metadata={"reference": json.dumps({"recipe": recipe, "T": T, "split": SPLIT, "stats": stats})})
    print(sorted(os.listdir(out)))


def main():
    torch.manual_seed(1234)
    cfg = HGRN2Config(hidden_size=C, num_hidden_layers=L, expand_ratio=E, intermediate_size=I, vocab_size=V,
                      use_lower_bound=True, norm_eps=1e-6, fuse_norm=False, fuse_swiglu=False,
                      fuse_cross_entropy=False, tie_word_embeddings=False)
    m = HGRN2ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 256, (1, T), generator=torch.manual_seed(7))
    recipe = "FORMATS §8 HGRN-2 tiny: V 256, C 64, L 2, e 16, I 256, lower bound, norm_eps 1e-6; seed 1234, +0.1 N(0,1) seed 42"
    if "--bf16-only" not in sys.argv:
        write(m, OUT, recipe, ids)
    # The same model stored in bf16 (what the bf16 matrix kernels, AMX among them, multiply); its
    # references from those bf16 values upcast to f32.
    up = HGRN2ForCausalLM(cfg).eval()
    up.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
    mb = HGRN2ForCausalLM(cfg).eval()
    mb.load_state_dict(up.state_dict())
    write(mb.to(torch.bfloat16), OUT + "_bf16", recipe + "; weights bf16", ids, ref_model=up)


if __name__ == "__main__":
    sys.exit(main())
