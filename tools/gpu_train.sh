#!/usr/bin/env bash
# Trains every line of one or more plans at once on the GPU machine (issue 26: the T_forget sweep and
# the shipped pair's recipe attempts), then scores each finished model as the sweep's verdicts are made:
# `stuffed ppl --threads 1` on the CPU over the held-out Persuasion (121,072 tokens), its train_len read
# from training.json, and tools/sweep_verdict.py. Each line is one `train_tiny.py --device cuda` process
# (one CPU thread each; the machine has 16 cores), all sharing the GPU. Here first: tools/gpu_bundle.sh
# (the stuffed binary); then through the device tool, carrying .gpu:
#   bash tools/gpu_train.sh [--deadline S] [--max N] [--weights REGEX] PLAN…
# A line whose NAME/training.json is already in the plan's folder is skipped (the plan is the to-do
# list across sessions); --max N trains only the first N left. --deadline (default 540): seconds after
# which unfinished trainings are killed and scoring stops (a run's log says how far it got; nothing
# resumes: a device call returns too few files for the checkpoints).
# Size a call: on an H200 (2026-12-04, MPS on, torch 2.11, transformers 5.17's pure-torch Mamba-2) the
# runs share about 90k-120k training tok/s in all, however many there are (4 runs: 23k tok/s each,
# 4M tokens in 175 s; 22 runs: 5.4k tok/s each), plus ~40 s of start and scoring: at most 8 sweep
# models (4M tokens) or 4 of 8M in one 540 s call. --weights: models whose name matches also come back with their
# weights (at most 2 a file: the device returns 8 files of ≤ 16 MiB). Everything else comes back in
# $OUT/train.tar.gz: per model NAME/{training.json, train.log, verdict.json, ppl.log} and
# NAME.ppl/{results.json, loss.csv}. Back here,
#   tools/gpu_train.sh --unpack TRAIN_TAR_GZ DIR PLAN…
# unpacks it into DIR and copies each finished model's training.json and verdict.json into its plan's
# folder (models/sweep/NAME/: commit those; `stuffed laws DIR/*.ppl …` fits the results). DEVICE=cpu runs the same pipeline on this machine (a dry run
# with a plan of small --tokens).
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=540
weights='^$'
max=1000
unpack=
plans=()
while [ $# -gt 0 ]; do
    case $1 in
        --deadline) deadline=$2; shift 2 ;;
        --weights) weights=$2; shift 2 ;;
        --max) max=$2; shift 2 ;;
        --unpack) unpack=$2 unpack_dir=$3; shift 3 ;;
        *) plans+=("$1"); shift ;;
    esac
done
[ ${#plans[@]} -gt 0 ] || { echo "usage: tools/gpu_train.sh [--deadline S] [--max N] [--weights REGEX] PLAN… | --unpack TAR_GZ DIR PLAN…" >&2; exit 2; }
# plan lines as `PLAN_DIR NAME ARGS…`
entries() { for p in "${plans[@]}"; do grep -v '^\s*#' "$p" | grep -v '^\s*$' | sed "s|^|$(dirname "$p") |"; done; }
if [ -n "$unpack" ]; then
    mkdir -p "$unpack_dir" && tar xzf "$unpack" -C "$unpack_dir" || exit 1
    entries | while read -r plan_dir name _; do
        [ -e "$unpack_dir/$name/verdict.json" ] || continue
        mkdir -p "$plan_dir/$name"
        cp "$unpack_dir/$name/training.json" "$unpack_dir/$name/verdict.json" "$plan_dir/$name/"
        echo "gpu_train: $plan_dir/$name: $(grep -m1 -o '"verdict": "[a-z ]*"' "$plan_dir/$name/verdict.json")"
    done
    exit 0
fi
out=${OUT:-$PWD/gpu-out}
work=${WORK_DIR:-/tmp/gpu-train}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out" "$work"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
bin=${STUFFED:-.gpu/stuffed}
[ -x "$bin" ] || { [ -e "$bin.xz" ] && xz -d -k -f "$bin.xz"; }
[ -x "$bin" ] || { echo "gpu_train: no $bin (run tools/gpu_bundle.sh and carry .gpu)" >&2; exit 2; }
t0=$SECONDS
left() { local l=$((deadline - (SECONDS - t0))); echo $((l > 1 ? l : 1)); }
# Many small processes on one GPU: CUDA's multi-process service lets their kernels run side by side
# instead of time-slicing the GPU between contexts. Used where it starts and a CUDA call works under it.
mps=off
if [ "$device" = cuda ] && PATH=/usr/local/cuda/bin:$PATH command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if PATH=/usr/local/cuda/bin:$PATH nvidia-cuda-mps-control -d &&
        timeout 60 "$py" -c 'import torch; assert torch.ones(8, device="cuda").sum().item() == 8'; then
        mps=on
    else
        echo quit | PATH=/usr/local/cuda/bin:$PATH timeout 10 nvidia-cuda-mps-control
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
fi
echo "gpu_train: device $device, MPS $mps, deadline $deadline s"

# one NAME ARGS…: train, then score; every step's output in $work/NAME/.
one() {
    local name=$1
    shift
    mkdir -p "$work/$name"
    # shellcheck disable=SC2068
    OMP_NUM_THREADS=1 timeout -s KILL "$(left)" "$py" tools/train_tiny.py --out "$work/$name" $@ --device "$device" \
        --threads 1 --log-every 100 --checkpoint-every 0 > "$work/$name.train.log" 2>&1
    local rc=$?
    grep -v 'Writing model shards\|Loading weights' "$work/$name.train.log" > "$work/$name/train.log"
    [ $rc -eq 0 ] && [ -e "$work/$name/training.json" ] || { echo "$name: training exited $rc at $((SECONDS - t0)) s: $(grep '^step' "$work/$name/train.log" | tail -1)"; return; }
    timeout -s KILL "$(left)" "$bin" ppl --threads 1 --model "$work/$name" --text host/assets/corpus/austen_persuasion.txt \
        --out "$work/$name.ppl" > "$work/$name/ppl.log" 2>&1 || { echo "$name: ppl exited $? at $((SECONDS - t0)) s"; return; }
    # A verdict that cannot be made leaves no verdict.json (--unpack files only models that have one).
    "$py" tools/sweep_verdict.py "$work/$name.ppl/results.json" > "$work/$name/verdict.tmp" &&
        mv "$work/$name/verdict.tmp" "$work/$name/verdict.json" || { echo "$name: no verdict"; return; }
    echo "$name: trained in $(grep -o '"train_wall_s": [0-9.]*' "$work/$name/training.json" | cut -d' ' -f2) s, scored at $((SECONDS - t0)) s: $(grep 'T_forget' "$work/$name/ppl.log" | sed 's/.*T_forget//')"
}

names=()
while read -r plan_dir name args; do
    [ -e "$plan_dir/$name/training.json" ] && continue
    [ ${#names[@]} -lt "$max" ] || break
    names+=("$name")
    # shellcheck disable=SC2086
    one "$name" $args &
done < <(entries)
wait
echo "gpu_train: ${#names[@]} runs in $((SECONDS - t0)) s"
[ $mps = on ] && { echo quit | PATH=/usr/local/cuda/bin:$PATH timeout 10 nvidia-cuda-mps-control; }

files=()
for n in "${names[@]}"; do
    files+=("$n/training.json" "$n/train.log" "$n/verdict.json" "$n/ppl.log" "$n.ppl/results.json" "$n.ppl/loss.csv")
done
tar czf "$out/train.tar.gz" -C "$work" --ignore-failed-read "${files[@]}" 2> /dev/null
# Weights, two models a file.
mapfile -t keep < <(printf '%s\n' "${names[@]}" | grep -E "$weights" | while read -r n; do [ -e "$work/$n/model.safetensors" ] && echo "$n"; done)
for ((i = 0; i < ${#keep[@]}; i += 2)); do
    tar cf "$out/weights-$((i / 2)).tar" -C "$work" "${keep[@]:i:2}"
done
ls -la "$out"
