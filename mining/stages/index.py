"""index: embeddings/<lang>/*.parquet -> index/<lang>/ (FAISS index + id map).

Vectors stream in row groups from each shard in shard order, so the position
of a vector in the index, and so the id map, depends only on the inputs.
Indexes that need training train on a seeded sample, so the same job builds
the same index.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mining.config import Job
from mining.contracts import iter_embedding_blocks
from mining.knn.faiss_index import as_float32, new_index, resolve_factory, save_index
from mining.stages import Task, task_fingerprint
from mining.store import WorkDir, atomic_path

NAME = "index"
VERSION = 1
BLOCK_ROWS = 65536
TRAIN_SAMPLE = 262_144

log = logging.getLogger(__name__)


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    spec = job.section_dict("index") | {"seed": job.job.seed}
    tasks = []
    for lang in job.languages:
        embeds = [t for t in upstream["embed"] if t.params["lang"] == lang]
        folder = work.index_dir(lang)
        tasks.append(
            Task(
                stage=NAME,
                key=lang,
                fingerprint=task_fingerprint(NAME, VERSION, spec, [t.fingerprint for t in embeds]),
                outputs=(str(folder / "index.faiss"), str(folder / "ids.npy")),
                params={"lang": lang, "shards": [t.params["shard"] for t in embeds]},
            )
        )
    return tasks


def _shard_paths(work: WorkDir, task: Task) -> list[Path]:
    return [work.embeddings(task.params["lang"], s) for s in task.params["shards"]]


def _sample(paths: list[Path], total: int, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of rows across shards, for training."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    parts = []
    offset = 0
    for path in paths:
        for _, block in iter_embedding_blocks(path, BLOCK_ROWS):
            lo, hi = np.searchsorted(chosen, [offset, offset + len(block)])
            if hi > lo:
                parts.append(block[chosen[lo:hi] - offset])
            offset += len(block)
    return as_float32(np.concatenate(parts))


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    lang = task.params["lang"]
    paths = _shard_paths(work, task)
    counts = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"languages.{lang}: no sentences left after prepare; nothing to index")
    dim = pq.read_schema(paths[0]).field("vector").type.list_size
    factory = resolve_factory(job.index.type, total, dim)
    index = new_index(factory, dim)
    trained_on = 0
    if not index.is_trained:
        sample = _sample(paths, total, TRAIN_SAMPLE, job.job.seed)
        trained_on = len(sample)
        log.info("index %s: training %s on %d vectors", lang, factory, trained_on)
        index.train(sample)
    ids = np.empty(total, dtype=np.int64)
    filled = 0
    for path in paths:
        for block_ids, block in iter_embedding_blocks(path, BLOCK_ROWS):
            index.add(as_float32(block))
            ids[filled : filled + len(block_ids)] = block_ids
            filled += len(block_ids)
    folder = work.index_dir(lang)
    save_index(index, folder / "index.faiss")
    with atomic_path(folder / "ids.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, ids)
    return {
        "rows_in": total,
        "rows_out": int(index.ntotal),
        "factory": factory,
        "dim": dim,
        "trained_on": trained_on,
    }
