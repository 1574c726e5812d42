"""index: embeddings/<lang>/*.parquet -> index/<lang>/ (a layout and its index shards).

Tasks per language:

    <lang>/train               size the language, choose the index type, lay out the
                               index shards, train on a seeded sample
    <lang>/populate/<shard>    build the index shards that begin in this sentence shard

Index shard j holds the language's rows [j R, (j+1) R) in sentence-shard order
(R = `index.shard_rows`), each a copy of the one trained index filled with its
rows, so every shard quantises and codes alike and a search over all of them
merges into the global top-k. Positions in a shard's index map to sentence
ids through the shard's id file.

The plan is made before any sentence is counted, so it cannot know how many
index shards a language needs; the layout is decided at run time by the first
task that needs it (train, or a populate task that starts before train ends),
under a file lock, and written with the fingerprint it was made for. Every
other task reads it. So the layout and the trained index exist once, however
the executor orders or spreads the tasks.

Training draws a seeded sample of whole row groups, then rows among them (so a
10^9-row language is not read in full for 10^5 training vectors); a flat IVF
quantizer is trained by spherical k-means and vectors are assigned to lists with
bfloat16 products in torch (mining/knn/kmeans.py), FAISS trains the codes.

    index/<lang>/layout.json            fingerprint, factory, dim, rows, shards
    index/<lang>/<fp>/empty.faiss       the trained, empty index
    index/<lang>/<fp>/<j>.faiss, .ids.npy
    index/<lang>/populate/<shard>.json  which shards a populate task built
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from mining.config import Job
from mining.contracts import embeddings_dim
from mining.knn.faiss_index import (
    as_float32,
    code_bytes,
    ivf_of,
    lossless_codes,
    new_index,
    resolve_factory,
    save_index,
    split_transforms,
)
from mining.knn.kmeans import Populator, train_quantizer
from mining.knn.stored import iter_rows, num_rows
from mining.stages import Task, task_fingerprint
from mining.store import WorkDir, atomic_path, write_json

NAME = "index"
VERSION = 2
BLOCK_ROWS = 65536
# auto shard_rows: index shards of about this size, one held at a time by search.
SHARD_BYTES = 2 << 30
# auto train_size: at most this much float32 training data in memory.
TRAIN_BYTES = 2 << 30
# FAISS asks for at least 39 training vectors per list.
TRAIN_PER_LIST = 40
MIN_TRAIN = 65536
# The sample is drawn from this many times more rows than it keeps, taken as
# whole row groups: reading every row group of a 10^9-row language for a
# 10^5-row sample would cost a full pass over the corpus.
SAMPLE_SPREAD = 2

log = logging.getLogger(__name__)


def index_spec(job: Job) -> dict[str, Any]:
    """The settings the index depends on; nprobe is a search-time setting."""
    spec = job.section_dict("index")
    del spec["nprobe"]
    return spec | {"seed": job.job.seed}


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    if job.search.backend == "torch":
        return []  # the torch backend searches the stored vectors themselves
    spec = index_spec(job)
    tasks = []
    for lang in job.languages:
        embeds = [t for t in upstream["embed"] if t.params["lang"] == lang]
        shards = [t.params["shard"] for t in embeds]
        folder = work.index_dir(lang)
        layout_fp = task_fingerprint(NAME, VERSION, spec, [t.fingerprint for t in embeds])
        common = {"lang": lang, "shards": shards, "layout": layout_fp}
        tasks.append(
            Task(
                stage=NAME,
                key=f"{lang}/train",
                fingerprint=layout_fp,
                outputs=(str(folder / "layout.json"),),
                params=common | {"role": "train"},
            )
        )
        for shard in shards:
            tasks.append(
                Task(
                    stage=NAME,
                    key=f"{lang}/populate/{shard}",
                    fingerprint=task_fingerprint(NAME, VERSION, spec, [layout_fp], shard),
                    outputs=(str(_manifest_path(work, lang, shard)),),
                    params=common | {"role": "populate", "shard": shard},
                )
            )
    return tasks


def _manifest_path(work: WorkDir, lang: str, shard: str) -> Path:
    return work.index_dir(lang) / "populate" / f"{shard}.json"


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    layout, built_here = ensure_layout(job, work, task.params)
    if task.params["role"] == "train":
        return {
            "rows_in": layout["rows"],
            "rows_out": layout["rows"],
            "factory": layout["factory"],
            "dim": layout["dim"],
            "index_shards": len(layout["shards"]),
            "trained_on": layout["trained_on"],
            "layout_built_here": built_here,
        }
    return _populate(work, task, layout)


# --------------------------------------------------------------------------
# Layout and training


def read_layout(work: WorkDir, lang: str) -> dict[str, Any] | None:
    path = work.index_dir(lang) / "layout.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable layout: {err}") from None


def shard_files(work: WorkDir, lang: str, layout: dict[str, Any], name: str) -> tuple[Path, Path]:
    folder = work.index_dir(lang) / layout["folder"]
    return folder / f"{name}.faiss", folder / f"{name}.ids.npy"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        # Blocks until the holder (another task, maybe on another node of a
        # shared filesystem) has written the layout.
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_layout(job: Job, work: WorkDir, params: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The language's layout for this fingerprint, made now if nobody made it yet."""
    lang, fp = params["lang"], params["layout"]
    layout = read_layout(work, lang)
    if layout is not None and layout["fingerprint"] == fp:
        return layout, False
    with _locked(work.index_dir(lang) / ".layout.lock"):
        layout = read_layout(work, lang)
        if layout is not None and layout["fingerprint"] == fp:
            return layout, False
        layout = _make_layout(job, work, lang, params["shards"], fp)
        write_json(work.index_dir(lang) / "layout.json", layout)
        return layout, True


def split_rows(shards: list[str], counts: list[int], rows_per_shard: int) -> list[dict[str, Any]]:
    """Cut the concatenated rows of the sentence shards into index shards.

    Each index shard is a list of pieces [sentence shard, start, stop]; its
    leader, the populate task that builds it, is the sentence shard of its
    first piece.
    """
    out: list[dict[str, Any]] = []
    pieces: list[list[Any]] = []
    filled = 0
    for shard, count in zip(shards, counts, strict=True):
        start = 0
        while start < count:
            take = min(count - start, rows_per_shard - filled)
            pieces.append([shard, start, start + take])
            filled += take
            start += take
            if filled == rows_per_shard:
                out.append({"pieces": pieces, "rows": filled})
                pieces, filled = [], 0
    if filled:
        out.append({"pieces": pieces, "rows": filled})
    for j, item in enumerate(out):
        item["name"] = f"{j:05d}"
        item["leader"] = item["pieces"][0][0]
    return out


def _make_layout(job: Job, work: WorkDir, lang: str, shards: list[str], fp: str) -> dict[str, Any]:
    start = time.perf_counter()
    paths = [work.embeddings(lang, s) for s in shards]
    counts = [num_rows(p) for p in paths]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"languages.{lang}: no sentences left after prepare; nothing to index")
    dim = embeddings_dim(paths[0])
    cfg = job.index
    factory = resolve_factory(cfg.type, total, dim, cfg.exact_limit)
    index = new_index(factory, dim)
    rows_per_shard = cfg.shard_rows or max(1, SHARD_BYTES // code_bytes(factory, dim))

    root = work.index_dir(lang)
    folder = fp[:16]
    # Shards of an earlier layout are useless now (their search tasks rerun too).
    for old in root.iterdir():
        if old.is_dir() and old.name not in (folder, "populate"):
            shutil.rmtree(old, ignore_errors=True)
    (root / folder).mkdir(parents=True, exist_ok=True)

    trained_on = 0
    if not index.is_trained:
        try:
            trained_on = _train(
                index, paths, counts, cfg.train_size, dim, job.job.seed, lang, factory
            )
        except RuntimeError as err:
            # FAISS's own message names a C++ line; say which index and corpus.
            reason = str(err).strip().splitlines()[-1].split("Error: ")[-1]
            raise ValueError(
                f"index.type: cannot train {factory!r} on languages.{lang} "
                f"({total} vectors of dim {dim}): {reason}"
            ) from None
    save_index(index, root / folder / "empty.faiss")
    ivf = ivf_of(index)
    layout = {
        "fingerprint": fp,
        "folder": folder,
        "factory": factory,
        "dim": dim,
        "rows": total,
        "lists": int(ivf.nlist) if ivf is not None else 0,
        # Whether stored codes reproduce the vectors: if not, search oversamples
        # candidates before re-scoring them exactly.
        "lossless": lossless_codes(index),
        "trained_on": trained_on,
        "train_seconds": round(time.perf_counter() - start, 3),
        "shard_rows": rows_per_shard,
        "shards": split_rows(shards, counts, rows_per_shard),
    }
    log.info(
        "index %s: %s over %d vectors in %d index shard(s)",
        lang,
        factory,
        total,
        len(layout["shards"]),
    )
    return layout


def _sample_rows(
    group_sizes: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of `size` rows: -> (row groups to read, sorted global rows).

    Whole row groups are drawn first (SAMPLE_SPREAD times the rows needed),
    then rows uniformly among theirs.
    """
    starts = np.concatenate([[0], np.cumsum(group_sizes)])
    total = int(starts[-1])
    order = rng.permutation(len(group_sizes))
    reach = np.cumsum(group_sizes[order])
    enough = int(np.searchsorted(reach, min(total, SAMPLE_SPREAD * size))) + 1
    groups = np.sort(order[:enough])
    pool = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
    rows = np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
    return groups, rows


def _iter_sample(
    paths: list[Path], counts: list[int], size: int, seed: int
) -> Iterator[np.ndarray]:
    """Yield the sampled vectors (float32) in blocks, in corpus order."""
    files = [pq.ParquetFile(p) for p in paths]
    sizes = [f.metadata.row_group(g).num_rows for f in files for g in range(f.num_row_groups)]
    where = [(i, g) for i, f in enumerate(files) for g in range(f.num_row_groups)]
    group_sizes = np.asarray(sizes, dtype=np.int64)
    groups, rows = _sample_rows(group_sizes, size, np.random.default_rng(seed))
    starts = np.concatenate([[0], np.cumsum(group_sizes)])
    shard_starts = np.concatenate([[0], np.cumsum(counts)])
    for g in groups:
        file_no, _ = where[g]
        lo, hi = np.searchsorted(rows, [starts[g], starts[g + 1]])
        if hi == lo:
            continue
        base = int(shard_starts[file_no])
        first, last = int(starts[g]) - base, int(starts[g + 1]) - base
        offset = first
        wanted = rows[lo:hi] - base
        for _, block in iter_rows(paths[file_no], first, last, BLOCK_ROWS):
            a, b = np.searchsorted(wanted, [offset, offset + len(block)])
            if b > a:
                yield as_float32(block[wanted[a:b] - offset])
            offset += len(block)


def _train(
    index: faiss.Index,
    paths: list[Path],
    counts: list[int],
    train_size: int,
    dim: int,
    seed: int,
    lang: str,
    factory: str,
) -> int:
    total = sum(counts)
    ivf = ivf_of(index)
    lists = int(ivf.nlist) if ivf is not None else 0

    def size_for(d: int) -> int:
        if train_size:
            return min(total, train_size)
        wanted = max(MIN_TRAIN, TRAIN_PER_LIST * lists)
        return min(total, wanted, max(1, TRAIN_BYTES // (4 * d)))

    chain, inner = split_transforms(index)
    if chain:
        # Train in two steps so that memory stays bounded for 4096-dim vectors:
        # the transform (OPQ, PCA) on a full-dim sample, then the IVF and codes
        # on a larger sample streamed through it at the reduced dim.
        first = np.concatenate(list(_iter_sample(paths, counts, size_for(dim), seed)))
        log.info("index %s: training %s transform on %d vectors", lang, factory, len(first))
        x = first
        for vt in chain:
            vt.train(x)
            x = vt.apply(x)
        del first, x
        d_out = inner.d
        reduced = []
        for block in _iter_sample(paths, counts, size_for(d_out), seed + 1):
            for vt in chain:
                block = vt.apply(block)
            reduced.append(block)
        second = np.concatenate(reduced)
        log.info("index %s: training %s on %d reduced vectors", lang, factory, len(second))
        train_quantizer(inner, second, seed)
        inner.train(second)
        # The wrapper's own flag: its parts are trained, and it checks only itself.
        faiss.downcast_index(index).is_trained = True
        return len(second)
    sample = np.concatenate(list(_iter_sample(paths, counts, size_for(dim), seed)))
    log.info("index %s: training %s on %d vectors", lang, factory, len(sample))
    # A flat IVF quantizer is trained here (spherical k-means in torch); FAISS
    # then trains only the codes. Other quantizers FAISS trains itself.
    train_quantizer(index, sample, seed)
    index.train(sample)
    return len(sample)


# --------------------------------------------------------------------------
# Populate


def _populate(work: WorkDir, task: Task, layout: dict[str, Any]) -> dict[str, Any]:
    lang, shard = task.params["lang"], task.params["shard"]
    folder = work.index_dir(lang) / layout["folder"]
    built = []
    rows = 0
    for item in layout["shards"]:
        if item["leader"] != shard:
            continue
        index = faiss.read_index(str(folder / "empty.faiss"))
        populator = Populator(index)
        ids = np.empty(item["rows"], dtype=np.int64)
        filled = 0
        for piece_shard, start, stop in item["pieces"]:
            path = work.embeddings(lang, piece_shard)
            for block_ids, block in iter_rows(path, start, stop, BLOCK_ROWS):
                populator.add(block)
                ids[filled : filled + len(block_ids)] = block_ids
                filled += len(block_ids)
        if filled != item["rows"] or index.ntotal != filled:
            raise ValueError(
                f"index/{lang}/{item['name']}: expected {item['rows']} rows, read {filled}; "
                "the embeddings changed after the layout was made"
            )
        index_path, ids_path = shard_files(work, lang, layout, item["name"])
        save_index(index, index_path)
        with atomic_path(ids_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, ids)
        del index
        built.append(item["name"])
        rows += filled
    write_json(
        _manifest_path(work, lang, shard),
        {"layout": layout["fingerprint"], "index_shards": built},
    )
    return {
        "rows_in": rows,
        "rows_out": rows,
        "factory": layout["factory"],
        "index_shards": built,
    }
