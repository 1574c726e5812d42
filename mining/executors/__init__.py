"""Executors decide where tasks run, never what they do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mining.config import Job
    from mining.pipeline import StagePlan


class Executor(Protocol):
    def run(self, job: Job, stage_plans: list[StagePlan]) -> None: ...


def make_executor(job: Job) -> Executor:
    if job.executor.kind == "slurm":
        from mining.executors.slurm import SlurmExecutor

        return SlurmExecutor()
    from mining.executors.local import LocalExecutor

    return LocalExecutor(workers=job.executor.workers)
