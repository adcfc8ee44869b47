"""The ablation study's command line (README.md beside this file):

    python -m apla.study plan [study options] [--shard i/n]   the lines of the runs left to do, one per run
    python -m apla.study run [study options] --jobs N         the same lines, N at a time, then the report
    python -m apla.study report [study options]               the report of what finished
    python -m apla.study measure RUN                          one run's measuring step (the end of its line)
    python -m apla.study select                               the benchmark's selection record (clips.json)

The study options (--out, --quick, --clips, --seeds, ...) say which runs make up the study; `plan`, `run` and `report`
given the same ones speak of the same runs, so any executor of the plan's lines can stand in for `run`.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from apla import checkpoint as ckpt
from apla.cli import DefaultsFormatter, OneLineParser, fail
from apla.config import default_config
from apla.study.clips import RECORD, STUDY_FRAMES, benchmark_clips, candidates, read_record
from apla.study.executor import execute
from apla.study.measures import DIAG_BATCHES, measure_run
from apla.study.plan import (BUDGETS, QUICK_VARIANTS, SECONDARY_CLIPS, check_scripts, line, plan, prepare,
                             read_clips, schedule, shapes_clips, shard, variants)
from apla.study.report import commit, write_report
from apla.study.selection import make_record


MICRO_SAMPLE_STEPS = 10  # DDIM steps of the micro study's samples (its time budget on two CPU cores)


def study_options(p) -> None:
    a = p.add_argument
    a("--out", default="runs/ablation", help="folder of the study's clips and runs (resumable)")
    a("--pretrained", default="micro", help="base model, as train.py's --pretrained")
    a("--clips", default=None,
      help="a JSON/TOML list of {video, prompt, edits[, name, frames, start, stride, size]} (default: the micro "
           "shapes benchmark, apla/study/clips.json)")
    a("--seeds", default="0", help="comma-separated run seeds (a clip's seeds are averaged: the clip is the unit)")
    a("--budgets", default=None, help="comma-separated training steps at which the core variants are sampled; the "
                                      "last is the primary comparison's (default: 100,200,300 on the micro clips, "
                                      "else 1x, 2x and 3x a third of the base model's preset steps)")
    a("--secondary-clips", type=int, default=SECONDARY_CLIPS,
      help="the variants beyond Tune-A-Video, full APLA and the capacity control run on the first n clips")
    a("--sample-steps", type=int, default=None, help="DDIM steps of sampling (default: 10 on the micro clips, else "
                                                     "the base model's preset)")
    a("--clip-model", default=None, help="CLIP for sample.py's CLIP scores: a local folder or hub id (default: the "
                                         "micro CLIP on micro runs, none otherwise)")
    a("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    a("--quick", action="store_true", help="1 clip, 1 seed, 4 variants, a few steps: the pipeline end to end")
    a("--device", default="auto", help="every run's device: 'auto' (cuda if available), 'cpu', 'cuda:1', ...")
    a("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS in each line)")


def report_options(p) -> None:
    p.add_argument("--report", default=None, help="the report's path; its PNGs go beside it (default: OUT/REPORT.md)")
    p.add_argument("--no-plots", action="store_true", help="skip the plot that needs matplotlib")
    p.add_argument("--csv", default=None, help="rebuild the tables from this CSV of the raw data (the results.csv a "
                                               "report wrote) instead of the runs' measures.json")


def parser() -> OneLineParser:
    p = OneLineParser(prog="python -m apla.study", formatter_class=DefaultsFormatter,
                      description="Tables 1 and 3 of APLA against Tune-A-Video over clips x seeds, with 95% "
                                  "confidence intervals: a plan of ordinary train.py / sample.py runs and its report.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{plan,run,report,measure,select}")

    def subcommand(name: str, what: str):
        return sub.add_parser(name, help=what, description=what, formatter_class=DefaultsFormatter)

    plan_p = subcommand("plan", "print the shell line of every run left to do, one per line (and write the runs' "
                             "config files)")
    study_options(plan_p)
    plan_p.add_argument("--shard", default=None, help="i/n: only the runs of shard i of n (0 <= i < n), e.g. a "
                                                      "SLURM array's task $SLURM_ARRAY_TASK_ID/n")
    run_p = subcommand("run", "run the plan's lines with a local pool, then write the report")
    study_options(run_p)
    run_p.add_argument("--jobs", type=int, default=1, help="lines run at once")
    report_options(run_p)
    report_p = subcommand("report", "write the report (REPORT.md and its PNGs) from the runs that finished")
    study_options(report_p)
    report_options(report_p)
    measure_p = subcommand("measure", "what one trained and sampled run measured -> RUN/measures.json")
    measure_p.add_argument("run", help="the run's folder (OUT/runs/<clip>/<variant>/seed-<seed>)")
    measure_p.add_argument("--device", default="auto", help="device of the discriminator's diagnostics")
    select_p = subcommand("select", "run Tune-A-Video on the candidate clips and write the selection record")
    select_p.add_argument("--list", action="store_true", help="only list the candidates")
    select_p.add_argument("--steps", type=int, default=100, help="Tune-A-Video's training steps of the selection")
    select_p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of sampling")
    select_p.add_argument("--jobs", type=int, default=2, help="lines run at once")
    select_p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    select_p.add_argument("--device", default="auto", help="every run's device")
    select_p.add_argument("--out", default="runs/benchmark-selection", help="folder of the selection's runs")
    select_p.add_argument("--record", default=str(RECORD), help="where the record is written")
    return p


def at_least_one(**values) -> None:
    for flag, v in values.items():
        if v is not None and v < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1, got {v}")


def study_runs(args) -> list:
    """The runs the study options name (apla.study.plan.Run), checked; one-line exit on a bad option."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {args.seeds!r}: expected comma-separated integers")
    table = variants()
    names = list(table) if not args.variants else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in table]
    if unknown or not seeds:
        fail(f"unknown variant {unknown[0]!r}; expected some of {list(table)}" if unknown else "--seeds: none given")
    names = [v for v in table if v in names]  # the table's order: Tune-A-Video, the baseline of the report, first
    try:
        budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()}) if args.budgets else None
    except ValueError:
        fail(f"--budgets {args.budgets!r}: expected comma-separated integers")
    sample_steps = args.sample_steps
    if args.quick:
        names = [v for v in QUICK_VARIANTS if v in names] or names[:1]
        seeds, budgets, sample_steps = seeds[:1], [1, 2], 3
    at_least_one(sample_steps=sample_steps, threads=args.threads, secondary_clips=args.secondary_clips,
                 budget=min(budgets) if budgets else None)
    out = Path(args.out)
    if args.clips:
        clips = read_clips(args.clips)
        if budgets is None:
            third = max(1, default_config(args.pretrained).max_steps // 3)
            budgets = [third, 2 * third, 3 * third]
    else:  # the micro benchmark: its clips' first STUDY_FRAMES frames
        clips = shapes_clips(out, benchmark_clips(read_record()), STUDY_FRAMES)
        budgets, sample_steps = budgets or list(BUDGETS), sample_steps or MICRO_SAMPLE_STEPS
    return plan(out, clips[:1] if args.quick else clips, seeds, names, args.pretrained, budgets, sample_steps,
                args.secondary_clips, 1 if args.quick else DIAG_BATCHES, clip_model=args.clip_model)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        fail(f"--shard {text!r}: expected i/n, e.g. 0/8")
    if not 0 <= index < count:
        fail(f"--shard {text}: expected 0 <= i < n")
    return index, count


def report_path(args) -> Path:
    return Path(args.report) if args.report else Path(args.out) / "REPORT.md"


def read_stages(out: Path) -> list[dict]:
    path = out / "stages.json"
    return json.loads(path.read_text()) if path.is_file() else []


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    invocation = "python -m apla.study " + shlex.join(argv)
    if args.command == "measure":
        measure_run(args.run, args.device)
        return 0
    if args.command == "select":
        if args.list:
            for s in candidates():
                print(f"{s.name}: {s.caption} | edits: {'; '.join(s.edits)} | background {s.background}")
            return 0
        check_scripts()
        at_least_one(steps=args.steps, sample_steps=args.sample_steps, jobs=args.jobs, threads=args.threads)
        errors = make_record(Path(args.out), Path(args.record), args.steps, args.sample_steps, args.jobs,
                             args.threads, args.device, invocation)
        print("\n".join(f"error: {e}" for e in errors) or f"selection record -> {args.record}", file=sys.stderr)
        return 1 if errors else 0
    if args.command == "run":
        at_least_one(jobs=args.jobs)
    runs = study_runs(args)
    out = Path(args.out)
    if args.command == "report":
        if args.csv:
            if not Path(args.csv).is_file():
                fail(f"--csv {args.csv}: no such file")
            return write_report(runs, report_path(args), read_stages(out), invocation, plots=not args.no_plots,
                                csv_path=args.csv)
        if not any(r.finished for r in runs):
            fail(f"no finished run of this study under {out}; run the lines of python -m apla.study plan first")
        return write_report(runs, report_path(args), read_stages(out), invocation, plots=not args.no_plots)
    check_scripts()
    chosen = shard(runs, *parse_shard(args.shard)) if args.command == "plan" and args.shard else schedule(runs)
    todo = [(r, text) for r in chosen if (text := line(r, args.device, args.threads))]
    for r, _ in todo:
        prepare(r)
    if args.command == "plan":
        print(f"apla.study: {len(chosen)} runs, {len(chosen) - len(todo)} already finished, {len(todo)} lines",
              file=sys.stderr)
        for _, text in todo:
            print(text)
        return 0
    print(f"apla.study: {len(runs)} runs ({len(runs) - len(todo)} already finished), {args.jobs} at a time, "
          f"{args.threads} thread(s) each -> {out}", file=sys.stderr)
    started = time.time()
    errors, loads = execute(todo, args.jobs)
    stages = read_stages(out) + [{
        "command": invocation, "wall_s": time.time() - started, "runs": len(todo), "runs_before": len(runs) - len(todo),
        "finished": sum(r.finished for r in runs), "jobs": args.jobs, "threads": args.threads,
        "cpus": os.cpu_count(), "commit": commit(), "load_before": loads[0],
        "load_mean": float(np.mean(loads[1:] or loads)),
        "load_max": max(loads), "errors": errors, "finished_at": time.strftime("%Y-%m-%d %H:%M")}]
    ckpt.atomic_write_json(out / "stages.json", stages)
    code = write_report(runs, report_path(args), stages, invocation, plots=not args.no_plots,
                        csv_path=None)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else code


if __name__ == "__main__":
    sys.exit(main())
