"""The shapes world's evaluator: what a picture shows, read back in the world's terms (colour, shape, centroid,
size), the accuracies of pictures against their captions, and the measures of a generated video against its
known ground truth (`shapes_measures`). No part of the APLA paper. `shapes_measures` is registered as the measure
"shapes" of `python -m apla.eval` (entry-point group apla.measures in pyproject.toml): the library scores
shapes-world videos with it without importing this project.

The evaluator knows the renderer: it takes the median border pixel as the background, marks as object the pixels
whose colour is more than half-way from the background to the object (the connected blob around the strongest
pixel), estimates each pixel's coverage from its distance to the background, reads the colour as the palette entry
nearest the median interior colour, the centroid as the coverage-weighted mean pixel position, and the shape as the
template (same area, same centroid) whose coverage has the best soft IoU with the estimated coverage.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from PIL import Image

from apla.eval.metrics import check_video
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


# ---------------------------------------------------------------------------------------------------------------
# A generated video against the known ground truth (the measure "shapes" of python -m apla.eval)
# ---------------------------------------------------------------------------------------------------------------

def is_shapes_prompt(prompt: str | None) -> bool:
    """A caption of the shapes world: it names one of its colours and one of its shapes."""
    if not prompt:
        return False
    parsed = parse_caption(prompt)
    return parsed["colour"] is not None and parsed["shape"] is not None


def shapes_measures(video: torch.Tensor, prompt: str | None, source: torch.Tensor | None = None) -> dict | None:
    """On a shapes-world video (F, 3, H, W) in [-1, 1], what `evaluate_image` reads frame by frame; None when the
    prompt is not a caption of the world (`is_shapes_prompt`), or when H != W: the world's scenes, and the templates
    and position thirds `evaluate_image` reads them with, are square (a run at a non-square --size is not scored
    here):

    - edited_right: for the attributes (colour, shape) the prompt sets differently from the source clip's object
      (read from the source's frames), the fraction of frames where all of them are as the prompt says;
    - kept_right: for the attributes the prompt names as in the source, the fraction of frames that kept them;
    - path_error: mean distance (px) between the object's centroid and the source's, frame by frame
      (frames where either shows no object are skipped);
    - colour_flicker: mean over adjacent frames of the RGB distance (0-255) between the object's median colours;
    - size_flicker: mean over frames of |s_{k+1} - 2 s_k + s_{k-1}| of the equivalent radius s (px), so a steadily
      growing object counts zero and a size that jumps back and forth does not (the flicker of the paper's Fig. 1);
    - object_found: the fraction of frames where an object is found.
    Measures that need the source are left out without one; those that need two (three) frames with an object,
    without them. Returns a dict of floats, and `edited`: the names of the edited attributes (with a source)."""
    if not is_shapes_prompt(prompt):
        return None
    check_video(video, least=1)
    if video.shape[-2] != video.shape[-1]:
        return None
    reads = [evaluate_image(frame) for frame in video]
    found = [r for r in reads if r["colour"] is not None]
    out = {"object_found": len(found) / len(reads)}
    want = parse_caption(prompt)
    if source is not None:
        src_reads = [evaluate_image(frame) for frame in source]
        src = {k: Counter(r[k] for r in src_reads if r[k] is not None).most_common(1) for k in ("colour", "shape")}
        src = {k: v[0][0] if v else None for k, v in src.items()}
        edited = [k for k in ("colour", "shape") if want[k] is not None and want[k] != src[k]]
        kept = [k for k in ("colour", "shape") if want[k] is not None and k not in edited]
        if edited:
            out["edited_right"] = sum(all(r[k] == want[k] for k in edited) for r in reads) / len(reads)
        if kept:
            out["kept_right"] = sum(all(r[k] == want[k] for k in kept) for r in reads) / len(reads)
        out["edited"] = edited
        dists = [math.dist(r["centroid"], s["centroid"]) for r, s in zip(reads, src_reads)
                 if r["centroid"] is not None and s["centroid"] is not None]
        if dists:
            out["path_error"] = sum(dists) / len(dists)
    rgb = [r["rgb"] for r in reads if r["rgb"] is not None]
    if len(rgb) >= 2:
        # $$\tfrac{1}{F-1}\sum_k \|c_{k+1} - c_k\|_2$$
        out["colour_flicker"] = sum(math.dist(a, b) for a, b in zip(rgb, rgb[1:])) / (len(rgb) - 1)
    size = [r["size"] for r in reads if r["size"] is not None]
    if len(size) >= 3:
        # $$\tfrac{1}{F-2}\sum_k |s_{k+1} - 2 s_k + s_{k-1}|$$
        out["size_flicker"] = sum(abs(a - 2 * b + c) for a, b, c in zip(size, size[1:], size[2:])) / (len(size) - 2)
    return out


# python -m apla.eval's table columns of these measures: name -> (title, direction, format, what it is)
shapes_measures.columns = {
    "edited_right": ("edit right", "↑", "{:.0%}", "fraction of frames whose edited attribute is the prompt's"),
    "kept_right": ("kept", "↑", "{:.0%}", "fraction of frames whose unedited attribute stayed as in the source"),
    "path_error": ("path px", "↓", "{:.2f}", "mean distance of the object's centroid from the source's"),
    "colour_flicker": ("colour flicker", "↓", "{:.2f}", "mean RGB change (0-255) of the object between frames"),
    "size_flicker": ("size flicker", "↓", "{:.3f}", "mean |second difference| of the object's radius, px"),
}
