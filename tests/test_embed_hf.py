"""The embed stage with the hf encoder, end to end through the job runner, on a tiny
offline m-ST5 look-alike: its stored vectors against the card's recipe, its statistics,
what goes into its fingerprint, and resuming a shard killed half-way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mining.config import load_job
from mining.contracts import read_embeddings
from mining.encoders.base import l2_normalise
from mining.encoders.hf import HFEncoder, card_recipe_embeddings
from mining.pipeline import pending, run_job
from mining.store import WorkDir
from tests.jobs import write_shards, write_spec
from tests.tiny_models import mixed_length_sentences

pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def texts(tiny_mst5: tuple[Path, Path]) -> dict[str, list[str]]:
    base, _ = tiny_mst5
    # 5 to 60 tokens; the first language gets a few long ones for truncation.
    xx = mixed_length_sentences(base / "spiece.model", 150, low=5, high=60, seed=1)
    long = mixed_length_sentences(base / "spiece.model", 6, low=90, high=120, seed=2)
    yy = mixed_length_sentences(base / "spiece.model", 40, low=5, high=30, seed=3)
    return {"xx": xx[:70] + long + xx[70:], "yy": yy}


def write_job(
    root: Path, tiny_mst5: tuple[Path, Path], texts: dict[str, list[str]], **encoder
) -> Path:
    base, adapter = tiny_mst5
    for lang, lines in texts.items():
        write_shards(root / "corpus" / lang, [lines])
    settings = {"kind": "hf", "model": base, "adapter": adapter, "dtype": "float32", **encoder}
    tables = {
        "job": {"name": "embed-hf"},
        "prepare": {"dedup": False},
        "embed": {"chunk_rows": 32},
        "encoder": settings,
    }
    return write_spec(root / "job.toml", ["xx-yy"], tables)


def embed(spec: Path, *overrides: str) -> tuple[np.ndarray, dict]:
    job = load_job(spec, overrides)
    run_job(job, ["prepare", "embed"])
    work = WorkDir(job.work_dir)
    ids, vectors = read_embeddings(work.embeddings("xx", "part-0"))
    assert (np.diff(ids) > 0).all()
    stats = json.loads(work.stats("embed", "xx/part-0").read_text())
    return vectors, stats


@pytest.fixture(scope="module")
def fp32_run(
    tiny_mst5: tuple[Path, Path],
    texts: dict[str, list[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, np.ndarray, dict]:
    spec = write_job(tmp_path_factory.mktemp("fp32"), tiny_mst5, texts)
    vectors, stats = embed(spec)
    return spec, vectors, stats


def test_stage_vectors_match_card_recipe(
    tiny_mst5: tuple[Path, Path],
    texts: dict[str, list[str]],
    fp32_run: tuple[Path, np.ndarray, dict],
) -> None:
    base, adapter = tiny_mst5
    _, vectors, _ = fp32_run
    reference = card_recipe_embeddings(str(base), str(adapter), texts["xx"], batch_size=8)
    cos = np.sum(l2_normalise(vectors) * l2_normalise(reference), axis=1)
    assert cos.min() >= 0.9999


def test_bfloat16_stage_close_to_fp32(
    tiny_mst5: tuple[Path, Path],
    texts: dict[str, list[str]],
    fp32_run: tuple[Path, np.ndarray, dict],
    tmp_path: Path,
) -> None:
    _, fp32, _ = fp32_run
    half, _ = embed(write_job(tmp_path, tiny_mst5, texts, dtype="bfloat16"))
    assert np.sum(l2_normalise(half) * l2_normalise(fp32), axis=1).min() >= 0.999


def test_stats_count_tokens_padding_and_truncation(
    texts: dict[str, list[str]], fp32_run: tuple[Path, np.ndarray, dict]
) -> None:
    spec, _, stats = fp32_run
    assert stats["rows_in"] == len(texts["xx"])
    assert stats["chunks"] == -(-len(texts["xx"]) // 32)
    assert stats["chunks_reused"] == 0
    assert stats["truncated"] == 0
    assert 0 <= stats["padding"] < 0.05
    assert stats["tokens"] <= stats["padded_tokens"]
    assert stats["device"] == "cpu"

    cut, cut_stats = embed(spec, "encoder.max_tokens=64", "job.work_dir='work-cut'")
    assert cut_stats["truncated"] == 6  # the six long sentences, and only they
    assert np.isfinite(cut.astype(np.float32)).all()


def test_fingerprint_keeps_results_and_drops_speed(fp32_run: tuple[Path, np.ndarray, dict]) -> None:
    spec, _, _ = fp32_run

    def embed_todo(*overrides: str) -> int:
        return {sp.stage: len(sp.todo) for sp in pending(load_job(spec, overrides))}["embed"]

    assert embed_todo() == 0
    for speed in (
        "encoder.batch_tokens=1024",
        "encoder.device=cpu",
        "encoder.attention=eager",
        "encoder.compile=true",
    ):
        assert embed_todo(speed) == 0, speed
    for result in (
        "encoder.dtype=bfloat16",
        "encoder.tokenizer=fast",
        "encoder.max_tokens=64",
        "encoder.pooling=cls",
    ):
        assert embed_todo(result) == 2, result


def test_crash_mid_shard_resumes_to_identical_bytes(
    tiny_mst5: tuple[Path, Path],
    texts: dict[str, list[str]],
    fp32_run: tuple[Path, np.ndarray, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean_spec, _, _ = fp32_run
    spec = write_job(tmp_path, tiny_mst5, texts)
    real = HFEncoder.encode_prepared
    calls = {"n": 0}

    def crashing(self: HFEncoder, prepared, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected crash")
        return real(self, prepared, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(HFEncoder, "encode_prepared", crashing)
        with pytest.raises(RuntimeError, match="injected crash"):
            run_job(load_job(spec), ["prepare", "embed"])
    work = WorkDir(load_job(spec).work_dir)
    # Three chunks of xx were committed before the crash; the shard itself was not.
    chunk_files = list(work.embedding_chunks("xx", "part-0").glob("*/*.parquet"))
    assert len(chunk_files) == 3
    assert not work.embeddings("xx", "part-0").exists()

    run_job(load_job(spec), ["prepare", "embed"])
    stats = json.loads(work.stats("embed", "xx/part-0").read_text())
    assert stats["chunks_reused"] == 3
    assert stats["chunks"] == -(-len(texts["xx"]) // 32)
    clean = WorkDir(load_job(clean_spec).work_dir)
    for lang in ("xx", "yy"):
        assert work.embeddings(lang, "part-0").read_bytes() == (
            clean.embeddings(lang, "part-0").read_bytes()
        ), lang
    assert not work.embedding_chunks("xx", "part-0").exists()
