"""mine_streamed (neighbour lists read block by block, twice) against mine (all in
memory), which tests/test_margin.py checks against a plain-loop LASER reference: the
same pairs, scores and order, bit for bit, whatever the blocks."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from mining.contracts import LINE_BITS, sentence_ids
from mining.margin import MinedPairs, mine, mine_streamed
from tests.test_margin import MARGINS, RETRIEVALS, Problem, chain_problem, make_problem


def _pipeline_ids(p: Problem, seed: int) -> Problem:
    """The same problem with ids as the pipeline makes them: (shard << 40) | line, spread
    over three shards with gaps (rejected lines), in ascending order within a file."""
    rng = np.random.default_rng(seed)

    def remap(ids: np.ndarray) -> dict[int, int]:
        shards = np.sort(rng.integers(0, 3, len(ids)))
        lines = np.concatenate(
            [np.cumsum(rng.integers(1, 4, int((shards == s).sum()))) for s in range(3)]
        )
        new = np.concatenate([sentence_ids(s, lines[shards == s]) for s in range(3)])
        return dict(zip(ids.tolist(), new.tolist(), strict=True))

    src, tgt = remap(p.src_ids), remap(p.tgt_ids)

    def apply(mapping: dict[int, int], ids: np.ndarray) -> np.ndarray:
        return np.vectorize(mapping.__getitem__, otypes=[np.int64])(ids)

    return Problem(
        apply(src, p.src_ids),
        apply(tgt, p.fwd_ids),
        p.fwd_sims,
        apply(tgt, p.tgt_ids),
        apply(src, p.bwd_ids),
        p.bwd_sims,
    )


def _blocks(ids: np.ndarray, nbrs: np.ndarray, sims: np.ndarray, cuts: list[int], name: str):
    edges = [0, *cuts, len(ids)]

    def blocks():
        for i, (a, b) in enumerate(pairwise(edges)):
            yield f"{name}/{i}", ids[a:b], nbrs[a:b], sims[a:b]

    return blocks


def _random_cuts(rng: np.random.Generator, n: int, parts: int) -> list[int]:
    # Empty blocks included: a shard may have no rows left after prepare.
    return sorted(rng.integers(0, n + 1, parts - 1).tolist())


def _streamed(p: Problem, seed: int, parts: int, **kw) -> MinedPairs:
    rng = np.random.default_rng(seed)
    fwd = _blocks(p.src_ids, p.fwd_ids, p.fwd_sims, _random_cuts(rng, len(p.src_ids), parts), "f")
    bwd = _blocks(p.tgt_ids, p.bwd_ids, p.bwd_sims, _random_cuts(rng, len(p.tgt_ids), parts), "b")
    return mine_streamed(fwd, bwd, line_bits=LINE_BITS, **kw)


def _assert_same(got: MinedPairs, want: MinedPairs) -> None:
    for field in ("src_ids", "tgt_ids", "scores", "cosines", "directions"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert getattr(got, field).dtype == getattr(want, field).dtype, field


PROBLEMS = [
    pytest.param((1, 60, 45, 4), id="random-60x45-k4"),
    pytest.param((2, 30, 80, 1), id="random-30x80-k1"),
    pytest.param((3, 9, 5, 4), id="k-capped-9x5"),
    pytest.param((5, 40, 50, 4, 8, True), id="quantised-ties"),
]


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("retrieval", RETRIEVALS)
@pytest.mark.parametrize("margin_kind", MARGINS)
def test_streamed_equals_in_memory(problem, margin_kind, retrieval):
    p = _pipeline_ids(make_problem(*problem), seed=problem[0])
    full = mine(*p.args(), margin_kind=margin_kind, retrieval=retrieval, threshold=-np.inf)
    assert len(full)
    distinct = np.unique(full.scores)
    for threshold in (-np.inf, float(distinct[len(distinct) // 2])):
        want = mine(*p.args(), margin_kind=margin_kind, retrieval=retrieval, threshold=threshold)
        for seed, parts in ((0, 1), (1, 3), (2, 7)):
            got = _streamed(
                p, seed, parts, margin_kind=margin_kind, retrieval=retrieval, threshold=threshold
            )
            _assert_same(got, want)


@pytest.mark.parametrize("margin_kind", MARGINS)
def test_streamed_max_mode_on_hubs_and_chains(margin_kind):
    # Many candidates competing for a few targets, and a chain of ~n greedy rounds.
    for p in (make_problem(6, 3000, 2600, 4, dim=3), chain_problem(7, 1500)):
        p = _pipeline_ids(p, seed=4)
        want = mine(*p.args(), margin_kind=margin_kind, retrieval="max", threshold=-np.inf)
        _assert_same(
            _streamed(p, 3, 5, margin_kind=margin_kind, retrieval="max", threshold=-np.inf), want
        )


KW = {"margin_kind": "ratio", "retrieval": "max", "threshold": 1.0, "line_bits": LINE_BITS}


def _one(ids, nbrs, sims, name="file.parquet"):
    def blocks():
        yield name, np.asarray(ids), np.asarray(nbrs), np.asarray(sims, dtype=np.float32)

    return blocks


def test_streamed_errors_name_the_file():
    src, tgt = sentence_ids(0, np.array([1, 2])), sentence_ids(1, np.array([1, 2]))
    good_fwd = _one(src, tgt[[1, 0]][:, None], [[0.9], [0.8]], "fwd.parquet")
    good_bwd = _one(tgt, src[:, None], [[0.9], [0.8]], "bwd.parquet")
    assert len(mine_streamed(good_fwd, good_bwd, **KW)) >= 1

    stranger = _one(src, np.array([[tgt[0]], [sentence_ids(1, np.array([9]))[0]]]), [[0.9], [0.8]])
    with pytest.raises(ValueError, match=r"file\.parquet: 1 neighbour id\(s\) are not targets"):
        mine_streamed(stranger, good_bwd, **KW)
    missing = _one(src, np.array([[tgt[0]], [-1]]), [[0.9], [0.8]])
    with pytest.raises(ValueError, match=r"file\.parquet: neighbour id -1"):
        mine_streamed(missing, good_bwd, **KW)
    nan = _one(src, tgt[:, None], [[0.9], [np.nan]])
    with pytest.raises(ValueError, match=r"file\.parquet: .*finite"):
        mine_streamed(nan, good_bwd, **KW)

    def twice():  # the same sentence in two files
        yield from good_fwd()
        yield "again.parquet", src[:1], tgt[:1, None], np.array([[0.5]], dtype=np.float32)

    with pytest.raises(ValueError, match=r"again\.parquet: sentence ids repeat"):
        mine_streamed(twice, good_bwd, **KW)


def test_streamed_empty_sides():
    empty = _one(np.empty(0, np.int64), np.empty((0, 4), np.int64), np.empty((0, 4)))
    src, tgt = sentence_ids(0, np.array([1])), sentence_ids(0, np.array([1]))
    some = _one(src, tgt[:, None], [[0.9]])
    for fwd, bwd in ((empty, some), (some, empty), (empty, empty)):
        got = mine_streamed(fwd, bwd, **KW)
        assert len(got) == 0 and got.scores.dtype == np.float64
