"""Score videos with the numbers of APLA's Tables 1-3 (`apla.eval.metrics`): one table row per video, and JSON.

    python -m apla.eval VIDEO [--prompt P] [--source CLIP] [--clip-model M] [--json OUT]

VIDEO is a GIF, an MP4/WebM/MOV, a folder of frames, or a folder of videos such as a run's `samples/`: there every
prompt's video is scored once, read from its PNG strip when that holds the frames side by side (lossless: what
sample.py wrote) and otherwise from its GIF or MP4. In a run's samples folder the prompts come from the run
(`config.json`, or the `metrics.json` sample.py wrote), the source clip from the run's configuration unless
--source names one.

What is measured, when it applies:
  FCI, warping error              always (flow on the video itself; FCI needs 3 frames)
  CLIP frame consistency          with a CLIP model: --clip-model, else the one the assets registry gives the
                                  bundled base model (`apla.assets.CLIP_SCORERS`; see `pick_clip`)
  CLIP text alignment             with a CLIP model and a prompt
  PSNR against the source         with a source, for a video of the source's own prompt (or of an unknown one)
  a project's measures            where they apply: those registered in the entry-point group apla.measures
                                  (`apla.eval.metrics`), e.g. the micro project's shapes-world measures on a
                                  prompt of its world ("a blue square moving to the right")

sample.py calls `score_samples` on what it has just generated and writes `samples/metrics.json`, the same report
this command prints for the samples folder. Bad input (a missing or unreadable file, a one-frame video, a CLIP
model that does not load) is one line on stderr and exit status 2; the JSON is written only when all is scored.
"""
from __future__ import annotations

import errno
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apla.assets import CLIP_SCORERS, clip_scorer, resolve_video
from apla.checkpoint import atomic_write_json, describe_os_error
from apla.cli import DefaultsFormatter, OneLineParser, fail, pick_device
from apla.config import TrainConfig, default_config, height_width, slug
from apla.eval.flow import FlowConfig, video_flow
from apla.eval.metrics import (CLIP_MODELS, MEASURES, METRICS, MetricsError, clip_frame_consistency,
                               clip_text_alignment, fci, load_clip, load_plugin, psnr, registered, source_deviation,
                               source_motion, warping_error)
from apla.video import AV_EXTENSIONS, GIF_EXTENSIONS, VideoError, count_frames, read_video

VIDEO_EXTENSIONS = GIF_EXTENSIONS + AV_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

def quantize(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [-1, 1] as an 8-bit file holds them: rounded to 1/255 steps (what read_video gives back)."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def read_strip(path: Path) -> torch.Tensor | None:
    """A PNG strip of square frames side by side (apla.video.write_png_strip) -> (F, 3, H, H) in [-1, 1]; None
    when the image is not one (its width is not a multiple >= 2 of its height)."""
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))  # (H, F*H, 3)
    h, w = array.shape[:2]
    if w % h or w // h < 2:
        return None
    x = torch.from_numpy(array.reshape(h, w // h, h, 3).transpose(1, 3, 0, 2).copy())  # (H, F, H, 3) -> (F, 3, H, H)
    return x.float() / 127.5 - 1


def read_clip(path) -> torch.Tensor:
    """Every frame of a GIF, video file or frames folder at its own size: (F, 3, H, W) in [-1, 1]."""
    return read_video(str(path), count_frames(str(path)), size=None)


GRID = "grid"  # sample.py's grid.gif / grid.png of all prompts of a call: not a video of its own


def find_videos(path: Path) -> list[tuple[str, Path, Path]]:
    """The videos under VIDEO: (name, file to read, file the video is), one per stem in a folder of videos (a grid of
    several, GRID, left out; a sample's stem always ends in its prompt's hash, so never is GRID)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS and p.stem != GRID)
        if files:
            chosen = {}
            for p in files:  # one file per prompt: the GIF before the MP4
                chosen.setdefault(p.stem, p)
            out = []
            for stem, p in sorted(chosen.items()):
                strip = p.with_suffix(".png")
                out.append((stem, strip if strip.is_file() else p, p))
            return out
    return [(path.stem if path.is_file() else path.name, path, path)]


def load(read_from: Path, video_file: Path) -> torch.Tensor:
    """The frames of one video: from its PNG strip when that is a strip of square frames, else the file."""
    if read_from.suffix.lower() == ".png":
        frames = read_strip(read_from)
        if frames is not None:
            return frames
    return read_clip(video_file)


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------

def load_measures() -> dict:
    """The measures installed projects register (entry-point group apla.measures), loaded: {name: function}."""
    return {name: load_plugin(ep) for name, ep in registered(MEASURES).items()}


def columns(measures: dict) -> dict:
    """The table's columns, {name: (title, direction, format, what)}: the paper's (METRICS), then each measure's."""
    return {**METRICS, **{k: v for m in measures.values() for k, v in getattr(m, "columns", {}).items()}}


def score_video(video: torch.Tensor, measures: dict, prompt: str | None = None, source: torch.Tensor | None = None,
                source_prompt: str | None = None, clip=None, device="cpu", cfg: FlowConfig = FlowConfig(),
                motion=None) -> dict:
    """Every measure of `apla.eval.metrics` that applies to one video (F, 3, H, W) in [-1, 1], and every one of the
    projects' `measures` (`load_measures()`) that applies; see the module doc. The flow is computed once (forward
    and backward, all pairs in one batch) on `device`; `motion` may pass the source's `source_motion` already
    computed on `device`."""
    if video.shape[0] < 2:
        raise MetricsError(f"a video of {video.shape[0]} frame: frame consistency needs at least 2 frames")
    x = video.to(device)
    forward, backward = video_flow(x, cfg)
    out = {"warping_error": warping_error(x, (forward, backward))}
    if video.shape[0] >= 3:
        out["fci"] = fci(x, forward)
    if clip is not None:
        out["clip_frame_consistency"] = clip_frame_consistency(x, clip)
        if prompt:
            out["clip_text_alignment"] = clip_text_alignment(x, prompt, clip)
    edited, extra = [], {}
    for measure in measures.values():
        found = measure(video, prompt, source)
        if found is not None:
            found = dict(found)
            edited += found.pop("edited", [])
            # its table columns first, in their order, then what it reports beside them
            extra.update({k: found[k] for k in [*getattr(measure, "columns", {}), *found] if k in found})
    is_edit = bool(edited) or (prompt is not None and source_prompt is not None and prompt != source_prompt)
    if source is not None and not is_edit:
        out["psnr"] = psnr(video, source)
    if source is not None:
        out["source_deviation"] = source_deviation(x, source.to(device), cfg, motion)
    return {"metrics": {**{k: out[k] for k in METRICS if k in out}, **extra}, "edited": edited}


def read_source(source, frames: int, size: tuple[int, int], start: int = 0, stride: int = 1) -> torch.Tensor:
    """The source clip (a path or a bundled clip's name) as the videos are: `frames` frames at `size`."""
    return read_video(resolve_video(source), frames, start=start, stride=stride, size=size)


def pick_clip(clip_model: str | None, videos: list[torch.Tensor], device):
    """(scorer, name) of the CLIP model to score with: the named one ("none": (None, None)); by default, when every
    video has the frame size of a bundled model's runs (its default `size`: 64x64 for the micro SD), the CLIP model
    the assets registry gives that model's samples (`apla.assets.CLIP_SCORERS`), else none (the user names a CLIP
    model with --clip-model; nothing is downloaded unless named)."""
    if clip_model is None:
        sides = {tuple(v.shape[-2:]) for v in videos}
        clip_model = next((scorer for model, scorer in CLIP_SCORERS.items()
                           if sides == {height_width(default_config(model).size)}), "none")
    return (None, None) if clip_model == "none" else (load_clip(clip_model, device), clip_model)


def run_clip(cfg, clip_model: str | None, device):
    """(scorer, name) for a run's samples (sample.py): the named model, else the one the assets registry gives the
    run's base model (`apla.assets.clip_scorer`), else none. Loaded before sampling, so that a CLIP model that does
    not load stops sample.py before any work."""
    if clip_model is None:
        clip_model = clip_scorer(cfg.pretrained) or "none"
    return pick_clip(clip_model, [], device)


def score_videos(items: list[dict], source=None, source_prompt: str | None = None, start: int = 0, stride: int = 1,
                 clip: tuple = (None, None), device="cpu") -> dict:
    """Score a list of {"name", "video", "prompt"?, "path"?}; clip = (scorer, name) of `pick_clip`. Returns the
    report (JSON-ready)."""
    scorer, clip_name = clip
    measures = load_measures()
    rows, sources = [], {}
    for it in items:
        video = it["video"]
        src, motion = None, None
        if source is not None:
            key = (video.shape[0], *video.shape[-2:])
            if key not in sources:  # read, and its motion found, once per frame count and size
                read = read_source(source, key[0], key[1:], start, stride)
                sources[key] = (read, source_motion(read.to(device)))
            src, motion = sources[key]
        scored = score_video(video, measures, it.get("prompt"), src, source_prompt, scorer, device, motion=motion)
        rows.append({"name": it["name"], "path": it.get("path"), "prompt": it.get("prompt"),
                     "frames": int(video.shape[0]), "height": int(video.shape[-2]), "width": int(video.shape[-1]),
                     **scored})
    return {"videos": rows, "source": None if source is None else str(source), "source_prompt": source_prompt,
            "clip_model": clip_name, "flow": asdict(FlowConfig()),
            "directions": {k: v[1] for k, v in columns(measures).items()}}


def sample_stem(prompt: str) -> str:
    """The file stem of a prompt's samples (sample.py writes <stem>.gif, .png, .mp4): a readable slug and a short hash
    of the exact prompt, so that prompts differing only in case, punctuation, emoji or past 60 characters never share
    files ("a red circle!" -> a_red_circle-3c5e1f0a)."""
    return f"{slug(prompt)}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def relative_to(path, root) -> str:
    """`path` relative to the folder `root` when it lies inside it, else absolute: what a report keeps, so that a
    folder moved with its files still points at them."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return str(path.relative_to(root) if path.is_relative_to(root) else path)


def score_samples(videos: list[tuple[str, torch.Tensor]], cfg, out: Path | None = None, clip: tuple = (None, None),
                  device="cpu", files: dict | None = None, root=None) -> dict:
    """What sample.py calls: score its (prompt, frames) against the run's source clip (cfg: the run's TrainConfig; an
    empty cfg.prompt, a clip of unknown caption, scores every video as a reconstruction), frames quantized to 8 bits
    as its files hold them; clip = `run_clip(...)`; files: {prompt: paths written}, kept in the report as "files",
    relative to `root` (the run directory, or the folder of the samples of a base model) when inside it; with `out`,
    write the report there (atomically)."""
    items = [{"name": sample_stem(p), "prompt": p, "video": quantize(f.cpu())} for p, f in videos]
    report = score_videos(items, cfg.video, cfg.prompt or None, cfg.start, cfg.stride, clip, device)
    report["files"] = {p: [relative_to(f, root) if root is not None else str(f) for f in paths]
                       for p, paths in (files or {}).items()}
    if out is not None:
        atomic_write_json(out, report)
    return report


def run_prompts(folder: Path) -> tuple[dict, object]:
    """For a run's samples folder: {stem: prompt} from the metrics.json sample.py wrote and the run's config (stems of
    sample_stem, and the bare slugs of samples written before it), and the run's TrainConfig (None when the folder is
    not inside a run)."""
    prompts, cfg = {}, None
    config = folder.parent / "config.json"
    if config.is_file():
        try:
            cfg = TrainConfig.from_dict(json.loads(config.read_text()))
            prompts.update({stem(p): p for p in [cfg.prompt, *cfg.edit_prompts] for stem in (slug, sample_stem)})
        except (ValueError, TypeError):
            cfg = None
    written = folder / "metrics.json"
    if written.is_file():
        try:
            prompts.update({r["name"]: r["prompt"] for r in json.loads(written.read_text())["videos"]
                            if r.get("prompt") is not None})
        except (ValueError, KeyError, TypeError):
            pass
    return prompts, cfg


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

CLIP_COLUMNS = ("clip_frame_consistency", "clip_text_alignment")


def clip_label(clip_model: str | None) -> str:
    """What the table calls the CLIP scorer: "CLIP" for a CLIPModel (a folder or hub id, as the paper's), "<name>-CLIP"
    for one a project registers (entry-point group apla.clip_models), such as "micro-CLIP": its scores are on its own
    scale, not comparable with the paper's."""
    return f"{clip_model}-CLIP" if clip_model in registered(CLIP_MODELS) else "CLIP"


def format_table(report: dict, measures: dict | None = None) -> str:
    """A markdown table: one row per video, a column per measure that any video has, its direction in the title;
    the columns of `measures` (`load_measures()` by default) beside the paper's; the CLIP columns named after the
    report's scorer (`clip_label`)."""
    table = columns(load_measures() if measures is None else measures)
    label = clip_label(report.get("clip_model"))
    table.update({k: (table[k][0].replace("CLIP", label, 1), *table[k][1:]) for k in CLIP_COLUMNS})
    names = [k for k in table if any(k in r["metrics"] for r in report["videos"])]
    head = ["video", "frames"] + [f"{table[k][0]} {table[k][1]}" for k in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in report["videos"]:
        cells = [r["prompt"] or r["name"], f"{r['frames']} x {r['height']}x{r['width']}"]
        cells += [table[k][2].format(r["metrics"][k]) if k in r["metrics"] else "–" for k in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m apla.eval", formatter_class=DefaultsFormatter,
                      description="Score videos as APLA's tables do: FCI, warping error, CLIP frame consistency and "
                                  "text alignment, PSNR against the source, and the measures projects register.")
    p.add_argument("video", help="a GIF, an MP4/WebM/MOV, a folder of frames, or a folder of videos (a run's samples/)")
    p.add_argument("--prompt", default=None, help="the prompt of VIDEO (default: a run's own prompts, else none)")
    p.add_argument("--source", default=None,
                   help="the source clip, a path or a bundled clip's name (default: a run's own clip, else none)")
    p.add_argument("--clip-model", default=None,
                   help="a registered name ('micro'), a local CLIPModel folder or a hub id (downloads), or 'none' "
                        "(default: the bundled base model's, e.g. 'micro' for 64x64 videos, else none)")
    p.add_argument("--json", default=None, help="write the report here (default: only the table is printed)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    args = p.parse_args(argv)

    path = Path(args.video)
    if not path.exists():
        fail(f"{path}: no such file or folder")
    if args.json and Path(args.json).is_dir():
        fail(f"--json {args.json} is a folder; name the report's file")
    device = pick_device(args.device)
    prompts, cfg = run_prompts(path) if path.is_dir() else ({}, None)
    try:
        videos = find_videos(path)
        if args.prompt and len(videos) > 1:
            fail(f"--prompt names the prompt of one video; {path} holds {len(videos)}")
        items = []
        for name, read_from, video_file in videos:
            prompt = args.prompt or prompts.get(name)
            items.append({"name": name, "path": str(video_file), "prompt": prompt, "video": load(read_from, video_file)})
        source = args.source or (cfg.video if cfg else None)
        start, stride = (cfg.start, cfg.stride) if cfg and not args.source else (0, 1)
        clip = pick_clip(args.clip_model, [it["video"] for it in items], device)
        report = score_videos(items, source, cfg.prompt if cfg else None, start, stride, clip, device)
    except (VideoError, MetricsError) as e:
        fail(str(e).splitlines()[0])
    print(format_table(report))
    if report["clip_model"] is None:
        print("(no CLIP scores: pass --clip-model, e.g. a local openai/clip-vit-large-patch14 folder)", file=sys.stderr)
    if args.json:
        try:
            atomic_write_json(args.json, report)
        except OSError as e:
            fail(f"--json: {describe_os_error(e)}", code=1 if e.errno == errno.ENOSPC else 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
