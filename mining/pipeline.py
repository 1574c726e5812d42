"""The job as a whole: plan every stage, skip finished tasks, run the rest.

The plan is computed from the spec alone; each task's fingerprint folds in
its stage's version, its slice of the spec and the fingerprints of the tasks
it reads from. A task is done when its marker holds the same fingerprint and
its outputs exist. So a rerun does nothing, a killed run finishes what is
missing, and a changed setting reruns exactly the tasks it reaches.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mining.config import STAGES, Job
from mining.stages import Task, embed, evaluate, index, mine, prepare, search
from mining.store import WorkDir, remove_stale_temporaries, write_json

log = logging.getLogger(__name__)

STAGE_MODULES: dict[str, ModuleType] = {
    "prepare": prepare,
    "embed": embed,
    "index": index,
    "search": search,
    "mine": mine,
    "evaluate": evaluate,
}
assert tuple(STAGE_MODULES) == STAGES


def build_plan(job: Job) -> dict[str, list[Task]]:
    work = WorkDir(job.work_dir)
    plan: dict[str, list[Task]] = {}
    for name, module in STAGE_MODULES.items():
        plan[name] = module.plan(job, work, plan)
    return plan


def is_done(work: WorkDir, task: Task) -> bool:
    marker = work.read_marker(task.stage, task.key)
    if marker is None or marker.get("fingerprint") != task.fingerprint:
        return False
    return all(Path(p).exists() for p in task.outputs)


def execute_task(job: Job, task: Task) -> dict[str, Any]:
    """Run one task and record it: output first, then stats, then the marker.

    This is the one function every executor calls, in this process, a worker
    process or a SLURM job alike.
    """
    work = WorkDir(job.work_dir)
    module = STAGE_MODULES[task.stage]
    # A stale marker must not survive a rerun that dies half-way.
    work.clear_marker(task.stage, task.key)
    for path in (
        *task.outputs,
        work.marker(task.stage, task.key),
        work.stats(task.stage, task.key),
    ):
        remove_stale_temporaries(Path(path))
    start = time.perf_counter()
    stats = dict(module.run(job, work, task))
    seconds = time.perf_counter() - start
    stats.update(
        stage=task.stage,
        task=task.key,
        fingerprint=task.fingerprint,
        seconds=round(seconds, 3),
        host=platform.node(),
    )
    rows = stats.get("rows_in")
    if isinstance(rows, int) and seconds > 0:
        stats["rows_per_s"] = round(rows / seconds, 1)
    write_json(work.stats(task.stage, task.key), stats)
    work.write_marker(task.stage, task.key, task.fingerprint)
    return stats


@dataclass
class StagePlan:
    stage: str
    tasks: list[Task]
    todo: list[Task]


def pending(job: Job, stages: Sequence[str] | None = None, force: bool = False) -> list[StagePlan]:
    work = WorkDir(job.work_dir)
    plan = build_plan(job)
    chosen = list(stages) if stages else list(STAGES)
    out = []
    for name in STAGES:
        if name not in chosen:
            continue
        tasks = plan[name]
        todo = list(tasks) if force else [t for t in tasks if not is_done(work, t)]
        out.append(StagePlan(name, tasks, todo))
    return out


def run_job(job: Job, stages: Sequence[str] | None = None, force: bool = False) -> list[StagePlan]:
    from mining.executors import make_executor

    stage_plans = pending(job, stages, force)
    for sp in stage_plans:
        done = len(sp.tasks) - len(sp.todo)
        log.info("%s: %d tasks, %d already done", sp.stage, len(sp.tasks), done)
    make_executor(job).run(job, stage_plans)
    return stage_plans


def collect_stats(job: Job) -> list[dict[str, Any]]:
    """Every task's stats file, for `mining status` and reports."""
    root = WorkDir(job.work_dir).root / "_state"
    out = []
    for path in sorted(root.glob("*/*.stats.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("%s: unreadable stats file: %s", path, err)
    return out
