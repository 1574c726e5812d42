"""search: each query shard against the other language, both directions.

    neighbours/<src>-<tgt>/fwd/<src shard>.parquet   source sentences' k nearest targets
    neighbours/<src>-<tgt>/bwd/<tgt shard>.parquet   target sentences' k nearest sources

A task finds candidates, then scores them:

1. Candidates. faiss: every index shard of the other language in turn (one
   in memory at a time, memory-mapped where FAISS allows), the query shard
   streaming through each in blocks, partial lists merged into one running
   top-c per query. On the CPU, IVF shards are searched list-major
   (mining/knn/ivf_scan.py) in groups of queries; everything else, and
   everything on a GPU, by FAISS in blocks of `search.block_rows`. torch: the
   stored vectors of the other language stream through block-wise matrix
   products the same way. Either way the list is the global top-c, whatever
   the number of index shards or blocks.
2. Scores. With `search.rescore` (the default) every candidate is re-scored
   with the exact cosine of the stored vectors and the best k kept, so the
   similarities written, and every neighbourhood mean the margin takes from
   them, are exact and the same on every backend and sharding.

k is capped at the size of the other side (k_eff). Rows are sorted by
similarity descending, ties by neighbour id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mining.config import Job
from mining.contracts import (
    embeddings_dim,
    iter_embedding_blocks,
    neighbours_schema,
    numpy_to_fixed_list,
)
from mining.knn.faiss_index import as_float32, gpu_count, load_index, set_nprobe, to_gpu
from mining.knn.stored import EmbeddingStore, iter_blocks, num_rows
from mining.knn.topk import EMPTY_ID, RunningTopK, sort_rows
from mining.stages import Task, by_key, task_fingerprint
from mining.stages.index import read_layout, shard_files
from mining.store import WorkDir, atomic_path

NAME = "search"
VERSION = 2
# Oversampling where the backend's own scores are approximate: lossy codes
# (PQ), and exact codes multiplied in 16 bits, whose rounding (~2^-9
# relative in bfloat16) only reorders near-ties.
APPROX_FACTOR = 4
ROUNDED_FACTOR = 2
# Each index shard or target block is asked for TIE_FACTOR times the candidates
# kept. FAISS and torch break ties at the cut arbitrarily, so the last places
# of a list could depend on how the candidates were split; with the extra
# room, the cut is made here, ties going to the lower id (sort_rows), and the
# list is the same for any split unless more candidates tie than the room.
TIE_FACTOR = 2
# Query vectors held at once while re-scoring (each group is one pass over
# the candidates' stored vectors).
RESCORE_BYTES = 1 << 30
# torch on a GPU keeps the other side's vectors there when they fit in this
# fraction of free device memory.
DEVICE_CACHE_FRACTION = 0.5
# List-major IVF search takes queries in groups of this many bytes (4 a
# dimension: the float16 vectors and their bfloat16 copy); each group costs one
# pass over the inverted lists.
SCAN_GROUP_BYTES = 1 << 28

log = logging.getLogger(__name__)

# One index shard per process: a worker searching many query shards against
# a language with one index shard reads it once.
_INDEX_CACHE: dict[str, tuple[Any, np.ndarray, int]] = {}


def search_spec(job: Job) -> dict[str, Any]:
    """The settings that can change the neighbours; device and block sizes cannot."""
    cfg = job.search
    spec: dict[str, Any] = {
        "k": cfg.k,
        "backend": cfg.backend,
        "rescore": cfg.rescore,
        "candidates": cfg.candidates,
    }
    if cfg.backend == "faiss":
        spec["nprobe"] = job.index.nprobe
    # The precision of torch's products, for the torch backend and for IVF lists
    # scanned list-major on the CPU.
    spec["dtype"] = cfg.dtype
    return spec


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    spec = search_spec(job)
    embeds = by_key(upstream["embed"])
    tasks = []
    for pair in job.pairs:
        src, tgt = job.pair_languages(pair)
        for direction, query_lang, target_lang in (("fwd", src, tgt), ("bwd", tgt, src)):
            target_embeds = [t for t in upstream["embed"] if t.params["lang"] == target_lang]
            target_index = [t for t in upstream["index"] if t.params["lang"] == target_lang]
            # torch reads the stored vectors; faiss the index (which covers them).
            target = target_index if job.search.backend == "faiss" else target_embeds
            layout = next((t.params["layout"] for t in target_index), None)
            for embed in (t for t in upstream["embed"] if t.params["lang"] == query_lang):
                shard = embed.params["shard"]
                inputs = [embeds[embed.key].fingerprint, *(t.fingerprint for t in target)]
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
                            # sentence shard number -> name, to find a candidate's vector
                            "target_shards": [
                                [t.params["index"], t.params["shard"]] for t in target_embeds
                            ],
                            "layout": layout,
                        },
                    )
                )
    return tasks


def _candidates_wanted(job: Job, k_eff: int, scoring: str, n_target: int) -> int:
    """Candidates per query to re-score.

    scoring: "exact" (the backend's scores are exact: k is enough), "rounded"
    (exact codes, 16-bit products: 2k covers the rounding) or "approximate"
    (lossy codes such as PQ: 4k).
    """
    if not job.search.rescore:
        return k_eff  # nothing re-ranks them: more would be dropped unseen
    factor = {"exact": 1, "rounded": ROUNDED_FACTOR, "approximate": APPROX_FACTOR}[scoring]
    wanted = job.search.candidates or factor * k_eff
    return max(k_eff, min(wanted, n_target))


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    p = task.params
    query_path = work.embeddings(p["query_lang"], p["shard"])
    store = EmbeddingStore(
        {int(i): work.embeddings(p["target_lang"], name) for i, name in p["target_shards"]}
    )
    n_queries = num_rows(query_path)
    start = time.perf_counter()
    if job.search.backend == "faiss":
        result = _faiss_candidates(job, work, task, query_path, n_queries)
    else:
        result = _torch_candidates(job, work, task, query_path, n_queries)
    scores, ids, k_eff, stats, held = result
    searched = time.perf_counter() - start
    if job.search.rescore and n_queries:
        scores = _rescore(query_path, ids, store, held)
    scores, ids = sort_rows(scores, ids)
    scores, ids = scores[:, :k_eff], ids[:, :k_eff]
    short = (ids == EMPTY_ID).any(axis=1)
    if short.any():
        raise RuntimeError(
            f"{query_path}: {int(short.sum())} queries found fewer than k={k_eff} neighbours; "
            "probe more lists (index.nprobe) or use a flat index"
        )
    _write(work, p, query_path, scores, ids, k_eff)
    stats |= {
        "rows_in": n_queries,
        "rows_out": n_queries,
        "k": k_eff,
        "rescored": job.search.rescore,
        "search_seconds": round(searched, 3),
        "rescore_seconds": round(time.perf_counter() - start - searched, 3),
    }
    return stats


def _write(
    work: WorkDir,
    p: dict[str, Any],
    query_path: Path,
    scores: np.ndarray,
    ids: np.ndarray,
    k: int,
) -> None:
    schema = neighbours_schema(k)
    row = 0
    with (
        atomic_path(work.neighbours(p["pair"], p["direction"], p["shard"])) as tmp,
        pq.ParquetWriter(tmp, schema) as writer,
    ):
        # Only the id column: the vectors are not needed again.
        for batch in pq.ParquetFile(query_path).iter_batches(batch_size=65536, columns=["id"]):
            query_ids = batch.column(0).to_numpy()
            stop = row + len(query_ids)
            table = pa.table(
                {
                    "id": query_ids,
                    "neighbour_ids": numpy_to_fixed_list(ids[row:stop], pa.int64()),
                    "similarities": numpy_to_fixed_list(scores[row:stop], pa.float32()),
                },
                schema=schema,
            )
            writer.write_table(table)
            row = stop
        if row == 0:
            writer.write_table(schema.empty_table())


def _rescore(
    query_path: Path, ids: np.ndarray, store: EmbeddingStore, held: np.ndarray | None
) -> np.ndarray:
    """Exact scores of the candidates; `held`: the query vectors, if still in memory."""
    if held is not None and len(held) == len(ids):
        return store.rescore(held, ids)
    dim = embeddings_dim(query_path)
    # float16 vectors and their float32 copy
    group = max(1, RESCORE_BYTES // (6 * dim))
    scores = np.empty(ids.shape, dtype=np.float32)
    for start, vectors in _query_groups(query_path, group):
        stop = start + len(vectors)
        scores[start:stop] = store.rescore(vectors, ids[start:stop])
    return scores


def _query_groups(path: Path, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    start = 0
    for ids, vectors in iter_blocks([path], rows):
        yield start, vectors
        start += len(ids)


# --------------------------------------------------------------------------
# faiss


def _load_shard(
    index_path: Path, ids_path: Path, nprobe: int, gpu: int | None
) -> tuple[Any, np.ndarray, int]:
    """-> (index ready to search, position -> sentence id map, lists probed).

    gpu: the device number to search on, or None for the CPU.
    """
    key = f"{index_path}|{nprobe}|{gpu}"
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        index = load_index(index_path)
        ids = np.load(ids_path, mmap_mode="r")
        if index.ntotal != len(ids):
            raise ValueError(f"{index_path}: index holds {index.ntotal} vectors, id map {len(ids)}")
        probed = set_nprobe(index, nprobe)
        if gpu is not None:
            index = to_gpu(index, probed, gpu)
        _INDEX_CACHE[key] = (index, ids, probed)
    return _INDEX_CACHE[key]


def _faiss_gpu(job: Job) -> int | None:
    """The GPU FAISS searches on: faiss-gpu installed, a GPU visible, the spec not "cpu"."""
    device = job.search.device
    if device == "cpu" or gpu_count() == 0:
        return None
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _faiss_candidates(
    job: Job, work: WorkDir, task: Task, query_path: Path, n_queries: int
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any], np.ndarray | None]:
    import torch

    from mining.knn import ivf_scan, torch_knn

    p = task.params
    lang = p["target_lang"]
    layout = read_layout(work, lang)
    if layout is None or layout["fingerprint"] != p["layout"]:
        raise ValueError(
            f"{work.index_dir(lang)}: no index for this spec; run the index stage first"
        )
    n_target = int(layout["rows"])
    k_eff = min(job.search.k, n_target)
    gpu = _faiss_gpu(job)
    folder = work.index_dir(lang) / layout["folder"]
    # On the CPU, IVF lists are scanned list-major with torch products (see
    # mining/knn/ivf_scan.py); FAISS searches everything else, and on a GPU.
    list_major = gpu is None and ivf_scan.supports(load_index(folder / "empty.faiss"))
    dtype = torch_knn.resolve_dtype(job.search.dtype, torch_knn.resolve_device("cpu"))
    if not layout["lossless"]:
        scoring = "approximate"
    elif list_major and dtype != torch.float32:
        scoring = "rounded"
    else:
        scoring = "exact"
    wanted = _candidates_wanted(job, k_eff, scoring, n_target)
    fetch = min(TIE_FACTOR * wanted, n_target)
    running = RunningTopK(n_queries, fetch)
    dim = int(layout["dim"])
    group = max(job.search.block_rows, SCAN_GROUP_BYTES // (4 * dim))
    nprobe = 0
    held = None
    for item in layout["shards"]:
        index_path, ids_path = shard_files(work, lang, layout, item["name"])
        if not index_path.exists():
            raise ValueError(f"{index_path}: index shard missing; rerun the index stage")
        index, shard_ids, nprobe = _load_shard(index_path, ids_path, job.index.nprobe, gpu)
        k_shard = min(fetch, int(index.ntotal))
        if list_major:
            searcher = ivf_scan.ListMajorSearcher(index, dtype)
            blocks = _query_groups(query_path, group)
        else:
            searcher = None
            blocks = _query_groups(query_path, job.search.block_rows)
        for row, block in blocks:
            # A query shard read in one block stays for re-scoring (no second read).
            held = block if row == 0 and len(block) == n_queries else None
            if searcher is not None:
                similarities, positions = searcher.search(block, k_shard, nprobe)
            else:
                similarities, positions = index.search(as_float32(block), k_shard)
            found = positions >= 0
            ids = np.where(found, shard_ids[np.where(found, positions, 0)], EMPTY_ID)
            running.add(row, similarities, ids)
    stats = {
        "backend": "faiss" if gpu is None else f"faiss-gpu:{gpu}",
        "factory": layout["factory"],
        "list_major": list_major,
        "index_shards": len(layout["shards"]),
        "index_size": n_target,
        "candidates": wanted,
        "nprobe": nprobe,
    }
    if list_major:
        stats["dtype"] = str(dtype).removeprefix("torch.")
    # RunningTopK keeps its rows sorted, so the cut is by (score, id).
    return running.scores[:, :wanted], running.ids[:, :wanted], k_eff, stats, held


# --------------------------------------------------------------------------
# torch


class _TorchState:
    cache: Any = None


def _torch_candidates(
    job: Job, work: WorkDir, task: Task, query_path: Path, n_queries: int
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any], np.ndarray | None]:
    import torch

    from mining.knn import torch_knn

    p = task.params
    paths = [work.embeddings(p["target_lang"], name) for _, name in p["target_shards"]]
    n_target = sum(num_rows(path) for path in paths)
    if n_target == 0:
        raise ValueError(f"languages.{p['target_lang']}: no sentences to search against")
    k_eff = min(job.search.k, n_target)
    device = torch_knn.resolve_device(job.search.device)
    dtype = torch_knn.resolve_dtype(job.search.dtype, device)
    scoring = "exact" if dtype == torch.float32 else "rounded"
    wanted = _candidates_wanted(job, k_eff, scoring, n_target)
    fetch = min(TIE_FACTOR * wanted, n_target)
    block = job.search.block_rows
    scores = np.empty((n_queries, wanted), dtype=np.float32)
    ids = np.empty((n_queries, wanted), dtype=np.int64)
    if _TorchState.cache is None:
        _TorchState.cache = torch_knn.DeviceCache()
    budget = 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * DEVICE_CACHE_FRACTION)
    key = (tuple(str(x) for x in paths), str(device), str(dtype), block)
    row = 0
    held = None
    for _, queries in iter_embedding_blocks(query_path, block):
        held = queries if row == 0 and len(queries) == n_queries else None
        targets = _TorchState.cache.blocks_for(
            key, iter_blocks(paths, block), device, dtype, budget
        )
        s, i = torch_knn.knn(queries, targets, fetch, device=device, dtype=dtype)
        s, i = sort_rows(s, i)
        s, i = s[:, :wanted], i[:, :wanted]
        scores[row : row + len(queries)] = s
        ids[row : row + len(queries)] = i
        row += len(queries)
    stats = {
        "backend": "torch",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "index_size": n_target,
        "candidates": wanted,
    }
    return scores, ids, k_eff, stats, held
