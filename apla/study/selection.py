"""Making the benchmark's selection record (`python -m apla.study select`): Tune-A-Video on every candidate clip of
`apla.study.clips`, at the study's budget and on the selection seed, run as a plan of ordinary lines (the same
`apla.study.plan` and executor as the study's), then the rule of `apla.study.clips.select` on what they measured
-> clips.json. The rule and the record's reader live in `apla.study.clips`; this module only runs it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import apla
from apla.checkpoint import atomic_write_json
from apla.micro.shapes_eval import shapes_measures
from apla.run import decode_latents, encode_clip
from apla.study.clips import (BENCH_SEED, HEADROOM_FLICKER, HEADROOM_PATH_PX, HEADROOM_PSNR_DB, REPRESENT_PATH_PX,
                              SELECTION_SEED, ClipSpec, candidates, render, select)
from apla.study.executor import execute
from apla.study.plan import BASELINE, line, plan, prepare, schedule, shapes_clips


@torch.no_grad()
def vae_check(spec: ClipSpec, sd) -> dict:
    """The shapes measures of the VAE's round trip (posterior mean, 8-bit as a file holds it) of the clip, against
    the clip and its caption."""
    frames = render(spec)
    back = decode_latents(sd.vae, encode_clip(sd.vae, frames, "cpu")[0])  # (F, 3, H, W)
    back = ((back + 1) * 127.5).round() / 127.5 - 1
    m = shapes_measures(back, spec.caption, frames)
    return {k: m[k] for k in ("kept_right", "path_error", "colour_flicker", "size_flicker", "object_found")}


def make_record(out: Path, record: Path, steps: int, sample_steps: int, jobs: int, threads: int, device: str,
                command: str) -> list[str]:
    """Run Tune-A-Video on every candidate the record does not hold yet (resumable, as the study), apply the rule
    to all of them and write the record; returns the errors of the runs (nothing is written then). A candidate of
    the existing record is reused when its clip, the steps and the sampling steps are the same."""
    started = time.time()
    specs = candidates()
    old = json.loads(record.read_text()) if record.is_file() else {}
    same = old.get("seed") == BENCH_SEED and old.get("steps") == steps and old.get("sample_steps") == sample_steps
    known = {c["name"]: c for c in old.get("candidates", []) if same and c["name"] in {s.name for s in specs}
             and {k: c[k] for k in spec_keys(c)} == spec_fields(next(s for s in specs if s.name == c["name"]))}
    fresh = [s for s in specs if s.name not in known]
    runs = plan(out, shapes_clips(out, fresh), [SELECTION_SEED], [BASELINE], "micro", [steps], sample_steps)
    todo = [(r, line(r, device, threads)) for r in schedule(runs) if not r.finished]
    for r, _ in todo:
        prepare(r)
    errors, _ = execute(todo, jobs)
    if errors:
        return errors
    sd = apla.load_stable_diffusion("micro")
    ran = {}
    for spec, r in zip(fresh, runs):
        m = json.loads((r.dir / "measures.json").read_text())
        tav = {s["kind"]: s["measures"] for s in m["samples"] if s["step"] == steps}
        ran[spec.name] = {**spec.to_dict(), "vae_check": vae_check(spec, sd), "tav": tav}
    records = [{k: v for k, v in (known.get(s.name) or ran[s.name]).items() if k not in ("kept", "why")}
               for s in specs]
    wall = round((time.time() - started) / 60, 1)
    atomic_write_json(record, {
        "command": command, "wall_min": wall, "runs": len(fresh), "earlier": {k: old[k] for k in ("command", "wall_min")
                                                                             if k in old and known},
        "seed": BENCH_SEED, "num_candidates": len(specs), "selection_seed": SELECTION_SEED, "steps": steps,
        "sample_steps": sample_steps,
        "rule": {"represent_path_px": REPRESENT_PATH_PX, "headroom_path_px": HEADROOM_PATH_PX,
                 "headroom_psnr_db": HEADROOM_PSNR_DB, "headroom_flicker": HEADROOM_FLICKER},
        "candidates": select(records)})
    return []


def spec_keys(record: dict) -> list[str]:
    return [k for k in ClipSpec.__dataclass_fields__ if k in record]


def spec_fields(spec: ClipSpec) -> dict:
    """A ClipSpec as its record stores it (JSON: tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in spec.to_dict().items() if k in ClipSpec.__dataclass_fields__}))
