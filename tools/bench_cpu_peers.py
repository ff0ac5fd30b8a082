#!/usr/bin/env python3
"""The timing half of tools/bench_cpu_peers.sh (see its header): stuffed beside llama.cpp, in
alternating rounds, at equal work. Standard library only.

    python3 tools/bench_cpu_peers.py --stuffed BIN --llama-bin DIR --model NAME:DIR:GGUF:TOKENS \
        [--model …] --text FILE --pairs 5 --threads 2 --out DIR

Per model, each round runs, in this order: stuffed `ppl` (default, exact matmul), stuffed `ppl
--fast-matmul` (bf16 weights only), `llama-perplexity`; then the decode rounds: `stuffed bench
--decode 128` (which prints its share of the read bandwidth) and one repetition of `llama-bench -p 0
-n 128`. `--decode-only` skips the scoring rounds. tok/s is tokens / whole-process wall time for both
(model load included for both: a memory map each). Paired ratios are per round, medians quoted.
"""
import argparse
import json
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import time

WINDOW = 2048  # llama-perplexity -c: windows from the zero state, head on the second half


def run(cmd, env=None):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench_cpu_peers: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return wall, p.stdout


def info(stuffed, model):
    _, out = run([stuffed, "info", "--model", model, "--json"])
    return json.loads(out)


def flops(i):
    """Useful FLOPs per token of the layers and of the LM head (2 per weight; the input embedding a lookup)."""
    emb = i["vocab_rows"] * i["d_model"]
    head = 2.0 * emb
    layers = 2.0 * (i["params"] - emb - (0 if i["tied_embeddings"] else emb)) + 4.0 * i["paper_state_size"]
    return layers, head


def window_nll(path, n_tokens):
    """Mean NLL over the positions llama-perplexity scores: offsets WINDOW/2+1 … WINDOW-1 of each window."""
    data = open(path, "rb").read()
    nll = struct.unpack(f"<{len(data) // 4}f", data)  # position p (1-based) at index p - 1
    sel = [nll[p - 1] for p in range(1, n_tokens) if WINDOW // 2 + 1 <= p % WINDOW <= WINDOW - 1]
    return sum(sel) / len(sel), len(sel)


def llama_ppl(out):
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not m:
        sys.exit(f"bench_cpu_peers: no final estimate in llama-perplexity's output:\n{out[-2000:]}")
    return math.log(float(m.group(1)))


def median(v):
    return statistics.median(v) if v else float("nan")


def bench_model(a, name, mdir, gguf, n_tokens):
    i = info(a.stuffed, mdir)
    layers, head = flops(i)
    share = (layers + 0.5 * head) / (layers + head)  # llama-perplexity's work per token / stuffed's
    bf16 = i["weight_dtype"] == "bf16"
    tmp = os.path.join(a.out, "tmp")
    os.makedirs(tmp, exist_ok=True)
    nll_file = os.path.join(tmp, f"{name}.nll")
    base = [a.stuffed, "ppl", "--model", mdir, "--text", a.text, "--max-tokens", str(n_tokens),
            "--forget", f"reset:every={WINDOW}", "--threads", str(a.threads), "--out", os.path.join(tmp, "ppl"),
            "--overwrite", "--nll-out", nll_file]
    modes = [("exact", base)] + ([("fast", base + ["--fast-matmul"])] if bf16 else [])
    llama = [os.path.join(a.llama_bin, "llama-perplexity"), "-m", gguf, "-f", a.text, "-c", str(WINDOW),
             "-b", str(WINDOW), "-t", str(a.threads), "--chunks", str(n_tokens // WINDOW)]
    walls = {m: [] for m, _ in modes}
    walls["llama"] = []
    nlls = {}
    for r in range(0 if a.decode_only else a.pairs):
        for m, cmd in modes:
            w, _ = run(cmd)
            walls[m].append(w)
            nlls[m] = window_nll(nll_file, n_tokens)
        w, out = run(llama)
        walls["llama"].append(w)
        nlls["llama"] = (llama_ppl(out), None)
        print(f"  {name} round {r + 1}: " + ", ".join(f"{k} {n_tokens / v[-1]:.1f} tok/s" for k, v in walls.items()),
              file=sys.stderr)
    # Decode, alternating: one stuffed run, one llama-bench repetition, per round.
    dec = {"stuffed": [], "llama": []}
    share_of_bw = []
    for r in range(a.pairs):
        _, out = run([a.stuffed, "bench", "--model", mdir, "--tokens", "16", "--decode", "128",
                      "--threads", str(a.threads)])
        dec["stuffed"].append(float(re.search(r"decode\s+([0-9.]+) ms/token", out).group(1)))
        share_of_bw.append(float(re.search(r"([0-9]+) % of the read bandwidth", out).group(1)))
        bw = re.search(r"bandwidth\s+read ([0-9.]+) GB/s on 1 thread(?:, ([0-9.]+) GB/s)?", out)
        _, out = run([os.path.join(a.llama_bin, "llama-bench"), "-m", gguf, "-p", "0", "-n", "128",
                      "-r", "1", "-t", str(a.threads), "-o", "json"])
        ts = json.loads(out[out.index("["):])[0]["avg_ts"]
        dec["llama"].append(1e3 / ts)
        print(f"  {name} decode round {r + 1}: stuffed {dec['stuffed'][-1]:.2f} ms ({share_of_bw[-1]:.0f} % of the "
              f"read bandwidth), llama.cpp {dec['llama'][-1]:.2f} ms", file=sys.stderr)
    res = {"model": name, "dir": mdir, "gguf": gguf, "tokens": n_tokens, "threads": a.threads, "pairs": a.pairs,
           "weight_dtype": i["weight_dtype"], "llama_work_share": share,
           "scoring_tok_s": {k: median([n_tokens / w for w in v]) for k, v in walls.items()},
           "llama_equal_work_tok_s": median([n_tokens / w for w in walls["llama"]]) * share,
           "ratio_vs_llama_equal_work": {m: median([lw / (sw * share) for sw, lw in zip(walls[m], walls["llama"])])
                                         for m, _ in modes},
           "mean_nll_second_halves": {k: v[0] for k, v in nlls.items()},
           "decode_ms": {k: median(v) for k, v in dec.items()},
           "decode_share_of_read_bandwidth_pct": median(share_of_bw),
           "read_bandwidth_gb_s": {"one": float(bw.group(1)), "all": float(bw.group(2) or bw.group(1))} if bw else None}
    if a.decode_only:
        for key in ("scoring_tok_s", "llama_equal_work_tok_s", "ratio_vs_llama_equal_work", "mean_nll_second_halves"):
            del res[key]
    weight_read = i["weight_bytes"] - (0 if i["tied_embeddings"] else i["vocab_rows"] * i["d_model"] * (2 if bf16 else 4))
    res["decode_gb_s"] = {k: weight_read / (v * 1e-3) / 1e9 for k, v in res["decode_ms"].items()}
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stuffed", required=True)
    ap.add_argument("--llama-bin", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME:DIR:GGUF:TOKENS")
    ap.add_argument("--text", required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--decode-only", action="store_true", help="skip the scoring rounds")
    a = ap.parse_args()
    if a.pairs < 1:
        sys.exit("bench_cpu_peers: --pairs must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for spec in a.model:
        name, mdir, gguf, n = spec.split(":")
        rows.append(bench_model(a, name, mdir, gguf, int(n)))
    if a.decode_only:
        print(f"| model | decode ms/token, {a.threads} threads: stuffed / llama.cpp | stuffed, % of the read bandwidth "
              f"| decode GB/s of weights: stuffed / llama.cpp |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['decode_ms']['stuffed']:.1f} / {r['decode_ms']['llama']:.1f} "
                  f"| {r['decode_share_of_read_bandwidth_pct']:.0f} % "
                  f"| {r['decode_gb_s']['stuffed']:.1f} / {r['decode_gb_s']['llama']:.1f} |")
        return
    print(f"| model | tokens | stuffed exact tok/s | stuffed --fast-matmul tok/s | llama.cpp tok/s (equal work) "
          f"| stuffed / llama.cpp, equal work (exact, fast) | mean NLL 2nd halves (stuffed exact / llama.cpp) "
          f"| decode ms/token stuffed / llama.cpp | decode GB/s stuffed / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, q, nl = r["scoring_tok_s"], r["ratio_vs_llama_equal_work"], r["mean_nll_second_halves"]
        fast = f"{s['fast']:.1f}" if "fast" in s else "–"
        qf = f"{q['fast']:.2f}×" if "fast" in q else "–"
        print(f"| {r['model']} | {r['tokens']} | {s['exact']:.1f} | {fast} | {s['llama']:.1f} "
              f"({r['llama_equal_work_tok_s']:.1f}) | {q['exact']:.2f}×, {qf} | {nl['exact']:.5f} / {nl['llama']:.5f} "
              f"| {r['decode_ms']['stuffed']:.1f} / {r['decode_ms']['llama']:.1f} "
              f"| {r['decode_gb_s']['stuffed']:.1f} / {r['decode_gb_s']['llama']:.1f} |")


if __name__ == "__main__":
    main()
