"""Time, peak memory and FLOPs of APLA's training step and of sampling, at any size, on CPU or CUDA, with models of
random weights (nothing is downloaded); the command line is `python -m apla.bench` (apla/bench/__main__.py).

What is measured is what train.py and sample.py run: one step is `apla.algorithm.APLA.train_step` (Eq. 1 noising,
the U-Net's trainable set and VGT, D, the hyper-loss, both AdamW steps) on models built by `apla.run.build_apla`;
inversion and sampling are `apla.scheduler.ddim_invert` / `ddim_sample` on `APLA.eps_star` / `APLA.guided_eps`;
the VAE passes are `apla.run.encode_clip` / `decode_latents`. Each is run once under torch's FlopCounterMode (the
warm-up and the FLOP count), then `--repeats` times timed; the table gives the median, the peak memory of the timed
runs (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set, weights and all), the FLOPs and
FLOPs / median time. FLOPs follow torch's counter: 2 per multiply-add of matrix products and convolutions, attention
as its two (forward) or four (backward) products; on the CPU the counter misses the fused attention kernel, which
`FLOP_FORMULAS` adds. `--predict` and `--compare-diffusers` are in apla/bench/predict.py and apla/bench/compare.py.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from apla import run
from apla.assets import model_path
from apla.cli import autocast_for
from apla.config import SD_V15, TrainConfig, default_config
from apla.scheduler import ddim_invert, ddim_sample, ddim_timesteps, make_alpha_bar
from apla.sd.unet import UNet3DConditionModel, UNetConfig
from apla.sd.vae import AutoencoderKL, VAEConfig
from apla.sd.weights import StableDiffusion

_aten = torch.ops.aten
# the CPU's fused attention, which torch's FLOP counter does not know: the same count as its CUDA kernels
FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v),
}
MEASURES = ("step", "invert", "sample", "encode", "decode")


@dataclasses.dataclass
class BenchModel:
    """The architecture of a benchmark: U-Net and VAE configs, the text states' width and the run's settings (clip
    frames and size, VGT sizes) as a TrainConfig."""

    unet: UNetConfig
    vae: VAEConfig
    context_dim: int
    run: TrainConfig

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)


def bench_model(name: str) -> BenchModel:
    """'sd15': SD v1.5's U-Net and VAE, CLIP ViT-L's 768-wide text states, the paper's 24 frames at 512 px and VGT;
    'micro': the bundled micro SD's configs and run preset (8 frames at 64 px); 'tiny': SD's architecture at a quarter
    of its widths with SD's head widths (80/160/320/320 channels, 2 heads: heads of 40/80/160 as SD's), 8 frames at
    256 px (32x32 latents), the micro run's VGT."""
    if name == "sd15":
        return BenchModel(UNetConfig(), VAEConfig(), 768, TrainConfig.from_dict(SD_V15))
    micro = default_config("micro")
    if name == "micro":
        folder = model_path("micro")
        read = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
        return BenchModel(UNetConfig.from_diffusers(read("unet")), VAEConfig.from_diffusers(read("vae")),
                          read("text_encoder")["hidden_size"], micro)
    if name == "tiny":
        unet = UNetConfig(block_out_channels=(80, 160, 320, 320), attention_head_dim=2, norm_num_groups=16)
        vae = VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16)
        return BenchModel(unet, vae, 768, dataclasses.replace(TrainConfig.from_dict(SD_V15), frames=8, size=256,
                                                              vgt_model=micro.vgt_model))
    raise ValueError(f"unknown model {name!r}: sd15, micro or tiny")


def run_config(spec: BenchModel, frames: int, size: int, vgt: str, mixed_precision: str, checkpointing) -> TrainConfig:
    """The TrainConfig of a benchmark run: the model's, at `frames` x `size` px, with VGT `vgt`, random VGG features
    for L_per (nothing downloaded) and the given (resolved) precision and checkpointing."""
    cfg = dataclasses.replace(spec.run, frames=frames, size=size, mixed_precision=mixed_precision,
                              gradient_checkpointing=checkpointing)
    cfg.apla = dataclasses.replace(cfg.apla, vgt=vgt, perceptual_weights="random")
    return cfg


def latent_shape(spec: BenchModel, cfg: TrainConfig) -> tuple:
    h = cfg.size // spec.vae_factor
    return 1, spec.unet.in_channels, cfg.frames, h, h


def build(spec: BenchModel, cfg: TrainConfig, device, with_vae: bool = True):
    """(APLA, VAE or None) with random weights on `device` (the meta device too), as train.py builds them
    (apla.run.build_apla). On the meta device every module is created there; elsewhere VGT, D and the VGG features
    are initialised on the CPU (their seeded generators) and moved."""
    with torch.device(device):
        sd = StableDiffusion(AutoencoderKL(spec.vae) if with_vae else None, None, None, make_alpha_bar(),
                             UNet3DConditionModel(dataclasses.replace(spec.unet)))
    with torch.device(device) if torch.device(device).type == "meta" else nullcontext():
        model = run.build_apla(cfg, sd, latent_shape(spec, cfg), device)
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    return model, sd.vae


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------------

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the kernel's high-water mark of the resident set (Linux)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then runs from the start of the process


def peak_memory(device) -> int:
    """Bytes: torch.cuda.max_memory_allocated on CUDA, else the process's peak resident set since reset_peak."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass
class Row:
    what: str
    seconds: float  # median of the timed runs
    runs: int
    peak_bytes: int
    flops: int

    @property
    def tflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e12


def count_flops(fn) -> int:
    """FLOPs of one call of fn (which runs it), with the CPU attention kernel counted (FLOP_FORMULAS)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def measure(what: str, fn, device, repeats: int) -> Row:
    """One call under the FLOP counter (the warm-up), then `repeats` timed calls: median time and peak memory."""
    flops = count_flops(fn)
    times, peaks = [], []
    for _ in range(repeats):
        synchronize(device)
        reset_peak(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        peaks.append(peak_memory(device))
    return Row(what, statistics.median(times), repeats, max(peaks), flops)


def measure_all(spec: BenchModel, cfg: TrainConfig, variants, measures, device, steps: int, repeats: int) -> list:
    """The rows of the table: a training step per VGT variant, then (with the first variant) DDIM inversion, guided
    DDIM sampling and the VAE passes, as asked by `measures`. With cfg.compile the networks are compiled (the
    untimed first call compiles)."""
    g = torch.Generator().manual_seed(0)
    shape = latent_shape(spec, cfg)
    z0 = torch.randn(shape, generator=g).to(device)
    eps = torch.randn(shape, generator=g).to(device)
    context, uncond = torch.randn(2, 1, 77, spec.context_dim, generator=g).to(device)
    t = torch.tensor([500], device=device)
    amp = autocast_for(cfg.mixed_precision, device)
    steps_rows, rows, F = [], [], cfg.frames
    for variant in variants:
        model, vae = build(spec, dataclasses.replace(cfg, apla=dataclasses.replace(cfg.apla, vgt=variant)), device)
        if cfg.compile:
            model.compile_networks()
        if "step" in measures:
            opt_g, opt_d = run.optimizers(cfg, model)
            scaler = torch.amp.GradScaler(torch.device(device).type, enabled=cfg.mixed_precision == "fp16")
            step = lambda: model.train_step(z0, context, t, eps, opt_g, opt_d, scaler, cfg.max_grad_norm, amp)  # noqa
            steps_rows.append(measure(f"APLA step, VGT-{variant}", step, device, repeats))
            del opt_g, opt_d
        if variant != variants[0]:
            continue
        model.eval()
        timesteps = ddim_timesteps(steps, len(model.alpha_bar))
        if "invert" in measures:
            invert = lambda: ddim_invert(lambda z, s: model.eps_star(z, s, uncond), z0, timesteps,  # noqa: E731
                                         model.alpha_bar, progress=False)
            rows.append(measure(f"DDIM inversion, {steps} steps", lambda: _under(amp, invert), device, repeats))
        if "sample" in measures:
            sample = lambda: ddim_sample(lambda z, s: model.guided_eps(z, s, uncond, context, cfg.guidance),  # noqa
                                         z0, timesteps, model.alpha_bar, progress=False)
            rows.append(measure(f"guided DDIM sampling, {steps} steps", lambda: _under(amp, sample), device, repeats))
        frames = torch.rand(F, 3, cfg.size, cfg.size, generator=g) * 2 - 1
        if "encode" in measures:
            encode = lambda: run.encode_clip(vae, frames, device)  # noqa: E731
            rows.append(measure(f"VAE encode, {F} frames", encode, device, repeats))
        if "decode" in measures:
            rows.append(measure(f"VAE decode, {F} frames", lambda: run.decode_latents(vae, z0), device, repeats))
        del model, vae
    return steps_rows + rows


def _under(context, fn):
    with context:
        return fn()


# ---------------------------------------------------------------------------------------------------------------
# The table and the command line
# ---------------------------------------------------------------------------------------------------------------

def machine(device) -> str:
    """One line naming where the figures come from."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} torch thread(s)"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def format_rows(rows: list, cfg: TrainConfig, device) -> str:
    dtype = {"no": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[cfg.mixed_precision]
    ckpt = "checkpointing" if cfg.gradient_checkpointing else "no checkpointing"
    ckpt += ", compiled" if cfg.compile else ""
    peak = "peak allocated" if torch.device(device).type == "cuda" else "peak RSS (process)"
    lines = [f"{cfg.frames} frames x {cfg.size}^2 px on {device} ({machine(device)}); {dtype}, {ckpt}",
             "", f"| measurement | median s | runs | {peak} | GFLOP | TFLOP/s |", "| --- " * 6 + "|"]
    for r in rows:
        lines.append(f"| {r.what} | {r.seconds:.3f} | {r.runs} | {gb(r.peak_bytes)} | {r.flops / 1e9:,.1f} | "
                     f"{r.tflops_per_s:.3f} |")
    return "\n".join(lines)
