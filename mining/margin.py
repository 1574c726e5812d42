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

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Margin = Literal["ratio", "distance", "absolute"]
Retrieval = Literal["fwd", "bwd", "max", "intersect"]

_MARGINS: tuple[str, ...] = get_args(Margin)
_RETRIEVALS: tuple[str, ...] = get_args(Retrieval)

# Ids as `mine` hands them to `mine_streamed`: positions, all in "shard" 0.
_POSITION_BITS = 62

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
    # ratio margin then amplifies when comparing near-tied candidates. Column by column, in
    # order, so that a row's mean is the same bits whatever block of rows it is read in
    # (numpy's reductions may group the additions differently by array shape).
    total = similarities[:, 0].astype(np.float64)
    for column in range(1, similarities.shape[1]):
        total += similarities[:, column]
    return total / similarities.shape[1]


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
    _check_modes(margin_kind, retrieval)

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
    # Positions stand in for the ids (one shard, the position as the line), so the one
    # implementation, `mine_streamed`, runs here over a single block per direction.
    mined = mine_streamed(
        lambda: [("fwd", np.arange(n_s), fwd_pos, fwd_similarities)],
        lambda: [("bwd", np.arange(n_t), bwd_pos, bwd_similarities)],
        margin_kind=margin_kind,
        retrieval=retrieval,
        threshold=threshold,
        line_bits=_POSITION_BITS,
    )
    return MinedPairs(
        src_ids=src_ids[mined.src_ids],
        tgt_ids=tgt_ids[mined.tgt_ids],
        scores=mined.scores,
        cosines=mined.cosines,
        directions=mined.directions,
    )


def _check_modes(margin_kind: str, retrieval: str) -> None:
    if margin_kind not in _MARGINS:
        raise ValueError(f"margin_kind must be one of {_MARGINS}, got {margin_kind!r}")
    if retrieval not in _RETRIEVALS:
        raise ValueError(f"retrieval must be one of {_RETRIEVALS}, got {retrieval!r}")


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


# --------------------------------------------------------------------------
# Mining from neighbour lists streamed in blocks, in memory that does not hold them


# (where, query ids (n,), neighbour ids (n, k), similarities (n, k)); `where` names the
# block's file in errors.
Block = tuple[str, np.ndarray, np.ndarray, np.ndarray]


class SentenceTable:
    """A value per sentence id, for pipeline ids (shard << LINE_BITS | line).

    One dense array per shard, indexed by line: 8 bytes a sentence, where a dict
    or a sorted id column would take several times that, and a lookup is one
    gather per shard. Unset slots hold `missing`.
    """

    def __init__(self, line_bits: int, dtype: type, missing: float | int) -> None:
        self._bits = line_bits
        self._mask = (1 << line_bits) - 1
        self._dtype = dtype
        self._missing = missing
        self._shards: dict[int, np.ndarray] = {}
        self.size = 0

    def _unset(self, values: np.ndarray) -> np.ndarray:
        if isinstance(self._missing, float) and np.isnan(self._missing):
            return np.isnan(values)
        return values == self._missing

    def put(self, ids: np.ndarray, values: np.ndarray, where: str) -> None:
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"{where}: negative sentence id {int(ids.min())}")
        shards = ids >> self._bits
        for shard in np.unique(shards):
            pick = shards == shard
            lines = ids[pick] & self._mask
            table = self._shards.get(int(shard))
            need = int(lines.max()) + 1
            if table is None or len(table) < need:
                size = need if table is None else max(need, 2 * len(table))
                grown = np.full(size, self._missing, dtype=self._dtype)
                if table is not None:
                    grown[: len(table)] = table
                table = self._shards[int(shard)] = grown
            if not self._unset(table[lines]).all() or len(np.unique(lines)) != len(lines):
                raise ValueError(f"{where}: sentence ids repeat (shard {int(shard)})")
            table[lines] = values[pick]
        self.size += len(ids)

    def get(self, ids: np.ndarray, where: str, what: str) -> np.ndarray:
        out = np.empty(ids.shape, dtype=self._dtype)
        shards = ids >> self._bits
        for shard in np.unique(shards):
            pick = shards == shard
            lines = ids[pick] & self._mask
            table = self._shards.get(int(shard))
            if table is None:
                found = np.zeros(lines.shape, dtype=bool)
            else:
                inside = lines < len(table)
                found = inside.copy()
                found[inside] = ~self._unset(table[lines[inside]])
            if not found.all():
                bad = int(ids[pick][~found][0])
                raise ValueError(
                    f"{where}: {int((~found).sum())} neighbour id(s) are not {what}, e.g. {bad}"
                )
            out[pick] = table[lines]
        return out


def _check_block(block: Block, direction: str) -> Block:
    where, ids, neighbour_ids, similarities = block
    try:
        ids = _as_ids(ids, "ids")
        neighbour_ids, similarities = _as_knn(neighbour_ids, similarities, len(ids), direction)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if similarities.shape[1] == 0 and len(ids):
        raise ValueError(f"{where}: at least one neighbour per row is needed (k >= 1)")
    if (neighbour_ids == _FAISS_MISSING).any():
        raise ValueError(
            f"{where}: neighbour id -1 (FAISS's 'no neighbour' marker): the index had "
            "fewer than k vectors; search with k <= index size"
        )
    return where, ids, neighbour_ids, similarities


def _stream_best(
    blocks: Iterable[Block],
    own: SentenceTable,
    other: SentenceTable,
    other_name: str,
    margin_kind: Margin,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Each block's best candidates: (query ids, neighbour ids, scores, cosines).

    The blocks were checked on the first pass (`_check_block`); the lookups here still
    reject a neighbour id that is not on the other side.
    """
    for where, ids, neighbour_ids, similarities in blocks:
        if not len(ids):
            continue
        means = own.get(ids, where, "the queries read in the first pass")
        other_means = other.get(neighbour_ids, where, other_name)
        scores = margin(similarities, (means[:, None] + other_means) / 2, margin_kind)
        rows, column = np.arange(len(ids)), np.argmax(scores, axis=1)
        yield (
            ids,
            neighbour_ids[rows, column],
            scores[rows, column],
            similarities[rows, column].astype(np.float32),
        )


def mine_streamed(
    fwd: Callable[[], Iterable[Block]],
    bwd: Callable[[], Iterable[Block]],
    *,
    margin_kind: Margin,
    retrieval: Retrieval,
    threshold: float,
    line_bits: int,
) -> MinedPairs:
    """`mine` over neighbour lists read block by block, twice: the same pairs, in the same
    order, with memory for a float per sentence and the candidates above the threshold.

    fwd and bwd make the blocks anew on each call (a pass): the first pass takes every
    sentence's neighbourhood mean, the second scores each query's candidates. Only the best
    candidate of a query can be selected (all modes take it first), and only one whose score
    passes the threshold can be kept, so each block leaves just those; in `max`, candidates
    at or below the threshold rank after every kept one and could only block each other.
    `intersect` keeps, besides, each target's best source (8 bytes a target). Ids must be
    the pipeline's (non-negative, the line in the low `line_bits` bits); the blocks of a
    direction must come in the same order on both passes, as ties go to the earlier one.
    """
    _check_modes(margin_kind, retrieval)
    src_means = SentenceTable(line_bits, np.float64, np.nan)
    tgt_means = SentenceTable(line_bits, np.float64, np.nan)
    for blocks, table, direction in ((fwd, src_means, "fwd"), (bwd, tgt_means, "bwd")):
        for block in blocks():
            where, ids, _, similarities = _check_block(block, direction)
            if len(ids):
                table.put(ids, neighbourhood_means(similarities), where)
    if src_means.size == 0 or tgt_means.size == 0:
        return MinedPairs.empty()

    def bests(side: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """The best candidate of each query of one side, block by block: (src, tgt,
        score, cosine)."""
        if side == "fwd":
            yield from _stream_best(fwd(), src_means, tgt_means, "targets", margin_kind)
            return
        for tgt, src, score, cos in _stream_best(
            bwd(), tgt_means, src_means, "sources", margin_kind
        ):
            yield src, tgt, score, cos

    # The forward block first, then the backward one: `max` breaks score ties in this
    # order, as `mine` does. (`intersect` reads the backward bests below.)
    sides = {"fwd": ["fwd"], "bwd": ["bwd"], "max": ["fwd", "bwd"], "intersect": ["fwd"]}
    kept = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty(0, np.float32))]
    labels = [np.empty(0, dtype=_DIRECTION_DTYPE)]
    for side in sides[retrieval]:
        for part in bests(side):
            above = part[2] > threshold
            kept.append(tuple(x[above] for x in part))
            labels.append(np.full(int(above.sum()), side, dtype=_DIRECTION_DTYPE))
    src, tgt, score, cos = (np.concatenate(column) for column in zip(*kept, strict=True))
    direction = np.concatenate(labels)

    if retrieval == "intersect":
        best_source = SentenceTable(line_bits, np.int64, -1)
        for sources, targets, _, _ in bests("bwd"):
            best_source.put(targets, sources, "backward neighbours")
        mutual = best_source.get(tgt, "forward neighbours", "targets") == src
        src, tgt, score, cos = src[mutual], tgt[mutual], score[mutual], cos[mutual]
        direction = np.full(len(src), "both", dtype=_DIRECTION_DTYPE)
    elif retrieval == "max":
        order = np.argsort(-score, kind="stable")
        # One-to-one over the candidates' own sentences, numbered densely.
        src_pos = np.unique(src, return_inverse=True)[1]
        tgt_pos = np.unique(tgt, return_inverse=True)[1]
        kept, _ = _greedy_one_to_one(
            src_pos[order],
            tgt_pos[order],
            int(src_pos.max(initial=-1)) + 1,
            int(tgt_pos.max(initial=-1)) + 1,
        )
        selected = order[kept]
        src, tgt, score, cos, direction = (x[selected] for x in (src, tgt, score, cos, direction))
    order = np.argsort(-score, kind="stable")
    return MinedPairs(
        src_ids=src[order],
        tgt_ids=tgt[order],
        scores=score[order],
        cosines=cos[order],
        directions=direction[order],
    )
