"""The shapes world: a procedural 64x64 scene renderer, its captions and moving-object clips.

This module is no part of the APLA paper ("APLA: Additional Perturbation for Latent Noise with Adversarial
Training Enables Consistency", AAAI 2024); it implements no equation of it. It gives the project a world whose
ground truth is known, so that a micro Stable Diffusion can be pretrained on it and the paper's whole recipe
(tune on one clip, edit it with a new prompt) can be run and *measured* on a laptop CPU: tune on "a red circle
moving to the right", ask for "a blue square moving to the right", and check with `evaluate_image` that a blue
square is drawn in every frame and that its centroid follows the source path.

The world
- A scene is one object on a light, neutral background (optionally with a faint, smooth, seeded texture).
- shape  in SHAPES  = circle, square, triangle (apex up), diamond (a square turned 45 degrees).
- colour in PALETTE = red, green, blue, yellow, purple, orange (saturated, far apart in RGB and from the background).
- size: the *equivalent radius* s, the radius of the circle of the same area, so every shape of size s covers
  pi * s^2 pixels and area never tells shapes apart.
- (x, y): the object's centroid (centre of mass of its area) in pixel units, x to the right and y downwards, with
  pixel (i, j) covering [j, j+1) x [i, i+1). Captions and the evaluator both speak about this point.
- Rendering is antialiased: coverage is computed on a 4x finer grid and averaged, and the image is
  background * (1 - coverage) + colour * coverage.

Position words split the image into thirds along each axis (POSITIONS): "top left", "top", "top right", "left",
"center", "right", "bottom left", "bottom", "bottom right"; the caption says "on the left", "at the top", "in the
center", "at the bottom right", ... `random_scene` draws the region first (so all nine are equally frequent) and
keeps the centroid at least `boundary_margin` pixels away from the thirds lines, so every caption is unambiguous.

The evaluator that reads a picture back into these terms is `apla.micro.shapes_eval`.

Example
    >>> scene = Scene("circle", "red", x=20.0, y=32.0, size=9.0)
    >>> caption(scene)
    'a red circle on the left'
    >>> render(scene).shape, render_tensor(scene).shape
    ((64, 64, 3), torch.Size([3, 64, 64]))
    >>> frames, scenes = render_clip("circle", "red", "right")   # frames: (F, 3, 64, 64) in [-1, 1]
"""

from __future__ import annotations

import math
import argparse
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from apla.video import write_gif

IMAGE_SIZE = 64  # pixels per side of every scene
SUPERSAMPLE = 4  # coverage is computed on a SUPERSAMPLE-times finer grid, then averaged (antialiasing)

# Saturated colours, pairwise >= 90 apart in RGB (0-255 units) and >= 150 from every background (tested).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 185),
    "orange": (245, 120, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond")

DEFAULT_BACKGROUND = (236, 236, 232)  # light warm grey
BACKGROUND_LEVEL = (215.0, 245.0)  # random backgrounds: grey level drawn uniformly in this range ...
BACKGROUND_TINT = 6.0  # ... plus a per-channel offset in [-BACKGROUND_TINT, BACKGROUND_TINT]
SIZE_RANGE = (7.0, 12.0)  # equivalent radius of random scenes, pixels
EDGE_MARGIN = 2.0  # the object's bounding box stays this many pixels inside the image

# Position words: (column, row) of the 3x3 grid of thirds -> word; the caption phrase for each word.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_POSITION_GRID = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "center": "in the center"}  # others: "at the ..."

# Clip paths: name -> unit steps (dx, dy) (y grows downwards) and the caption phrase.
PATHS: dict[str, tuple[int, int]] = {
    "right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1),
    "up-right": (1, -1), "up-left": (-1, -1), "down-right": (1, 1), "down-left": (-1, 1),
}
_PATH_PHRASE = {
    "right": "to the right", "left": "to the left", "up": "up", "down": "down",
    "up-right": "up and to the right", "up-left": "up and to the left",
    "down-right": "down and to the right", "down-left": "down and to the left",
}
DEFAULT_CLIP = dict(shape="circle", colour="red", path="right", num_frames=8, size=9.0, seed=0)


class ShapesError(ValueError):
    """Bad input to the shapes world (unknown shape/colour/path, an object that does not fit, ...)."""


# ----------------------------------------------------------------------------------------------------------------
# Scenes and rendering
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One object on a background. (x, y) is the object's centroid; size its equivalent radius (pixels)."""

    shape: str  # one of SHAPES
    colour: str  # one of PALETTE
    x: float  # centroid, pixels from the left edge
    y: float  # centroid, pixels from the top edge
    size: float  # equivalent radius: the object covers pi * size**2 pixels
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    texture: float = 0.0  # amplitude (0-255 units) of a smooth seeded background texture; 0 = plain
    texture_seed: int = 0
    image_size: int = IMAGE_SIZE

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ShapesError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in PALETTE:
            raise ShapesError(f"unknown colour {self.colour!r}; expected one of {tuple(PALETTE)}")
        if not self.size > 0:
            raise ShapesError(f"size must be positive, got {self.size!r}")


def shape_extent(shape: str, size: float) -> tuple[float, float, float, float]:
    """Bounding box of `shape` of equivalent radius `size` relative to its centroid: (left, right, top, bottom),
    each a non-negative distance in pixels."""
    if shape == "circle":
        return (size,) * 4
    if shape == "square":
        h = size * math.sqrt(math.pi) / 2  # half side: (2h)^2 = pi s^2
        return (h,) * 4
    if shape == "diamond":
        d = size * math.sqrt(math.pi / 2)  # half diagonal: 2 d^2 = pi s^2
        return (d,) * 4
    if shape == "triangle":
        a = size * math.sqrt(4 * math.pi / math.sqrt(3))  # equilateral side: (sqrt 3 / 4) a^2 = pi s^2
        r = a / math.sqrt(3)  # circumradius; the centroid sits r below the apex and r/2 above the base
        return (a / 2, a / 2, r, r / 2)
    raise ShapesError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Boolean: is the offset (dx, dy) from the centroid inside `shape` of equivalent radius `size`?"""
    if shape == "circle":
        return dx**2 + dy**2 <= size**2
    if shape == "square":
        h = shape_extent("square", size)[0]
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        d = shape_extent("diamond", size)[0]
        return np.abs(dx) + np.abs(dy) <= d
    if shape == "triangle":
        half, _, r, _ = shape_extent("triangle", size)
        # base: dy <= r/2; two sides through the apex (0, -r) and the base corners (+-half, r/2)
        return (dy <= r / 2) & (np.abs(dx) <= half * (dy + r) / (1.5 * r))
    raise ShapesError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(shape: str, x: float, y: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Antialiased coverage in [0, 1], (image_size, image_size) float64: the fraction of each pixel inside the
    shape, estimated on a SUPERSAMPLE x SUPERSAMPLE grid of sub-pixel centres."""
    n = image_size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / SUPERSAMPLE  # sub-pixel centres in pixel units
    inside = _inside(shape, c[None, :] - x, c[:, None] - y, size).astype(np.float64)  # (n, n), rows = y
    # (n, n) -> (H, S, W, S), average over the sub-pixels
    return inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))


def _background(scene: Scene) -> np.ndarray:
    """(H, W, 3) float64 background: the plain colour plus, if scene.texture > 0, a smooth seeded field
    (an 8x8 grid of N(0, 1) values, bilinearly upsampled) scaled by scene.texture."""
    n = scene.image_size
    bg = np.broadcast_to(np.asarray(scene.background, dtype=np.float64), (n, n, 3)).copy()
    if scene.texture > 0:
        rng = np.random.default_rng(scene.texture_seed)
        grid = rng.standard_normal((8, 8)).astype(np.float32)
        field = Image.fromarray(grid, mode="F").resize((n, n), Image.BILINEAR)
        bg += scene.texture * np.asarray(field, dtype=np.float64)[..., None]
    return bg


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 RGB image of shape (H, W, 3). Deterministic: same scene, same bytes."""
    alpha = coverage(scene.shape, scene.x, scene.y, scene.size, scene.image_size)[..., None]  # (H, W, 1)
    colour = np.asarray(PALETTE[scene.colour], dtype=np.float64)
    img = _background(scene) * (1 - alpha) + colour * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(img)).float() / 127.5 - 1.0
    return t.permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def render_tensor(scene: Scene) -> torch.Tensor:
    """The scene as a float32 tensor (3, H, W) in [-1, 1] (the VAE's input range)."""
    return to_tensor(render(scene))


# ----------------------------------------------------------------------------------------------------------------
# Captions and random scenes
# ----------------------------------------------------------------------------------------------------------------


def position_word(x: float, y: float, image_size: int = IMAGE_SIZE) -> str:
    """The POSITIONS word for a centroid: which third of the image it lies in, along each axis."""
    col = min(2, max(0, int(3 * x // image_size)))
    row = min(2, max(0, int(3 * y // image_size)))
    return _POSITION_GRID[(col, row)]


def position_phrase(word: str) -> str:
    """'left' -> 'on the left', 'center' -> 'in the center', 'top left' -> 'at the top left'."""
    if word not in POSITIONS:
        raise ShapesError(f"unknown position word {word!r}; expected one of {POSITIONS}")
    return _POSITION_PHRASE.get(word, f"at the {word}")


def caption(scene: Scene) -> str:
    """Plain-English caption, e.g. 'a red circle on the left', 'a blue square at the top right'."""
    return f"a {scene.colour} {scene.shape} {position_phrase(position_word(scene.x, scene.y, scene.image_size))}"


def random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light neutral colour: grey level in BACKGROUND_LEVEL plus a small per-channel tint."""
    level = rng.uniform(*BACKGROUND_LEVEL)
    return tuple(int(round(level + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT))) for _ in range(3))


def random_scene(rng: np.random.Generator, texture: float = 0.0, boundary_margin: float = 1.5,
                 image_size: int = IMAGE_SIZE) -> Scene:
    """A random scene: shape, colour and position word uniform; size uniform in SIZE_RANGE; the centroid uniform
    inside its third-cell, at least `boundary_margin` px from the cell's inner borders (so the caption is
    unambiguous), with the object's bounding box EDGE_MARGIN px inside the image; background from
    `random_background`; texture amplitude `texture` (0 = plain)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = tuple(PALETTE)[rng.integers(len(PALETTE))]
    word = POSITIONS[rng.integers(len(POSITIONS))]
    col, row = next(k for k, v in _POSITION_GRID.items() if v == word)
    third = image_size / 3
    for _ in range(100):
        size = rng.uniform(*SIZE_RANGE)
        left, right, top, bottom = shape_extent(shape, size)
        x_lo = max(col * third + (boundary_margin if col else 0), left + EDGE_MARGIN)
        x_hi = min((col + 1) * third - (boundary_margin if col < 2 else 0), image_size - right - EDGE_MARGIN)
        y_lo = max(row * third + (boundary_margin if row else 0), top + EDGE_MARGIN)
        y_hi = min((row + 1) * third - (boundary_margin if row < 2 else 0), image_size - bottom - EDGE_MARGIN)
        if x_lo < x_hi and y_lo < y_hi:
            break
    else:  # pragma: no cover - SIZE_RANGE always leaves room
        raise ShapesError(f"no room for a {shape} {word} in a {image_size}px image")
    return Scene(shape, colour, float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi)), float(size),
                 background=random_background(rng), texture=texture,
                 texture_seed=int(rng.integers(2**31)), image_size=image_size)


def sample_dataset(n: int, seed: int, texture: float = 0.0) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n random scenes from one seed: images (n, 3, H, W) float32 in [-1, 1], their captions, the scenes."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, texture=texture) for _ in range(n)]
    images = torch.stack([render_tensor(s) for s in scenes]) if scenes else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return images, [caption(s) for s in scenes], scenes


def parse_caption(text: str) -> dict:
    """Read back a caption of this world: dict(colour, shape, position, path, grow); absent parts are None/False.
    Works for image captions ('a red circle on the left') and clip captions ('a red circle moving to the right')."""
    words = text.lower()
    colour = next((c for c in PALETTE if re.search(rf"\b{c}\b", words)), None)
    shape = next((s for s in SHAPES if re.search(rf"\b{s}\b", words)), None)
    position = next((p for p in sorted(POSITIONS, key=len, reverse=True)
                     if re.search(rf"\b{re.escape(position_phrase(p))}\b", words)), None)
    path = next((p for p in sorted(PATHS, key=lambda p: len(_PATH_PHRASE[p]), reverse=True)
                 if re.search(rf"moving {re.escape(_PATH_PHRASE[p])}\b", words)), None)
    return dict(colour=colour, shape=shape, position=None if path else position, path=path,
                grow="growing" in words)


# ----------------------------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------------------------


def clip_scenes(shape: str, colour: str, path: str, num_frames: int = 8, size: float = 9.0, grow: bool = False,
                seed: int = 0, distance: float = 32.0, center: tuple[float, float] | None = None,
                image_size: int = IMAGE_SIZE) -> list[Scene]:
    """Per-frame scenes of one object moving in a straight line. The centroid goes from center - distance/2 * step
    to center + distance/2 * step at constant speed, step = PATHS[path] (diagonals move `distance` along each axis);
    with grow=True the size goes linearly from 0.75 * size to 1.25 * size. The background comes from `seed`."""
    if path not in PATHS:
        raise ShapesError(f"unknown path {path!r}; expected one of {tuple(PATHS)}")
    if num_frames < 2:
        raise ShapesError(f"num_frames must be >= 2, got {num_frames}")
    cx, cy = center if center is not None else (image_size / 2, image_size / 2)
    dx, dy = PATHS[path]
    background = random_background(np.random.default_rng(seed))
    scenes = []
    for f in range(num_frames):
        u = f / (num_frames - 1) - 0.5  # -0.5 .. 0.5 along the path
        s = size * (0.75 + 0.5 * (u + 0.5)) if grow else size
        scene = Scene(shape, colour, cx + u * distance * dx, cy + u * distance * dy, s, background=background,
                      image_size=image_size)
        left, right, top, bottom = shape_extent(shape, s)
        if (scene.x - left < 0 or scene.x + right > image_size or scene.y - top < 0 or scene.y + bottom > image_size):
            raise ShapesError(f"frame {f}: a {shape} of size {s:.1f} at ({scene.x:.1f}, {scene.y:.1f}) leaves the "
                              f"{image_size}px image; use a smaller size or distance")
        scenes.append(scene)
    return scenes


def render_clip(shape: str, colour: str, path: str, num_frames: int = 8, size: float = 9.0, grow: bool = False,
                seed: int = 0, **kwargs) -> tuple[torch.Tensor, list[Scene]]:
    """A clip of the object moving along `path`: frames (F, 3, H, W) float32 in [-1, 1] and the per-frame scenes.
    Arguments as `clip_scenes`."""
    scenes = clip_scenes(shape, colour, path, num_frames, size, grow, seed, **kwargs)
    return torch.stack([render_tensor(s) for s in scenes]), scenes  # F x (3, H, W) -> (F, 3, H, W)


def clip_caption(shape: str, colour: str, path: str, grow: bool = False) -> str:
    """'a red circle moving to the right'; with grow=True 'a red circle growing and moving to the right'."""
    if path not in PATHS:
        raise ShapesError(f"unknown path {path!r}; expected one of {tuple(PATHS)}")
    return f"a {colour} {shape} {'growing and ' if grow else ''}moving {_PATH_PHRASE[path]}"


def write_default_clip(path: str | os.PathLike) -> str:
    """Write the project's default source clip, DEFAULT_CLIP ('a red circle moving to the right', 8 frames),
    as a GIF at `path`; returns its caption. The shipped copy is apla/assets/shapes_red_circle_right.gif."""
    frames, _ = render_clip(**DEFAULT_CLIP)
    write_gif(frames, path, fps=10)
    return clip_caption(DEFAULT_CLIP["shape"], DEFAULT_CLIP["colour"], DEFAULT_CLIP["path"])


if __name__ == "__main__":
    argparse.ArgumentParser(prog="python -m apla.micro.shapes",
                            description="Regenerate apla/assets/shapes_red_circle_right.gif.").parse_args()
    target = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "shapes_red_circle_right.gif")
    print(write_default_clip(target), "->", target)
