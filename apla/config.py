"""Run configuration of APLA (Yao et al., AAAI 2024): the loss weights of Eqs. 18 and 20, the VGT variant
(Table 1), the ablation switches of Table 3, and a training run: `TrainConfig`, whose defaults are the micro run,
and `SD_V15`, the preset of a run on Stable Diffusion at the paper's settings; `preset` picks one by what the base
model is.

The paper gives no values for alpha, beta, gamma or lambda; ours are documented below. Every value is checked by
the tables of plain predicates `RANGES` (one line naming the key), whether it came from a flag, a file or a saved run.
"""

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Tuple

from safetensors import SafetensorError, safe_open

from apla.assets import model_path
from apla.sd.variants import SD2_VARIANTS, is_sd2, sd2_variant
from apla.loop import LR_SCHEDULES, POLYNOMIAL_LR_END
# T bounds the DDIM steps; it stays with the schedule it belongs to, as do the prediction types a base model may have
from apla.scheduler import NUM_TRAIN_TIMESTEPS, PREDICTION_TYPES
from apla.vgt import ALL_VARIANTS, VGTConfig

# Table 3's rows -> (vgt on, discriminator on, hyper-loss on)
ABLATIONS = {
    "full": (True, True, True),
    "w/o discriminator": (True, False, True),
    "w/o vgt&discriminator": (False, False, True),
    "w/o hyper-loss&discriminator": (True, False, False),
    "w/o vgt&hyper-loss": (False, True, False),
}

# Tune-A-Video's trainable set of the U-Net: the queries of the sparse-causal and cross attentions and the whole
# temporal attention, plus the temporal attention's LayerNorm (Tune-A-Video's configs leave norm_temp at its identity
# init; we train it with the layer it feeds, 24,960 more parameters at full size). apla.sd.unet.mark_trainable.
DEFAULT_TRAINABLE = ("attn1.to_q", "attn2.to_q", "attn_temp", "norm_temp")
VAE_DOWNSAMPLE = 8  # SD v1.5's VAE divides height and width by 8: a frame side must be a multiple of it (apla.video)
GROUPNORM = ("frames", "per-frame")  # TrainConfig.groupnorm
PRECISIONS = ("auto", "no", "bf16", "fp16")  # TrainConfig.mixed_precision, sample.py's --mixed-precision
CHECKPOINTING = ("auto", "on", "off")  # train.py's --gradient-checkpointing (TrainConfig: "auto", true, false)
REPORTERS = ("none", "tensorboard")  # TrainConfig.report_to (diffusers' key; its "wandb" and others are not ours)


# ---------------------------------------------------------------------------------------------------------------
# What a setting may be: (predicate, the words after "must be"), so a flag, a file and a saved run get one message
# ---------------------------------------------------------------------------------------------------------------
def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def one_of(options) -> tuple:
    return lambda v: v in options, f"one of {options}"


NON_NEGATIVE = (lambda v: number(v) and v >= 0, "a number >= 0")
POSITIVE = (lambda v: number(v) and v > 0, "a number > 0")
AT_LEAST_ONE = (lambda v: integer(v) and v >= 1, "an integer >= 1")
AT_LEAST_ZERO = (lambda v: integer(v) and v >= 0, "an integer >= 0")
BETA = (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)")  # Adam's beta1, beta2
SEED = (lambda v: integer(v) and 0 <= v < 2**63, f"an integer in [0, {2**63 - 1}]")  # torch's < 2**64; apla.run adds 2
SIDE = (lambda v: integer(v) and v > 0 and v % VAE_DOWNSAMPLE == 0,
        f"a positive multiple of {VAE_DOWNSAMPLE} (the VAE downsamples by {VAE_DOWNSAMPLE})")
SIZE = (lambda v: height_width(v) is not None,
        f"a positive multiple of {VAE_DOWNSAMPLE}, or height x width as HxW (e.g. 320x576) or [H, W], each a positive "
        f"multiple of {VAE_DOWNSAMPLE} (the VAE downsamples by {VAE_DOWNSAMPLE})")
DDIM_STEPS = (lambda v: integer(v) and 1 <= v <= NUM_TRAIN_TIMESTEPS, f"an integer in [1, {NUM_TRAIN_TIMESTEPS}]")
PREDICTION = (lambda v: v is None or v in PREDICTION_TYPES, f"none (the base model's) or one of {PREDICTION_TYPES}")


def height_width(size) -> tuple[int, int] | None:
    """TrainConfig.size as (H, W), or None if it is no frame size: an int is a square, "HxW" (a string, as --size
    takes it, e.g. "320x576") and [H, W] (a list or tuple, as config.json saves it) are height then width; every
    side a positive multiple of VAE_DOWNSAMPLE."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        size = [int(p) for p in parts] if len(parts) == 2 and all(p.strip().isdecimal() for p in parts) else None
    sides = [size, size] if integer(size) else list(size) if isinstance(size, (list, tuple)) else []
    return tuple(sides) if len(sides) == 2 and all(SIDE[0](s) for s in sides) else None


def canonical_size(size) -> int | tuple[int, int]:
    """A valid TrainConfig.size in the one form a run keeps (and config.json saves): an int for a square, so that
    "64x64", [64, 64] and 64 are one setting, else (H, W)."""
    height, width = height_width(size)
    return height if height == width else (height, width)


def type_problem(kind, value) -> str | None:
    """None if `value` is of the declared type `kind` of a config field, else "must be <type>, got <value>": a flag,
    a file and a saved run are held to the field's annotation, so "false" is no switch and a string no list."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (types.UnionType, typing.Union) else (kind,)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    fits = {bool: lambda v: isinstance(v, bool), int: integer, str: lambda v: isinstance(v, str),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), type(None): lambda v: v is None}
    if any(fits[k](value) for k in options if k in fits):
        return None
    if any(typing.get_origin(k) is tuple for k in options):  # Tuple[str, ...]: a list of strings
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return None
        return f"must be a list of strings, got {value!r}"
    return f"must be {' or '.join(words[k] for k in options if k in words)}, got {value!r}"


def check_types(cls, values: dict, prefix: str = "") -> None:
    """ValueError naming the first of `values` that is not of its field's declared type in the dataclass `cls`; a
    field with an entry in `cls.RANGES` is left to it (its predicate checks the type too, and says more)."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if dataclasses.is_dataclass(hints.get(name)) or name in getattr(cls, "RANGES", {}):
            continue  # a table is checked field by field where it is built
        wrong = type_problem(hints[name], value) if name in hints else None
        if wrong:
            raise ValueError(f"{prefix}{name} {wrong}")


def problem(allowed: tuple, value) -> str | None:
    """None if `value` passes `allowed` (predicate, words), else "must be <words>, got <value>"."""
    ok, words = allowed
    return None if ok(value) else f"must be {words}, got {value!r}"


def check(config, prefix: str = "") -> None:
    """ValueError naming the first field of `config` that fails its entry in `config.RANGES` (as prefix + name)."""
    for name, allowed in config.RANGES.items():
        wrong = problem(allowed, getattr(config, name))
        if wrong:
            raise ValueError(f"{prefix}{name} {wrong}")


# ---------------------------------------------------------------------------------------------------------------
# APLA's objective
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class APLAConfig:
    """Weights and switches of APLA's objective (Eqs. 4-6, 16-20)."""

    alpha: float = 1.0  # Eq. 18, weight of L_MSE; 1 keeps the plain diffusion loss at full strength (ours)
    beta: float = 0.1  # Eq. 18, weight of L_L1 (ours; the paper gives none)
    gamma: float = 0.1  # Eq. 18, weight of L_per (ours; the paper gives none)
    lam: float = 0.01  # Eq. 20, lambda, weight of the generator's adversarial term L_g (ours)
    vgt: str = "pure"  # "pure" | "hyper" | "pure-en" | "hyper-en" | "none"; the paper's experiments use "pure"
    use_discriminator: bool = True  # False: Table 3's "w/o Discriminator", no lambda * L_g term
    use_hyper_loss: bool = True  # False: Table 3's "w/o Hyper-Loss", plain MSE (Eq. 6, or Eq. 5 without VGT)
    saturating: bool = True  # L_g as written in the paper, E[log(1 - D(G))]; False: non-saturating -log D(G)
    # L_per's VGG16 (Eq. 17): a torchvision-layout file (.safetensors/.pth); "random": seeded random features; None:
    # torchvision's file from the torch hub cache if there, else "random" (apla.run.resolve_perceptual_weights)
    perceptual_weights: str | None = None

    RANGES = {"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE, "lam": NON_NEGATIVE,
              "vgt": one_of(ALL_VARIANTS + ("none",))}

    def __post_init__(self):
        self.validate()

    def validate(self):
        """ValueError naming the first field out of `RANGES`, as "apla.<field>" (its config key)."""
        check(self, "apla.")

    @property
    def use_vgt(self) -> bool:
        """False for Table 3's "w/o VGT" (phi = 0), i.e. vgt == "none"."""
        return self.vgt != "none"

    @classmethod
    def ablation(cls, name: str, vgt: str = "pure", **overrides) -> "APLAConfig":
        """A config for one row of Table 3 (names in `ABLATIONS`), e.g. APLAConfig.ablation("w/o discriminator")."""
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; expected one of {list(ABLATIONS)}")
        with_vgt, with_d, with_hyper = ABLATIONS[name]
        return cls(vgt=vgt if with_vgt else "none", use_discriminator=with_d, use_hyper_loss=with_hyper, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# A training run (train.py): the micro run by default, SD v1.5's as a preset
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run of train.py needs; saved as config.json beside its outputs.

    The defaults are a whole run that a CPU finishes: the micro SD shipped in apla/assets/micro (apla.micro) tuned on
    the shapes world's red circle, sized to that model (SD v1.5's values, the preset `SD_V15`, in brackets). The
    optimiser is Tune-A-Video's at any size: AdamW, betas (0.9, 0.999), weight decay 1e-2, gradient clipping at 1.
    """
    pretrained: str = "micro"            # file, diffusers folder, hub id ("runwayml/stable-diffusion-v1-5"), "micro"
    # what the base model's U-Net predicts, "epsilon" or "v_prediction"; None: the model's own (a folder's scheduler
    # config, epsilon for a single SD v1 file), which train.py records (apla.sd.weights.load_stable_diffusion)
    prediction_type: str | None = None
    video: str = "red-circle-right"      # a path, or the name of a bundled clip (apla.assets.CLIPS)
    prompt: str = "a red circle moving to the right"
    output_dir: str = "runs/apla"
    max_steps: int = 300                 # [750]
    frames: int = 8                      # [24]; the clip's frame count
    start: int = 0
    stride: int = 1
    # [512]; the frame size, the micro model's training resolution (latents 16 x 16): an int for a square, or height
    # x width as "HxW" (e.g. "320x576", the --size flag's form) or [H, W]; every side a multiple of 8. Kept as an
    # int for a square, else (H, W), which config.json saves as [H, W] (canonical_size); frames are scaled to cover
    # it, then centre-cropped (apla.video.resize_center_crop)
    size: int | Tuple[int, int] = 64
    seed: int = 33                       # seeds the noise, the timesteps and (unless init_seed) the new weights
    init_seed: int | None = None         # seed of VGT's, D's and the VGG features' initialisation; None: seed
    lr: float = 3e-4                     # [3e-5]; a model pretrained from scratch at toy size takes a larger step
    disc_lr: float = 3e-4                # [3e-5]; D's AdamW, the same learning rate
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0           # 0: no clipping
    # the learning rate over the updates, by diffusers' names (apla.loop.lr_factor): "constant",
    # "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"; warmup and decay count
    # updates, the decay ends at max_steps (apla.loop.LRSchedule); theta's and D's rates follow it alike
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1               # cosine_with_restarts' cycles (diffusers' --lr_num_cycles)
    lr_power: float = 1.0                # polynomial's power (diffusers' --lr_power)
    # draws of (posterior sample, t, eps) that each update averages (apla.algorithm.APLA.train_step); a step of
    # max_steps, checkpoint_every and log.jsonl is one update
    gradient_accumulation_steps: int = 1
    # "auto" (resolved by train.py, the resolved value saved): bf16 on CUDA with native bfloat16, fp16 on older
    # CUDA devices, "no" (float32) on a CPU, where fp16 runs float32 too (apla.cli.run_precision)
    mixed_precision: str = "auto"
    # "auto" (resolved by train.py): on for an SD-size U-Net on CUDA (apla.cli.resolve_gradient_checkpointing)
    gradient_checkpointing: bool | str = "auto"
    compile: bool = False                # torch.compile the U-Net and VGT (APLA.compile_networks)
    checkpoint_every: int = 100          # [250]
    # every n steps, write samples/step-N/ (GIFs of the run's prompts) and at the end a progression PNG; 0: never
    sample_every: int = 0                # [100, Tune-A-Video's validation_steps]
    keep_checkpoints: int = 2            # 0: keep all
    device: str = "auto"
    progress: bool = True
    report_to: str = "none"              # "tensorboard": log.jsonl's numbers and the samples also in RUN/tensorboard/
    trainable: Tuple[str, ...] = DEFAULT_TRAINABLE
    # GroupNorm of the U-Net's ResNet blocks and output: "frames" pools statistics over the clip's frames, as
    # Tune-A-Video's code does (the paper "build[s] the model based on Tune-A-Video"); "per-frame" normalises each
    # frame alone, as SD does per image (apla.sd.unet.UNet3DConditionModel.set_norm_over_frames)
    groupnorm: str = "frames"
    apla: APLAConfig = field(default_factory=APLAConfig)
    # VGT's sizes (its variant comes from apla.vgt, its input size from the clip): for the micro model's 16 x 16
    # latents and 8 frames, width 64, 2 + 2 decoder blocks, 4 heads, MLP hidden 256 [the paper's, VGTConfig()]
    vgt_model: VGTConfig = field(default_factory=partial(VGTConfig, sample_size=16, max_frames=8, width=64,
                                                         spatial_depth=2, temporal_depth=2, heads=4, mlp_hidden=256))
    edit_prompts: Tuple[str, ...] = ("a blue circle moving to the right", "a red square moving to the right")
    sample_steps: int = 50               # sample.py's DDIM steps unless --steps is given [50]
    guidance: float = 3.0                # sample.py's unless --guidance is given [12.5]; the best of 3, 5, 7.5 on the
                                         # micro model's validation captions (apla.micro.evaluate)

    RANGES = {
        "max_steps": AT_LEAST_ONE, "frames": AT_LEAST_ONE, "start": AT_LEAST_ZERO, "stride": AT_LEAST_ONE,
        "size": SIZE, "seed": SEED, "init_seed": (lambda v: v is None or SEED[0](v), SEED[1]),
        "lr": POSITIVE, "disc_lr": POSITIVE, "adam_beta1": BETA, "adam_beta2": BETA, "weight_decay": NON_NEGATIVE,
        "adam_epsilon": POSITIVE, "max_grad_norm": NON_NEGATIVE, "mixed_precision": one_of(PRECISIONS),
        "lr_scheduler": one_of(LR_SCHEDULES), "lr_warmup_steps": AT_LEAST_ZERO, "lr_num_cycles": AT_LEAST_ONE,
        "lr_power": POSITIVE, "gradient_accumulation_steps": AT_LEAST_ONE, "report_to": one_of(REPORTERS),
        "gradient_checkpointing": (lambda v: isinstance(v, bool) or v == "auto", 'true, false or "auto"'),
        "checkpoint_every": AT_LEAST_ONE, "sample_every": AT_LEAST_ZERO, "keep_checkpoints": AT_LEAST_ZERO,
        "groupnorm": one_of(GROUPNORM), "prediction_type": PREDICTION,
        "sample_steps": DDIM_STEPS, "guidance": NON_NEGATIVE,
    }

    def __post_init__(self):
        self.validate()
        self.size = canonical_size(self.size)

    def validate(self):
        """ValueError naming the first field out of `RANGES` (or of APLAConfig's, as "apla.<field>")."""
        check(self)
        self.apla.validate()
        if self.lr_scheduler == "polynomial" and min(self.lr, self.disc_lr) <= POLYNOMIAL_LR_END:
            raise ValueError(f"lr_scheduler polynomial decays to {POLYNOMIAL_LR_END}: lr and disc_lr must be above it, "
                             f"got {self.lr} and {self.disc_lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A TrainConfig from config.json's keys; a field not given, or a field of a table (apla, vgt_model) not
        given, keeps its default. ValueError naming an unknown key or a value out of range."""
        values = merge(cls().to_dict(), values)
        for key, kind in (("apla", APLAConfig), ("vgt_model", VGTConfig)):
            if not isinstance(values.get(key), dict):
                raise ValueError(f"{key} must be a table of {kind.__name__} fields, got {values[key]!r}")
            check_types(kind, known(kind, values[key], f"keys in {key}"), f"{key}.")
            values[key] = kind(**values[key])
        check_types(cls, known(cls, values, "configuration keys"))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# The preset of a run on an SD-size base model (preset): the paper's settings ("we uniformly sample 24 frames at a
# resolution of 512 x 512 ... 750 steps and 1500 steps with a learning rate of 3e-5 and a batch size of 1") and
# Tune-A-Video's sampling (50 DDIM steps, guidance 12.5).
SD_V15 = {
    "pretrained": "runwayml/stable-diffusion-v1-5",
    "video": "bigbuckbunny",             # 24 frames of Big Buck Bunny, bundled (apla.assets.CLIPS)
    "prompt": "a white rabbit stretching on a grassy hillside",
    "edit_prompts": [],
    "frames": 24,                        # "we uniformly sample 24 frames"
    "size": 512,                         # "at a resolution of 512 x 512"
    "max_steps": 750,                    # "750 steps and 1500 steps"
    "lr": 3e-5,                          # "with a learning rate of 3e-5"
    "disc_lr": 3e-5,                     # D's (the paper names one learning rate; we give D the same)
    "checkpoint_every": 250,
    "sample_every": 100,                 # Tune-A-Video's validation_steps
    "sample_steps": 50,
    "guidance": 12.5,                    # Tune-A-Video's
    "vgt_model": dataclasses.asdict(VGTConfig()),  # the paper's VGT (Table 1) at SD's 64 x 64 latents, 24 frames
}
SD_WIDTH = 320  # channels of the first U-Net level of SD (v1.x, 2.x): a base model this wide gets the SD preset
SD_SAMPLE_SIZE = 64  # SD v1.5's unet sample_size (latents of 512 px frames), which a single file does not record
# the U-Net's first convolution in a single SD file (apla.sd.weights: the "ldm" layout), read for its width
SINGLE_FILE_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def unet_size(pretrained: str) -> tuple[int, int, str]:
    """(channels of the U-Net's first level, its sample_size, where they were read) of a base model, read without
    loading a weight: the unet/config.json of a folder (a bundled name's, a path's, or a hub id's in the local hub
    cache); a single .safetensors file's header (its conv_in's shape), with SD's sample size, which the file does
    not record. ValueError, with the reason, for what cannot be read so (a pickle, a path that is not there, a hub
    id not in the cache); OSError, KeyError or SafetensorError for a config or file that is unreadable or lacks
    the entry."""
    path = model_path(pretrained) or Path(pretrained).expanduser()
    config = path / "unet" / "config.json"
    if not path.exists() and str(pretrained).count("/") == 1:  # a hub id, read from the cache if it is there
        from huggingface_hub import try_to_load_from_cache  # optional: the hub client comes with transformers

        try:
            cached = try_to_load_from_cache(str(pretrained), "unet/config.json")
        except ValueError:  # not a valid repository id
            cached = None
        if not isinstance(cached, str):
            raise ValueError("a hub id whose config is not in the local hub cache")
        config = Path(cached)
    if config.is_file():
        unet = json.loads(config.read_text(encoding="utf-8"))
        where = "its unet/config.json" + (" in the local hub cache" if config.parent.parent != path else "")
        return unet["block_out_channels"][0], unet.get("sample_size", SD_SAMPLE_SIZE), where
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            width, sd2 = f.get_slice(SINGLE_FILE_CONV_IN).get_shape()[0], is_sd2(f.keys())
        if sd2:  # an SD 2.x file's variant, and so its sample size, is read from its name as the loader reads it
            variant, _ = sd2_variant(path)
            return width, SD2_VARIANTS[variant]["sample_size"], f"the file's header: SD 2.x, {variant} by its name"
        return width, SD_SAMPLE_SIZE, "the file's header; a single file records no sample size"
    raise ValueError("a pickle, whose shapes are not read before loading" if path.is_file() else "no such path")


def preset(pretrained: str) -> tuple[dict, str]:
    """The TrainConfig values a run on `pretrained` starts from, and why (the line train.py prints), decided by the
    model itself, however it is named (unet_size): a U-Net narrower than SD's SD_WIDTH channels (the micro model,
    by name, by its path or as a copy elsewhere) starts from TrainConfig's defaults, the micro run, so no values;
    an SD-size one from SD_V15 with frames of its sample_size x VAE_DOWNSAMPLE (512 px for SD 1.5 and 2.1-base,
    768 for 2.1). A model that cannot be read before loading is taken for SD v1.5, at 512 px."""
    try:
        width, sample_size, where = unet_size(pretrained)
    except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as e:  # loading will say more
        return SD_V15, (f"the SD preset at {SD_V15['size']} px: the U-Net of {pretrained} cannot be read before "
                        f"loading ({e}), so it is taken for SD v1.5's")
    if width < SD_WIDTH:
        return {}, (f"the micro preset (TrainConfig's defaults): the U-Net of {pretrained} has {width} channels at "
                    f"its first level, fewer than SD's {SD_WIDTH} ({where})")
    size = sample_size * VAE_DOWNSAMPLE
    return {**SD_V15, "size": size}, (f"the SD preset at {size} px: the U-Net of {pretrained} has {width} channels "
                                      f"at its first level and sample_size {sample_size} ({where})")


def merge(*layers: dict) -> dict:
    """The layers' keys, later layers winning; a table (apla, vgt_model) is merged field by field."""
    out = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def known(cls, values: dict, what: str) -> dict:
    """`values`, or ValueError naming the keys that are no field of the dataclass `cls`."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}")
    return values


def default_config(pretrained: str | None = None) -> TrainConfig:
    """The configuration a run on `pretrained` gets before any file or flag: the defaults under its preset."""
    pretrained = pretrained or TrainConfig.pretrained
    return TrainConfig.from_dict(merge(preset(pretrained)[0], {"pretrained": pretrained}))


def vgt_config_for(cfg: TrainConfig, latent_shape) -> VGTConfig:
    """The VGT of a run: its sizes from cfg.vgt_model, its variant from cfg.apla.vgt, and its input size from the
    clip's latents (B, C, F, h, w), so that any frame count and resolution the U-Net takes, VGT takes too."""
    _, c, f, h, w = latent_shape
    if h % cfg.vgt_model.patch_size or w % cfg.vgt_model.patch_size:
        raise ValueError(f"latents of {h}x{w} do not split into VGT patches of {cfg.vgt_model.patch_size}; "
                         f"choose a --size whose latent side is a multiple of it")
    return dataclasses.replace(cfg.vgt_model, variant=cfg.apla.vgt, in_channels=c, max_frames=f,
                               sample_size=max(h, w))


def slug(prompt: str) -> str:
    """The file stem of a prompt's outputs (sample.py writes samples/<slug>.gif)."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"
