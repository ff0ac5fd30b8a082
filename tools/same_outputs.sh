#!/usr/bin/env bash
# Are a refactor's outputs byte-identical? Builds `stuffed` at REV (default HEAD) in a scratch
# worktree and from the working tree, runs the same short commands with both on the shipped models
# and the tiny models of the other families (ppl with NLL files and verdicts, probe, passkey, the
# forgetting methods), and compares every output file byte for byte: loss.csv, *.f32 NLL files,
# probe CSVs, passkey results.jsonl / summary.csv, the SVGs. results.json, summary.json and
# probe.json are compared without `seconds`, `tokens_per_s`, `peak_rss_bytes` and the `model`
# description, and the checksums that seal them (both runs write to the same paths).
#
#   tools/same_outputs.sh [REV]        # e.g. tools/same_outputs.sh HEAD~1
#
# Same machine, same kernel path (STUFFED_SIMD is passed through), one thread. Exit 0 when
# everything matches; else the differing files are listed and it exits 1. Takes ~2 minutes plus
# the two builds (target dir: target/same-outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:-HEAD}"
work="target/same-outputs"
rm -rf "$work/run" && mkdir -p "$work/run"
if [ ! -d "$work/tree" ]; then git worktree add --detach -q "$work/tree" "$rev"; fi
git -C "$work/tree" checkout -q --detach "$rev"
(cd "$work/tree" && CARGO_TARGET_DIR="$PWD/../target-before" cargo build -q --release -p stuffed --bin stuffed)
cargo build -q --release -p stuffed --bin stuffed
before="$work/target-before/release/stuffed"
after="target/release/stuffed"

text=host/assets/corpus/austen_persuasion.txt
# The tiny golden models have 256-row vocabs: a byte-level tokenizer (ids 0-255, no merges) for them.
bytes_tok="$work/run/bytes_tokenizer.json"
python3 - "$bytes_tok" <<'TOK'
import json, sys
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
vocab = {chr(c): b for b, c in zip(bs, cs)}
json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []}},
          open(sys.argv[1], "w"))
TOK
runs() { # $1: binary, $2: output root
  local s="$1 --threads 1" o="$2"
  $s ppl --model models/mamba2-tiny-l4-t64-a3-4m --text "$text" --max-tokens 6k --train-len 64 --nll-out "$o/nll" --out "$o/ppl"
  $s ppl --model models/mamba2-tiny-l4-t64-a3-4m --text "$text" --max-tokens 3k --train-len 64 --forget none --forget window:r=64 \
    --forget rri:a=0.999,b=0.75 --forget dt:c=0.5 --forget state-norm:every=128 --forget reset:every=256 \
    --out "$o/ppl-forget"
  $s ppl --model models/mamba2-tiny-l4-t2048-a3-4m --text "$text" --max-tokens 3k --bucket 256 --out "$o/ppl-text"
  $s probe --model models/mamba2-tiny-l4-t64-a3-4m --text "$text" --max-tokens 2k --snapshot-at 100,1000 --out "$o/probe"
  $s passkey --model models/mamba2-tiny-passkey --lengths 128,512 --depths 0,0.5,1 --out "$o/passkey"
  for m in rwkv6_tiny rwkv5_tiny_hf hgrn2_tiny mamba2_official; do
    local t=(--tokenizer "$bytes_tok" --text "$text")
    $s ppl --model "tests/data/$m" "${t[@]}" --max-tokens 1k --nll-out "$o/nll-$m" --out "$o/ppl-$m"
    $s ppl --model "tests/data/$m" "${t[@]}" --max-tokens 1k --forget state-norm:every=64,calib=128 --out "$o/ppl-norm-$m"
    $s probe --model "tests/data/$m" "${t[@]}" --max-tokens 512 --out "$o/probe-$m"
  done
  $s passkey --model tests/data/rwkv6_tiny --tokenizer "$bytes_tok" --lengths 512 --samples 1 \
    --forget window:r=32 --out "$o/passkey-rwkv6_tiny"
}
# Both write to the same place (paths enter fingerprints), then move aside.
runs "$before" "$work/run/out" 2> "$work/run/before.log" && mv "$work/run/out" "$work/run/before"
runs "$after" "$work/run/out" 2> "$work/run/after.log" && mv "$work/run/out" "$work/run/after"

python3 - "$work/run/before" "$work/run/after" <<'EOF'
import json, os, sys
a, b = sys.argv[1], sys.argv[2]
def files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
def norm(v):
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items() if k not in ("seconds", "tokens_per_s", "peak_rss_bytes", "model", "checksum")}
    if isinstance(v, list):
        return [norm(x) for x in v]
    return v
bad = []
fa, fb = files(a), files(b)
for f in sorted(set(fa) ^ set(fb)):
    bad.append(f"only in {'before' if f in fa else 'after'}: {f}")
for f in sorted(set(fa) & set(fb)):
    x, y = open(os.path.join(a, f), "rb").read(), open(os.path.join(b, f), "rb").read()
    if f.endswith(".json") and not f.endswith("checkpoint.json"):
        x, y = norm(json.loads(x)), norm(json.loads(y))
    if x != y:
        bad.append(f"differs: {f}")
print(f"{len(set(fa) & set(fb))} files compared")
for l in bad:
    print(l)
sys.exit(1 if bad else 0)
EOF
