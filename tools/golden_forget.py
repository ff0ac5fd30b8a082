#!/usr/bin/env python3
"""Reference logits of the training-free forgetting methods (SPEC.md §2.4) on a tiny Mamba-2.

An independent, direct implementation: a plain-PyTorch Mamba-2 forward (FORMATS.md §2.3) whose SSM is
the explicit sum y_t = Σ_{i∈W(t)} C_t·B_i · Δ_i · x_i · exp(Σ_{j=i+1..t} log α_j) + D·x_t — no state, no
chunks — checked first against HF transformers' logits on the unmodified model. Then:
  - rri:  log α′ = log α + ln a, B′ = b·B (after conv + SiLU, before ·Δ)
  - dt:   Δ′ = c·Δ
  - window r: the sum runs over i ∈ (t−r, t] only (Eq. 8), layer by layer, conv unchanged.
Writes tests/data/mamba2_hf_g1_untied/forget_ref.safetensors.

    /root/pyref/bin/python tools/golden_forget.py
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Mamba2ForCausalLM

CASE = "tests/data/mamba2_hf_g1_untied"
RRI = (0.98, 0.75)
DT_C = 0.5
WINDOW = 8


def forward(w, cfg, ids, rri=None, dt_c=None, window=None):
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    H, P, N, G, k = cfg["num_heads"], cfg["head_dim"], cfg["state_size"], cfg["n_groups"], cfg["conv_kernel"]
    di, eps = H * P, cfg["layer_norm_epsilon"]
    T = ids.shape[0]

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight

    x = w["backbone.embeddings.weight"][ids].double()
    for l in range(L):
        p = f"backbone.layers.{l}."
        h = rms(x, w[p + "norm.weight"].double())
        zx = h @ w[p + "mixer.in_proj.weight"].double().T
        z, xbc, dt = zx[:, :di], zx[:, di:2 * di + 2 * G * N], zx[:, 2 * di + 2 * G * N:]
        cw = w[p + "mixer.conv1d.weight"].double()[:, 0, :]  # (cd, k)
        pad = torch.cat([torch.zeros(k - 1, xbc.shape[1], dtype=xbc.dtype), xbc])
        conv = sum(cw[:, j] * pad[j:j + T] for j in range(k)) + w[p + "mixer.conv1d.bias"].double()
        u = F.silu(conv)
        xs, B, C = u[:, :di].view(T, H, P), u[:, di:di + G * N].view(T, G, N), u[:, di + G * N:].view(T, G, N)
        dt = F.softplus(dt + w[p + "mixer.dt_bias"].double())
        A = -torch.exp(w[p + "mixer.A_log"].double())
        if dt_c is not None:
            dt = dt * dt_c
        if rri is not None:
            B = B * rri[1]
        logal = dt * A + (torch.log(torch.tensor(rri[0], dtype=torch.float64)) if rri else 0.0)  # (T, H)
        cum = torch.cumsum(logal, 0)  # inclusive
        hg = torch.arange(H) // (H // G)
        Bh, Ch = B[:, hg, :], C[:, hg, :]  # (T, H, N)
        cb = torch.einsum("thn,shn->hts", Ch, Bh)  # C_t·B_s
        decay = cum.T[:, :, None] - cum.T[:, None, :]  # (H, t, s): Σ_{j=s+1..t} log α_j
        t_idx, s_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
        mask = s_idx <= t_idx
        if window is not None:
            mask = mask & (s_idx > t_idx - window)
        m = torch.where(mask, cb * torch.exp(torch.where(mask, decay, torch.zeros_like(decay))), torch.zeros_like(cb))
        m = m * dt.T[:, None, :]
        y = torch.einsum("hts,shp->thp", m, xs) + w[p + "mixer.D"].double()[None, :, None] * xs
        y = y.reshape(T, di) * F.silu(z)
        y = torch.cat([rms(g, w[p + "mixer.norm.weight"].double()[i * (di // G):(i + 1) * (di // G)])
                       for i, g in enumerate(y.split(di // G, -1))], -1)
        x = x + y @ w[p + "mixer.out_proj.weight"].double().T
    x = rms(x, w["backbone.norm_f.weight"].double())
    head = w.get("lm_head.weight", w["backbone.embeddings.weight"]).double()
    return (x @ head.T).float()


def main():
    w = load_file(os.path.join(CASE, "model.safetensors"))
    cfg = json.load(open(os.path.join(CASE, "config.json")))
    ids = load_file(os.path.join(CASE, "ref.safetensors"))["input_ids"][0]
    plain = forward(w, cfg, ids)
    hf = Mamba2ForCausalLM.from_pretrained(CASE).eval()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    err = (plain - ref).abs().max().item()
    print(f"direct-sum forward vs HF: max|Δ| {err:.3e}")
    assert err < 1e-4, err
    out = {
        "input_ids": ids[None].clone(),
        "logits_plain": plain.contiguous(),
        "logits_rri": forward(w, cfg, ids, rri=RRI).contiguous(),
        "logits_dt": forward(w, cfg, ids, dt_c=DT_C).contiguous(),
        f"logits_window{WINDOW}": forward(w, cfg, ids, window=WINDOW).contiguous(),
    }
    for kname, v in out.items():
        if kname.startswith("logits_") and kname != "logits_plain":
            print(f"{kname}: max|Δ vs plain| {(v - plain).abs().max().item():.3e}")
    meta = {"reference": json.dumps({"rri": RRI, "dt_c": DT_C, "window": WINDOW, "direct_vs_hf": err,
                                     "torch": torch.__version__}, sort_keys=True)}
    save_file(out, os.path.join(CASE, "forget_ref.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
