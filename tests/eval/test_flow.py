"""apla.eval.flow: Horn–Schunck against known motions (float64), against OpenCV's Farnebäck on real frames, warping,
and the forward–backward occlusion test."""
import math

import pytest
import torch.nn.functional as F
import torch

from apla.assets import resolve_video
from apla.eval.flow import (FlowConfig, brightness, neighbour_average, occlusion_mask, optical_flow,
                            spatial_gradients, video_flow, warp)
from apla.video import read_video
from tests.helpers.synthetic import grid, texture

BORDER = 8  # pixels left out at each edge when measuring accuracy


def end_point_error(flow: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-pixel end-point error |w - w_ref| (Euclidean, pixels): (N, 2, H, W) x 2 -> (N, H, W)."""
    return (flow - reference).pow(2).sum(1).sqrt()


def interior_epe(flow, reference) -> float:
    return end_point_error(flow, reference)[:, BORDER:-BORDER, BORDER:-BORDER].mean().item()


def test_shift_of_a_textured_image():
    ys, xs = grid(96)
    a = texture(xs, ys)
    b = texture(xs - 2.0, ys + 1.0)  # b(x + (2, -1)) = a(x): the flow from a to b is (2, -1)
    flow = optical_flow(a, b)
    assert flow.dtype == torch.float64 and flow.shape == (1, 2, 96, 96)
    truth = torch.tensor([2.0, -1.0], dtype=torch.float64).view(1, 2, 1, 1).expand_as(flow)
    assert interior_epe(flow, truth) <= 0.25
    assert interior_epe(flow, truth) < 0.1 * interior_epe(torch.zeros_like(flow), truth)


def test_smooth_rotation():
    size, angle = 96, math.radians(3.0)
    ys, xs = grid(size)
    c, cos, sin = (size - 1) / 2, math.cos(angle), math.sin(angle)
    a = texture(xs, ys)
    # b shows a turned by `angle` about the centre: b(R(x - c) + c) = a(x)
    b = texture(cos * (xs - c) + sin * (ys - c) + c, -sin * (xs - c) + cos * (ys - c) + c)
    truth = torch.stack([cos * (xs - c) - sin * (ys - c) + c - xs, sin * (xs - c) + cos * (ys - c) + c - ys])[None]
    assert truth.norm(dim=1).max() > 3  # up to 3.5 px at the corners: not a small-motion test
    flow = optical_flow(a, b)
    assert interior_epe(flow, truth) <= 0.25


def test_batched_pairs_are_independent():
    """Pairs in one batch give what each gives alone (no mixing across the batch)."""
    ys, xs = grid(48)
    a = torch.cat([texture(xs, ys, 1), texture(xs, ys, 2)])
    b = torch.cat([texture(xs - 1.0, ys, 1), texture(xs, ys - 1.5, 2)])
    both = optical_flow(a, b)
    assert torch.allclose(both[1:], optical_flow(a[1:], b[1:]), atol=1e-10)
    assert torch.allclose(both[:1], optical_flow(a[:1], b[:1]), atol=1e-10)


def test_identical_frames_have_zero_flow():
    a = texture(*reversed(grid(40)))
    # zero up to grid_sample's rounding of pixel positions (float64)
    assert optical_flow(a, a).abs().max().item() < 1e-12


def test_warp_is_backward_and_exact_on_whole_pixels():
    img = torch.arange(5 * 7, dtype=torch.float64).view(1, 1, 5, 7)
    flow = torch.zeros(1, 2, 5, 7, dtype=torch.float64)
    flow[:, 0] = 2.0  # read two pixels to the right
    out = warp(img, flow)
    assert torch.equal(out[..., :5], img[..., 2:])  # out(x) = img(x + 2)
    assert torch.equal(out[..., 5:], img[..., 6:].expand(1, 1, 5, 2))  # past the edge: the edge's value
    half = flow * 0.25  # half a pixel: the mean of the two neighbours
    assert torch.allclose(warp(img, half)[..., :-1], (img[..., :-1] + img[..., 1:]) / 2)


def test_derivative_and_neighbour_average_closed_forms():
    ys, xs = grid(12)
    ramp = (3 * xs - 2 * ys + 0.5 * xs**2)[None, None]  # a quadratic: the 5-point difference is exact inside
    ix, iy = spatial_gradients(ramp)
    assert torch.allclose(ix[..., 2:-2, 2:-2], (3 + xs)[None, None, 2:-2, 2:-2])
    assert torch.allclose(iy[..., 2:-2, 2:-2], torch.full_like(iy[..., 2:-2, 2:-2], -2.0))
    # Horn & Schunck's average keeps a linear field and, on a quadratic, is off by (1/3) x the Laplacian
    lin = (xs + 2 * ys)[None, None].repeat(1, 2, 1, 1)
    assert torch.allclose(neighbour_average(lin)[..., 1:-1, 1:-1], lin[..., 1:-1, 1:-1])
    quad = (xs**2)[None, None].repeat(1, 2, 1, 1)
    assert torch.allclose(neighbour_average(quad)[..., 1:-1, 1:-1] - quad[..., 1:-1, 1:-1],
                          torch.full_like(quad[..., 1:-1, 1:-1], 2 / 3))


def test_occlusion_mask_forward_backward_test():
    n, h, w = 1, 6, 6
    fw = torch.zeros(n, 2, h, w, dtype=torch.float64)
    fw[:, 0] = 1.0
    assert not occlusion_mask(fw, -fw).any()  # they cancel: nothing occluded
    assert occlusion_mask(fw, fw).all()  # |2|^2 = 4 > 0.01 * 2 + 0.5
    # the threshold itself, on a constant field: |w_f + w_b|^2 = d^2 against 0.01 (|w_f|^2 + |w_b|^2) + 0.5
    for d, occluded in ((0.70, False), (0.72, True)):
        bw = -fw.clone()
        bw[:, 0] += d
        assert occlusion_mask(fw, bw).all().item() is occluded, d
    # the backward flow is read where the forward flow lands: w_b(x + w_f(x))
    bw = torch.zeros(n, 2, h, w, dtype=torch.float64)
    bw[:, 0, :, 3] = -1.0  # only column 3 points back; the pixels of column 2 land there
    mask = occlusion_mask(fw, bw)[0, 0]
    assert not mask[:, 2].any() and mask[:, 1].all() and mask[:, 3].all()


def test_video_flow_shapes_and_direction():
    ys, xs = grid(32)
    video = torch.cat([texture(xs - k, ys) for k in range(4)])  # content moves 1 px right per frame
    forward, backward = video_flow(video)
    assert forward.shape == backward.shape == (3, 2, 32, 32)
    inner = (slice(None), slice(None), slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    assert forward[inner][:, 0].mean() == pytest.approx(1.0, abs=0.1)
    assert backward[inner][:, 0].mean() == pytest.approx(-1.0, abs=0.1)


def test_pyramid_takes_any_size_and_float32():
    ys, xs = grid(40)
    a = texture(xs, ys)[..., :37].float()
    b = texture(xs - 1.0, ys)[..., :37].float()
    flow = optical_flow(a, b, FlowConfig(min_side=8))
    assert flow.shape == (1, 2, 40, 37) and flow.dtype == torch.float32 and torch.isfinite(flow).all()


def test_against_opencv_farneback_on_big_buck_bunny():
    """8 frames of the bundled clip at 128x224: the mean end-point difference from OpenCV's Farnebäck flow is
    bounded, and our flow explains the next frame at least as well as Farnebäck's (photometric error after
    warping). Measured: mean difference 0.75 px, median 0.10 px; photometric error 0.040 (ours) vs 0.045."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless, a dev extra) is the reference")
    video = read_video(resolve_video("bigbuckbunny"), 8, size=(128, 224))  # (8, 3, 128, 224)
    grey = [cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) for a in ((video + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]
    reference = torch.stack([torch.from_numpy(cv2.calcOpticalFlowFarneback(grey[k], grey[k + 1], None, 0.5, 5, 15,
                                                                          5, 7, 1.5, 0)).permute(2, 0, 1)
                             for k in range(7)])  # (7, 2, H, W)
    ours = optical_flow(video[:-1], video[1:])
    inner = (slice(None), slice(None), slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    epe = end_point_error(ours[inner], reference[inner])
    assert reference.norm(dim=1).mean() > 1.0  # the clip moves
    assert epe.mean() < 1.2 and epe.median() < 0.2

    def photometric(flow):
        return (warp(video[1:], flow) - video[:-1]).abs()[inner].mean().item()

    assert photometric(ours) <= photometric(reference)
    assert photometric(ours) < 0.9 * photometric(torch.zeros_like(ours))


def known_warp(frame: torch.Tensor, shift=(0.0, 0.0), degrees: float = 0.0):
    """The second image of a pair whose flow is known: `frame` (1, 3, H, W) turned by `degrees` about its centre c,
    then moved by `shift` (dx, dy) px, so b(R(x - c) + c + s) = a(x); read bicubically, edges replicated. Returns
    b (1, 3, H, W) and the true flow w(x) = R(x - c) + c + s - x, (1, 2, H, W)."""
    _, _, h, w = frame.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=frame.dtype), torch.arange(w, dtype=frame.dtype), indexing="ij")
    cx, cy, t = (w - 1) / 2, (h - 1) / 2, math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    truth = torch.stack([cos * (xs - cx) - sin * (ys - cy) + cx + shift[0] - xs,
                         sin * (xs - cx) + cos * (ys - cy) + cy + shift[1] - ys])[None]
    # b(y) = a(R^-1 (y - c - s) + c): where each pixel of b comes from
    px, py = xs - cx - shift[0], ys - cy - shift[1]
    sx, sy = cos * px + sin * py + cx, -sin * px + cos * py + cy
    grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], -1)[None]  # (1, H, W, 2)
    b = F.grid_sample(frame, grid, mode="bicubic", padding_mode="border", align_corners=True)
    return b.clamp(-1, 1), truth


def to_8bit(frames: torch.Tensor) -> torch.Tensor:
    """Round frames in [-1, 1] to the 256 levels of an 8-bit image (both methods see the same quantised pixels)."""
    return ((frames + 1) * 127.5).round() / 127.5 - 1


def textured_half(frame: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the pixels away from the border whose brightness gradient magnitude is above the median there
    (where a flow can be measured at all; flat sky is left to the smoothness of each method)."""
    ix, iy = spatial_gradients(brightness(frame))
    magnitude = (ix**2 + iy**2).sqrt()[0, 0]
    inner = torch.zeros_like(magnitude, dtype=torch.bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = True
    return inner & (magnitude > magnitude[inner].median())


# (frame, shift (dx, dy) px, rotation in degrees about the centre): four frames spread over the 24-frame clip
KNOWN_MOTIONS = [(0, (1.5, -1.0), 0.0), (7, (0.6, 2.3), 0.0), (14, (0.0, 0.0), 1.5), (21, (0.0, 0.0), -2.0)]
FARNEBACK = (0.5, 5, 15, 3, 5, 1.1, 0)  # pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags


def test_known_warps_of_big_buck_bunny_against_opencv_farneback():
    """Four frames of the bundled clip at 128x224, each moved by a known sub-pixel shift or small rotation: over
    the textured half of the pixels, our end-point error against the analytic flow is no worse than Farnebäck's
    on average, and within 3x of it on every case (Farnebäck is nearly exact on a pure shift). Measured (EPE px,
    ours / Farnebäck): shift (1.5, -1) 0.021 / 0.008, shift (0.6, 2.3) 0.052 / 0.046, 1.5 degrees 0.042 / 0.077,
    -2 degrees 0.042 / 0.097; mean 0.039 / 0.057."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless, a dev extra) is the reference")
    video = read_video(resolve_video("bigbuckbunny"), 24, size=(128, 224)).double()  # (24, 3, 128, 224)
    firsts, seconds, truths, masks = [], [], [], []
    for k, shift, degrees in KNOWN_MOTIONS:
        a = to_8bit(video[k:k + 1])
        b, truth = known_warp(a, shift, degrees)
        firsts.append(a), seconds.append(to_8bit(b)), truths.append(truth), masks.append(textured_half(a))
    assert all(truth.norm(dim=1).max() > 1.0 for truth in truths)  # every case moves by more than a pixel somewhere

    def grey(frame):  # (1, 3, H, W) in [-1, 1] -> (H, W) uint8, OpenCV's own RGB -> grey
        return cv2.cvtColor(((frame[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), cv2.COLOR_RGB2GRAY)

    ours = optical_flow(torch.cat(firsts), torch.cat(seconds))  # (4, 2, H, W)
    theirs = [torch.from_numpy(cv2.calcOpticalFlowFarneback(grey(a), grey(b), None, *FARNEBACK)).permute(2, 0, 1)
              for a, b in zip(firsts, seconds)]  # (H, W, 2) -> (2, H, W) each
    ours_epe = [end_point_error(ours[i:i + 1], truths[i])[0][masks[i]].mean().item() for i in range(len(masks))]
    theirs_epe = [end_point_error(theirs[i][None].double(), truths[i])[0][masks[i]].mean().item()
                  for i in range(len(masks))]
    assert sum(ours_epe) <= sum(theirs_epe), (ours_epe, theirs_epe)
    for case, mine, reference in zip(KNOWN_MOTIONS, ours_epe, theirs_epe):
        assert mine <= 3 * reference, (case, mine, reference)
    assert max(ours_epe) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    ys, xs = grid(64)
    a, b = texture(xs, ys).float(), texture(xs - 1.5, ys + 0.5).float()
    cpu = optical_flow(a, b)
    gpu = optical_flow(a.cuda(), b.cuda()).cpu()
    assert end_point_error(gpu, cpu).max() < 1e-3
