"""The shapes world's measures of a generated video (apla.micro.shapes_eval.shapes_measures, the measure "shapes" of
python -m apla.eval) on clips whose answers are known."""
import torch

from apla.micro.shapes import render_clip
from apla.micro.shapes_eval import is_shapes_prompt, shapes_measures


def test_shapes_measures_on_known_clips():
    source, _ = render_clip("circle", "red", "right")
    blue, _ = render_clip("circle", "blue", "right")
    m = shapes_measures(blue, "a blue circle moving to the right", source)
    assert m["edited"] == ["colour"] and m["edited_right"] == 1.0 and m["kept_right"] == 1.0
    assert m["path_error"] < 0.5 and m["object_found"] == 1.0
    assert m["colour_flicker"] < 2.0 and m["size_flicker"] < 0.1
    left, _ = render_clip("square", "red", "left")
    m = shapes_measures(left, "a red square moving to the right", source)
    assert m["edited"] == ["shape"] and m["edited_right"] == 1.0 and m["path_error"] > 10
    growing, _ = render_clip("circle", "red", "right", grow=True)
    assert shapes_measures(growing, "a red circle moving to the right")["size_flicker"] < 0.1  # steady growth


def test_shapes_flicker_is_caught():
    """Colour and size that jump from frame to frame (Fig. 1's flicker) against a steady clip."""
    steady, _ = render_clip("circle", "blue", "right")
    sizes = [9.0, 11.0] * 4
    jumpy = torch.stack([render_clip("circle", "blue" if k % 2 else "purple", "right", size=s)[0][k]
                         for k, s in enumerate(sizes)])
    calm, jumpy_m = shapes_measures(steady, "a blue circle"), shapes_measures(jumpy, "a blue circle")
    assert jumpy_m["colour_flicker"] > 50 > calm["colour_flicker"]
    assert jumpy_m["size_flicker"] > 2.0 > 20 * calm["size_flicker"]
    assert "path_error" not in calm and "edited_right" not in calm  # no source: nothing to compare with


def test_only_captions_of_the_world_are_measured():
    clip, _ = render_clip("circle", "red", "right")
    assert is_shapes_prompt("a blue square moving to the right") and not is_shapes_prompt("a rabbit on a hill")
    assert not is_shapes_prompt(None) and not is_shapes_prompt("a blue cat")
    assert shapes_measures(clip, "a rabbit stretching on a hill", clip) is None
    assert shapes_measures(clip, None) is None


def test_a_non_square_video_is_not_measured():
    """The world's scenes are square: a clip cropped to 48 x 64 (a run at --size 48x64) gets no shapes measures, the
    same clip left square does."""
    clip, _ = render_clip("circle", "red", "right")  # (F, 3, 64, 64)
    assert shapes_measures(clip[..., 8:56, :], "a red circle moving to the right") is None  # (F, 3, 48, 64)
    assert shapes_measures(clip, "a red circle moving to the right")["object_found"] == 1.0
