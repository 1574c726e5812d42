"""mine: neighbours in both directions -> pairs/<src>-<tgt>.parquet and .tsv.gz.

The margin needs each sentence's mean similarity to its k nearest neighbours
over the whole other corpus, so the stage reads the pair's neighbour files
twice, block by block (mining.margin.mine_streamed): once for every
sentence's neighbourhood mean (8 bytes a sentence), once to score each
query's candidates, keeping only those that pass the threshold. The pairs
are the ones mining.margin.mine finds with every list in memory.
Outputs are sorted by score, descending; the TSV is `score<TAB>src<TAB>tgt`.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mining.config import Job
from mining.contracts import LINE_BITS, PAIRS, iter_neighbour_blocks
from mining.knn.stored import num_rows
from mining.margin import Block, mine_streamed
from mining.stages import Task, task_fingerprint
from mining.store import WorkDir, atomic_path

NAME = "mine"
# 2: neighbour lists streamed (mining.margin.mine_streamed)
VERSION = 2
# Neighbour rows read at a time: 2^18 rows of k = 16 are about 50 MB.
BLOCK_ROWS = 1 << 18
TAB = "\t"

log = logging.getLogger(__name__)


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    spec = job.section_dict("mine")
    tasks = []
    for pair in job.pairs:
        src, tgt = job.pair_languages(pair)
        searches = [t for t in upstream["search"] if t.params["pair"] == pair]
        texts = [t for t in upstream["prepare"] if t.params["lang"] in (src, tgt)]
        inputs = [t.fingerprint for t in searches + texts]
        outputs = [str(work.pairs(pair))]
        if job.mine.write_tsv:
            outputs.append(str(work.pairs_tsv(pair)))
        tasks.append(
            Task(
                stage=NAME,
                key=pair,
                fingerprint=task_fingerprint(NAME, VERSION, spec, inputs),
                outputs=tuple(outputs),
                params={
                    "pair": pair,
                    "src": src,
                    "tgt": tgt,
                    "fwd": [t.params["shard"] for t in searches if t.params["direction"] == "fwd"],
                    "bwd": [t.params["shard"] for t in searches if t.params["direction"] == "bwd"],
                    "src_shards": [t.params["shard"] for t in texts if t.params["lang"] == src],
                    "tgt_shards": [t.params["shard"] for t in texts if t.params["lang"] == tgt],
                },
            )
        )
    return tasks


def _blocks(work: WorkDir, pair: str, direction: str, shards: list[str]):
    """A pass over one direction's neighbour files, block by block."""

    def blocks() -> Iterator[Block]:
        for shard in shards:
            path = work.neighbours(pair, direction, shard)
            for ids, neighbour_ids, similarities in iter_neighbour_blocks(path, BLOCK_ROWS):
                yield str(path), ids, neighbour_ids, similarities

    return blocks


def _texts(work: WorkDir, lang: str, shards: list[str], wanted: np.ndarray) -> pa.Array:
    """The text of each wanted id, in the order given; shards read a batch at a time and
    only the wanted rows kept, as Arrow strings (no Python object per sentence)."""
    value_set = pa.array(np.unique(wanted))
    found_ids, found_texts = [pa.array([], pa.int64())], [pa.array([], pa.string())]
    for shard in shards:
        path = work.sentences(lang, shard)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["id", "text"]):
            keep = batch.filter(pc.is_in(batch.column(0), value_set=value_set))
            found_ids.append(keep.column(0))
            found_texts.append(keep.column(1))
    rows = pc.index_in(pa.array(wanted), value_set=pa.concat_arrays(found_ids))
    if rows.null_count:
        raise ValueError(f"sentences/{lang}: {rows.null_count} mined sentence ids missing")
    return pa.concat_arrays(found_texts).take(rows)


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    p = task.params
    pair = p["pair"]
    cfg = job.mine
    mined = mine_streamed(
        _blocks(work, pair, "fwd", p["fwd"]),
        _blocks(work, pair, "bwd", p["bwd"]),
        margin_kind=cfg.margin,
        retrieval=cfg.retrieval,
        threshold=cfg.threshold,
        line_bits=LINE_BITS,
    )
    src_text = _texts(work, p["src"], p["src_shards"], mined.src_ids)
    tgt_text = _texts(work, p["tgt"], p["tgt_shards"], mined.tgt_ids)
    table = pa.table(
        {
            "score": mined.scores.astype(np.float64),
            "cosine": mined.cosines.astype(np.float32),
            "src_id": mined.src_ids.astype(np.int64),
            "tgt_id": mined.tgt_ids.astype(np.int64),
            "src_text": src_text,
            "tgt_text": tgt_text,
            "direction": mined.directions.astype(str),
        },
        schema=PAIRS,
    )
    with atomic_path(work.pairs(pair)) as tmp:
        pq.write_table(table, tmp)
    if cfg.write_tsv:
        write_tsv(work, pair, table)
    fwd_files = [work.neighbours(pair, "fwd", shard) for shard in p["fwd"]]
    sources = sum(num_rows(path) for path in fwd_files)
    targets = sum(num_rows(work.neighbours(pair, "bwd", shard)) for shard in p["bwd"])
    return {
        "rows_in": sources + targets,
        "rows_out": int(table.num_rows),
        "sources": sources,
        "targets": targets,
        # k of the forward lists (capped at the number of targets).
        "k": pq.read_schema(fwd_files[0]).field("neighbour_ids").type.list_size if fwd_files else 0,
        "threshold": cfg.threshold,
        "margin": cfg.margin,
        "retrieval": cfg.retrieval,
    }


def write_tsv(work: WorkDir, pair: str, table: pa.Table, chunk_rows: int = 65536) -> None:
    with atomic_path(work.pairs_tsv(pair)) as tmp:
        # mtime=0: the same pairs give the same bytes, run after run.
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as fh,
        ):
            for start in range(0, table.num_rows, chunk_rows):
                part = table.slice(start, chunk_rows)
                lines = io.StringIO()
                for score, src, tgt in zip(
                    part.column("score").to_pylist(),
                    part.column("src_text").to_pylist(),
                    part.column("tgt_text").to_pylist(),
                    strict=True,
                ):
                    # The Parquet file keeps texts exactly; here a tab inside a sentence
                    # would shift the columns, so it becomes a space.
                    lines.write(f"{score:.6f}\t{src.replace(TAB, ' ')}\t{tgt.replace(TAB, ' ')}\n")
                fh.write(lines.getvalue().encode("utf-8"))
