#!/usr/bin/env python3
"""Golden reference tensors for DeltaNet and Gated DeltaNet from fla 0.6.0's DeltaNetForCausalLM and
GatedDeltaNetForCausalLM on CPU (FAMILIES.md §2, FORMATS §8).

fla's kernels are Triton, so before building the models this script patches:
  fla.layers.delta_net.{chunk_delta_rule, fused_recurrent_delta_rule}
      -> fla.ops.delta_rule.naive.delta_rule_recurrence, after fla's in-kernel L2 norm of q and k
         (x / sqrt(sum x^2 + 1e-6), fla-core modules/norm/l2norm.py); state [B,H,K,V]
  fla.layers.gated_deltanet.{chunk_gated_delta_rule, fused_recurrent_gated_delta_rule}
      -> fla.ops.gated_delta_rule.naive.naive_recurrent_gated_delta_rule, after the same L2 norm,
         beta = sigmoid(b) (x2 with allow_neg_eigval), g = fla.ops.gated_delta_rule.gate.naive_gdn_gate
         (-exp(A_log) * softplus(a + dt_bias)), q/k repeated to the value heads (GVA: value head j reads
         key head j // (HV/H), as the kernels do); state [B,HV,V,K] (state_v_first) transposed in and out
  fla.modules.ShortConvolution.forward -> torch depthwise conv1d (+ SiLU) over (cache[..., 1:] ++ x),
      returning fla's cache layout [B, D, W] (the last W inputs)
  fla.modules RMSNorm.forward -> torch RMSNorm in f32; FusedRMSNormGated.forward -> RMSNorm then
      * silu(g) (swish) or * sigmoid(g); ACT2FN['swish'] -> F.silu; fla.modules.mlp.swiglu -> silu(gate)*up
and builds with fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False. It then recomputes each
whole model from its saved weights with a direct float64 recurrence written from the equations
(below, `direct`: S <- alpha*S, u = beta*(v - S k), S <- S + u k^T, o = S q, per value head) and checks
the logits agree (printed as max_direct_f64_minus_fla).

Writes, each with config.json + model.safetensors (save_pretrained) + ref.safetensors:
  tests/data/delta_net_tiny/       DeltaNet, f32: V 256, C 40, L 2, H 2, K 15, V 30 (expand_k 0.75,
                                   expand_v 1.5), use_beta, no output gate (fla-hub's setting: plain
                                   o_norm), short conv 3, I 75, norm_eps 1e-6, untied
  tests/data/delta_net_tiny_bf16/  the same model stored in bf16 (references from fla on those bf16
                                   values upcast to f32)
  tests/data/delta_net_tiny_gate/  DeltaNet, f32: C 40, L 2, H 2, K 20, V 10 (expand_v 0.5), use_beta
                                   False (beta = 1), use_gate (FusedRMSNormGated, swish), conv 4, tied
  tests/data/gdn_tiny/             GDN, f32: C 40, L 2, 2 key heads, 4 value heads (GVA), head_dim 6,
                                   expand_v 1.5 (V 9), output gate swish, short conv 4, I 75, tied
  tests/data/gdn_tiny_neg/         GDN, f32: allow_neg_eigval, no short conv, 3 heads (no GVA),
                                   head_dim 7, expand_v 1 (V 7), output gate sigmoid, I 75, untied
  tests/data/gdn_tiny_bf16/        gdn_tiny stored in bf16
ref.safetensors: input_ids i64 [1, T]; logits / logits_stepwise / logits_split f32 [T, V];
  state f32 [L, S_l]: per layer the recurrent state [HV, V, K] ([head][value][key], fla's cache
  layout for GDN, transposed from [H, K, V] for DeltaNet) then the short convs' last W-1 inputs,
  oldest first, q [W-1, H*K], k [W-1, H*K], v [W-1, HV*V] (converted from fla's [B, D, W]).
T = 97 > 64, so the full-sequence call takes the layers' chunk branch (here the same naive op);
the split is 40 + 57.

    /work/venv-gla/bin/python tools/golden_delta_net.py [NAME…]
(/work/venv-gla: see tools/golden_gla.py: torch 2.15.0 CPU, transformers==5.23.0, einops, the
fla_core-0.6.0 and flash_linear_attention-0.6.0 wheels with --no-deps.)

Recipe (FORMATS §8): torch.manual_seed(1234); build; every parameter += 0.1*N(0,1) from one generator
seeded 42 in named_parameters() order; ids = randint(0, 256, (1, T), manual_seed(7)).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import fla.layers.delta_net as dl
import fla.layers.gated_deltanet as gd
import fla.modules.mlp as mlp
from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
from fla.modules.activations import ACT2FN
from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_rule.gate import naive_gdn_gate
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, SPLIT = 97, 40
# `golden_delta_net.py NAME…` writes only those directories (the others stay byte for byte as committed).
ONLY = set(sys.argv[1:])
torch.set_num_threads(1)


def l2(x):
    x = x.float()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def delta(q, k, v, beta=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, **kw):
    assert not kw.get("cu_seqlens")
    if use_qk_l2norm_in_kernel:
        q, k = l2(q), l2(k)
    tr = lambda x: x.transpose(1, 2).contiguous()  # [B,T,H,D] -> [B,H,T,D]
    o, s = delta_rule_recurrence(tr(q), tr(k), tr(v), tr(beta), initial_state=initial_state, output_final_state=True)
    return tr(o), (s if output_final_state else None)


def gated(q, k, v, g=None, beta=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
          use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False, use_gate_in_kernel=False,
          A_log=None, dt_bias=None, **kw):
    assert not kw.get("cu_seqlens")
    if use_qk_l2norm_in_kernel:
        q, k = l2(q), l2(k)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid()
        if allow_neg_eigval:
            beta = beta * 2
    if use_gate_in_kernel:
        g = naive_gdn_gate(g, A_log, dt_bias)
    hv = v.shape[2]
    rep = hv // q.shape[2]
    q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    o, h = naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=initial_state, output_final_state=True)
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


def gated_rms_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    xf, gf = x.float(), g.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
    y = y * (torch.sigmoid(gf) if self.activation == "sigmoid" else F.silu(gf))
    return y.to(x.dtype)


dl.chunk_delta_rule = delta
dl.fused_recurrent_delta_rule = delta
gd.chunk_gated_delta_rule = gated
gd.fused_recurrent_gated_delta_rule = gated
ShortConvolution.forward = conv_forward
RMSNorm.forward = rms_forward
FusedRMSNormGated.forward = gated_rms_forward
ACT2FN['swish'] = F.silu
ACT2FN['silu'] = F.silu
mlp.swiglu = lambda gate, y: F.silu(gate) * y

from fla.models import DeltaNetConfig, DeltaNetForCausalLM  # noqa: E402
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402


def state_of(pkv, l, v_first):
    """Layer l's state in stuffed's layout, flat."""
    st = pkv[l]["recurrent_state"][0].float()
    if not v_first:
        st = st.transpose(-1, -2)  # [H, K, V] -> [H, V, K]
    parts = [st.reshape(-1)]
    for c in pkv[l]["conv_state"] or ():  # [B, D, W] -> last W-1 inputs [W-1, D]
        parts.append(c[0, :, 1:].transpose(0, 1).float().reshape(-1))
    return torch.cat(parts)


def direct(cfg, gdn, sd, ids):
    """The whole model from its weights, float64, from the equations (FAMILIES.md §2.2)."""
    p = {k: v.double() for k, v in sd.items()}
    C, L = cfg.hidden_size, cfg.num_hidden_layers
    if gdn:
        H, K = cfg.num_heads, cfg.head_dim
        HV = cfg.num_v_heads or H
        VV = int(K * cfg.expand_v)
    else:
        H = HV = cfg.num_heads
        K, VV = round(C * cfg.expand_k) // H, round(C * cfg.expand_v) // H
    W = cfg.conv_size if cfg.use_short_conv else 0
    eps = cfg.norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def conv(x, w):  # x [T, D], w [D, 1, W]; then SiLU
        if W == 0:
            return F.silu(x)
        xx = torch.cat([x.new_zeros(W - 1, x.shape[1]), x])
        return F.silu(sum(w[:, 0, j] * xx[j:j + x.shape[0]] for j in range(W)))

    def unit(x, n):
        x = x.view(x.shape[0], -1, n)
        return (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)).reshape(x.shape[0], -1)

    n = len(ids[0])
    x = p["model.embeddings.weight"][ids[0]]
    for l in range(L):
        a = f"model.layers.{l}."
        cw = lambda s: p.get(a + f"attn.{s}_conv1d.weight")
        h = rms(x, p[a + "attn_norm.weight"])
        q = unit(conv(h @ p[a + "attn.q_proj.weight"].T, cw("q")), K) * K ** -0.5
        k = unit(conv(h @ p[a + "attn.k_proj.weight"].T, cw("k")), K)
        v = conv(h @ p[a + "attn.v_proj.weight"].T, cw("v"))
        beta = torch.sigmoid(h @ p[a + "attn.b_proj.weight"].T) if a + "attn.b_proj.weight" in p else torch.ones(n, HV)
        if cfg.allow_neg_eigval:
            beta = beta * 2
        if gdn:
            g = -p[a + "attn.A_log"].exp() * F.softplus(h @ p[a + "attn.a_proj.weight"].T + p[a + "attn.dt_bias"])
        else:
            g = torch.zeros(n, HV, dtype=torch.float64)
        o = torch.zeros(n, HV * VV, dtype=torch.float64)
        for j in range(HV):
            kh = j // (HV // H)
            S = torch.zeros(VV, K, dtype=torch.float64)
            for t in range(n):
                kk, qq = k[t, kh * K:(kh + 1) * K], q[t, kh * K:(kh + 1) * K]
                S = g[t, j].exp() * S
                u = beta[t, j] * (v[t, j * VV:(j + 1) * VV] - S @ kk)
                S = S + u[:, None] * kk[None, :]
                o[t, j * VV:(j + 1) * VV] = S @ qq
        o = rms(o.view(-1, HV, VV), p[a + "attn.o_norm.weight"]).reshape(-1, HV * VV)
        if a + "attn.g_proj.weight" in p:
            gg = h @ p[a + "attn.g_proj.weight"].T
            o = o * (torch.sigmoid(gg) if getattr(cfg, "output_gate_activation", "swish") == "sigmoid" else F.silu(gg))
        x = x + o @ p[a + "attn.o_proj.weight"].T
        h = rms(x, p[a + "mlp_norm.weight"])
        m = F.silu(h @ p[a + "mlp.gate_proj.weight"].T) * (h @ p[a + "mlp.up_proj.weight"].T)
        x = x + m @ p[a + "mlp.down_proj.weight"].T
    head = p.get("lm_head.weight", p["model.embeddings.weight"])
    return rms(x, p["model.norm.weight"]) @ head.T


def references(m, gdn, ids):
    L = m.config.num_hidden_layers
    with torch.no_grad():
        o = m(ids, use_cache=True)
        full = o.logits[0].float()
        state = torch.stack([state_of(o.past_key_values, l, gdn) for l in range(L)])
        steps = []
        s = m(ids[:, :1], use_cache=True)
        steps.append(s.logits[0, -1])
        for t in range(1, T):
            s = m(ids[:, t:t + 1], past_key_values=s.past_key_values, use_cache=True)
            steps.append(s.logits[0, -1])
        step = torch.stack(steps).float()
        step_state = torch.stack([state_of(s.past_key_values, l, gdn) for l in range(L)])
        a = m(ids[:, :SPLIT], use_cache=True)
        b = m(ids[:, SPLIT:], past_key_values=a.past_key_values, use_cache=True)
        split = torch.cat([a.logits[0], b.logits[0]]).float()
        want = direct(m.config, gdn, m.state_dict(), ids)
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


def save(m, name, ref, stats, recipe):
    from safetensors.torch import save_file
    out = os.path.join(ROOT, "tests", "data", name)
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out)
    if os.path.exists(os.path.join(out, "generation_config.json")):
        os.remove(os.path.join(out, "generation_config.json"))
    print(name, json.dumps(stats))
    save_file(ref, os.path.join(out, "ref.safetensors"),
              metadata={"reference": json.dumps({"recipe": recipe, "T": T, "split": SPLIT, "stats": stats})})
    print(sorted(os.listdir(out)))


def build(cls, cfg):
    torch.manual_seed(1234)
    m = cls(cfg).float().eval()
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def write(cls, cfg, gdn, name, recipe, ids, bf16=None):
    if ONLY and name not in ONLY:
        return
    m = build(cls, cfg)
    ref, stats = references(m, gdn, ids)
    save(m, name, ref, stats, recipe)
    if bf16:
        # The same model stored in bf16; its references from those bf16 values upcast to f32.
        mb = cls(cfg).eval()
        mb.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
        ref, stats = references(mb, gdn, ids)
        mb.to(torch.bfloat16)
        save(mb, bf16, ref, stats, recipe + "; weights bf16")


def main():
    ids = torch.randint(0, 256, (1, T), generator=torch.manual_seed(7))
    common = dict(vocab_size=256, num_hidden_layers=2, intermediate_size=75, norm_eps=1e-6, fuse_norm=False,
                  fuse_swiglu=False, fuse_cross_entropy=False)
    dn = DeltaNetConfig(hidden_size=40, num_heads=2, expand_k=0.75, expand_v=1.5, use_beta=True, use_gate=False,
                        use_short_conv=True, conv_size=3, tie_word_embeddings=False, **common)
    write(DeltaNetForCausalLM, dn, False, "delta_net_tiny",
          "DeltaNet tiny: V 256, C 40, L 2, H 2, K 15, V 30, use_beta, no gate, conv 3, I 75, norm_eps 1e-6; "
          "seed 1234, +0.1 N(0,1) seed 42", ids, bf16="delta_net_tiny_bf16")
    dg = DeltaNetConfig(hidden_size=40, num_heads=2, expand_k=1.0, expand_v=0.5, use_beta=False, use_gate=True,
                        use_short_conv=True, conv_size=4, tie_word_embeddings=True, **common)
    write(DeltaNetForCausalLM, dg, False, "delta_net_tiny_gate",
          "DeltaNet tiny gate: V 256, C 40, L 2, H 2, K 20, V 10, no beta (1), swish output gate, conv 4, I 75, "
          "tied; seed 1234, +0.1 N(0,1) seed 42", ids)
    g1 = GatedDeltaNetConfig(hidden_size=40, num_heads=2, num_v_heads=4, head_dim=6, expand_v=1.5, use_gate=True,
                             use_short_conv=True, conv_size=4, allow_neg_eigval=False, tie_word_embeddings=True,
                             **common)
    write(GatedDeltaNetForCausalLM, g1, True, "gdn_tiny",
          "GDN tiny: V 256, C 40, L 2, 2 key heads / 4 value heads, K 6, V 9, swish gate, conv 4, I 75, tied; "
          "seed 1234, +0.1 N(0,1) seed 42", ids, bf16="gdn_tiny_bf16")
    g2 = GatedDeltaNetConfig(hidden_size=40, num_heads=3, head_dim=7, expand_v=1.0, use_gate=True,
                             output_gate_activation="sigmoid", use_short_conv=False, allow_neg_eigval=True,
                             tie_word_embeddings=False, **common)
    write(GatedDeltaNetForCausalLM, g2, True, "gdn_tiny_neg",
          "GDN tiny neg: V 256, C 40, L 2, 3 heads, K 7, V 7, allow_neg_eigval, sigmoid gate, no conv, I 75; "
          "seed 1234, +0.1 N(0,1) seed 42", ids)


if __name__ == "__main__":
    sys.exit(main())
