"""Run tasks on this machine: in this process, in a pool of processes, or one per GPU.

The embed stage of an hf encoder on a machine with several GPUs gets one worker process
per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES), each loading the model once
and taking the next shard whenever it finishes one. Every other stage, and embed on
one GPU or none, runs as before: in this process, or in `executor.workers` processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed, wait
from typing import TYPE_CHECKING

from tqdm import tqdm

from mining.pipeline import execute_task

if TYPE_CHECKING:
    from mining.config import Job
    from mining.pipeline import StagePlan
    from mining.stages import Task

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    # device_count asks NVML where it can, without starting CUDA in this process (the
    # workers are spawned, so a CUDA context here would do no harm, only cost memory).
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_workers(job: Job, stage: str) -> list[str]:
    """The GPUs to give a worker each for this stage; empty means run as usual."""
    if stage != "embed" or job.encoder.kind != "hf":
        return []
    # A spec that names a device ("cuda:1", "cpu") has chosen where to run.
    if job.encoder.device not in ("auto", "cuda"):
        return []
    gpus = visible_gpus()
    return gpus if len(gpus) > 1 else []


def _pin_gpu(device: str) -> None:
    """Worker initializer: this process sees one GPU, before anything starts CUDA."""
    os.environ["CUDA_VISIBLE_DEVICES"] = device


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
            gpus = gpu_workers(job, sp.stage)
            if gpus and len(sp.todo) > 1:
                self._per_gpu(job, sp.todo, gpus, bar)
            elif self.workers == 1 or len(sp.todo) == 1:
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

    @staticmethod
    def _per_gpu(job: Job, tasks: Sequence[Task], gpus: list[str], bar: tqdm) -> None:
        """One single-process pool per GPU; each gets its next task when it is free.

        Handing out tasks one at a time (not a fixed split) keeps every GPU busy to the
        end when shards differ in size. On the first error no new task is started, the
        running ones finish (their chunks are committed either way), and it re-raises.
        """
        ctx = multiprocessing.get_context("spawn")
        queue = list(reversed(tasks))
        pools = [
            ProcessPoolExecutor(1, mp_context=ctx, initializer=_pin_gpu, initargs=(gpu,))
            for gpu in gpus[: len(tasks)]
        ]
        log.info("embed: one worker on each of GPUs %s", ",".join(gpus[: len(pools)]))
        running: dict[Future, ProcessPoolExecutor] = {}
        try:
            for pool in pools:
                running[pool.submit(execute_task, job, queue.pop())] = pool
            error: BaseException | None = None
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    pool = running.pop(future)
                    if future.exception() is not None:
                        error = error or future.exception()
                        continue
                    bar.update()
                    if queue and error is None:
                        running[pool.submit(execute_task, job, queue.pop())] = pool
            if error is not None:
                raise error
        finally:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
