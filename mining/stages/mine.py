"""mine: neighbours in both directions -> pairs/<src>-<tgt>.parquet and .tsv.gz.

The margin needs each sentence's mean similarity to its k nearest neighbours
over the whole other corpus, which is why this stage reads every shard's
neighbour lists of a pair together (two (n, k) arrays, not the vectors).
Outputs are sorted by score, descending; the TSV is `score<TAB>src<TAB>tgt`.
"""

from __future__ import annotations

import gzip
import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mining.config import Job
from mining.contracts import PAIRS, read_neighbours
from mining.margin import mine as select_pairs
from mining.stages import Task, task_fingerprint
from mining.store import WorkDir, atomic_path

NAME = "mine"
VERSION = 1
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


def _read_direction(work: WorkDir, pair: str, direction: str, shards: list[str]):
    parts = [read_neighbours(work.neighbours(pair, direction, s)) for s in shards]
    ks = {p[1].shape[1] for p in parts if len(p[0])}
    if len(ks) > 1:
        raise ValueError(f"neighbours/{pair}/{direction}: shards disagree on k ({sorted(ks)})")
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _texts(work: WorkDir, lang: str, shards: list[str], wanted: np.ndarray) -> dict[int, str]:
    wanted_arr = pa.array(np.unique(wanted))
    found: dict[int, str] = {}
    for shard in shards:
        table = pq.read_table(work.sentences(lang, shard), columns=["id", "text"])
        table = table.filter(pc.is_in(table.column("id"), value_set=wanted_arr))
        found.update(
            zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True)
        )
    return found


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    p = task.params
    pair = p["pair"]
    src_ids, fwd_ids, fwd_sims = _read_direction(work, pair, "fwd", p["fwd"])
    tgt_ids, bwd_ids, bwd_sims = _read_direction(work, pair, "bwd", p["bwd"])
    cfg = job.mine
    mined = select_pairs(
        src_ids,
        fwd_ids,
        fwd_sims,
        tgt_ids,
        bwd_ids,
        bwd_sims,
        margin_kind=cfg.margin,
        retrieval=cfg.retrieval,
        threshold=cfg.threshold,
    )
    src_text = _texts(work, p["src"], p["src_shards"], mined.src_ids)
    tgt_text = _texts(work, p["tgt"], p["tgt_shards"], mined.tgt_ids)
    table = pa.table(
        {
            "score": mined.scores.astype(np.float64),
            "cosine": mined.cosines.astype(np.float32),
            "src_id": mined.src_ids.astype(np.int64),
            "tgt_id": mined.tgt_ids.astype(np.int64),
            "src_text": [src_text[int(i)] for i in mined.src_ids],
            "tgt_text": [tgt_text[int(i)] for i in mined.tgt_ids],
            "direction": [str(d) for d in mined.directions],
        },
        schema=PAIRS,
    )
    with atomic_path(work.pairs(pair)) as tmp:
        pq.write_table(table, tmp)
    if cfg.write_tsv:
        write_tsv(work, pair, table)
    return {
        "rows_in": int(len(src_ids) + len(tgt_ids)),
        "rows_out": int(table.num_rows),
        "sources": len(src_ids),
        "targets": len(tgt_ids),
        "k": int(fwd_ids.shape[1]) if fwd_ids.ndim == 2 else 0,
        "threshold": cfg.threshold,
        "margin": cfg.margin,
        "retrieval": cfg.retrieval,
    }


def write_tsv(work: WorkDir, pair: str, table: pa.Table) -> None:
    buffer = io.StringIO()
    for score, src, tgt in zip(
        table.column("score").to_pylist(),
        table.column("src_text").to_pylist(),
        table.column("tgt_text").to_pylist(),
        strict=True,
    ):
        # The Parquet file keeps texts exactly; here a tab inside a sentence
        # would shift the columns, so it becomes a space.
        buffer.write(f"{score:.6f}\t{src.replace(TAB, ' ')}\t{tgt.replace(TAB, ' ')}\n")
    with atomic_path(work.pairs_tsv(pair)) as tmp:
        # mtime=0: the same pairs give the same bytes, run after run.
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as fh,
        ):
            fh.write(buffer.getvalue().encode("utf-8"))
