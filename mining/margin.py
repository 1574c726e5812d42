"""Margin-based scoring and candidate selection for bitext mining.

This implements the scoring of Artetxe & Schwenk (2019), "Margin-based Parallel Corpus Mining
with Multilingual Sentence Embeddings", with the selection semantics of LASER's
``mine_bitexts.py`` (``--mode mine``), vectorised with numpy.

The inputs are the outputs of two k-nearest-neighbour searches, one per direction:

* forward: for every source sentence, the ids and cosines of its ``k`` nearest targets;
* backward: for every target sentence, the ids and cosines of its ``k`` nearest sources.

A candidate pair ``(x, y)`` is scored by comparing its cosine with the average similarity of
the two neighbourhoods, ``(fwd_mean[x] + bwd_mean[y]) / 2``. Hubs (sentences close to
everything) have high neighbourhood means, so the margin penalises them where the raw cosine
would not.

Deliberate differences from LASER's script, all requested by the callers of this module:

* scores are computed in float64 from the kNN similarities that are passed in (LASER recomputes
  the dot products in float32);
* the threshold (``score > threshold``) is applied in every retrieval mode, not only in ``max``;
* ``max`` ranks candidates with a *stable* sort (LASER uses numpy's default quicksort, whose
  tie order is unspecified), so ties are resolved reproducibly: earlier candidate first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Margin = Literal["ratio", "distance", "absolute"]
Retrieval = Literal["fwd", "bwd", "max", "intersect"]

_MARGINS: tuple[str, ...] = get_args(Margin)
_RETRIEVALS: tuple[str, ...] = get_args(Retrieval)

# FAISS fills the id slots it could not fill (fewer than k vectors in the index) with -1.
_FAISS_MISSING = -1

# One fixed string dtype for every retrieval mode, so that callers can concatenate results of
# different modes without dtype surprises ("both" is the longest label).
_DIRECTION_DTYPE = np.dtype("<U4")


@dataclass(frozen=True)
class MinedPairs:
    """Mined sentence pairs, sorted by margin score, highest first.

    Attributes:
        src_ids: int64 ``(m,)`` source sentence ids.
        tgt_ids: int64 ``(m,)`` target sentence ids.
        scores: float64 ``(m,)`` margin scores.
        cosines: float32 ``(m,)`` raw cosine similarity of each pair.
        directions: ``(m,)`` strings: ``"fwd"`` (found as a source's best target), ``"bwd"``
            (found as a target's best source) or ``"both"`` (``intersect`` mode: mutual best).
    """

    src_ids: np.ndarray
    tgt_ids: np.ndarray
    scores: np.ndarray
    cosines: np.ndarray
    directions: np.ndarray

    def __post_init__(self) -> None:
        # A mismatch here would silently misalign pairs and scores downstream, so fail early.
        lengths = {
            name: getattr(self, name).shape
            for name in ("src_ids", "tgt_ids", "scores", "cosines", "directions")
        }
        if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
            raise ValueError(f"MinedPairs fields must be 1-D arrays of one length, got {lengths}")

    def __len__(self) -> int:
        return int(self.src_ids.shape[0])

    @classmethod
    def empty(cls) -> MinedPairs:
        """An empty result with the documented dtypes."""
        return cls(
            src_ids=np.empty(0, dtype=np.int64),
            tgt_ids=np.empty(0, dtype=np.int64),
            scores=np.empty(0, dtype=np.float64),
            cosines=np.empty(0, dtype=np.float32),
            directions=np.empty(0, dtype=_DIRECTION_DTYPE),
        )


def neighbourhood_means(similarities: np.ndarray) -> np.ndarray:
    """Mean similarity of each query's neighbourhood.

    Args:
        similarities: ``(n, k)`` similarities of each query's ``k`` nearest neighbours.

    Returns:
        ``(n,)`` float64 row means.
    """
    similarities = np.asarray(similarities)
    if similarities.ndim != 2:
        raise ValueError(f"similarities must be a 2-D (n, k) array, got shape {similarities.shape}")
    if similarities.shape[1] == 0 and similarities.shape[0] > 0:
        raise ValueError("similarities must have at least one neighbour per row (k >= 1)")
    if similarities.shape[0] == 0:
        return np.empty(0, dtype=np.float64)
    # Accumulate in float64: with float32 inputs the float32 mean would lose digits that the
    # ratio margin then amplifies when comparing near-tied candidates.
    return similarities.mean(axis=1, dtype=np.float64)


def margin(cosines: np.ndarray, means: np.ndarray, kind: Margin) -> np.ndarray:
    """Apply a margin function to candidate cosines.

    Args:
        cosines: cosine ``a`` of each candidate pair (any shape).
        means: the neighbourhood term ``b = (fwd_mean[x] + bwd_mean[y]) / 2``, broadcastable
            against ``cosines``.
        kind: ``"ratio"`` (``a / b``), ``"distance"`` (``a - b``) or ``"absolute"`` (``a``).

    Returns:
        float64 margin scores, shaped like ``cosines`` broadcast with ``means``.
    """
    a = np.asarray(cosines, dtype=np.float64)
    b = np.asarray(means, dtype=np.float64)
    if kind == "ratio":
        return a / b
    if kind == "distance":
        return a - b
    if kind == "absolute":
        # Broadcast so that every kind returns the same shape for the same inputs.
        return np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)).copy()
    raise ValueError(f"margin kind must be one of {_MARGINS}, got {kind!r}")


def mine(
    src_ids: np.ndarray,
    fwd_neighbour_ids: np.ndarray,
    fwd_similarities: np.ndarray,
    tgt_ids: np.ndarray,
    bwd_neighbour_ids: np.ndarray,
    bwd_similarities: np.ndarray,
    *,
    margin_kind: Margin,
    retrieval: Retrieval,
    threshold: float,
) -> MinedPairs:
    """Score kNN candidates with a margin and select sentence pairs.

    Args:
        src_ids: ``(n_s,)`` integer ids of the source sentences (arbitrary, unique).
        fwd_neighbour_ids: ``(n_s, k_f)`` target ids of each source's nearest targets.
        fwd_similarities: ``(n_s, k_f)`` their cosines (rows sorted descending, as kNN returns
            them; only the row means and the per-candidate values are used).
        tgt_ids: ``(n_t,)`` integer ids of the target sentences (arbitrary, unique).
        bwd_neighbour_ids: ``(n_t, k_b)`` source ids of each target's nearest sources.
        bwd_similarities: ``(n_t, k_b)`` their cosines.
        margin_kind: ``"ratio"``, ``"distance"`` or ``"absolute"``.
        retrieval: ``"fwd"`` (best target of every source), ``"bwd"`` (best source of every
            target), ``"max"`` (both, then greedily one-to-one by descending score) or
            ``"intersect"`` (pairs that are each other's best).
        threshold: keep only pairs whose score is strictly greater.

    Returns:
        The selected pairs, sorted by score descending (stable: ties keep selection order).

    Raises:
        ValueError: on malformed shapes, unknown modes, duplicate ids, neighbour ids that are
            -1 or absent from the other side, or non-finite similarities.
    """
    if margin_kind not in _MARGINS:
        raise ValueError(f"margin_kind must be one of {_MARGINS}, got {margin_kind!r}")
    if retrieval not in _RETRIEVALS:
        raise ValueError(f"retrieval must be one of {_RETRIEVALS}, got {retrieval!r}")

    src_ids = _as_ids(src_ids, "src_ids")
    tgt_ids = _as_ids(tgt_ids, "tgt_ids")
    fwd_neighbour_ids, fwd_similarities = _as_knn(
        fwd_neighbour_ids, fwd_similarities, len(src_ids), "fwd"
    )
    bwd_neighbour_ids, bwd_similarities = _as_knn(
        bwd_neighbour_ids, bwd_similarities, len(tgt_ids), "bwd"
    )
    n_s, n_t = len(src_ids), len(tgt_ids)
    # No pair can exist without both sides; the kNN arrays then have k == 0 or zero rows.
    if n_s == 0 or n_t == 0:
        return MinedPairs.empty()
    for name, sims in (
        ("fwd_similarities", fwd_similarities),
        ("bwd_similarities", bwd_similarities),
    ):
        if sims.shape[1] == 0:
            raise ValueError(f"{name} must have at least one neighbour per row (k >= 1)")

    fwd_pos = _positions(fwd_neighbour_ids, tgt_ids, "fwd_neighbour_ids", "tgt_ids")
    bwd_pos = _positions(bwd_neighbour_ids, src_ids, "bwd_neighbour_ids", "src_ids")

    fwd_mean = neighbourhood_means(fwd_similarities)
    bwd_mean = neighbourhood_means(bwd_similarities)
    fwd_scores = margin(fwd_similarities, (fwd_mean[:, None] + bwd_mean[fwd_pos]) / 2, margin_kind)
    bwd_scores = margin(bwd_similarities, (bwd_mean[:, None] + fwd_mean[bwd_pos]) / 2, margin_kind)

    # Best candidate per query; np.argmax takes the first maximum, as LASER does.
    fwd_src, fwd_tgt, fwd_score, fwd_cos = _best(fwd_scores, fwd_pos, fwd_similarities)
    bwd_tgt, bwd_src, bwd_score, bwd_cos = _best(bwd_scores, bwd_pos, bwd_similarities)

    if retrieval == "fwd":
        src, tgt, score, cos = fwd_src, fwd_tgt, fwd_score, fwd_cos
        direction = np.full(n_s, "fwd", dtype=_DIRECTION_DTYPE)
    elif retrieval == "bwd":
        src, tgt, score, cos = bwd_src, bwd_tgt, bwd_score, bwd_cos
        direction = np.full(n_t, "bwd", dtype=_DIRECTION_DTYPE)
    elif retrieval == "intersect":
        # bwd_tgt is arange(n_t), so the best source of target position p is bwd_src[p].
        mutual = bwd_src[fwd_tgt] == fwd_src
        src, tgt, score, cos = fwd_src[mutual], fwd_tgt[mutual], fwd_score[mutual], fwd_cos[mutual]
        direction = np.full(len(src), "both", dtype=_DIRECTION_DTYPE)
    else:  # "max"
        # Forward block first, then backward: the stable sort below relies on this order to
        # break score ties exactly like the concatenation in LASER.
        src = np.concatenate((fwd_src, bwd_src))
        tgt = np.concatenate((fwd_tgt, bwd_tgt))
        score = np.concatenate((fwd_score, bwd_score))
        cos = np.concatenate((fwd_cos, bwd_cos))
        direction = np.concatenate(
            (
                np.full(n_s, "fwd", dtype=_DIRECTION_DTYPE),
                np.full(n_t, "bwd", dtype=_DIRECTION_DTYPE),
            )
        )
        # Candidates at or below the threshold can only block each other (they rank after
        # every kept pair), so dropping them first gives the same pairs with less work.
        order = np.flatnonzero(score > threshold)
        order = order[np.argsort(-score[order], kind="stable")]
        kept, _ = _greedy_one_to_one(src[order], tgt[order], n_s, n_t)
        selected = order[kept]
        src, tgt, score, cos, direction = (
            src[selected],
            tgt[selected],
            score[selected],
            cos[selected],
            direction[selected],
        )

    # Threshold after selection. In "max" mode this equals LASER's check at print time: the
    # candidates are taken in descending order, so one below the threshold can only block
    # candidates that are below it too.
    above = score > threshold
    src, tgt, score, cos, direction = (
        src[above],
        tgt[above],
        score[above],
        cos[above],
        direction[above],
    )

    order = np.argsort(-score, kind="stable")
    return MinedPairs(
        src_ids=src_ids[src[order]],
        tgt_ids=tgt_ids[tgt[order]],
        scores=score[order],
        cosines=cos[order].astype(np.float32),
        directions=direction[order],
    )


def _as_ids(ids: np.ndarray, name: str) -> np.ndarray:
    """Validate a 1-D array of unique integer ids and return it as int64."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    # Duplicates would make the id -> position mapping ambiguous.
    sorted_ids = np.sort(ids)
    duplicated = sorted_ids[1:] == sorted_ids[:-1]
    if duplicated.any():
        raise ValueError(f"{name} must be unique; {int(sorted_ids[1:][duplicated][0])} repeats")
    return ids


def _as_knn(
    neighbour_ids: np.ndarray, similarities: np.ndarray, n: int, direction: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one direction's kNN arrays against the number of queries ``n``."""
    ids_name, sims_name = f"{direction}_neighbour_ids", f"{direction}_similarities"
    query_name = "src_ids" if direction == "fwd" else "tgt_ids"
    neighbour_ids = np.asarray(neighbour_ids)
    similarities = np.asarray(similarities)
    for name, array in ((ids_name, neighbour_ids), (sims_name, similarities)):
        if array.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (n, k) array, got shape {array.shape}")
        if array.shape[0] != n:
            raise ValueError(f"{name} has {array.shape[0]} rows but {query_name} has {n} entries")
    if neighbour_ids.shape != similarities.shape:
        raise ValueError(
            f"{ids_name} {neighbour_ids.shape} and {sims_name} {similarities.shape} "
            "must have the same shape"
        )
    if neighbour_ids.size and not np.issubdtype(neighbour_ids.dtype, np.integer):
        raise ValueError(f"{ids_name} must hold integers, got dtype {neighbour_ids.dtype}")
    if similarities.size and not np.issubdtype(similarities.dtype, np.floating):
        raise ValueError(f"{sims_name} must hold floats, got dtype {similarities.dtype}")
    # NaN would make argmax and the descending sort meaningless rather than fail loudly.
    if not np.isfinite(similarities).all():
        raise ValueError(f"{sims_name} must be finite")
    return neighbour_ids.astype(np.int64, copy=False), similarities


def _positions(
    neighbour_ids: np.ndarray, ids: np.ndarray, neighbour_name: str, ids_name: str
) -> np.ndarray:
    """Map neighbour ids to positions in ``ids`` (argsort + searchsorted, O(n log n))."""
    if (neighbour_ids == _FAISS_MISSING).any():
        raise ValueError(
            f"{neighbour_name} contains -1 (FAISS's 'no neighbour' marker): the index had "
            "fewer than k vectors; search with k <= index size"
        )
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    # searchsorted returns len(ids) for ids beyond the maximum; clip so the lookup is valid and
    # let the equality check below reject them.
    slot = np.minimum(np.searchsorted(sorted_ids, neighbour_ids), len(ids) - 1)
    found = sorted_ids[slot] == neighbour_ids
    if not found.all():
        missing = neighbour_ids[~found]
        raise ValueError(
            f"{neighbour_name} contains {missing.size} id(s) not in {ids_name}, "
            f"e.g. {int(missing[0])}"
        )
    return order[slot]


def _best(
    scores: np.ndarray, neighbour_pos: np.ndarray, similarities: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each query's best-scoring candidate.

    Returns:
        ``(query_pos, neighbour_pos, score, cosine)`` arrays of length ``n`` (one per query).
    """
    rows = np.arange(scores.shape[0])
    column = np.argmax(scores, axis=1)
    return rows, neighbour_pos[rows, column], scores[rows, column], similarities[rows, column]


def _greedy_one_to_one(
    src: np.ndarray, tgt: np.ndarray, n_src: int, n_tgt: int
) -> tuple[np.ndarray, int]:
    """Greedy one-to-one selection of ranked candidates, in vectorised rounds.

    The sequential rule (LASER's ``seen_src`` / ``seen_trg`` loop) walks the candidates in rank
    order and keeps one iff neither its source nor its target was used by a kept one. A
    candidate that ranks first among the remaining candidates of its source *and* first among
    those of its target is kept by that rule: every earlier candidate sharing its source or
    target has already been discarded because it conflicted with an even earlier kept one, and
    no kept candidate shares its source or target (those were removed). Conversely, a remaining
    candidate that conflicts with a kept one ranks after it (otherwise the kept one would not
    have been first), so the sequential rule discards it too. Each round therefore decides a
    set of candidates exactly as the sequential rule does, and the round always keeps at least
    the best remaining candidate, so the loop terminates.

    Args:
        src: source positions of the candidates, in rank order (best first).
        tgt: target positions, aligned with ``src``.
        n_src: number of sources (``src`` values are in ``[0, n_src)``).
        n_tgt: number of targets.

    Returns:
        ``(kept, rounds)``: boolean mask over the candidates, and the number of rounds used.
    """
    kept = np.zeros(len(src), dtype=bool)
    used_src = np.zeros(n_src, dtype=bool)
    used_tgt = np.zeros(n_tgt, dtype=bool)
    # Indices into the original candidate arrays; kept increasing, so a candidate's position
    # in the compacted arrays still orders it by rank.
    alive = np.arange(len(src))
    rounds = 0
    while alive.size:
        rounds += 1
        s, t = src[alive], tgt[alive]
        rank = np.arange(alive.size)
        first_of_src = np.full(n_src, alive.size, dtype=np.int64)
        np.minimum.at(first_of_src, s, rank)
        first_of_tgt = np.full(n_tgt, alive.size, dtype=np.int64)
        np.minimum.at(first_of_tgt, t, rank)
        accept = (first_of_src[s] == rank) & (first_of_tgt[t] == rank)
        kept[alive[accept]] = True
        used_src[s[accept]] = True
        used_tgt[t[accept]] = True
        # Accepted candidates drop out here too: their own source is now used.
        alive = alive[~(used_src[s] | used_tgt[t])]
    return kept, rounds
