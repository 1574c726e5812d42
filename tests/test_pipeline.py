"""The whole pipeline on the toy encoder: correctness, resume, reruns."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mining.config import load_job
from mining.contracts import numpy_to_fixed_list, split_id
from mining.encoders.toy import ToyEncoder, read_lexicon
from mining.pipeline import pending, run_job
from mining.stages import search as search_stage
from mining.store import WorkDir
from tests.conftest import ToyCorpus, write_toy_corpus


def _pairs(corpus: ToyCorpus, work: str = "work") -> set[tuple[str, str]]:
    table = pq.read_table(corpus.root / work / "pairs" / "en-de.parquet")
    return set(zip(table["src_text"].to_pylist(), table["tgt_text"].to_pylist(), strict=True))


def _todo(spec: Path, *overrides: str) -> dict[str, int]:
    return {sp.stage: len(sp.todo) for sp in pending(load_job(spec, overrides))}


def test_finds_every_true_pair_and_nothing_else(toy_corpus: ToyCorpus) -> None:
    run_job(load_job(toy_corpus.spec))
    assert _pairs(toy_corpus) == toy_corpus.gold
    table = pq.read_table(toy_corpus.root / "work" / "pairs" / "en-de.parquet")
    scores = table["score"].to_numpy()
    assert (np.diff(scores) <= 0).all(), "pairs must be sorted by score, descending"
    assert (scores > 1.5).all()
    with gzip.open(toy_corpus.root / "work" / "pairs" / "en-de.tsv.gz", "rt") as fh:
        lines = fh.read().splitlines()
    assert len(lines) == len(toy_corpus.gold)
    score, src, tgt = lines[0].split("\t")
    assert float(score) == pytest.approx(scores[0], abs=1e-6)
    assert (src, tgt) in toy_corpus.gold


def test_ids_trace_back_to_file_and_line(toy_corpus: ToyCorpus) -> None:
    job = load_job(toy_corpus.spec)
    run_job(job)
    table = pq.read_table(toy_corpus.root / "work" / "pairs" / "en-de.parquet")
    rows = zip(table["src_id"].to_pylist(), table["src_text"].to_pylist(), strict=True)
    for sid, text in list(rows)[:10]:
        shard, line = split_id(sid)
        source = job.shard_files["en"][shard]
        assert source.read_text(encoding="utf-8").splitlines()[line - 1] == text


def test_rerun_of_finished_job_does_no_work(toy_corpus: ToyCorpus) -> None:
    run_job(load_job(toy_corpus.spec))
    state = toy_corpus.root / "work" / "_state"
    before = {p: p.stat().st_mtime_ns for p in state.rglob("*.json")}
    assert all(n == 0 for n in _todo(toy_corpus.spec).values())
    run_job(load_job(toy_corpus.spec))
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*.json")} == before


def test_changed_threshold_reruns_only_mine(toy_corpus: ToyCorpus) -> None:
    run_job(load_job(toy_corpus.spec))
    todo = _todo(toy_corpus.spec, "mine.threshold=1.2")
    assert todo == {"prepare": 0, "embed": 0, "index": 0, "search": 0, "mine": 1, "evaluate": 1}


def test_changed_encoder_reruns_embed_and_after(toy_corpus: ToyCorpus) -> None:
    run_job(load_job(toy_corpus.spec))
    todo = _todo(toy_corpus.spec, "encoder.dim=128")
    # index: per language a train task and the tasks that populate and merge its shards.
    assert todo == {"prepare": 0, "embed": 4, "index": 6, "search": 4, "mine": 1, "evaluate": 1}
    # Performance-only settings do not re-embed.
    assert _todo(toy_corpus.spec, "encoder.batch_tokens=99999")["embed"] == 0
    assert _todo(toy_corpus.spec, "search.block_rows=7")["search"] == 0


def test_edited_shard_reruns_its_tasks(toy_corpus: ToyCorpus) -> None:
    run_job(load_job(toy_corpus.spec))
    shard = toy_corpus.root / "corpus" / "de" / "part-1.txt"
    shard.write_text(shard.read_text() + "de001w de002w\n")
    todo = _todo(toy_corpus.spec)
    # One prepare and embed task; de's index tasks; every search against de plus de's
    # own query shard; then mine.
    assert todo == {"prepare": 1, "embed": 1, "index": 3, "search": 3, "mine": 1, "evaluate": 1}


def _flaky_encode(calls_before_crash: int):
    real = ToyEncoder.encode
    calls = {"n": 0}

    def encode(self: ToyEncoder, texts):
        calls["n"] += 1
        if calls["n"] > calls_before_crash:
            raise RuntimeError("injected crash")
        return real(self, texts)

    return encode


@pytest.mark.parametrize("crash_after", [1, 3, 6])
def test_crash_mid_embed_resumes_to_identical_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_after: int
) -> None:
    clean = write_toy_corpus(tmp_path / "clean")
    run_job(load_job(clean.spec))
    crashed = write_toy_corpus(tmp_path / "crashed")
    # Small chunks so that the crash lands inside a shard, not between shards.
    overrides = ["embed.chunk_rows=25"]
    with monkeypatch.context() as m:
        m.setattr(ToyEncoder, "encode", _flaky_encode(crash_after))
        with pytest.raises(RuntimeError, match="injected crash"):
            run_job(load_job(crashed.spec, overrides))
    assert not (crashed.root / "work" / "pairs").exists()
    run_job(load_job(crashed.spec, overrides))
    for name in ("en-de.parquet", "en-de.tsv.gz"):
        a = (clean.root / "work" / "pairs" / name).read_bytes()
        b = (crashed.root / "work" / "pairs" / name).read_bytes()
        assert a == b, name
    # The rerun kept every chunk committed before the crash (4 chunks a shard).
    stats = (crashed.root / "work" / "_state" / "embed").glob("*.stats.json")
    reused = sum(json.loads(p.read_text())["chunks_reused"] for p in stats)
    assert reused == {1: 1, 3: 3, 6: 2}[crash_after]


def test_crash_mid_search_resumes_to_identical_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = write_toy_corpus(tmp_path / "clean")
    run_job(load_job(clean.spec))
    crashed = write_toy_corpus(tmp_path / "crashed")
    real = search_stage.run
    calls = {"n": 0}

    def run(job, work, task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected crash")
        return real(job, work, task)

    with monkeypatch.context() as m:
        m.setattr(search_stage, "run", run)
        with pytest.raises(RuntimeError, match="injected crash"):
            run_job(load_job(crashed.spec))
    assert _todo(crashed.spec)["search"] == 2
    run_job(load_job(crashed.spec))
    assert (clean.root / "work" / "pairs" / "en-de.parquet").read_bytes() == (
        crashed.root / "work" / "pairs" / "en-de.parquet"
    ).read_bytes()


def test_output_without_marker_is_redone(toy_corpus: ToyCorpus) -> None:
    """A kill between the rename and the marker leaves an unmarked output."""
    job = load_job(toy_corpus.spec)
    run_job(job)
    work = WorkDir(job.work_dir)
    work.clear_marker("mine", "en-de")
    pairs = work.pairs("en-de")
    pairs.write_bytes(b"torn")
    assert _todo(toy_corpus.spec)["mine"] == 1
    run_job(job)
    assert _pairs(toy_corpus) == toy_corpus.gold


def test_precomputed_embeddings(tmp_path: Path) -> None:
    corpus = write_toy_corpus(tmp_path / "toy")
    job = load_job(corpus.spec)
    run_job(job, stages=["prepare"])
    encoder = ToyEncoder(dim=256, lexicon=read_lexicon(corpus.root / "lexicon.tsv"))
    work = WorkDir(job.work_dir)
    for lang, files in job.shard_files.items():
        for path in files:
            shard = path.stem
            sentences = pq.read_table(work.sentences(lang, shard))
            vectors = encoder.encode(sentences["text"].to_pylist())
            # Scaled, to show the stage normalises what users bring.
            table = pa.table(
                {
                    "id": sentences["id"],
                    "vector": numpy_to_fixed_list(vectors * 3.0, pa.float32()),
                }
            )
            out = corpus.root / "vectors" / lang / f"{shard}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out)
    overrides = ["encoder.kind=precomputed", "encoder.path='vectors/{lang}/{shard}.parquet'"]
    run_job(load_job(corpus.spec, overrides))
    assert _pairs(corpus) == corpus.gold

    # A vector missing for one sentence stops the job and names the file.
    victim = corpus.root / "vectors" / "de" / "part-0.parquet"
    table = pq.read_table(victim)
    pq.write_table(table.slice(1), victim)
    with pytest.raises(ValueError, match=r"part-0\.parquet: no vector for sentence id"):
        run_job(load_job(corpus.spec, overrides), force=True)
