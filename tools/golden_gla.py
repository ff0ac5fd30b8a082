#!/usr/bin/env python3
"""Golden reference tensors for GLA from fla 0.6.0's GLAForCausalLM on CPU (FAMILIES.md §5, FORMATS §8).

fla's kernels are Triton, so before building the model this script patches:
  fla.layers.gla.{fused_recurrent_gla, chunk_gla, fused_chunk_gla} -> naive_recurrent_gla
      (fla.ops.gla.naive; scale K^-0.5, state [B,H,K,V], transposed when state_v_first)
  fla.modules.ShortConvolution.forward -> torch depthwise conv1d + SiLU over (cache[..., 1:] ++ x),
      returning fla's cache layout [B, D, W] (the last W inputs)
  fla.modules RMSNorm.forward (the per-head g_norm) -> torch RMSNorm in f32;  ACT2FN['swish'] -> F.silu;
  fla.modules.mlp.swiglu -> silu(gate)*up
and builds with fuse_norm=False (g_norm, not g_norm_swish_gate: the same math under the other name),
fuse_swiglu=False, fuse_cross_entropy=False. It then recomputes the whole model from the saved
weights with a direct float64 recurrence written from the equations (below, `direct`) and checks
the logits agree (printed as max_direct_f64_minus_fla).

Writes tests/data/gla_tiny/ (f32 weights), tests/data/gla_tiny_bf16/ (the same model with bf16
weights; its references come from fla on those bf16 values upcast to f32) and tests/data/gla_tiny_relu/
(fla's other layer options: feature_map relu on q and k, no output gate, no short conv, 3 kv heads,
no clamp): config.json +
model.safetensors (save_pretrained) + ref.safetensors:
  input_ids i64 [1, T]; logits / logits_stepwise / logits_split f32 [T, V];
  state f32 [L, S_l]: per layer the recurrent state [H, K, V] ([head][key][value]) then the short
  convs' last W-1 inputs, oldest first, q [W-1, H*K], k [W-1, Hkv*K], v [W-1, Hkv*V] (stuffed's
  layout, converted from fla's [B, H, V, K] and [B, D, W]).
T = 97 > 64, so the full-sequence call takes the layer's chunk branch (here the same naive op);
the split is 40 + 57.

    /work/venv-gla/bin/python tools/golden_gla.py
(/work/venv-gla: python3 -m venv; a .pth pointing at a venv with torch 2.15.0 (CPU wheel) + numpy;
pip install transformers==5.23.0 einops; pip install --no-deps fla_core-0.6.0 and
flash_linear_attention-0.6.0 wheels.)

Tiny awkward config: V 256, C 60, L 2, H 3 heads over 1 kv head (K 10, V 30 per head: expand_k 0.5,
expand_v 1.5), short conv width 3, clamp_min -0.05, output gate, I 136, norm_eps 1e-6, untied.
Recipe (FORMATS §8): torch.manual_seed(1234); build; every parameter += 0.1*N(0,1) from one generator
seeded 42 in named_parameters() order; ids = randint(0, 256, (1, T), manual_seed(7)).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import fla.layers.gla as gl
import fla.modules.mlp as mlp
from fla.modules import RMSNorm, ShortConvolution
from fla.modules.activations import ACT2FN
from fla.ops.gla.naive import naive_recurrent_gla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, C, L, I = 256, 60, 2, 136
T, SPLIT = 97, 40
# The two layer configurations (fla GLAConfig fields): gla_tiny (and its bf16 copy), and gla_tiny_relu.
TINY = dict(num_heads=3, num_kv_heads=1, expand_k=0.5, expand_v=1.5, use_short_conv=True, conv_size=3,
            clamp_min=-0.05, use_output_gate=True, feature_map=None)
RELU = dict(num_heads=3, num_kv_heads=3, expand_k=0.5, expand_v=1.5, use_short_conv=False, conv_size=4,
            clamp_min=None, use_output_gate=False, feature_map="relu")
torch.set_num_threads(1)


def gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, state_v_first=False, **kw):
    gk = gk if gk is not None else g
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    o, h = naive_recurrent_gla(q, k, v, gk, initial_state=initial_state, output_final_state=True)
    if state_v_first:
        h = h.transpose(-1, -2).contiguous()
    return o, (h if output_final_state else None)


def conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kw):
    b, t, d = x.shape
    w = self.kernel_size[0]
    hist = cache[..., 1:] if cache is not None else x.new_zeros(b, d, w - 1)
    xx = torch.cat([hist, x.transpose(1, 2)], -1)
    y = F.conv1d(xx, self.weight, self.bias, groups=d)
    if self.activation is not None:
        y = F.silu(y)
    y = y.transpose(1, 2)
    if residual is not None:
        y = y + residual
    return y, (xx[..., -w:].contiguous() if output_final_state else None)


def rms_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


gl.fused_recurrent_gla = gla
gl.chunk_gla = gla
gl.fused_chunk_gla = gla
ShortConvolution.forward = conv_forward
RMSNorm.forward = rms_forward
ACT2FN['swish'] = F.silu
ACT2FN['silu'] = F.silu
mlp.swiglu = lambda gate, y: F.silu(gate) * y

from fla.models import GLAConfig, GLAForCausalLM  # noqa: E402


def state_of(pkv, l):
    """Layer l's state in stuffed's layout, flat."""
    st = pkv[l]["recurrent_state"][0].transpose(-1, -2).float()  # [H, V, K] -> [H, K, V]
    parts = [st.reshape(-1)]
    for c in pkv[l]["conv_state"] or ():  # [B, D, W] -> last W-1 inputs [W-1, D]
        parts.append(c[0, :, 1:].transpose(0, 1).float().reshape(-1))
    return torch.cat(parts)


def gla_mixer(p, a, h, cf):
    """GLA's q, k, v [T, ·] and the per-key-channel decays of each query head [T, H·K] (its kv
    head's; FAMILIES.md §5)."""
    W = cf["conv_size"]
    fm = {None: lambda x: x, "relu": lambda x: x.clamp_min(0)}[cf["feature_map"]]

    def conv(x, w):  # x [T, D], w [D, 1, W]
        if not cf["use_short_conv"]:
            return x
        xx = torch.cat([x.new_zeros(W - 1, x.shape[1]), x])
        y = sum(w[:, 0, j] * xx[j:j + x.shape[0]] for j in range(W))
        return y * torch.sigmoid(y)

    q = fm(conv(h @ p[a + "attn.q_proj.weight"].T, p.get(a + "attn.q_conv1d.weight")))
    k = fm(conv(h @ p[a + "attn.k_proj.weight"].T, p.get(a + "attn.k_conv1d.weight")))
    v = conv(h @ p[a + "attn.v_proj.weight"].T, p.get(a + "attn.v_conv1d.weight"))
    gk = (h @ p[a + "attn.gk_proj.0.weight"].T) @ p[a + "attn.gk_proj.1.weight"].T + p[a + "attn.gk_proj.1.bias"]
    lw = F.logsigmoid(gk) / 16
    if cf["clamp_min"] is not None:
        lw = torch.clamp_min(lw, cf["clamp_min"])
    t, g = lw.shape[0], cf["num_heads"] // cf["num_kv_heads"]
    return q, k, v, lw.exp().view(t, cf["num_kv_heads"], 1, -1).expand(-1, -1, g, -1).reshape(t, -1)


def direct(sd, ids, cf, mixer=gla_mixer):
    """The whole model from its weights, float64, from the equations; `mixer` gives each layer's q,
    k, v and decays (tools/golden_retnet.py hands RetNet's)."""
    p = {k: v.double() for k, v in sd.items()}
    H = cf["num_heads"]
    K, VV = round(C * cf["expand_k"]) // H, round(C * cf["expand_v"]) // H
    g = H // cf["num_kv_heads"]

    def rms(x, w, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    x = p["model.embeddings.weight"][ids[0]]
    for l in range(L):
        a = f"model.layers.{l}."
        h = rms(x, p[a + "attn_norm.weight"])
        q, k, v, w = mixer(p, a, h, cf)
        o = torch.zeros(len(ids[0]), H * VV, dtype=torch.float64)
        for hh in range(H):
            kv = hh // g
            S = torch.zeros(K, VV, dtype=torch.float64)
            for t in range(len(ids[0])):
                kk, ww = k[t, kv * K:(kv + 1) * K], w[t, hh * K:(hh + 1) * K]
                S = ww[:, None] * S + kk[:, None] * v[t, kv * VV:(kv + 1) * VV][None, :]
                o[t, hh * VV:(hh + 1) * VV] = (q[t, hh * K:(hh + 1) * K] * K ** -0.5) @ S
        o = rms(o.view(-1, H, VV), p[a + "attn.g_norm.weight"]).reshape(-1, H * VV)
        if cf["use_output_gate"]:
            o = o * F.silu(h @ p[a + "attn.g_proj.weight"].T)
        x = x + o @ p[a + "attn.o_proj.weight"].T
        h = rms(x, p[a + "mlp_norm.weight"])
        m = F.silu(h @ p[a + "mlp.gate_proj.weight"].T) * (h @ p[a + "mlp.up_proj.weight"].T)
        x = x + m @ p[a + "mlp.down_proj.weight"].T
    return rms(x, p["model.norm.weight"]) @ p["lm_head.weight"].T


def references(m, ids, cf, state_of=state_of, direct=direct):
    """fla's logits in one call, token by token and split, the final state (`state_of`), checked
    against `direct` (also used by tools/golden_retnet.py with its own two)."""
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
    return {"input_ids": ids, "logits": full.contiguous(), "logits_stepwise": step.contiguous(),
            "logits_split": split.contiguous(), "state": state.contiguous()}, stats


def write(m, name, recipe, ids, cf):
    save(m.float(), name, recipe, *references(m.float(), ids, cf))


def save(m, name, recipe, ref, stats):
    """The model (save_pretrained) and its references into tests/data/NAME."""
    from safetensors.torch import save_file
    out = os.path.join(ROOT, "tests", "data", name)
    print(name, json.dumps(stats))
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out)
    os.remove(os.path.join(out, "generation_config.json"))  # not read by stuffed
    save_file(ref, os.path.join(out, "ref.safetensors"),
              metadata={"reference": json.dumps({"recipe": recipe, "T": T, "split": SPLIT, "stats": stats})})
    print(sorted(os.listdir(out)))


def build(cf, config=GLAConfig, model=GLAForCausalLM):
    """The recipe's model: seed 1234, every parameter += 0.1 N(0, 1) from a generator seeded 42."""
    torch.manual_seed(1234)
    cfg = config(hidden_size=C, num_hidden_layers=L, **cf,
                 intermediate_size=I, vocab_size=V, norm_eps=1e-6, fuse_norm=False, fuse_swiglu=False,
                 fuse_cross_entropy=False, tie_word_embeddings=False)
    m = model(cfg).float().eval()
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return cfg, m


def main():
    cfg, m = build(TINY)
    ids = torch.randint(0, 256, (1, T), generator=torch.manual_seed(7))
    recipe = ("GLA tiny: V 256, C 60, L 2, H 3 / kv 1, expand_k 0.5, expand_v 1.5, conv 3, clamp_min -0.05, "
              "I 136, norm_eps 1e-6; seed 1234, +0.1 N(0,1) seed 42")
    write(m, "gla_tiny", recipe, ids, TINY)
    # The same model stored in bf16; its references from those bf16 values upcast to f32.
    mb = GLAForCausalLM(cfg).eval()
    mb.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
    ref, stats = references(mb, ids, TINY)
    mb.to(torch.bfloat16)
    save(mb, "gla_tiny_bf16", recipe + "; weights bf16", ref, stats)
    # fla's other layer options, on the same recipe: the relu feature map on q and k, no output gate,
    # no short conv, as many kv heads as heads, no clamp.
    _, m = build(RELU)
    recipe = ("GLA tiny relu: V 256, C 60, L 2, H 3 / kv 3, expand_k 0.5, expand_v 1.5, no short conv, "
              "feature_map relu, use_output_gate false, no clamp_min, I 136, norm_eps 1e-6; seed 1234, "
              "+0.1 N(0,1) seed 42")
    write(m, "gla_tiny_relu", recipe, ids, RELU)


if __name__ == "__main__":
    sys.exit(main())
