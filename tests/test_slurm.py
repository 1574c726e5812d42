"""The slurm executor, offline: submitit's local cluster, and a fake sbatch.

There is no SLURM here. The whole toy job runs through submitit's "local"
cluster (every task pickled and run in its own process, as on a node) and
must mine exactly what the LocalExecutor mines. What would reach sbatch is
checked twice: as the parameter dict built per stage, and as the #SBATCH
lines submitit writes when a stub `sbatch` on PATH stands in for the cluster.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mining.config import ConfigError, Job, StageResources, load_job
from mining.executors import make_executor
from mining.executors.slurm import (
    SlurmExecutor,
    SlurmTaskError,
    array_job_id,
    chunks,
    dependency,
    log_folder,
    stage_parameters,
)
from mining.pipeline import build_plan, pending, run_job
from tests.conftest import ToyCorpus, write_toy_corpus

# The executor module imports submitit only when it submits; the tests need it.
submitit = pytest.importorskip("submitit")

RESOURCES = """
[executor.slurm]
partition = "cpu"
account = "mt"
qos = "normal"
max_parallel = 3

[executor.resources.embed]
gpus = 2
cpus = 10
mem_gb = 64
time_minutes = 240
partition = "gpu"
"""


def _pairs(job: Job) -> list[dict]:
    table = pq.read_table(job.work_dir / "pairs" / "en-de.parquet")
    return sorted(table.to_pylist(), key=lambda row: (row["src_text"], row["tgt_text"]))


def _slurm_job(corpus: ToyCorpus, *overrides: str) -> Job:
    return load_job(corpus.spec, ["executor.kind=slurm", "executor.slurm.wait=true", *overrides])


# --------------------------------------------------------------------------
# The whole job through submitit


@pytest.mark.slow
def test_toy_job_through_submitit_local_matches_local_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = load_job(write_toy_corpus(tmp_path / "local").spec)
    run_job(reference)
    expected = _pairs(reference)
    assert expected, "the toy job should mine some pairs"

    job = _slurm_job(write_toy_corpus(tmp_path / "slurm"))
    assert isinstance(make_executor(job), SlurmExecutor)
    executor = SlurmExecutor(cluster="local")
    monkeypatch.setattr("mining.executors.make_executor", lambda job: executor)
    run_job(job)

    assert _pairs(job) == expected
    plan = build_plan(job)
    assert [a.stage for a in executor.submitted] == [s for s in plan if plan[s]]
    # The markers written by the job processes are the ones a rerun reads.
    assert all(not sp.todo for sp in pending(job))
    # Logs went where the spec's folder resolves: beside the spec by default.
    assert log_folder(job) == job.work_dir / "slurm"
    lines = (log_folder(job) / "submitted.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(tasks) for tasks in plan.values())


def test_failed_task_names_its_stage_and_key(tmp_path: Path) -> None:
    corpus = write_toy_corpus(tmp_path)
    job = _slurm_job(corpus)
    stage_plans = pending(job)
    job.shard_files["de"][1].unlink()  # after planning: the task itself must fail
    with pytest.raises(SlurmTaskError, match=r"prepare task de/part-1 failed") as info:
        SlurmExecutor(cluster="debug").run(job, stage_plans)
    assert "part-1" in str(info.value.__cause__)
    # Nothing downstream ran on half an input.
    assert not (job.work_dir / "embeddings").exists()


def test_job_and_tasks_pickle(toy_corpus: ToyCorpus) -> None:
    job = _slurm_job(toy_corpus)
    for tasks in build_plan(job).values():
        for task in tasks:
            assert pickle.loads(pickle.dumps((job, task))) == (job, task)


# --------------------------------------------------------------------------
# The parameters each stage is submitted with


def test_stage_parameters_follow_the_spec(tmp_path: Path) -> None:
    job = _slurm_job(write_toy_corpus(tmp_path, extra_spec=RESOURCES))
    embed = stage_parameters(job, "embed", after=["1001_0", "1001_1", "1002"])
    assert embed == {
        "name": "mining-toy-embed",
        "timeout_min": 240,
        "mem_gb": 64,
        "cpus_per_task": 10,
        "gpus_per_node": 2,
        "slurm_partition": "gpu",
        "slurm_account": "mt",
        "slurm_qos": "normal",
        "slurm_array_parallelism": 3,
        "slurm_additional_parameters": {
            "dependency": "afterok:1001:1002",
            "kill-on-invalid-dep": "yes",
        },
    }
    # A stage the spec says nothing about gets the defaults, the section's
    # partition, no GPU request and, first in line, no dependency.
    defaults = StageResources()
    prepare = stage_parameters(job, "prepare")
    assert prepare["slurm_partition"] == "cpu"
    assert "gpus_per_node" not in prepare
    assert "slurm_additional_parameters" not in prepare
    assert (prepare["mem_gb"], prepare["cpus_per_task"], prepare["timeout_min"]) == (
        defaults.mem_gb,
        defaults.cpus,
        defaults.time_minutes,
    )


def test_parameters_are_ones_submitit_accepts(tmp_path: Path) -> None:
    job = _slurm_job(write_toy_corpus(tmp_path, extra_spec=RESOURCES))
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="local")
    # submitit checks every name, slurm_ ones included, against SLURM's list.
    executor.update_parameters(**stage_parameters(job, "embed", after=["7"]))


def test_dependency_names_each_array_once() -> None:
    assert array_job_id("1234_17") == "1234"
    assert array_job_id("1234") == "1234"
    assert dependency([]) == ""
    assert dependency(["5_0", "5_1", "5_2", "9"]) == "afterok:5:9"


def test_chunks_keep_order_and_size() -> None:
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([], 3) == []


def test_spec_checks_slurm_fields(toy_corpus: ToyCorpus) -> None:
    with pytest.raises(ConfigError, match=r"executor\.slurm\.max_array_size"):
        load_job(toy_corpus.spec, ["executor.slurm.max_array_size=0"])
    job = load_job(toy_corpus.spec, ["executor.slurm.folder="])
    assert log_folder(job) == job.work_dir / "slurm"


def test_no_slurm_fails_with_a_message(
    toy_corpus: ToyCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    job = _slurm_job(toy_corpus)
    with pytest.raises(RuntimeError, match="no SLURM here"):
        SlurmExecutor().run(job, pending(job))


# --------------------------------------------------------------------------
# What sbatch would receive, through a stub sbatch


FAKE_SBATCH = """\
#!/bin/sh
# Stands in for sbatch: keeps the script, answers like sbatch does.
dir=$(dirname "$0")
n=$(cat "$dir/next_id")
echo $((n + 1)) > "$dir/next_id"
cp "$1" "$dir/job-$n.sbatch"
echo "Submitted batch job $n"
"""


def _fake_slurm(bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir.mkdir()
    (bin_dir / "next_id").write_text("100\n")
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _sbatch_flags(path: Path) -> dict[str, str]:
    flags = re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", path.read_text(), re.MULTILINE)
    return {key: value for key, value in flags}


def test_stages_are_chained_by_afterok_in_sbatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir, monkeypatch)
    extra = RESOURCES.replace("max_parallel = 3", "max_parallel = 3\nmax_array_size = 3")
    job = load_job(
        write_toy_corpus(tmp_path / "toy", extra_spec=extra).spec, ["executor.kind=slurm"]
    )
    executor = SlurmExecutor()
    executor.run(job, pending(job))  # returns once submitted: wait is off

    # 4 prepare tasks in arrays of at most 3, then embed (4 -> 3 + 1), index
    # (6: per language train + 2 populate -> 3 + 3), search (4 -> 3 + 1), mine (1),
    # evaluate (1).
    submitted = [(a.stage, len(a.tasks), a.array_ids) for a in executor.submitted]
    assert submitted == [
        ("prepare", 3, ["100"]),
        ("prepare", 1, ["101"]),
        ("embed", 3, ["102"]),
        ("embed", 1, ["103"]),
        ("index", 3, ["104"]),
        ("index", 3, ["105"]),
        ("search", 3, ["106"]),
        ("search", 1, ["107"]),
        ("mine", 1, ["108"]),
        ("evaluate", 1, ["109"]),
    ]
    flags = {n: _sbatch_flags(bin_dir / f"job-{n}.sbatch") for n in range(100, 110)}
    assert "dependency" not in flags[100] and "dependency" not in flags[101]
    for n in (102, 103):
        assert flags[n]["dependency"] == "afterok:100:101"
        assert flags[n]["kill-on-invalid-dep"] == "yes"
        assert flags[n]["gpus-per-node"] == "2"
        assert flags[n]["mem"] == "64GB"
        assert flags[n]["cpus-per-task"] == "10"
        assert flags[n]["time"] == "240"
        assert flags[n]["partition"] == "gpu"
        assert flags[n]["job-name"] == "mining-toy-embed"
    assert flags[102]["array"] == "0-2%3"
    assert "array" not in flags[103]  # a lone task is a plain job
    for n in (104, 105):
        assert flags[n]["dependency"] == "afterok:102:103"
        assert flags[n]["partition"] == "cpu"
        assert "gpus-per-node" not in flags[n]
        assert flags[n]["array"] == "0-2%3"
    assert flags[106]["dependency"] == "afterok:104:105"
    assert flags[108]["dependency"] == "afterok:106:107"
    assert flags[109]["dependency"] == "afterok:108"
    assert all(f["account"] == "mt" and f["qos"] == "normal" for f in flags.values())
    # Nothing ran: the tasks wait for a cluster that is not there.
    assert not (job.work_dir / "sentences").exists()


def test_only_stages_with_work_are_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir, monkeypatch)
    job = load_job(write_toy_corpus(tmp_path / "toy").spec, ["executor.kind=slurm"])
    stage_plans = pending(job)
    # As if prepare were done: embed is first in line and waits for nothing.
    stage_plans[0] = dataclasses.replace(stage_plans[0], todo=[])
    executor = SlurmExecutor()
    executor.run(job, stage_plans)
    assert executor.submitted[0].stage == "embed"
    assert "dependency" not in _sbatch_flags(bin_dir / "job-100.sbatch")
    assert _sbatch_flags(bin_dir / "job-101.sbatch")["dependency"] == "afterok:100"
