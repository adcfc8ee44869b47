"""The consistency benchmark of the ablation study (`python -m apla.study`): a fixed, seeded set of shapes-world
source clips, each with its caption and two edits (another colour, another shape), the rule that picks the clips
the study uses, and the record of that choice (clips.json beside this file).

No APLA equation lives here. The default clip of the project (a red circle moving right on grey) is too easy to
tell variants apart: every variant gets it right in every frame. The candidates below make one-shot tuning harder
in the ways the paper's Fig. 1 is about, while staying inside what the micro model was pretrained on (one object
of the shapes world, 64 x 64):

- 12 frames (the default clip has 8);
- a straight path along an axis, a diagonal path, or a curved path (a quadratic Bezier arc that bends sideways);
- the object keeps its size, grows (x0.75 -> x1.25) or shrinks (x1.25 -> x0.75) over the clip;
- path lengths of 30-44 px over the 12 frames (up to 4 px per frame), the start jittered around the centre;
- a light neutral background, or one tinted a quarter of the way towards a palette colour.

`candidates(BENCH_SEED, NUM_CANDIDATES)` regenerates them identically from the seed. Captions use the words the
micro text encoder was trained on (`apla.micro.shapes.clip_caption`): the direction of the net displacement
(rounded to the 8 directions of `shapes.PATHS`) and "growing" when the object grows; a curve or a shrink is not put
in words, so the caption underdescribes those clips as a real caption would.

The selection rule (`select`) is applied to Tune-A-Video's results only (measured by `apla.eval.metrics`), at
100 steps of 12 frames and on a seed the study does not use (SELECTION_SEED). A candidate is in the benchmark when
the micro model can represent it (`representable`): the VAE's round trip of the source clip reads back with the
right colour and shape in every frame and a centroid path within REPRESENT_PATH_PX of the clip's, and Tune-A-Video's
sample of the source prompt shows an object in every frame. Every representable candidate is used (clips are the
study's unit: the more, the better its intervals). A first version of the study also asked for headroom (`headroom`:
Tune-A-Video short of the ceiling somewhere) and kept the first 4; the record still says where each candidate has
headroom, but no longer selects on it. `python -m apla.study select` runs the rule (`apla.study.selection`) and
writes `clips.json` beside this file: every candidate, its measures, whether it is in and why; candidates already
in the record are not run again.

The study trains and samples the first STUDY_FRAMES frames of each clip (the same per-frame motion as the 12, about
a third of the path), so that its runs fit its time budget on two CPU cores.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apla.checkpoint import atomic_write
from apla.cli import fail
from apla.micro.shapes import (EDGE_MARGIN, PALETTE, PATHS, SHAPES, Scene, clip_caption, random_background,
                               render_tensor, shape_extent)
from apla.video import to_uint8

BENCH_SEED = 2024  # the candidates' seed
NUM_CANDIDATES = 26  # the 18 (motion, size change, background) combinations once, then 8 more: >= 24 representable
NUM_FRAMES = 12
STUDY_FRAMES = 5  # frames of each clip the study trains on and samples (its time budget: <= 100 min on 2 cores)
SELECTION_SEED = 1000  # Tune-A-Video's run seed for the selection; the study's seed is 0
MOTIONS = ("axis", "diagonal", "arc")
SIZE_CHANGES = ("constant", "grow", "shrink")
PATH_LENGTH = (30.0, 44.0)  # px, uniform
BASE_SIZE = (7.0, 9.5)  # equivalent radius (px) at the middle of the clip, uniform
TINT = 0.25  # a tinted background moves this far from neutral grey towards a palette colour
MIN_COLOUR_GAP = 100.0  # RGB distance a background keeps from the object's colour and from its edit colour
REPRESENT_PATH_PX = 1.0
HEADROOM_PATH_PX = 1.0
HEADROOM_PSNR_DB = 25.0
HEADROOM_FLICKER = (2.0, 1.0, 0.1)  # short of ceiling: flicker > 2 x the VAE round trip's + 1 (colour) / + 0.1 (size)
RECORD = Path(__file__).resolve().parent / "clips.json"


@dataclass(frozen=True)
class ClipSpec:
    """One source clip: the object, its path (start -> end, bent sideways by `bend` px at the middle for an arc),
    its size at the first and last frame, the background, and the two edits."""

    name: str
    shape: str
    colour: str
    motion: str  # one of MOTIONS
    start: tuple[float, float]  # centroid (x, y) at the first frame, px
    end: tuple[float, float]  # centroid at the last frame
    bend: float  # arc: signed offset (px) of the path's midpoint from the chord's; 0 for straight paths
    sizes: tuple[float, float]  # equivalent radius at the first and last frame
    background: tuple[int, int, int]
    edit_colour: str
    edit_shape: str
    num_frames: int = NUM_FRAMES

    @property
    def direction(self) -> str:
        """The net displacement rounded to the nearest of shapes.PATHS' 8 directions."""
        dx, dy = self.end[0] - self.start[0], self.end[1] - self.start[1]
        return max(PATHS, key=lambda p: (PATHS[p][0] * dx + PATHS[p][1] * dy) / math.hypot(*PATHS[p]))

    @property
    def caption(self) -> str:
        return clip_caption(self.shape, self.colour, self.direction, grow=self.sizes[1] > self.sizes[0])

    @property
    def edits(self) -> tuple[str, str]:
        """(colour edit, shape edit): the caption with another colour, and with another shape."""
        grow = self.sizes[1] > self.sizes[0]
        return (clip_caption(self.shape, self.edit_colour, self.direction, grow),
                clip_caption(self.edit_shape, self.colour, self.direction, grow))

    def to_dict(self) -> dict:
        return {**asdict(self), "caption": self.caption, "edits": list(self.edits)}


def centroids(spec: ClipSpec) -> np.ndarray:
    """(F, 2) centroid path: P(u) = (1-u)^2 A + 2u(1-u) C + u^2 B, u = f / (F - 1), with the control point C put
    so that P(1/2) lies `bend` px from the chord's midpoint along its left normal (a straight line when bend = 0)."""
    a, b = np.asarray(spec.start), np.asarray(spec.end)
    chord = b - a
    normal = np.array([chord[1], -chord[0]]) / max(np.linalg.norm(chord), 1e-9)
    c = (a + b) / 2 + 2 * spec.bend * normal  # P(1/2) = (A + B)/4 + C/2 = midpoint + bend * normal
    u = np.linspace(0.0, 1.0, spec.num_frames)[:, None]  # (F, 1)
    return (1 - u) ** 2 * a + 2 * u * (1 - u) * c + u ** 2 * b


def scenes(spec: ClipSpec) -> list[Scene]:
    """The per-frame scenes of a clip; sizes change linearly from sizes[0] to sizes[1]."""
    sizes = np.linspace(*spec.sizes, spec.num_frames)
    return [Scene(spec.shape, spec.colour, float(x), float(y), float(s), background=spec.background)
            for (x, y), s in zip(centroids(spec), sizes)]


def render(spec: ClipSpec) -> torch.Tensor:
    """The clip's frames, (F, 3, 64, 64) float32 in [-1, 1]."""
    return torch.stack([render_tensor(s) for s in scenes(spec)])  # F x (3, H, W) -> (F, 3, H, W)


def write_frames(spec: ClipSpec, folder) -> Path:
    """The clip as a folder of PNG frames (000.png, 001.png, ...; lossless, read back by apla.video.read_video)."""
    folder = Path(folder)
    for i, frame in enumerate(to_uint8(render(spec))):
        atomic_write(folder / f"{i:03d}.png", lambda tmp, a=frame: Image.fromarray(a).save(tmp, format="PNG"))
    return folder


def _fits(shape: str, points: np.ndarray, sizes: np.ndarray, image_size: int = 64) -> bool:
    for (x, y), s in zip(points, sizes):
        left, right, top, bottom = shape_extent(shape, s)
        if x - left < EDGE_MARGIN or y - top < EDGE_MARGIN or x + right > image_size - EDGE_MARGIN \
                or y + bottom > image_size - EDGE_MARGIN:
            return False
    return True


def _colour_gap(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))


def candidate(seed: int, index: int) -> ClipSpec:
    """Candidate `index`: motion MOTIONS[i % 3], size change SIZE_CHANGES[(i + i // 3) % 3], a tinted background
    for odd i (so any 6 consecutive candidates vary all three and the 18 cover every combination once); everything
    else is drawn from np.random.default_rng([seed, index])."""
    rng = np.random.default_rng([seed, index])
    motion, change = MOTIONS[index % 3], SIZE_CHANGES[(index + index // 3) % 3]
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = tuple(PALETTE)[rng.integers(len(PALETTE))]
    background = random_background(rng)
    if index % 2:
        tints = [c for c in PALETTE if c != colour]
        tint = tints[rng.integers(len(tints))]
        background = tuple(int(round((1 - TINT) * g + TINT * p)) for g, p in zip(background, PALETTE[tint]))
    edit_colours = [c for c in PALETTE if c != colour and _colour_gap(PALETTE[c], background) >= MIN_COLOUR_GAP]
    edit_colour = edit_colours[rng.integers(len(edit_colours))]
    edit_shape = [s for s in SHAPES if s != shape][rng.integers(len(SHAPES) - 1)]
    directions = {"axis": ("right", "left", "up", "down"), "diagonal": ("up-right", "up-left", "down-right",
                                                                        "down-left")}.get(motion, tuple(PATHS))
    unit = np.asarray(PATHS[directions[rng.integers(len(directions))]], dtype=float)
    unit /= np.linalg.norm(unit)
    length = rng.uniform(*PATH_LENGTH)
    base = rng.uniform(*BASE_SIZE)
    sizes = {"constant": (base, base), "grow": (0.75 * base, 1.25 * base), "shrink": (1.25 * base, 0.75 * base)}[change]
    bend_share = rng.uniform(0.2, 0.3) * rng.choice([-1.0, 1.0]) if motion == "arc" else 0.0
    centre = 32.0 + rng.uniform(-3.0, 3.0, size=2)
    while True:  # shorten the path until every frame fits in the image
        a, b = centre - unit * length / 2, centre + unit * length / 2
        spec = ClipSpec(f"{index:02d}-{colour}-{shape}-{motion}-{change}", shape, colour, motion,
                        (round(float(a[0]), 2), round(float(a[1]), 2)), (round(float(b[0]), 2), round(float(b[1]), 2)),
                        round(bend_share * length, 2), (round(sizes[0], 2), round(sizes[1], 2)), background,
                        edit_colour, edit_shape)
        if _fits(shape, centroids(spec), np.linspace(*spec.sizes, spec.num_frames)) or length < 8:
            return spec
        length *= 0.9


def candidates(seed: int = BENCH_SEED, n: int = NUM_CANDIDATES) -> list[ClipSpec]:
    return [candidate(seed, i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# The selection rule (Tune-A-Video's results only)
# ---------------------------------------------------------------------------------------------------------------
def representable(vae: dict, tav: dict) -> list[str]:
    """Why the micro model cannot represent a candidate (empty: it can). vae: the shapes measures of the VAE's round
    trip of the clip against the clip (`apla.study.selection.vae_check`); tav: Tune-A-Video's measures per prompt
    kind."""
    why = []
    if vae["kept_right"] < 1.0:
        why.append(f"VAE round trip: colour and shape right in {100 * vae['kept_right']:.0f}% of frames")
    if not vae["path_error"] <= REPRESENT_PATH_PX:
        why.append(f"VAE round trip: centroid path {vae['path_error']:.2f} px off")
    if tav["source"]["object_found"] < 1.0:
        why.append(f"Tune-A-Video's source sample shows an object in {100 * tav['source']['object_found']:.0f}% "
                   "of frames")
    return why


def headroom(tav: dict, vae: dict) -> list[str]:
    """Where Tune-A-Video falls short of the ceiling on a candidate (empty: at ceiling, too easy). The ceiling of
    the flicker measures is what the VAE's round trip of the clip shows (the best the micro model can draw)."""
    short = []
    for kind in ("colour", "shape"):
        if tav[kind]["edited_right"] < 1.0:
            short.append(f"{kind} edit right in {100 * tav[kind]['edited_right']:.0f}% of frames")
        if tav[kind]["kept_right"] < 1.0:
            short.append(f"{kind} edit keeps the other attribute in {100 * tav[kind]['kept_right']:.0f}% of frames")
    factor, colour_add, size_add = HEADROOM_FLICKER
    for kind in ("source", "colour", "shape"):
        m = tav[kind]
        if not m["path_error"] <= HEADROOM_PATH_PX:
            short.append(f"{kind} sample's centroid path {m['path_error']:.2f} px off")
        if not m["colour_flicker"] <= factor * vae["colour_flicker"] + colour_add:
            short.append(f"{kind} sample's colour flicker {m['colour_flicker']:.1f} (VAE {vae['colour_flicker']:.1f})")
        if not m["size_flicker"] <= factor * vae["size_flicker"] + size_add:
            short.append(f"{kind} sample's size flicker {m['size_flicker']:.2f} px (VAE {vae['size_flicker']:.2f})")
    if not tav["source"]["psnr"] >= HEADROOM_PSNR_DB:
        short.append(f"source prompt reconstructed at {tav['source']['psnr']:.1f} dB")
    return short


def select(records: list[dict]) -> list[dict]:
    """Apply the rule to records (candidate order; each with "vae_check" and "tav"); returns them with "kept" (in
    the benchmark: representable) and "why" filled (why not, or where Tune-A-Video has headroom)."""
    out = []
    for r in records:
        cannot, short = representable(r["vae_check"], r["tav"]), headroom(r["tav"], r["vae_check"])
        why = ("; ".join(cannot) if cannot else "kept; " + ("headroom: " + "; ".join(short) if short
                                                             else "at ceiling: Tune-A-Video right everywhere"))
        out.append({**r, "kept": not cannot, "why": why})
    return out


def read_record(record=RECORD) -> dict:
    """The committed selection record (clips.json); one-line exit when it is missing."""
    if not Path(record).is_file():
        fail(f"{record}: no selection record; make it with python -m apla.study select")
    return json.loads(Path(record).read_text())


def benchmark_clips(record: dict) -> list[ClipSpec]:
    """The study's clips: the kept candidates of a selection record, regenerated from code."""
    specs = {s.name: s for s in candidates(record["seed"], record["num_candidates"])}
    return [specs[r["name"]] for r in record["candidates"] if r["kept"]]
