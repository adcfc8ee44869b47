"""Measure a one-shot video run of the micro model with the shapes world's evaluator.

    python train.py && python sample.py          # the default run: tune on the red circle, sample three prompts
    python -m apla.micro.oneshot --run runs/apla  # -> a markdown table (and --json for the raw figures)

For the run's source clip and every GIF that sample.py wrote for it, it reports
  - for an edited prompt (another colour or shape than the source caption): the fraction of frames whose edited
    attribute is what the prompt asks, and the fraction whose unedited attribute stayed as in the clip;
  - the mean distance (pixels) between the object's centroid path and the source clip's path;
  - for the source prompt itself: the PSNR of the generated frames against the clip's frames.
No APLA equation lives here: this is the measurement behind the project's one-shot figures, a view of
`apla.micro.shapes_eval.shapes_measures` and `apla.eval.metrics.psnr`; `python -m apla.eval RUN/samples` gives these
and the paper's own numbers (FCI, warping error, CLIP scores). Prompts that are not captions of the shapes world
have nothing to be measured against and are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apla.assets import resolve_video
from apla.checkpoint import atomic_write_json
from apla.config import TrainConfig
from apla.eval.metrics import psnr
from apla.eval.score import sample_stem
from apla.micro.shapes_eval import evaluate_image, shapes_measures
from apla.video import VideoError, count_frames, read_video


def evaluate_run(run_dir, samples_dir=None) -> dict:
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    size = cfg.size
    source = read_video(resolve_video(cfg.video), cfg.frames, start=cfg.start, stride=cfg.stride, size=size)
    samples_dir = Path(samples_dir) if samples_dir else run_dir / "samples"
    results = []
    for prompt in [cfg.prompt, *cfg.edit_prompts]:
        gif = samples_dir / f"{sample_stem(prompt)}.gif"
        if not gif.is_file():
            continue
        frames = read_video(str(gif), min(cfg.frames, count_frames(str(gif))), size=size)  # (F, 3, H, W)
        measured = shapes_measures(frames, prompt, source[: frames.shape[0]])  # what python -m apla.eval reports
        if measured is None:  # not a caption of the shapes world
            continue
        row = {"prompt": prompt, "frames": int(frames.shape[0]), "edited": measured["edited"],
               "object_found": measured["object_found"],
               "path_distance_px": measured.get("path_error", float("nan"))}
        if "edited_right" in measured:
            row["edited_attribute_accuracy"] = measured["edited_right"]
        if "kept_right" in measured:
            row["kept_attribute_accuracy"] = measured["kept_right"]
        if not measured["edited"]:
            row["psnr_db"] = psnr(frames, source[: frames.shape[0]])
        row["per_frame"] = [{k: evaluate_image(f)[k] for k in ("colour", "shape", "centroid")} for f in frames]
        results.append(row)
    return {"run": str(run_dir), "source_prompt": cfg.prompt, "results": results}


def to_markdown(report: dict) -> str:
    def pct(r, k):
        return f"{100 * r[k]:.0f}%" if k in r else "–"

    lines = ["| prompt | edited | edited attribute right | unedited attribute kept | centroid path vs clip (px) "
             "| PSNR vs clip (dB) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        psnr_cell = f"{r['psnr_db']:.1f}" if "psnr_db" in r else "–"
        lines.append(f"| {r['prompt']} | {', '.join(r['edited']) or '(source prompt)'} | "
                     f"{pct(r, 'edited_attribute_accuracy')} | {pct(r, 'kept_attribute_accuracy')} | "
                     f"{r['path_distance_px']:.2f} | {psnr_cell} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apla.micro.oneshot", description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/apla", help="the run directory of train.py (default: runs/apla)")
    p.add_argument("--samples", default=None, help="where sample.py wrote the GIFs (default: RUN/samples)")
    p.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = p.parse_args(argv)
    if not (Path(args.run) / "config.json").is_file():
        print(f"error: --run {args.run}: not a run directory of train.py (no config.json)", file=sys.stderr)
        return 2
    try:
        report = evaluate_run(args.run, args.samples)
    except VideoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not report["results"]:
        print(f"error: no samples of the run's shapes-world prompts in {args.samples or Path(args.run) / 'samples'}; "
              f"run sample.py first", file=sys.stderr)
        return 2
    print(to_markdown(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
