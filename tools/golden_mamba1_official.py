#!/usr/bin/env python3
"""Golden reference for the official state-spaces/mamba (mamba_ssm) Mamba-1 format, on CPU.

Writes tests/data/mamba1_official/:
  config.json + pytorch_model.bin   MambaLMHeadModel.save_pretrained (torch zip; backbone.embedding.weight
                                    and a duplicate lm_head.weight, tied), ssm_cfg {} as in the released
                                    configs (layer defaults to Mamba1; d_state 16, d_conv 4, expand 2,
                                    dt_rank "auto" = ceil(36/16) = 3)
  ref.safetensors                   input_ids, logits, logits_stepwise, logits_split, ssm_state, conv_state

Model: MambaConfig(d_model 36 (d_inner 72: not a multiple of 64), n_layer 2, vocab_size 250,
pad_vocab_size_multiple 8 -> 256 rows, rms_norm, residual_in_fp32, fused_add_norm, tie_embeddings).
Recipe as tools/golden_mamba1.py: torch.manual_seed(1234) init; every parameter += 0.1*N(0,1) from
one Generator(42) in named_parameters() order; ids = randint(0, 256, (1, 61), generator=manual_seed(7)).

References, all from mamba_ssm 2.3.2.post1's own pure-torch paths:
  - `selective_scan_cuda` stubbed before import; the fused add+RMSNorm (`layer_norm_fn`) and RMSNorm
    replaced by mamba_ssm's `rms_norm_ref`; `causal_conv1d_fn`/`causal_conv1d_update`/
    `selective_state_update` set to None (so `Mamba.step()` is its torch code), and `selective_scan_fn`
    replaced by mamba_ssm's reference `selective_scan_ref` (the multi-token path).
  logits           one full-sequence forward (nn.Conv1d + selective_scan_ref)
  logits_stepwise  `Mamba.step()` one token per call from a zero state (InferenceParams.seqlen_offset = t+1)
  logits_split     a 40-token prefill with InferenceParams (states from selective_scan_ref's last
                   state), then step() per token
  ssm_state (L, 72, 16), conv_state (L, 72, 4)  after the token-by-token run
A second process (`<hf-python> tools/golden_mamba1.py --official-hf`) runs HF MambaForCausalLM on the
same weights (renamed embedding. -> embeddings.); the spreads go into the metadata.

Run from the repository root with a python that has mamba_ssm 2.3.2.post1 (installed --no-deps) plus
torch/transformers/einops, e.g. (tools/requirements.txt)
    python3 -m venv /work/venv-mamba1-ssm
    echo /work/venv-mamba1/lib/python3.11/site-packages > /work/venv-mamba1-ssm/lib/python3.11/site-packages/hf.pth
    /work/venv-mamba1-ssm/bin/pip install --no-deps --no-index /work/shared/wheels/mamba_ssm-2.3.2.post1-py3-none-any.whl
    /work/venv-mamba1-ssm/bin/python tools/golden_mamba1_official.py --hf-python /work/venv-mamba1/bin/python
"""
import argparse
import json
import os
import subprocess
import sys
import types

sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))

import torch  # noqa: E402
import mamba_ssm  # noqa: E402
import mamba_ssm.models.mixer_seq_simple as mixer_seq_simple  # noqa: E402
import mamba_ssm.modules.block as block_mod  # noqa: E402
import mamba_ssm.modules.mamba_simple as simple_mod  # noqa: E402
import mamba_ssm.ops.triton.layer_norm as ln_mod  # noqa: E402
from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: E402
from mamba_ssm.utils.generation import InferenceParams  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, "tests", "data", "mamba1_official")
VOCAB_REAL, PAD_MULT, D, L, N, K = 250, 8, 36, 2, 16, 4
DI, ROWS = 2 * D, 256
T, SPLIT = 61, 40
INIT_SEED, NOISE_SEED, IDS_SEED = 1234, 42, 7


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


ln_mod.RMSNorm.forward = _rms_forward
block_mod.layer_norm_fn = _add_rms_norm
mixer_seq_simple.layer_norm_fn = _add_rms_norm
simple_mod.causal_conv1d_fn = None
simple_mod.causal_conv1d_update = None
simple_mod.selective_state_update = None
simple_mod.selective_scan_fn = selective_scan_ref


def build():
    cfg = MambaConfig(d_model=D, n_layer=L, vocab_size=VOCAB_REAL, ssm_cfg={}, rms_norm=True,
                      residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=PAD_MULT,
                      tie_embeddings=True)
    torch.manual_seed(INIT_SEED)
    model = MambaLMHeadModel(cfg).float().eval()
    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.backbone.embedding.weight.shape == (ROWS, D)
    mixer = model.backbone.layers[0].mixer
    assert isinstance(mixer, simple_mod.Mamba) and mixer.A_log.shape == (DI, N) and mixer.dt_rank == 3
    return model


def cache_states(ip):
    conv = torch.stack([ip.key_value_memory_dict[l][0][0].float() for l in range(L)])
    ssm = torch.stack([ip.key_value_memory_dict[l][1][0].float() for l in range(L)])
    assert conv.shape == (L, DI, K) and ssm.shape == (L, DI, N), (conv.shape, ssm.shape)
    return ssm.contiguous(), conv.contiguous()


@torch.no_grad()
def references(model, ids):
    logits = model(ids).logits[0].float()
    ip = InferenceParams(max_seqlen=T, max_batch_size=1)
    step = []
    for t in range(T):
        ip.seqlen_offset = t + 1  # > 0 forces Mamba.step(), from the zero state at t = 0
        step.append(model(ids[:, t:t + 1], inference_params=ip).logits[0, -1].float())
    ssm, conv = cache_states(ip)
    ip = InferenceParams(max_seqlen=T, max_batch_size=1)
    split = [model(ids[:, :SPLIT], inference_params=ip).logits[0].float()]
    for t in range(SPLIT, T):
        ip.seqlen_offset = t
        split.append(model(ids[:, t:t + 1], inference_params=ip).logits[0, -1:].float())
    ssm_split, _ = cache_states(ip)
    return logits, torch.stack(step), torch.cat(split), ssm, conv, ssm_split


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-python", default="/work/venv-mamba1/bin/python",
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
    with open(os.path.join(CASE, "config.json")) as f:
        print("config.json:", json.dumps(json.load(f)))

    logits, logits_step, logits_split, ssm, conv, ssm_split = references(model, ids)
    tmp_in = os.path.join(CASE, "official_step.safetensors")
    tmp_out = os.path.join(CASE, "hf_tmp.safetensors")
    save_file({"input_ids": ids.contiguous()}, tmp_in)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([args.hf_python, os.path.join(ROOT, "tools", "golden_mamba1.py"), "--official-hf", CASE, tmp_out],
                   check=True, env=env)
    hf = load_file(tmp_out)
    with safe_open(tmp_out, "pt") as f:
        hf_stats = json.loads(f.metadata()["reference"])["stats"]
    os.remove(tmp_in)
    os.remove(tmp_out)
    assert torch.equal(hf["input_ids"], ids)
    mx = lambda a, b: (a - b).abs().max().item()
    stats = {
        "max_abs_logits": logits.abs().max().item(),
        "full_vs_stepwise": mx(logits, logits_step),
        "full_vs_split": mx(logits, logits_split),
        "ssm_state_max_abs": ssm.abs().max().item(),
        "ssm_state_split_vs_stepwise": mx(ssm_split, ssm),
        "hf_full_vs_official_full": mx(hf["logits"], logits),
        "hf_stepwise_vs_official_stepwise": mx(hf["logits_stepwise"], logits_step),
        "hf_split_vs_official_split": mx(hf["logits_split"], logits_split),
        "ssm_state_hf_vs_official": mx(hf["ssm_state"], ssm),
        "conv_state_hf_vs_official": mx(hf["conv_state"], conv),
        "hf_direct_f64_vs_full": hf_stats["direct_f64_vs_full"],
        "fingerprint": [round(x, 8) for x in logits[0, :5].tolist()],
    }
    for k in ("hf_full_vs_official_full", "hf_stepwise_vs_official_stepwise", "hf_split_vs_official_split"):
        assert stats[k] <= 1e-4 * stats["max_abs_logits"], (k, stats)
    tensors = {"input_ids": ids.contiguous(), "logits": logits.contiguous(),
               "logits_stepwise": logits_step.contiguous(), "logits_split": logits_split.contiguous(),
               "ssm_state": ssm, "conv_state": conv}
    recipe = (f"official MambaLMHeadModel d{D} L{L} ssm_cfg {{}} (Mamba1, N{N} k{K} E2 dt_rank auto 3), vocab {VOCAB_REAL} "
              f"pad multiple {PAD_MULT} -> {ROWS} rows, tied, fused_add_norm; torch.manual_seed({INIT_SEED}) init, "
              f"+0.1*N(0,1) Generator({NOISE_SEED}); ids randint(0,{ROWS},(1,{T}), manual_seed({IDS_SEED})); "
              f"torch {torch.__version__}, mamba_ssm {mamba_ssm.__version__}; all references from mamba_ssm "
              f"(selective_scan_ref / Mamba.step()); HF cross-check in stats")
    meta = {"recipe": recipe, "T": T, "split": SPLIT, "stats": stats}
    save_file(tensors, os.path.join(CASE, "ref.safetensors"), metadata={"reference": json.dumps(meta, sort_keys=True)})
    print("[mamba1_official]", json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
