#!/usr/bin/env python3
"""Golden references for Mamba-1 (HF `MambaForCausalLM`, transformers' pure-torch path), on CPU.

Writes, each as config.json + model.safetensors (HF save_pretrained) + ref.safetensors:
  tests/data/mamba1_hf/       V256 d40 L2 N7 R5 k4 (d_inner 80: not a multiple of 64), untied, f32
  tests/data/mamba1_hf_bf16/  V256 d48 L2 N16 R3 k3 (d_inner 96), tied, weights stored bf16;
                              references computed on the bf16 values upcast to f32
  tests/data/falcon_mamba_hf/ FalconMambaForCausalLM V256 d32 L2 N5 R3 k4 (d_inner 64), tied, f32,
                              mixer_rms_eps 1e-6 (weightless RMSNorms on dt_r, B, C)
ref.safetensors: input_ids (1,61) i64; logits, logits_stepwise, logits_split (61, 256) f32;
ssm_state (L, d_inner, N) and conv_state (L, d_inner, k) (the last k conv inputs, oldest first)
after the token-by-token run.
  logits          one full-sequence call (HF's sequential `mamba_selective_scan` from zero)
  logits_stepwise one token per call with the cache (`mamba_selective_state_update`)
  logits_split    a 40-token call, then one token per call from the cache (HF's multi-token path
                  cannot start from a cached SSM state: it zero-initialises it, FAMILIES.md §3.6)
The script also checks the two HF paths against a direct recurrence written here from the
equations of FAMILIES.md §3.3 (float64), and stores every spread in the metadata.

Recipe: torch.manual_seed(1234) init; every parameter += 0.1*N(0,1) from one Generator(42) in
named_parameters() order; ids = randint(0, 256, (1, 61), generator=manual_seed(7)).

Run from the repository root with a python that has torch 2.15.0 + transformers 5.23.0 and NOT
mamba_ssm (tools/requirements.txt), e.g.
    python3 -m venv /work/venv-mamba1   # with torch via a .pth, then pip install transformers==5.23.0
    /work/venv-mamba1/bin/python tools/golden_mamba1.py
`--official-hf DIR OUT` (used by tools/golden_mamba1_official.py) loads an official
`state-spaces/mamba` checkpoint DIR into MambaForCausalLM (embedding. -> embeddings.) and writes
HF's references for it to OUT.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
ROWS, T, SPLIT = 256, 61, 40
INIT_SEED, NOISE_SEED, IDS_SEED = 1234, 42, 7

if "mamba_ssm" in sys.modules or any(os.path.isdir(os.path.join(p, "mamba_ssm")) for p in sys.path if p):
    sys.exit("mamba_ssm is importable here: transformers would take its Triton kernels; use a venv without it")


def perturb(model):
    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))


def make_ids():
    return torch.randint(0, ROWS, (1, T), generator=torch.manual_seed(IDS_SEED))


def states(cache, n_layer):
    conv = torch.stack([cache.get_conv_state(l, state_idx=0)[0].float() for l in range(n_layer)])
    ssm = torch.stack([cache.get_recurrent_state(l, state_idx=0)[0].float() for l in range(n_layer)])
    return ssm.contiguous(), conv.contiguous()


@torch.no_grad()
def hf_reference(model, ids):
    n_layer = model.config.num_hidden_layers
    full = model(ids, use_cache=True)
    logits = full.logits[0].float()
    ssm_full, conv_full = states(full.cache_params, n_layer)
    step, cache = [], None
    for t in range(ids.shape[1]):
        o = model(ids[:, t:t + 1], cache_params=cache, use_cache=True)
        cache = o.cache_params
        step.append(o.logits[0, -1].float())
    logits_step = torch.stack(step)
    ssm, conv = states(cache, n_layer)
    o = model(ids[:, :SPLIT], use_cache=True)
    split, cache = [o.logits[0].float()], o.cache_params
    for t in range(SPLIT, ids.shape[1]):
        o = model(ids[:, t:t + 1], cache_params=cache, use_cache=True)
        cache = o.cache_params
        split.append(o.logits[0, -1:].float())
    logits_split = torch.cat(split)
    ssm_split, _ = states(cache, n_layer)
    direct = direct_recurrence(model, ids)
    mx = lambda a, b: (a - b).abs().max().item()
    stats = {
        "max_abs_logits": logits.abs().max().item(),
        "full_vs_stepwise": mx(logits, logits_step),
        "full_vs_split": mx(logits, logits_split),
        "ssm_state_max_abs": ssm.abs().max().item(),
        "ssm_state_full_vs_stepwise": mx(ssm_full, ssm),
        "ssm_state_split_vs_stepwise": mx(ssm_split, ssm),
        "conv_state_full_vs_stepwise": mx(conv_full, conv),
        "direct_f64_vs_full": mx(direct[0].float(), logits),
        "direct_f64_vs_stepwise": mx(direct[0].float(), logits_step),
        "direct_f64_ssm_state_vs_stepwise": mx(direct[1].float(), ssm),
        "fingerprint": [round(x, 8) for x in logits[0, :5].tolist()],
    }
    for k in ("direct_f64_vs_full", "direct_f64_vs_stepwise"):
        assert stats[k] <= 1e-4 * stats["max_abs_logits"], (k, stats)
    tensors = {"input_ids": ids.contiguous(), "logits": logits.contiguous(),
               "logits_stepwise": logits_step.contiguous(), "logits_split": logits_split.contiguous(),
               "ssm_state": ssm, "conv_state": conv}
    return tensors, stats


@torch.no_grad()
def direct_recurrence(model, ids):
    """FAMILIES.md §3.3 written out, float64, one token at a time: (logits (T, V), ssm (L, di, N))."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    c = model.config
    L, N, R, K = c.num_hidden_layers, c.state_size, c.time_step_rank, c.conv_kernel
    meps = getattr(c, "mixer_rms_eps", None) if c.model_type == "falcon_mamba" else None
    wl = (lambda v: v / torch.sqrt((v * v).mean() + meps)) if meps is not None else (lambda v: v)
    eps = c.layer_norm_epsilon
    di = c.intermediate_size
    rms = lambda v, w: v / torch.sqrt((v * v).mean() + eps) * w
    S = [torch.zeros(di, N, dtype=torch.float64) for _ in range(L)]
    hist = [torch.zeros(K, di, dtype=torch.float64) for _ in range(L)]
    out = []
    head = sd.get("lm_head.weight", sd["backbone.embeddings.weight"])
    for tok in ids[0].tolist():
        x = sd["backbone.embeddings.weight"][tok]
        for l in range(L):
            p = f"backbone.layers.{l}."
            h = rms(x, sd[p + "norm.weight"])
            xz = sd[p + "mixer.in_proj.weight"] @ h
            xi, z = xz[:di], xz[di:]
            hist[l] = torch.cat([hist[l][1:], xi[None]])
            w = sd[p + "mixer.conv1d.weight"][:, 0, :]  # (di, K), tap K-1 = current token
            u = (w * hist[l].T).sum(1) + sd[p + "mixer.conv1d.bias"]
            u = u * torch.sigmoid(u)
            xdb = sd[p + "mixer.x_proj.weight"] @ u
            dtr, B, C = wl(xdb[:R]), wl(xdb[R:R + N]), wl(xdb[R + N:])
            dt = torch.nn.functional.softplus(sd[p + "mixer.dt_proj.weight"] @ dtr + sd[p + "mixer.dt_proj.bias"])
            A = -torch.exp(sd[p + "mixer.A_log"])
            S[l] = torch.exp(dt[:, None] * A) * S[l] + dt[:, None] * B[None, :] * u[:, None]
            y = S[l] @ C + sd[p + "mixer.D"] * u
            y = y * z * torch.sigmoid(z)
            x = x + sd[p + "mixer.out_proj.weight"] @ y
        out.append(head @ rms(x, sd["backbone.norm_f.weight"]))
    return torch.stack(out), torch.stack(S)


def write_ref(case_dir, tensors, stats, recipe):
    meta = {"recipe": recipe, "T": T, "split": SPLIT, "stats": stats}
    save_file(tensors, os.path.join(case_dir, "ref.safetensors"),
              metadata={"reference": json.dumps(meta, sort_keys=True)})
    print(f"[{os.path.basename(case_dir)}]", json.dumps(stats, indent=1))


def case_hf(name, d, n, r, k, tied, bf16, falcon=False):
    (Config, Model) = (FalconMambaConfig, FalconMambaForCausalLM) if falcon else (MambaConfig, MambaForCausalLM)
    cfg = Config(vocab_size=ROWS, hidden_size=d, state_size=n, num_hidden_layers=2, expand=2, conv_kernel=k,
                 time_step_rank=r, use_bias=False, use_conv_bias=True, tie_word_embeddings=tied,
                 layer_norm_epsilon=1e-5)
    torch.manual_seed(INIT_SEED)
    model = Model(cfg).float().eval()
    perturb(model)
    if bf16:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    ids = make_ids()
    tensors, stats = hf_reference(model, ids)
    case_dir = os.path.join(DATA, name)
    os.makedirs(case_dir, exist_ok=True)
    (model.to(torch.bfloat16) if bf16 else model).save_pretrained(case_dir)
    os.remove(os.path.join(case_dir, "generation_config.json"))
    recipe = (("FalconMamba: " if falcon else "") + f"tiny Mamba-1 V{ROWS} d{d} L2 N{n} R{r} k{k} E2; tied {tied}; torch.manual_seed({INIT_SEED}) init, "
              f"+0.1*N(0,1) Generator({NOISE_SEED}) named_parameters order; ids randint(0,{ROWS},(1,{T}), "
              f"manual_seed({IDS_SEED})); split {SPLIT} then one token per call; torch {torch.__version__}, "
              f"transformers {transformers.__version__}" + ("; weights stored bf16, reference on bf16 values upcast to f32" if bf16 else ""))
    write_ref(case_dir, tensors, stats, recipe)


def official_hf_pass(official_dir, out_path):
    with open(os.path.join(official_dir, "config.json")) as f:
        oc = json.load(f)
    sd = torch.load(os.path.join(official_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    rows, d = sd["backbone.embedding.weight"].shape
    ssm = oc.get("ssm_cfg", {})
    n = ssm.get("d_state", 16)
    di = ssm.get("expand", 2) * oc["d_model"]
    r = ssm.get("dt_rank", "auto")
    r = -(-oc["d_model"] // 16) if r == "auto" else r
    cfg = MambaConfig(vocab_size=rows, hidden_size=d, state_size=n, num_hidden_layers=oc["n_layer"],
                      expand=ssm.get("expand", 2), intermediate_size=di, conv_kernel=ssm.get("d_conv", 4),
                      time_step_rank=r, use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True),
                      tie_word_embeddings=oc.get("tie_embeddings", True), layer_norm_epsilon=1e-5)
    model = MambaForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [m for m in missing if m != "lm_head.weight"] and not unexpected, (missing, unexpected)
    from safetensors.torch import load_file
    ids = load_file(os.path.join(official_dir, "official_step.safetensors"))["input_ids"]
    tensors, stats = hf_reference(model, ids)
    save_file(tensors, out_path, metadata={"reference": json.dumps({"stats": stats})})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-hf", nargs=2, metavar=("DIR", "OUT"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.official_hf:
        official_hf_pass(*args.official_hf)
        return
    print(f"torch {torch.__version__} transformers {transformers.__version__}")
    case_hf("mamba1_hf", d=40, n=7, r=5, k=4, tied=False, bf16=False)
    case_hf("mamba1_hf_bf16", d=48, n=16, r=3, k=3, tied=True, bf16=True)
    case_hf("falcon_mamba_hf", d=32, n=5, r=3, k=4, tied=True, bf16=False, falcon=True)


if __name__ == "__main__":
    main()
