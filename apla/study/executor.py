"""The study's built-in executor of its plan (`python -m apla.study run --jobs N`): the lines of `apla.study.plan`
run N at a time by the standard library's pool, each as `subprocess.run(line, shell=True)`, exactly as xargs, GNU
parallel or a SLURM array would run them. Each run's output goes to RUN/run.log."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from apla.study.plan import Run

LOAD_EVERY_S = 10  # how often the 1-minute load average is read while the runs go on


def run_line(run: Run, line: str) -> int:
    """Run one line of the plan in a shell, its output appended to RUN/run.log; its exit status."""
    with open(run.dir / "run.log", "a") as log:
        return subprocess.run(line, shell=True, stdout=log, stderr=subprocess.STDOUT).returncode


def execute(todo: list[tuple[Run, str]], jobs: int) -> tuple[list[str], list[float]]:
    """Run the (run, line) pairs `jobs` at a time, printing progress to stderr; returns the errors (one per failed
    line, naming its log) and the 1-minute load averages seen (before the start, then every LOAD_EVERY_S)."""
    loads, started, errors = [os.getloadavg()[0]], time.time(), []
    last_load = started
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads that only wait on their subprocess
        pending = {pool.submit(run_line, run, line): run for run, line in todo}
        count = len(pending)
        while pending:
            done, _ = wait(pending, timeout=LOAD_EVERY_S, return_when=FIRST_COMPLETED)
            if time.time() - last_load >= LOAD_EVERY_S:
                loads.append(os.getloadavg()[0])
                last_load = time.time()
            for future in done:
                run = pending.pop(future)
                if future.result():
                    errors.append(f"{run.name}: exited with {future.result()}; see {run.dir / 'run.log'}")
                print(f"  [{count - len(pending)}/{count}] {run.name} ({(time.time() - started) / 60:.1f} min)",
                      file=sys.stderr)
    return errors, loads
