"""Stages: one module each, split into tasks that speak only through files.

Each stage module defines

    NAME: str
    VERSION: int          # bump when the stage's output for the same input changes
    def plan(job, work, upstream) -> list[Task]
    def run(job, work, task) -> dict       # the task's statistics

`plan` is pure bookkeeping (no heavy I/O), so the whole job's plan, with every
task's fingerprint, is known before any work starts; that is what lets an
executor submit all stages of a job at once, and a rerun skip finished tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mining.store import fingerprint


@dataclass(frozen=True)
class Task:
    stage: str
    key: str
    fingerprint: str
    outputs: tuple[str, ...]
    # What the run function needs (language, shard, paths): plain data, so a
    # task pickles for a worker process or a SLURM job.
    params: Mapping[str, Any] = field(default_factory=dict)


def task_fingerprint(
    stage: str, version: int, spec: Any, inputs: Sequence[str], extra: Any = None
) -> str:
    return fingerprint(
        {"stage": stage, "version": version, "spec": spec, "inputs": list(inputs), "extra": extra}
    )


def by_key(tasks: Sequence[Task]) -> dict[str, Task]:
    return {t.key: t for t in tasks}
