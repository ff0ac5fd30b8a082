#!/usr/bin/env python3
"""The World English Bible (public domain) as plain training text, one document per book (short books
joined, below) separated by <|endoftext|> (train_tiny.py --extra-text). Recipe attempt 2 of issue 26 mixes it into the Austen
training text so the tiny models see English that is not Austen's (American spelling, typographic
quotes and dashes, other names and subjects).

Source: Debian's `sword-text-web` 426.0-1 (SWORD module engWEB2015eb, "World English Bible with
Deuterocanon", DistributionLicense=Public Domain), exported by `mod2imp` from `libsword-utils`:

    apt-get install -y libsword-utils sword-text-web
    python3 tools/web_bible.py ~/.cache/stuffed/texts/web_bible.txt

The OSIS markup is dropped: footnotes (<note>) entirely, Strong's word tags and milestones keep only
their text, a paragraph or title starts a new line. The preface and other front matter (verse 0 of a
book or chapter) are left out. Prints the output's size and sha256 (train_tiny.py records it).
"""
import hashlib
import html
import re
import subprocess
import sys

EOT = "<|endoftext|>"
NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
# A paragraph's opening div (sID and type="x-p" in either order), a title or a line break.
BREAK = re.compile(r'<(?:div\b(?=[^>]*\bsID=)(?=[^>]*\btype="x-p")|title\b|lb\b)[^>]*>')
TITLE_END = re.compile(r"</title>")
TAG = re.compile(r"<[^>]+>")
MIN_CHARS = 20_000
KEY = re.compile(r"^\$\$\$(.+?) (\d+):(\d+)$")


def clean(raw):
    s = NOTE.sub(" ", raw)
    s = BREAK.sub("\n", s)
    s = TITLE_END.sub("\n", s)
    s = html.unescape(TAG.sub("", s))
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r" +([,.;:!?’”)\]])", r"\1", s)
    s = re.sub(r"([(\[“‘]) +", r"\1", s)
    return "\n".join(line.strip() for line in s.split("\n"))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = subprocess.run(["mod2imp", "engWEB2015eb"], check=True, capture_output=True, text=True).stdout
    books, key = {}, None
    for line in out.split("\n"):
        m = KEY.match(line)
        if line.startswith("$$$"):
            key = (m.group(1), int(m.group(2)), int(m.group(3))) if m else None
            continue
        if key is None or key[1] == 0 or key[2] == 0:
            continue  # module/testament headings, prefaces, chapter introductions
        books.setdefault(key[0], []).append(clean(line))
    # One document per book, except that short books join the next ones (in canonical order) until a
    # document has MIN_CHARS: every document then holds a 2,049-token window, so the models trained on 64
    # and on 2,048 tokens draw from the same text.
    docs, pending = [], ""
    for verses in books.values():
        text = " ".join(v for v in verses if v)
        pending += re.sub(r" *\n+ *", "\n", text).strip() + "\n"
        if len(pending) >= MIN_CHARS:
            docs.append(pending)
            pending = ""
        else:
            pending += "\n"
    if pending:
        docs[-1] += "\n" + pending.rstrip("\n") + "\n"
    data = EOT.join(docs)
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write(data)
    raw = data.encode("utf-8")
    print(f"{sys.argv[1]}: {len(books)} books in {len(docs)} documents, {len(raw):,} bytes, {len(data.split()):,} words, "
          f"sha256 {hashlib.sha256(raw).hexdigest()}")


if __name__ == "__main__":
    main()
