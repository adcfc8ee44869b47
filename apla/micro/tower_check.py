"""Does the micro CLIP see what is drawn? Its zero-shot colour and shape of each frame against the rule-based reading
of the same frame (`apla.micro.shapes_eval.evaluate_image`), the shapes world's ground truth reader.

Not part of APLA (AAAI 2024). The micro CLIP (`apla.micro.image_tower`) scores the CLIP columns of a micro run, but it
was trained on rendered frames only, and a run's samples are decoded from generated latents: off the distribution it
learned. This check tells whether its judgement still holds there, frame by frame:

    frames (N, 3, H, W) in [-1, 1] --micro CLIP--> p(caption | frame) over every caption of the world (N, 408)
        --summed over the captions naming each colour (shape)--> zero-shot colour, shape
    frames --evaluate_image--> the rule's colour, shape (None where it finds no object)
    agreement = the fraction of the frames with an object where the two agree

    python -m apla.micro.tower_check runs/apla/samples   # a GIF, a frames folder, or a folder of videos
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from apla.cli import OneLineParser, fail
from apla.eval.score import find_videos, load
from apla.micro import shapes
from apla.micro.image_tower import MicroCLIP, clip_captions, load_micro_clip, scene_captions
from apla.micro.shapes_eval import evaluate_image
from apla.video import VideoError


def world_captions() -> list[str]:
    """The prompts of the zero-shot classifier: every caption the tower was trained with, the 216 scene captions
    ("a red circle on the left") and the 192 clip captions ("a red circle moving to the right")."""
    return scene_captions() + clip_captions()


def attribute_matrix(captions: list[str], key: str, names) -> torch.Tensor:
    """(P, K) one-hot: caption p names the attribute value names[k] (key: "colour" or "shape")."""
    parsed = [shapes.parse_caption(c)[key] for c in captions]
    return torch.tensor([[float(v == n) for n in names] for v in parsed])  # (P, K)


@torch.no_grad()
def zero_shot(frames: torch.Tensor, clip: MicroCLIP) -> tuple[list[str], list[str]]:
    """The micro CLIP's colour and shape of each frame (N, 3, H, W) in [-1, 1].

    p(caption | frame) = softmax over the world's captions (`world_captions`) of the tower's learned inverse
    temperature times the cosine; a colour's probability is the sum over the captions that name it, and the
    frame's colour is the most probable one (the same for shapes). A choice: the tower was trained on whole captions,
    never on a bare "red" or "a circle", so the classes are read from the captions it knows rather than from new
    prompts; summing over position and path keeps them out of the answer."""
    captions = world_captions()
    text = F.normalize(clip.text_features(captions), dim=-1)  # (P, D)
    image = F.normalize(clip.image_features(frames), dim=-1)  # (N, D)
    # $$p(c \mid x) = \mathrm{softmax}_c(\tau^{-1} \cos(E_{img}(x), E_{txt}(c)))$$
    prob = (clip.logit_scale.exp() * image @ text.T).softmax(-1)  # (N, P)
    colours, kinds = list(shapes.PALETTE), list(shapes.SHAPES)
    colour = prob @ attribute_matrix(captions, "colour", colours).to(prob)  # (N, 6)
    shape = prob @ attribute_matrix(captions, "shape", kinds).to(prob)  # (N, 4)
    return [colours[i] for i in colour.argmax(1).tolist()], [kinds[i] for i in shape.argmax(1).tolist()]


def tower_check(frames: torch.Tensor, clip: MicroCLIP | None = None) -> dict:
    """Agreement of the micro CLIP's zero-shot reading (`zero_shot`) with the rule's (`evaluate_image`) on frames
    (N, 3, H, W) in [-1, 1]. Returns dict(colour, shape, found, frames): the fractions of the `found` frames (those
    where the rule finds an object) whose colour (shape) both read alike, NaN when there is none, and N. Frames
    where the rule finds no object have no ground truth and are left out. `clip`: the shipped micro CLIP by
    default."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise shapes.ShapesError(f"expected frames (N, 3, H, W) in [-1, 1], got {shape}")
    clip = clip if clip is not None else load_micro_clip()
    tower_colour, tower_shape = zero_shot(frames, clip)
    rule = [evaluate_image(f) for f in frames]
    pairs = [(r, c, s) for r, c, s in zip(rule, tower_colour, tower_shape) if r["colour"] is not None]
    n = len(pairs)
    return {"colour": sum(r["colour"] == c for r, c, _ in pairs) / n if n else math.nan,
            "shape": sum(r["shape"] == s for r, _, s in pairs) / n if n else math.nan,
            "found": n, "frames": int(frames.shape[0])}


def to_markdown(rows: list[tuple[str, dict]]) -> str:
    """One table row per (name, tower_check result), and the frames of all of them pooled."""
    def row(name, r):
        pct = (lambda v: "–" if math.isnan(v) else f"{100 * v:.1f}%")  # noqa: E731
        return f"| {name} | {r['frames']} | {r['found']} | {pct(r['colour'])} | {pct(r['shape'])} |"

    found = sum(r["found"] for _, r in rows)
    pooled = {"frames": sum(r["frames"] for _, r in rows), "found": found,
              **{k: sum(r[k] * r["found"] for _, r in rows if r["found"]) / found if found else math.nan
                 for k in ("colour", "shape")}}
    lines = ["| video | frames | object found | colour agrees | shape agrees |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(lines + [row(n, r) for n, r in rows] + ([row("all", pooled)] if len(rows) > 1 else []))


def main(argv=None) -> int:
    """Print the check for a video, a frames folder or a folder of videos (a run's samples/, read as
    `python -m apla.eval` reads it); bad input is one line and exit status 2."""
    p = OneLineParser(prog="python -m apla.micro.tower_check", description=__doc__.split("\n\n")[0])
    p.add_argument("video", help="a GIF, an MP4/WebM/MOV, a folder of frames, or a folder of videos (a run's samples/)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.video)
    if not path.exists():
        fail(f"{path}: no such file or folder")
    clip = load_micro_clip()
    rows = []
    try:
        for name, read_from, video_file in find_videos(path):
            rows.append((name, tower_check(load(read_from, video_file), clip)))
    except (VideoError, shapes.ShapesError) as e:
        fail(str(e))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
