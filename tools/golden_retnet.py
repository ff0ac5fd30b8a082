#!/usr/bin/env python3
"""Golden reference tensors for RetNet from fla 0.6.0's RetNetForCausalLM on CPU (FAMILIES.md §6, FORMATS §8).

It reuses tools/golden_gla.py (imported: its patches of fla's GLA layer, RMSNorm, ACT2FN and
swiglu, its recipe constants, `build`, `references` and `save`). fla's kernels are Triton, so
before building the model this script also patches:
  fla.layers.multiscale_retention.{chunk,fused_chunk,fused_recurrent,parallel}_retention
      -> naive_recurrent_gla (fla.ops.gla.naive) with the per-head log decay fla's retention kernels
         use, g_gamma = log(1 - 2^(-5-h)), on every key channel (scale K^-0.5, state [B,H,K,V])
  fla.modules.rotary.RotaryEmbedding.forward -> fla's own rotary_embedding_ref over its own cos/sin
      cache (_update_cos_sin_cache), rows seqlen_offset .. seqlen_offset + T
(golden_gla.py: fla.modules RMSNorm.forward -> torch RMSNorm in f32; ACT2FN['swish'] -> F.silu;
fla.modules.mlp.swiglu -> silu(gate)*up) and builds with fuse_norm=False (g_norm, not g_norm_swish_gate: the same math under the other name),
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
(a venv with torch 2.15.0 (the PyPI +cu132 wheel, run on the CPU), numpy, transformers 5.25.0,
einops; pip install --no-deps fla_core-0.6.0 and flash_linear_attention-0.6.0 wheels from
../shared/wheels. In this venv golden_gla.py rewrites its references within 4.5e-6 of the committed
ones, made with torch's CPU wheel and transformers 5.23.)

Tiny awkward config: V 256, C 60, L 2, H 3 heads over 1 kv head (K 10, V 30 per head: expand_k 0.5,
expand_v 1.5), output gate, I 136, norm_eps 1e-6, untied. fla's RetNetBlock never hands
use_short_conv to its layer, so there is no short conv.
Recipe (FORMATS §8): torch.manual_seed(1234); build; every parameter += 0.1*N(0,1) from one generator
seeded 42 in named_parameters() order; ids = randint(0, 256, (1, T), manual_seed(7)).
"""
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_gla as gg  # noqa: E402  (applies its patches)
import fla.layers.multiscale_retention as mr  # noqa: E402
from fla.modules.rotary import RotaryEmbedding  # noqa: E402
from fla.modules.rotary.ops import rotary_embedding_ref  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402

C, L, T = gg.C, gg.L, gg.T
TINY = dict(num_heads=3, num_kv_heads=1, expand_k=0.5, expand_v=1.5, use_output_gate=True, feature_map=None)


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


for name in ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention"):
    setattr(mr, name, retention)
mr.parallel_retention = lambda q, k, v, **kw: retention(q, k, v)
RotaryEmbedding.forward = rotary_forward

from fla.models import RetNetConfig, RetNetForCausalLM  # noqa: E402


def state_of(pkv, l):
    """Layer l's state in stuffed's layout, flat: S [H, K, V], then the position counters."""
    st = pkv[l]["recurrent_state"][0].float()
    pos = pkv.get_seq_length(l)
    return torch.cat([st.reshape(-1), torch.tensor([float(pos % 2 ** 24), float(pos // 2 ** 24)])])


def retnet_mixer(p, a, h, cf):
    """RetNet's rotated q, k, its v [T, ·] and each query head's decay γ_h on every key channel
    [T, H·K] (FAMILIES.md §6), for golden_gla's direct float64 model."""
    H = cf["num_heads"]
    K = round(C * cf["expand_k"]) // H
    g = H // cf["num_kv_heads"]
    fm = {None: lambda x: x, "relu": lambda x: x.clamp_min(0)}[cf["feature_map"]]
    n = h.shape[0]
    theta = 10000.0 ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * theta[None, :]  # [T, K/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x, heads):  # x [T, heads*K]: channel i of each head turns with i + K/2
        x = x.view(n, heads, K)
        x0, x1 = x[..., :K // 2], x[..., K // 2:]
        return torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).reshape(n, heads * K)

    q = rope(fm(h @ p[a + "attn.q_proj.weight"].T), H)
    k = rope(fm(h @ p[a + "attn.k_proj.weight"].T), H // g)
    v = h @ p[a + "attn.v_proj.weight"].T
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    return q, k, v, gamma[None, :, None].expand(n, H, K).reshape(n, H * K)


def references(m, ids):
    direct = functools.partial(gg.direct, mixer=retnet_mixer)
    ref, stats = gg.references(m, ids, TINY, state_of=state_of, direct=direct)
    # The split's second call starts its rotary angles at 40; the final positions are T.
    assert stats["max_full_minus_split"] < 1e-4 * stats["max_abs_logits"], stats
    assert (ref["state"][:, -2:] == torch.tensor([float(T), 0.0])).all(), ref["state"][:, -2:]
    return ref, stats


def main():
    cfg, m = gg.build(TINY, RetNetConfig, RetNetForCausalLM)
    ids = torch.randint(0, 256, (1, T), generator=torch.manual_seed(7))
    recipe = ("RetNet tiny: V 256, C 60, L 2, H 3 / kv 1, expand_k 0.5, expand_v 1.5, output gate, "
              "I 136, norm_eps 1e-6; seed 1234, +0.1 N(0,1) seed 42")
    gg.save(m, "retnet_tiny", recipe, *references(m, ids))
    # The same model stored in bf16; its references from those bf16 values upcast to f32.
    mb = RetNetForCausalLM(cfg).eval()
    mb.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
    ref, stats = references(mb, ids)
    mb.to(torch.bfloat16)
    gg.save(mb, "retnet_tiny_bf16", recipe + "; weights bf16", ref, stats)


if __name__ == "__main__":
    sys.exit(main())
