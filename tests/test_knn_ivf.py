"""List-major IVF search and the torch k-means against FAISS, on seeded data."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from mining.knn import ivf_scan
from mining.knn.faiss_index import new_index
from mining.knn.kmeans import Populator, spherical_kmeans, train_quantizer

# Small indexes: OpenMP threads would only wait on each other (see conftest).
pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((25, 32))
    x = centers[rng.integers(0, 25, 3000)] + 0.6 * rng.standard_normal((3000, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "factory",
    [
        "IVF16,Flat",
        "IVF16,SQfp16",
        "IVF16,SQ8",
        "IVF16,PQ8x4",
        "PCAR24,IVF16,PQ8x4",
        "IVF16_HNSW8,Flat",
    ],
)
def test_list_major_search_equals_faiss_search(vectors: np.ndarray, factory: str) -> None:
    index = new_index(factory, 32)
    index.train(vectors)
    index.add(vectors)
    faiss.extract_index_ivf(index).nprobe = 5
    queries = vectors[:200] + 0.01
    want_d, want_i = index.search(queries, 10)
    got_d, got_i = ivf_scan.ListMajorSearcher(index, torch.float32).search(queries, 10, 5)
    np.testing.assert_allclose(got_d, want_d, atol=2e-6)
    # The same lists, except in the order of candidates whose scores tie (often,
    # with 4-bit PQ codes): the score lists are equal, and rows without ties equal.
    tie_free = (np.abs(np.diff(want_d, axis=1)) > 1e-5).all(axis=1)
    np.testing.assert_array_equal(got_i[tie_free], want_i[tie_free])
    assert tie_free.mean() > 0.5


def test_list_major_handles_short_lists_and_padding(vectors: np.ndarray) -> None:
    index = new_index("IVF64,SQfp16", 32)
    index.train(vectors)
    index.add(vectors[:100])  # most lists hold one or two vectors, some none
    faiss.extract_index_ivf(index).nprobe = 3
    _, i = ivf_scan.ListMajorSearcher(index, torch.float32).search(vectors[:50], 8, 3)
    _, want_i = index.search(vectors[:50], 8)
    assert ((i == -1) == (want_i == -1)).all()  # the same number found per query
    assert set(i[i >= 0].tolist()) <= set(range(100))
    assert ivf_scan.bucket(1) == 1 and ivf_scan.bucket(9) == 10 and ivf_scan.bucket(100) == 112
    for n in range(1, 3000, 7):
        assert n <= ivf_scan.bucket(n) <= 1.25 * n + 1


def test_torch_kmeans_is_deterministic_and_fills_the_quantizer(vectors: np.ndarray) -> None:
    a = spherical_kmeans(vectors, 20, seed=3)
    b = spherical_kmeans(vectors, 20, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    index = new_index("IVF20,PQ4x4", 32)
    assert train_quantizer(index, vectors, seed=3)
    index.train(vectors)  # FAISS keeps the centroids and trains the codes
    ivf = faiss.extract_index_ivf(index)
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 20), a)
    # Not for quantizers FAISS must train itself.
    assert not train_quantizer(new_index("IVF20_HNSW8,Flat", 32), vectors, seed=3)


def test_populator_adds_like_faiss(vectors: np.ndarray) -> None:
    fast, plain = new_index("IVF16,SQfp16", 32), new_index("IVF16,SQfp16", 32)
    for index in (fast, plain):
        train_quantizer(index, vectors, seed=0)
        index.train(vectors)
    populator = Populator(fast)
    assert populator.fast
    populator.add(vectors[:1000])
    populator.add(vectors[1000:])
    plain.add(vectors)
    assert fast.ntotal == plain.ntotal == len(vectors)
    ivf_fast, ivf_plain = faiss.extract_index_ivf(fast), faiss.extract_index_ivf(plain)
    sizes_fast = [ivf_fast.invlists.list_size(i) for i in range(16)]
    sizes_plain = [ivf_plain.invlists.list_size(i) for i in range(16)]
    # bfloat16 assignment may move a vector at a boundary to its other list.
    assert np.abs(np.subtract(sizes_fast, sizes_plain)).sum() <= 0.02 * len(vectors)
    for index in (fast, plain):
        faiss.extract_index_ivf(index).nprobe = 16  # all lists: exact search
    _, i_fast = fast.search(vectors[:100], 3)
    _, i_plain = plain.search(vectors[:100], 3)
    np.testing.assert_array_equal(i_fast, i_plain)
