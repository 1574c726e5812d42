"""mining.knn's pure functions against brute force, on seeded data, ties included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mining.contracts import embeddings_table, sentence_ids
from mining.knn.exact import exact_topk, pair_similarities
from mining.knn.faiss_index import (
    code_bytes,
    ivf_lists,
    lossless_codes,
    new_index,
    resolve_factory,
)
from mining.knn.stored import EmbeddingStore, iter_blocks, iter_rows
from mining.knn.topk import EMPTY_ID, RunningTopK, merge_topk, sort_rows


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def _reference_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row by row in Python: sort by (-score, id)."""
    out_s, out_i = [], []
    for row_s, row_i in zip(scores, ids, strict=True):
        best = sorted(zip(row_s.tolist(), row_i.tolist(), strict=True), key=lambda t: (-t[0], t[1]))
        best = best[:k]
        out_s.append([s for s, _ in best])
        out_i.append([i for _, i in best])
    return np.array(out_s, dtype=np.float32), np.array(out_i, dtype=np.int64)


# --------------------------------------------------------------------------
# top-k merging


@pytest.mark.parametrize("quantised", [False, True])
def test_running_topk_over_any_split_equals_one_sort(quantised: bool) -> None:
    rng = np.random.default_rng(1)
    n, total, k = 50, 300, 7
    scores = rng.standard_normal((n, total)).astype(np.float32)
    if quantised:  # many exact ties: only the id tie-break orders them
        scores = np.round(scores * 2) / 2
    ids = np.tile(rng.permutation(10 * total)[:total], (n, 1)).astype(np.int64)
    expected = _reference_topk(scores, ids, k)
    for parts in (1, 2, 5, 17):
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
        running = RunningTopK(n, k)
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, total], strict=True):
            # Rows fed in two halves as well: start offsets must line up.
            running.add(0, scores[:20, lo:hi], ids[:20, lo:hi])
            running.add(20, scores[20:, lo:hi], ids[20:, lo:hi])
        np.testing.assert_array_equal(running.scores, expected[0])
        np.testing.assert_array_equal(running.ids, expected[1])


def test_merge_pads_short_lists_and_ignores_faiss_empty_slots() -> None:
    scores = np.array([[0.5, 0.1]], dtype=np.float32)
    ids = np.array([[3, EMPTY_ID]], dtype=np.int64)
    running = RunningTopK(1, 4)
    # FAISS fills missing slots with id -1 and an arbitrary score.
    running.add(0, np.array([[0.9, 3.4e38]], dtype=np.float32), np.array([[7, -1]]))
    running.add(0, scores, ids)
    np.testing.assert_array_equal(running.ids, [[7, 3, -1, -1]])
    assert running.filled().tolist() == [2]
    merged_s, merged_i = merge_topk(scores, ids, scores[:, :0], ids[:, :0], 3)
    assert merged_s.shape == (1, 3) and merged_i.tolist() == [[3, -1, -1]]


def test_sort_rows_breaks_ties_by_id() -> None:
    s, i = sort_rows(np.array([[0.5, 0.7, 0.5, 0.5]], dtype=np.float32), np.array([[9, 4, 2, 5]]))
    assert i.tolist() == [[4, 2, 5, 9]]
    assert s.tolist() == [[np.float32(0.7), 0.5, 0.5, 0.5]]
    with pytest.raises(ValueError, match="NaN"):
        sort_rows(np.array([[np.nan]], dtype=np.float32), np.array([[1]]))


# --------------------------------------------------------------------------
# exact kernel and stored vectors


def test_pair_similarities_are_exact_and_independent_of_batching() -> None:
    rng = np.random.default_rng(2)
    # Unit float16 vectors; and an odd dimension, in float16 and on the float64 path.
    cases = [(_unit(rng, 500, 96), _unit(rng, 500, 96))] + [
        tuple(rng.standard_normal((700, 301)).astype(dtype) for _ in range(2))
        for dtype in (np.float16, np.float32)
    ]
    for a, b in cases:
        full = pair_similarities(a, b)
        exact = (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1).astype(np.float32)
        np.testing.assert_array_equal(full, exact)
        # Any subset, in any order, gets the same bits: a score depends on its pair only.
        for rows in (np.arange(1), np.arange(3, 250), rng.permutation(len(a))[:123]):
            np.testing.assert_array_equal(pair_similarities(a, b, rows, rows), full[rows])
            np.testing.assert_array_equal(pair_similarities(a[rows], b[rows]), full[rows])


def _write_embeddings(path: Path, ids: np.ndarray, vectors: np.ndarray, group: int) -> None:
    pq.write_table(embeddings_table(ids, vectors), path, row_group_size=group)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[EmbeddingStore, dict[int, np.ndarray], np.ndarray, list[Path]]:
    """Three sentence shards (shard numbers 0, 2, 5), rows with gaps, small row groups."""
    rng = np.random.default_rng(3)
    paths, by_id = {}, {}
    for shard, n in ((0, 40), (2, 1), (5, 77)):
        lines = np.sort(rng.choice(1000, size=n, replace=False))
        ids = sentence_ids(shard, lines)
        vectors = _unit(rng, n, 32)
        path = tmp_path / f"s{shard}.parquet"
        _write_embeddings(path, ids, vectors, group=16)
        paths[shard] = path
        by_id.update(zip(ids.tolist(), vectors, strict=True))
    all_ids = np.array(list(by_id))
    return EmbeddingStore(paths), by_id, all_ids, list(paths.values())


def test_rescore_reads_candidates_by_id(stored) -> None:
    store, by_id, all_ids, _ = stored
    rng = np.random.default_rng(4)
    queries = _unit(rng, 30, 32)
    candidates = rng.choice(all_ids, size=(30, 6))
    candidates[3, 2:] = EMPTY_ID
    sims = store.rescore(queries, candidates)
    for i in range(30):
        for j in range(6):
            cid = int(candidates[i, j])
            if cid == EMPTY_ID:
                assert sims[i, j] == -np.inf
            else:
                expected = pair_similarities(queries[i : i + 1], by_id[cid][None])[0]
                assert sims[i, j] == expected


def test_rescore_rejects_unknown_ids(stored) -> None:
    store, _, all_ids, _ = stored
    queries = np.zeros((1, 32), dtype=np.float16)
    with pytest.raises(ValueError, match="sentence shard 7"):
        store.rescore(queries, np.array([[int(sentence_ids(7, np.array([1]))[0])]]))
    with pytest.raises(ValueError, match="no stored vector for candidate id"):
        store.rescore(queries, np.array([[int(all_ids.max()) + 1]]))


def test_iter_rows_and_blocks_cover_ranges_exactly(stored) -> None:
    _, by_id, all_ids, paths = stored
    path = paths[2]  # 77 rows in row groups of 16
    every = np.concatenate([ids for ids, _ in iter_rows(path, 0, 77)])
    for start, stop in ((0, 77), (5, 6), (15, 33), (70, 77), (40, 40)):
        got = [(i, v) for i, v in iter_rows(path, start, stop, block_rows=10)]
        ids = np.concatenate([i for i, _ in got]) if got else np.empty(0, dtype=np.int64)
        np.testing.assert_array_equal(ids, every[start:stop])
        for i, v in got:
            assert len(i) <= 10
            for sid, vec in zip(i.tolist(), v, strict=True):
                np.testing.assert_array_equal(vec, by_id[sid])
    blocks = list(iter_blocks(paths, 25))
    assert [len(i) for i, _ in blocks] == [25, 25, 25, 25, 18]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in blocks]), all_ids)


def test_exact_topk_is_brute_force() -> None:
    rng = np.random.default_rng(5)
    q, t = _unit(rng, 20, 16), _unit(rng, 60, 16)
    t[10] = t[11]  # a tie, broken by id
    ids = np.arange(100, 160)
    s, i = exact_topk(q, t, ids, 5)
    full = q.astype(np.float64) @ t.astype(np.float64).T
    ref_s, ref_i = _reference_topk(full.astype(np.float32), np.broadcast_to(ids, full.shape), 5)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s)


# --------------------------------------------------------------------------
# the index ladder


def test_auto_ladder() -> None:
    assert resolve_factory("auto", 10**6, 4096) == "Flat"
    assert resolve_factory("HNSW32", 10, 8) == "HNSW32"
    assert resolve_factory("auto", 2 * 10**6, 256) == "IVF4096,SQfp16"
    assert resolve_factory("auto", 2 * 10**6, 4096) == "OPQ64_256,IVF4096,PQ64"
    assert resolve_factory("auto", 10**9, 4096) == "OPQ64_256,IVF131072_HNSW32,PQ64"
    assert resolve_factory("auto", 10**5, 256, exact_limit=0) == "IVF1024,SQfp16"
    # Lists grow with the corpus, and never past what it can train.
    assert ivf_lists(10**4) < ivf_lists(10**6) < ivf_lists(10**8)
    assert ivf_lists(1000) * 39 <= 1000
    for n, d in ((5 * 10**6, 256), (5 * 10**6, 1024), (10**9, 4096)):
        index = new_index(resolve_factory("auto", n, d), d)
        assert not index.is_trained
    # Flat and SQfp16 (stored without residual) reproduce float16 vectors exactly.
    assert lossless_codes(new_index("Flat", 64))
    assert lossless_codes(new_index("IVF16,SQfp16", 64))
    assert not lossless_codes(new_index("IVF16,PQ8", 64))
    assert code_bytes("IVF16,SQfp16", 64) == 2 * 64 + 8 + 1  # codes, id, 1-byte list number
    with pytest.raises(ValueError, match=r"index\.type"):
        new_index("NotAnIndex", 8)
