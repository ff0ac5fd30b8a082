#!/usr/bin/env python3
"""A 256-id byte-level tokenizer.json (GPT-2 byte alphabet, no merges) for the HGRN-2 tiny synth preset, whose
embedding has 256 rows: `python3 tools/byte_tokenizer.py OUT.json`, then `stuffed ppl --tokenizer OUT.json`.
Standard library only; deterministic."""
import json
import sys
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~")+1))+list(range(ord("¡"), ord("¬")+1))+list(range(ord("®"), ord("ÿ")+1))
    cs = bs[:]; n = 0
    for b in range(256):
        if b not in bs: bs.append(b); cs.append(256+n); n += 1
    return dict(zip(bs, map(chr, cs)))
m = bytes_to_unicode()
vocab = {m[b]: b for b in range(256)}
tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
 "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
 "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
           "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": []}}
json.dump(tok, open(sys.argv[1], "w"), ensure_ascii=False)
