#!/usr/bin/env bash
# stuffed beside llama.cpp on the CPU, at equal work (issue 22 item 6; recipe: ../shared/CPU_PEERS.md).
#
#   tools/bench_cpu_peers.sh [--pairs 5] [--threads 2] [--models "130m-bf16 130m-f32 370m-bf16 rwkv6-1.6b-bf16"]
#                            [--stage build|models|run|all] [--decode-only]
#
# Everything it needs comes from the package registries and lands in $PEERS_DIR (default
# ~/.cache/stuffed-peers); nothing in the project depends on llama.cpp, only this tool:
#   1. llama.cpp from the PyPI sdist of llama-cpp-python 0.3.36 (its vendor/llama.cpp is ggml-org
#      0c1e570), built with cmake (apt) -DGGML_NATIVE=ON -DLLAMA_CURL=OFF: llama-perplexity,
#      llama-bench, llama-tokenize (~10 min on 2 cores, once).
#   2. A venv with pinned torch, transformers, numpy, safetensors, sentencepiece for the vendored
#      convert_hf_to_gguf.py (tools/peers_requirements.txt; ~5 GB, once). PEERS_PYTHON=/path/python
#      uses an interpreter that already has them instead.
#   3. `stuffed synth` models (seeded random weights at the released shapes) with the GPT-NeoX-20B
#      tokenizer.json and a minimal tokenizer_config.json beside them; RWKV-6 renamed to HF
#      Rwkv6ForCausalLM names (tools/peers_hf_names.py); each converted to GGUF in its own dtype.
#   4. The token ids checked equal (llama-tokenize against `stuffed tokenize`), then, in alternating
#      pairs (stuffed, llama.cpp, stuffed, …; quote the paired medians):
#      - scoring: `stuffed ppl` over the first N tokens of Persuasion in windows of 2,048 from the zero
#        state (`--forget reset:2048`, as llama-perplexity computes), every position's LM head, against
#        `llama-perplexity -c 2048 -b 2048`, which computes the head only for the second half of each
#        window. "Equal work" scales llama.cpp's tok/s by its share of stuffed's FLOPs
#        (layers + half the head) / (layers + head). Mean NLL of both over the same positions (the
#        second half of each window, as llama-perplexity scores them).
#      - decode: `stuffed bench --decode 128` ms/token (and its share of the read bandwidth) against one
#        repetition of `llama-bench -p 0 -n 128` per round. `--decode-only` skips the scoring rounds
#        (results in $PEERS_DIR/results/decode-t<threads>/).
#   Results: $PEERS_DIR/results/<model>.json and a Markdown table on stdout.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS_DIR=${PEERS_DIR:-$HOME/.cache/stuffed-peers}
PAIRS=5
THREADS=2
MODELS="130m-bf16 130m-f32 370m-bf16 rwkv6-1.6b-bf16"
STAGE=all
DECODE_ONLY=()
while [ $# -gt 0 ]; do
    case $1 in
        --pairs) PAIRS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --models) MODELS=$2; shift 2 ;;
        --stage) STAGE=$2; shift 2 ;;
        --decode-only) DECODE_ONLY=(--decode-only); shift ;;
        *) echo "bench_cpu_peers.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
LLAMA_VERSION=0.3.36
SRC=$PEERS_DIR/llama-cpp-python-$LLAMA_VERSION
LLAMA=$SRC/vendor/llama.cpp
BIN=$LLAMA/build/bin
STUFFED=${STUFFED:-$ROOT/target/release/stuffed}  # another binary: STUFFED=/path/to/stuffed
TEXT=$ROOT/host/assets/corpus/austen_persuasion.txt
mkdir -p "$PEERS_DIR"
say() { echo "bench_cpu_peers: $*" >&2; }

build_llama() {
    if [ -x "$BIN/llama-perplexity" ] && [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-tokenize" ]; then
        return
    fi
    command -v cmake >/dev/null || { say "cmake is missing (apt-get install -y cmake)"; exit 1; }
    if [ ! -d "$LLAMA" ]; then
        say "downloading llama-cpp-python $LLAMA_VERSION (sdist)"
        python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$PEERS_DIR/dl" >&2
        tar -xzf "$PEERS_DIR/dl/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$PEERS_DIR"
        mv "$PEERS_DIR/llama_cpp_python-$LLAMA_VERSION" "$SRC"
    fi
    say "building llama.cpp (GGML_NATIVE=ON)"
    cmake -S "$LLAMA" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF >&2
    cmake --build "$LLAMA/build" -j"$(nproc)" --target llama-perplexity llama-bench llama-tokenize >&2
}

python_for_converter() {
    if [ -n "${PEERS_PYTHON:-}" ]; then
        echo "$PEERS_PYTHON"
        return
    fi
    local venv=$PEERS_DIR/venv
    if [ ! -f "$venv/.installed" ]; then
        say "making the converter's venv ($venv)"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q -r "$ROOT/tools/peers_requirements.txt" >&2
        touch "$venv/.installed"
    fi
    echo "$venv/bin/python"
}

build_llama
[ "$STAGE" = build ] && exit 0

# 3. Models: NAME → family, preset, dtype, tokens scored.
spec() {
    case $1 in
        130m-bf16) echo "mamba2 130m bf16 4096" ;;
        130m-f32) echo "mamba2 130m f32 4096" ;;
        370m-bf16) echo "mamba2 370m bf16 4096" ;;
        rwkv6-1.6b-bf16) echo "rwkv6 1.6b bf16 2048" ;;
        *) say "unknown model $1 (130m-bf16 130m-f32 370m-bf16 rwkv6-1.6b-bf16)"; exit 2 ;;
    esac
}
[ -x "$STUFFED" ] || (cd "$ROOT" && cargo build --release -p stuffed >&2)
ARGS=()
for name in $MODELS; do
    read -r family preset dtype tokens <<<"$(spec "$name")"
    dir=$PEERS_DIR/models/$name
    gguf=$PEERS_DIR/models/$name.gguf
    if [ ! -f "$gguf" ]; then
        say "writing $name (stuffed synth) and converting it to GGUF"
        rm -rf "$dir" "$dir-hf"
        PY=$(python_for_converter)  # only when a model must be converted (the venv is ~5 GB)
        "$STUFFED" synth --family "$family" --preset "$preset" --dtype "$dtype" --out "$dir" >&2
        if [ "$family" = rwkv6 ]; then
            # The converter reads HF Rwkv6ForCausalLM names and the RWKV World vocab file.
            "$PY" "$ROOT/tools/peers_hf_names.py" "$dir" "$dir-hf" >&2
            cp "$ROOT/host/assets/rwkv_vocab_v20230424.txt" "$dir-hf/"
            src=$dir-hf
        else
            cp "$ROOT/host/assets/20B_tokenizer.json" "$dir/tokenizer.json"
            cat >"$dir/tokenizer_config.json" <<'JSON'
{"tokenizer_class": "GPTNeoXTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
 "unk_token": "<|endoftext|>", "add_bos_token": false, "add_eos_token": false}
JSON
            src=$dir
        fi
        PYTHONPATH=$LLAMA/gguf-py "$PY" "$LLAMA/convert_hf_to_gguf.py" "$src" --outtype "$dtype" --outfile "$gguf.part" >&2
        mv "$gguf.part" "$gguf"
    fi
    # The same ids on both sides, or the comparison means nothing.
    "$STUFFED" tokenize --model "$dir" --file "$TEXT" | tr ' ' '\n' | grep -v '^$' >"$PEERS_DIR/models/$name.ids.stuffed"
    "$BIN/llama-tokenize" -m "$gguf" -f "$TEXT" --ids --log-disable 2>/dev/null | tr -d '[] ' | tr ',' '\n' \
        | grep -v '^$' >"$PEERS_DIR/models/$name.ids.llama"
    if ! cmp -s "$PEERS_DIR/models/$name.ids.stuffed" "$PEERS_DIR/models/$name.ids.llama"; then
        say "$name: llama-tokenize and stuffed tokenize disagree on $TEXT ($(wc -l <"$PEERS_DIR/models/$name.ids.stuffed") vs $(wc -l <"$PEERS_DIR/models/$name.ids.llama") ids)"
        exit 1
    fi
    ARGS+=(--model "$name:$dir:$gguf:$tokens")
done
[ "$STAGE" = models ] && exit 0

# 4. Timing.
say "timing ${MODELS} (${PAIRS} rounds, ${THREADS} threads); lscpu flags: $(grep -o -w 'avx512_bf16\|amx_tile\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 "$ROOT/tools/bench_cpu_peers.py" --stuffed "$STUFFED" --llama-bin "$BIN" "${ARGS[@]}" --text "$TEXT" \
    --pairs "$PAIRS" --threads "$THREADS" "${DECODE_ONLY[@]}" \
    --out "$PEERS_DIR/results${DECODE_ONLY:+/decode-t$THREADS}"
