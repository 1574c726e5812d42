"""Quality measures of the field: BUCC-style pair F1 and Tatoeba accuracy."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


def read_gold(path: Path) -> set[tuple[str, str]]:
    """`source<TAB>target` per line; a malformed line stops with its number."""
    gold: set[tuple[str, str]] = set()
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{path}:{line_no}: expected source<TAB>target")
            gold.add((parts[0].strip(), parts[1].strip()))
    if not gold:
        raise ValueError(f"{path}: no gold pairs")
    return gold


def bitext_scores(
    predicted: Iterable[tuple[str, str]], gold: set[tuple[str, str]]
) -> dict[str, float | int]:
    """Precision, recall and F1 of predicted pairs against gold, as BUCC counts them."""
    found = set(predicted)
    correct = len(found & gold)
    precision = correct / len(found) if found else 0.0
    recall = correct / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "predicted": len(found),
        "gold": len(gold),
        "correct": correct,
        "precision": round(precision, 6),
        "recall": round(recall, 6),
        "f1": round(f1, 6),
    }


def tatoeba_accuracy(src: np.ndarray, tgt: np.ndarray) -> float:
    """Share of rows i whose nearest target by cosine is target i (src -> tgt).

    Tatoeba's protocol: n aligned sentence pairs, retrieval over the n targets.
    Rows must be L2-normalised.
    """
    if src.shape != tgt.shape:
        raise ValueError(f"src {src.shape} and tgt {tgt.shape} must be aligned row for row")
    nearest = np.argmax(src.astype(np.float32) @ tgt.astype(np.float32).T, axis=1)
    return float((nearest == np.arange(len(src))).mean())
