#!/usr/bin/env bash
# The paper's T_forget verdict of trained models on every held-out text (issue 26 item 1): Persuasion
# (host/assets/corpus) and the package-registry texts of tools/heldout_texts.sh, each scored as one
# document over its first 121,072 tokens (Persuasion's length) with each model's recorded training
# length (training.json).
#
#   tools/heldout_verdicts.sh OUT MODEL_DIR…     → OUT/<text>/results.json, OUT/verdicts.json, and a
#                                                  markdown table (one row per text and model) on stdout
#
# STUFFED: the binary (default target/release/stuffed); THREADS (default 1); TEXTS_DIR as in
# heldout_texts.sh (run it first). verdicts.json is small: commit it beside the models' training.json.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { echo "usage: tools/heldout_verdicts.sh OUT MODEL_DIR…" >&2; exit 2; }
OUT=$1; shift
STUFFED=${STUFFED:-$ROOT/target/release/stuffed}
TEXTS_DIR=${TEXTS_DIR:-$HOME/.cache/stuffed/texts}
TEXTS=("persuasion:$ROOT/host/assets/corpus/austen_persuasion.txt" "moby_dick:$TEXTS_DIR/moby_dick.txt"
       "kjv:$TEXTS_DIR/kjv.txt" "sotu:$TEXTS_DIR/sotu.txt")
for t in "${TEXTS[@]}"; do
    [ -s "${t#*:}" ] || { echo "heldout_verdicts: ${t#*:} missing: run tools/heldout_texts.sh" >&2; exit 1; }
done
MODELS=()
for m in "$@"; do
    [ -s "$m/training.json" ] || { echo "heldout_verdicts: $m/training.json missing (the training length comes from it)" >&2; exit 1; }
    MODELS+=(--model "$m")
done
mkdir -p "$OUT"
for t in "${TEXTS[@]}"; do
    name=${t%%:*}
    rm -rf "$OUT/$name.tmp"  # never resume or reuse another run's output: every text is scored afresh
    "$STUFFED" ppl --threads "${THREADS:-1}" "${MODELS[@]}" --text "${t#*:}" --max-tokens 121072 \
        --out "$OUT/$name.tmp" > "$OUT/$name.log" 2>&1 || { cat "$OUT/$name.log" >&2; exit 1; }
    rm -rf "$OUT/$name" && mv "$OUT/$name.tmp" "$OUT/$name"
done
python3 - "$OUT" "$#" "${TEXTS[@]}" <<'PY'
import json, math, os, sys
out, n_models, texts = sys.argv[1], int(sys.argv[2]), [t.split(":", 1) for t in sys.argv[3:]]
rows, table = [], ["| text | model | T | L_in | L_out | L_out/L_in | verdict | q90 verdict |", "|---|---|---:|---:|---:|---:|---|---|"]
for name, path in texts:
    res = json.load(open(os.path.join(out, name, "results.json")))
    if len(res["runs"]) != n_models:
        sys.exit(f"heldout_verdicts: {name}: results.json holds {len(res['runs'])} runs for {n_models} models")
    for run in res["runs"]:
        tf = run["t_forget"]
        if not all(math.isfinite(tf[k]) and tf[k] > 0 for k in ("l_in", "l_out")):
            sys.exit(f"heldout_verdicts: {name}: non-finite or zero L_in / L_out in {run['model']['path']}: {tf}")
        model = os.path.basename(os.path.normpath(run["model"]["path"]))
        row = {"text": name, "file": os.path.basename(path), "model": model, "train_len": run["train_len"],
               "tokens_scored": run["tokens_scored"], "l_in": tf["l_in"], "l_out": tf["l_out"],
               "verdict": tf["verdict"], "q90_verdict": tf.get("robust", {}).get("verdict"),
               "results_checksum": res["checksum"], "stuffed_version": res["stuffed_version"]}
        rows.append(row)
        table.append(f"| {name} | {model} | {row['train_len']} | {tf['l_in']:.4f} | {tf['l_out']:.4f} | "
                     f"{tf['l_out'] / tf['l_in']:.2f} | {tf['verdict']} | {row['q90_verdict']} |")
json.dump({"command": "tools/heldout_verdicts.sh", "rows": rows}, open(os.path.join(out, "verdicts.json"), "w"), indent=1)
print("\n".join(table))
PY
