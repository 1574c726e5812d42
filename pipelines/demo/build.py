"""Build the demo corpus from the hand-written sentences in raw/.

raw/triples_*.tsv      English<TAB>German<TAB>French translations (the gold)
raw/unpaired_<l>.txt   sentences with no translation anywhere in the corpus

Each language side mixes its 300 translated sentences with more than three
times as many unpaired ones, shuffled with a fixed seed and cut into two
shards. Two lines of noise (an empty line, a repeated sentence) stand in the
English side so the demo's stats show rejections. Run from anywhere:

    python pipelines/demo/build.py
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
LANGS = ("en", "de", "fr")
SHARDS = 2


def main() -> None:
    triples = []
    for path in sorted((HERE / "raw").glob("triples_*.tsv")):
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split("\t")
            if len(parts) != 3 or not all(p.strip() for p in parts):
                raise ValueError(f"{path}:{line_no}: expected English<TAB>German<TAB>French")
            triples.append(tuple(p.strip() for p in parts))
    rng = random.Random(20261203)
    for i, lang in enumerate(LANGS):
        unpaired = (HERE / "raw" / f"unpaired_{lang}.txt").read_text(encoding="utf-8").split("\n")
        unpaired = [u.strip() for u in unpaired if u.strip()]
        paired = [t[i] for t in triples]
        clash = set(unpaired) & set(paired)
        if clash:
            raise ValueError(f"{lang}: sentences both paired and unpaired: {sorted(clash)[:3]}")
        lines = paired + unpaired
        if len(set(lines)) != len(lines):
            raise ValueError(f"{lang}: duplicate sentences in the raw files")
        rng.shuffle(lines)
        if lang == "en":
            lines.insert(17, "")
            lines.insert(400, lines[3])
        folder = HERE / "corpus" / lang
        folder.mkdir(parents=True, exist_ok=True)
        per = -(-len(lines) // SHARDS)
        for s in range(SHARDS):
            chunk = lines[s * per : (s + 1) * per]
            (folder / f"part-{s}.txt").write_text("".join(x + "\n" for x in chunk), "utf-8")
        print(f"{lang}: {len(paired)} paired + {len(unpaired)} unpaired in {SHARDS} shards")
    for i, lang in enumerate(LANGS[1:], 1):
        gold = "".join(f"{t[0]}\t{t[i]}\n" for t in triples)
        (HERE / f"gold.en-{lang}.tsv").write_text(gold, encoding="utf-8")


if __name__ == "__main__":
    main()
