"""Kill -9 a real job at arbitrary moments; the finished job must not notice.

Each round starts `python -m mining run` as a separate process and SIGKILLs
it after a seeded random delay, wherever it happens to be (writing a chunk,
renaming, writing a marker). Once a round runs to the end on its own, the
pairs must be byte-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_toy_corpus

OVERRIDES = ["--set", "embed.chunk_rows=500"]


def _run(spec: Path, timeout: float | None = None) -> int | None:
    """Run the job; kill it after `timeout` seconds. None when it was killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mining", "run", str(spec), *OVERRIDES],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return None
    assert proc.returncode == 0, err.decode()[-2000:]
    return proc.returncode


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_identical_pairs(tmp_path: Path) -> None:
    size = {"n_pairs": 1500, "n_unpaired": 6000, "shards": 6}
    clean = write_toy_corpus(tmp_path / "clean", **size)
    start = time.perf_counter()
    _run(clean.spec)
    full = time.perf_counter() - start

    for attempt in range(3):
        killed = write_toy_corpus(tmp_path / f"killed-{attempt}", **size)
        rng = random.Random(7 + attempt)
        kills = 0
        for _ in range(12):
            # Delays spread over the job's whole length, so kills land in
            # different stages from one round to the next.
            if _run(killed.spec, timeout=rng.uniform(0.3, 1.0) * full) is not None:
                break
            kills += 1
        else:
            _run(killed.spec)
        if kills >= 2:
            break
        # The machine runs faster now than when the clean run was timed (other
        # work finished): aim the kills earlier and start again.
        full /= 2
    assert kills >= 2, f"the job finished before it could be killed twice ({full:.1f} s)"
    for name in ("en-de.parquet", "en-de.tsv.gz"):
        a = (clean.root / "work" / "pairs" / name).read_bytes()
        b = (killed.root / "work" / "pairs" / name).read_bytes()
        assert a == b, name
    # Whatever temporary files the kills left, the tasks that reran swept them.
    leftovers = [p for p in (killed.root / "work").rglob("*.tmp")]
    assert leftovers == []
