"""The local executor gives the embed stage one worker per GPU.

No GPU here: the test tells the executor that GPUs "3" and "5" are visible and checks
the mechanics (a spawned worker per GPU, each seeing only its own through
CUDA_VISIBLE_DEVICES, tasks handed out until none is left) and that the vectors are
the ones an in-process run writes. The workers then run on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mining.config import load_job
from mining.contracts import read_embeddings
from mining.executors import local
from mining.pipeline import run_job
from mining.store import WorkDir
from tests.jobs import write_shards, write_spec
from tests.tiny_models import mixed_length_sentences

pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")


def _job(root: Path, base: Path, adapter: Path) -> Path:
    for lang, seed in (("xx", 1), ("yy", 2)):
        texts = mixed_length_sentences(base / "spiece.model", 80, seed=seed)
        write_shards(root / "corpus" / lang, [texts[shard::3] for shard in range(3)])
    encoder = {"kind": "hf", "model": base, "adapter": adapter, "dtype": "float32"}
    tables = {"job": {"name": "gpus"}, "embed": {"chunk_rows": 16}, "encoder": encoder}
    return write_spec(root / "job.toml", ["xx-yy"], tables)


def test_one_worker_per_gpu(
    tiny_mst5: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = tiny_mst5
    spec = _job(tmp_path / "job", base, adapter)
    job = load_job(spec)
    monkeypatch.setattr(local, "visible_gpus", lambda: [])
    assert local.gpu_workers(job, "embed") == []  # no GPU: run as before
    monkeypatch.setattr(local, "visible_gpus", lambda: ["0"])
    assert local.gpu_workers(job, "embed") == []  # one GPU: in process, as before

    monkeypatch.setattr(local, "visible_gpus", lambda: ["3", "5"])
    assert local.gpu_workers(job, "embed") == ["3", "5"]
    assert local.gpu_workers(job, "search") == []
    assert local.gpu_workers(load_job(spec, ["encoder.device=cpu"]), "embed") == []
    run_job(job, ["prepare", "embed"])

    work = WorkDir(job.work_dir)
    seen = set()
    for path in sorted((work.root / "_state" / "embed").glob("*.stats.json")):
        stats = json.loads(path.read_text())
        seen.add(stats["cuda_visible_devices"])
    assert seen == {"3", "5"}  # both workers ran tasks, each with one GPU

    monkeypatch.setattr(local, "visible_gpus", lambda: [])
    alone = load_job(spec, ["job.work_dir='alone'"])
    run_job(alone, ["prepare", "embed"])
    for lang in ("xx", "yy"):
        for shard in range(3):
            name = f"part-{shard}"
            ids_a, a = read_embeddings(work.embeddings(lang, name))
            ids_b, b = read_embeddings(WorkDir(alone.work_dir).embeddings(lang, name))
            np.testing.assert_array_equal(ids_a, ids_b)
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-3)
