"""Command lines of train.py and sample.py: flags, config files (TOML or JSON) and one-line errors.

A training run's configuration is resolved in this order, later wins:
  TrainConfig's defaults (SD v1.5 and the paper) <- the preset of the base model (e.g. "micro")
  <- a --config file (.toml or .json, keys as in config.json) <- command-line flags.
The resolved configuration is saved as config.json in the run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import NoReturn, Optional

import torch

from apla.assets import preset
from apla.config import CHECKPOINTING, GROUPNORM, PRECISIONS, SEED, Range, TrainConfig, default_config

SD_WIDTH = 320  # channels of SD v1.5's first U-Net level; 'auto' checkpoints U-Nets this wide on CUDA


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as given ('cpu', 'cuda:1', ...), or one line and
    exit 2 for a name torch does not know or a CUDA device on a machine without one."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError as e:
        fail(f"--device {name}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """--mixed-precision as a run uses it: 'auto' is bf16 on a CUDA device with native bfloat16 (compute capability
    8.0 or later, or ROCm), fp16 (trained with the gradient scaler) on an older CUDA device, and 'no' (float32) on
    any other device; 'no', 'bf16' and 'fp16' stay as given."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "no"
    native_bf16 = bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return "bf16" if native_bf16 else "fp16"


def resolve_gradient_checkpointing(setting, device: torch.device, unet_config) -> bool:
    """--gradient-checkpointing as a run uses it: 'auto' is on for a U-Net of Stable Diffusion's size (a first level
    of SD_WIDTH channels or more) on CUDA, where a 24-frame clip's activations would not fit, and off otherwise (a
    CPU, or the micro model); True / 'on' and False / 'off' as given."""
    if setting == "auto":
        return device.type == "cuda" and unet_config.block_out_channels[0] >= SD_WIDTH
    return setting in (True, "on")


def autocast_for(mixed_precision: str, device: torch.device):
    """The autocast context of a resolved --mixed-precision (resolve_mixed_precision): none for 'no', else bf16 or
    fp16."""
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"autocast_for: {mixed_precision!r} is not resolved (resolve_mixed_precision first)")
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type,
                          dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit with `code` (2: bad input, as argparse does); a message that spans lines
    (a library's, passed on) is joined into one."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def in_range(kind, allowed: Range):
    """An argparse `type` that reads a flag's value with `kind` (int or float) and checks it against `allowed`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        problem = allowed.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value) are one line and exit status 2."""

    def error(self, message):  # noqa: D401 - argparse's hook
        fail(f"{self.prog}: {message} (see --help)")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" after every flag's help, except where the help already says what None means."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        fail(f"--config {path}: no such file")
    try:
        if p.suffix == ".toml":
            import tomllib
            return tomllib.loads(p.read_text())
        if p.suffix == ".json":
            return json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - one line for any parse error
        fail(f"--config {path}: cannot parse: {e}")
    fail(f"--config {path}: expected a .toml or .json file")


def train_parser() -> argparse.ArgumentParser:
    d = default_config()
    p = OneLineParser(prog="train.py", formatter_class=DefaultsFormatter,
                      description="Tune Stable Diffusion (inflated to video) on one clip with APLA. The defaults "
                                  "shown are the micro model's preset; with another --pretrained (an SD v1.5 file, "
                                  "folder or hub id) the SD-size defaults of apla.config.TrainConfig apply: 24 "
                                  "frames at 512 px, 750 steps, lr 3e-5, the bigbuckbunny clip.")
    a = p.add_argument
    a("--config", default=None,
      help="a .toml or .json file of TrainConfig fields; flags override it (default: none)")
    a("--pretrained", default=d.pretrained,
      help="base model: a single .safetensors file, a diffusers-style folder, a hub id, or 'micro'")
    a("--video", default=d.video, help="the clip: a folder of frames, a GIF, an MP4/WebM/MOV (needs PyAV), or a bundled clip's name "
           "(bigbuckbunny, red-circle-right)")
    a("--prompt", default=d.prompt, help="the clip's caption")
    a("--output-dir", default=d.output_dir, help="the run directory")
    a("--max-steps", type=int, default=d.max_steps, help="training steps (the paper: 750 or 1500)")
    a("--frames", type=int, default=d.frames, help="frames taken from the clip")
    a("--start", type=int, default=d.start, help="first frame taken")
    a("--stride", type=int, default=d.stride, help="take every n-th frame")
    a("--size", type=int, default=d.size, help="training resolution (square, a multiple of 8)")
    a("--seed", type=int, default=d.seed,
      help="seed of every random draw: noise, timesteps and the initial weights of VGT, D and random VGG features")
    a("--lr", type=float, default=d.lr, help="AdamW learning rate of the U-Net's trainable set and VGT")
    a("--disc-lr", type=float, default=d.disc_lr, help="AdamW learning rate of the discriminator")
    a("--vgt", choices=["pure", "hyper", "pure-en", "hyper-en", "none"], default=d.apla.vgt,
      help="VGT variant (Table 1); 'none' is the 'w/o VGT' ablation")
    a("--no-discriminator", action="store_true", help="ablation: no adversarial term (Table 3)")
    a("--no-hyper-loss", action="store_true", help="ablation: plain MSE instead of the hyper-loss (Table 3)")
    a("--groupnorm", choices=list(GROUPNORM), default=d.groupnorm,
      help="U-Net GroupNorm: 'frames' pools statistics over the clip's frames (Tune-A-Video's network), "
           "'per-frame' normalises each frame alone (SD per image)")
    a("--perceptual-weights", default=d.apla.perceptual_weights,
      help="VGG16 weights of the perceptual term (torchvision layout, .pth or .safetensors), or 'random' (default: "
           "torchvision's vgg16-397923af.pth from the torch hub cache if present, else random features)")
    a("--mixed-precision", choices=list(PRECISIONS), default=d.mixed_precision,
      help="autocast dtype; auto: bf16 on a CUDA device with native bfloat16, fp16 with the gradient scaler on an "
           "older one, no (float32) on a CPU; config.json records the resolved value")
    a("--gradient-checkpointing", nargs="?", const="on", choices=list(CHECKPOINTING), default=d.gradient_checkpointing,
      help="recompute each U-Net block and VGT block in backward instead of storing its activations (the bare flag "
           "means on); auto: on for an SD-size U-Net on CUDA, off otherwise; config.json records true or false")
    a("--compile", action="store_true", help="torch.compile the U-Net and VGT (the first steps compile; no gain "
                                             "measured on a CPU)")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="save a checkpoint every n steps")
    a("--device", default=d.device, help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    a("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_train_args(argv: Optional[list] = None):
    """Resolve the training configuration; returns (TrainConfig, resume)."""
    args = train_parser().parse_args(argv)
    quiet = train_parser()              # the same parser with no defaults tells which flags were given
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(quiet.parse_args(argv)))
    file_values = _load_file(args.config) if args.config else {}
    saved = {}
    if args.resume:  # a resumed run starts from its own saved configuration
        output_dir = args.output_dir if "output_dir" in given else file_values.get("output_dir", args.output_dir)
        saved_path = Path(output_dir) / "config.json"
        if saved_path.is_file():
            try:
                saved = json.loads(saved_path.read_text())
            except (OSError, ValueError) as e:
                fail(f"--resume: cannot read {saved_path}: {e}")
    pretrained = (args.pretrained if "pretrained" in given else
                  file_values.get("pretrained", saved.get("pretrained", TrainConfig().pretrained)))
    values = saved or {**preset(pretrained), "pretrained": pretrained}
    values = _merge(values, file_values)
    flags = {}
    for dest in given - {"config", "resume", "help"}:
        v = getattr(args, dest)
        if dest == "vgt":
            flags.setdefault("apla", {})["vgt"] = v
        elif dest == "no_discriminator":
            flags.setdefault("apla", {})["use_discriminator"] = not v
        elif dest == "no_hyper_loss":
            flags.setdefault("apla", {})["use_hyper_loss"] = not v
        elif dest == "perceptual_weights":
            flags.setdefault("apla", {})["perceptual_weights"] = v
        elif dest == "no_progress":
            flags["progress"] = not v
        elif dest == "gradient_checkpointing":
            flags[dest] = {"on": True, "off": False}.get(v, v)
        else:
            flags[dest] = v
    values = _merge(values, flags)
    try:
        cfg = TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        fail(f"bad configuration: {e}")
    return cfg, args.resume


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


FPS = Range(1, 100, integer=True)  # a GIF counts its delays in hundredths of a second


def sample_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sample.py", description="Generate videos from a run of train.py.",
                      formatter_class=DefaultsFormatter)
    a = p.add_argument
    a("--run", default=TrainConfig().output_dir, help="the run directory written by train.py")
    a("--prompt", action="append", default=None,
      help="a prompt (repeatable) (default: the run's own prompt plus its edit_prompts)")
    a("--steps", type=in_range(int, TrainConfig.RANGES["sample_steps"]), default=None,
      help="DDIM steps (default: the run's sample_steps, 50 at SD size)")
    a("--guidance", type=in_range(float, TrainConfig.RANGES["guidance"]), default=None,
      help="classifier-free guidance scale (default: the run's guidance, 12.5 at SD size as Tune-A-Video)")
    a("--seed", type=in_range(int, SEED), default=33, help="seed of the starting noise (with --no-inversion)")
    a("--no-inversion", action="store_true", help="start from seeded noise instead of the inverted clip")
    a("--no-vgt", action="store_true", help="sample without the VGT perturbation of Eq. 4")
    a("--pretrained", default=None, help="base model to load (default: the run's own --pretrained)")
    a("--checkpoint", default=None, help="a checkpoint folder (default: the run's latest)")
    a("--out", default=None, help="output folder (default: RUN/samples)")
    a("--fps", type=in_range(int, FPS), default=8, help="frames per second of the GIF/MP4")
    a("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    a("--mixed-precision", choices=list(PRECISIONS), default="auto",
      help="autocast dtype; auto: bf16 on a CUDA device with native bfloat16, fp16 on an older one, no on a CPU")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--no-metrics", action="store_true", help="do not score the samples (FCI, warping error, PSNR, CLIP scores, "
                                                "the shapes world's measures -> OUT/metrics.json)")
    a("--clip-model", default=None, help="CLIP model of the CLIP scores: 'micro', a local CLIPModel folder, a hub id "
                                         "(downloads), or 'none' (default: 'micro' on micro runs, else none)")
    return p
