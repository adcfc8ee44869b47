"""Command lines of train.py and sample.py: flags, config files (TOML, JSON, Tune-A-Video's YAML), one-line errors.

A training run's configuration is resolved in one order, later wins (`parse_train_args`):
  TrainConfig's defaults (the micro run) <- the base model's preset (apla.config.preset: SD_V15 for an SD-size one)
  <- a --config file (.toml or .json, keys as in config.json; .yaml: Tune-A-Video's, apla.tav) <- the flags given.
--resume starts from the run's saved config.json instead of the defaults and preset. The resolved configuration is
saved as config.json in the run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
import tomllib
from contextlib import nullcontext
from pathlib import Path
from typing import NoReturn, Optional

import torch
import yaml

from apla import tav
from apla.config import (AT_LEAST_ONE, CHECKPOINTING, DDIM_STEPS, GROUPNORM, LR_SCHEDULES, NON_NEGATIVE, PRECISIONS,
                         REPORTERS, SD_V15, SD_WIDTH, SEED, TrainConfig, integer, merge, preset, problem)
from apla.scheduler import PREDICTION_TYPES
from apla.vgt import ALL_VARIANTS
FPS = (lambda v: integer(v) and 1 <= v <= 100, "an integer in [1, 100]")  # a GIF's delays are in 1/100 s


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


def run_precision(setting: str, device: torch.device) -> tuple[str, str | None]:
    """--mixed-precision as train.py and sample.py run it, and the line to print when that is not what was asked:
    resolve_mixed_precision's value, except fp16 on a CPU, which runs float32 ('no', as config.json records it).

    A CPU's float16 kernels are slow and its float32 weights gain nothing from them: an APLA step of the micro model
    took 6.17 s in fp16 autocast against 0.52 s in float32 and 0.42 s in bf16 (`python -m apla.bench --model micro
    --measure step --threads 1 --mixed-precision fp16`, medians of 5 on a busy 2-core machine; 12.0 against 3.06 s
    per step was measured for a larger run), so a Tune-A-Video config, written for a GPU (`mixed_precision: fp16`),
    would run 4 to 12 times slower on a CPU. bf16 is kept; the bench still measures fp16 on a CPU as asked."""
    resolved = resolve_mixed_precision(setting, device)
    if resolved == "fp16" and device.type == "cpu":
        return "no", ("--mixed-precision fp16 on a CPU runs float32: float16 autocast is 4 to 12 times slower here "
                      "and gains nothing (bf16 is kept if asked)")
    return resolved, None


def resolve_gradient_checkpointing(setting, device: torch.device, unet_config) -> bool:
    """--gradient-checkpointing as a run uses it: 'auto' is on for a U-Net of Stable Diffusion's size (a first level
    of SD_WIDTH channels or more) on CUDA, where a 24-frame clip's activations would not fit, and off otherwise (a
    CPU, or the micro model); True / 'on' and False / 'off' as given."""
    if setting == "auto":
        return device.type == "cuda" and unet_config.block_out_channels[0] >= SD_WIDTH
    return setting in (True, "on")


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # a resolved --mixed-precision -> its autocast dtype


def autocast_for(mixed_precision: str, device: torch.device):
    """The autocast context of a resolved --mixed-precision (resolve_mixed_precision): none for 'no', else bf16 or
    fp16."""
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"autocast_for: {mixed_precision!r} is not resolved (resolve_mixed_precision first)")
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=HALF[mixed_precision])


def unet_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype sample.py holds the U-Net in, for a resolved --mixed-precision: on a CUDA device, the autocast dtype
    (bf16 or fp16), which halves the GPU memory of its weights (3.4 -> 1.7 GB at SD size) and changes little else
    (its normalisation weights are rounded), since autocast runs its matrix products in that dtype anyway; float32
    otherwise (a CPU's half kernels are slow).
    The VAE and the text encoder run outside autocast and stay float32: in bf16 they would move the samples (2% and
    0.8% relative error on the tiny test model) for 0.4 GB. train.py keeps float32 weights, which AdamW needs."""
    return HALF[mixed_precision] if device.type == "cuda" and mixed_precision != "no" else torch.float32


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit with `code` (2: bad input, as argparse does); a message that spans lines
    (a library's, passed on) is joined into one."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def in_range(kind, allowed: tuple):
    """An argparse `type` that reads a flag's value with `kind` (int or float) and checks it against `allowed`, a
    (predicate, words) pair of apla.config; text that `kind` cannot read fails the predicate as it is."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = text
        wrong = problem(allowed, value)
        if wrong:
            raise argparse.ArgumentTypeError(wrong)
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


# ---------------------------------------------------------------------------------------------------------------
# train.py: every flag of a TrainConfig field defaults to None (not given), its dest the field ("apla.vgt": nested)
# ---------------------------------------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineParser(prog="train.py", formatter_class=DefaultsFormatter,
                      description="Tune Stable Diffusion (inflated to video) on one clip with APLA. The defaults "
                                  "shown are the micro run (apla.config.TrainConfig). A --pretrained whose U-Net is "
                                  "SD-size (read from its config or file header before loading) starts from the "
                                  "preset apla.config.SD_V15 instead: the paper's 24 frames at 512 px (768 for a "
                                  "model of sample_size 96, SD 2.1), 750 steps, lr 3e-5, the bigbuckbunny clip, the "
                                  "paper-size VGT, guidance 12.5; a line says which preset and why. A --config file "
                                  "overrides the preset, flags override both; --resume starts from the run's saved "
                                  "config.json.")
    a = p.add_argument
    a("--config", help="a .toml or .json file of TrainConfig fields, or a Tune-A-Video config (.yaml, as its configs/ "
                       "are; an apla: table sets APLA's parts) (default: none)")
    a("--pretrained", help="base model: a single .safetensors file, a diffusers-style folder, a hub id, or 'micro' "
                           f"(default: {d.pretrained})")
    a("--prediction-type", choices=PREDICTION_TYPES,
      help="what the base model's U-Net predicts; config.json records it (default: the model's own: a folder's "
           "scheduler config, epsilon for a single file)")
    a("--video", help="the clip: a folder of frames, a GIF, an MP4/WebM/MOV (needs PyAV), or a bundled clip's name "
                      f"(bigbuckbunny, red-circle-right) (default: {d.video})")
    a("--prompt", help=f"the clip's caption (default: {d.prompt})")
    a("--output-dir", help=f"the run directory (default: {d.output_dir})")
    a("--max-steps", type=int, help=f"training steps (the paper: 750 or 1500) (default: {d.max_steps})")
    a("--frames", type=int, help=f"frames taken from the clip (default: {d.frames})")
    a("--start", type=int, help=f"first frame taken (default: {d.start})")
    a("--stride", type=int, help=f"take every n-th frame (default: {d.stride})")
    a("--size", type=size_flag, metavar="SIZE", help="frame size: one side for a square (64) or height x width "
                                                     "(320x576), every side a multiple of 8; frames are scaled to "
                                                     f"cover it, then centre-cropped (default: {d.size})")
    a("--seed", type=int, help="seed of every random draw: noise, timesteps and the initial weights of VGT, D and "
                               f"random VGG features (default: {d.seed})")
    a("--lr", type=float, help=f"AdamW learning rate of the U-Net's trainable set and VGT (default: {d.lr})")
    a("--disc-lr", type=float, help=f"AdamW learning rate of the discriminator (default: {d.disc_lr})")
    a("--lr-scheduler", choices=LR_SCHEDULES, help="the learning rates over the updates, diffusers' schedules "
                                                   f"(apla.loop.lr_factor) (default: {d.lr_scheduler})")
    a("--lr-warmup-steps", type=int, help=f"updates of linear warmup from 0 (default: {d.lr_warmup_steps})")
    a("--lr-num-cycles", type=int, help=f"cosine_with_restarts' cycles (default: {d.lr_num_cycles})")
    a("--lr-power", type=float, help=f"polynomial's power (default: {d.lr_power})")
    a("--gradient-accumulation-steps", type=int, help="draws of the posterior sample, t and the noise that each "
                                                      f"update averages (default: {d.gradient_accumulation_steps})")
    a("--vgt", dest="apla.vgt", choices=ALL_VARIANTS + ("none",),
      help=f"VGT variant (Table 1); 'none' is the 'w/o VGT' ablation (default: {d.apla.vgt})")
    a("--no-discriminator", dest="apla.use_discriminator", action="store_const", const=False,
      help="ablation: no adversarial term (Table 3) (default: with it)")
    a("--no-hyper-loss", dest="apla.use_hyper_loss", action="store_const", const=False,
      help="ablation: plain MSE instead of the hyper-loss (Table 3) (default: the hyper-loss)")
    a("--groupnorm", choices=GROUPNORM,
      help="U-Net GroupNorm: 'frames' pools statistics over the clip's frames (Tune-A-Video's network), "
           f"'per-frame' normalises each frame alone (SD per image) (default: {d.groupnorm})")
    a("--perceptual-weights", dest="apla.perceptual_weights", metavar="PATH",
      help="VGG16 weights of the perceptual term (torchvision layout, .pth or .safetensors), or 'random' (default: "
           "torchvision's vgg16-397923af.pth from the torch hub cache if present, else random features)")
    a("--mixed-precision", choices=PRECISIONS,
      help="autocast dtype; auto: bf16 on a CUDA device with native bfloat16, fp16 with the gradient scaler on an "
           "older one, no (float32) on a CPU, where fp16 runs float32 too (4 to 12 times faster); config.json records "
           f"the resolved value (default: {d.mixed_precision})")
    a("--gradient-checkpointing", nargs="?", const=True, type=on_off, metavar="{" + ",".join(CHECKPOINTING) + "}",
      help="recompute each U-Net block and VGT block in backward instead of storing its activations (the bare flag "
           "means on); auto: on for an SD-size U-Net on CUDA, off otherwise; config.json records true or false "
           f"(default: {d.gradient_checkpointing})")
    a("--compile", action="store_const", const=True,
      help="torch.compile the U-Net and VGT (the first steps compile; no gain measured on a CPU) (default: off)")
    a("--checkpoint-every", type=int, help=f"save a checkpoint every n steps (default: {d.checkpoint_every})")
    a("--sample-every", type=int, help="every n steps, write a GIF per prompt into RUN/samples/step-N/, and at the end "
                                       "a PNG of their first, middle and last frames; 0: never (default: "
                                       f"{d.sample_every}; {SD_V15['sample_every']} at SD size)")
    a("--device", help=f"'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ... (default: {d.device})")
    a("--report-to", choices=REPORTERS, help="tensorboard: log.jsonl's numbers and the samples also as TensorBoard "
                                             "events in RUN/tensorboard (pip install tensorboard) (default: "
                                             f"{d.report_to})")
    a("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar (default: shown)")
    return p


def size_flag(text: str):
    """--size's value as TrainConfig takes it: an int for one side ("64"), else the text ("320x576"), which
    TrainConfig reads as height x width and checks with every other source of the setting (apla.config.SIZE)."""
    try:
        return int(text)
    except ValueError:
        return text


def on_off(text: str):
    """--gradient-checkpointing's value as TrainConfig holds it: "auto", True (on) or False (off)."""
    if text not in CHECKPOINTING:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(CHECKPOINTING)}, got {text!r}")
    return {"on": True, "off": False}.get(text, text)


def parse_train_args(argv: Optional[list] = None):
    """train.py's configuration, resolved in one order (later wins): TrainConfig's defaults <- the preset of the
    base model (apla.config.preset) <- a --config file <- the flags given; with --resume, the run's saved
    config.json replaces defaults and preset. Returns (TrainConfig, resume)."""
    args = vars(train_parser().parse_args(argv))
    config_file, resume = args.pop("config"), args.pop("resume")
    flags = {}
    for dest, value in args.items():  # "apla.vgt" -> {"apla": {"vgt": ...}}
        table, _, name = dest.rpartition(".")
        if value is not None:
            (flags.setdefault(table, {}) if table else flags)[name] = value
    given = merge(read_config_file(config_file) if config_file else {}, flags)
    try:
        saved = Path(given.get("output_dir", TrainConfig.output_dir)) / "config.json"
        if resume and saved.is_file():
            try:
                base = json.loads(saved.read_text())
            except (OSError, ValueError) as e:
                fail(f"--resume: cannot read {saved}: {e}")
        else:
            base = preset(given.get("pretrained", TrainConfig.pretrained))[0]
        return TrainConfig.from_dict(merge(base, given)), resume
    except (TypeError, ValueError) as e:
        fail(f"bad configuration: {e}")


def read_config_file(path: str) -> dict:
    """The values of a --config file: TOML (.toml) or JSON (.json), keys as in config.json, or a Tune-A-Video config
    (.yaml/.yml, mapped by apla.tav, its notes printed); one line on an error."""
    p = Path(path)
    if not p.is_file():
        fail(f"--config {path}: no such file")
    if p.suffix not in (".toml", ".json", ".yaml", ".yml"):
        fail(f"--config {path}: expected a .toml or .json file, or Tune-A-Video's .yaml")
    try:
        text = p.read_text()
        values = (tomllib.loads(text) if p.suffix == ".toml" else json.loads(text) if p.suffix == ".json"
                  else yaml.safe_load(text))
    except (ValueError, yaml.YAMLError) as e:  # TOMLDecodeError, JSONDecodeError, UnicodeDecodeError: ValueErrors
        fail(f"--config {path}: cannot parse: {e}")
    if not isinstance(values, dict):
        fail(f"--config {path}: expected a table of TrainConfig fields, got {type(values).__name__}")
    if p.suffix in (".yaml", ".yml"):
        try:
            values, notes = tav.from_tuneavideo(values)
        except ValueError as e:
            fail(f"--config {path}: {e}")
        if notes:
            print(f"note: --config {path}: ignored: {'; '.join(notes)}", file=sys.stderr)
    return values


# ---------------------------------------------------------------------------------------------------------------
# sample.py
# ---------------------------------------------------------------------------------------------------------------
def sample_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sample.py", description="Generate videos from a run of train.py.",
                      formatter_class=DefaultsFormatter)
    a = p.add_argument
    a("--run", default=None, help=f"the run directory written by train.py (default: {TrainConfig.output_dir}, "
                                  "unless --video samples a base model without a run)")
    a("--video", default=None, help="sample the base model (--pretrained: micro unless given) without a run, no VGT "
                                    "and no D, from this clip (a path or a bundled clip's name), encoded and inverted "
                                    "now (default: none, sample --run)")
    a("--prompt", action="append", default=None,
      help="a prompt (repeatable) (default: the run's own prompt plus its edit_prompts)")
    a("--steps", type=in_range(int, DDIM_STEPS), default=None,
      help="DDIM steps (default: the run's sample_steps, 50 at SD size)")
    a("--guidance", type=in_range(float, NON_NEGATIVE), default=None,
      help="classifier-free guidance scale (default: the run's guidance, 12.5 at SD size as Tune-A-Video)")
    a("--negative-prompt", default="", help="the unconditional branch of guidance: what the samples steer away from "
                                            "(the inversion keeps the empty prompt)")
    a("--seed", type=in_range(int, SEED), default=33, help="seed of the starting noise (with --no-inversion)")
    a("--no-inversion", action="store_true", help="start from seeded noise instead of the inverted clip")
    a("--frames", type=in_range(int, AT_LEAST_ONE), default=None,
      help="frames of the samples (default: the clip's): with inversion, or with --video, the clip's read so; else "
           "any count the run's VGT allows (at most its clip's) or any with --no-vgt")
    a("--size", type=size_flag, metavar="SIZE", default=None,
      help="frame size, 64 or HxW (default: the clip's); as --frames says (at most the run's clip's with VGT)")
    a("--no-vgt", action="store_true", help="sample without the VGT perturbation of Eq. 4")
    a("--pretrained", default=None, help="base model to load (default: the run's own --pretrained)")
    a("--prediction-type", choices=PREDICTION_TYPES, default=None,
      help="what the base model's U-Net predicts (default: the run's, as config.json records it)")
    a("--checkpoint", default=None, help="a checkpoint folder (default: the run's latest)")
    a("--out", default=None, help="output folder (default: RUN/samples; with --video, runs/base/samples)")
    a("--fps", type=in_range(int, FPS), default=8, help="frames per second of the GIF/MP4")
    a("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    a("--mixed-precision", choices=list(PRECISIONS), default="auto",
      help="autocast dtype; auto: bf16 on a CUDA device with native bfloat16, fp16 on an older one, no on a CPU "
           "(where fp16 runs float32 too); on CUDA the U-Net is also held in that dtype (half the GPU memory of its "
           "weights)")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--no-metrics", action="store_true", help="do not score the samples (FCI, warping error, PSNR, CLIP scores, "
                                                "the shapes world's measures -> OUT/metrics.json)")
    a("--clip-model", default=None, help="CLIP model of the CLIP scores: 'micro', a local CLIPModel folder, a hub id "
                                         "(downloads), or 'none' (default: 'micro' on micro runs, else none)")
    return p
