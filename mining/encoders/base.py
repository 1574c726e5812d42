"""The Encoder protocol every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised, in the order of `texts`."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit rows as float32, computed in float32 at least: float16 norms and quotients
    would lose digits that a cosine check sees; float64 inputs stay float64 until the end."""
    vectors = np.asarray(vectors)
    vectors = vectors.astype(np.result_type(vectors.dtype, np.float32), copy=False)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # An all-zero row stays zero rather than becoming NaN.
    np.maximum(norms, 1e-12, out=norms)
    return (vectors / norms).astype(np.float32, copy=False)
