#!/usr/bin/env python3
"""Golden reference tensors for RetNet from fla 0.6.0's RetNetForCausalLM on CPU (FAMILIES.md §6, FORMATS §8).

fla's kernels are Triton, so before building the model this script patches:
  fla.layers.multiscale_retention.{chunk,fused_chunk,fused_recurrent,parallel}_retention
      -> naive_recurrent_gla (fla.ops.gla.naive) with the per-head log decay fla's retention kernels
         use, g_gamma = log(1 - 2^(-5-h)), on every key channel (scale K^-0.5, state [B,H,K,V])
  fla.modules.rotary.RotaryEmbedding.forward -> fla's own rotary_embedding_ref over its own cos/sin
      cache (_update_cos_sin_cache), rows seqlen_offset .. seqlen_offset + T
  fla.modules RMSNorm.forward -> torch RMSNorm in f32;  ACT2FN['swish'] -> F.silu;
  fla.modules.mlp.swiglu -> silu(gate)*up
and builds with fuse_norm=False (g_norm, not g_norm_swish_gate: the same math under the other name),
fuse_swiglu=False, fuse_cross_entropy=False. It then recomputes the whole model from the saved
weights with a direct float64 recurrence written from the equations (below, `direct`: rotary
angles in float64, the decay exp(g_gamma)) and checks the logits agree
(printed as max_direct_f64_minus_fla).

Writes tests/data/retnet_tiny/ (f32 weights) and tests/data/retnet_tiny_bf16/ (the same model with
bf16 weights; its references from fla on those bf16 values upcast to f32): config.json +
model.safetensors (save_pretrained) + ref.safetensors (GLA's goldens cover the feature map and the
missing output gate in the same code; a third RetNet case would put the GPU bundle's tree past
its limit):
  input_ids i64 [1, T]; logits / logits_stepwise / logits_split f32 [T, V];
  state f32 [L, S_l]: per layer the recurrent state [H, K, V] ([head][key][value]), then the layer's
  position as stuffed counts it, (T mod 2^24, T / 2^24) = (T, 0) (fla's cache.get_seq_length).
T = 97 > 64, so the full-sequence call takes the layer's chunk branch (here the same naive op);
the split is 40 + 57, so the second call's rotary angles start at position 40.

    /tmp/tv/bin/python tools/golden_retnet.py
(a venv with torch 2.15.0 (CPU wheel), numpy, transformers 5.25.0, einops; pip install --no-deps
fla_core-0.6.0 and flash_linear_attention-0.6.0 wheels from ../shared/wheels.)

Tiny awkward config: V 256, C 60, L 2, H 3 heads over 1 kv head (K 10, V 30 per head: expand_k 0.5,
expand_v 1.5), output gate, I 136, norm_eps 1e-6, untied. fla's RetNetBlock never hands
use_short_conv to its layer, so there is no short conv.
Recipe (FORMATS §8): torch.manual_seed(1234); build; every parameter += 0.1*N(0,1) from one generator
seeded 42 in named_parameters() order; ids = randint(0, 256, (1, T), manual_seed(7)).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import fla.layers.multiscale_retention as mr
import fla.modules.mlp as mlp
from fla.modules import RMSNorm
from fla.modules.activations import ACT2FN
from fla.modules.rotary import RotaryEmbedding
from fla.modules.rotary.ops import rotary_embedding_ref
from fla.ops.gla.naive import naive_recurrent_gla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, C, L, I = 256, 60, 2, 136
T, SPLIT = 97, 40
TINY = dict(num_heads=3, num_kv_heads=1, expand_k=0.5, expand_v=1.5, use_output_gate=True, feature_map=None)
torch.set_num_threads(1)


def g_gamma(h):
    """fla's retention decay per head (chunk_retention / fused_recurrent_retention), natural log."""
    return (1 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float))).log()


def retention(q, k, v, initial_state=None, output_final_state=False, **kw):
    b, t, h, dk = q.shape
    gk = g_gamma(h).view(1, 1, h, 1).expand(b, t, h, dk).to(q.dtype)
    o, st = naive_recurrent_gla(q, k, v, gk, initial_state=initial_state, output_final_state=True)
    return o, (st if output_final_state else None)


def rotary_forward(self, q, k, seqlen_offset=0, cu_seqlens=None, max_seqlen=None, **kw):
    assert cu_seqlens is None and isinstance(seqlen_offset, int)
    self._update_cos_sin_cache(max_seqlen or q.shape[1] + seqlen_offset, device=q.device, dtype=q.dtype)
    cos = self._cos_cached[seqlen_offset:seqlen_offset + q.shape[1]]
    sin = self._sin_cached[seqlen_offset:seqlen_offset + q.shape[1]]
    return (rotary_embedding_ref(q, cos, sin, self.interleaved), rotary_embedding_ref(k, cos, sin, self.interleaved))


def rms_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


for name in ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention"):
    setattr(mr, name, retention)
mr.parallel_retention = lambda q, k, v, **kw: retention(q, k, v)
RotaryEmbedding.forward = rotary_forward
RMSNorm.forward = rms_forward
ACT2FN['swish'] = F.silu
ACT2FN['silu'] = F.silu
mlp.swiglu = lambda gate, y: F.silu(gate) * y

from fla.models import RetNetConfig, RetNetForCausalLM  # noqa: E402


def state_of(pkv, l, pos):
    """Layer l's state in stuffed's layout, flat: S [H, K, V], then the position counters."""
    st = pkv[l]["recurrent_state"][0].float()
    assert pkv.get_seq_length(l) == pos, (pkv.get_seq_length(l), pos)
    return torch.cat([st.reshape(-1), torch.tensor([float(pos % 2 ** 24), float(pos // 2 ** 24)])])


def direct(sd, ids, cf):
    """The whole model from its weights, float64, from the equations (FAMILIES.md §6)."""
    p = {k: v.double() for k, v in sd.items()}
    H = cf["num_heads"]
    K, VV = round(C * cf["expand_k"]) // H, round(C * cf["expand_v"]) // H
    g = H // cf["num_kv_heads"]
    fm = {None: lambda x: x, "relu": lambda x: x.clamp_min(0)}[cf["feature_map"]]
    n = len(ids[0])
    theta = 10000.0 ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * theta[None, :]  # [T, K/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x, heads):  # x [T, heads*K]
        x = x.view(n, heads, K)
        x0, x1 = x[..., :K // 2], x[..., K // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], -1).reshape(n, heads * K)

    def rms(x, w, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    gamma = (1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))
    x = p["model.embeddings.weight"][ids[0]]
    for l in range(L):
        a = f"model.layers.{l}."
        h = rms(x, p[a + "attn_norm.weight"])
        q = rope(fm(h @ p[a + "attn.q_proj.weight"].T), H)
        k = rope(fm(h @ p[a + "attn.k_proj.weight"].T), H // g)
        v = h @ p[a + "attn.v_proj.weight"].T
        o = torch.zeros(n, H * VV, dtype=torch.float64)
        for hh in range(H):
            kv = hh // g
            S = torch.zeros(K, VV, dtype=torch.float64)
            for t in range(n):
                S = gamma[hh] * S + k[t, kv * K:(kv + 1) * K][:, None] * v[t, kv * VV:(kv + 1) * VV][None, :]
                o[t, hh * VV:(hh + 1) * VV] = (q[t, hh * K:(hh + 1) * K] * K ** -0.5) @ S
        o = rms(o.view(-1, H, VV), p[a + "attn.g_norm.weight"]).reshape(-1, H * VV)
        if cf["use_output_gate"]:
            o = o * F.silu(h @ p[a + "attn.g_proj.weight"].T)
        x = x + o @ p[a + "attn.o_proj.weight"].T
        h = rms(x, p[a + "mlp_norm.weight"])
        m = F.silu(h @ p[a + "mlp.gate_proj.weight"].T) * (h @ p[a + "mlp.up_proj.weight"].T)
        x = x + m @ p[a + "mlp.down_proj.weight"].T
    return rms(x, p["model.norm.weight"]) @ p["lm_head.weight"].T


def references(m, ids, cf):
    with torch.no_grad():
        o = m(ids, use_cache=True)
        full = o.logits[0].float()
        state = torch.stack([state_of(o.past_key_values, l, T) for l in range(L)])
        steps = []
        s = m(ids[:, :1], use_cache=True)
        steps.append(s.logits[0, -1])
        for t in range(1, T):
            s = m(ids[:, t:t + 1], past_key_values=s.past_key_values, use_cache=True)
            steps.append(s.logits[0, -1])
        step = torch.stack(steps).float()
        step_state = torch.stack([state_of(s.past_key_values, l, T) for l in range(L)])
        a = m(ids[:, :SPLIT], use_cache=True)
        b = m(ids[:, SPLIT:], past_key_values=a.past_key_values, use_cache=True)
        split = torch.cat([a.logits[0], b.logits[0]]).float()
        want = direct(m.state_dict(), ids, cf)
    stats = {
        "max_abs_logits": full.abs().max().item(),
        "max_full_minus_stepwise": (full - step).abs().max().item(),
        "max_full_minus_split": (full - split).abs().max().item(),
        "max_state_full_minus_stepwise": (state - step_state).abs().max().item(),
        "max_direct_f64_minus_fla": (want - full.double()).abs().max().item(),
        "fingerprint": full[0, :5].tolist(),
    }
    assert stats["max_direct_f64_minus_fla"] < 1e-4 * stats["max_abs_logits"], stats
    assert stats["max_full_minus_split"] < 1e-4 * stats["max_abs_logits"], stats
    return {"input_ids": ids, "logits": full.contiguous(), "logits_stepwise": step.contiguous(),
            "logits_split": split.contiguous(), "state": state.contiguous()}, stats


def save(m, name, recipe, ref, stats):
    from safetensors.torch import save_file
    out = os.path.join(ROOT, "tests", "data", name)
    print(name, json.dumps(stats))
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out)
    os.remove(os.path.join(out, "generation_config.json"))  # not read by stuffed
    save_file(ref, os.path.join(out, "ref.safetensors"),
              metadata={"reference": json.dumps({"recipe": recipe, "T": T, "split": SPLIT, "stats": stats})})
    print(sorted(os.listdir(out)))


def build(cf):
    torch.manual_seed(1234)
    cfg = RetNetConfig(hidden_size=C, num_hidden_layers=L, **cf,
                       intermediate_size=I, vocab_size=V, norm_eps=1e-6, fuse_norm=False, fuse_swiglu=False,
                       fuse_cross_entropy=False, tie_word_embeddings=False)
    m = RetNetForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return cfg, m


def main():
    cfg, m = build(TINY)
    ids = torch.randint(0, 256, (1, T), generator=torch.manual_seed(7))
    recipe = ("RetNet tiny: V 256, C 60, L 2, H 3 / kv 1, expand_k 0.5, expand_v 1.5, output gate, "
              "I 136, norm_eps 1e-6; seed 1234, +0.1 N(0,1) seed 42")
    save(m, "retnet_tiny", recipe, *references(m, ids, TINY))
    # The same model stored in bf16; its references from those bf16 values upcast to f32.
    mb = RetNetForCausalLM(cfg).eval()
    mb.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
    ref, stats = references(mb, ids, TINY)
    mb.to(torch.bfloat16)
    save(mb, "retnet_tiny_bf16", recipe + "; weights bf16", ref, stats)


if __name__ == "__main__":
    sys.exit(main())
