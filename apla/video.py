"""Reading and writing clips for APLA (Additional Perturbation for Latent noise with Adversarial training,
AAAI 2024).

This file implements no equation of the paper; it is the bridge between files on disk and the tensors the
rest of the package works on:

    clip (frames folder | GIF | MP4/WebM/MOV/MKV) --read_video--> x: (F, 3, H, W) float32 in [-1, 1]
    x: (F, 3, H, W) in [-1, 1] --write_gif / write_mp4 / write_png_strip--> file
    several labelled x of one shape --write_grid--> a GIF and a PNG of them all, one row each

One convention for frames in and out: (F, 3, H, W), values in [-1, 1] (the VAE's input range). A batch
video tensor (B, C, F, H, W) becomes that with `video[b].permute(1, 0, 2, 3)`, and back with
`x.permute(1, 0, 2, 3)[None]`.

Where the paper is silent (choices made here, each resting on the sentence of Sec. "Implementation Details":
"We uniformly sample 24 frames at a resolution of 512 x 512 from the input video"):
- "uniformly sample" is read as a fixed stride from a start frame, frames `start + i * stride`, as
  Tune-A-Video's `sample_start_idx` / `sample_frame_rate`; a caller who wants the 24 frames spread over the
  whole clip picks `stride = count_frames(path) // 24`.
- "a resolution of 512 x 512" from a non-square video: the frame is scaled (bicubic, aspect ratio kept) until
  it covers the target, then the centre is cropped. The paper does not say whether it crops or stretches;
  cropping keeps shapes undistorted.

MP4/WebM/MOV/MKV go through PyAV (`pip install av`), an optional dependency; frames folders and GIFs need only
Pillow. Every writer is atomic: it writes a temporary file in the target folder and renames it over the target
with `os.replace` (`apla.checkpoint.atomic_write`), so a failure never leaves a half-written file. A reader checks
the frames asked for against the clip before it holds any: a frame count far beyond the clip costs nothing.
"""

from __future__ import annotations

import os
import re
import textwrap
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageSequence

from apla.checkpoint import atomic_write
from apla.config import VAE_DOWNSAMPLE

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")  # frames of a folder clip (DAVIS ships 00000.jpg, 00001.jpg, ...)
GIF_EXTENSIONS = (".gif",)
AV_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv")  # decoded by PyAV
RESAMPLE = Image.Resampling.BICUBIC  # filter for resizing frames (antialiased when shrinking)
MP4_CODEC = "libx264"  # H.264, plays in browsers and notebooks
MP4_PIX_FMT = "yuv420p"  # the pixel format every H.264 player understands (needs even H and W)
MP4_CRF = 18  # x264 constant rate factor: 0 lossless .. 51 worst; 18 is visually close to lossless


class VideoError(ValueError):
    """A clip that cannot be read or written as asked; the message names the file or value at fault."""


class PyAVMissing(VideoError, ImportError):
    """An MP4/WebM/MOV/MKV to read or write, and PyAV not installed; the message says how to install it."""


# ----------------------------------------------------------------------------------------------------------
# helpers


def require_av(purpose: str):
    """Import PyAV, or raise PyAVMissing with a one-line message saying how to install it."""
    try:
        import av
    except ImportError:
        install = 'pip install av (or pip install "apla[video]")'
        raise PyAVMissing(f"{purpose} needs PyAV, which is not installed: {install}") from None
    return av


def _parse_size(size: int | Sequence[int]) -> tuple[int, int]:
    """`size` as (H, W): an int means a square; both sides must be positive multiples of 8 for the VAE."""
    if isinstance(size, int) and not isinstance(size, bool):
        height, width = size, size
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) for s in size
    ):
        height, width = size
    else:
        raise VideoError(f"size must be an int or a (height, width) pair of ints, got {size!r}")
    if height <= 0 or width <= 0 or height % VAE_DOWNSAMPLE or width % VAE_DOWNSAMPLE:
        raise VideoError(
            f"size (height={height}, width={width}) cannot be taken by the VAE: both sides must be positive "
            f"multiples of {VAE_DOWNSAMPLE}"
        )
    return height, width


def _natural_key(name: str) -> list:
    """Sort key that orders 'frame2.png' before 'frame10.png' (and 00002.jpg before 00010.jpg as usual)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_files(folder: str) -> list[str]:
    """The image files of a frames folder, in natural name order."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)]
    if not names:
        raise VideoError(f"no {'/'.join(FRAME_EXTENSIONS)} frames in folder {folder}")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _kind(path: str) -> str:
    """'folder', 'gif' or 'av' for a readable clip path; VideoError for a missing path or unknown extension."""
    if not os.path.exists(path):
        raise VideoError(f"clip not found: {path}")
    if os.path.isdir(path):
        return "folder"
    ext = os.path.splitext(path)[1].lower()
    if ext in GIF_EXTENSIONS:
        return "gif"
    if ext in AV_EXTENSIONS:
        return "av"
    supported = ", ".join(GIF_EXTENSIONS + AV_EXTENSIONS)
    raise VideoError(f"unsupported clip extension {ext or '(none)'!r} for {path}: use a frames folder or {supported}")


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `image` (aspect ratio kept) until it covers size=(H, W), then crop the centre to exactly (H, W).

    For a landscape frame and a square target this is "resize the shorter side to the target, crop the centre".
    """
    height, width = size
    scale = max(height / image.height, width / image.width)
    # max(..) guards against rounding a side just below the target
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def _available(total: int, start: int, stride: int) -> int:
    """How many frames `start, start + stride, ...` a clip of `total` frames holds."""
    return len(range(start, total, stride))


def _too_few(path: str, total: int, start: int, stride: int, num_frames: int) -> VideoError:
    return VideoError(
        f"{path} has {total} frames: from start={start} at stride={stride} only "
        f"{_available(total, start, stride)} are available, {num_frames} were asked"
    )


# ----------------------------------------------------------------------------------------------------------
# reading


def _read_folder(path, indices):
    files = _frame_files(path)
    if indices[-1] >= len(files):
        return None, len(files)
    images = []
    for i in indices:
        try:
            with Image.open(files[i]) as im:
                images.append(im.convert("RGB"))
        except (OSError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise VideoError(f"cannot read frame {files[i]}: {err}") from None
    return images, len(files)


def _read_gif(path, indices):
    try:
        with Image.open(path) as im:
            total = getattr(im, "n_frames", 1)
            if indices[-1] >= total:
                return None, total
            images = {}
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                if i in indices:
                    images[i] = frame.convert("RGB")
                if i >= indices[-1]:
                    break
    except (OSError, SyntaxError, EOFError) as err:
        raise VideoError(f"cannot read GIF {path}: {err}") from None
    return [images[i] for i in indices], total


def _read_av(path, indices):
    av = require_av(f"reading {os.path.basename(path)}")
    images, total = {}, 0
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream in {path}")
            for i, frame in enumerate(container.decode(video=0)):
                total = i + 1
                if i in indices:
                    images[i] = frame.to_image()  # PIL RGB
                if i >= indices[-1]:
                    break
    except av.FFmpegError as err:
        raise VideoError(f"cannot read video {path}: {err}") from None
    if total == 0:
        raise VideoError(f"cannot read video {path}: no frame could be decoded")
    if indices[-1] >= total:
        return None, total
    return [images[i] for i in indices], total


_READERS: dict[str, Callable] = {"folder": _read_folder, "gif": _read_gif, "av": _read_av}


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames in a clip (frames folder, GIF, or a video file decoded to its end)."""
    path = os.fspath(path)
    kind = _kind(path)
    if kind == "folder":
        return len(_frame_files(path))
    if kind == "gif":
        _, total = _read_gif(path, [1 << 62])  # an index past any clip: only counts
        return total
    _, total = _read_av(path, [1 << 62])
    return total


def read_video(
    path: str | os.PathLike,
    num_frames: int,
    start: int = 0,
    stride: int = 1,
    size: int | tuple[int, int] | None = 512,  # the paper trains at 512 x 512
) -> torch.Tensor:
    """Read frames `start, start + stride, ..., start + (num_frames - 1) * stride` of a clip.

    path: a folder of .jpg/.jpeg/.png frames (natural name order, DAVIS layout), a .gif, or a
    .mp4/.mov/.webm/.mkv (through PyAV). size: int (square) or (H, W), multiples of 8. Each frame is scaled
    (aspect kept) to cover `size` and centre-cropped (see `resize_center_crop`). size=None keeps the frames as
    they are (any size; all frames must share it), as the metrics read a clip.
    Returns x: (F, 3, H, W) float32 in [-1, 1], F = num_frames.
    """
    path = os.fspath(path)
    height, width = _parse_size(size) if size is not None else (None, None)
    for name, value, least in (("num_frames", num_frames, 1), ("start", start, 0), ("stride", stride, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise VideoError(f"{name} must be an int >= {least}, got {value!r}")
    indices = range(start, start + num_frames * stride, stride)  # a range: nothing allocated per frame asked
    images, total = _READERS[_kind(path)](path, indices)
    if images is None:
        raise _too_few(path, total, start, stride, num_frames)
    if size is None:
        sizes = sorted({im.size for im in images})
        if len(sizes) > 1:
            raise VideoError(f"{path}: frames of different sizes {sizes} (width, height); pass a size")
        frames = np.stack([np.asarray(im) for im in images])  # (F, H, W, 3) uint8
    else:
        frames = np.stack([np.asarray(resize_center_crop(im, (height, width))) for im in images])  # (F, H, W, 3)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (F, H, W, 3) -> (F, 3, H, W)
    # [0, 255] -> [-1, 1]: x / 127.5 - 1
    return x.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------
# writing


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) tensor in [-1, 1] (any dtype or device) -> (F, H, W, 3) uint8 array (clamped, rounded)."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        hint = ""
        if isinstance(frames, torch.Tensor) and frames.ndim == 5:
            hint = "; from a (B, C, F, H, W) video pass video[b].permute(1, 0, 2, 3)"
        elif isinstance(frames, torch.Tensor) and frames.ndim == 4 and frames.shape[0] == 3:
            hint = "; a (3, F, H, W) clip becomes (F, 3, H, W) with x.permute(1, 0, 2, 3)"
        raise VideoError(f"frames must be a (F, 3, H, W) tensor in [-1, 1], got {shape}{hint}")
    x = frames.detach().float().cpu().clamp(-1.0, 1.0)
    # [-1, 1] -> [0, 255]: (x + 1) * 127.5
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # (F, 3, H, W) -> (F, H, W, 3)


def write_gif(frames: torch.Tensor, path: str | os.PathLike, fps: float = 8) -> str:
    """Write (F, 3, H, W) frames in [-1, 1] as a looping GIF; returns the path.

    GIF stores 256 colours per frame (Pillow picks an adaptive palette) and delays in 1/100 s, so colours and
    timing are approximate. Pillow merges a frame identical to the one before it into a longer delay: such a
    GIF plays the same but reads back with fewer frames.
    """
    images = [Image.fromarray(a) for a in to_uint8(frames)]
    duration_ms = 10 * round(100 / fps)  # GIF delays count hundredths of a second

    def write(tmp):
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)

    return atomic_write(path, write)


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: float = 8, crf: int = MP4_CRF) -> str:
    """Write (F, 3, H, W) frames in [-1, 1] as an H.264 MP4 (yuv420p, needs PyAV and even H, W); returns the path."""
    av = require_av("writing MP4")
    array = to_uint8(frames)  # (F, H, W, 3)
    height, width = array.shape[1:3]
    if height % 2 or width % 2:
        raise VideoError(f"MP4 ({MP4_PIX_FMT}) needs even height and width, got {height}x{width} for {path}")

    def write(tmp):
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(MP4_CODEC, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, MP4_PIX_FMT
            stream.options = {"crf": str(crf)}
            for a in array:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder

    return atomic_write(path, write)


def write_png_strip(frames: torch.Tensor, path: str | os.PathLike, max_frames: int | None = None) -> str:
    """Write frames side by side as one PNG of size (H, n * W); returns the path.

    n = F, or max_frames frames evenly spaced from the first to the last when F > max_frames.
    """
    array = to_uint8(frames)  # (F, H, W, 3)
    if max_frames is not None:
        if max_frames < 1:
            raise VideoError(f"max_frames must be >= 1, got {max_frames}")
        if len(array) > max_frames:
            array = array[np.linspace(0, len(array) - 1, max_frames).round().astype(int)]
    strip = np.concatenate(list(array), axis=1)  # n x (H, W, 3) -> (H, n * W, 3)
    return save_png(strip, path)


def save_png(array: np.ndarray, path: str | os.PathLike) -> str:
    """An (H, W, 3) uint8 array as a PNG, atomically; returns the path."""
    image = Image.fromarray(array)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


GRID_LABEL_CHARS = 36  # characters per line of a grid's label (a longer prompt wraps)
GRID_PAD = 4  # px of white around a label's text


def label_cells(labels: Sequence[str], height: int) -> list[np.ndarray]:
    """For each label, a white (H', W', 3) uint8 cell with its text in black (Pillow's default font), wrapped at
    GRID_LABEL_CHARS characters; all cells as wide as the widest text and H' = max(`height`, the tallest text)."""
    font = ImageFont.load_default()
    lines = [textwrap.wrap(label, GRID_LABEL_CHARS) or [""] for label in labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    width = int(max(measure.textlength(line, font=font) for block in lines for line in block)) + 2 * GRID_PAD
    cell_height = max(height, max(len(block) for block in lines) * line_height + 2 * GRID_PAD)
    cells = []
    for block in lines:
        image = Image.new("RGB", (width, cell_height), "white")
        draw = ImageDraw.Draw(image)
        for i, line in enumerate(block):
            draw.text((GRID_PAD, GRID_PAD + i * line_height), line, fill="black", font=font)
        cells.append(np.asarray(image))
    return cells


def write_grid(videos: Sequence[tuple[str, torch.Tensor]], stem: str | os.PathLike, fps: float = 8) -> list[str]:
    """STEM.gif and STEM.png of labelled videos of one shape (F, 3, H, W) in [-1, 1], one row each with its label
    (a prompt) on the left: the GIF plays the rows together, as Tune-A-Video's save_videos_grid shows a call's
    samples; the PNG lays each row's frames side by side. Returns the two paths."""
    arrays = [to_uint8(video) for _, video in videos]  # (F, H, W, 3) each
    if len({a.shape for a in arrays}) != 1:
        raise VideoError(f"a grid takes videos of one shape, got {sorted({a.shape for a in arrays})}")
    count, height = arrays[0].shape[:2]
    cells = label_cells([label for label, _ in videos], height)
    # each video padded with white below to its label's height: (F, H, W, 3) -> (F, H', W, 3)
    rows = [np.pad(a, ((0, 0), (0, cell.shape[0] - height), (0, 0), (0, 0)), constant_values=255)
            for a, cell in zip(arrays, cells)]
    # frame k of the GIF: the rows [label | frame k] stacked: (F, rows * H', W' + W, 3)
    gif = np.stack([np.concatenate([np.concatenate([cell, row[k]], axis=1) for cell, row in zip(cells, rows)])
                    for k in range(count)])
    # the PNG: the rows [label | frame 0 | ... | frame F-1] stacked: (rows * H', W' + F * W, 3)
    png = np.concatenate([np.concatenate([cell, *row], axis=1) for cell, row in zip(cells, rows)])
    frames = torch.from_numpy(gif).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, Hg, Wg, 3) -> (F, 3, Hg, Wg)
    stem = Path(stem)
    return [write_gif(frames, stem.with_suffix(".gif"), fps=fps), save_png(png, stem.with_suffix(".png"))]
