"""The command line: plan, run, status, and the report a person reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mining.cli import main
from tests.conftest import ToyCorpus


def test_plan_run_status(toy_corpus: ToyCorpus, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(toy_corpus.spec)
    assert main(["plan", spec]) == 0
    plan = capsys.readouterr().out
    assert "prepare        4 tasks       0 done" in plan
    assert "evaluate       1 tasks       0 done" in plan

    assert main(["run", spec]) == 0
    report = capsys.readouterr().out
    assert "== en-de: 60 pairs" in report
    assert "precision 1.000  recall 1.000  F1 1.000  (60 of 60 gold pairs, 60 predicted)" in report

    assert main(["plan", spec]) == 0
    assert "search         4 tasks       4 done" in capsys.readouterr().out

    assert main(["status", spec]) == 0
    status = capsys.readouterr().out
    assert "prepare   tasks     4  rows in        360  out        360" in status
    assert "mine      tasks     1  rows in        360  out         60" in status


def test_run_reports_bad_input_as_one_error_line(
    toy_corpus: ToyCorpus, capsys: pytest.CaptureFixture[str]
) -> None:
    (toy_corpus.root / "corpus" / "de" / "part-7.txt").write_bytes(b"")
    assert main(["run", str(toy_corpus.spec)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "part-7.txt: empty shard" in err


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mining", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--set", "--stage", "--force"):
        assert flag in out
