#!/usr/bin/env python3
"""verdict.json of a sweep model (issue 26): the T_forget block of one `stuffed ppl` results.json
(made with the model's recorded --train-len) and what identifies the run it came from, so the small
file is committed and the 378 KB results.json need not be.

    python3 tools/sweep_verdict.py PPL_OUT/results.json > models/sweep/NAME/verdict.json
"""
import json
import sys


def verdict(results):
    run = results["runs"][0]
    if "t_forget" not in run:
        sys.exit("sweep_verdict: the run has no t_forget block (no --train-len and no training.json train_len)")
    return {
        "command_as_run": results["command"],
        "stuffed_version": results["stuffed_version"],
        "results_checksum": results["checksum"],
        "text": results["inputs"][0]["input"],
        "tokens_scored": run["tokens_scored"],
        "mean_nll": run["mean_nll"],
        "train_len": run["train_len"],
        "t_forget": run["t_forget"],
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        print(json.dumps(verdict(json.load(f)), indent=1))
