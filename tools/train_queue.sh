#!/usr/bin/env bash
# Runs a plan of trainings one after another, in the background, surviving interruptions (issue 26).
#
#   tools/train_queue.sh PLAN…           start (or resume) the queue in the background; returns at once
#   tools/train_queue.sh PLAN… status    what is done, in progress (step reached) and pending
#   tools/train_queue.sh PLAN… stop      SIGTERM the run in flight (it checkpoints) and the queue
#
# Several plans run in the order given. PLAN: lines `NAME ARGS…` (train_tiny.py's arguments after
# --out; `#` comments). Each run writes
# $SWEEP_DIR/NAME (default ~/.cache/stuffed/sweep) with its log NAME.log; train_tiny.py checkpoints every
# 100 steps and a rerun resumes bit for bit, so after a reboot or a kill, start the queue again.
# The checkpoints live on this machine only: where each working session gets a fresh machine
# (this project's case), a run must finish within the session that starts it (one 4M-token sweep model
# takes ~25-30 min on a free core) and its training.json be committed before the session ends.
# A finished run's training.json is copied to the plan's folder as NAME/training.json (commit those;
# the weights stay out of the repository: the command and seed in training.json rebuild them).
# PYTHON: an interpreter with torch + transformers and without mamba_ssm. Runs at nice 19, one thread.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PLANS=()
ACTION=start
for a in "$@"; do
    case $a in status|stop|start) ACTION=$a ;; *) PLANS+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")") ;; esac
done
[ ${#PLANS[@]} -gt 0 ] || { echo "usage: tools/train_queue.sh PLAN… [status|stop]" >&2; exit 2; }
PY=${PYTHON:-python3}
SWEEP_DIR=${SWEEP_DIR:-$HOME/.cache/stuffed/sweep}
LOCK=$SWEEP_DIR/queue.pid
mkdir -p "$SWEEP_DIR"
# `PLAN_DIR NAME ARGS…` for every entry of every plan, in order.
entries() {
    for p in "${PLANS[@]}"; do
        grep -v '^\s*#' "$p" | grep -v '^\s*$' | sed "s|^|$(dirname "$p") |"
    done
}

case $ACTION in
status)
    entries | while read -r plan_dir name args; do
        if [ -e "$SWEEP_DIR/$name/training.json" ]; then echo "done     $name"
        elif [ -e "$SWEEP_DIR/$name.log" ]; then
            echo "started  $name: $(grep -a '^step\|^resumed\|^stopped' "$SWEEP_DIR/$name.log" | tail -1)"
        else echo "pending  $name"; fi
    done
    if [ -e "$LOCK" ] && kill -0 "$(cat "$LOCK")" 2>/dev/null; then echo "queue running (pid $(cat "$LOCK"))"
    else echo "queue not running"; fi
    ;;
stop)
    [ -e "$LOCK" ] && kill -TERM "$(cat "$LOCK")" 2>/dev/null || true
    pkill -TERM -f "train_tiny.py --out $SWEEP_DIR/" || true
    ;;
start)
    if [ -e "$LOCK" ] && kill -0 "$(cat "$LOCK")" 2>/dev/null; then
        echo "train_queue: already running (pid $(cat "$LOCK"))" >&2; exit 1
    fi
    (
        trap 'exit 143' TERM
        entries | while read -r plan_dir name args; do
            [ -e "$SWEEP_DIR/$name/training.json" ] && continue
            # shellcheck disable=SC2086
            OMP_NUM_THREADS=1 nice -n 19 "$PY" "$ROOT/tools/train_tiny.py" --out "$SWEEP_DIR/$name" $args \
                >> "$SWEEP_DIR/$name.log" 2>&1 < /dev/null || { echo "train_queue: $name exited $?" >> "$SWEEP_DIR/$name.log"; exit 1; }
            mkdir -p "$plan_dir/$name"
            cp "$SWEEP_DIR/$name/training.json" "$plan_dir/$name/training.json"
        done
        rm -f "$LOCK"
    ) > /dev/null 2>&1 &
    echo $! > "$LOCK"
    echo "train_queue: started (pid $!); logs in $SWEEP_DIR/NAME.log; status: $0 ${*/start/} status"
    ;;
*) echo "train_queue: unknown action $ACTION (status, stop)" >&2; exit 2 ;;
esac
