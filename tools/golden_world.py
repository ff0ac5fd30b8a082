#!/usr/bin/env python3
"""Golden ids for the RWKV World tokenizer from the `rwkv` package's TRIE_TOKENIZER (FORMATS §5.2-5.3).

Writes tests/data/tokenizer_world.json:
  {"vectors": [{"text", "ids"}...],                      # FORMATS §5.3 + varied strings
   "corpus": [{"file", "bytes", "tokens", "sha256", "head"}...]}
for every host/assets/corpus/*.txt and *.txt.gz (decompressed): the token count, the sha256 of the
whole id sequence as little-endian u32, and the first 2,000 ids.  The package's own (CRLF) copy
of the vocab is used, so the Rust test also checks that the shipped LF copy is the same vocab.

    /root/pyref/bin/python tools/golden_world.py
"""
import glob
import gzip
import hashlib
import json
import os
import struct

import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")

VECTORS = [
    ("The pass key is 71432.", [6699, 31635, 21952, 4600, 3544, 663, 51, 47]),
    (" The pass key is 71432. Remember it. 71432 is the pass key.",
     [20996, 31635, 21952, 4600, 3544, 663, 51, 47, 55283, 4601, 47, 3544, 663, 51, 4600, 22590, 31635, 21952, 47]),
    (" What is the pass key? The pass key is", [30031, 4600, 22590, 31635, 21952, 64, 20996, 31635, 21952, 4600]),
    (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
     [20996, 38626, 4600, 38631, 47, 20996, 22485, 4600, 30302, 47, 20996, 22533, 4600, 47825, 47, 29059, 4858, 4559, 47, 37451, 21265, 30218, 37635, 47]),
    ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.",
     [33504, 4600, 4419, 59829, 31155, 46196, 46301, 332, 22031, 4706, 62161, 32224, 47, 28892, 4601, 21265, 39001, 7946, 32229, 47, 308, 32475, 31809, 22799, 37598, 22590, 59829, 63637, 39934, 47]),
    (" 71432", [3544, 663, 51]),
    ("71432", [691, 663, 51]),
    ("Hello\n\n  world", [33155, 19241, 36017]),
]
MORE = [
    "", " ", "\n", "\n" * 7, "\t\tindented\r\nline", "naïve café résumé", "日本語のテキスト、中文文本。",
    "emoji 🙂🚀 done", "a\u3000b", "'quotes' \"double\" \\backslash\\", "\x00\x01\x7f\u0080\u00ff",
    "x" * 300, "The the THE tHe", "   leading and trailing   ", "12345678901234567890", "<|endoftext|>",
]


def main():
    tok = TRIE_TOKENIZER(VOCAB)
    vectors = []
    for text, want in VECTORS:
        got = tok.encode(text)
        assert got == want, (text, got, want)
        vectors.append({"text": text, "ids": got})
    for text in MORE:
        vectors.append({"text": text, "ids": tok.encode(text)})
    corpus = []
    paths = sorted(glob.glob(os.path.join(ROOT, "host/assets/corpus/*.txt")) +
                   glob.glob(os.path.join(ROOT, "host/assets/corpus/*.txt.gz")))
    for p in paths:
        data = gzip.open(p, "rb").read() if p.endswith(".gz") else open(p, "rb").read()
        ids = tok.encodeBytes(data)
        assert tok.decodeBytes(ids) == data
        h = hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()
        corpus.append({"file": os.path.relpath(p, ROOT), "bytes": len(data), "tokens": len(ids),
                       "sha256": h, "head": ids[:2000]})
        print(p, len(data), len(ids), h)
    out = os.path.join(ROOT, "tests/data/tokenizer_world.json")
    with open(out, "w") as f:
        json.dump({"vocab": "rwkv_vocab_v20230424 (rwkv 0.8.32 wheel copy, CRLF)", "vectors": vectors,
                   "corpus": corpus}, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
