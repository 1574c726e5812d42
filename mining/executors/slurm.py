"""Run tasks as SLURM job arrays, through submitit.

One job array per stage with work to do, every element one task, and each
stage's arrays held by SLURM until the previous submitted stage's arrays have
all succeeded (`afterok`). The whole job is queued at once, so a person can
log out of the login node; nothing here polls the cluster unless
`executor.slurm.wait` asks for it. What each task does is
`mining.pipeline.execute_task`, as with every other executor; the markers it
writes are what a later `mining run` or `mining status` reads back.

The work directory and the Python environment must be visible from the
compute nodes (a shared filesystem): submitit re-runs this interpreter there,
and the tasks read and write the work directory directly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mining.config import StageResources
from mining.pipeline import execute_task

if TYPE_CHECKING:
    import submitit

    from mining.config import Job
    from mining.pipeline import StagePlan
    from mining.stages import Task

log = logging.getLogger(__name__)

# submitit's stand-ins for a cluster: "local" runs each job as a subprocess of
# this one, "debug" runs it in this process. Neither knows SLURM dependencies.
LOCAL_CLUSTERS = ("local", "debug")


class SlurmTaskError(RuntimeError):
    """A task's SLURM job failed; the message names the stage, task and log."""


@dataclass
class SubmittedArray:
    """One array as submitted: its tasks, in array-index order, and its jobs."""

    stage: str
    tasks: list[Task]
    jobs: list[submitit.Job[Any]] = field(default_factory=list)

    @property
    def array_ids(self) -> list[str]:
        """One id on SLURM; one per element on the local cluster (process ids)."""
        return list(dict.fromkeys(array_job_id(j.job_id) for j in self.jobs))


def log_folder(job: Job) -> Path:
    """Where submitit keeps its pickles and each job's stdout/stderr."""
    folder = job.executor.slurm.folder
    return job.resolve(folder) if folder else job.work_dir / "slurm"


def array_job_id(job_id: str) -> str:
    """`1234_7` -> `1234`: the id SLURM gives the array as a whole.

    submitit names array element i `<array id>_<i>`; a stage with a single
    task is submitted as a plain job whose id has no suffix.
    """
    return job_id.split("_", 1)[0]


def dependency(job_ids: Sequence[str]) -> str:
    """An `afterok` dependency on every array named by `job_ids`, or "".

    A dependency on an array's own id is satisfied only once every element
    has completed successfully, so one id per array is enough, however many
    elements it has; listing every element would make the string, and
    slurmctld's work, grow with the number of shards.
    """
    arrays = list(dict.fromkeys(array_job_id(j) for j in job_ids))
    return "afterok:" + ":".join(arrays) if arrays else ""


def stage_parameters(job: Job, stage: str, after: Sequence[str] = ()) -> dict[str, Any]:
    """The `AutoExecutor.update_parameters` arguments for one stage's arrays.

    `after` holds the job ids of the arrays this stage waits for. Generic
    names (timeout_min, mem_gb, ...) are translated by submitit for whichever
    cluster runs the job; `slurm_` ones reach sbatch only.
    """
    resources = job.executor.resources.get(stage, StageResources())
    slurm = job.executor.slurm
    params: dict[str, Any] = {
        "name": f"mining-{job.job.name}-{stage}",
        "timeout_min": resources.time_minutes,
        "mem_gb": resources.mem_gb,
        "cpus_per_task": resources.cpus,
        "slurm_array_parallelism": slurm.max_parallel,
    }
    # Left out rather than 0: clusters without GPU gres can reject even
    # --gpus-per-node=0.
    if resources.gpus:
        params["gpus_per_node"] = resources.gpus
    for key, value in (
        ("partition", resources.partition or slurm.partition),
        ("account", slurm.account),
        ("qos", slurm.qos),
    ):
        if value:
            params[f"slurm_{key}"] = value
    depends_on = dependency(after)
    if depends_on:
        params["slurm_additional_parameters"] = {
            "dependency": depends_on,
            # Without this, the stages after a failed one stay pending forever
            # (reason DependencyNeverSatisfied) and hold their place in the queue.
            "kill-on-invalid-dep": "yes",
        }
    return params


def chunks(tasks: Sequence[Task], size: int) -> list[list[Task]]:
    return [list(tasks[i : i + size]) for i in range(0, len(tasks), size)]


def run_task(job: Job, task: Task) -> dict[str, Any]:
    """The function each array element runs: `execute_task`, with logging.

    A submitit job starts a fresh interpreter in which nothing configured
    logging, so the stages' progress messages would otherwise be dropped
    instead of landing in the job's log file.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        logging.getLogger("faiss").setLevel(logging.WARNING)
    return execute_task(job, task)


class SlurmExecutor:
    """Submit every stage that has work as job arrays chained by `afterok`.

    `cluster` is submitit's: None means SLURM, and fails at once where there
    is none, rather than submitit's auto-detection quietly running a
    cluster-sized job on the login node. "local" and "debug" run the same
    submissions on this machine (tests, trying a spec out); since they cannot
    hold a job until another one ends, stages then run one after another,
    each waited for before the next is submitted.
    """

    def __init__(self, cluster: str | None = None) -> None:
        self.cluster = cluster or "slurm"
        # Filled by run(): what was submitted, for callers that want the jobs.
        self.submitted: list[SubmittedArray] = []

    @property
    def is_local(self) -> bool:
        return self.cluster in LOCAL_CLUSTERS

    def run(self, job: Job, stage_plans: list[StagePlan]) -> None:
        folder = log_folder(job)
        self.submitted = []
        after: list[str] = []
        for sp in stage_plans:
            if not sp.todo:
                continue
            params = stage_parameters(job, sp.stage, after)
            arrays = [
                self._submit(job, sp.stage, tasks, params, folder)
                for tasks in chunks(sp.todo, job.executor.slurm.max_array_size)
            ]
            self.submitted += arrays
            ids = ", ".join(i for a in arrays for i in a.array_ids)
            waits = f", after {dependency(after)}" if after and not self.is_local else ""
            log.info("%s: %d tasks submitted as job %s%s", sp.stage, len(sp.todo), ids, waits)
            if self.is_local:
                _wait(arrays)
            after = [i for a in arrays for i in a.array_ids]
        if not self.submitted:
            log.info("nothing to submit: every task is done")
            return
        log.info("job logs under %s", folder)
        if not self.is_local:
            if job.executor.slurm.wait:
                # In stage order, so that the error raised is the first
                # failure, not a later stage SLURM cancelled because of it.
                _wait(self.submitted)
            else:
                log.info(
                    "not waiting; watch with `squeue --me`, then `mining status` or run the "
                    "same command again to redo what failed"
                )

    def _submit(
        self, job: Job, stage: str, tasks: list[Task], params: dict[str, Any], folder: Path
    ) -> SubmittedArray:
        try:
            import submitit
        except ImportError as err:
            raise RuntimeError(
                "executor.kind = 'slurm' needs submitit: pip install 'mining[slurm]'"
            ) from err
        try:
            # %j: one folder per job (per element, for arrays), so a failed
            # task's log is found from its job id alone.
            executor = submitit.AutoExecutor(folder=folder / stage / "%j", cluster=self.cluster)
        except RuntimeError as err:
            raise RuntimeError(
                f"executor.kind = 'slurm' but no SLURM here ({err}); run where sbatch "
                "works, or use executor.kind = 'local'"
            ) from err
        executor.update_parameters(**params)
        jobs = executor.map_array(run_task, [job] * len(tasks), tasks)
        array = SubmittedArray(stage, tasks, jobs)
        _record(folder, array)
        return array


def _record(folder: Path, array: SubmittedArray) -> None:
    """Append task -> job id lines, so a person can find a task's log later."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(folder / "submitted.jsonl", "a", encoding="utf-8") as fh:
        for task, sjob in zip(array.tasks, array.jobs, strict=True):
            line = {"time": now, "stage": array.stage, "task": task.key, "job_id": sjob.job_id}
            fh.write(json.dumps(line) + "\n")


def _wait(arrays: Sequence[SubmittedArray]) -> None:
    """Block until every job ends; raise for the first failed task."""
    for array in arrays:
        failed: list[tuple[Task, submitit.Job[Any], BaseException]] = []
        for task, sjob in zip(array.tasks, array.jobs, strict=True):
            # exception() waits and returns the error rather than raising it;
            # unlike result(), submitit's debug cluster does not drop into pdb.
            err = sjob.exception()
            if err is not None:
                failed.append((task, sjob, err))
        for task, sjob, err in failed:
            log.error("%s task %s failed in job %s: %s", array.stage, task.key, sjob.job_id, err)
        if failed:
            task, sjob, err = failed[0]
            raise SlurmTaskError(
                f"{array.stage} task {task.key} failed in job {sjob.job_id} "
                f"({len(failed)} of {len(array.tasks)} tasks in this array failed; "
                f"log: {sjob.paths.stderr}): {err}"
            ) from err
