#!/usr/bin/env python3
"""CPU throughput baseline: HF transformers full-sequence forward (pure-torch path): Mamba2ForCausalLM
for the built-in cases, any causal LM (AutoModelForCausalLM: Mamba-1's MambaForCausalLM, …) by --model.

Times `model(ids, use_cache=False).logits` (all T positions, f32, torch.no_grad, batch 1) and prints
one JSON line per case with tokens/s (best of --repeats after --warmup untimed runs), plus the
1-minute load average before/after (other work on the machine skews the numbers).

Cases:
  tiny   the golden-test config (vocab 256, d 64, L 2, d_state 16, head_dim 16, n_groups 1,
         chunk 16), random init, T = --tiny-tokens (4096)
  130m   Mamba-2 130m shapes (d 768, L 24, head_dim 64 (H 24), d_state 128, n_groups 1, expand 2,
         conv 4, chunk 256, vocab 50288 tied), random init, T = --tokens (1024)
  --model DIR  instead: load an existing HF directory of any causal LM (f32), T = --tokens
               (`stuffed synth --family mamba1 --preset 130m --dtype f32` writes HF names and config)

Run in a venv without mamba_ssm/causal_conv1d (otherwise transformers picks their GPU kernels):

    /root/pyref/bin/python tools/bench_hf_cpu.py --threads 2
    /root/pyref/bin/python tools/bench_hf_cpu.py --threads 2 --cases 130m --tokens 2048
    /root/pyref/bin/python tools/bench_hf_cpu.py --threads 2 --model tests/data/mamba2_hf_g1_untied
"""
import argparse
import json
import os
import statistics
import time

import torch
import transformers
from transformers import Mamba2Config, Mamba2ForCausalLM

transformers.logging.set_verbosity_error()


def tiny_config():
    return Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16,
                        num_heads=8, expand=2, conv_kernel=4, chunk_size=16, n_groups=1)


def m130_config():
    return Mamba2Config(vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64,
                        num_heads=24, expand=2, conv_kernel=4, chunk_size=256, n_groups=1,
                        tie_word_embeddings=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


@torch.no_grad()
def bench(name, model, tokens, warmup, repeats, threads):
    model = model.float().eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    load0 = loadavg()
    for _ in range(warmup):
        model(ids, use_cache=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = model(ids, use_cache=False).logits
        times.append(time.perf_counter() - t0)
    assert logits.shape == (1, tokens, vocab) and torch.isfinite(logits).all()
    best = min(times)
    rec = {
        "case": name, "threads": threads, "tokens": tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds_best": round(best, 4), "seconds_median": round(statistics.median(times), 4),
        "tokens_per_s": round(tokens / best, 1),
        "loadavg_before": load0, "loadavg_after": loadavg(), "nproc": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print(json.dumps(rec), flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--tokens", type=int, default=1024, help="sequence length for 130m / --model")
    ap.add_argument("--tiny-tokens", type=int, default=4096, help="sequence length for the tiny case")
    ap.add_argument("--cases", default="tiny,130m", help="comma list of tiny,130m (ignored with --model)")
    ap.add_argument("--model", help="load this HF causal-LM directory instead of the built-in cases")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        bench(os.path.basename(os.path.normpath(args.model)), model, args.tokens, args.warmup, args.repeats,
              args.threads)
        return
    for case in args.cases.split(","):
        if case == "tiny":
            bench("tiny", Mamba2ForCausalLM(tiny_config()), args.tiny_tokens, args.warmup, args.repeats, args.threads)
        elif case == "130m":
            bench("130m", Mamba2ForCausalLM(m130_config()), args.tokens, args.warmup, args.repeats, args.threads)
        else:
            raise SystemExit(f"unknown case {case}")


if __name__ == "__main__":
    main()
