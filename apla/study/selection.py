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
from apla.study.clips import (BENCH_SEED, HEADROOM_FLICKER, HEADROOM_PATH_PX, HEADROOM_PSNR_DB, NUM_CLIPS,
                              REPRESENT_PATH_PX, SELECTION_SEED, ClipSpec, candidates, render, select)
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
    """Run Tune-A-Video on every candidate (resumable, as the study), apply the rule and write the record; returns
    the errors of the runs (nothing is written then)."""
    started = time.time()
    specs = candidates()
    runs = plan(out, shapes_clips(out, specs), [SELECTION_SEED], [BASELINE], "micro", steps, sample_steps,
                double=False)
    todo = [(r, line(r, device, threads)) for r in schedule(runs) if not r.finished]
    for r, _ in todo:
        prepare(r)
    errors, _ = execute(todo, jobs)
    if errors:
        return errors
    sd = apla.load_stable_diffusion("micro")
    records = []
    for spec, r in zip(specs, runs):
        m = json.loads((r.dir / "measures.json").read_text())
        tav = {s["kind"]: s["measures"] for s in m["samples"] if s["step"] == steps}
        records.append({**spec.to_dict(), "vae_check": vae_check(spec, sd), "tav": tav})
    atomic_write_json(record, {
        "command": command, "wall_min": round((time.time() - started) / 60, 1), "seed": BENCH_SEED,
        "num_candidates": len(specs), "selection_seed": SELECTION_SEED, "steps": steps, "sample_steps": sample_steps,
        "rule": {"keep": NUM_CLIPS, "represent_path_px": REPRESENT_PATH_PX, "headroom_path_px": HEADROOM_PATH_PX,
                 "headroom_psnr_db": HEADROOM_PSNR_DB, "headroom_flicker": HEADROOM_FLICKER},
        "candidates": select(records)})
    return []
