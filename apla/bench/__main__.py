"""python -m apla.bench: time, peak memory and FLOPs of APLA's training step and of sampling, at any size, on CPU or
CUDA, with models of random weights (nothing is downloaded).

    python -m apla.bench --model tiny --compare-diffusers      # our U-Net against diffusers' on the same frames
    python -m apla.bench --model micro                          # the default run's step, inversion, sampling, VAE
    python -m apla.bench --model sd15 --predict                 # SD size on the meta device: FLOPs, memory budget
    python -m apla.bench --model sd15 --vgt pure,hyper          # SD size, measured (a GPU)
    python -m apla.bench --load sd15-fp16.safetensors           # wall time and peak memory of loading weights

The measurements are apla/bench/core.py's; `--predict` is apla/bench/predict.py, `--compare-diffusers`
apla/bench/compare.py, `--load` apla/bench/load.py. The tables are printed, and appended to a markdown file with `--append`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from apla.bench.compare import compare_table
from apla.bench.core import MEASURES, bench_model, format_rows, measure_all, run_config
from apla.bench.load import load_table
from apla.bench.predict import predict_table
from apla.checkpoint import atomic_write_bytes
from apla.cli import (CHECKPOINTING, PRECISIONS, OneLineParser, fail, in_range, pick_device,
                      resolve_gradient_checkpointing, resolve_mixed_precision)
from apla.config import AT_LEAST_ONE, SIDE, TrainConfig
from apla.vgt import VARIANTS


def parser():
    p = OneLineParser(prog="python -m apla.bench", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", choices=("sd15", "micro", "tiny"), default="tiny",
      help="the architecture, random weights (default: tiny)")
    a("--frames", type=in_range(int, AT_LEAST_ONE), default=None, help="frames (default: the model's: 24, 8, 8)")
    a("--size", type=in_range(int, SIDE), default=None,
      help="frame side in px (default: the model's: 512, 64, 256)")
    a("--vgt", default="pure,hyper", help="VGT variants of the step, comma-separated (default: pure,hyper)")
    a("--measure", default=None,
      help=f"what to time, comma-separated from {','.join(MEASURES)}, or all or none (default: all, or none with "
           "--compare-diffusers or --predict)")
    a("--steps", type=in_range(int, TrainConfig.RANGES["sample_steps"]), default=50, help="DDIM steps (default: 50)")
    a("--repeats", type=in_range(int, AT_LEAST_ONE), default=5, help="timed runs after the warm-up (default: 5)")
    a("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ... (default: auto)")
    a("--mixed-precision", choices=PRECISIONS, default="auto", help="as train.py (default: auto)")
    a("--gradient-checkpointing", choices=CHECKPOINTING, default="auto", help="as train.py (default: auto)")
    a("--compile", action="store_true", help="torch.compile the U-Net and VGT, as train.py --compile")
    a("--threads", type=in_range(int, AT_LEAST_ONE), default=None, help="torch CPU threads (default: torch's)")
    a("--compare-diffusers", action="store_true",
      help="time our U-Net against diffusers' UNet2DConditionModel on the same frames and weights (needs diffusers)")
    a("--predict", action="store_true", help="FLOPs and predicted peak memory of one step on the meta device, as on "
                                              "CUDA (auto precision and checkpointing resolve as on CUDA)")
    a("--load", default=None, help="SD weights files (comma-separated): time and peak resident memory of "
                                   "loading each on the CPU, in a fresh process (measures nothing else)")
    a("--load-with", default=None, help="with --load: the checkouts whose apla package loads, comma-separated "
                                        "(default: this one), to measure code before and after a change in one run")
    a("--append", default=None, help="also append the tables to this markdown file (e.g. apla/bench/README.md)")
    return p


def _choices(text: str, allowed, flag: str) -> tuple:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        fail(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = bench_model(args.model)
    variants = _choices(args.vgt, VARIANTS, "--vgt")
    default_measures = "none" if args.compare_diffusers or args.predict or args.load else "all"
    measure_arg = args.measure or default_measures
    measures = () if measure_arg == "none" else MEASURES if measure_arg == "all" else _choices(
        measure_arg, MEASURES, "--measure")
    frames, size = args.frames or spec.run.frames, args.size or spec.run.size
    if size % spec.vae_factor or (size // spec.vae_factor) % spec.run.vgt_model.patch_size:
        fail(f"--size {size}: the {args.model} model needs a multiple of "
             f"{spec.vae_factor * spec.run.vgt_model.patch_size} px")
    device = pick_device(args.device)
    command = "python -m apla.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    tables = []
    if args.load:
        code_dirs = args.load_with.split(",") if args.load_with else (None,)
        tables.append(load_table(args.load.split(","), code_dirs))
    if args.predict:
        tables.append(predict_table(spec, frames, size, variants, args.mixed_precision, args.gradient_checkpointing))
    if args.compare_diffusers:
        tables.append(compare_table(spec, frames, size, device, resolve_mixed_precision(args.mixed_precision, device),
                                    args.repeats))
    if measures:
        checkpointing = resolve_gradient_checkpointing(args.gradient_checkpointing, device, spec.unet)
        cfg = run_config(spec, frames, size, variants[0], resolve_mixed_precision(args.mixed_precision, device),
                         checkpointing)
        cfg.compile = args.compile
        rows = measure_all(spec, cfg, variants, measures, device, args.steps, args.repeats)
        tables.append(format_rows(rows, cfg, device))
    text = f"`{command}`\n\n" + "\n\n".join(tables) + "\n"
    print(text)
    if args.append:
        path = Path(args.append)
        old = path.read_text() if path.is_file() else ""
        atomic_write_bytes(path, (old + ("\n" if old else "") + text).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
