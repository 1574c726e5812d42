"""search: each query shard against the other language's index, both directions.

    neighbours/<src>-<tgt>/fwd/<src shard>.parquet   source sentences' k nearest targets
    neighbours/<src>-<tgt>/bwd/<tgt shard>.parquet   target sentences' k nearest sources

Queries stream in blocks of `search.block_rows`, so memory is the index plus
one block. k is capped at the size of the other side.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mining.config import Job
from mining.contracts import iter_embedding_blocks, neighbours_schema, numpy_to_fixed_list
from mining.knn.faiss_index import as_float32, load_index
from mining.stages import Task, by_key, task_fingerprint
from mining.store import WorkDir, atomic_path

NAME = "search"
VERSION = 1

log = logging.getLogger(__name__)

_INDEX_CACHE: dict[str, tuple[Any, np.ndarray]] = {}


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    spec = {"k": job.search.k}
    embeds = by_key(upstream["embed"])
    indexes = by_key(upstream["index"])
    tasks = []
    for pair in job.pairs:
        src, tgt = job.pair_languages(pair)
        for direction, query_lang, target_lang in (("fwd", src, tgt), ("bwd", tgt, src)):
            target = indexes[target_lang]
            for embed in (t for t in upstream["embed"] if t.params["lang"] == query_lang):
                shard = embed.params["shard"]
                inputs = [embeds[embed.key].fingerprint, target.fingerprint]
                tasks.append(
                    Task(
                        stage=NAME,
                        key=f"{pair}/{direction}/{shard}",
                        fingerprint=task_fingerprint(NAME, VERSION, spec, inputs),
                        outputs=(str(work.neighbours(pair, direction, shard)),),
                        params={
                            "pair": pair,
                            "direction": direction,
                            "query_lang": query_lang,
                            "target_lang": target_lang,
                            "shard": shard,
                        },
                    )
                )
    return tasks


def _load(work: WorkDir, lang: str) -> tuple[Any, np.ndarray]:
    folder = work.index_dir(lang)
    key = str(folder)
    if key not in _INDEX_CACHE:
        # Keep one index per process: a worker searching many shards against
        # the same language reads it once.
        _INDEX_CACHE.clear()
        index = load_index(folder / "index.faiss")
        ids = np.load(folder / "ids.npy")
        if index.ntotal != len(ids):
            raise ValueError(f"{folder}: index holds {index.ntotal} vectors, id map {len(ids)}")
        _INDEX_CACHE[key] = (index, ids)
    return _INDEX_CACHE[key]


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    p = task.params
    index, target_ids = _load(work, p["target_lang"])
    k = min(job.search.k, int(index.ntotal))
    query_path: Path = work.embeddings(p["query_lang"], p["shard"])
    schema = neighbours_schema(k)
    rows = 0
    with atomic_path(work.neighbours(p["pair"], p["direction"], p["shard"])) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for ids, block in iter_embedding_blocks(query_path, job.search.block_rows):
                similarities, positions = index.search(as_float32(block), k)
                if (positions < 0).any():
                    raise RuntimeError(
                        f"{query_path}: the index returned fewer than k={k} neighbours"
                    )
                table = pa.table(
                    {
                        "id": ids,
                        "neighbour_ids": numpy_to_fixed_list(target_ids[positions], pa.int64()),
                        "similarities": numpy_to_fixed_list(
                            similarities.astype(np.float32), pa.float32()
                        ),
                    },
                    schema=schema,
                )
                writer.write_table(table)
                rows += len(ids)
            if rows == 0:
                writer.write_table(schema.empty_table())
    return {"rows_in": rows, "rows_out": rows, "k": k, "index_size": int(index.ntotal)}
