"""Peers on the workload of `stuffed bench --device cuda` (issue 8), side by side in one run.

Workload: streamed NLL over N random tokens (seeded) in chunks of T, Mamba-2 at a published shape
(synth preset: 130m, 370m, 780m, 1.3b, 2.7b) with seeded random bf16 weights; plus greedy decode
ms/token at batch 1. Peers:
  - mamba_ssm (Triton/CUDA kernels, MambaLMHeadModel with a Mamba2 layer config); decode through its
    `generate(..., cg=True)` (CUDA graphs);
  - HF transformers Mamba2ForCausalLM (it uses mamba_ssm's kernels when they are installed).
Neither peer can prefill a chunk from a carried state at the model level, so their chunks run from
the zero state (same FLOPs, no state carry); stuffed carries the state across chunks. Peak memory is
torch.cuda.max_memory_allocated. `--stuffed BIN` runs `BIN bench --device cuda` in the same call.

On the GPU machine (torch and triton are installed there; mamba_ssm and causal_conv1d come as the cp312
wheels in ../shared/wheels, carried along):
  python3 -m pip install --no-deps --target /tmp/site wheels/*.whl; export PYTHONPATH=/tmp/site
  python3 tools/bench_peers.py --preset 2.7b --tokens 1m --chunk 8192 --stuffed .gpu/stuffed --out peers.json
`--device cpu --peers hf --preset tiny` runs the HF path on a CPU (a smoke test of this script).
"""
import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# (d_model, n_layer, d_state, head_dim), as host/src/synth.rs's MAMBA2_PRESETS.
PRESETS = {"tiny": (64, 2, 16, 16), "130m": (768, 24, 128, 64), "370m": (1024, 48, 128, 64),
           "780m": (1536, 48, 128, 64), "1.3b": (2048, 48, 128, 64), "2.7b": (2560, 64, 128, 64)}
VOCAB = 50288


def parse_tokens(s):
    s = s.lower()
    mul = {"k": 1 << 10, "m": 1 << 20}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mul)


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def make_hf(preset, dev):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    d, n_layer, n, p = PRESETS[preset]
    cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=n_layer, state_size=n, head_dim=p,
                       num_heads=2 * d // p, expand=2, n_groups=1, conv_kernel=4, chunk_size=256,
                       tie_word_embeddings=True)
    return Mamba2ForCausalLM(cfg).to(dev, torch.bfloat16).eval()


def make_mamba_ssm(preset, dev):
    # The shipped wheel is pure Python: no `selective_scan_cuda` (Mamba-1 only), which its import wants.
    import types
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    d, n_layer, n, p = PRESETS[preset]
    cfg = MambaConfig(d_model=d, n_layer=n_layer, vocab_size=VOCAB, pad_vocab_size_multiple=16,
                      ssm_cfg={"layer": "Mamba2", "d_state": n, "headdim": p}, rms_norm=True,
                      residual_in_fp32=True, fused_add_norm=True, tie_embeddings=True)
    return MambaLMHeadModel(cfg, device=dev, dtype=torch.bfloat16).eval()


@torch.no_grad()
def stream_nll(model, tokens, chunk, dev, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, chunk + 1), generator=g).to(dev)
    model(ids[:, :-1])  # warm-up (autotuning, graph caches)
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    done, total, t0 = 0, 0.0, time.time()
    while done < tokens:
        t = min(chunk, tokens - done)
        x = ids[:, : t + 1]
        logits = model(x[:, :-1]).logits
        total += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        done += t
    sync(dev)
    secs = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "mean_nll": total / tokens,
            "peak_gpu_bytes": peak, "chunk": chunk, "state_carried": False}


@torch.no_grad()
def decode_ms(model, dev, steps, peer):
    ids = torch.randint(0, VOCAB, (1, 16)).to(dev)
    if peer == "mamba_ssm":
        gen = lambda: model.generate(ids, max_length=16 + steps, cg=True)  # noqa: E731
    else:
        gen = lambda: model.generate(ids, max_new_tokens=steps, do_sample=False)  # noqa: E731
    gen()  # warm-up (graph capture)
    sync(dev)
    t0 = time.time()
    gen()
    sync(dev)
    return (time.time() - t0) * 1e3 / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="130m", choices=sorted(PRESETS))
    ap.add_argument("--tokens", default="1m")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--peers", default="mamba_ssm,hf")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stuffed", help="a stuffed binary built with --features cuda, run in the same call")
    ap.add_argument("--out")
    a = ap.parse_args()
    tokens = parse_tokens(a.tokens)
    torch.manual_seed(0)
    report = {"preset": a.preset, "tokens": tokens, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "peers": {}}
    for peer in a.peers.split(","):
        try:
            model = make_mamba_ssm(a.preset, a.device) if peer == "mamba_ssm" else make_hf(a.preset, a.device)
            r = stream_nll(model, tokens, a.chunk, a.device)
            if a.decode:
                r["decode_ms_per_token"] = decode_ms(model, a.device, a.decode, peer)
            del model
            if a.device == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # a missing or failing peer is reported, not fatal
            r = {"error": f"{type(e).__name__}: {e}"}
        report["peers"][peer] = r
        print(peer, json.dumps(r), flush=True)
    if a.stuffed:
        # At the peers' chunk (same workload) and at stuffed's default 65,536.
        report["stuffed"] = {}
        for chunk in sorted({a.chunk, 65536}):
            cmd = [a.stuffed, "bench", "--device", "cuda", "--preset", a.preset, "--tokens", str(tokens),
                   "--chunk", str(chunk), "--decode", str(a.decode)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            report["stuffed"][str(chunk)] = {"command": " ".join(cmd), "rc": p.returncode, "stdout": p.stdout,
                                             "stderr": p.stderr[-2000:]}
            print(p.stdout, p.stderr[-2000:], file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
