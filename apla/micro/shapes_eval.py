"""The shapes world's evaluator: what a picture shows, read back in the world's terms (colour, shape, centroid,
size), and the accuracies of pictures against their captions. No part of the APLA paper; it is what lets the
project measure a generated video against a known ground truth (`apla.eval.metrics.shapes_measures`).

The evaluator knows the renderer: it takes the median border pixel as the background, marks as object the pixels
whose colour is more than half-way from the background to the object (the connected blob around the strongest
pixel), estimates each pixel's coverage from its distance to the background, reads the colour as the palette entry
nearest the median interior colour, the centroid as the coverage-weighted mean pixel position, and the shape as the
template (same area, same centroid) whose coverage has the best soft IoU with the estimated coverage.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from apla.micro.shapes import PALETTE, SHAPES, Scene, ShapesError, coverage, parse_caption, position_word

# Evaluator thresholds (Euclidean RGB distance from the background, 0-255 units).
MIN_CONTRAST = 40.0  # a pixel set peaking below this is "no object"
MASK_LEVEL = 0.5  # object pixels: distance > MASK_LEVEL * the object's interior distance (half coverage)


def to_rgb255(img) -> np.ndarray:
    """Accept a uint8 (H, W, 3) array, a PIL image, or a float array/tensor in [-1, 1] shaped (3, H, W) or
    (H, W, 3); return float64 (H, W, 3) in 0-255 units."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().to(torch.float64).numpy()
    img = np.asarray(img)
    if img.ndim != 3 or 3 not in (img.shape[0], img.shape[-1]):
        raise ShapesError(f"expected an image shaped (3, H, W) or (H, W, 3), got {tuple(img.shape)}")
    if img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    return (np.clip(img.astype(np.float64), -1, 1) + 1) * 127.5


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """8-neighbour binary dilation, `steps` times."""
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = np.zeros_like(mask)
        for i in range(3):
            for j in range(3):
                mask |= p[i:i + mask.shape[0], j:j + mask.shape[1]]
    return mask


def _component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 8-connected component of `mask` containing the pixel `seed` (grown by repeated dilation)."""
    comp = np.zeros_like(mask)
    comp[seed] = True
    while True:
        grown = _dilate(comp) & mask
        if (grown == comp).all():
            return comp
        comp = grown


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication."""
    p = np.pad(a, 1, mode="edge")
    return sum(p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3)) / 9


def object_mask(img) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """Segment the object: returns (mask (H, W) bool, dist (H, W), background (3,), level) or None if the image
    holds no object. dist is each pixel's RGB distance from the background (median of the 1-px border); level is
    the object's interior distance; mask = the blob around the strongest pixel with dist > MASK_LEVEL * level."""
    rgb = to_rgb255(img)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (4H - 4, 3)
    background = np.median(border, axis=0)
    dist = np.linalg.norm(rgb - background, axis=-1)  # (H, W)
    smooth = _box3(dist)  # only to pick the blob, robust to single noisy pixels
    peak = np.unravel_index(np.argmax(smooth), smooth.shape)
    if smooth[peak] < MIN_CONTRAST:
        return None
    # first pass: half the peak; then the blob's median distance is the interior level
    blob = _component(smooth > MASK_LEVEL * smooth[peak], peak)
    level = float(np.median(dist[blob]))
    mask = _component(dist > MASK_LEVEL * level, peak) if dist[peak] > MASK_LEVEL * level else blob
    level = float(np.median(dist[mask]))
    return mask, dist, background, level


def evaluate_image(img) -> dict:
    """Read a scene back from an image (uint8 (H, W, 3), or [-1, 1] (3, H, W) tensor/array).

    Returns dict(colour, shape, centroid=(x, y), position, size, shape_iou, rgb); all None when no object is found.
    - colour: the PALETTE entry nearest (RGB) the median colour of the mask's interior (mask eroded by one pixel
      when that leaves any pixel); rgb: that median colour itself, (r, g, b) in 0-255 units;
    - centroid: sum(w * pixel centre) / sum(w), w = clip(dist / level, 0, 1) on the mask dilated by 2 px;
    - size: the equivalent radius sqrt(area / pi), area = sum(w);
    - shape: argmax over SHAPES of the soft IoU sum(min(w, c)) / sum(max(w, c)) between w and the coverage c of
      that shape rendered with the same centroid and area;
    - position: position_word(centroid)."""
    none = dict(colour=None, shape=None, centroid=None, position=None, size=None, shape_iou=None, rgb=None)
    seg = object_mask(img)
    if seg is None:
        return none
    mask, dist, _, level = seg
    n_rows, n_cols = mask.shape
    rgb = to_rgb255(img)

    interior = ~_dilate(~mask)  # one-pixel erosion
    if not interior.any():
        interior = mask
    median = np.median(rgb[interior], axis=0)
    names = list(PALETTE)
    colours = np.asarray([PALETTE[c] for c in names], dtype=np.float64)
    colour = names[int(np.argmin(np.linalg.norm(colours - median, axis=1)))]

    w = np.clip(dist / level, 0, 1) * _dilate(mask, 2)
    area = float(w.sum())
    ys, xs = np.mgrid[0:n_rows, 0:n_cols] + 0.5  # pixel centres
    cx, cy = float((w * xs).sum() / area), float((w * ys).sum() / area)
    size = math.sqrt(area / math.pi)

    ious = {}
    for shape in SHAPES:
        template = coverage(shape, cx, cy, size, image_size=n_rows)
        # soft IoU of coverages: edge pixels near half coverage count partly instead of flipping whole rows
        ious[shape] = float(np.minimum(template, w).sum() / np.maximum(template, w).sum())
    shape = max(ious, key=ious.get)
    return dict(colour=colour, shape=shape, centroid=(cx, cy), position=position_word(cx, cy, n_rows),
                size=size, shape_iou=ious[shape], rgb=tuple(float(c) for c in median))


def centroid_path(frames) -> np.ndarray:
    """Per-frame object centroids, (F, 2) float64 (x, y); NaN where a frame shows no object. `frames` is a
    (F, 3, H, W) tensor/array in [-1, 1], a (1, 3, F, H, W) video tensor, or a sequence of images."""
    if isinstance(frames, (torch.Tensor, np.ndarray)) and frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ShapesError(f"centroid_path takes one video, got a batch of {frames.shape[0]}")
        frames = frames[0].transpose(0, 1) if isinstance(frames, torch.Tensor) else frames[0].swapaxes(0, 1)
        # (1, 3, F, H, W) -> (F, 3, H, W)
    path = []
    for frame in frames:
        c = evaluate_image(frame)["centroid"]
        path.append(c if c is not None else (math.nan, math.nan))
    return np.asarray(path, dtype=np.float64).reshape(-1, 2)


def path_distance(path_a, path_b) -> float:
    """Mean Euclidean distance (pixels) between corresponding points of two (F, 2) paths."""
    a, b = np.asarray(path_a, dtype=np.float64), np.asarray(path_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2:
        raise ShapesError(f"paths must both be (F, 2); got {a.shape} and {b.shape}")
    return float(np.linalg.norm(a - b, axis=1).mean())


def attribute_accuracy(frames, colour: str | None = None, shape: str | None = None) -> float:
    """Fraction of frames whose evaluated colour (if given) and shape (if given) both match."""
    results = [evaluate_image(f) for f in frames]
    ok = [(colour is None or r["colour"] == colour) and (shape is None or r["shape"] == shape) for r in results]
    return float(np.mean(ok))


def score_images(images, targets) -> dict:
    """Accuracies of images against what they should show: targets are Scenes or captions (parse_caption).
    Returns dict(colour, shape, position) fractions, and centroid_error (mean px; only for Scene targets)."""
    hits = {"colour": [], "shape": [], "position": []}
    errors = []
    for img, target in zip(images, targets, strict=True):
        r = evaluate_image(img)
        if isinstance(target, Scene):
            want = dict(colour=target.colour, shape=target.shape,
                        position=position_word(target.x, target.y, target.image_size))
            if r["centroid"] is not None:
                errors.append(math.dist(r["centroid"], (target.x, target.y)))
        else:
            want = parse_caption(target)
        for key in hits:
            hits[key].append(r[key] == want[key])
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["centroid_error"] = float(np.mean(errors)) if errors else math.nan
    return out
