"""evaluate: mined pairs against a gold alignment -> pairs/<pair>.eval.json.

Only pairs with `evaluate.gold.<pair>` set get a task. Gold files hold one
`source<TAB>target` pair of texts per line, so they stay readable and do not
depend on how this project numbers sentences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mining.config import Job
from mining.evaluate import bitext_scores, read_gold
from mining.stages import Task, by_key, task_fingerprint
from mining.store import WorkDir, file_fingerprint, write_json

NAME = "evaluate"
VERSION = 1


def plan(job: Job, work: WorkDir, upstream: dict[str, list[Task]]) -> list[Task]:
    mines = by_key(upstream["mine"])
    tasks = []
    for pair, gold in job.evaluate.gold.items():
        gold_path = job.resolve(gold)
        inputs = [mines[pair].fingerprint, file_fingerprint(gold_path)]
        tasks.append(
            Task(
                stage=NAME,
                key=pair,
                fingerprint=task_fingerprint(NAME, VERSION, {}, inputs),
                outputs=(str(work.evaluation(pair)),),
                params={"pair": pair, "gold": str(gold_path)},
            )
        )
    return tasks


def run(job: Job, work: WorkDir, task: Task) -> dict[str, Any]:
    pair = task.params["pair"]
    gold = read_gold(Path(task.params["gold"]))
    table = pq.read_table(work.pairs(pair), columns=["src_text", "tgt_text"])
    predicted = list(
        zip(table.column("src_text").to_pylist(), table.column("tgt_text").to_pylist(), strict=True)
    )
    scores = bitext_scores(predicted, gold)
    write_json(work.evaluation(pair), scores | {"pair": pair, "gold_file": task.params["gold"]})
    return {"rows_in": len(predicted), "rows_out": len(predicted)} | scores
