"""IVF coarse quantizers: spherical k-means and list assignment as torch products.

FAISS trains an IVF quantizer with float32 k-means and assigns vectors to
lists with a float32 search, both a few tens of GFLOP/s on two cores. The
assignment is an argmax of one large matrix product, which bfloat16 runs
several times faster (AMX, AVX-512 BF16, tensor cores); where a vector lands
only decides which list holds it, and search probes lists the same way, so
the lower precision moves a few vectors to a neighbouring list and changes
no score (candidates are re-scored exactly).

Spherical (centroids kept on the unit sphere) because every vector is unit
length and the metric is the inner product. Deterministic: seeded
initialisation, first-index argmax, sums in sorted order.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch

from mining.knn.faiss_index import split_transforms
from mining.knn.torch_knn import to_device

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
# Score-matrix elements per product while assigning.
BLOCK_SCORES = 1 << 26


@torch.inference_mode()
def nearest_centroids(
    x: np.ndarray | torch.Tensor, centroids: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> np.ndarray:
    """Index of each row's best centroid by inner product -> int64 (n,)."""
    xt = x if isinstance(x, torch.Tensor) else to_device(x, CPU, dtype)
    c = centroids.to(dtype)
    out = np.empty(len(xt), dtype=np.int64)
    rows = max(1, BLOCK_SCORES // max(len(c), 1))
    for lo in range(0, len(xt), rows):
        # max returns the first of equal maxima: ties resolve the same way every run.
        # (It is also several times faster than argmax on bfloat16.)
        out[lo : lo + rows] = (xt[lo : lo + rows] @ c.T).max(dim=1).indices.numpy()
    return out


def spherical_kmeans(
    x: np.ndarray, k: int, *, iters: int = 10, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> np.ndarray:
    """k unit centroids of the rows of x (float32) -> float32 (k, d)."""
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means: {n} training vectors for {k} centroids")
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    xt = to_device(x, CPU, dtype)
    x32 = torch.from_numpy(x)
    for _ in range(iters):
        assign = nearest_centroids(xt, torch.from_numpy(centroids), dtype)
        counts = np.bincount(assign, minlength=k)
        # index_add on the CPU adds rows in index order: a fixed summation order.
        # float32 is ample for a direction (the sums are normalised).
        sums = torch.zeros((k, d), dtype=torch.float32).index_add_(0, torch.from_numpy(assign), x32)
        sums = sums.numpy()
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            # An empty list restarts at a random training vector, as FAISS
            # splits one: a list that never fills is a wasted probe.
            sums[empty] = x[rng.choice(n, size=len(empty), replace=False)]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = (sums / np.maximum(norms, 1e-30)).astype(np.float32)
    return centroids


def _flat_ivf(index: faiss.Index) -> tuple[list[faiss.VectorTransform], faiss.IndexIVF] | None:
    """(transforms in front, the IVF) when the IVF's quantizer is flat; else None."""
    chain, inner = split_transforms(index)
    if not isinstance(inner, faiss.IndexIVF):
        return None
    if not isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexFlat):
        return None
    return chain, inner


def train_quantizer(index: faiss.Index, x: np.ndarray, seed: int) -> bool:
    """Fill a flat IVF quantizer with spherical k-means centroids of x.

    x is in the IVF's own space (after any transform). FAISS's IVF train then
    finds the quantizer full and trains only the codes. Returns False (and
    does nothing) for other quantizers, which FAISS trains itself.
    """
    parts = _flat_ivf(index)
    if parts is None:
        return False
    _, ivf = parts
    if ivf.metric_type != faiss.METRIC_INNER_PRODUCT or ivf.nlist > len(x):
        return False
    centroids = spherical_kmeans(x, ivf.nlist, seed=seed)
    ivf.quantizer.reset()
    ivf.quantizer.add(centroids)
    return True


class Populator:
    """Adds vectors to an IVF index with list assignment as bfloat16 products."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        parts = _flat_ivf(index)
        self.fast = parts is not None and faiss.downcast_index(index).metric_type == (
            faiss.METRIC_INNER_PRODUCT
        )
        if self.fast:
            self.chain, self.ivf = parts
            quantizer = faiss.downcast_index(self.ivf.quantizer)
            self.centroids = torch.from_numpy(quantizer.reconstruct_n(0, self.ivf.nlist))

    def add(self, vectors: np.ndarray) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.fast:
            self.index.add(x)
            return
        for vt in self.chain:
            x = vt.apply(x)
        assign = nearest_centroids(x, self.centroids)
        self.ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(assign))
        # Wrappers (IndexPreTransform) count their vectors themselves.
        self.index.ntotal = self.ivf.ntotal
