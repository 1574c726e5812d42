"""Run tasks on this machine: in this process, or in a pool of processes."""

from __future__ import annotations

import logging
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TYPE_CHECKING

from tqdm import tqdm

from mining.pipeline import execute_task

if TYPE_CHECKING:
    from mining.config import Job
    from mining.pipeline import StagePlan

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def run(self, job: Job, stage_plans: list[StagePlan]) -> None:
        for sp in stage_plans:
            if not sp.todo:
                continue
            bar = tqdm(
                total=len(sp.todo),
                desc=sp.stage,
                unit="task",
                disable=not sys.stderr.isatty(),
            )
            if self.workers == 1 or len(sp.todo) == 1:
                for task in sp.todo:
                    execute_task(job, task)
                    bar.update()
            else:
                # spawn, not fork: a forked child of a process that already
                # started torch or OpenMP threads can deadlock.
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(self.workers, mp_context=ctx) as pool:
                    futures = {pool.submit(execute_task, job, t): t for t in sp.todo}
                    for future in as_completed(futures):
                        future.result()  # re-raises the task's error here
                        bar.update()
            bar.close()
