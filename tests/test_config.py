"""Job-spec errors stop before any work, with one line naming the file and key."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from mining.cli import main
from mining.config import ConfigError, load_job, parse_override
from tests.conftest import ToyCorpus


def _error(spec: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(spec, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_spec_loads_and_pickles(toy_corpus: ToyCorpus) -> None:
    job = load_job(toy_corpus.spec)
    assert job.search.k == 4
    assert [p.name for p in job.shard_files["en"]] == ["part-0.txt", "part-1.txt"]
    assert job.work_dir == (toy_corpus.root / "work").resolve()
    # Workers and SLURM jobs receive the job by pickle.
    assert pickle.loads(pickle.dumps(job)) == job


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("search.k=0", "search.k: must be >= 1"),
        ("search.kk=3", "search.kk: unknown key"),
        ("search.k='four'", "search.k: expected int"),
        ("search.k=true", "search.k: expected int"),
        ("mine.margin='cosine'", "mine.margin: expected 'ratio' | 'distance' | 'absolute'"),
        ("mine.threshold='high'", "mine.threshold: expected float"),
        ("pairs=['en-xx']", "pairs[0]: 'en-xx' names undeclared language 'xx'"),
        ("pairs=['en-en']", "pairs a language with itself"),
        ("pairs=['en-de','en-de']", "pairs[1]: 'en-de' is listed twice"),
        ("pairs=[]", "pairs: list at least one pair"),
        (
            "languages.en.shards=['nothing/*.txt']",
            "languages.en.shards[0]: 'nothing/*.txt' matches",
        ),
        ("encoder.kind=hf", "encoder.model: is required"),
        ("prepare.max_chars=0", "prepare.max_chars: must be >= min_chars"),
        ("executor.workers=0", "executor.workers: must be >= 1"),
        ("executor.resources.embedd.gpus=1", "executor.resources.embedd: is not a stage"),
        ("evaluate.gold.en-fr='gold.en-de.tsv'", "evaluate.gold.en-fr: not a pair of this job"),
        ("bogus.key=1", "bogus: unknown key"),
    ],
)
def test_spec_errors_name_file_and_key(toy_corpus: ToyCorpus, override: str, expected: str) -> None:
    message = _error(toy_corpus.spec, override)
    assert message.startswith(str(toy_corpus.spec)), message
    assert expected in message, message


def test_missing_required_section(tmp_path: Path) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text('pairs = ["en-de"]\n[languages.en]\nshards = ["*.txt"]\n')
    assert "job: required key is missing" in _error(spec)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text("[job\nname = 1\n")
    assert "not valid TOML" in _error(spec)
    assert "job spec not found" in _error(tmp_path / "absent.toml")


def test_overrides_parse_toml_values_and_bare_words() -> None:
    assert parse_override("search.k=8") == (["search", "k"], 8)
    assert parse_override("encoder.kind=toy") == (["encoder", "kind"], "toy")
    assert parse_override("languages.en.shards=['a/*.txt']") == (
        ["languages", "en", "shards"],
        ["a/*.txt"],
    )
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        parse_override("search.k")


def test_override_changes_value(toy_corpus: ToyCorpus) -> None:
    job = load_job(toy_corpus.spec, ["mine.threshold=1.2", "search.k=2"])
    assert job.mine.threshold == 1.2
    assert job.search.k == 2


def test_cli_reports_spec_error_in_one_line(
    toy_corpus: ToyCorpus, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", str(toy_corpus.spec), "--set", "search.k=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "search.k: must be >= 1" in err
    # Nothing ran: no work directory was made.
    assert not (toy_corpus.root / "work").exists()


def test_shipped_gpu_spec_is_valid() -> None:
    """pipelines/mst5-en-de.toml must load once its globs point at real files."""
    root = Path(__file__).resolve().parents[1] / "pipelines"
    corpus = root / "demo" / "corpus"
    job = load_job(
        root / "mst5-en-de.toml",
        [
            f"languages.en.shards=['{corpus}/en/*.txt']",
            f"languages.de.shards=['{corpus}/de/*.txt']",
        ],
    )
    assert job.encoder.kind == "hf"
    assert job.encoder.model == "google/mt5-xxl"
    assert job.encoder.adapter == "pkshatech/m-ST5"
    assert job.encoder.dtype == "bfloat16"
