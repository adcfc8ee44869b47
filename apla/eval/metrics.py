"""The numbers APLA (Yao et al., AAAI 2024) reports, each a function of a video (F, 3, H, W) in [-1, 1].

    Table 2, 3   CLIP score (frame consistency)   clip_frame_consistency(video, clip)      higher is better
    Table 2      CLIP score against the prompt     clip_text_alignment(video, prompt, clip)  higher is better
    Table 2, 3   FCI, flow consistency index       fci(video)                                lower is better
    (Lai 2018)   warping error                     warping_error(video)                      lower is better
    Table 1      reconstruction PSNR               psnr(video, source)                       higher is better

The paper names its numbers but does not define FCI beyond one paragraph; the choice made here is in `fci`'s
docstring with the paper's sentence. The flow under FCI and the warping error is `apla.eval.flow` (Horn–Schunck, by
hand); the CLIP model is a transformers `CLIPModel` from a folder or hub id the user names, or one that an installed
project registers by name (`load_clip`).

Plugins. Projects extend the scoring without the library importing them, through two entry-point groups
(pyproject.toml's [project.entry-points."GROUP"], read from the installed metadata or from a clone's own
pyproject.toml; `registered`, `load_plugin`):
  apla.clip_models   name -> load(device=...) returning a CLIP scorer (`image_features`, `text_features`);
                     the micro project registers "micro", its CLIP of the shapes world (no download)
  apla.measures      name -> measure(video, prompt, source) -> a dict of numbers, or None where it does not apply,
                     with its table columns as the function's `columns` ({name: (title, direction, format, what)},
                     as METRICS); the dict may name under "edited" what the prompt changes in the source (such a
                     video is an edit: no PSNR against the source). The micro project registers "shapes".
"""
from __future__ import annotations

import math
import tomllib
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from apla.eval.flow import FlowConfig, inside, occlusion_mask, optical_flow, video_flow, warp
from apla.sd.text import load_tokenizer
from apla.video import to_uint8

# name -> (column title, direction, table format, what it is); the order of the evaluate table
METRICS = {
    "fci": ("FCI", "↓", "{:.3f}", "flow consistency index (Tables 2-3): mean change (px) of the local flow from one "
            "pair of adjacent frames to the next"),
    "warping_error": ("warp err", "↓", "{:.5f}", "occlusion-masked MSE of frame k vs frame k+1 warped back (Lai et "
                      "al. 2018)"),
    "clip_frame_consistency": ("CLIP frames", "↑", "{:.2f}", "100 x mean cosine of CLIP image embeddings, all frame "
                               "pairs (Tables 2-3's CLIP score)"),
    "clip_text_alignment": ("CLIP text", "↑", "{:.2f}", "100 x mean cosine of each frame's CLIP embedding with the "
                            "prompt's"),
    "psnr": ("PSNR dB", "↑", "{:.2f}", "PSNR against the source clip, images in [0, 1] (Table 1's reconstruction "
             "measure)"),
    "source_deviation": ("src dev", "↓", "{:.3f}", "departure from the source clip's motion and from its appearance "
                         "along that motion, 1 ~ standing still (source_deviation; the study's primary endpoint)"),
}
CLIP_MODELS = "apla.clip_models"  # the entry-point groups of the plugins (module docstring)
MEASURES = "apla.measures"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's per-channel mean and std of [0, 1] pixels
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MetricsError(ValueError):
    """Input a metric cannot take (one frame, a missing CLIP model, a plugin that does not load, ...); the message
    is one line."""


def one_line(e: Exception) -> str:
    """An exception's message as one line: its first line, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


DISTRIBUTION = "apla"  # pyproject.toml's [project] name
SOURCE_TREE = Path(__file__).resolve().parents[2]  # the folder holding apla/: a clone's root, or site-packages


def installed() -> bool:
    """Whether a distribution named apla is installed (pip install, editable or not): its metadata exists."""
    try:
        distribution(DISTRIBUTION)
    except PackageNotFoundError:
        return False
    return True


def source_tree_plugins(group: str) -> list[EntryPoint]:
    """The entry points of `group` in the pyproject.toml beside the imported package, when it is apla's own (a clone);
    none when there is no such file (an installed wheel ships none) or it is unreadable."""
    path = SOURCE_TREE / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        return []
    if project.get("name") != DISTRIBUTION:
        return []
    return [EntryPoint(name, value, group) for name, value in project.get("entry-points", {}).get(group, {}).items()]


def registered(group: str) -> dict[str, EntryPoint]:
    """The plugins registered in an entry-point group, by name (not loaded): those of the installed distributions'
    metadata, and, when apla itself is not installed, those of the source tree's pyproject.toml.

    Why: a clone used as it is (`pip install -r requirements.txt`, then `python train.py`) has no metadata of its
    own, since entry points exist only once pip has copied pyproject.toml's [project.entry-points] tables into a
    dist-info folder; its pyproject.toml holds the very same tables. So the table stays in one file whichever way
    the package is used, and the library still names no project in its code: what it reads is data, resolved by
    importlib only when a plugin is loaded, as an installed entry point is. Installed metadata comes first, and the
    source tree is read only when apla is not installed: once installed, the metadata is what pip made of the
    table (an editable install made from another checkout included), and reading both would list one plugin from
    two files that may disagree."""
    found = {ep.name: ep for ep in entry_points(group=group)}
    if not installed():
        found.update({ep.name: ep for ep in source_tree_plugins(group)})
    return found


def load_plugin(ep: EntryPoint):
    """The object a registered plugin names (its module imported now); one that does not load is a MetricsError."""
    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001 - any failure to import a plugin is one line
        raise MetricsError(f"the {ep.group} plugin {ep.name!r} ({ep.value}) does not load: {one_line(e)}") from None


def check_video(video: torch.Tensor, least: int = 2) -> None:
    """Refuse (MetricsError) anything but a video (F, 3, H, W) of at least `least` frames."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3:
        shape = tuple(video.shape) if hasattr(video, "shape") else type(video).__name__
        raise MetricsError(f"expected a video (F, 3, H, W) in [-1, 1], got {shape}")
    if video.shape[0] < least:
        raise MetricsError(f"a video of {video.shape[0]} frame(s): this measure needs at least {least}")


# ---------------------------------------------------------------------------------------------------------------
# Flow-based: FCI and the warping error
# ---------------------------------------------------------------------------------------------------------------

def local_flow(flow: torch.Tensor) -> torch.Tensor:
    """The local flow field: at each pixel, the mean flow of the pixel and its 8 neighbours (3x3 window, edges
    replicated). (N, 2, H, W) -> (N, 2, H, W)."""
    # $$\bar w(x) = \tfrac19 \textstyle\sum_{y \in x + \{-1, 0, 1\}^2} w(y)$$
    return F.avg_pool2d(F.pad(flow, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def fci(video: torch.Tensor, flow: torch.Tensor | None = None, cfg: FlowConfig = FlowConfig()) -> float:
    """The flow consistency index (APLA, Tables 2-3; lower is better).

    The paper: "we directly compute the flow field between consecutive frames, independent of the input video.
    Specifically, we determine the optical flow field between two adjacent frames, assess alterations in the local
    optical flow field concerning each pixel's value and its domain, and subsequently average all the computed
    changes." It gives no formula. Our reading (a choice):
    - "the flow field between consecutive frames, independent of the input video": the forward flow w_k from
      frame k to k+1 of the generated video alone (`apla.eval.flow.optical_flow`), no source clip;
    - "the local optical flow field concerning each pixel's value and its domain": at pixel x, the mean flow of x
      and its 8 neighbours, w_bar_k(x) (`local_flow`);
    - "alterations": how that local flow changes from one pair of adjacent frames to the next, following the
      motion: the pixel x of frame k is at x + w_k(x) in frame k+1, where the next flow is w_bar_{k+1};
    - "average all the computed changes": the mean of the change's length over pixels and pairs:

        FCI = 1 / ((F-2) H W) sum_{k=0}^{F-3} sum_x | w_bar_{k+1}(x + w_k(x)) - w_bar_k(x) |_2      (pixels)

    Why the change in time and not the flow's variation in space: a clip whose content keeps its motion
    (static, a steady pan, an object sliding at constant speed) has a flow that does not change from frame to
    frame, FCI near 0, while noise, flicker and frames out of order make it jump. The variation in space alone
    would score a steadily moving object by its edges and could not see shuffled frames (a shuffled pan is as
    smooth in space as the ordered one). FCI is in pixels of the video's own resolution (the paper's: 512x512)
    and needs 3 frames. `flow` may pass the forward flows (F-1, 2, H, W) already computed.
    """
    check_video(video, least=3)
    if flow is None:
        flow = optical_flow(video[:-1], video[1:], cfg)  # (F-1, 2, H, W)
    local = local_flow(flow)
    # the next pair's local flow, read where each pixel has moved to: w_bar_{k+1}(x + w_k(x))
    ahead = warp(local[1:], flow[:-1])  # (F-2, 2, H, W)
    # $$\| \bar w_{k+1}(x + w_k(x)) - \bar w_k(x) \|_2$$
    return (ahead - local[:-1]).pow(2).sum(1).sqrt().mean().item()


def warping_error(video: torch.Tensor, flows: tuple | None = None, cfg: FlowConfig = FlowConfig()) -> float:
    """Lai et al. (ECCV 2018)'s temporal warping error (lower is better): for each pair of adjacent frames,
    frame k+1 is warped back to frame k by the forward flow, V_hat(x) = V_{k+1}(x + w_k(x)); the error is the mean
    squared difference over the pixels M_k keeps, pixels in [0, 1], averaged over the 3 channels and over the pairs:

        E_warp = 1/(F-1) sum_k  sum_x M_k(x) |V_k(x) - V_hat(x)|^2 / (3 sum_x M_k(x))
        M_k(x) = 1 if x passes the forward-backward test (`apla.eval.flow.occlusion_mask`) and x + w_k(x) lies
                 inside the frame (`apla.eval.flow.inside`), else 0

    A pixel whose flow leaves the frame shows content that frame k+1 no longer has (it left across the edge), so,
    as an occluded pixel, it has nothing to be compared with; the warp would read the edge pixel instead (a choice:
    Lai et al. name only occlusions). The flow is computed on the video itself (Lai et al. compute it on the input
    video a method processed; here there is no such input). A pair where no pixel is kept counts all its pixels.
    `flows` may pass the (forward, backward) flows of `apla.eval.flow.video_flow` already computed.
    """
    check_video(video)
    forward, backward = flows if flows is not None else video_flow(video, cfg)
    x = (video + 1) / 2  # [-1, 1] -> [0, 1]
    # (F-1, 1, H, W), 1 = not occluded and landing inside frame k+1
    keep = (~occlusion_mask(forward, backward) & inside(forward)).to(x.dtype)
    keep = torch.where(keep.sum((1, 2, 3), keepdim=True) > 0, keep, torch.ones_like(keep))
    warped = warp(x[1:], forward)  # (F-1, 3, H, W): frame k+1 seen from frame k
    # $$\frac{\sum_x M(x)\,\|V_k(x) - \hat V_{k+1}(x)\|^2}{3 \sum_x M(x)}$$
    per_pair = ((x[:-1] - warped).pow(2) * keep).sum((1, 2, 3)) / (3 * keep.sum((1, 2, 3)))
    return per_pair.mean().item()


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two frame stacks in [-1, 1], on the [0, 1] scale (Table 1's reconstruction measure); inf when
    they are equal.

        PSNR = 10 log10(1 / MSE),  MSE = mean(((a - b) / 2)^2)
    """
    if a.shape != b.shape:
        raise MetricsError(f"PSNR of two videos of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    # [-1, 1] -> [0, 1] halves every difference
    mse = ((a.double() - b.double()) / 2).pow(2).mean().item()
    # $$10 \log_{10}(1 / \mathrm{MSE})$$
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ---------------------------------------------------------------------------------------------------------------
# Relative to the source: the ablation study's primary endpoint
# ---------------------------------------------------------------------------------------------------------------

MOTION_FLOOR = 0.05  # px: the source's mean motion below which `source_deviation` divides by this instead
CHANGE_FLOOR = 1 / 255  # [0, 1] units: the same floor for the source's mean frame-to-frame change


def principal_axis(source: torch.Tensor):
    """The image the flows of `source_deviation` read: a function mapping frames (N, 3, H, W) in [-1, 1] to one
    channel (N, 1, H, W), the projection of each pixel's colour on the first principal axis of the source's pixel
    colours, stretched so that the source's 0.5th..99.5th percentiles span [0, 1] (the sign makes the axis's
    components sum >= 0). Why not brightness (the flow's own `brightness`): two colours of equal brightness, a
    yellow object on a light background, leave brightness almost flat and the flow blind to them; the principal
    axis is the direction in which the source's colours differ most. The map is fixed by the source, so the video
    and the source are read the same way."""
    x = ((source.double() + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 3)  # (F, 3, H, W) -> (F*H*W, 3)
    mean = x.mean(0)
    axis = torch.linalg.svd(x - mean, full_matrices=False).Vh[0]
    axis = axis if axis.sum() >= 0 else -axis
    proj = (x - mean) @ axis
    lo, hi = torch.quantile(proj, 0.005).item(), torch.quantile(proj, 0.995).item()
    scale = max(hi - lo, 1e-6)

    def read(frames: torch.Tensor) -> torch.Tensor:
        y = (((frames.double() + 1) / 2).permute(0, 2, 3, 1) - mean) @ axis  # (N, H, W)
        return ((y - lo) / scale).unsqueeze(1).to(frames.dtype)  # (N, 1, H, W)
    return read


class SourceMotion(NamedTuple):
    """What `source_deviation` reads from the source alone (`source_motion`), computed once per source."""

    read: Callable  # `principal_axis(source)`
    flow: torch.Tensor  # (F-1, 2, H, W): w^s, the source's motion
    keep: torch.Tensor  # (F-1, 1, H, W): 1 where the source's motion stays in the frame
    residual: torch.Tensor  # r(s)
    change: torch.Tensor  # the source's mean frame-to-frame change, uncompensated


def appearance_residual(x: torch.Tensor, flow: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """r(u) of `source_deviation`: mean |u_{k+1}(p + w^s_k(p)) - u_k(p)| over the kept pixels, in [0, 1] units."""
    x = (x + 1) / 2
    return ((warp(x[1:], flow) - x[:-1]).abs().mean(1, keepdim=True) * keep).sum() / keep.sum().clamp_min(1)


def source_motion(source: torch.Tensor, cfg: FlowConfig = FlowConfig()) -> SourceMotion:
    """The source's side of `source_deviation`, for scoring several videos against one source."""
    check_video(source)
    read = principal_axis(source)
    flow = optical_flow(read(source[:-1]), read(source[1:]), cfg)
    keep = inside(flow).to(source.dtype)
    change = ((source[1:] - source[:-1]).abs() / 2).mean()
    return SourceMotion(read, flow, keep, appearance_residual(source, flow, keep), change)


def source_deviation_terms(video: torch.Tensor, source: torch.Tensor, cfg: FlowConfig = FlowConfig(),
                           motion: SourceMotion | None = None) -> tuple[float, float]:
    """(motion, appearance), the two terms of `source_deviation`, each 0 for the source itself; `motion` may pass
    `source_motion(source, cfg)` already computed."""
    check_video(video)
    if video.shape != source.shape:
        raise MetricsError(f"source_deviation of a video {tuple(video.shape)} against a source "
                           f"{tuple(source.shape)}: they must have the same shape")
    s = motion if motion is not None else source_motion(source, cfg)
    w_s = s.flow
    w_v = optical_flow(s.read(video[:-1]), s.read(video[1:]), cfg)
    # $$m = \frac{\overline{\|w^v_k(x) - w^s_k(x)\|}}{\overline{\|w^s_k(x)\|}}$$
    m = (w_v - w_s).pow(2).sum(1).sqrt().mean() / w_s.pow(2).sum(1).sqrt().mean().clamp_min(MOTION_FLOOR)
    # $$a = \frac{|r(v) - r(s)|}{\overline{|s_{k+1} - s_k|}}$$
    a = (appearance_residual(video, w_s, s.keep) - s.residual).abs() / s.change.clamp_min(CHANGE_FLOOR)
    return m.item(), a.item()


def source_deviation(video: torch.Tensor, source: torch.Tensor, cfg: FlowConfig = FlowConfig(),
                     motion: SourceMotion | None = None) -> float:
    """The ablation study's primary endpoint (lower is better, 0 for the source itself): how far a video departs
    from its source clip's motion and from the way the source's appearance carries along that motion, in units of
    the source's own motion. Both (F, 3, H, W) in [-1, 1], the same shape.

        D(v, s) = m + a
        m = mean_{k,x} |w^v_k(x) - w^s_k(x)| / mean_{k,x} |w^s_k(x)|                                   motion
        a = |r(v) - r(s)| / mean_{k,x} |s_{k+1}(x) - s_k(x)|,  r(u) = mean_{k,x in frame} |u_{k+1}(x + w^s_k(x)) - u_k(x)|

    w^u_k is the flow from frame k to k+1 of u (`apla.eval.flow.optical_flow`), both read through the source's
    principal colour axis (`principal_axis`); r(u) is u's change from frame to frame that the source's motion does
    not explain, over the pixels whose source motion stays in the frame; differences in [0, 1] per channel.

    Why this and not FCI or the warping error: those score a video alone, and a video that moves less scores
    better (the source's first frame repeated scores a perfect 0). Here standing still costs m = 1 (the flow is 0,
    so the error is the source's whole motion) plus the change the source's motion would have made; half the
    motion costs m = 1/2, twice the motion m = 1. A colour that flips from frame to frame keeps the motion but
    not the appearance along it: r(v) grows, and a grows. An edit that changes a colour or a shape for the whole
    clip keeps both (w^v = w^s, r(v) ~ r(s)), so edits are scored on their consistency, not on being edits.
    Each term is divided by the source's own amount (of motion, of change), so a clip that moves a lot weighs
    no more than one that moves a little: D = 1 is "about as far as standing still". The denominators are floored
    (MOTION_FLOOR, CHANGE_FLOOR) for sources that hardly move. Validated on perturbations of the benchmark's clips
    (tests/study/test_endpoint.py): the source scores 0 and a frozen first frame, half and double the motion,
    shape flips, colour flips and size jitter each score clearly more. `motion` may pass `source_motion(source, cfg)`
    already computed (several videos against one source).
    """
    m, a = source_deviation_terms(video, source, cfg, motion)
    return m + a


# ---------------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------------

def clip_preprocess(video: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's image preprocessing, written out: frames (F, 3, H, W) in [-1, 1] -> 8-bit RGB -> shorter side
    resized to `size` and the longer to int(size * long / short) (Pillow's bicubic, as CLIP's and transformers'
    processors do) -> centre crop size x size (offsets rounded down) -> [0, 1] -> (x - mean) / std with CLIP's
    mean and std. Returns (F, 3, size, size) float32."""
    frames = []
    for array in to_uint8(video):  # (H, W, 3) uint8 each
        h, w = array.shape[:2]
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        image = Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        frames.append(np.asarray(image)[top:top + size, left:left + size])
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255  # (F, S, S, 3) -> (F, 3, S, S)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # $$(x - \mu) / \sigma$$
    return (x - mean) / std


class HFClip:
    """A transformers `CLIPModel` with CLIP's tokenizer, behind the interface the CLIP metrics use:
    `image_features(video)` -> (F, D), `text_features(prompts)` -> (P, D) (projected embeddings, not normalised)."""

    def __init__(self, model, tokenizer, device="cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.image_size = model.config.vision_config.image_size

    @torch.no_grad()
    def image_features(self, video: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(video, self.image_size).to(self.device)  # (F, 3, S, S)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (F, hidden)
        return self.model.visual_projection(pooled).float()  # (F, D)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        out = self.model.text_model(input_ids=tokens.input_ids.to(self.device),
                                    attention_mask=tokens.attention_mask.to(self.device))
        return self.model.text_projection(out.pooler_output).float()  # (P, D)


def load_clip(name: str, device="cpu"):
    """A CLIP scorer by name: one an installed project registers (entry-point group apla.clip_models, e.g. "micro"),
    a local folder holding a transformers CLIPModel (config.json + weights; its tokenizer files, or CLIP's BPE
    vocabulary shipped in apla/assets/clip_bpe), or a hub id such as openai/clip-vit-large-patch14 (downloaded
    because the user named it). Anything else, or a model that does not load, is a MetricsError with one line."""
    plugins = registered(CLIP_MODELS)
    if name in plugins:
        load = load_plugin(plugins[name])
        try:
            return load(device=device)
        except Exception as e:  # noqa: BLE001 - any failure to load is one line
            raise MetricsError(f"--clip-model {name}: the registered CLIP model ({plugins[name].value}) does not "
                               f"load: {one_line(e)}") from None
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(name).expanduser()
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise MetricsError(f"--clip-model {name}: not a CLIP model folder (no config.json)")
    if not local and (name.count("/") != 1 or name.startswith((".", "/", "~"))):
        raise MetricsError(f"--clip-model {name}: no such folder, not a registered CLIP model (registered: "
                           f"{', '.join(sorted(plugins)) or 'none'}), and not a hub id such as "
                           "openai/clip-vit-large-patch14")
    try:
        model = CLIPModel.from_pretrained(str(path) if local else name, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - any failure to load is one line
        raise MetricsError(f"--clip-model {name}: cannot load a CLIPModel ({one_line(e)})") from None
    has_vocab = not local or any((path / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    tokenizer = None
    if has_vocab:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(path) if local else name, local_files_only=local)
        except Exception:  # noqa: BLE001 - falls back to the shipped vocabulary below
            tokenizer = None
    if tokenizer is None:  # a weights-only folder: CLIP's own BPE vocabulary, shipped in apla/assets/clip_bpe
        tokenizer = load_tokenizer()
    return HFClip(model, tokenizer, device)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of every row of a (M, D) with every row of b (N, D): (M, N)."""
    # $$\cos(a, b) = \frac{a \cdot b}{\|a\|\,\|b\|}$$
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def frame_consistency(embeddings: torch.Tensor) -> float:
    """100 x the mean cosine over all pairs of distinct frames of (F, D) embeddings:

        100 / (F (F-1)) sum_{i != j} cos(e_i, e_j)
    """
    n = embeddings.shape[0]
    if n < 2:
        raise MetricsError(f"frame consistency needs at least 2 frames, got {n}")
    cos = cosine_matrix(embeddings, embeddings)  # (F, F)
    # $$\frac{100}{F(F-1)} \sum_{i \ne j} \cos(e_i, e_j)$$: the diagonal (each frame with itself) is left out
    return (100 * (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))).item()


def clip_frame_consistency(video: torch.Tensor, clip) -> float:
    """Tables 2-3's "CLIP score" of frame consistency (higher is better), as Tune-A-Video measures it: CLIP image
    embeddings of every frame, 100 x the mean cosine similarity over all pairs of distinct frames (`frame_consistency`).

    The paper: "we evaluate the CLIP score (Radford et al. 2021) across all generated frames by employing average
    cosine measurements"; Table 2 files the score under "Frame Consistency" while its caption speaks of "content
    consistency with text prompt". A choice: we report both readings, this one (frames against frames) and
    `clip_text_alignment` (frames against the prompt). `clip`: `load_clip(...)`'s scorer, or anything with
    `image_features(video)` -> (F, D)."""
    check_video(video)
    return frame_consistency(clip.image_features(video))


def clip_text_alignment(video: torch.Tensor, prompt: str, clip) -> float:
    """CLIP score against the prompt (higher is better): 100 x the mean over frames of cos(image_f, text),

        100 / F sum_f cos(E_img(x_f), E_txt(prompt))
    """
    check_video(video, least=1)
    cos = cosine_matrix(clip.image_features(video), clip.text_features([prompt]))  # (F, 1)
    # $$\frac{100}{F} \sum_f \cos(E_{img}(x_f), E_{txt}(q))$$
    return (100 * cos).mean().item()
