"""Tests of apla/video.py: reading clips (frames folder, GIF, MP4), frame selection, resize/crop, writers, errors."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from apla.video import (
    VideoError,
    count_frames,
    read_video,
    resize_center_crop,
    to_uint8,
    write_gif,
    write_mp4,
    write_png_strip,
)

BBB = os.path.join(os.path.dirname(__file__), "data", "bigbuckbunny_cut.mp4")  # 24 frames, 128x72
BBB_FRAMES = 24


def frames_with_few_colours(num_frames=6, height=16, width=24):
    """(F, 3, H, W) in [-1, 1], exactly representable in uint8: a 4-level gradient and a moving square."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0, 85, 170, 255], dtype=torch.float32)
    base = levels[torch.randint(0, 4, (3, height, width), generator=g)]  # (3, H, W)
    x = base.expand(num_frames, 3, height, width).clone()  # (3, H, W) -> (F, 3, H, W)
    for f in range(num_frames):
        x[f, :, 4:10, 2 + 2 * f : 8 + 2 * f] = torch.tensor([255.0, 0.0, 0.0])[:, None, None]
    return x / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- reading


def test_read_bbb_cut_shape_and_range():
    pytest.importorskip("av")
    x = read_video(BBB, 8, size=64)
    assert x.shape == (8, 3, 64, 64)
    assert x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.std() > 0.1  # a real picture, not a constant
    assert (x[1:] - x[:-1]).abs().mean() > 0.01  # consecutive frames differ: the rabbit moves


def test_read_non_square_size():
    pytest.importorskip("av")
    assert read_video(BBB, 2, size=(48, 80)).shape == (2, 3, 48, 80)


def test_stride_and_start_select_frames():
    pytest.importorskip("av")
    every = read_video(BBB, 8, size=64)  # frames 0..7
    torch.testing.assert_close(read_video(BBB, 4, stride=2, size=64), every[0::2], rtol=0, atol=0)
    torch.testing.assert_close(read_video(BBB, 4, start=3, size=64), every[3:7], rtol=0, atol=0)
    torch.testing.assert_close(read_video(BBB, 3, start=1, stride=3, size=64), every[1::3], rtol=0, atol=0)


def test_count_frames_bbb():
    pytest.importorskip("av")
    assert count_frames(BBB) == BBB_FRAMES
    read_video(BBB, BBB_FRAMES, size=8)  # the whole clip is readable
    read_video(BBB, 1, start=BBB_FRAMES - 1, size=8)


def test_resize_center_crop_keeps_the_centre():
    # a 160x80 frame: red | green (the centre 80 columns) | blue; the covering scale is 64/80 = 0.8 -> 128x64,
    # and the centre 64 of 128 columns map back to columns 40..120 of the source: all green
    a = np.zeros((80, 160, 3), np.uint8)
    a[:, :40, 0], a[:, 40:120, 1], a[:, 120:, 2] = 255, 255, 255
    out = np.asarray(resize_center_crop(Image.fromarray(a), (64, 64))).astype(int)
    assert out.shape == (64, 64, 3)
    assert np.abs(out[:, 1:-1] - [0, 255, 0]).max() <= 2  # the outermost columns may blend with the neighbours
    # the same for a portrait frame and a landscape target: rows 20..60 of 80 survive a 64x32 crop of 64x64
    b = np.zeros((80, 80, 3), np.uint8)
    b[:20, :, 0], b[20:60, :, 1], b[60:, :, 2] = 255, 255, 255
    out = np.asarray(resize_center_crop(Image.fromarray(b), (32, 64))).astype(int)
    assert out.shape == (32, 64, 3)
    assert np.abs(out[1:-1] - [0, 255, 0]).max() <= 2


def test_png_folder_roundtrip_in_natural_order(tmp_path):
    x = frames_with_few_colours(num_frames=11)
    for f, a in enumerate(to_uint8(x)):
        Image.fromarray(a).save(tmp_path / f"frame_{f}.png")  # frame_10 must come after frame_9, not frame_1
    (tmp_path / "notes.txt").write_text("not a frame")
    assert count_frames(tmp_path) == 11
    torch.testing.assert_close(read_video(tmp_path, 11, size=(16, 24)), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(read_video(tmp_path, 3, start=4, stride=3, size=(16, 24)), x[4::3], rtol=0, atol=1e-6)


def test_jpeg_folder_davis_layout(tmp_path):
    ramp_h, ramp_w = torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 48)
    x = torch.stack([ramp_h[:, None] + 0 * ramp_w, 0 * ramp_h[:, None] + ramp_w, ramp_h[:, None] * ramp_w])  # (3, H, W)
    x = torch.stack([x.roll(4 * f, dims=2) for f in range(4)])  # (F, 3, H, W): smooth, so JPEG keeps it well
    x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2) / 127.5 - 1  # (F, H, W, 3) -> (F, 3, H, W), on the uint8 grid
    for f, a in enumerate(to_uint8(x)):
        Image.fromarray(a).save(tmp_path / f"{f:05d}.JPG", quality=95)  # DAVIS names; upper-case extension too
    y = read_video(tmp_path, 4, size=(32, 48))
    assert y.shape == (4, 3, 32, 48)
    assert (y - x).abs().mean() < 0.03  # JPEG is lossy
    assert (y[1:] - x[:-1]).abs().mean() > 0.1  # and the frames came in name order


def test_gif_roundtrip(tmp_path):
    x = frames_with_few_colours(num_frames=6)
    path = write_gif(x, tmp_path / "clip.gif", fps=5)
    assert count_frames(path) == 6
    with Image.open(path) as im:
        assert im.info["duration"] == 1000 / 5
    with Image.open(write_gif(x, tmp_path / "clip8.gif", fps=8)) as im:
        assert abs(im.info["duration"] - 1000 / 8) <= 5  # GIF delays are whole hundredths of a second
    torch.testing.assert_close(read_video(path, 6, size=(16, 24)), x, rtol=0, atol=1e-6)  # <= 256 colours: exact


def test_mp4_roundtrip(tmp_path):
    pytest.importorskip("av")
    x = read_video(BBB, 6, size=64)
    path = write_mp4(x, tmp_path / "clip.mp4", fps=8)
    assert count_frames(path) == 6
    y = read_video(path, 6, size=64)
    assert (y - x).abs().mean() < 0.05  # H.264 at CRF 18 with 4:2:0 chroma is close, not exact


# ---------------------------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    with pytest.raises(VideoError, match="clip not found: .*nowhere.mp4"):
        read_video(tmp_path / "nowhere.mp4", 4, size=64)


def test_error_unsupported_extension(tmp_path):
    path = tmp_path / "clip.txt"
    path.write_text("hello")
    with pytest.raises(VideoError, match=r"unsupported clip extension '\.txt'"):
        read_video(path, 4, size=64)


@pytest.mark.parametrize("name", ["broken.mp4", "broken.gif"])
def test_error_corrupt_file(tmp_path, name):
    if name.endswith(".mp4"):
        pytest.importorskip("av")
    path = tmp_path / name
    path.write_bytes(b"this is not a video" * 50)
    with pytest.raises(VideoError, match=f"cannot read .*{name}"):
        read_video(path, 1, size=64)


def test_error_corrupt_frame_in_folder(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "00000.png")
    (tmp_path / "00001.jpg").write_bytes(b"garbage")
    with pytest.raises(VideoError, match="cannot read frame .*00001.jpg"):
        read_video(tmp_path, 2, size=16)


def test_error_empty_folder(tmp_path):
    with pytest.raises(VideoError, match="no .jpg/.jpeg/.png frames in folder"):
        read_video(tmp_path, 1, size=16)


def test_error_too_few_frames_says_how_many_are_available():
    pytest.importorskip("av")
    # frames 0, 2, ..., 22 of 24: 12 at stride 2
    with pytest.raises(VideoError, match="has 24 frames: from start=0 at stride=2 only 12 are available, 13 were asked"):
        read_video(BBB, 13, stride=2, size=64)
    # frames 5, 8, ..., 23: 7 at stride 3 from 5
    with pytest.raises(VideoError, match="only 7 are available, 8 were asked"):
        read_video(BBB, 8, start=5, stride=3, size=64)


@pytest.mark.parametrize("size", [60, (64, 100), 0, (64, -8), 64.0, (64,)])
def test_error_size_the_vae_cannot_take(size):
    with pytest.raises(VideoError, match="size"):
        read_video(BBB, 1, size=size)


def test_error_size_message_names_multiple_of_8():
    with pytest.raises(VideoError, match=r"height=64, width=100.*multiples of 8"):
        read_video(BBB, 1, size=(64, 100))


@pytest.mark.parametrize("kwargs", [dict(num_frames=0), dict(stride=0), dict(start=-1)])
def test_error_bad_selection(kwargs):
    args = dict(num_frames=4, start=0, stride=1) | kwargs
    name = next(iter(kwargs))
    with pytest.raises(VideoError, match=f"{name} must be an int"):
        read_video(BBB, size=64, **args)


def test_missing_av_asks_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match="reading bigbuckbunny_cut.mp4 needs PyAV, which is not installed: pip install av"):
        read_video(BBB, 4, size=64)
    with pytest.raises(ImportError, match="pip install av"):
        count_frames(BBB)
    x = frames_with_few_colours(num_frames=2)
    with pytest.raises(ImportError, match="writing MP4 needs PyAV.*pip install av"):
        write_mp4(x, tmp_path / "clip.mp4")
    assert os.listdir(tmp_path) == []
    # GIFs and frames folders need no PyAV
    assert read_video(write_gif(x, tmp_path / "clip.gif"), 2, size=(16, 24)).shape == (2, 3, 16, 24)


# ---------------------------------------------------------------------------------------------- writing


def test_to_uint8_values_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 3.0, 0.5], dtype=torch.float64).view(1, 3, 1, 2)  # (F, 3, H, W)
    a = to_uint8(x)
    assert a.dtype == np.uint8 and a.shape == (1, 1, 2, 3)  # (F, H, W, 3)
    # channel c of pixel w is x[0, c, 0, w]; (x + 1) * 127.5 clamped and rounded: -1 -> 0, 0 -> 128, 1 -> 255
    assert a[0, 0].T.tolist() == [[0, 128], [255, 0], [255, 191]]


def test_to_uint8_rejects_other_layouts():
    with pytest.raises(VideoError, match=r"\(F, 3, H, W\).*got \(3, 5, 8, 8\).*permute\(1, 0, 2, 3\)"):
        to_uint8(torch.zeros(3, 5, 8, 8))
    with pytest.raises(VideoError, match=r"got \(1, 3, 5, 8, 8\).*video\[b\]"):
        to_uint8(torch.zeros(1, 3, 5, 8, 8))


def test_png_strip_size_and_frames(tmp_path):
    x = frames_with_few_colours(num_frames=5, height=16, width=24)
    with Image.open(write_png_strip(x, tmp_path / "strip.png")) as im:
        assert im.size == (5 * 24, 16)
    with Image.open(write_png_strip(x, tmp_path / "strip3.png", max_frames=3)) as im:
        assert im.size == (3 * 24, 16)
        strip = np.asarray(im.convert("RGB"))
    expected = to_uint8(x)[[0, 2, 4]]  # evenly spaced from the first to the last
    assert np.array_equal(strip, np.concatenate(list(expected), axis=1))


def _failing_save(self, fp, *args, **kwargs):
    """Write a few bytes where asked, then fail: what a full disk or a crash in the encoder looks like."""
    with open(fp, "wb") as f:
        f.write(b"partial")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("writer", ["gif", "png_strip"])
def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch, writer):
    write = {"gif": write_gif, "png_strip": write_png_strip}[writer]
    x = frames_with_few_colours(num_frames=2)
    old = tmp_path / "old.out"
    old.write_bytes(b"previous content")
    monkeypatch.setattr(Image.Image, "save", _failing_save)
    with pytest.raises(OSError, match="simulated"):
        write(x, tmp_path / "new.out")
    with pytest.raises(OSError, match="simulated"):
        write(x, old)
    assert sorted(os.listdir(tmp_path)) == ["old.out"]  # no new file, no temporary left
    assert old.read_bytes() == b"previous content"  # the old file is untouched


def test_atomic_write_mp4_leaves_no_partial_file(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    calls = []

    def failing_from_ndarray(*args, **kwargs):
        if calls:
            raise RuntimeError("encoder crashed (simulated)")
        calls.append(1)
        return original(*args, **kwargs)

    original = av.VideoFrame.from_ndarray
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing_from_ndarray)
    with pytest.raises(RuntimeError, match="simulated"):
        write_mp4(frames_with_few_colours(num_frames=3), tmp_path / "clip.mp4")
    assert os.listdir(tmp_path) == []


def test_write_mp4_rejects_odd_sizes(tmp_path):
    pytest.importorskip("av")
    with pytest.raises(VideoError, match="even height and width, got 15x24"):
        write_mp4(torch.zeros(2, 3, 15, 24), tmp_path / "odd.mp4")
    assert os.listdir(tmp_path) == []


def test_written_file_has_ordinary_permissions(tmp_path):
    path = write_png_strip(frames_with_few_colours(num_frames=1), tmp_path / "one.png")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
