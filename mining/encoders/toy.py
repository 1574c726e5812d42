"""A deterministic bag-of-concepts encoder, for tests and examples.

Words are lower-cased and mapped through a lexicon to a concept (so "one",
"un" and "eins" can all be the concept "one"); each concept has a fixed
pseudo-random vector derived from a hash of its name, and a sentence is the
normalised sum of its concepts. Sentences that are word-for-word translations
under the lexicon get the same vector, which is what lets an end-to-end test
demand that every true pair is found.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from mining.encoders.base import l2_normalise

_WORD = re.compile(r"\w+", re.UNICODE)


def read_lexicon(path: Path) -> dict[str, str]:
    """TSV `word<TAB>concept` lines; '#' starts a comment."""
    lexicon: dict[str, str] = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"{path}:{line_no}: expected word<TAB>concept")
        lexicon[parts[0].strip().lower()] = parts[1].strip().lower()
    return lexicon


class ToyEncoder:
    def __init__(self, dim: int = 64, lexicon: Mapping[str, str] | None = None) -> None:
        self.dim = dim
        self.lexicon = dict(lexicon or {})

    @lru_cache(maxsize=65536)  # noqa: B019 - instances live as long as the job
    def _concept_vector(self, concept: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(concept.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower()) or [""]
            for word in words:
                out[row] += self._concept_vector(self.lexicon.get(word, word))
        return l2_normalise(out)
