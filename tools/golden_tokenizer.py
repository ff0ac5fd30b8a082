#!/usr/bin/env python3
"""Golden vectors for the GPT-NeoX-20B BPE tokenizer (Mamba / Mamba-2).

Encodes ~45 varied strings with the Python `tokenizers` package (pinned in
tools/requirements.txt) and `encode(text, add_special_tokens=False)`, and writes
`tests/data/tokenizer_neox.json` = [{"text": ..., "ids": [...]}, ...].
It also copies the tokenizer file to `host/assets/20B_tokenizer.json` (the binary ships it).

Run from the repository root:

    /root/pyref/bin/python tools/golden_tokenizer.py \
        [--tokenizer /work/shared/assets/tokenizers/20B_tokenizer.json] \
        [--corpus /work/shared/assets/corpus/austen_emma.txt]

Deterministic: no randomness is involved.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys

import tokenizers
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"

# (text, expected ids or None) -- the expected ones are FORMATS.md §5.3.
FORMATS_VECTORS = [
    ("The pass key is 71432.", [510, 1509, 2234, 310, 818, 1047, 1237, 15]),
    (" The pass key is 71432. Remember it. 71432 is the pass key.",
     [380, 1509, 2234, 310, 818, 1047, 1237, 15, 18741, 352, 15, 818, 1047, 1237, 310, 253, 1509, 2234, 15]),
    (" What is the pass key? The pass key is", [1737, 310, 253, 1509, 2234, 32, 380, 1509, 2234, 310]),
    (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
     [380, 10583, 310, 4759, 15, 380, 8467, 310, 4797, 15, 380, 5101, 310, 8862, 15, 3856, 359, 564, 15,
      1707, 285, 896, 969, 15]),
    ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
     "I will quiz you about the important information there.",
     [2512, 310, 271, 1774, 8692, 8763, 3304, 247, 2257, 273, 19124, 2505, 15, 9985, 352, 285, 16407, 907,
      731, 15, 309, 588, 39627, 368, 670, 253, 1774, 1491, 627, 15]),
    (" 71432", [818, 1047, 1237]),
    ("71432", [44034, 1237]),
    (" Hello world", [24387, 1533]),
    ("Hello\n\n  world<|endoftext|>", [12092, 535, 50276, 10186, 0]),
]


def cases(corpus_path):
    out = list(FORMATS_VECTORS)
    extra = [
        "",
        # runs of spaces (the added tokens 50254..50276 are runs of 24..2 spaces)
        " ", "  ", "   ", "a b", "a  b", "a   b", "a    b",
        "x" + " " * 5 + "y", "x" + " " * 8 + "y", "x" + " " * 23 + "y", "x" + " " * 24 + "y",
        "x" + " " * 25 + "y", "x" + " " * 30 + "y", " " * 30, " " * 30 + "end",
        # newlines / tabs / mixed whitespace
        "\n", "\n\n", "\n\n\n\n\n", "line1\nline2\n\nline3\n\n\n", "\r\n\r\nwindows\r\n",
        "\tTab\t\tseparated\tvalues\t", "\n\n  world", " \n \n  \t x",
        # unicode
        "café naïve résumé Ångström façade", "e\u0301 a\u0308 o\u0303 (combining marks; NFC composes)",
        "日本語のテキスト、中文文本和한국어",
        "emoji 😀👍🏽 🇯🇵 👨‍👩‍👧‍👦 ❤️",
        "مرحبا بالعالم שלום עולם",
        "Ελληνικά Русский текст",
        # digits / numbers
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 10000", "3.14159265358979323846264338327950288419716939937510",
        "12345678901234567890 -42 +7 1e-5 0x1F 1,000,000",
        # punctuation and code
        "Hello, world! What's up? (yes) [no] {maybe}... \"quoted\" 'single' — dash – en; colon: ok",
        "def f(x):\n    return x ** 2  # square\n\nfor i in range(10):\n\tprint(f(i))\n",
        "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
        "<|endoftext|>", "before<|endoftext|>after", "a<|endoftext|><|endoftext|>b <|padding|> c",
        "I'm you're he's they'll we've she'd DON'T",
        "https://example.com/path?q=1&r=two#frag user@example.org",
    ]
    out += [(t, None) for t in extra]
    with open(corpus_path, encoding="utf-8") as f:
        text = f.read()
    out.append((text[20000:22048], None))  # a 2 KB slice of Emma
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="/work/shared/assets/tokenizers/20B_tokenizer.json")
    ap.add_argument("--corpus", default="/work/shared/assets/corpus/austen_emma.txt")
    args = ap.parse_args()

    with open(args.tokenizer, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        sys.exit(f"unexpected sha256 {digest}")
    tok = Tokenizer.from_file(args.tokenizer)
    print("tokenizers", tokenizers.__version__)

    records = []
    for text, expect in cases(args.corpus):
        ids = tok.encode(text, add_special_tokens=False).ids
        if expect is not None and ids != expect:
            sys.exit(f"mismatch with FORMATS §5.3 for {text!r}: {ids} != {expect}")
        records.append({"text": text, "ids": ids})

    os.makedirs(os.path.join(ROOT, "tests", "data"), exist_ok=True)
    path = os.path.join(ROOT, "tests", "data", "tokenizer_neox.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path}: {len(records)} cases, {sum(len(r['ids']) for r in records)} ids")

    dst = os.path.join(ROOT, "host", "assets", "20B_tokenizer.json")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(args.tokenizer, dst)
    print(f"copied {args.tokenizer} -> {dst}")


if __name__ == "__main__":
    main()
