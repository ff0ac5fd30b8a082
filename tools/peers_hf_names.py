#!/usr/bin/env python3
"""A `stuffed synth --family rwkv6` directory (BlinkDL names) → the HF `Rwkv6ForCausalLM` names and
config that llama.cpp's convert_hf_to_gguf.py reads (for tools/bench_cpu_peers.sh).

    python tools/peers_hf_names.py SRC_DIR DST_DIR
Same tensors, same bytes; `rescale_every` 0 (the weights are not rescaled).
"""
import json
import os
import re
import sys

from safetensors.torch import load_file, save_file

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
t = load_file(os.path.join(src, "model.safetensors"))
cfg = json.load(open(os.path.join(src, "config.json")))


def hf(name):
    if name == "emb.weight":
        return "rwkv.embeddings.weight"
    if name.startswith("head."):
        return name
    if name.startswith("ln_out."):
        return "rwkv." + name
    name = re.sub(r"^blocks\.0\.ln0\.", "blocks.0.pre_ln.", name)
    name = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
    name = re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)
    return "rwkv." + name


out = {hf(k): v.contiguous() for k, v in t.items()}
save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
c = out["rwkv.embeddings.weight"].shape[1]
n_layer = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("rwkv.blocks."))
head_size = out["rwkv.blocks.0.attention.time_faaaa"].shape[-1]
ffn = out["rwkv.blocks.0.feed_forward.key.weight"].shape[0]
json.dump({"architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "hidden_size": c,
           "num_hidden_layers": n_layer, "head_size": head_size, "attention_hidden_size": c,
           "intermediate_size": ffn, "layer_norm_epsilon": 1e-5, "rescale_every": 0,
           "vocab_size": out["rwkv.embeddings.weight"].shape[0], "tie_word_embeddings": False,
           "bos_token_id": 0, "eos_token_id": 0}, open(os.path.join(dst, "config.json"), "w"), indent=1)
print(f"{dst}: {len(out)} tensors, C {c}, {n_layer} layers, head {head_size}, ffn {ffn} (from {cfg.get('model_type', '?')})")
