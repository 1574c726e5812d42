"""The torch kNN (on the CPU) against FAISS's exact search: same neighbours within ties."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from mining.knn import torch_knn
from mining.knn.exact import exact_topk, pair_similarities
from mining.knn.topk import sort_rows

CPU = torch.device("cpu")


def _clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.7 * rng.standard_normal((n, dim)) / np.sqrt(
        dim
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    dim = 48
    centers = rng.standard_normal((20, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = _clustered(rng, 300, dim, centers)
    targets = _clustered(rng, 3000, dim, centers)
    targets[1500] = targets[1501]  # an exact tie between two targets
    ids = np.arange(10_000, 13_000, dtype=np.int64)
    return queries, targets, ids


def _blocks(targets: np.ndarray, ids: np.ndarray, rows: int):
    for lo in range(0, len(targets), rows):
        yield ids[lo : lo + rows], targets[lo : lo + rows]


def _rescored(queries: np.ndarray, targets: np.ndarray, ids: np.ndarray, cand: np.ndarray, k: int):
    """Re-score candidate ids with the exact kernel, keep the best k."""
    m, c = cand.shape
    pos = cand - ids[0]
    sims = pair_similarities(queries, targets, np.repeat(np.arange(m), c), pos.ravel())
    s, i = sort_rows(sims.reshape(m, c), cand)
    return s[:, :k], i[:, :k]


def _assert_same_within_ties(got_ids, want_ids, want_sims, queries, targets, ids, tol=1e-6):
    """Per query: the same neighbour set, except where the k-th similarity ties."""
    for row, (got, want) in enumerate(zip(got_ids, want_ids, strict=True)):
        if set(got.tolist()) == set(want.tolist()):
            continue
        kth = want_sims[row, -1]
        for nid in set(got.tolist()) ^ set(want.tolist()):
            sim = float(queries[row].astype(np.float64) @ targets[nid - ids[0]].astype(np.float64))
            assert abs(sim - kth) <= tol, f"query {row}: neighbour {nid} ({sim}) vs k-th {kth}"


def _faiss_exact(queries, targets, ids, k):
    index = faiss.IndexFlatIP(targets.shape[1])
    index.add(targets.astype(np.float32))
    sims, pos = index.search(queries.astype(np.float32), k)
    return sims, ids[pos]


def test_torch_float32_matches_faiss_flat(data) -> None:
    queries, targets, ids = data
    k = 4
    want_sims, want_ids = _faiss_exact(queries, targets, ids, k)
    scores, got = torch_knn.knn(
        queries, _blocks(targets, ids, 700), k, device=CPU, dtype=torch.float32, query_rows=128
    )
    scores, got = sort_rows(scores, got)
    _assert_same_within_ties(got, want_ids, want_sims, queries, targets, ids)
    np.testing.assert_allclose(scores, want_sims, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_candidates_rescored_match_exact_search(data, dtype: torch.dtype) -> None:
    queries, targets, ids = data
    k = 4
    ref_sims, ref_ids = exact_topk(queries, targets, ids, k)
    _, cand = torch_knn.knn(queries, _blocks(targets, ids, 1024), 4 * k, device=CPU, dtype=dtype)
    sims, got = _rescored(queries, targets, ids, cand, k)
    _assert_same_within_ties(got, ref_ids, ref_sims, queries, targets, ids)
    # FAISS's exact neighbours, scored by the same exact kernel, are the same lists.
    _, faiss_ids = _faiss_exact(queries, targets, ids, k)
    faiss_sims, faiss_got = _rescored(queries, targets, ids, faiss_ids, k)
    _assert_same_within_ties(got, faiss_got, faiss_sims, queries, targets, ids)
    same = (got == faiss_got).all(axis=1)
    np.testing.assert_array_equal(sims[same], faiss_sims[same])


def test_torch_cpu_is_deterministic_and_block_size_free(data) -> None:
    queries, targets, ids = data
    runs = [
        torch_knn.knn(queries, _blocks(targets, ids, 512), 16, device=CPU, dtype=torch.bfloat16)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    # The final (re-scored) answer does not depend on how targets were blocked.
    finals = []
    for rows in (256, 3000):
        _, cand = torch_knn.knn(
            queries, _blocks(targets, ids, rows), 16, device=CPU, dtype=torch.bfloat16
        )
        finals.append(_rescored(queries, targets, ids, cand, 4))
    np.testing.assert_array_equal(finals[0][1], finals[1][1])
    np.testing.assert_array_equal(finals[0][0], finals[1][0])


def test_fewer_targets_than_k_leaves_empty_slots(data) -> None:
    queries, targets, ids = data
    scores, got = torch_knn.knn(
        queries[:3], _blocks(targets[:2], ids[:2], 1), 4, device=CPU, dtype=torch.float32
    )
    scores, got = sort_rows(scores, got)
    assert (got[:, 2:] == -1).all() and (got[:, :2] >= 0).all()


def test_device_and_dtype_resolution() -> None:
    assert torch_knn.resolve_device("cpu") == CPU
    dev = torch_knn.resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_knn.resolve_dtype("auto", CPU) == torch.bfloat16
    assert torch_knn.resolve_dtype("float32", CPU) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            torch_knn.resolve_device("cuda")
