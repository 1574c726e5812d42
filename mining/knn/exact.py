"""Exact similarities: one kernel for every score written, and re-scoring by id.

An approximate index (IVF, PQ codes, a 16-bit matrix product) decides which
candidates a query sees; the similarity written for each candidate is always
recomputed here, from the vectors the embed stage stored. So an index changes
which neighbours are found, never their scores, and the neighbourhood means
of the margin are means of exact cosines whatever the index, the backend or
the sharding.

The kernel is a dot product of the stored float16 vectors with exact
(float32) products summed in float64, rounded once to float32. Each value
depends on its two vectors only (not on block sizes, thread counts or BLAS
kernels), so the same pair gets the same bits on every path.
"""

from __future__ import annotations

import numpy as np

from mining.knn.topk import sort_rows

# Temporaries per kernel call: (rows, dim) products, then their float64 copy.
# Small enough to stay in cache, which runs the kernel several times faster.
KERNEL_BYTES = 1 << 20


def pair_similarities(
    a: np.ndarray,
    b: np.ndarray,
    a_rows: np.ndarray | None = None,
    b_rows: np.ndarray | None = None,
    *,
    float16_values: bool = False,
) -> np.ndarray:
    """Exact inner product of a[a_rows[i]] with b[b_rows[i]] -> float32 (n,).

    Without row indices, row i of `a` goes with row i of `b`. Rows are
    gathered a chunk at a time, so memory stays at KERNEL_BYTES whatever n.
    float16_values: a and b are float32 arrays holding float16 values (widened
    once by a caller that reuses rows), so their products are exact in float32.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"pair_similarities needs (n, dim) arrays of one dim, got {a.shape}, {b.shape}"
        )
    a_rows = np.arange(len(a)) if a_rows is None else np.asarray(a_rows)
    b_rows = np.arange(len(b)) if b_rows is None else np.asarray(b_rows)
    if a_rows.shape != b_rows.shape:
        raise ValueError(f"{a_rows.shape[0]} rows of a paired with {b_rows.shape[0]} rows of b")
    n, dim = len(a_rows), a.shape[1]
    # float16 x float16 products are exact in float32 (22 significant bits of
    # 24), which halves the work; other inputs multiply in float64.
    exact32 = float16_values or a.dtype == b.dtype == np.float16
    product_dtype = np.float32 if exact32 else np.float64
    out = np.empty(n, dtype=np.float32)
    step = max(16, KERNEL_BYTES // (16 * max(dim, 1)))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        products = a[a_rows[lo:hi]].astype(product_dtype, copy=False)
        products *= b[b_rows[lo:hi]]
        # Summed in float64, each row on its own (a plain contiguous reduction,
        # so a row's result does not depend on the rows beside it).
        out[lo:hi] = products.astype(np.float64, copy=False).sum(axis=1)
    return out


def widen(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact), for arrays whose rows are paired many times."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


def exact_topk(
    queries: np.ndarray, targets: np.ndarray, target_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force with the exact kernel: the reference the fast paths are tested against.

    Quadratic in time and in memory; for tests and small checks only.
    """
    m, n = len(queries), len(targets)
    rows = np.repeat(np.arange(m), n)
    cols = np.tile(np.arange(n), m)
    sims = pair_similarities(queries, targets, rows, cols).reshape(m, n)
    scores, ids = sort_rows(sims, np.broadcast_to(target_ids, (m, n)))
    return scores[:, :k], ids[:, :k]
