#!/usr/bin/env python3
"""Golden reference tensors for Mamba-2 from HF transformers' pure-torch path (CPU, f32).

Writes, under tests/data/ (FORMATS.md §2, §8):

  mamba2_hf_g1_untied/  n_groups 1, tie_word_embeddings false, f32 weights
  mamba2_hf_g2_tied/    n_groups 2, tied (no lm_head.weight in the file), f32 weights
  mamba2_hf_bf16/       the g1_untied model stored as bf16; references computed on
                        those bf16 values upcast to f32 (loaded back, then .float())

each holding config.json + model.safetensors (HF save_pretrained) + ref.safetensors, and
regenerates tests/data/REFERENCES.md from the ref.safetensors metadata of every case dir
(including mamba2_official/, which tools/golden_mamba2_official.py writes).

Run from the repository root, in a venv WITHOUT mamba_ssm / causal_conv1d installed
(if either is importable transformers picks their Triton/CUDA kernels and fails on CPU):

    /root/pyref/bin/python tools/golden_mamba2.py

Versions: tools/requirements.txt (torch 2.15.0, transformers 5.23.0, safetensors 0.8.0).

Tiny config (FORMATS §8): vocab 256, d 64, L 2, d_state 16, head_dim 16 (H 8), expand 2,
conv 4, chunk_size 16.  Recipe: torch.manual_seed(1234); build the model (HF's own init);
then every parameter += 0.1*N(0,1) drawn from ONE torch.Generator seeded 42, in
model.named_parameters() order (tied lm_head appears once, as the embedding).
ids = torch.randint(0, 256, (1, 61), generator=torch.manual_seed(7)), drawn after the
model is built.  T = 61 is deliberately not a multiple of the chunk size 16.
torch.set_num_threads(1) so that the f32 reductions are reproducible.

ref.safetensors (all f32 except input_ids):
  input_ids        i64 [1, T]
  logits           [T, V]  model(ids).logits, one full-sequence (chunked SSD) call
  logits_stepwise  [T, V]  one token per call, carrying the cache
                           (first call without a cache, then cache_params=out.cache_params)
  logits_split     [T, V]  prefill ids[:, :40] (chunked), then ids[:, 40:] (21 tokens) as ONE
                           multi-token call continuing from that cache (chunked with initial state)
  ssm_state        [L, H, P, N]   final SSM state after all T tokens, from the full run's cache
  conv_state       [L, conv_dim, k] final conv state from the full run's cache
metadata: one key "reference" = JSON {recipe, T, split, stats}: the spreads (max|logits|, max|full-stepwise|, max|full-split|, state
spreads) and the logits[0,:5] fingerprint.

HF cache convention (transformers 5.23, checked by assertions below): out.cache_params is a
DynamicCache whose layers are LinearAttentionLayer; cache.get_recurrent_state(l) is [B, H, P, N]
(the state S[h,p,n] of FORMATS §2.3 step 6) and cache.get_conv_state(l) is [B, conv_dim, k]:
the last k PRE-conv inputs xBC (the in_proj slice [di : di+conv_dim]), oldest first, newest at
index k-1, zero-padded on the left when fewer than k tokens have been seen.  mamba_ssm keeps
the same [B, conv_dim, k] layout (roll left, write the newest at -1).  Only the last k-1
columns are needed for the next step; column 0 is the oldest input, already out of reach.
"""
import argparse
import glob
import json
import os
import sys

import torch

if any(m in sys.modules for m in ("mamba_ssm", "causal_conv1d")):
    sys.exit("run in a process without mamba_ssm/causal_conv1d")
import importlib.util

for _m in ("mamba_ssm", "causal_conv1d"):
    if importlib.util.find_spec(_m) is not None:
        sys.exit(f"{_m} is importable in this venv: transformers would use its kernels; use a venv without it")

import safetensors
import transformers
from safetensors.torch import load_file, save_file
from transformers import Mamba2Config, Mamba2ForCausalLM

transformers.logging.set_verbosity_error()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

VOCAB, D, L, N, P, E, K, CHUNK = 256, 64, 2, 16, 16, 2, 4, 16
H = E * D // P
T, SPLIT = 61, 40
INIT_SEED, NOISE_SEED, IDS_SEED = 1234, 42, 7


def hf_config(n_groups, tied, vocab=VOCAB):
    return Mamba2Config(
        vocab_size=vocab, hidden_size=D, num_hidden_layers=L, state_size=N, head_dim=P, num_heads=H,
        expand=E, conv_kernel=K, chunk_size=CHUNK, n_groups=n_groups, tie_word_embeddings=tied,
    )


def perturb(model, seed=NOISE_SEED):
    """every parameter += 0.1*N(0,1), one generator, named_parameters() order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def make_ids(t=T):
    return torch.randint(0, VOCAB, (1, t), generator=torch.manual_seed(IDS_SEED))


def build_hf(n_groups, tied):
    torch.manual_seed(INIT_SEED)
    model = Mamba2ForCausalLM(hf_config(n_groups, tied)).float().eval()
    perturb(model)
    return model


def cache_states(cache, n_layers, conv_dim):
    ssm, conv = [], []
    for l in range(n_layers):
        s = cache.get_recurrent_state(l, state_idx=0)
        c = cache.get_conv_state(l, state_idx=0)
        assert tuple(s.shape) == (1, H, P, N), s.shape
        assert tuple(c.shape) == (1, conv_dim, K), c.shape
        ssm.append(s[0].float().clone())
        conv.append(c[0].float().clone())
    return torch.stack(ssm), torch.stack(conv)


@torch.no_grad()
def hf_reference(model, ids, split=SPLIT):
    """All HF-side references for one model: returns (tensors, stats)."""
    cfg = model.config
    di = cfg.expand * cfg.hidden_size
    conv_dim = di + 2 * cfg.n_groups * cfg.state_size
    t = ids.shape[1]

    logits_nocache = model(ids, use_cache=False).logits[0].float()
    out = model(ids, use_cache=True)
    logits = out.logits[0].float()
    ssm_full, conv_full = cache_states(out.cache_params, cfg.num_hidden_layers, conv_dim)

    # conv state convention check: last K pre-conv inputs of layer 0, oldest first
    blk = model.backbone.layers[0]
    xbc = blk.mixer.in_proj(blk.norm(model.backbone.embeddings(ids)))[0, :, di:di + conv_dim]
    assert torch.equal(conv_full[0], xbc[-K:].T.float()), "conv_state is not the last k pre-conv inputs"

    steps, cache = [], None
    for i in range(t):
        o = model(ids[:, i:i + 1], cache_params=cache, use_cache=True)
        cache = o.cache_params
        steps.append(o.logits[0, -1].float())
    logits_step = torch.stack(steps)
    ssm_step, conv_step = cache_states(cache, cfg.num_hidden_layers, conv_dim)

    o1 = model(ids[:, :split], use_cache=True)
    o2 = model(ids[:, split:], cache_params=o1.cache_params, use_cache=True)
    logits_split = torch.cat([o1.logits[0], o2.logits[0]]).float()
    ssm_split, conv_split = cache_states(o2.cache_params, cfg.num_hidden_layers, conv_dim)

    mx = lambda a, b: (a - b).abs().max().item()
    stats = {
        "max_abs_logits": logits.abs().max().item(),
        "full_vs_stepwise": mx(logits, logits_step),
        "full_vs_split": mx(logits, logits_split),
        "full_cache_vs_nocache": mx(logits, logits_nocache),
        "ssm_state_max_abs": ssm_full.abs().max().item(),
        "ssm_state_full_vs_stepwise": mx(ssm_full, ssm_step),
        "ssm_state_full_vs_split": mx(ssm_full, ssm_split),
        "conv_state_full_vs_stepwise": mx(conv_full, conv_step),
        "conv_state_full_vs_split": mx(conv_full, conv_split),
        "fingerprint": [round(x, 8) for x in logits[0, :5].tolist()],
    }
    tensors = {
        "input_ids": ids.to(torch.int64).contiguous(),
        "logits": logits.contiguous(),
        "logits_stepwise": logits_step.contiguous(),
        "logits_split": logits_split.contiguous(),
        "ssm_state": ssm_full.contiguous(),
        "conv_state": conv_full.contiguous(),
    }
    return tensors, stats


def recipe_text(extra=""):
    return (f"tiny Mamba-2 V{VOCAB} d{D} L{L} N{N} P{P} H{H} E{E} k{K} chunk{CHUNK}; "
            f"torch.manual_seed({INIT_SEED}) init, +0.1*N(0,1) Generator({NOISE_SEED}) named_parameters order; "
            f"ids randint(0,{VOCAB},(1,{T}), manual_seed({IDS_SEED})); split {SPLIT}+{T - SPLIT}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}" + extra)


def write_ref(case_dir, tensors, stats, recipe):
    save_file(tensors, os.path.join(case_dir, "ref.safetensors"), metadata=ref_metadata(recipe, stats))


def ref_metadata(recipe, stats):
    """ONE metadata key holding sorted JSON: safetensors writes multi-key metadata in hash order,
    which would make regenerated files differ byte-wise."""
    return {"reference": json.dumps({"recipe": recipe, "T": T, "split": SPLIT, "stats": stats}, sort_keys=True)}


def read_ref_metadata(path):
    with safetensors.safe_open(path, "pt") as f:
        return json.loads(f.metadata()["reference"])


def print_stats(name, stats):
    print(f"[{name}]")
    for k, v in stats.items():
        print(f"  {k}: {v}")


def write_references():
    """Regenerate tests/data/REFERENCES.md from every case's ref.safetensors metadata."""
    rows = []
    for path in sorted(glob.glob(os.path.join(DATA, "mamba2_*", "ref.safetensors"))):
        meta = read_ref_metadata(path)
        case = os.path.basename(os.path.dirname(path))
        size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(os.path.dirname(path), "*")))
        rows.append((case, meta["stats"], meta["recipe"], size))
    lines = [
        "# Golden references (`tests/data/`)",
        "",
        "Generated by `tools/golden_mamba2.py` (HF cases; it rewrites this file) and `tools/golden_mamba2_official.py`",
        "(mamba_ssm case); tokenizer vectors by `tools/golden_tokenizer.py`. Versions: `tools/requirements.txt`. CPU, f32 compute.",
        "Spreads are max|Δ| between two official paths on the same weights (`logits` = full-sequence chunked forward;",
        "`stepwise` = one token per call with the cache; `split` = 40-token prefill then one 21-token call from the cache).",
        "For `mamba2_official`, `logits`/`logits_split` come from HF on the renamed weights, `logits_stepwise` and the",
        "states from mamba_ssm's pure-torch `Mamba2.step()`.",
        "",
        "| case | max\\|logits\\| | max\\|full − stepwise\\| | max\\|full − split\\| | ssm state: full vs stepwise / split | logits[0,:5] | dir bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, s, _, size in rows:
        lines.append(
            f"| `{case}` | {s['max_abs_logits']:.4f} | {s['full_vs_stepwise']:.3g} | {s['full_vs_split']:.3g} | "
            f"{s['ssm_state_full_vs_stepwise']:.3g} / {s['ssm_state_full_vs_split']:.3g} | "
            f"`{s['fingerprint']}` | {size:,} |")
    extra = [(c, s) for c, s, _, _ in rows if "hf_full_vs_official_stepwise" in s]
    if extra:
        lines += ["", "Official case, HF vs mamba_ssm:", ""]
        for c, s in extra:
            for k in ("hf_full_vs_official_stepwise", "hf_stepwise_vs_official_stepwise",
                      "ssm_state_hf_full_vs_official_stepwise", "conv_state_hf_full_vs_official_stepwise"):
                lines.append(f"- `{c}` {k}: {s[k]:.3g}")
            if "fingerprint_official_stepwise" in s:
                lines.append(f"- `{c}` mamba_ssm step() logits[0,:5]: `{s['fingerprint_official_stepwise']}`")
    lines += ["", "The HF g1/g2 `logits[0,:5]` and the official mamba_ssm step() `logits[0,:5]` equal the FORMATS.md §8",
              "fingerprints (init seed 1234 is what reproduces them).", "",
              "Recipes (from each file's metadata):", ""]
    for case, _, recipe, _ in rows:
        lines.append(f"- `{case}`: {recipe}")
    lines += ["", "`tokenizer_neox.json`: `[{\"text\", \"ids\"}]`, `tokenizers` `encode(text, add_special_tokens=False)` with",
              "`20B_tokenizer.json` (also copied to `host/assets/`).", ""]
    with open(os.path.join(DATA, "REFERENCES.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {os.path.join(DATA, 'REFERENCES.md')}")


def case_hf(name, n_groups, tied, bf16=False):
    case_dir = os.path.join(DATA, name)
    os.makedirs(case_dir, exist_ok=True)
    model = build_hf(n_groups, tied)
    ids = make_ids()
    if bf16:
        model.to(torch.bfloat16).save_pretrained(case_dir)
        loaded = Mamba2ForCausalLM.from_pretrained(case_dir)
        assert next(loaded.parameters()).dtype == torch.bfloat16, next(loaded.parameters()).dtype
        model = loaded.float().eval()
        extra = "; weights stored bf16, reference on bf16 values upcast to f32"
    else:
        model.save_pretrained(case_dir)
        extra = ""
    gen_cfg = os.path.join(case_dir, "generation_config.json")
    if os.path.exists(gen_cfg):  # not needed by stuffed; keep the dir to config.json + model.safetensors
        os.remove(gen_cfg)
    # the saved file must reproduce the model exactly
    sd = load_file(os.path.join(case_dir, "model.safetensors"))
    assert ("lm_head.weight" in sd) == (not tied), sorted(sd)
    for k, v in sd.items():
        assert torch.equal(v.float(), model.state_dict()[k].float()), k
    tensors, stats = hf_reference(model, ids)
    write_ref(case_dir, tensors, stats, recipe_text(f"; n_groups {n_groups}, tied {tied}" + extra))
    print_stats(name, stats)
    print("  shapes:", {k: tuple(v.shape) for k, v in tensors.items()})


@torch.no_grad()
def official_hf_pass(official_dir, out_path):
    """Load an official (mamba_ssm) checkpoint into HF (embedding.->embeddings.) and write
    HF's full / stepwise / split references for it to out_path (used by golden_mamba2_official.py)."""
    with open(os.path.join(official_dir, "config.json")) as f:
        oc = json.load(f)
    ssm = oc["ssm_cfg"]
    assert ssm.get("layer") == "Mamba2"
    sd = torch.load(os.path.join(official_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
    rows, d = sd["backbone.embeddings.weight"].shape
    cfg = Mamba2Config(
        vocab_size=rows, hidden_size=d, num_hidden_layers=oc["n_layer"], state_size=ssm["d_state"],
        head_dim=ssm["headdim"], num_heads=ssm.get("expand", 2) * d // ssm["headdim"], expand=ssm.get("expand", 2),
        conv_kernel=ssm.get("d_conv", 4), chunk_size=ssm["chunk_size"], n_groups=ssm.get("ngroups", 1),
        tie_word_embeddings=oc["tie_embeddings"],
    )
    model = Mamba2ForCausalLM(cfg).float().eval()
    res = model.load_state_dict(sd, strict=True)
    print(f"official -> HF load: missing={list(res.missing_keys)} unexpected={list(res.unexpected_keys)}")
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    ids = load_file(os.path.join(official_dir, "official_step.safetensors"))["input_ids"]
    tensors, stats = hf_reference(model, ids)
    save_file(tensors, out_path, metadata=ref_metadata(recipe_text(), stats))
    print_stats("official weights in HF", stats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-hf", nargs=2, metavar=("OFFICIAL_DIR", "OUT"),
                    help="(internal, called by golden_mamba2_official.py) HF references for official weights")
    ap.add_argument("--references-only", action="store_true", help="only regenerate tests/data/REFERENCES.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} transformers {transformers.__version__} safetensors {safetensors.__version__}")
    if args.official_hf:
        official_hf_pass(*args.official_hf)
        return
    if not args.references_only:
        case_hf("mamba2_hf_g1_untied", 1, False)
        case_hf("mamba2_hf_g2_tied", 2, True)
        case_hf("mamba2_hf_bf16", 1, False, bf16=True)
    write_references()


if __name__ == "__main__":
    main()
