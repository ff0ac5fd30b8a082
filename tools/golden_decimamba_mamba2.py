#!/usr/bin/env python3
"""Reference for DeciMamba's rule on Mamba-2 (ours: their code is Mamba-1 only) on the tiny official Mamba-2.

DeciMamba (github:assafbk/DeciMamba 6290e95) keeps, in each decimating layer, the top-K tokens by the
L2 norm of softplus(Δ + bias) over the layer's Δ channels; `stuffed` applies the same rule to Mamba-2's
per-head Δ. mamba_ssm's multi-token Mamba-2 path is Triton-only, so this reference runs the model
layer by layer with mamba_ssm 2.3.2.post1's pure-torch `Mamba2.step()` (the stubs of
tools/golden_mamba2_official.py):
  - per layer, every token's normed input (the block's add+RMSNorm), its raw dt from in_proj, and the
    kept indices from their `get_non_decimated_indices` (verbatim, resp_len 1, or 5 in one case, in the copy in
    tools/golden_decimamba.py's form) over dt of shape (1, nheads, L);
  - then `step()` over every token in order; a dropped token's step runs (its conv state advances:
    the conv reads it, as theirs) and its SSM state is put back, its output and residual dropped;
  - the final norm over the kept rows; the last one's logits; then greedy decoding through the whole
    model's `step()` (no decimation after the prompt, as their `generate`).

Writes tests/data/mamba2_official/decimamba_ref.safetensors (the layout of the Mamba-1 file:
input_ids, c{c}_logits, c{c}_tokens, c{c}_kept_l{i}; metadata: cases and cut margins).

    /tmp/tv/bin/python tools/golden_decimamba_mamba2.py   (torch, einops; mamba_ssm --no-deps)
"""
import json
import os
import sys
import types

sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mamba_ssm  # noqa: E402
import mamba_ssm.models.mixer_seq_simple as mixer_seq_simple  # noqa: E402
import mamba_ssm.modules.block as block_mod  # noqa: E402
import mamba_ssm.modules.mamba2 as mamba2_mod  # noqa: E402
import mamba_ssm.ops.triton.layer_norm as ln_mod  # noqa: E402
import mamba_ssm.ops.triton.layernorm_gated as lng_mod  # noqa: E402
from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.utils.generation import InferenceParams  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, "tests", "data", "mamba2_official")
T, NEW, IDS_SEED = 300, 8, 7
# (decimating layers, L_base, beta, min_seq_len, resp_len)
CASES = [([0], 100, 0.5, 20, 1), ([0, 1], 120, 0.5, 20, 1), ([1], 8, 0.5, 30, 1), ([0], 60, 0.5, 20, 5)]
MARGINS = []


def _rms_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    return _add_rms_norm(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                         residual_in_fp32=residual_in_fp32, is_rms_norm=True)


def _add_rms_norm(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                  is_rms_norm=False, **kw):
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
mamba2_mod.selective_state_update = None
mamba2_mod.causal_conv1d_update = None
mamba2_mod.causal_conv1d_fn = None


# --- verbatim from DeciMamba mamba_ssm/ops/selective_scan_interface.py L21-56 (as in golden_decimamba.py) ---
def get_non_decimated_indices(delta_t, delta_bias, response_length, layer_num=None, decimation_config=None):

    activate = decimation_config['activate']
    decimation_type = decimation_config['type']
    beta = decimation_config['beta']
    min_seq_length = decimation_config['min_seq_len']
    L_base = decimation_config['L_base']
    decimating_layers = decimation_config['decimating_layers']
    L = delta_t.shape[2]

    if not activate:
        not_decimated = torch.arange(L)
        return not_decimated

    L_for_dec = L-response_length
    if layer_num not in decimating_layers or L_for_dec == 0:
        not_decimated = torch.arange(L)
        return not_decimated

    s = decimating_layers.index(layer_num)
    delta_t = F.softplus(delta_t + torch.broadcast_to(delta_bias.unsqueeze(dim=0).unsqueeze(dim=2),delta_t.shape))

    if decimation_type == 'max_p':
        if L_base == torch.inf:
            not_decimated = torch.arange(L_for_dec)
        else:
            max_amount_of_tokens = L_base * (beta**s)
            delta_t_norm = torch.norm(delta_t, p=2, dim=1)
            delta_t_norm = delta_t_norm[:,:L_for_dec]
            amount_to_decimate = int(np.max([np.min([L_for_dec, max_amount_of_tokens]), min_seq_length])) # we want to control the exponential decimation, we do this by limiting the minimal sequence length
            _, not_decimated = torch.topk(delta_t_norm, amount_to_decimate, dim=1, largest=True, sorted=False)
            not_decimated, _ = torch.sort(not_decimated.squeeze()) # the indices are supposed to be sorted in ascending order, but there might be a bug as the last one is sometimes not

            # (not in their code: the margin at the cut, so that a golden case is not decided by rounding)
            srt = torch.sort(delta_t_norm[0], descending=True).values
            if amount_to_decimate < L_for_dec:
                MARGINS.append(((srt[amount_to_decimate - 1] - srt[amount_to_decimate]) / srt[amount_to_decimate - 1]).item())

    not_decimated = torch.cat([not_decimated, torch.arange(L_for_dec,L).to(not_decimated.device)]) # add response tokens to not decimated

    return not_decimated
# --- end of verbatim copy ---


def load():
    with open(os.path.join(CASE, "config.json")) as f:
        cfg = MambaConfig(**json.load(f))
    model = MambaLMHeadModel(cfg).float().eval()
    sd = torch.load(os.path.join(CASE, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    return model


@torch.no_grad()
def run_case(model, ids, layers, base, beta, min_len, resp_len):
    config = {"activate": True, "type": "max_p", "beta": beta, "min_seq_len": min_len, "L_base": base,
              "decimating_layers": layers}
    ip = InferenceParams(max_seqlen=T + NEW, max_batch_size=1)
    ip.seqlen_offset = 1  # step() from the zero state
    h, r = model.backbone.embedding(ids), None
    positions, kept = torch.arange(T), []
    for l, block in enumerate(model.backbone.layers):
        mixer = block.mixer
        hn, rn = block_mod.layer_norm_fn(h, block.norm.weight, block.norm.bias, residual=r, prenorm=True,
                                         residual_in_fp32=block.residual_in_fp32, eps=block.norm.eps,
                                         is_rms_norm=True)
        dt = mixer.in_proj(hn)[..., -mixer.nheads:]  # (1, L, H), raw
        keep = get_non_decimated_indices(dt.transpose(1, 2), mixer.dt_bias.float(), resp_len, layer_num=l,
                                         decimation_config=config)
        keep_set = set(keep.tolist())
        conv_state, ssm_state = mixer._get_states_from_cache(ip, 1)
        outs = []
        for i in range(hn.shape[1]):
            saved = ssm_state.clone()
            y, _, _ = mixer.step(hn[:, i:i + 1], conv_state, ssm_state)
            if i in keep_set:
                outs.append(y)
            else:
                ssm_state.copy_(saved)
        h, r, positions = torch.cat(outs, 1), rn[:, keep], positions[keep]
        if l in layers:
            kept.append(positions.clone())
    final = model.backbone.norm_f(h, residual=r, prenorm=False, residual_in_fp32=model.backbone.residual_in_fp32)
    logits = [model.lm_head(final[:, -1:])[0, -1].float()]
    tokens = []
    for i in range(NEW):
        tok = int(torch.argmax(logits[-1]))
        tokens.append(tok)
        ip.seqlen_offset = T + i
        logits.append(model(torch.tensor([[tok]]), inference_params=ip).logits[0, -1].float())
    return torch.stack(logits), torch.tensor(tokens, dtype=torch.int64), kept


def main():
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} mamba_ssm {mamba_ssm.__version__}")
    model = load()
    ids = torch.randint(0, 250, (1, T), generator=torch.manual_seed(IDS_SEED))
    tensors = {"input_ids": ids[0].contiguous()}
    for c, (layers, base, beta, min_len, resp_len) in enumerate(CASES):
        logits, tokens, kept = run_case(model, ids, layers, base, beta, min_len, resp_len)
        tensors[f"c{c}_logits"] = logits.contiguous()
        tensors[f"c{c}_tokens"] = tokens
        for i, k in enumerate(kept):
            tensors[f"c{c}_kept_l{i}"] = k.to(torch.int64).contiguous()
        print(f"case {c}: layers {layers} base {base} beta {beta} min {min_len} resp_len {resp_len}: kept",
              [len(k) for k in kept], "tokens", tokens.tolist())
    assert min(MARGINS) > 1e-4, MARGINS
    meta = {"recipe": f"tools/golden_decimamba_mamba2.py on tests/data/mamba2_official; ids randint(0,250,(1,{T}), "
                      f"manual_seed({IDS_SEED})); greedy {NEW}; torch {torch.__version__}, mamba_ssm "
                      f"{mamba_ssm.__version__}; DeciMamba 6290e95 get_non_decimated_indices verbatim on Mamba-2's "
                      f"per-head dt; layer-major Mamba2.step()",
            "cases": [{"layers": l, "L_base": b, "beta": be, "min_seq_len": m, "resp_len": r} for l, b, be, m, r in CASES],
            "new": NEW, "margins": MARGINS}
    save_file(tensors, os.path.join(CASE, "decimamba_ref.safetensors"), metadata={"reference": json.dumps(meta)})
    print("margins", MARGINS)


if __name__ == "__main__":
    main()
