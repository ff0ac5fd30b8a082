#!/usr/bin/env python3
"""A Llama/Mistral-style tokenizer.json (the kind HGRN-2 checkpoints ship) and its ids of a long text.

Llama-family tokenizers mark the start of every input: the normalizer prepends "▁" (and turns spaces
into "▁"), there is no pre-tokenizer, and a newline is the byte-fallback token <0x0A> (no token
holds "\n" with anything else). So text tokenized in pieces gets a "▁" at each piece's start unless
the pieces are tokenized with some of the text before them; `stuffed` streams long texts in pieces,
and its tests compare them with these ids of the whole text at once.

Writes `tests/data/tokenizer_llama_style/tokenizer.json` (a BPE of 2,000 ids trained here on the
first 200,000 characters of Persuasion, in that pipeline) and `ref.json` =
{"chars": N, "ids": [...]}: `encode(text[:N], add_special_tokens=False)` with `tokenizers` 0.23.3.

Run from the repository root:  python3 tools/golden_llama_tokenizer.py
Deterministic: BPE training has no randomness.
"""
import json
import os

import tokenizers
from tokenizers import Tokenizer, decoders, models, normalizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "host/assets/corpus/austen_persuasion.txt")
OUT = os.path.join(ROOT, "tests/data/tokenizer_llama_style")
CHARS = 120_000


def main():
    assert tokenizers.__version__ == "0.23.3", tokenizers.__version__
    text = open(CORPUS, encoding="utf-8").read()
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # Newlines never enter the alphabet, so they fall back to <0x0A> as in Llama's vocab.
    train = text[:200_000].replace("\n", " ")
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"] + bytes_)
    tok.train_from_iterator([train[i : i + 5000] for i in range(0, len(train), 5000)], trainer)
    assert not any("\n" in t for t in tok.get_vocab()), "a token holds a newline"
    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    ids = tok.encode(text[:CHARS], add_special_tokens=False).ids
    assert tok.token_to_id("<0x0A>") in ids
    with open(os.path.join(OUT, "ref.json"), "w") as f:
        json.dump({"chars": CHARS, "ids": ids}, f)
    print(f"{len(ids)} ids for {CHARS} characters; vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
