#!/usr/bin/env python3
"""Per-position NLL reference for a tiny random Mamba-2 with the GPT-NeoX vocabulary (CPU, f32).

Writes tests/data/mamba2_neox_tiny/ (FORMATS.md §2, §8):

  config.json + model.safetensors   HF Mamba2ForCausalLM save_pretrained, weights stored bf16, tied
                                    (no lm_head.weight in the file); generation_config.json removed
  nll_ref.safetensors               input_ids i64 [T], nll f32 [T-1]; metadata: one key "reference"
                                    = sorted JSON {recipe, versions, text sha256, stats}

and regenerates tests/data/REFERENCES_ppl.md (its own file: tools/golden_mamba2.py rewrites
REFERENCES.md from the mamba2_*/ref.safetensors files only, and this case has no ref.safetensors).

Run from the repository root, in the venv WITHOUT mamba_ssm / causal_conv1d (see golden_mamba2.py):

    /root/pyref/bin/python tools/golden_ppl.py

Model: vocab rows 50288 (the NeoX tokenizer has 50277 ids; rows >= 50277 are padding), d 32, L 2,
N 16, head_dim 8, H 8, G 1, expand 2, conv 4, chunk_size 64, tie_word_embeddings true.
Recipe (golden_mamba2.py's): torch.manual_seed(1234); build the model (HF's own init); every
parameter += 0.1*N(0,1) from ONE torch.Generator seeded 42 in named_parameters() order (the tied
head appears once, as the embedding); then the embedding (= the head) is multiplied by one factor so
that its std is 0.02*sqrt(d) (=0.1131; the perturbed std is 0.1416, so the factor is ~0.80). With
RMSNorm'd final hidden states of rms ~1 the logits have std ~0.6, so NLLs sit near ln(50277)=10.8
nats (a random model cannot do better on real text) instead of being dominated by huge logits.
The model is then cast to bf16, saved, loaded back and upcast to f32: the reference is computed
on exactly the stored bf16 values.

Text: host/assets/corpus/austen_persuasion.txt, the WHOLE file tokenized with
tokenizers.Tokenizer.from_file('host/assets/20B_tokenizer.json').encode(text, add_special_tokens=False);
the first T = 12000 ids are kept.

Reference: one backbone forward over all T ids from the zero state (HF torch chunked SSD path),
logits = hidden @ embedding^T in row blocks (identical to model(ids).logits, which would be a
2.4 GB tensor; checked on the first piece), and
    nll[t-1] = logsumexp(logits[t-1, :50277]) - logits[t-1, ids[t]],  t = 1..T-1
i.e. the softmax is over the REAL vocabulary only.  The same is computed piecewise (5 pieces of
2400, each call continuing the previous call's cache) and the spreads are recorded.
torch.set_num_threads(1) so that the f32 reductions are reproducible (rerun -> identical bytes).
"""
import hashlib
import importlib.util
import json
import os
import sys

import torch

for _m in ("mamba_ssm", "causal_conv1d"):
    if importlib.util.find_spec(_m) is not None:
        sys.exit(f"{_m} is importable in this venv: transformers would use its kernels; use a venv without it")

import safetensors
import tokenizers
import transformers
from safetensors.torch import load_file, save_file
from transformers import Mamba2Config, Mamba2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_mamba2 import INIT_SEED, NOISE_SEED, perturb  # noqa: E402  (same recipe)

transformers.logging.set_verbosity_error()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
CASE = "mamba2_neox_tiny"
TEXT_REL = "host/assets/corpus/austen_persuasion.txt"
TOKENIZER_REL = "host/assets/20B_tokenizer.json"

VOCAB_ROWS, VOCAB_REAL = 50288, 50277
D, L, N, P, E, K, CHUNK, G = 32, 2, 16, 8, 2, 4, 64, 1
H = E * D // P
T, PIECES = 12000, 5
EMB_STD = 0.02 * D ** 0.5
LOGIT_BLOCK = 1000


def hf_config():
    return Mamba2Config(
        vocab_size=VOCAB_ROWS, hidden_size=D, num_hidden_layers=L, state_size=N, head_dim=P, num_heads=H,
        expand=E, conv_kernel=K, chunk_size=CHUNK, n_groups=G, tie_word_embeddings=True,
    )


def build_model():
    torch.manual_seed(INIT_SEED)
    model = Mamba2ForCausalLM(hf_config()).float().eval()
    perturb(model, NOISE_SEED)
    emb = model.backbone.embeddings.weight
    assert model.lm_head.weight.data_ptr() == emb.data_ptr(), "head not tied"
    with torch.no_grad():
        std_before = emb.std().item()
        emb.mul_(EMB_STD / std_before)
    return model, std_before


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tokenize():
    tok = tokenizers.Tokenizer.from_file(os.path.join(ROOT, TOKENIZER_REL))
    assert tok.get_vocab_size() == VOCAB_REAL, tok.get_vocab_size()
    with open(os.path.join(ROOT, TEXT_REL), encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) >= T, len(ids)
    return torch.tensor(ids[:T], dtype=torch.int64), len(ids), len(text)


def block_nll(hidden, weight, ids_next):
    """hidden [n, d] (already norm_f'd), ids_next [n]: NLL over the real vocab, plus the
    NLL one would get with the padding rows wrongly included, and max|logits|."""
    out, out_pad, mx = [], [], 0.0
    for s in range(0, hidden.shape[0], LOGIT_BLOCK):
        lg = torch.nn.functional.linear(hidden[s:s + LOGIT_BLOCK], weight)  # == lm_head (no bias)
        tgt = lg.gather(1, ids_next[s:s + LOGIT_BLOCK, None])[:, 0]
        out.append(torch.logsumexp(lg[:, :VOCAB_REAL], dim=1) - tgt)
        out_pad.append(torch.logsumexp(lg, dim=1) - tgt)
        mx = max(mx, lg[:, :VOCAB_REAL].abs().max().item())
    return torch.cat(out), torch.cat(out_pad), mx


@torch.no_grad()
def reference(model, ids):
    x = ids[None]
    w = model.lm_head.weight
    # one call from the zero state
    h_full = model.backbone(x, use_cache=False).last_hidden_state[0].float()
    # the same, piecewise, each call continuing the previous call's cache
    step = T // PIECES
    assert step * PIECES == T
    hs, cache = [], None
    for i in range(PIECES):
        o = model.backbone(x[:, i * step:(i + 1) * step], cache_params=cache, use_cache=True)
        cache = o.cache_params
        hs.append(o.last_hidden_state[0].float())
        if i == 0:  # the block-wise head equals the model's own logits
            lg_model = model(x[:, :step], use_cache=False).logits[0]
            lg_ours = torch.nn.functional.linear(o.last_hidden_state[0], w)
            head_check = (lg_model - lg_ours).abs().max().item()
    h_piece = torch.cat(hs)

    nll, nll_pad, max_logit = block_nll(h_full[:-1], w, ids[1:])
    nll_piece, _, _ = block_nll(h_piece[:-1], w, ids[1:])
    d = (nll - nll_piece).abs()
    stats = {
        "mean_nll": nll.mean().item(),
        "max_abs_nll": nll.abs().max().item(),
        "min_nll": nll.min().item(),
        "std_nll": nll.std().item(),
        "ln_vocab_real": float(torch.log(torch.tensor(float(VOCAB_REAL))).item()),
        "mean_nll_if_padding_rows_included": nll_pad.mean().item(),
        "max_abs_nll_change_if_padding_rows_included": (nll_pad - nll).abs().max().item(),
        "max_abs_logits": max_logit,
        "one_call_vs_piecewise_max_abs_nll": d.max().item(),
        "one_call_vs_piecewise_mean_abs_nll": d.mean().item(),
        "one_call_vs_piecewise_mean_nll": abs(nll.mean().item() - nll_piece.mean().item()),
        "one_call_vs_piecewise_max_abs_hidden": (h_full - h_piece).abs().max().item(),
        "blockwise_head_vs_model_logits_max_abs": head_check,
        "nll_first5": [round(v, 6) for v in nll[:5].tolist()],
        "ids_first16": ids[:16].tolist(),
    }
    return nll, stats


def write_md(meta, case_dir):
    s = meta["stats"]
    files = sorted(os.listdir(case_dir))
    sizes = ", ".join(f"`{f}` {os.path.getsize(os.path.join(case_dir, f)):,} B" for f in files)
    lines = [
        "# Perplexity reference (`tests/data/mamba2_neox_tiny/`)",
        "",
        "Generated by `tools/golden_ppl.py` (it rewrites this file; `tools/golden_mamba2.py` owns `REFERENCES.md`).",
        "Run: `/root/pyref/bin/python tools/golden_ppl.py` from the repository root, in the venv without mamba_ssm.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["versions"].items())) + ". CPU, f32 compute, 1 thread.",
        "",
        f"- Files: {sizes}.",
        f"- Model: {meta['recipe']}",
        f"- Text: `{meta['text']}` (sha256 `{meta['text_sha256']}`, {meta['text_chars']:,} chars, "
        f"{meta['text_tokens']:,} tokens with `{meta['tokenizer']}` (sha256 `{meta['tokenizer_sha256']}`), "
        f"`encode(text, add_special_tokens=False)`); the first {meta['T']:,} ids are `input_ids` (i64 [{meta['T']}]); "
        f"`input_ids[:16]` = `{s['ids_first16']}`.",
        f"- `nll` (f32 [{meta['T'] - 1}]): `nll[t-1] = logsumexp(logits[t-1, :{VOCAB_REAL}]) - logits[t-1, ids[t]]`, "
        f"t = 1..{meta['T'] - 1}; logits from one full forward from the zero state. Rows >= {VOCAB_REAL} are padding and "
        "are not in the softmax.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| mean NLL (nats) | {s['mean_nll']:.6f} (ln {VOCAB_REAL} = {s['ln_vocab_real']:.4f}) |",
        f"| max\\|nll\\| / min nll / std | {s['max_abs_nll']:.4f} / {s['min_nll']:.4f} / {s['std_nll']:.4f} |",
        f"| max\\|logits\\| (real vocab) | {s['max_abs_logits']:.4f} |",
        f"| padding rows (wrongly) in the softmax: mean NLL / max\\|Δnll\\| | {s['mean_nll_if_padding_rows_included']:.6f} / "
        f"{s['max_abs_nll_change_if_padding_rows_included']:.3g} (below the 1e-3 per-position bound: check the mean tightly) |",
        f"| one call vs {meta['pieces']} pieces of {meta['T'] // meta['pieces']} (cache continued): max\\|Δnll\\| | "
        f"{s['one_call_vs_piecewise_max_abs_nll']:.3g} |",
        f"| same: mean\\|Δnll\\| / \\|Δ mean NLL\\| / max\\|Δ hidden\\| | {s['one_call_vs_piecewise_mean_abs_nll']:.3g} / "
        f"{s['one_call_vs_piecewise_mean_nll']:.3g} / {s['one_call_vs_piecewise_max_abs_hidden']:.3g} |",
        f"| block-wise head vs `model(ids).logits` (first piece) | {s['blockwise_head_vs_model_logits_max_abs']:.3g} |",
        f"| nll[:5] | `{s['nll_first5']}` |",
        "",
        "FORMATS.md §8 bound for per-position NLL vs a reference (f32 compute): max abs ≤ 1e-3 nats.",
        "",
    ]
    path = os.path.join(DATA, "REFERENCES_ppl.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


def main():
    torch.set_num_threads(1)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}
    print(" ".join(f"{k} {v}" for k, v in versions.items()))
    case_dir = os.path.join(DATA, CASE)
    os.makedirs(case_dir, exist_ok=True)

    model, std_before = build_model()
    model.to(torch.bfloat16).save_pretrained(case_dir)
    gen_cfg = os.path.join(case_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    loaded = Mamba2ForCausalLM.from_pretrained(case_dir)
    assert next(loaded.parameters()).dtype == torch.bfloat16, next(loaded.parameters()).dtype
    model = loaded.float().eval()
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    sd = load_file(os.path.join(case_dir, "model.safetensors"))
    assert "lm_head.weight" not in sd, sorted(sd)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    msd = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(v.float(), msd[k]), k
    assert tuple(sd["backbone.embeddings.weight"].shape) == (VOCAB_ROWS, D)

    ids, n_tokens, n_chars = tokenize()
    nll, stats = reference(model, ids)
    stats["embedding_std_before_scaling"] = std_before
    stats["embedding_std_stored_bf16"] = sd["backbone.embeddings.weight"].float().std().item()

    recipe = (f"HF Mamba2ForCausalLM rows {VOCAB_ROWS} (real vocab {VOCAB_REAL}) d{D} L{L} N{N} P{P} H{H} G{G} E{E} "
              f"k{K} chunk{CHUNK}, tied; torch.manual_seed({INIT_SEED}) init, +0.1*N(0,1) Generator({NOISE_SEED}) "
              f"named_parameters order, then embedding scaled to std 0.02*sqrt({D}) = {EMB_STD:.6f}; "
              "weights stored bf16, reference on the bf16 values upcast to f32")
    meta = {
        "recipe": recipe, "versions": versions, "T": T, "pieces": PIECES,
        "text": TEXT_REL, "text_sha256": sha256(os.path.join(ROOT, TEXT_REL)), "text_chars": n_chars,
        "text_tokens": n_tokens, "tokenizer": TOKENIZER_REL,
        "tokenizer_sha256": sha256(os.path.join(ROOT, TOKENIZER_REL)), "vocab_real": VOCAB_REAL,
        "nll_formula": f"nll[t-1] = logsumexp(logits[t-1,:{VOCAB_REAL}]) - logits[t-1,ids[t]], t=1..T-1",
        "stats": stats,
    }
    # ONE metadata key holding sorted JSON (multi-key metadata is written in hash order)
    save_file({"input_ids": ids.contiguous(), "nll": nll.float().contiguous()},
              os.path.join(case_dir, "nll_ref.safetensors"),
              metadata={"reference": json.dumps(meta, sort_keys=True)})

    print(f"[{CASE}] text tokens {n_tokens}, kept {T}")
    for k, v in stats.items():
        print(f"  {k}: {v}")
    for f in sorted(os.listdir(case_dir)):
        print(f"  {f}: {os.path.getsize(os.path.join(case_dir, f)):,} B")
    write_md(meta, case_dir)


if __name__ == "__main__":
    main()
