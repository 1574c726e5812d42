"""The command line: `mining run|plan|status JOB.toml` and `mining model export`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence

from mining.config import STAGES, ConfigError, Job, load_job

log = logging.getLogger("mining")

DESCRIPTION = """\
Mine parallel sentence pairs out of monolingual corpora.

A job is one TOML spec. `mining run` plans every stage (prepare, embed,
index, search, mine, evaluate), skips tasks whose done-marker matches, and
runs the rest; rerun it after a crash or a change of settings and it does
exactly the missing work."""


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the job spec (TOML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a spec value (TOML syntax; bare words are strings); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mining", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job (only what is not done yet)")
    _add_job_args(run)
    run.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        help="run only this stage (repeatable); its inputs must be done",
    )
    run.add_argument("--force", action="store_true", help="redo the chosen stages' tasks")

    plan = sub.add_parser("plan", help="check a spec and list each stage's tasks, done or to do")
    _add_job_args(plan)

    status = sub.add_parser("status", help="per-stage totals from the tasks' stats files")
    _add_job_args(status)

    model = sub.add_parser("model", help="prepare models for jobs")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    export = model_sub.add_parser(
        "export",
        help="merge a LoRA adapter into its base, keep the encoder, save bf16 safetensors",
        description="Load a base model (+ a peft adapter), merge the adapter, keep only the "
        "encoder and save it with its tokenizer to OUT, once; embed tasks then load OUT "
        "(set encoder.model = OUT and no encoder.adapter).",
    )
    export.add_argument("out", metavar="OUT", help="the folder to write")
    export.add_argument("--model", required=True, help="hub id or folder of the base model")
    export.add_argument("--adapter", default=None, help="hub id or folder of a peft adapter")
    export.add_argument("--revision", default=None, help="hub revision of the base model")
    export.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32", "float16"),
        help="weights dtype (default %(default)s; not float16 for T5 models)",
    )
    export.add_argument(
        "--trust-remote-code", action="store_true", help="run the repo's own code (off)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # faiss logs every instruction-set build it tries before the one it loads.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    if args.command == "model":
        return _model(args)
    try:
        job = load_job(args.spec, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "plan":
        return _plan(job)
    if args.command == "status":
        return _status(job)
    return _run(job, args.stage, args.force)


def _model(args: argparse.Namespace) -> int:
    from mining.export import export_model

    try:
        out = export_model(
            args.model,
            args.out,
            adapter=args.adapter,
            revision=args.revision,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as err:
        log.debug("export failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _plan(job: Job) -> int:
    from mining.pipeline import pending

    for sp in pending(job):
        print(f"{sp.stage:9s} {len(sp.tasks):6d} tasks  {len(sp.tasks) - len(sp.todo):6d} done")
    return 0


def _status(job: Job) -> int:
    from mining.pipeline import collect_stats

    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    rejected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for stats in collect_stats(job):
        t = totals[stats["stage"]]
        t["tasks"] += 1
        for key in ("rows_in", "rows_out", "seconds"):
            t[key] += stats.get(key, 0) or 0
        for reason, count in (stats.get("rejected") or {}).items():
            rejected[stats["stage"]][reason] += count
    for stage in STAGES:
        if stage not in totals:
            continue
        t = totals[stage]
        line = (
            f"{stage:9s} tasks {int(t['tasks']):5d}  rows in {int(t['rows_in']):10d}  "
            f"out {int(t['rows_out']):10d}  {t['seconds']:9.1f} s"
        )
        if rejected[stage]:
            line += "  rejected " + json.dumps(dict(sorted(rejected[stage].items())))
        print(line)
    return 0


def _run(job: Job, stages: Sequence[str] | None, force: bool) -> int:
    from mining.pipeline import run_job

    try:
        run_job(job, stages, force)
    except (ValueError, RuntimeError, OSError) as err:
        # Bad input and broken files end the job with the message that says
        # where; a traceback would bury it.
        log.debug("job failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 1
    if job.executor.kind == "local":
        report(job)
    return 0


def report(job: Job) -> None:
    """Per pair: how many pairs, the scores against gold, the best pairs."""
    import pyarrow.parquet as pq

    from mining.store import WorkDir

    work = WorkDir(job.work_dir)
    for pair in job.pairs:
        path = work.pairs(pair)
        if not path.exists():
            continue
        table = pq.read_table(path)
        print(f"\n== {pair}: {table.num_rows} pairs -> {path}")
        evaluation = work.evaluation(pair)
        if pair in job.evaluate.gold and evaluation.exists():
            e = json.loads(evaluation.read_text())
            print(
                f"   against gold: precision {e['precision']:.3f}  recall {e['recall']:.3f}  "
                f"F1 {e['f1']:.3f}  ({e['correct']} of {e['gold']} gold pairs, "
                f"{e['predicted']} predicted)"
            )
        top = table.slice(0, job.evaluate.show_top).to_pylist()
        for row in top:
            print(f"   {row['score']:.4f}  {row['src_text']}  |||  {row['tgt_text']}")
