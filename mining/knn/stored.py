"""Reading the vectors the embed stage stored: by row range, and by sentence id.

Embeddings live in one Parquet file per sentence shard, a row group per
embed chunk. Both readers touch only the row groups they need and decode at
most READ_ROWS rows at a time, so memory never depends on the shard size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mining.contracts import (
    LINE_BITS,
    check_schema,
    embeddings_dim,
    embeddings_schema,
    vectors_to_numpy,
)
from mining.knn import CPU_THREADS
from mining.knn.exact import pair_similarities, widen
from mining.knn.topk import EMPTY_ID, EMPTY_SCORE

# Rows decoded at a time.
READ_ROWS = 8192


def _open(path: Path) -> tuple[pq.ParquetFile, int, np.ndarray]:
    """-> (file, dim, row-group start offsets with the total appended)."""
    pf = pq.ParquetFile(path)
    dim = embeddings_dim(path)
    check_schema(path, pf.schema_arrow, embeddings_schema(dim))
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    return pf, dim, np.cumsum([0, *sizes])


def num_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def iter_rows(
    path: Path, start: int, stop: int, block_rows: int = READ_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids, float16 vectors) of rows start .. stop, at most block_rows at a time."""
    pf, dim, bounds = _open(path)
    if not 0 <= start <= stop <= bounds[-1]:
        raise ValueError(f"{path}: rows {start}:{stop} outside 0:{bounds[-1]}")
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    for g in range(max(first, 0), pf.num_row_groups):
        offset = int(bounds[g])
        if offset >= stop:
            break
        for batch in pf.iter_batches(
            batch_size=min(block_rows, READ_ROWS), row_groups=[g], columns=["id", "vector"]
        ):
            lo, hi = max(start, offset), min(stop, offset + batch.num_rows)
            if hi > lo:
                part = batch.slice(lo - offset, hi - lo)
                yield (
                    part.column(0).to_numpy(),
                    vectors_to_numpy(part.column(1), dim),
                )
            offset += batch.num_rows
            if offset >= stop:
                return


def iter_blocks(paths: list[Path], block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All rows of several shards in order, in blocks of exactly block_rows (the last shorter).

    Each block is filled in place as it is read, so it is held once.
    """
    total = sum(num_rows(p) for p in paths)
    if total == 0:
        return
    dim = embeddings_dim(paths[0])
    left = total
    ids = np.empty(min(block_rows, left), dtype=np.int64)
    vectors = np.empty((len(ids), dim), dtype=np.float16)
    filled = 0
    for path in paths:
        for part_ids, part_vectors in iter_rows(path, 0, num_rows(path), block_rows):
            start = 0
            while start < len(part_ids):
                take = min(len(part_ids) - start, len(ids) - filled)
                ids[filled : filled + take] = part_ids[start : start + take]
                vectors[filled : filled + take] = part_vectors[start : start + take]
                filled += take
                start += take
                if filled == len(ids):
                    yield ids, vectors
                    left -= filled
                    filled = 0
                    if left:
                        ids = np.empty(min(block_rows, left), dtype=np.int64)
                        vectors = np.empty((len(ids), dim), dtype=np.float16)


class EmbeddingStore:
    """Stored vectors of one language, read by sentence id.

    Ids carry their sentence shard (`mining.contracts.split_id`), so a lookup
    opens only the shards its ids name, and in each only the row groups that
    hold them. One shard's id column is held at a time (8 bytes a row), never
    its vectors.
    """

    def __init__(self, paths: Mapping[int, Path]) -> None:
        self.paths = {int(s): Path(p) for s, p in paths.items()}

    def _shard_path(self, shard: int) -> Path:
        try:
            return self.paths[shard]
        except KeyError:
            known = ", ".join(str(s) for s in sorted(self.paths)) or "none"
            raise ValueError(
                f"candidate ids name sentence shard {shard}, which is not one of this "
                f"language's embedding shards ({known})"
            ) from None

    def rescore(self, queries: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        """Exact similarity of query row i with each of candidate_ids[i] -> float32 (m, c).

        Empty slots (id -1) score -inf. Memory: the query block, the candidate
        arrays and one read batch of stored vectors.
        """
        m, c = candidate_ids.shape
        if len(queries) != m:
            raise ValueError(f"{len(queries)} query vectors for {m} candidate rows")
        # A query meets each of its candidates: widen its float16 vector once,
        # not once per candidate.
        float16 = queries.dtype == np.float16
        queries = widen(queries)
        sims = np.full(m * c, EMPTY_SCORE, dtype=np.float32)
        flat = candidate_ids.reshape(-1)
        slots = np.flatnonzero(flat != EMPTY_ID)
        if slots.size == 0:
            return sims.reshape(m, c)
        # Sorted by id, the slots of one shard, and within it of one row group,
        # are contiguous: each stored row is decoded at most once per call.
        slots = slots[np.argsort(flat[slots], kind="stable")]
        ids = flat[slots]
        shards = ids >> LINE_BITS
        bounds = np.flatnonzero(np.diff(shards)) + 1
        for part in np.split(np.arange(len(slots)), bounds):
            shard = int(shards[part[0]])
            self._rescore_shard(shard, queries, float16, c, slots[part], ids[part], sims)
        return sims.reshape(m, c)

    def _rescore_shard(
        self,
        shard: int,
        queries: np.ndarray,
        float16: bool,
        c: int,
        slots: np.ndarray,
        ids: np.ndarray,
        sims: np.ndarray,
    ) -> None:
        path = self._shard_path(shard)
        pf, dim, bounds = _open(path)
        if queries.shape[1] != dim:
            raise ValueError(f"{path}: vectors have {dim} dims, the queries {queries.shape[1]}")
        stored = pf.read(columns=["id"]).column(0).to_numpy()
        order = np.argsort(stored, kind="stable")
        where = np.minimum(np.searchsorted(stored[order], ids), len(stored) - 1)
        found = stored[order][where] == ids
        if not found.all():
            raise ValueError(f"{path}: no stored vector for candidate id {int(ids[~found][0])}")
        rows = order[where]
        del stored, order
        by_row = np.argsort(rows, kind="stable")
        rows, slots = rows[by_row], slots[by_row]
        groups = np.unique(np.searchsorted(bounds, rows, side="right") - 1)

        def rescore_group(g: int) -> None:
            # A file object per thread: a ParquetFile is not shared across threads.
            reader = pq.ParquetFile(path)
            offset = int(bounds[g])
            for batch in reader.iter_batches(
                batch_size=READ_ROWS, row_groups=[g], columns=["vector"]
            ):
                lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
                if hi > lo:
                    vectors = widen(vectors_to_numpy(batch.column(0), dim))
                    take = slots[lo:hi]
                    sims[take] = pair_similarities(
                        queries,
                        vectors,
                        take // c,
                        rows[lo:hi] - offset,
                        float16_values=float16,
                    )
                offset += batch.num_rows

        # Row groups in parallel: decoding and the kernel are numpy and pyarrow
        # work that releases the GIL, and each group writes its own slots.
        with ThreadPoolExecutor(max(1, min(CPU_THREADS, len(groups)))) as pool:
            list(pool.map(rescore_group, [int(g) for g in groups]))
