"""Bad input: a clear error naming the file (and line), or a counted rejection."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mining.config import load_job
from mining.pipeline import run_job
from tests.conftest import ToyCorpus

ALL_EN = "languages.en.shards=['corpus/en/*']"


def _prepare(corpus: ToyCorpus, *overrides: str) -> None:
    run_job(load_job(corpus.spec, overrides), stages=["prepare"])


def _stats(corpus: ToyCorpus, lang: str, shard: str) -> dict:
    path = corpus.root / "work" / "_state" / "prepare" / f"{lang}__{shard}.stats.json"
    return json.loads(path.read_text())


def test_bad_lines_are_rejected_counted_and_listed(toy_corpus: ToyCorpus) -> None:
    shard = toy_corpus.root / "corpus" / "en" / "part-9.txt"
    shard.write_bytes(
        b"en001w en002w\n"  # 1 kept
        b"\n"  # 2 empty
        b"   \t \n"  # 3 empty (white space only)
        b"en003w \xff\xfe en004w\n"  # 4 invalid UTF-8
        b"en005w\x00en006w\n"  # 5 NUL byte
        b"en001w en002w\n"  # 6 duplicate of line 1
        b"  en007w en008w  \r\n" + b"x" * 3000 + b"\n"  # 7 kept, stripped, CRLF  # 8 too long
        b"en009w"  # 9 kept, no final newline
    )
    _prepare(toy_corpus)
    stats = _stats(toy_corpus, "en", "part-9")
    assert stats["rows_in"] == 9
    assert stats["rows_out"] == 3
    assert stats["rejected"] == {
        "duplicate": 1,
        "empty": 2,
        "invalid_utf8": 1,
        "nul_byte": 1,
        "too_long": 1,
    }
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    table = pq.read_table(toy_corpus.root / "work" / "sentences" / "en" / "part-9.parquet")
    assert table["text"].to_pylist() == ["en001w en002w", "en007w en008w", "en009w"]
    assert [o.rsplit(":", 1)[1] for o in table["origin"].to_pylist()] == ["1", "7", "9"]
    rejects = toy_corpus.root / "work" / "sentences" / "en" / "part-9.rejects.tsv"
    assert rejects.read_text().splitlines() == [
        "2\tempty",
        "3\tempty",
        "4\tinvalid_utf8",
        "5\tnul_byte",
        "6\tduplicate",
        "8\ttoo_long",
    ]


def test_dedup_can_be_switched_off(toy_corpus: ToyCorpus) -> None:
    shard = toy_corpus.root / "corpus" / "en" / "part-9.txt"
    shard.write_text("en001w\nen001w\n")
    _prepare(toy_corpus, "prepare.dedup=false")
    assert _stats(toy_corpus, "en", "part-9")["rows_out"] == 2


def test_empty_file_stops_the_job_naming_it(toy_corpus: ToyCorpus) -> None:
    shard = toy_corpus.root / "corpus" / "de" / "part-9.txt"
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=r"part-9\.txt: empty shard"):
        _prepare(toy_corpus)
    # No half-made output is left under the final name.
    assert not (toy_corpus.root / "work" / "sentences" / "de" / "part-9.parquet").exists()
    _prepare(toy_corpus, "prepare.allow_empty_files=true")
    assert _stats(toy_corpus, "de", "part-9")["rows_in"] == 0


@pytest.mark.parametrize(
    ("suffix", "opener"), [(".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)]
)
def test_compressed_shards(toy_corpus: ToyCorpus, suffix: str, opener) -> None:
    shard = toy_corpus.root / "corpus" / "en" / f"part-9.txt{suffix}"
    with opener(shard, "wb") as fh:
        fh.write(b"en001w en002w\nen003w\n")
    _prepare(toy_corpus, ALL_EN)
    assert _stats(toy_corpus, "en", "part-9")["rows_out"] == 2


def test_corrupt_compressed_shard_names_file_and_line(toy_corpus: ToyCorpus) -> None:
    shard = toy_corpus.root / "corpus" / "en" / "part-9.txt.gz"
    data = gzip.compress(b"".join(b"en%03dw line\n" % i for i in range(5000)))
    shard.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError, match=r"part-9\.txt\.gz:\d+: cannot read"):
        _prepare(toy_corpus, ALL_EN)


def test_shard_vanishing_after_planning_is_an_error(toy_corpus: ToyCorpus) -> None:
    job = load_job(toy_corpus.spec)
    victim = toy_corpus.root / "corpus" / "de" / "part-1.txt"
    victim.unlink()
    with pytest.raises(ValueError, match=r"part-1\.txt: cannot read shard"):
        run_job(job, stages=["prepare"])


def test_shard_that_is_not_text_is_rejected_per_line(tmp_path: Path, toy_corpus: ToyCorpus) -> None:
    shard = toy_corpus.root / "corpus" / "en" / "part-9.txt"
    shard.write_bytes(bytes(range(256)) * 4)
    _prepare(toy_corpus)
    stats = _stats(toy_corpus, "en", "part-9")
    assert stats["rows_out"] == 0
    assert stats["rows_in"] == stats["rows_rejected"] > 0
