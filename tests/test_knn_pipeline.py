"""Index and search through the pipeline: sharding independence, exact re-scoring,
torch against faiss, and what a changed setting reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mining.config import load_job
from mining.contracts import read_embeddings, read_neighbours
from mining.pipeline import build_plan, execute_task, pending, run_job
from mining.store import WorkDir
from tests.conftest import write_toy_corpus

# Small indexes: OpenMP threads would only wait on each other (see conftest).
pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _run(root: Path, *overrides: str) -> WorkDir:
    corpus = write_toy_corpus(root)
    job = load_job(corpus.spec, list(overrides))
    run_job(job)
    return WorkDir(job.work_dir)


def _outputs(work: WorkDir) -> dict[str, bytes]:
    files = [*sorted(work.root.glob("neighbours/**/*.parquet")), work.pairs("en-de")]
    return {str(p.relative_to(work.root)): p.read_bytes() for p in files}


def _layout(work: WorkDir, lang: str) -> dict:
    return json.loads((work.index_dir(lang) / "layout.json").read_text())


@pytest.mark.parametrize(
    "index",
    [
        ["index.type=auto"],  # Flat at this size
        ["index.type=IVF16,SQfp16", "index.nprobe=3"],  # approximate lists, exact codes
        ["index.type=IVF8,PQ8x4", "index.nprobe=2"],  # approximate lists and codes
    ],
    ids=["flat", "ivf-sq", "ivf-pq"],
)
def test_pairs_do_not_depend_on_index_sharding(tmp_path: Path, index: list[str]) -> None:
    # 2 sentence shards of 90 rows per language: one index shard spanning both,
    # or four cutting across them.
    one = _run(tmp_path / "one", *index, "index.shard_rows=180")
    four = _run(tmp_path / "four", *index, "index.shard_rows=45")
    for lang in ("en", "de"):
        assert len(_layout(one, lang)["shards"]) == 1
        assert len(_layout(four, lang)["shards"]) == 4
    assert _outputs(one) == _outputs(four)
    # Still mining: the toy corpus's 60 true pairs are found.
    assert pq.read_table(one.pairs("en-de")).num_rows >= 55


def _stored_vectors(work: WorkDir, lang: str) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for path in sorted((work.root / "embeddings" / lang).glob("*.parquet")):
        ids, vectors = read_embeddings(path)
        out.update(zip(ids.tolist(), vectors, strict=True))
    return out


def test_approximate_index_scores_are_exact_cosines(tmp_path: Path) -> None:
    pq_index = ["index.type=IVF8,PQ8x4", "index.nprobe=2"]
    work = _run(tmp_path / "rescored", *pq_index)
    raw = _run(tmp_path / "raw", *pq_index, "search.rescore=false")
    src, tgt = _stored_vectors(work, "en"), _stored_vectors(work, "de")
    for path in sorted(work.root.glob("neighbours/en-de/fwd/*.parquet")):
        ids, neighbour_ids, sims = read_neighbours(path)
        for qid, nids, row in zip(ids, neighbour_ids, sims, strict=True):
            exact = [
                np.float32(src[qid].astype(np.float64) @ tgt[n].astype(np.float64)) for n in nids
            ]
            np.testing.assert_array_equal(row, exact)
            assert (np.diff(row) <= 0).all()
        stats = json.loads((work.stats("search", f"en-de/fwd/{path.stem}")).read_text())
        assert stats["candidates"] == 16  # 4k: PQ scores are approximate
        # Without re-scoring the PQ distances are written as they are: not exact.
        _, _, raw_sims = read_neighbours(raw.neighbours("en-de", "fwd", path.stem))
        assert np.abs(raw_sims - sims).max() > 1e-3


def test_torch_backend_finds_the_faiss_pairs(tmp_path: Path) -> None:
    faiss_work = _run(tmp_path / "faiss")
    torch_work = _run(tmp_path / "torch", "search.backend=torch", "search.block_rows=64")
    # No index is built for the torch backend: it reads the stored vectors.
    assert not (torch_work.root / "index").exists()
    assert _outputs(faiss_work) == _outputs(torch_work)


def test_settings_rerun_exactly_what_they_change(tmp_path: Path) -> None:
    corpus = write_toy_corpus(tmp_path / "toy")
    run_job(load_job(corpus.spec))

    def todo(*overrides: str) -> dict[str, int]:
        plans = pending(load_job(corpus.spec, list(overrides)))
        return {sp.stage: len(sp.todo) for sp in plans if sp.todo}

    assert todo() == {}
    # Performance-only settings change nothing.
    assert todo("search.device=cpu", "search.block_rows=7") == {}
    # nprobe is read by search: the index stays.
    assert todo("index.nprobe=8") == {"search": 4, "mine": 1, "evaluate": 1}
    assert todo("search.rescore=false") == {"search": 4, "mine": 1, "evaluate": 1}
    assert todo("index.shard_rows=10")["index"] == 6  # 2 x (train + 2 populate)


def test_layout_is_made_once_whatever_task_runs_first(tmp_path: Path) -> None:
    corpus = write_toy_corpus(tmp_path / "toy")
    job = load_job(corpus.spec, ["index.shard_rows=50"])
    run_job(job, stages=["prepare", "embed"])
    tasks = {t.key: t for t in build_plan(job)["index"]}
    # A populate task that starts before train makes the layout itself...
    stats = execute_task(job, tasks["en/populate/part-1"])
    # Rows 0..89 are part-0, 90..179 part-1; index shards of 50 rows: 00001 (rows 50..99)
    # begins in part-0, so part-1 leads 00002 and 00003.
    assert stats["index_shards"] == ["00002", "00003"]
    layout = _layout(WorkDir(job.work_dir), "en")
    # ... and train, running later, finds it instead of training again.
    assert execute_task(job, tasks["en/train"])["layout_built_here"] is False
    assert _layout(WorkDir(job.work_dir), "en") == layout
    run_job(job)
    assert pq.read_table(WorkDir(job.work_dir).pairs("en-de")).num_rows >= 55


def test_reduced_dimension_index_trains_in_two_steps(tmp_path: Path) -> None:
    work = _run(tmp_path / "pca", "index.type=PCAR32,IVF4,PQ8x4", "index.nprobe=4")
    layout = _layout(work, "en")
    assert layout["factory"] == "PCAR32,IVF4,PQ8x4" and not layout["lossless"]
    assert pq.read_table(work.pairs("en-de")).num_rows >= 55


def test_too_small_corpus_for_the_index_is_a_clear_error(tmp_path: Path) -> None:
    corpus = write_toy_corpus(tmp_path / "toy")
    job = load_job(corpus.spec, ["index.type=PQ16"])  # 256 centroids, 180 vectors
    with pytest.raises(ValueError, match=r"cannot train 'PQ16' on languages\.\w+ \(180 vectors"):
        run_job(job)
