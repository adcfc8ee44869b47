"""Tests for apla/micro/shapes.py (the procedural shapes world, its captions and clips) and apla/micro/shapes_eval.py
(its evaluator)."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageSequence

from apla import assets as bundled
from apla.micro import shapes as S
from apla.micro import shapes_eval as E


def path_distance(path_a, path_b) -> float:
    """Mean Euclidean distance (pixels) between corresponding points of two (F, 2) paths."""
    a, b = np.asarray(path_a, dtype=np.float64), np.asarray(path_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"paths must both be (F, 2); got {a.shape} and {b.shape}")
    return float(np.linalg.norm(a - b, axis=1).mean())


@pytest.fixture(scope="module")
def dataset():
    return S.sample_dataset(200, seed=1)


def degrade(x: torch.Tensor, blur_radius: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur (PIL, radius in px) then N(0, sigma^2) noise in [0, 1] units; (3, H, W) in [-1, 1]."""
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    blurred = np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(blur_radius)), dtype=np.float32) / 255
    b = torch.from_numpy(blurred).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return (b + sigma * torch.randn(b.shape, generator=gen)).clamp(0, 1) * 2 - 1


def test_palette_separable_and_far_from_background():
    colours = {k: np.asarray(v, float) for k, v in S.PALETTE.items()}
    assert min(np.linalg.norm(colours[a] - colours[b]) for a, b in itertools.combinations(colours, 2)) >= 90
    lo, hi = S.BACKGROUND_LEVEL[0] - S.BACKGROUND_TINT, S.BACKGROUND_LEVEL[1] + S.BACKGROUND_TINT
    corners = [np.asarray(c, float) for c in itertools.product((lo, hi), repeat=3)]
    # distance to a box is at least the distance to its nearest point; check corners and the clipped projection
    for c in colours.values():
        nearest = np.clip(c, lo, hi)
        assert np.linalg.norm(c - nearest) >= 150, c
        assert all(np.linalg.norm(c - k) >= 150 for k in corners)


def test_render_deterministic_under_seed():
    a, ca, sa = S.sample_dataset(6, seed=7, texture=5.0)
    b, cb, sb = S.sample_dataset(6, seed=7, texture=5.0)
    c, _, _ = S.sample_dataset(6, seed=8, texture=5.0)
    assert torch.equal(a, b) and ca == cb and sa == sb
    assert not torch.equal(a, c)
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1


def test_render_matches_geometry():
    # coverage integrates to the shape's area pi * s^2 and its centre of mass is the scene's (x, y), up to the
    # sub-pixel grid: each straight edge snaps by at most half a sub-pixel, so the centroid by at most that much
    tol = 0.5 / S.SUPERSAMPLE + 1e-9
    for shape in S.SHAPES:
        scene = S.Scene(shape, "blue", x=30.3, y=33.7, size=10.0)
        cov = S.coverage(shape, scene.x, scene.y, scene.size)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        assert cov.sum() == pytest.approx(math.pi * 100, rel=0.03), shape
        assert (cov * xs).sum() / cov.sum() == pytest.approx(30.3, abs=tol), shape
        assert (cov * ys).sum() / cov.sum() == pytest.approx(33.7, abs=tol), shape
        img = S.render(scene)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert tuple(img[0, 0]) == S.DEFAULT_BACKGROUND
        assert tuple(img[34, 30]) == S.PALETTE["blue"]
        t = S.render_tensor(scene)
        assert torch.allclose(t, torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="hexagon"):
        S.Scene("hexagon", "red", 32, 32, 8)
    with pytest.raises(ValueError, match="magenta"):
        S.Scene("circle", "magenta", 32, 32, 8)
    with pytest.raises(ValueError, match="sideways"):
        S.render_clip("circle", "red", "sideways")
    with pytest.raises(ValueError, match="leaves"):
        S.render_clip("circle", "red", "right", size=20)


def test_caption_matches_scene(dataset):
    _, captions, scenes = dataset
    for text, scene in zip(captions, scenes):
        assert text.startswith(f"a {scene.colour} {scene.shape} ")
        col, row = int(scene.x // (64 / 3)), int(scene.y // (64 / 3))
        horizontal = ["left", "", "right"][col]
        vertical = ["top", "", "bottom"][row]
        if horizontal and vertical:
            assert text.endswith(f"at the {vertical} {horizontal}")
        elif horizontal:
            assert text.endswith(f"on the {horizontal}")
        elif vertical:
            assert text.endswith(f"at the {vertical}")
        else:
            assert text.endswith("in the center")
        parsed = S.parse_caption(text)
        assert (parsed["colour"], parsed["shape"]) == (scene.colour, scene.shape)
        assert parsed["position"] == S.position_word(scene.x, scene.y)
    # all nine position words and all shapes/colours occur
    assert {S.position_word(s.x, s.y) for s in scenes} == set(S.POSITIONS)
    assert {s.shape for s in scenes} == set(S.SHAPES) and {s.colour for s in scenes} == set(S.PALETTE)
    assert S.caption(S.Scene("square", "blue", 32, 8, 6)) == "a blue square at the top"


def test_evaluator_on_clean_scenes(dataset):
    images, captions, scenes = dataset
    results = [E.evaluate_image(x) for x in images]
    colour = np.mean([r["colour"] == s.colour for r, s in zip(results, scenes)])
    shape = np.mean([r["shape"] == s.shape for r, s in zip(results, scenes)])
    position = np.mean([r["position"] == S.position_word(s.x, s.y) for r, s in zip(results, scenes)])
    err = np.array([math.dist(r["centroid"], (s.x, s.y)) for r, s in zip(results, scenes)])
    assert colour == 1.0
    assert shape >= 0.98
    assert position >= 0.98
    assert err.max() < 1.0
    # uint8 input gives the same answer; score_images agrees with the per-image results
    r0 = E.evaluate_image(S.render(scenes[0]))
    assert (r0["colour"], r0["shape"]) == (results[0]["colour"], results[0]["shape"])
    scores = E.score_images(images, captions)
    assert scores["colour"] == colour and scores["shape"] == shape and scores["position"] == position


def test_evaluator_robust_to_noise_and_blur(dataset):
    images, _, scenes = dataset
    gen = torch.Generator().manual_seed(0)
    noisy = [degrade(x, blur_radius=1.0, sigma=0.05, gen=gen) for x in images]
    scores = E.score_images(noisy, scenes)
    assert scores["colour"] >= 0.95
    assert scores["shape"] >= 0.90
    assert scores["position"] >= 0.95
    assert scores["centroid_error"] < 1.0


def test_evaluator_on_textured_background():
    images, _, scenes = S.sample_dataset(50, seed=3, texture=6.0)
    scores = E.score_images(images, scenes)
    assert scores["colour"] == 1.0 and scores["shape"] >= 0.95 and scores["centroid_error"] < 1.0


def test_evaluator_finds_nothing_on_plain_image():
    blank = np.full((64, 64, 3), 230, dtype=np.uint8)
    assert E.evaluate_image(blank)["shape"] is None
    assert np.isnan(E.centroid_path(np.stack([blank, blank]))).all()


@pytest.mark.parametrize("path", list(S.PATHS))
def test_clip_moves_in_asked_direction(path):
    frames, scenes = S.render_clip("triangle", "green", path, num_frames=8, size=7.0, seed=2)
    assert frames.shape == (8, 3, 64, 64) and len(scenes) == 8
    measured = E.centroid_path(frames)
    truth = np.array([(s.x, s.y) for s in scenes])
    assert path_distance(measured, truth) < 0.5
    steps = np.diff(measured, axis=0)  # (F-1, 2)
    dx, dy = S.PATHS[path]
    for axis, sign in ((0, dx), (1, dy)):
        if sign:
            assert (np.sign(steps[:, axis]) == sign).all(), (path, axis)
        else:
            assert np.abs(measured[:, axis] - measured[0, axis]).max() < 0.5, (path, axis)
    assert E.attribute_accuracy(frames, colour="green", shape="triangle") == 1.0
    assert S.parse_caption(S.clip_caption("triangle", "green", path))["path"] == path
    # the (1, 3, F, H, W) video layout gives the same path
    video = frames.permute(1, 0, 2, 3)[None]  # (F, 3, H, W) -> (1, 3, F, H, W)
    assert np.allclose(E.centroid_path(video), measured)


def test_clip_grow_and_caption():
    frames, scenes = S.render_clip("square", "purple", "down", grow=True)
    sizes = [E.evaluate_image(f)["size"] for f in frames]
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1] / sizes[0] == pytest.approx(scenes[-1].size / scenes[0].size, rel=0.05)
    assert S.clip_caption("square", "purple", "down", grow=True) == "a purple square growing and moving down"
    assert S.clip_caption("circle", "red", "right") == "a red circle moving to the right"


def test_path_distance():
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert path_distance(a, a + [3.0, 4.0]) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        path_distance(a, a[:1])


def test_default_clip_gif(tmp_path):
    target = tmp_path / "clip.gif"
    text = S.write_default_clip(target)
    assert text == "a red circle moving to the right"
    with Image.open(target) as gif:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
    results = [E.evaluate_image(f) for f in frames]
    assert all(r["colour"] == "red" and r["shape"] == "circle" for r in results)
    xs = [r["centroid"][0] for r in results]
    assert all(b > a for a, b in zip(xs, xs[1:]))
    clip, scenes = S.render_clip(**S.DEFAULT_CLIP)
    assert path_distance(E.centroid_path(frames), [(s.x, s.y) for s in scenes]) < 0.5
    # fewer than 256 colours per frame, so the GIF is lossless: its frames are the rendered clip exactly
    rendered = [S.render(s) for s in scenes]
    assert all(len(np.unique(r.reshape(-1, 3), axis=0)) < 256 for r in rendered)
    assert all(np.array_equal(a, b) for a, b in zip(frames, rendered))
    assert torch.equal(clip, torch.stack([S.to_tensor(r) for r in rendered]))
    # the shipped asset is this clip
    shipped = bundled.CLIPS["red-circle-right"]
    with Image.open(shipped) as gif:
        shipped_frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert len(shipped_frames) == 8 and all(np.array_equal(a, b) for a, b in zip(rendered, shipped_frames))


def test_module_docstring_example():
    import doctest

    result = doctest.testmod(S)
    assert result.attempted >= 4 and result.failed == 0
