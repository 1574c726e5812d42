"""Shared fixtures: a toy bilingual corpus whose true pairs a toy encoder finds."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.jobs import write_shards, write_spec

# Concept -> (English word, German word). The toy encoder maps both words to
# the concept, so a sentence and its word-for-word translation share a vector.
CONCEPTS = [f"c{i:03d}" for i in range(300)]


def _word(concept: str, lang: str) -> str:
    # Made-up but distinct surface forms per language, so only the lexicon
    # links them.
    return f"{lang}{concept[1:]}w"


@dataclass
class ToyCorpus:
    root: Path
    spec: Path
    gold: set[tuple[str, str]]


def write_toy_corpus(
    root: Path,
    n_pairs: int = 60,
    n_unpaired: int = 120,
    shards: int = 2,
    seed: int = 0,
    extra_spec: str = "",
) -> ToyCorpus:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lexicon = root / "lexicon.tsv"
    with open(lexicon, "w", encoding="utf-8") as fh:
        for c in CONCEPTS:
            fh.write(f"{_word(c, 'en')}\t{c}\n{_word(c, 'de')}\t{c}\n")

    def sentence(concepts: list[str], lang: str) -> str:
        words = [_word(c, lang) for c in concepts]
        rng.shuffle(words)  # bag of words: order must not matter
        return " ".join(words)

    used: set[tuple[str, ...]] = set()

    def bag() -> list[str]:
        while True:
            b = tuple(sorted(rng.sample(CONCEPTS, 6)))
            if b not in used:
                used.add(b)
                return list(b)

    en: list[str] = []
    de: list[str] = []
    gold: set[tuple[str, str]] = set()
    for _ in range(n_pairs):
        b = bag()
        e, d = sentence(b, "en"), sentence(b, "de")
        en.append(e)
        de.append(d)
        gold.add((e, d))
    en += [sentence(bag(), "en") for _ in range(n_unpaired)]
    de += [sentence(bag(), "de") for _ in range(n_unpaired)]
    rng.shuffle(en)
    rng.shuffle(de)
    for lang, lines in (("en", en), ("de", de)):
        per = -(-len(lines) // shards)
        chunks = [lines[s * per : (s + 1) * per] for s in range(shards)]
        write_shards(root / "corpus" / lang, chunks)
    gold_path = root / "gold.en-de.tsv"
    gold_path.write_text("".join(f"{e}\t{d}\n" for e, d in sorted(gold)), encoding="utf-8")
    tables = {
        "job": {"name": "toy", "work_dir": "work"},
        "encoder": {"kind": "toy", "dim": 256, "lexicon": "lexicon.tsv"},
        "search": {"k": 4},
        "mine": {"margin": "ratio", "retrieval": "max", "threshold": 1.5},
        "evaluate": {"gold": {"en-de": "gold.en-de.tsv"}},
    }
    spec = write_spec(root / "job.toml", ["en-de"], tables, extra=extra_spec)
    return ToyCorpus(root=root, spec=spec, gold=gold)


@pytest.fixture(scope="session")
def tiny_mst5(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base, adapter) folders of a tiny m-ST5 look-alike, built once; tests only read them."""
    from tests.tiny_models import build_tiny_mst5

    return build_tiny_mst5(tmp_path_factory.mktemp("tiny_mst5"))


@pytest.fixture
def one_faiss_thread() -> Iterator[None]:
    """FAISS on one thread, for tests whose indexes hold a few hundred vectors.

    OpenMP's threads would only wait on each other there, and on a loaded machine
    (tests run beside other work) a spinning barrier turns milliseconds into seconds.
    """
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture
def toy_corpus(tmp_path: Path) -> ToyCorpus:
    return write_toy_corpus(tmp_path / "toy")
