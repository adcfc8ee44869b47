"""`python -m apla.bench --compare-diffusers`: our U-Net against diffusers' `UNet2DConditionModel` on the same B*F
frames with the same weights, forward and forward + backward.

Three networks take part: diffusers' 2D U-Net on the F frames as a batch of images (the text states repeated per
image, as a 2D pipeline would); ours with the inflation switched off (`UNet3DConditionModel.set_inflation(False)`:
per-frame self-attention, no temporal attention, GroupNorm per frame -- SD frame by frame, the same arithmetic as
theirs); and ours inflated as an APLA run trains it (sparse-causal and temporal attention, GroupNorm over the
clip's frames). Backward trains what a run trains: our trainable set (`apla.config.DEFAULT_TRAINABLE`), and for
diffusers the same queries `attn1.to_q`, `attn2.to_q` (it has no temporal layers). The timed runs of the three
alternate in a shuffled order each round, so a machine whose load changes slows them alike; each time is a median.

diffusers is a development dependency only: it is imported here, when asked for.
"""
from __future__ import annotations

import dataclasses
import random
import statistics
import time

import torch

from apla.bench.core import BenchModel, count_flops, machine, synchronize
from apla.cli import autocast_for, fail
from apla.config import DEFAULT_TRAINABLE
from apla.sd.unet import UNet3DConditionModel, is_temporal_param, mark_trainable

# UNetConfig fields that are diffusers' UNet2DConditionModel arguments of the same name
DIFFUSERS_ARGS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "attention_head_dim",
                  "cross_attention_dim", "norm_num_groups", "norm_eps", "down_block_types", "up_block_types",
                  "flip_sin_to_cos", "freq_shift", "use_linear_projection", "upcast_attention")


def diffusers_twin(ours: UNet3DConditionModel, sample_size: int):
    """diffusers' UNet2DConditionModel of our config, holding our weights (every tensor but the temporal ones)."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        fail("--compare-diffusers needs diffusers (a development dependency): pip install -e '.[dev]'")
    cfg = ours.config
    with torch.device(next(ours.parameters()).device):
        theirs = UNet2DConditionModel(sample_size=sample_size, **{k: getattr(cfg, k) for k in DIFFUSERS_ARGS})
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if not is_temporal_param(k)}, strict=True)
    for name, p in theirs.named_parameters():
        p.requires_grad_(".attn1.to_q." in name or ".attn2.to_q." in name)
    return theirs


def compare(spec: BenchModel, frames: int, size: int, device, mixed_precision: str, repeats: int) -> dict:
    """{pass: {network: (median seconds, FLOPs)}} for passes "forward" and "forward + backward" and networks
    "diffusers", "off", "inflated"."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = UNet3DConditionModel(dataclasses.replace(spec.unet))
    h = size // spec.vae_factor
    theirs = diffusers_twin(ours, h)
    mark_trainable(ours, DEFAULT_TRAINABLE)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, spec.unet.in_channels, frames, h, h, generator=g).to(device)
    context = torch.randn(1, 77, spec.context_dim, generator=g).to(device)
    t = torch.tensor([500], device=device)
    z_images = z[0].transpose(0, 1).contiguous()  # (1, C, F, h, w) -> (F, C, h, w): the frames as images
    context_images = context.expand(frames, -1, -1)  # (1, 77, D) -> (F, 77, D): the text per image
    groupnorm_frames = spec.run.groupnorm == "frames"

    def ours_as(inflated: bool):
        def forward():
            ours.set_inflation(inflated)
            ours.set_norm_over_frames(inflated and groupnorm_frames)
            return ours(z, t, context)
        return forward

    networks = {"diffusers": lambda: theirs(z_images, t.expand(frames), context_images).sample,
                "off": ours_as(False), "inflated": ours_as(True)}
    amp = autocast_for(mixed_precision, device)
    params = [p for m in (ours, theirs) for p in m.parameters() if p.requires_grad]
    order = random.Random(0)
    results = {}
    for name, backward in (("forward", False), ("forward + backward", True)):
        def call(net):
            with (torch.enable_grad() if backward else torch.no_grad()), amp:
                out = net()
            if backward:
                out.float().square().mean().backward()
                for p in params:
                    p.grad = None

        flops = {k: count_flops(lambda: call(net)) for k, net in networks.items()}  # also the warm-up
        times = {k: [] for k in networks}
        for _ in range(repeats):
            for k in order.sample(list(networks), len(networks)):
                synchronize(device)
                t0 = time.perf_counter()
                call(networks[k])
                synchronize(device)
                times[k].append(time.perf_counter() - t0)
        results[name] = {k: (statistics.median(times[k]), flops[k]) for k in networks}
    ours.set_inflation(True)
    return results


def compare_table(spec: BenchModel, frames: int, size: int, device, mixed_precision: str, repeats: int) -> str:
    """The comparison as a markdown table, with its settings in a line above."""
    results = compare(spec, frames, size, device, mixed_precision, repeats)
    h = size // spec.vae_factor
    dtype = {"no": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[mixed_precision]
    lines = [f"U-Net against diffusers' UNet2DConditionModel: {frames} frames of {h}x{h} latents (channels "
             f"{'/'.join(map(str, spec.unet.block_out_channels))}, {spec.unet.attention_head_dim} heads), {dtype}, on "
             f"{device} ({machine(device)}); median of {repeats} runs each, interleaved",
             "", "| pass | diffusers s | ours, inflation off s | off / diffusers | ours, inflated s | "
             "inflated / diffusers | FLOP ratio inflated / diffusers | time ratio / FLOP ratio | GFLOP diffusers, off, "
             "inflated |", "| --- " * 9 + "|"]
    for name, r in results.items():
        (td, fd), (to, fo), (ti, fi) = r["diffusers"], r["off"], r["inflated"]
        lines.append(f"| {name} | {td:.3f} | {to:.3f} | {to / td:.3f} | {ti:.3f} | {ti / td:.3f} | {fi / fd:.3f} | "
                     f"{(ti / td) / (fi / fd):.3f} | {fd / 1e9:,.1f}, {fo / 1e9:,.1f}, {fi / 1e9:,.1f} |")
    return "\n".join(lines)

