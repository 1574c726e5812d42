"""The work directory: where each stage's files live, atomic writes, markers.

A task's output appears under its final name only when complete (written to
a temporary file in the same folder, then renamed, which is atomic on POSIX
filesystems), and its done-marker is written after that. A task killed at any
point therefore leaves either no output or an output with no marker, and a
rerun redoes it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class WorkDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # Stage outputs -------------------------------------------------------
    def sentences(self, lang: str, shard: str) -> Path:
        return self.root / "sentences" / lang / f"{shard}.parquet"

    def embeddings(self, lang: str, shard: str) -> Path:
        return self.root / "embeddings" / lang / f"{shard}.parquet"

    def embedding_chunks(self, lang: str, shard: str) -> Path:
        return self.root / "embeddings" / lang / f"{shard}.chunks"

    def index_dir(self, lang: str) -> Path:
        return self.root / "index" / lang

    def neighbours(self, pair: str, direction: str, shard: str) -> Path:
        return self.root / "neighbours" / pair / direction / f"{shard}.parquet"

    def pairs(self, pair: str) -> Path:
        return self.root / "pairs" / f"{pair}.parquet"

    def pairs_tsv(self, pair: str) -> Path:
        return self.root / "pairs" / f"{pair}.tsv.gz"

    def evaluation(self, pair: str) -> Path:
        return self.root / "pairs" / f"{pair}.eval.json"

    # Bookkeeping ---------------------------------------------------------
    def _state(self, stage: str, task: str, suffix: str) -> Path:
        return self.root / "_state" / stage / f"{task.replace('/', '__')}{suffix}"

    def marker(self, stage: str, task: str) -> Path:
        return self._state(stage, task, ".done.json")

    def stats(self, stage: str, task: str) -> Path:
        return self._state(stage, task, ".stats.json")

    def read_marker(self, stage: str, task: str) -> dict[str, Any] | None:
        path = self.marker(stage, task)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            # A torn marker means the task did not finish; redo it.
            return None

    def write_marker(self, stage: str, task: str, fingerprint: str) -> None:
        write_json(self.marker(stage, task), {"fingerprint": fingerprint})

    def clear_marker(self, stage: str, task: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.marker(stage, task).unlink()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it into place on success.

    The temporary file lives in the target's own folder so the rename never
    crosses filesystems (a cross-device rename is a copy, and not atomic).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def remove_stale_temporaries(target: Path) -> int:
    """Delete temporary files that a killed writer of `target` left behind.

    Called before a task runs again: the task is the only writer of its
    targets, so any temporary file beside them is from an earlier, dead run.
    """
    target = Path(target)
    removed = 0
    if target.parent.is_dir():
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed += 1
    return removed


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fingerprint(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_fingerprint(path: Path) -> str:
    """Identity of a raw input file: path, size and modification time.

    Hashing the contents of every text shard on every run would cost a full
    read of the corpus; size and mtime catch edits the way make does.
    """
    st = Path(path).stat()
    return fingerprint([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
