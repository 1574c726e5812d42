"""embed: sentences -> embeddings/<lang>/<shard>.parquet (id, vector float16).

Vectors are committed in chunks of `embed.chunk_rows` sentences, each chunk an
atomic file of its own, so a task killed after hours restarts from its last
finished chunk. The chunks live in a folder named after the task's
fingerprint, so chunks from another encoder or another input are never mixed
in. When all chunks exist they are joined into the shard's one file, each
chunk a row group.

While one chunk is on the encoder, a background thread reads the next one and, for
encoders that split the work (`prepare` / `encode_prepared`, as the hf one does),
tokenises it: the GPU does not wait for the CPU between chunks.

Files are written without compression or dictionary: float16 vectors neither compress
nor repeat, and both cost time on every read (bench/read_embeddings.py).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mining.config import Job
from mining.contracts import (
    SENTENCES,
    check_schema,
    embeddings_dim,
    embeddings_schema,
    fixed_list_to_numpy,
    vector_dim,
    vectors_to_arrow,
    vectors_to_numpy,
)
from mining.encoders import Encoder, build_encoder, encoder_spec, l2_normalise
from mining.stages import Task, task_fingerprint
from mining.store import WorkDir, atomic_path, fingerprint

NAME = "embed"
# 2: vectors stored as fixed_size_binary(2 * dim) (see contracts.embeddings_schema).
VERSION = 2

log = logging.getLogger(__name__)

# One encoder per process and spec: a 5.7 B model loads once, not per shard.
_ENCODERS: dict[str, Encoder] = {}

# Parquet writer settings for embeddings: see the module docstring. Statistics only for
# the id column: min/max of a vector's values helps no reader.
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "none",
    "use_dictionary": False,
    "write_statistics": ["id"],
}


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    spec = encoder_spec(job)
    tasks = []
    for prep in upstream["prepare"]:
        lang, shard = prep.params["lang"], prep.params["shard"]
        tasks.append(
            Task(
                stage=NAME,
                key=prep.key,
                fingerprint=task_fingerprint(NAME, VERSION, spec, [prep.fingerprint]),
                outputs=(str(work.embeddings(lang, shard)),),
                params={"lang": lang, "shard": shard, "index": prep.params["index"]},
            )
        )
    return tasks


def get_encoder(job: Job) -> Encoder:
    key = fingerprint(job.section_dict("encoder"))
    if key not in _ENCODERS:
        _ENCODERS.clear()  # a new spec in the same process replaces the old model
        _ENCODERS[key] = build_encoder(job)
    return _ENCODERS[key]


def _chunk_path(folder: Path, number: int) -> Path:
    return folder / f"{number:06d}.parquet"


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    lang, shard = task.params["lang"], task.params["shard"]
    source = work.sentences(lang, shard)
    target = work.embeddings(lang, shard)
    chunks_root = work.embedding_chunks(lang, shard)
    folder = chunks_root / task.fingerprint
    # Chunks of an earlier spec or input are useless now.
    if chunks_root.exists():
        for old in chunks_root.iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)

    pf = pq.ParquetFile(source)
    check_schema(source, pf.schema_arrow, SENTENCES)
    precomputed = _precomputed(job, lang, shard) if job.encoder.kind == "precomputed" else None
    encoder = None if precomputed is not None else get_encoder(job)
    counters = getattr(encoder, "stats", None)
    before: dict[str, int] = counters() if counters is not None else {}

    prepare, encode = _two_steps(encoder, precomputed)

    def todo(number: int, batch: pa.RecordBatch) -> Any:
        return None if _chunk_path(folder, number).exists() else prepare(batch)

    rows = 0
    reused = 0
    dim: int | None = None
    chunk_count = 0
    batches = pf.iter_batches(batch_size=job.embed.chunk_rows, columns=["id", "text"])
    for number, batch, work_item in _ahead(enumerate(batches), todo):
        chunk_count = number + 1
        rows += batch.num_rows
        path = _chunk_path(folder, number)
        if work_item is None:
            reused += 1
            dim = dim or embeddings_dim(path)
            continue
        ids = batch.column(0).to_numpy()
        vectors = _checked(encode(work_item), len(ids), source)
        dim = vectors.shape[1]
        table = pa.table(
            {"id": ids, "vector": vectors_to_arrow(vectors)},
            schema=embeddings_schema(dim),
        )
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, **WRITE_OPTIONS)
    if dim is None:  # an empty shard still gets a well-formed, empty file
        dim = precomputed.dim if precomputed is not None else encoder.dim  # type: ignore[union-attr]

    schema = embeddings_schema(dim)
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema, **WRITE_OPTIONS) as writer:
        for n in range(chunk_count):
            writer.write_table(pq.read_table(_chunk_path(folder, n), schema=schema))
        if chunk_count == 0:
            writer.write_table(schema.empty_table())
    shutil.rmtree(chunks_root, ignore_errors=True)
    stats: dict[str, Any] = {
        "rows_in": rows,
        "rows_out": rows,
        "dim": dim,
        "chunks": chunk_count,
        "chunks_reused": reused,
    }
    if counters is not None:
        after = counters()
        delta = {key: int(after[key]) - int(before.get(key, 0)) for key in after}
        stats.update(delta)
        if delta.get("padded_tokens"):
            stats["padding"] = round(1 - delta["tokens"] / delta["padded_tokens"], 4)
    device = getattr(encoder, "device", None)
    if device is not None:
        stats["device"] = str(device)
    # Which GPU a worker had, for a person reading the stats of a multi-GPU run.
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        stats["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return stats


def _two_steps(
    encoder: Encoder | None, precomputed: _Precomputed | None
) -> tuple[Callable[[pa.RecordBatch], Any], Callable[[Any], np.ndarray]]:
    """A chunk's work as (what runs ahead in the reader thread, what runs on the encoder)."""
    if precomputed is not None:
        return (lambda batch: batch.column(0).to_numpy()), precomputed.lookup
    assert encoder is not None
    prepare = getattr(encoder, "prepare", None)
    encode_prepared = getattr(encoder, "encode_prepared", None)
    if prepare is not None and encode_prepared is not None:
        return (lambda batch: prepare(batch.column(1).to_pylist())), encode_prepared
    return (lambda batch: batch.column(1).to_pylist()), encoder.encode


def _ahead(
    items: Iterator[tuple[int, pa.RecordBatch]], work: Callable[[int, pa.RecordBatch], Any]
) -> Iterator[tuple[int, pa.RecordBatch, Any]]:
    """(number, batch, work(number, batch)) for each item, one item ahead in a thread.

    The thread reads the next batch and runs `work` on it (tokenisation) while the
    caller encodes the current one; tokenizers release the GIL, so the two overlap.
    An error in the thread re-raises here, in order.
    """

    def step() -> tuple[int, pa.RecordBatch, Any] | None:
        item = next(items, None)
        if item is None:
            return None
        number, batch = item
        return number, batch, work(number, batch)

    with ThreadPoolExecutor(1, thread_name_prefix="embed-ahead") as pool:
        future = pool.submit(step)
        while (result := future.result()) is not None:
            future = pool.submit(step)
            yield result


def _checked(vectors: np.ndarray, n: int, source: Path) -> np.ndarray:
    """float16 vectors, as the file holds them, or the error that says what is wrong."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(f"{source}: encoder returned shape {vectors.shape} for {n} sentences")
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors).all(axis=1)).sum())
        raise ValueError(f"{source}: encoder returned {bad} non-finite vectors")
    return vectors.astype(np.float16, copy=False)


class _Precomputed:
    """Vectors the user brings: Parquet (id, vector) for one shard."""

    def __init__(self, path: Path) -> None:
        table = pq.read_table(path)
        if "id" not in table.schema.names or "vector" not in table.schema.names:
            raise ValueError(f"{path}: precomputed embeddings need columns 'id' and 'vector'")
        vector_type = table.schema.field("vector").type
        if isinstance(vector_type, pa.FixedSizeBinaryType):
            # This project's own layout, e.g. copied from another job's work dir.
            self.dim = vector_dim(vector_type)
            matrix = vectors_to_numpy(table.column("vector"), self.dim).astype(np.float32)
        elif isinstance(vector_type, pa.FixedSizeListType):
            self.dim = vector_type.list_size
            matrix = fixed_list_to_numpy(table.column("vector"), self.dim, np.float32)
        else:
            lists = table.column("vector").to_pylist()
            if not lists:
                raise ValueError(f"{path}: no vectors")
            self.dim = len(lists[0])
            if any(v is None or len(v) != self.dim for v in lists):
                raise ValueError(f"{path}: vectors of differing lengths (expected {self.dim})")
            matrix = np.asarray(lists, dtype=np.float32)
        self.path = path
        self.ids = table.column("id").to_numpy().astype(np.int64)
        order = np.argsort(self.ids, kind="stable")
        self.ids = self.ids[order]
        if len(self.ids) > 1 and (np.diff(self.ids) == 0).any():
            dup = int(self.ids[1:][np.diff(self.ids) == 0][0])
            raise ValueError(f"{path}: id {dup} appears more than once")
        self.vectors = l2_normalise(matrix[order])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        if len(self.ids) == 0:
            raise ValueError(f"{self.path}: no vectors")
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        missing = self.ids[pos] != ids
        if missing.any():
            raise ValueError(
                f"{self.path}: no vector for sentence id {int(ids[missing][0])} "
                f"({int(missing.sum())} missing in this chunk)"
            )
        return self.vectors[pos]


def _precomputed(job: Job, lang: str, shard: str) -> _Precomputed:
    path = job.resolve(job.encoder.path.format(lang=lang, shard=shard))
    if not path.is_file():
        raise ValueError(f"encoder.path: no precomputed embeddings for {lang}/{shard} at {path}")
    return _Precomputed(path)
