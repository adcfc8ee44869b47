"""Dense optical flow by hand: coarse-to-fine Horn–Schunck with warping, backward warping, and the forward–backward
occlusion test of Lai et al. (ECCV 2018).

APLA (Yao et al., AAAI 2024) measures frame consistency with "the flow consistency index (FCI) ... we directly
compute the flow field between consecutive frames" (Sec. Experiments, Quantitative Results); the paper does not
say which flow. This file gives the package one, written out, so that FCI and the warping error (apla.eval.metrics)
need nothing but torch. No equation of APLA lives here; the equations are Horn & Schunck's (1981):

    brightness constancy, linearised     I_x u + I_y v + I_t = 0
    energy                                E(u, v) = sum_x (I_x u + I_y v + I_t)^2 + alpha^2 (|grad u|^2 + |grad v|^2)
    Jacobi step (Horn & Schunck's Eq.)   u <- u_bar - I_x (I_x u_bar + I_y v_bar + I_t) / (alpha^2 + I_x^2 + I_y^2)
                                         v <- v_bar - I_y (I_x u_bar + I_y v_bar + I_t) / (alpha^2 + I_x^2 + I_y^2)

with u_bar, v_bar the weighted average of the 8 neighbours. Large motions break the linearisation, so the flow is
found coarse to fine (an image pyramid, each level half the size) and, at each level, the second image is warped by
the current flow and only the increment is linearised ("warping", as Brox et al. 2004): with w = w0 + dw and
I_t = I_2(x + w0) - I_1(x), the residual of the Jacobi step becomes I_x (u_bar - u0) + I_y (v_bar - v0) + I_t.

Accuracy. On frames of the bundled Big Buck Bunny clip (128x224) moved by known sub-pixel shifts and 1-2 degree
rotations, the end-point error (EPE) against the analytic flow over the textured half of the pixels is 0.02-0.05 px
with the defaults (mean 0.039; 0.047-0.065 on three other frames and motions), against 0.008-0.097 px (mean 0.057;
0.051-0.065) for OpenCV's Farnebäck (tests/eval/test_flow.py). Both metrics read this flow, so its error shows in
them: a flow off by e px reads frame k+1 at a point e px away, which changes a pixel of the warping error's difference
by at most e times the largest brightness gradient there (to first order), and it moves each local mean flow that FCI
compares by at most e, so FCI (in px) can read up to about 2e on a clip whose motion does not change (more where the
flow varies in space, as the next flow is also read at the wrong point).

Conventions
- frames are (N, 3, H, W) in [-1, 1] (the package's), flow is (N, 2, H, W) in pixels: channel 0 = u (to the right),
  channel 1 = v (down); the flow w from frame a to frame b says that a(x) shows what b shows at x + w(x).
- every function is batched over N frame pairs and runs on the frames' device and dtype (float64 in the tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B: the flow is computed on brightness
DERIVATIVE = (1.0, -8.0, 0.0, 8.0, -1.0)  # the 5-point central difference, divided by 12
# Horn & Schunck's neighbour average: 1/6 for the 4 edge neighbours, 1/12 for the 4 corners, 0 for the centre
NEIGHBOUR_AVERAGE = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


@dataclass(frozen=True)
class FlowConfig:
    """The settings of `optical_flow`; part of the definition of every metric built on it (FCI, warping error).

    The defaults were chosen on known shifts and rotations of real frames (module docstring), checked on frames and
    motions the test does not use: a stronger smoothness (alpha 0.08), a wider presmoothing (1.5 px) and 50
    Jacobi iterations per warp lower the mean EPE of the earlier 0.05 / 1.0 px / 20 by a third (0.058 -> 0.039 px;
    0.074 -> 0.057 px on the other cases), at 2.5 times the cost."""

    alpha: float = 0.08  # smoothness weight, in brightness units (images in [0, 1]) per pixel
    levels: int = 0  # pyramid levels; 0 = as many as keep the coarsest side >= min_side
    min_side: int = 16  # the coarsest level's shorter side (pixels)
    warps: int = 2  # warps (re-linearisations) per level
    iterations: int = 50  # Jacobi iterations per warp
    presmooth: float = 1.5  # sigma (pixels) of the Gaussian blur applied to both images before anything else
    chunk_pixels: int = 1 << 18  # pairs go in batches of up to this many pixels per frame stack (a 512x512 frame:
    # one pair at a time; small tensors stay in the allocator's reuse and in cache, measured 2x faster than all at once)


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------

def brightness(frames: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 1, H, W) in [0, 1], BT.601 luma."""
    w = frames.new_tensor(LUMA).view(1, 3, 1, 1)
    # $$Y = 0.299 R + 0.587 G + 0.114 B$$, on the [0, 1] scale
    return ((frames + 1) / 2 * w).sum(1, keepdim=True)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), radius ceil(3 sigma), edges replicated."""
    if sigma <= 0:
        return img
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    n, c, h, w = img.shape
    out = F.pad(img.reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate")  # (N, C, H, W) -> (N*C, 1, H+2r, W+2r)
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    out = F.conv2d(out, k.view(1, 1, -1, 1))
    return out.reshape(n, c, h, w)


def downsample(img: torch.Tensor) -> torch.Tensor:
    """Half the size: blur (sigma 1) then take every other pixel's 2x2 average (a pyramid level)."""
    return F.avg_pool2d(gaussian_blur(img, 1.0), 2, ceil_mode=True)


def spatial_gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dI/dx and dI/dy of (N, 1, H, W) by the 5-point central difference (1, -8, 0, 8, -1) / 12, edges replicated."""
    k = img.new_tensor(DERIVATIVE) / 12
    padded_x = F.pad(img, (2, 2, 0, 0), mode="replicate")
    padded_y = F.pad(img, (0, 0, 2, 2), mode="replicate")
    # $$I_x(x) \approx \tfrac{1}{12}\big(I(x-2) - 8 I(x-1) + 8 I(x+1) - I(x+2)\big)$$
    ix = F.conv2d(padded_x, k.view(1, 1, 1, 5))
    iy = F.conv2d(padded_y, k.view(1, 1, 5, 1))
    return ix, iy


def neighbour_average(flow: torch.Tensor) -> torch.Tensor:
    """Horn & Schunck's weighted mean of the 8 neighbours of every pixel, (N, C, H, W), edges replicated."""
    n, c, h, w = flow.shape
    k = flow.new_tensor(NEIGHBOUR_AVERAGE).view(1, 1, 3, 3)
    out = F.pad(flow.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")  # (N, C, H, W) -> (N*C, 1, H+2, W+2)
    return F.conv2d(out, k).reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------------------------
# Warping
# ---------------------------------------------------------------------------------------------------------------

def sample_grid(flow: torch.Tensor) -> torch.Tensor:
    """The sampling positions x + w(x) of (N, 2, H, W) flow, as grid_sample's normalised grid (N, H, W, 2)
    (align_corners=True: -1 and 1 are the centres of the first and last pixels)."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype, device=flow.device),
                            torch.arange(w, dtype=flow.dtype, device=flow.device), indexing="ij")
    x = xs + flow[:, 0]  # (N, H, W)
    y = ys + flow[:, 1]
    # pixel index -> [-1, 1]: 2 x / (W - 1) - 1
    return torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)  # (N, H, W, 2)


def warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warping: out(x) = img(x + w(x)), bilinear, positions outside the image take the nearest edge.
    img (N, C, H, W), flow (N, 2, H, W) -> (N, C, H, W)."""
    return F.grid_sample(img, sample_grid(flow), mode="bilinear", padding_mode="border", align_corners=True)


def inside(flow: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: does x + w(x) fall inside the image (the data term is only trusted there)?"""
    grid = sample_grid(flow)
    return (grid.abs() <= 1).all(-1, keepdim=True).permute(0, 3, 1, 2)  # (N, H, W, 1) -> (N, 1, H, W)


# ---------------------------------------------------------------------------------------------------------------
# Horn–Schunck
# ---------------------------------------------------------------------------------------------------------------

def horn_schunck_level(i1: torch.Tensor, i2: torch.Tensor, flow: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    """Refine `flow` (N, 2, H, W) from brightness i1 to i2 (N, 1, H, W) at one pyramid level: `cfg.warps` times,
    warp i2 by the flow, linearise, and run `cfg.iterations` Jacobi steps of Horn & Schunck on the increment."""
    for _ in range(cfg.warps):
        i2w = warp(i2, flow)
        grad = torch.cat(spatial_gradients(0.5 * (i1 + i2w)), dim=1)  # (N, 2, H, W): I_x, I_y of the mean image
        trusted = inside(flow).to(i1.dtype)  # no data term where x + w leaves the image: smoothness fills in
        grad = grad * trusted
        # the residual's constant part, I_t - I_x u0 - I_y v0, so that r = (I_x u_bar + I_y v_bar + c) / denom
        c = (i2w - i1) * trusted - (grad * flow).sum(1, keepdim=True)
        inv_denom = 1 / (cfg.alpha**2 + grad.pow(2).sum(1, keepdim=True))
        for _ in range(cfg.iterations):
            avg = neighbour_average(flow)
            # $$r = \frac{I_x(\bar u - u_0) + I_y(\bar v - v_0) + I_t}{\alpha^2 + I_x^2 + I_y^2}$$
            r = ((grad * avg).sum(1, keepdim=True) + c) * inv_denom
            # $$u = \bar u - I_x r, \quad v = \bar v - I_y r$$
            flow = avg - grad * r
    return flow


def pyramid_levels(height: int, width: int, cfg: FlowConfig) -> int:
    """Levels of the pyramid: cfg.levels, or as many halvings as keep the shorter side >= cfg.min_side."""
    if cfg.levels > 0:
        return cfg.levels
    side, levels = min(height, width), 1
    while side // 2 >= cfg.min_side:
        side, levels = side // 2, levels + 1
    return levels


def optical_flow(frames_a: torch.Tensor, frames_b: torch.Tensor, cfg: FlowConfig = FlowConfig()) -> torch.Tensor:
    """Dense flow from each frame of `frames_a` to the frame of `frames_b` at the same index.

    frames_a, frames_b: (N, 3, H, W) in [-1, 1] (or (N, 1, H, W) brightness in [0, 1]); returns (N, 2, H, W) in
    pixels, so that frames_a(x) ~ frames_b(x + w(x)). Coarse to fine: start at zero on the coarsest level,
    refine (`horn_schunck_level`), upsample the flow (values doubled) to the next level, until full size.
    """
    if frames_a.shape != frames_b.shape or frames_a.ndim != 4:
        raise ValueError(f"optical_flow takes two (N, C, H, W) stacks of the same shape, got "
                         f"{tuple(frames_a.shape)} and {tuple(frames_b.shape)}")
    n, _, h, w = frames_a.shape
    chunk = max(1, cfg.chunk_pixels // (h * w))  # pairs per batch: large frames go a few pairs at a time
    if n > chunk:
        return torch.cat([optical_flow(frames_a[i:i + chunk], frames_b[i:i + chunk], cfg) for i in range(0, n, chunk)])
    to_y = brightness if frames_a.shape[1] == 3 else (lambda x: x)
    i1 = gaussian_blur(to_y(frames_a), cfg.presmooth)
    i2 = gaussian_blur(to_y(frames_b), cfg.presmooth)
    levels = [(i1, i2)]
    for _ in range(pyramid_levels(*i1.shape[-2:], cfg) - 1):
        levels.append((downsample(levels[-1][0]), downsample(levels[-1][1])))
    flow = None
    for a, b in reversed(levels):
        n, _, h, w = a.shape
        if flow is None:
            flow = a.new_zeros(n, 2, h, w)
        else:
            scale = flow.new_tensor([w / flow.shape[-1], h / flow.shape[-2]]).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale
        flow = horn_schunck_level(a, b, flow, cfg)
    return flow


def video_flow(video: torch.Tensor, cfg: FlowConfig = FlowConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward flow between the adjacent frames of a video (F, 3, H, W), all pairs in one call:
    forward[k] goes from frame k to k+1, backward[k] from frame k+1 to k; each (F-1, 2, H, W)."""
    a, b = video[:-1], video[1:]
    both = optical_flow(torch.cat([a, b]), torch.cat([b, a]), cfg)  # (2(F-1), 2, H, W)
    return both[: a.shape[0]], both[a.shape[0]:]


# ---------------------------------------------------------------------------------------------------------------
# Occlusions and errors
# ---------------------------------------------------------------------------------------------------------------

def occlusion_mask(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Lai et al. (2018)'s forward–backward consistency test, in the first frame's pixels: (N, 1, H, W) bool,
    True where occluded. The backward flow is read where the forward flow lands, w_b'(x) = w_b(x + w_f(x)); a
    pixel is occluded when the two do not cancel:

        |w_f + w_b'|^2 > 0.01 (|w_f|^2 + |w_b'|^2) + 0.5
    """
    wb = warp(backward, forward)
    # $$|w_f + \hat w_b|^2 > 0.01\,(|w_f|^2 + |\hat w_b|^2) + 0.5$$
    lhs = (forward + wb).pow(2).sum(1, keepdim=True)
    rhs = 0.01 * (forward.pow(2).sum(1, keepdim=True) + wb.pow(2).sum(1, keepdim=True)) + 0.5
    return lhs > rhs
