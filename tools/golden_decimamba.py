#!/usr/bin/env python3
"""Golden references for DeciMamba (Ben-Kish et al., ICLR 2025) on the tiny official Mamba-1 and Mamba-2.

DeciMamba's code (github:assafbk/DeciMamba 6290e95) is a fork of mamba_ssm 1.x whose kernels need CUDA;
its decimation is plain torch. On mamba_ssm 2.3.2.post1's pure-torch paths (the stubs of
tools/golden_mamba1_official.py and tools/golden_mamba2_official.py, imported for them):

Mamba-1 (their code) -> tests/data/mamba1_official/decimamba_ref.safetensors
  - `get_non_decimated_indices` copied verbatim (selective_scan_interface.py L21-56, type 'max_p');
  - `Mamba.forward` = their slow path (mamba_simple.py L123-236, the one `generate` takes with an
    InferenceParams cache): conv over every token (the conv state from all of them), x_proj and
    dt_proj, then the kept indices, the scan (selective_scan_ref, last state into the cache) and
    out_proj over the kept tokens only;
  - `MixerModel.forward` subsamples the residual after each layer (mixer_seq_simple.py L195-205);
  - `Mamba.step` (decoding) untouched: no decimation after the prompt.
  Their `generate` prefills with num_last_tokens=1 (resp_len 1: the prompt's last token is always
  kept) and then decodes token by token; so does this script, greedily (one case keeps the last 5
  tokens, as their perplexity test's num_last_tokens does).

Mamba-2 (their rule on its per-head Δ; their code is Mamba-1 only) -> tests/data/mamba2_official/
decimamba_ref.safetensors. mamba_ssm's multi-token Mamba-2 path is Triton-only, so the model runs
layer by layer with the pure-torch `Mamba2.step()`:
  - per layer, every token's normed input (the block's add+RMSNorm), its raw dt from in_proj, and
    the kept indices from the same `get_non_decimated_indices` over dt of shape (1, nheads, L);
  - then `step()` over every token in order; a dropped token's step runs (its conv state advances:
    the conv reads it, as theirs) and its SSM state is put back, its output and residual dropped;
  - the final norm over the kept rows; the last one's logits; then greedy decoding through the
    whole model's `step()` (no decimation after the prompt, as their `generate`).

Each file: input_ids (T,); per case c: c{c}_logits (1 + NEW, rows): the prompt's last logits, then each
greedy step's; c{c}_tokens (NEW,); c{c}_kept_l{i}: original positions of the tokens leaving the i-th
decimating layer (the kept last tokens included); metadata: the cases and the norm margins at each
cut (K-th vs (K+1)-th largest, > 1e-4 so that no case is decided by rounding).

    /tmp/tv/bin/python tools/golden_decimamba.py   (torch, einops, transformers; mamba_ssm --no-deps)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_mamba1_official  # noqa: E402,F401  (its stubs: Mamba-1's torch paths)
import golden_mamba2_official  # noqa: E402,F401  (its stubs: Mamba-2's torch step(), gated norm)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

import mamba_ssm  # noqa: E402
import mamba_ssm.models.mixer_seq_simple as mixer_seq_simple  # noqa: E402
import mamba_ssm.modules.block as block_mod  # noqa: E402
import mamba_ssm.modules.mamba_simple as simple_mod  # noqa: E402
from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: E402
from mamba_ssm.utils.generation import InferenceParams  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, NEW = 300, 8
# Per family: its case dir and the ids' seed (one whose cuts have margins).
FAMILIES = {"mamba1": ("mamba1_official", 16), "mamba2": ("mamba2_official", 7)}
# (decimating layers, L_base, beta, min_seq_len, resp_len): one cut; both layers; min_seq_len above
# L_base·β^s; the last 5 tokens kept (their num_last_tokens = resp_len; `generate` uses 1).
CASES = [([0], 100, 0.5, 20, 1), ([0, 1], 120, 0.5, 20, 1), ([1], 8, 0.5, 30, 1), ([0], 60, 0.5, 20, 5)]
DECIMATION = {}


# --- verbatim from DeciMamba mamba_ssm/ops/selective_scan_interface.py L21-56 ---
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
                DECIMATION.setdefault("margins", []).append(
                    ((srt[amount_to_decimate - 1] - srt[amount_to_decimate]) / srt[amount_to_decimate - 1]).item())

    not_decimated = torch.cat([not_decimated, torch.arange(L_for_dec,L).to(not_decimated.device)]) # add response tokens to not decimated

    return not_decimated
# --- end of verbatim copy ---


def mamba_forward(self, hidden_states, inference_params=None, resp_len=None, **kw):
    """DeciMamba's `Mamba.forward` slow path (mamba_simple.py L123-236), on mamba_ssm 2.3.2's module."""
    batch, seqlen, dim = hidden_states.shape
    conv_state, ssm_state = None, None
    if inference_params is not None:
        conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
        if inference_params.seqlen_offset > 0:
            out, _, _ = self.step(hidden_states, conv_state, ssm_state)
            self.not_decimated = None
            return out
    xz = rearrange(self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l", l=seqlen)
    if self.in_proj.bias is not None:
        xz = xz + rearrange(self.in_proj.bias.to(dtype=xz.dtype), "d -> d 1")
    A = -torch.exp(self.A_log.float())
    x, z = xz.chunk(2, dim=1)
    if conv_state is not None:
        conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0)))
    x = self.act(self.conv1d(x)[..., :seqlen])
    x_dbl = self.x_proj(rearrange(x, "b d l -> (b l) d"))
    dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
    dt = self.dt_proj.weight @ dt.t()
    dt = rearrange(dt, "d (b l) -> b d l", l=seqlen)
    B = rearrange(B, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
    C = rearrange(C, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
    not_decimated = get_non_decimated_indices(dt, self.dt_proj.bias.float().detach().clone(), resp_len,
                                              layer_num=self.layer_idx, decimation_config=DECIMATION["config"])
    dt = dt[:, :, not_decimated]
    B = B[:, :, not_decimated]
    C = C[:, :, not_decimated]
    x = x[:, :, not_decimated]
    dec_z = z[:, :, not_decimated]
    y = selective_scan_ref(x, dt, A, B, C, self.D.float(), z=dec_z, delta_bias=self.dt_proj.bias.float(),
                           delta_softplus=True, return_last_state=ssm_state is not None)
    if ssm_state is not None:
        y, last_state = y
        ssm_state.copy_(last_state)
    y = rearrange(y, "b d l -> b l d")
    self.not_decimated = not_decimated
    return self.out_proj(y)


def mixer_forward(self, input_ids, inference_params=None, **mixer_kwargs):
    """DeciMamba's `MixerModel.forward` (mixer_seq_simple.py L195-219): the residual follows the cut."""
    hidden_states = self.embedding(input_ids)
    residual = None
    for layer in self.layers:
        hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        nd = getattr(layer.mixer, "not_decimated", None)
        if nd is not None:
            residual = residual[:, nd, :]
    return self.norm_f(hidden_states, residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32)


simple_mod.Mamba.forward = mamba_forward
mixer_seq_simple.MixerModel.forward = mixer_forward


def load(case):
    with open(os.path.join(ROOT, "tests", "data", case, "config.json")) as f:
        cfg = MambaConfig(**json.load(f))
    model = MambaLMHeadModel(cfg).float().eval()
    sd = torch.load(os.path.join(ROOT, "tests", "data", case, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    return model


def greedy(model, ip, logits):
    """Greedy decoding from the prompt's last logits through the whole model's step()."""
    tokens = []
    for i in range(NEW):
        tok = int(torch.argmax(logits[-1]))
        tokens.append(tok)
        ip.seqlen_offset = T + i
        logits.append(model(torch.tensor([[tok]]), inference_params=ip).logits[0, -1].float())
    return torch.stack(logits), torch.tensor(tokens, dtype=torch.int64)


def config(layers, base, beta, min_len):
    return {"activate": True, "type": "max_p", "beta": beta, "min_seq_len": min_len, "L_base": base,
            "decimating_layers": layers}


@torch.no_grad()
def run_case_mamba1(model, ids, layers, base, beta, min_len, resp_len):
    DECIMATION["config"] = config(layers, base, beta, min_len)
    ip = InferenceParams(max_seqlen=T + NEW, max_batch_size=1)
    out = model.backbone(ids, inference_params=ip, resp_len=resp_len)
    positions = torch.arange(T)
    kept = []
    for l, layer in enumerate(model.backbone.layers):
        positions = positions[layer.mixer.not_decimated]
        if l in layers:
            kept.append(positions.clone())
    logits, tokens = greedy(model, ip, [model.lm_head(out[:, -1:])[0, -1].float()])
    return logits, tokens, kept


@torch.no_grad()
def run_case_mamba2(model, ids, layers, base, beta, min_len, resp_len):
    cfg = config(layers, base, beta, min_len)
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
                                         decimation_config=cfg)
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
    logits, tokens = greedy(model, ip, [model.lm_head(final[:, -1:])[0, -1].float()])
    return logits, tokens, kept


def main():
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} mamba_ssm {mamba_ssm.__version__}")
    for family, (case, seed) in FAMILIES.items():
        model = load(case)
        run_case = run_case_mamba1 if family == "mamba1" else run_case_mamba2
        ids = torch.randint(0, 250, (1, T), generator=torch.manual_seed(seed))
        tensors = {"input_ids": ids[0].contiguous()}
        DECIMATION["margins"] = []
        for c, (layers, base, beta, min_len, resp_len) in enumerate(CASES):
            logits, tokens, kept = run_case(model, ids, layers, base, beta, min_len, resp_len)
            tensors[f"c{c}_logits"] = logits.contiguous()
            tensors[f"c{c}_tokens"] = tokens
            for i, k in enumerate(kept):
                tensors[f"c{c}_kept_l{i}"] = k.to(torch.int64).contiguous()
            print(f"{family} case {c}: layers {layers} base {base} beta {beta} min {min_len} resp_len {resp_len}: "
                  f"kept {[len(k) for k in kept]} tokens {tokens.tolist()}")
        margins = DECIMATION["margins"]
        assert min(margins) > 1e-4, margins
        how = ("their decimating Mamba.forward" if family == "mamba1"
               else "their rule on Mamba-2's per-head dt; layer-major Mamba2.step()")
        meta = {"recipe": f"tools/golden_decimamba.py on tests/data/{case}; ids randint(0,250,(1,{T}), "
                          f"manual_seed({seed})); greedy {NEW}; torch {torch.__version__}, mamba_ssm "
                          f"{mamba_ssm.__version__}; DeciMamba 6290e95 get_non_decimated_indices verbatim; {how}",
                "cases": [{"layers": l, "L_base": b, "beta": be, "min_seq_len": m, "resp_len": r}
                          for l, b, be, m, r in CASES],
                "new": NEW, "margins": margins}
        out = os.path.join(ROOT, "tests", "data", case, "decimamba_ref.safetensors")
        save_file(tensors, out, metadata={"reference": json.dumps(meta)})
        print(family, "margins", margins)


if __name__ == "__main__":
    main()
