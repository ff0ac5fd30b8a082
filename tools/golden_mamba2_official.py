#!/usr/bin/env python3
"""Golden reference for the official state-spaces/mamba (mamba_ssm) Mamba-2 format, on CPU.

Writes tests/data/mamba2_official/:
  config.json + pytorch_model.bin   MambaLMHeadModel.save_pretrained (torch zip; the state_dict
                                    holds backbone.embedding.weight AND lm_head.weight, tied)
  ref.safetensors                   input_ids, logits, logits_stepwise, logits_split, ssm_state, conv_state

Model: MambaConfig(d_model 64, n_layer 2, vocab_size 250, pad_vocab_size_multiple 8 -> 256 rows,
ssm_cfg {layer "Mamba2", d_state 16, headdim 16, ngroups 1, chunk_size 16} (d_conv 4 and expand 2
left to mamba_ssm's defaults, as in the released configs), rms_norm, residual_in_fp32,
fused_add_norm true, tie_embeddings true).  Logits cover all 256 rows; ids are drawn from
[0, 256), so some ids (>= 250) are padding rows -- harmless for a numerical test.
Recipe as tools/golden_mamba2.py: torch.manual_seed(1234); build; every parameter += 0.1*N(0,1) from
one torch.Generator(42) in named_parameters() order (the tied embedding once);
ids = torch.randint(0, 256, (1, 61), generator=torch.manual_seed(7)).

References:
  logits_stepwise, ssm_state, conv_state: mamba_ssm's pure-torch Mamba2.step(), one token at a time
      from a zero state (FORMATS §2.4 (a)-(d)): stub `selective_scan_cuda`; RMSNorm forwards and the
      fused add+norm `layer_norm_fn` replaced by mamba_ssm's own `rms_norm_ref`s; `selective_state_update`
      and `causal_conv1d_update` set to None; InferenceParams.seqlen_offset = t+1 before each call so the
      first token also goes through step().  States: key_value_memory_dict[l] = (conv [1,cd,k], ssm [1,H,P,N]);
      conv is the last k pre-conv inputs, oldest first (same as HF).
  logits, logits_split: mamba_ssm's multi-token path is Triton-only, so these come from HF transformers'
      torch path on the same weights renamed embedding. -> embeddings. (strict load, no missing/unexpected),
      computed in a SEPARATE process (HF must not see mamba_ssm): this script calls
      `<hf-python> tools/golden_mamba2.py --official-hf DIR OUT`.

Run from the repository root with a python that has mamba_ssm 2.3.2.post1 (installed --no-deps) plus
torch/transformers/einops/triton, e.g.

    python3 -m venv /root/pyref_mamba
    echo /root/pyref/lib/python3.11/site-packages > /root/pyref_mamba/lib/python3.11/site-packages/pyref_base.pth
    /root/pyref_mamba/bin/pip install --no-deps --no-index /work/shared/wheels/mamba_ssm-2.3.2.post1-py3-none-any.whl
    /root/pyref_mamba/bin/python tools/golden_mamba2_official.py [--hf-python /root/pyref/bin/python]

It finishes by regenerating tests/data/REFERENCES.md (via golden_mamba2.py --references-only).
"""
import argparse
import json
import os
import subprocess
import sys
import types

sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # (a)

import torch  # noqa: E402
import mamba_ssm  # noqa: E402
import mamba_ssm.models.mixer_seq_simple as mixer_seq_simple  # noqa: E402
import mamba_ssm.modules.block as block_mod  # noqa: E402
import mamba_ssm.modules.mamba2 as mamba2_mod  # noqa: E402
import mamba_ssm.ops.triton.layer_norm as ln_mod  # noqa: E402
import mamba_ssm.ops.triton.layernorm_gated as lng_mod  # noqa: E402
from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.utils.generation import InferenceParams  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, "tests", "data", "mamba2_official")

VOCAB_REAL, PAD_MULT, D, L, N, P, K, CHUNK = 250, 8, 64, 2, 16, 16, 4, 16
H = 2 * D // P
ROWS = 256
T, SPLIT = 61, 40
INIT_SEED, NOISE_SEED, IDS_SEED = 1234, 42, 7


# ---- (b) pure-torch norms --------------------------------------------------------------
def _rms_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    return _add_rms_norm(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                         residual_in_fp32=residual_in_fp32, is_rms_norm=True)


def _add_rms_norm(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                  is_rms_norm=False, **kw):
    """Reference for the fused add+RMSNorm Triton kernel (layer_norm_fn): fp32 math."""
    assert is_rms_norm and not kw.get("dropout_p") and kw.get("x1") is None and kw.get("rowscale") is None
    out = ln_mod.rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
    if not prenorm:
        return out
    out, res = out
    return out, (res.float() if residual_in_fp32 else res.to(x.dtype))


def _gated_forward(self, x, z=None):
    return lng_mod.rms_norm_ref(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                                norm_before_gate=self.norm_before_gate)


ln_mod.RMSNorm.forward = _rms_forward
lng_mod.RMSNorm.forward = _gated_forward
block_mod.layer_norm_fn = _add_rms_norm
mixer_seq_simple.layer_norm_fn = _add_rms_norm
# ---- (c) pure-torch step() ---------------------------------------------------------------
mamba2_mod.selective_state_update = None
mamba2_mod.causal_conv1d_update = None
mamba2_mod.causal_conv1d_fn = None


def build():
    cfg = MambaConfig(
        d_model=D, n_layer=L, vocab_size=VOCAB_REAL,
        ssm_cfg={"layer": "Mamba2", "d_state": N, "headdim": P, "ngroups": 1, "chunk_size": CHUNK},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
        pad_vocab_size_multiple=PAD_MULT, tie_embeddings=True,
    )
    torch.manual_seed(INIT_SEED)
    model = MambaLMHeadModel(cfg).float().eval()
    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.backbone.embedding.weight.shape == (ROWS, D)
    return model


@torch.no_grad()
def stepwise(model, ids):
    ip = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=1)  # (d)
    out = []
    for t in range(ids.shape[1]):
        ip.seqlen_offset = t + 1  # > 0 forces Mamba2.step(), from zero state at t = 0
        out.append(model(ids[:, t:t + 1], inference_params=ip).logits[0, -1].float())
    conv = torch.stack([ip.key_value_memory_dict[l][0][0].float() for l in range(L)])
    ssm = torch.stack([ip.key_value_memory_dict[l][1][0].float() for l in range(L)])
    assert conv.shape == (L, 2 * D + 2 * N, K) and ssm.shape == (L, H, P, N), (conv.shape, ssm.shape)
    return torch.stack(out), ssm.contiguous(), conv.contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-python", default="/root/pyref/bin/python",
                    help="python of a venv with transformers and WITHOUT mamba_ssm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} mamba_ssm {mamba_ssm.__version__}")

    model = build()
    ids = torch.randint(0, ROWS, (1, T), generator=torch.manual_seed(IDS_SEED))
    os.makedirs(CASE, exist_ok=True)
    model.save_pretrained(CASE)
    sd = torch.load(os.path.join(CASE, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    assert "lm_head.weight" in sd and torch.equal(sd["lm_head.weight"], sd["backbone.embedding.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    with open(os.path.join(CASE, "config.json")) as f:
        print("config.json:", json.dumps(json.load(f)))

    logits_step, ssm, conv = stepwise(model, ids)
    tmp_in = os.path.join(CASE, "official_step.safetensors")
    tmp_out = os.path.join(CASE, "hf_tmp.safetensors")
    save_file({"input_ids": ids.contiguous(), "logits_stepwise": logits_step}, tmp_in)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([args.hf_python, os.path.join(ROOT, "tools", "golden_mamba2.py"), "--official-hf", CASE, tmp_out],
                   check=True, env=env)
    hf = load_file(tmp_out)
    with safe_open(tmp_out, "pt") as f:
        meta = json.loads(f.metadata()["reference"])
    hf_stats, recipe = meta["stats"], meta["recipe"]
    os.remove(tmp_in)
    os.remove(tmp_out)
    assert torch.equal(hf["input_ids"], ids)

    mx = lambda a, b: (a - b).abs().max().item()
    logits = hf["logits"]
    stats = {
        "max_abs_logits": logits.abs().max().item(),
        "full_vs_stepwise": mx(logits, logits_step),          # HF full vs mamba_ssm step()
        "full_vs_split": mx(logits, hf["logits_split"]),       # both HF
        "ssm_state_max_abs": ssm.abs().max().item(),
        "ssm_state_full_vs_stepwise": mx(hf["ssm_state"], ssm),
        "ssm_state_full_vs_split": hf_stats["ssm_state_full_vs_split"],
        "hf_full_vs_official_stepwise": mx(logits, logits_step),
        "hf_stepwise_vs_official_stepwise": mx(hf["logits_stepwise"], logits_step),
        "hf_full_vs_hf_stepwise": hf_stats["full_vs_stepwise"],
        "ssm_state_hf_full_vs_official_stepwise": mx(hf["ssm_state"], ssm),
        "conv_state_hf_full_vs_official_stepwise": mx(hf["conv_state"], conv),
        "fingerprint": [round(x, 8) for x in logits[0, :5].tolist()],
        "fingerprint_official_stepwise": [round(x, 8) for x in logits_step[0, :5].tolist()],
    }
    tensors = {
        "input_ids": ids.contiguous(),
        "logits": logits.contiguous(),
        "logits_stepwise": logits_step.contiguous(),
        "logits_split": hf["logits_split"].contiguous(),
        "ssm_state": ssm,
        "conv_state": conv,
    }
    recipe += (f"; official MambaLMHeadModel vocab {VOCAB_REAL} pad multiple {PAD_MULT} -> {ROWS} rows, tied, "
               f"fused_add_norm; mamba_ssm {mamba_ssm.__version__}; logits/logits_split from HF on renamed weights, "
               f"logits_stepwise/states from mamba_ssm step()")
    meta = {"recipe": recipe, "T": T, "split": SPLIT, "stats": stats}
    save_file(tensors, os.path.join(CASE, "ref.safetensors"),
              metadata={"reference": json.dumps(meta, sort_keys=True)})  # one key: deterministic header
    print("[mamba2_official]")
    for k, v in stats.items():
        print(f"  {k}: {v}")
    print("  shapes:", {k: tuple(v.shape) for k, v in tensors.items()})
    subprocess.run([args.hf_python, os.path.join(ROOT, "tools", "golden_mamba2.py"), "--references-only"],
                   check=True, env=env)


if __name__ == "__main__":
    main()
