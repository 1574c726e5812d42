"""Tests for mining.margin against a plain-loop reference of LASER's mine_bitexts.py."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pytest

from mining.margin import (
    MinedPairs,
    _greedy_one_to_one,
    margin,
    mine,
    neighbourhood_means,
)

MARGINS = ("ratio", "distance", "absolute")
RETRIEVALS = ("fwd", "bwd", "max", "intersect")


# --------------------------------------------------------------------------------------------
# Problems: exact kNN by brute force over random (or quantised) unit vectors.
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    src_ids: np.ndarray
    fwd_ids: np.ndarray
    fwd_sims: np.ndarray
    tgt_ids: np.ndarray
    bwd_ids: np.ndarray
    bwd_sims: np.ndarray

    def args(self) -> tuple[np.ndarray, ...]:
        return (
            self.src_ids,
            self.fwd_ids,
            self.fwd_sims,
            self.tgt_ids,
            self.bwd_ids,
            self.bwd_sims,
        )


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _quantised(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit vectors with four entries of 0.5 in 8 dims: every cosine is an exact multiple of
    1/4, so similarities, means and margins tie exactly and often."""
    patterns = np.array(
        [[i in combo for i in range(8)] for combo in combinations(range(8), 4)],
        dtype=np.float32,
    )
    return 0.5 * patterns[rng.integers(0, len(patterns), size=n)]


def _knn(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by brute force: rows sorted by similarity descending, ties in base order."""
    sim = queries @ base.T
    if sim.shape[1] <= 512:
        idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    else:
        # Full sorts of the 3000 x 3000 problems dominate the runtime; the top-k set from
        # argpartition is exact there because those problems have continuous (tie-free) data.
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top.sort(axis=1)  # base order first, so the stable sort below breaks ties by index
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(top, order, axis=1)
    return idx, np.take_along_axis(sim, idx, axis=1)


def _ids(rng: np.random.Generator, n: int, population: int) -> np.ndarray:
    # Shuffled, sparse, and drawn from a range shared by both sides, so that mixing up the
    # source and target id spaces produces wrong pairs or errors rather than passing by luck.
    return (rng.choice(population, size=n, replace=False) * 7919 + 13).astype(np.int64)


def make_problem(
    seed: int, n_s: int, n_t: int, k: int, dim: int = 8, quantised: bool = False
) -> Problem:
    rng = np.random.default_rng(seed)
    if quantised:
        x, y = _quantised(rng, n_s), _quantised(rng, n_t)
    else:
        x, y = _unit(rng, n_s, dim), _unit(rng, n_t, dim)
    src_ids = _ids(rng, n_s, 3 * (n_s + n_t))
    tgt_ids = _ids(rng, n_t, 3 * (n_s + n_t))
    fwd_idx, fwd_sims = _knn(x, y, k)
    bwd_idx, bwd_sims = _knn(y, x, k)
    return Problem(src_ids, tgt_ids[fwd_idx], fwd_sims, tgt_ids, src_ids[bwd_idx], bwd_sims)


# --------------------------------------------------------------------------------------------
# Reference: LASER's mine_bitexts.py, written with plain per-sentence loops.
# --------------------------------------------------------------------------------------------


def _margin_fn(kind: str):
    if kind == "absolute":
        return lambda a, b: a
    if kind == "distance":
        return lambda a, b: a - b
    return lambda a, b: a / b  # ratio


def _row_mean(row) -> float:
    total = 0.0
    for value in row:
        total += float(value)
    return total / len(row)


def reference_candidates(p: Problem, margin_kind: str):
    """Per-sentence candidate scores, as LASER's score_candidates (float64 here)."""
    m = _margin_fn(margin_kind)
    src_pos = {int(i): n for n, i in enumerate(p.src_ids)}
    tgt_pos = {int(i): n for n, i in enumerate(p.tgt_ids)}
    x2y_mean = [_row_mean(row) for row in p.fwd_sims]
    y2x_mean = [_row_mean(row) for row in p.bwd_sims]
    fwd_scores = []
    for i in range(len(p.src_ids)):
        row = []
        for c in range(p.fwd_ids.shape[1]):
            j = tgt_pos[int(p.fwd_ids[i, c])]
            row.append(m(float(p.fwd_sims[i, c]), (x2y_mean[i] + y2x_mean[j]) / 2))
        fwd_scores.append(row)
    bwd_scores = []
    for j in range(len(p.tgt_ids)):
        row = []
        for c in range(p.bwd_ids.shape[1]):
            i = src_pos[int(p.bwd_ids[j, c])]
            row.append(m(float(p.bwd_sims[j, c]), (y2x_mean[j] + x2y_mean[i]) / 2))
        bwd_scores.append(row)
    return fwd_scores, bwd_scores


def _argmax(row: list[float]) -> int:
    best = 0
    for c in range(1, len(row)):
        if row[c] > row[best]:  # strict: first maximum wins, like np.argmax
            best = c
    return best


def reference_mine(p: Problem, margin_kind: str, retrieval: str, threshold: float):
    """Returns (pairs, max_order) where pairs are (src_id, tgt_id, score, cosine, direction)
    sorted by score descending (stable) and max_order lists the ranked candidates as
    (src position, tgt position, kept) for the max mode (empty otherwise)."""
    fwd_scores, bwd_scores = reference_candidates(p, margin_kind)
    src_pos = {int(i): n for n, i in enumerate(p.src_ids)}
    tgt_pos = {int(i): n for n, i in enumerate(p.tgt_ids)}
    n_s, n_t = len(p.src_ids), len(p.tgt_ids)

    fwd_best, fwd_best_score, fwd_best_cos = [], [], []
    for i in range(n_s):
        c = _argmax(fwd_scores[i])
        fwd_best.append(tgt_pos[int(p.fwd_ids[i, c])])
        fwd_best_score.append(fwd_scores[i][c])
        fwd_best_cos.append(float(p.fwd_sims[i, c]))
    bwd_best, bwd_best_score, bwd_best_cos = [], [], []
    for j in range(n_t):
        c = _argmax(bwd_scores[j])
        bwd_best.append(src_pos[int(p.bwd_ids[j, c])])
        bwd_best_score.append(bwd_scores[j][c])
        bwd_best_cos.append(float(p.bwd_sims[j, c]))

    out = []
    max_order = []
    if retrieval == "fwd":
        for i, j in enumerate(fwd_best):
            out.append((i, j, fwd_best_score[i], fwd_best_cos[i], "fwd"))
    elif retrieval == "bwd":
        for j, i in enumerate(bwd_best):
            out.append((i, j, bwd_best_score[j], bwd_best_cos[j], "bwd"))
    elif retrieval == "intersect":
        for i, j in enumerate(fwd_best):
            if bwd_best[j] == i:
                out.append((i, j, fwd_best_score[i], fwd_best_cos[i], "both"))
    else:  # max
        indices = [(i, fwd_best[i]) for i in range(n_s)] + [(bwd_best[j], j) for j in range(n_t)]
        scores = fwd_best_score + bwd_best_score
        cosines = fwd_best_cos + bwd_best_cos
        directions = ["fwd"] * n_s + ["bwd"] * n_t
        seen_src, seen_trg = set(), set()
        for n in sorted(range(len(scores)), key=lambda n: -scores[n]):  # Python sort is stable
            src_ind, trg_ind = indices[n]
            kept = src_ind not in seen_src and trg_ind not in seen_trg
            max_order.append((src_ind, trg_ind, kept))
            if kept:
                seen_src.add(src_ind)
                seen_trg.add(trg_ind)
                out.append((src_ind, trg_ind, scores[n], cosines[n], directions[n]))

    out = [pair for pair in out if pair[2] > threshold]
    out = sorted(out, key=lambda pair: -pair[2])
    pairs = [(int(p.src_ids[i]), int(p.tgt_ids[j]), s, c, d) for i, j, s, c, d in out]
    return pairs, max_order


def assert_matches_reference(got: MinedPairs, pairs) -> None:
    assert got.src_ids.dtype == np.int64 and got.tgt_ids.dtype == np.int64
    assert got.scores.dtype == np.float64 and got.cosines.dtype == np.float32
    np.testing.assert_array_equal(got.src_ids, np.array([q[0] for q in pairs], dtype=np.int64))
    np.testing.assert_array_equal(got.tgt_ids, np.array([q[1] for q in pairs], dtype=np.int64))
    np.testing.assert_allclose(got.scores, np.array([q[2] for q in pairs]), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(got.cosines, np.array([q[3] for q in pairs], dtype=np.float32))
    np.testing.assert_array_equal(got.directions.astype(str), np.array([q[4] for q in pairs]))


# --------------------------------------------------------------------------------------------
# Agreement with the reference.
# --------------------------------------------------------------------------------------------

PROBLEMS = [
    pytest.param((0, 37, 53, 4), id="37x53-k4"),
    pytest.param((1, 60, 41, 4), id="60x41-k4"),
    pytest.param((2, 23, 31, 1), id="23x31-k1"),
    pytest.param((3, 45, 29, 1), id="45x29-k1"),
    pytest.param((4, 9, 5, 4), id="9x5-k4"),
]


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("retrieval", RETRIEVALS)
@pytest.mark.parametrize("margin_kind", MARGINS)
def test_matches_reference(problem, margin_kind, retrieval):
    p = make_problem(*problem)
    pairs, _ = reference_mine(p, margin_kind, retrieval, -np.inf)
    assert pairs, "a problem without any pair would test nothing"
    assert_matches_reference(
        mine(*p.args(), margin_kind=margin_kind, retrieval=retrieval, threshold=-np.inf), pairs
    )
    # A threshold at a middle score (so also an equality case) must cut both the same way.
    # Distinct values, not the median: with k = 1 many pairs tie at the maximum score (in
    # intersect mode all of them: ratio 1, distance 0), and then the cut must remove all.
    distinct = sorted({q[2] for q in pairs})
    threshold = distinct[len(distinct) // 2]
    cut, _ = reference_mine(p, margin_kind, retrieval, threshold)
    assert len(cut) < len(pairs)
    assert len(cut) > 0 or len(distinct) == 1
    assert_matches_reference(
        mine(*p.args(), margin_kind=margin_kind, retrieval=retrieval, threshold=threshold), cut
    )


@pytest.mark.parametrize("retrieval", RETRIEVALS)
@pytest.mark.parametrize("margin_kind", MARGINS)
def test_matches_reference_with_ties(margin_kind, retrieval):
    p = make_problem(5, 40, 50, 4, quantised=True)
    # Make sure the problem really exercises tie-breaking: some source has two best-scoring
    # candidates with different targets, and the max-mode ranking has tied scores.
    fwd_scores, bwd_scores = reference_candidates(p, margin_kind)
    tied_rows = [
        i
        for i, row in enumerate(fwd_scores)
        if len({int(p.fwd_ids[i, c]) for c in range(len(row)) if row[c] == max(row)}) > 1
    ]
    assert tied_rows
    row_maxima = [max(r) for r in fwd_scores] + [max(r) for r in bwd_scores]
    assert len(set(row_maxima)) < len(row_maxima) // 4

    pairs, _ = reference_mine(p, margin_kind, retrieval, -np.inf)
    got = mine(*p.args(), margin_kind=margin_kind, retrieval=retrieval, threshold=-np.inf)
    assert_matches_reference(got, pairs)
    # Ties must be resolved identically, so the scores agree bit for bit.
    np.testing.assert_array_equal(got.scores, np.array([q[2] for q in pairs]))


@pytest.fixture(scope="module")
def hub_problem() -> Problem:
    # Few dimensions and many points: some targets are near many sources (hubs), so many
    # candidates compete for them in max mode.
    return make_problem(6, 3000, 2600, 4, dim=3)


def chain_problem(seed: int, n: int, k: int = 4) -> Problem:
    """n sources and n targets interleaved on an arc, t0 s0 t1 s1 ..., with gaps that grow
    slowly along the arc.

    Each source's best target is the target before it, each target's best source the source
    before it, and scores fall along the arc. The ranked candidates then form one chain,
    (s0,t0) (s0,t1) (s1,t1) (s1,t2) ..., in which every kept pair becomes first for its target
    only once the previous kept pair was accepted: the rounds must run about n times.
    """
    rng = np.random.default_rng(seed)
    # float64 vectors: consecutive gaps differ by ~1e-7 rad, too little for float32 cosines.
    gaps = 3.3e-4 * (1 + np.arange(2 * n) / (2 * n))
    theta = np.concatenate(([0.0], np.cumsum(gaps)[:-1]))
    points = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    y, x = points[0::2][rng.permutation(n)], points[1::2][rng.permutation(n)]
    src_ids, tgt_ids = _ids(rng, n, 6 * n), _ids(rng, n, 6 * n)
    fwd_idx, fwd_sims = _knn(x, y, k)
    bwd_idx, bwd_sims = _knn(y, x, k)
    return Problem(src_ids, tgt_ids[fwd_idx], fwd_sims, tgt_ids, src_ids[bwd_idx], bwd_sims)


@pytest.fixture(scope="module")
def long_chain_problem() -> Problem:
    return chain_problem(7, 3000)


def _check_max_mode(p: Problem, margin_kind: str) -> int:
    """Compares max mode and the round-based greedy with the reference; returns the rounds."""
    pairs, max_order = reference_mine(p, margin_kind, "max", -np.inf)
    src = np.array([c[0] for c in max_order])
    tgt = np.array([c[1] for c in max_order])
    kept, rounds = _greedy_one_to_one(src, tgt, len(p.src_ids), len(p.tgt_ids))
    np.testing.assert_array_equal(kept, np.array([c[2] for c in max_order]))
    got = mine(*p.args(), margin_kind=margin_kind, retrieval="max", threshold=-np.inf)
    assert_matches_reference(got, pairs)
    return rounds


@pytest.mark.parametrize("margin_kind", MARGINS)
def test_max_mode_on_large_hub_problem(hub_problem, margin_kind):
    rounds = _check_max_mode(hub_problem, margin_kind)
    assert rounds > 1


@pytest.mark.parametrize("margin_kind", MARGINS)
def test_greedy_rounds_on_large_chain_problem(long_chain_problem, margin_kind):
    rounds = _check_max_mode(long_chain_problem, margin_kind)
    assert rounds > 2900, f"problem too easy: only {rounds} rounds"


def _sequential_greedy(src, tgt) -> list[bool]:
    seen_src, seen_tgt, kept = set(), set(), []
    for s, t in zip(src, tgt, strict=True):
        ok = s not in seen_src and t not in seen_tgt
        kept.append(ok)
        if ok:
            seen_src.add(s)
            seen_tgt.add(t)
    return kept


def test_greedy_rounds_on_a_chain():
    # (0,0) (0,1) (1,1) (1,2) (2,2) ...: each kept candidate only becomes first for its target
    # once its predecessor was accepted, so rounds = number of kept candidates.
    n = 300
    src = np.repeat(np.arange(n), 2)[:-1]
    tgt = np.concatenate(([0], np.repeat(np.arange(1, n), 2)))
    kept, rounds = _greedy_one_to_one(src, tgt, n, n)
    np.testing.assert_array_equal(kept, np.arange(len(src)) % 2 == 0)
    assert rounds == n


@pytest.mark.parametrize("seed", range(5))
def test_greedy_rounds_on_random_conflicts(seed):
    rng = np.random.default_rng(seed)
    n_src, n_tgt, m = 40, 30, 500
    src, tgt = rng.integers(0, n_src, m), rng.integers(0, n_tgt, m)
    kept, _ = _greedy_one_to_one(src, tgt, n_src, n_tgt)
    np.testing.assert_array_equal(kept, _sequential_greedy(src.tolist(), tgt.tolist()))


# --------------------------------------------------------------------------------------------
# Threshold, small helpers, edge cases and validation.
# --------------------------------------------------------------------------------------------


def _two_pairs(k_sims=(0.5, 0.25)) -> Problem:
    a, b = np.float32(k_sims[0]), np.float32(k_sims[1])
    return Problem(
        src_ids=np.array([10, 20]),
        fwd_ids=np.array([[7], [8]]),
        fwd_sims=np.array([[a], [b]], dtype=np.float32),
        tgt_ids=np.array([7, 8]),
        bwd_ids=np.array([[10], [20]]),
        bwd_sims=np.array([[a], [b]], dtype=np.float32),
    )


@pytest.mark.parametrize("retrieval", RETRIEVALS)
def test_score_equal_to_threshold_is_excluded(retrieval):
    p = _two_pairs()
    # absolute margin: the scores are the cosines, 0.5 for (10, 7) and 0.25 for (20, 8).
    at = mine(*p.args(), margin_kind="absolute", retrieval=retrieval, threshold=0.5)
    assert len(at) == 0
    below = mine(
        *p.args(), margin_kind="absolute", retrieval=retrieval, threshold=np.nextafter(0.5, 0)
    )
    np.testing.assert_array_equal(below.src_ids, [10])
    np.testing.assert_array_equal(below.tgt_ids, [7])
    np.testing.assert_array_equal(below.scores, [0.5])
    at_low = mine(*p.args(), margin_kind="absolute", retrieval=retrieval, threshold=0.25)
    np.testing.assert_array_equal(at_low.tgt_ids, [7])
    expected = {"fwd": "fwd", "bwd": "bwd", "max": "fwd", "intersect": "both"}[retrieval]
    assert at_low.directions.tolist() == [expected]


@pytest.mark.parametrize(("margin_kind", "score"), [("ratio", 1.0), ("distance", 0.0)])
def test_threshold_equality_for_other_margins(margin_kind, score):
    # With k = 1 each neighbourhood mean is the pair's own cosine: ratio 1, distance 0.
    p = _two_pairs()
    got = mine(*p.args(), margin_kind=margin_kind, retrieval="max", threshold=-1.0)
    np.testing.assert_array_equal(got.scores, [score, score])
    assert len(mine(*p.args(), margin_kind=margin_kind, retrieval="max", threshold=score)) == 0


def test_neighbourhood_means_and_margin():
    sims = np.array([[0.9, 0.5, 0.1], [0.3, 0.3, 0.0]], dtype=np.float32)
    means = neighbourhood_means(sims)
    assert means.dtype == np.float64
    np.testing.assert_allclose(means, [0.5, 0.2], rtol=1e-7)
    a, b = np.array([0.8, 0.6]), np.array([0.4, 0.5])
    np.testing.assert_array_equal(margin(a, b, "ratio"), a / b)
    np.testing.assert_array_equal(margin(a, b, "distance"), a - b)
    np.testing.assert_array_equal(margin(a, b, "absolute"), a)
    assert margin(a.astype(np.float32), b, "absolute").dtype == np.float64
    with pytest.raises(ValueError, match="margin kind"):
        margin(a, b, "cosine")
    with pytest.raises(ValueError, match="2-D"):
        neighbourhood_means(np.zeros(3))


def _assert_empty(got: MinedPairs) -> None:
    assert len(got) == 0
    assert got.src_ids.dtype == np.int64 and got.scores.dtype == np.float64
    assert got.cosines.dtype == np.float32 and got.directions.shape == (0,)


@pytest.mark.parametrize("retrieval", RETRIEVALS)
def test_empty_inputs(retrieval):
    kw = {"margin_kind": "ratio", "retrieval": retrieval, "threshold": 0.0}
    no_ids, no_knn = np.empty(0, np.int64), np.empty((0, 4))
    tgt = np.array([3, 1, 4])
    no_bwd = np.empty((3, 0))
    # No sources: targets have no source neighbours (k = 0).
    _assert_empty(mine(no_ids, no_knn.astype(int), no_knn, tgt, no_bwd.astype(int), no_bwd, **kw))
    # No targets.
    _assert_empty(mine(tgt, no_bwd.astype(int), no_bwd, no_ids, no_knn.astype(int), no_knn, **kw))
    # Neither.
    _assert_empty(
        mine(no_ids, no_knn.astype(int), no_knn, no_ids, no_knn.astype(int), no_knn, **kw)
    )


def _kw(**overrides):
    kw = {"margin_kind": "ratio", "retrieval": "max", "threshold": 0.0}
    kw.update(overrides)
    return kw


def test_unknown_neighbour_id_is_rejected():
    p = _two_pairs()
    with pytest.raises(ValueError, match=r"fwd_neighbour_ids contains 1 id\(s\) not in tgt_ids"):
        mine(p.src_ids, np.array([[7], [9]]), p.fwd_sims, *p.args()[3:], **_kw())
    with pytest.raises(ValueError, match=r"bwd_neighbour_ids .* not in src_ids"):
        mine(*p.args()[:4], np.array([[10], [7]]), p.bwd_sims, **_kw())
    # Beyond the largest id (searchsorted would point past the end).
    with pytest.raises(ValueError, match="not in tgt_ids"):
        mine(p.src_ids, np.array([[7], [99]]), p.fwd_sims, *p.args()[3:], **_kw())


def test_faiss_missing_neighbour_is_rejected():
    p = _two_pairs()
    with pytest.raises(ValueError, match=r"-1 \(FAISS"):
        mine(p.src_ids, np.array([[7], [-1]]), p.fwd_sims, *p.args()[3:], **_kw())


def test_shapes_and_arguments_are_validated():
    p = _two_pairs()
    with pytest.raises(ValueError, match="fwd_similarities"):
        mine(p.src_ids, p.fwd_ids, np.zeros((2, 2), np.float32), *p.args()[3:], **_kw())
    with pytest.raises(ValueError, match="bwd_neighbour_ids has 1 rows but tgt_ids has 2"):
        mine(*p.args()[:4], p.bwd_ids[:1], p.bwd_sims[:1], **_kw())
    with pytest.raises(ValueError, match="src_ids must be a 1-D"):
        mine(p.src_ids[:, None], *p.args()[1:], **_kw())
    with pytest.raises(ValueError, match="src_ids must be unique"):
        mine(np.array([10, 10]), *p.args()[1:], **_kw())
    with pytest.raises(ValueError, match="fwd_similarities must be finite"):
        mine(p.src_ids, p.fwd_ids, np.array([[np.nan], [0.1]]), *p.args()[3:], **_kw())
    with pytest.raises(ValueError, match="margin_kind"):
        mine(*p.args(), **_kw(margin_kind="cosine"))
    with pytest.raises(ValueError, match="retrieval"):
        mine(*p.args(), **_kw(retrieval="both"))
