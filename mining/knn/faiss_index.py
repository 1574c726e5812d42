"""Building, saving and loading FAISS indexes over L2-normalised vectors.

Inner product on unit vectors is cosine similarity, so every index here is
built with METRIC_INNER_PRODUCT.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from mining.store import atomic_path

# Up to this many vectors a flat (exact) index is affordable: one query block
# against 10^6 vectors is a single large matrix product.
EXACT_LIMIT = 1_000_000


def resolve_factory(kind: str, n: int, dim: int) -> str:
    """The FAISS factory string for `index.type` (which may be "auto")."""
    if kind != "auto":
        return kind
    if n <= EXACT_LIMIT:
        return "Flat"
    # IVF lists grow like sqrt(n) (FAISS's own rule of thumb: 4..16 sqrt(n)).
    lists = 1 << int(np.ceil(np.log2(4 * np.sqrt(n))))
    if dim > 256:
        # Reduce large vectors (4096-dim m-ST5) before coding them: PQ on the
        # raw dimension would need codebooks far too large to train well.
        return f"OPQ64_256,IVF{lists},PQ64"
    return f"IVF{lists},Flat"


def new_index(factory: str, dim: int) -> faiss.Index:
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


def save_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Read an index; memory-mapped where the index type allows it."""
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass  # this index type cannot be mapped; read it whole
    return faiss.read_index(str(path))


def as_float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)
