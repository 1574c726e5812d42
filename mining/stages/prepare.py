"""prepare: text shards -> sentences/<lang>/<shard>.parquet (id, text, origin).

One sentence per line, plain or gzip/xz/bz2 compressed. Lines that cannot be
used are rejected with a reason and counted, and each rejected line is listed
(file, line, reason) in a rejects file beside the output, so nothing is lost
without a trace.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
from collections import Counter
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from mining.config import Job, shard_name
from mining.contracts import MAX_LINE, MAX_SHARDS, SENTENCES, sentence_id
from mining.stages import Task, task_fingerprint
from mining.store import WorkDir, atomic_path, file_fingerprint

NAME = "prepare"
VERSION = 1
ROWS_PER_GROUP = 65536
# Rejections logged one by one per reason before the log goes quiet (all are
# still counted and listed in the rejects file).
LOGGED_PER_REASON = 5

log = logging.getLogger(__name__)


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    spec = job.section_dict("prepare")
    tasks = []
    for lang, files in job.shard_files.items():
        if len(files) > MAX_SHARDS:
            raise ValueError(f"languages.{lang}: {len(files)} shards, at most {MAX_SHARDS}")
        for index, path in enumerate(files):
            shard = shard_name(path)
            try:
                inputs = [file_fingerprint(path)]
            except OSError as err:
                raise ValueError(f"{path}: cannot read shard: {err}") from err
            tasks.append(
                Task(
                    stage=NAME,
                    key=f"{lang}/{shard}",
                    fingerprint=task_fingerprint(NAME, VERSION, spec, inputs, [lang, index]),
                    outputs=(
                        str(work.sentences(lang, shard)),
                        str(work.sentences(lang, shard).with_suffix(".rejects.tsv")),
                    ),
                    params={"lang": lang, "shard": shard, "index": index, "path": str(path)},
                )
            )
    return tasks


def _open(path: Path) -> IO[bytes]:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    path = Path(task.params["path"])
    shard_index = int(task.params["index"])
    cfg = job.prepare
    rejected: Counter[str] = Counter()
    seen: set[bytes] = set()
    ids: list[int] = []
    texts: list[str] = []
    origins: list[str] = []
    rows_in = 0
    rows_out = 0
    out_path = work.sentences(task.params["lang"], task.params["shard"])
    rejects_path = out_path.with_suffix(".rejects.tsv")

    def reject(line_no: int, reason: str, rejects: IO[str]) -> None:
        rejected[reason] += 1
        rejects.write(f"{line_no}\t{reason}\n")
        if rejected[reason] <= LOGGED_PER_REASON:
            log.warning("%s:%d: rejected (%s)", path, line_no, reason)

    with (
        atomic_path(out_path) as tmp,
        atomic_path(rejects_path) as tmp_rejects,
        open(tmp_rejects, "w", encoding="utf-8") as rejects,
    ):
        writer = pq.ParquetWriter(tmp, SENTENCES)

        def flush() -> None:
            if ids:
                writer.write_table(
                    pa.table({"id": ids, "text": texts, "origin": origins}, schema=SENTENCES)
                )
                ids.clear()
                texts.clear()
                origins.clear()

        try:
            with _open(path) as fh:
                line_no = 0
                try:
                    for line_no, raw in enumerate(fh, 1):
                        rows_in += 1
                        if line_no > MAX_LINE:
                            raise ValueError(f"{path}:{line_no}: more lines than a shard may hold")
                        raw = raw.rstrip(b"\r\n")
                        if b"\x00" in raw:
                            reject(line_no, "nul_byte", rejects)
                            continue
                        try:
                            text = raw.decode("utf-8").strip()
                        except UnicodeDecodeError:
                            reject(line_no, "invalid_utf8", rejects)
                            continue
                        if not text:
                            reject(line_no, "empty", rejects)
                            continue
                        if len(text) < cfg.min_chars:
                            reject(line_no, "too_short", rejects)
                            continue
                        if len(text) > cfg.max_chars:
                            reject(line_no, "too_long", rejects)
                            continue
                        if cfg.dedup:
                            digest = hashlib.blake2b(text.encode(), digest_size=12).digest()
                            if digest in seen:
                                reject(line_no, "duplicate", rejects)
                                continue
                            seen.add(digest)
                        ids.append(sentence_id(shard_index, line_no))
                        texts.append(text)
                        origins.append(f"{path}:{line_no}")
                        rows_out += 1
                        if len(ids) >= ROWS_PER_GROUP:
                            flush()
                except (OSError, EOFError, lzma.LZMAError) as err:
                    # A truncated or corrupt compressed file: say where it broke.
                    raise ValueError(f"{path}:{line_no + 1}: cannot read: {err}") from err
        except OSError as err:
            raise ValueError(f"{path}: cannot read shard: {err}") from err
        finally:
            flush()
            writer.close()
        if rows_in == 0 and not cfg.allow_empty_files:
            raise ValueError(
                f"{path}: empty shard (set prepare.allow_empty_files = true if that is expected)"
            )
    if rows_in and not rows_out:
        log.warning("%s: every one of its %d lines was rejected", path, rows_in)
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_rejected": sum(rejected.values()),
        "rejected": dict(sorted(rejected.items())),
        "source": str(path),
    }
