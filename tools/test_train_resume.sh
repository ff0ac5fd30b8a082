#!/usr/bin/env bash
# tools/train_tiny.py survives interruption (issue 26 item 0): a run stopped and resumed writes the
# same weights, bit for bit, as the same run uninterrupted; once with --stop-at-step, once with a
# real SIGTERM mid-run and once with SIGKILL (which loses the steps since the last checkpoint); and with
# --extra-text, whose file counts by its content: an edited file refuses the checkpoint, the original resumes.
#
#   PYTHON=/path/to/venv/bin/python tools/test_train_resume.sh
#
# Needs a venv with torch + transformers and without mamba_ssm (as train_tiny.py). About a minute on
# one core (tiny model: d 32, 1 layer, 12 steps of 1,024 tokens). Not in CI (no PyTorch there).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
ARGS=(--train-len 64 --tokens 12288 --batch-tokens 1024 --hidden 32 --layers 1 --head-dim 16 --d-state 16
      --warmup 3 --log-every 1 --passkey-frac 0.25 --passkey-min 40 --checkpoint-every 4)
run() { OMP_NUM_THREADS=1 "$PY" "$ROOT/tools/train_tiny.py" "$@" "${ARGS[@]}"; }
same() {
    local ref=${3:-$TMP/straight}
    cmp "$ref/model.safetensors" "$1/model.safetensors"
    python3 - "$ref/training.json" "$1/training.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
assert a["loss_log"] == b["loss_log"], "loss logs differ"
assert a["heldout"]["mean_nll"] == b["heldout"]["mean_nll"], "held-out NLL differs"
assert a["final_train_loss_ema"] == b["final_train_loss_ema"]
PY
    [ ! -e "$1.ckpt/checkpoint.pt" ] || { echo "checkpoint left behind in $1.ckpt" >&2; exit 1; }
    echo "test_train_resume: $2: same weights and loss log as the uninterrupted run"
}
run --out "$TMP/straight" > "$TMP/straight.log"
# 1. stopped on purpose after 6 steps (between two checkpoints), then resumed
run --out "$TMP/stopped" --stop-at-step 6 > "$TMP/stopped1.log"
grep -q "stopped at step 6" "$TMP/stopped1.log"
[ ! -e "$TMP/stopped/model.safetensors" ]
run --out "$TMP/stopped" > "$TMP/stopped2.log"
grep -q "resumed from .* at step 6/12" "$TMP/stopped2.log"
same "$TMP/stopped" "--stop-at-step 6, resumed"
# 2. SIGTERM once the first step has been logged: it finishes that step, checkpoints, exits 143
( run --out "$TMP/term" > "$TMP/term1.log" 2>&1 ) &
pid=$!
until grep -q "^step" "$TMP/term1.log" 2>/dev/null; do sleep 0.2; done
pkill -TERM -f -- "--out $TMP/term " || true
wait $pid && rc=0 || rc=$?
if grep -q "wrote " "$TMP/term1.log"; then
    echo "test_train_resume: the run finished before SIGTERM reached it; inconclusive" >&2; exit 1
fi
[ "$rc" = 143 ] || { echo "SIGTERM: exit $rc, expected 143" >&2; cat "$TMP/term1.log" >&2; exit 1; }
run --out "$TMP/term" > "$TMP/term2.log"
grep -q "resumed from" "$TMP/term2.log"
same "$TMP/term" "SIGTERM, resumed"
# 3. SIGKILL after the first checkpoint: resumes from that checkpoint
( run --out "$TMP/kill" > "$TMP/kill1.log" 2>&1 ) &
pid=$!
until [ -e "$TMP/kill.ckpt/checkpoint.pt" ]; do sleep 0.1; done
pkill -KILL -f -- "--out $TMP/kill " || true
wait $pid || true
if grep -q "wrote " "$TMP/kill1.log"; then
    echo "test_train_resume: the run finished before SIGKILL reached it; inconclusive" >&2; exit 1
fi
run --out "$TMP/kill" > "$TMP/kill2.log"
grep -q "resumed from .* at step \(4\|8\)/12" "$TMP/kill2.log"
same "$TMP/kill" "SIGKILL, resumed"
# 4. --extra-text: mixed-in text; the checkpoint is bound to the file's content, not its path
head -c 30000 "$ROOT/host/assets/corpus/austen_persuasion.txt" > "$TMP/extra.txt"
cp "$TMP/extra.txt" "$TMP/extra.orig"
run --out "$TMP/mix-straight" --extra-text "$TMP/extra.txt" > "$TMP/mix-straight.log"
grep -q -- "+ 1 --extra-text documents" "$TMP/mix-straight.log"
if cmp -s "$TMP/straight/model.safetensors" "$TMP/mix-straight/model.safetensors"; then
    echo "test_train_resume: --extra-text changed nothing" >&2; exit 1
fi
run --out "$TMP/mix" --extra-text "$TMP/extra.txt" --stop-at-step 6 > "$TMP/mix1.log"
echo "one more line" >> "$TMP/extra.txt"
if run --out "$TMP/mix" --extra-text "$TMP/extra.txt" > "$TMP/mix2.log" 2>&1; then
    echo "test_train_resume: resumed with an edited --extra-text" >&2; exit 1
fi
grep -q "checkpoint of another run (differs in {'extra_text_sha256'" "$TMP/mix2.log"
cp "$TMP/extra.orig" "$TMP/extra.txt"
run --out "$TMP/mix" --extra-text "$TMP/extra.txt" > "$TMP/mix3.log"
grep -q "resumed from .* at step 6/12" "$TMP/mix3.log"
same "$TMP/mix" "--extra-text, stopped, refused with an edited file, resumed" "$TMP/mix-straight"
