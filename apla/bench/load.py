"""`python -m apla.bench --load FILE,...`: wall time and peak resident memory of loading SD weights on the CPU.

Each load runs in a fresh Python process (so its peak is its own: `resource.getrusage(RUSAGE_SELF).ru_maxrss` at
the end, less nothing: the interpreter and torch are part of what a user pays), which loads the three networks
with `apla.load_stable_diffusion` in float32 and reports the seconds the call took (its modules, transformers
among them, imported before the clock starts). `--load-with DIR,...` makes
the child import the `apla` package of another checkout (e.g. a git worktree of an older commit), so that the
code before and after a change is measured in one run on one machine; rows are interleaved by file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from apla.bench.core import machine

CHILD = """
import json, resource, sys, time
import torch
import apla
from apla.sd.weights import load_stable_diffusion  # the modules (and transformers) imported before the clock starts
t0 = time.perf_counter()
sd = load_stable_diffusion(sys.argv[1], device="cpu", dtype=torch.float32)
seconds = time.perf_counter() - t0
nets = (sd.unet, sd.vae, sd.text_encoder)
params = sum(p.numel() * p.element_size() for m in nets for p in m.parameters())
print(json.dumps({"seconds": seconds, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "params": params, "apla": apla.__file__}))
"""


def measure_load(path: str | Path, code_dir: str | Path | None = None) -> dict:
    """One load of `path` in a child process importing `apla` from `code_dir` (default: this one)."""
    env = dict(os.environ)
    cwd = Path(code_dir).resolve() if code_dir else Path.cwd()
    env["PYTHONPATH"] = str(cwd)
    out = subprocess.run([sys.executable, "-c", CHILD, str(Path(path).resolve())], cwd=cwd, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loading {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["apla"]).resolve().is_relative_to(cwd):
        raise RuntimeError(f"the child imported {result['apla']}, not the apla package of {cwd}")
    return result


def load_table(files, code_dirs=(None,)) -> str:
    """A markdown table: one row per (file, checkout), the file's size, wall time, peak RSS and its ratio to the
    float32 parameter bytes."""
    lines = ["| file | code | file size | load time | peak resident | peak / float32 params |",
             "|---|---|---|---|---|---|"]
    for path in files:
        size = Path(path).stat().st_size
        for code in code_dirs:
            r = measure_load(path, code)
            lines.append(f"| {Path(path).name} | {code or '.'} | {size / 1e9:.2f} GB | {r['seconds']:.1f} s "
                         f"| {r['peak'] / 1e9:.2f} GB | {r['peak'] / r['params']:.2f}x |")
    return f"Machine: {machine('cpu')}\n\n" + "\n".join(lines)
