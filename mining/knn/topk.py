"""Top-k lists: ordering, merging partial results, and a running top-k.

A top-k list here is a pair of (n, k) arrays, `scores` (float32) and `ids`
(int64), each row sorted by score descending and, among equal scores, by id
ascending. That total order is what makes a merged result independent of how
the candidates were split (over index shards, over target blocks): the same
candidates give the same list, in the same order, however they arrive.

Empty slots (a partial list with fewer than k candidates so far) hold
score -inf and id -1, and sort after every real candidate.
"""

from __future__ import annotations

import numpy as np

EMPTY_ID = -1
EMPTY_SCORE = -np.inf


def empty_topk(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.full((n, k), EMPTY_SCORE, dtype=np.float32),
        np.full((n, k), EMPTY_ID, dtype=np.int64),
    )


def sort_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (score descending, id ascending); empty slots last."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if scores.shape != ids.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} must be equal 2-D shapes")
    if scores.size == 0:
        return scores.copy(), ids.copy()
    if np.isnan(scores).any():
        raise ValueError("scores must not be NaN")
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    # Equal scores are rare (the exact kernel, FAISS's PQ codes, 16-bit
    # products): only rows that hold some are sorted again with the id as the
    # second key, which lexsort would cost on every row.
    # (Empty slots tie at -inf, but all carry id -1: their order is moot.)
    tied = ((scores[:, 1:] == scores[:, :-1]) & (scores[:, 1:] > EMPTY_SCORE)).any(axis=1)
    if tied.any():
        rows_s, rows_i = scores[tied], ids[tied]
        # Empty slots get the largest id so that they stay last among -inf ties.
        tie_key = np.where(rows_i == EMPTY_ID, np.iinfo(np.int64).max, rows_i)
        again = np.lexsort((tie_key, -rows_s), axis=1)
        scores[tied] = np.take_along_axis(rows_s, again, axis=1)
        ids[tied] = np.take_along_axis(rows_i, again, axis=1)
    return scores, ids


def merge_topk(
    scores_a: np.ndarray,
    ids_a: np.ndarray,
    scores_b: np.ndarray,
    ids_b: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The top k of two partial lists over the same queries (rows).

    The two lists must hold disjoint candidates (different index shards or
    target blocks): a candidate present in both would be counted twice.
    Either input may be unsorted and of any width; the output is sorted and
    exactly k wide, padded with empty slots.
    """
    if scores_a.shape[0] != scores_b.shape[0]:
        raise ValueError(
            f"cannot merge lists over {scores_a.shape[0]} and {scores_b.shape[0]} rows"
        )
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    scores, ids = sort_rows(scores, ids)
    if scores.shape[1] < k:
        pad_scores, pad_ids = empty_topk(scores.shape[0], k - scores.shape[1])
        return np.hstack([scores, pad_scores]), np.hstack([ids, pad_ids])
    return np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(ids[:, :k])


class RunningTopK:
    """The top k candidates of n queries, fed partial results block by block.

    Memory is n x k (12 bytes a slot) whatever the number of candidates fed,
    which is what lets a query shard search any number of index shards.
    """

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.scores, self.ids = empty_topk(n, k)
        # Rows fed at least once; a first feed needs a sort, not a merge.
        self.fed = np.zeros(n, dtype=bool)

    def add(self, start: int, scores: np.ndarray, ids: np.ndarray) -> None:
        """Merge candidates for query rows start .. start + len(scores)."""
        stop = start + len(scores)
        if stop > len(self.scores):
            raise ValueError(f"rows {start}:{stop} beyond the {len(self.scores)} queries")
        # Slots FAISS could not fill come back as id -1; their scores are
        # arbitrary (-inf or a huge negative), so blank them explicitly.
        scores = np.where(ids == EMPTY_ID, EMPTY_SCORE, scores).astype(np.float32)
        if not self.fed[start:stop].any():
            merged = merge_topk(scores, ids, scores[:, :0], ids[:, :0], self.k)
        else:
            merged = merge_topk(self.scores[start:stop], self.ids[start:stop], scores, ids, self.k)
        self.scores[start:stop], self.ids[start:stop] = merged
        self.fed[start:stop] = True

    def filled(self) -> np.ndarray:
        """(n,) number of real candidates per query."""
        return (self.ids != EMPTY_ID).sum(axis=1)
