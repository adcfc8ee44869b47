"""Run configuration of APLA (Yao et al., AAAI 2024): the loss weights of Eqs. 18 and 20, the VGT variant
(Table 1), the ablation switches of Table 3, and the configuration of a training run with its presets.

The paper gives no values for alpha, beta, gamma or lambda; ours are documented below.
"""

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Tuple

from apla.assets import preset
from apla.scheduler import NUM_TRAIN_TIMESTEPS
from apla.sd.unet import DEFAULT_TRAINABLE
from apla.video import VAE_DOWNSAMPLE
from apla.vgt import VARIANTS, VGTConfig

# Table 3's rows -> (vgt on, discriminator on, hyper-loss on)
ABLATIONS = {
    "full": (True, True, True),
    "w/o discriminator": (True, False, True),
    "w/o vgt&discriminator": (False, False, True),
    "w/o hyper-loss&discriminator": (True, False, False),
    "w/o vgt&hyper-loss": (False, True, False),
}


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: a finite number (an integer if `integer`, a multiple of `multiple`)
    from `low` to `high`, each end allowed unless `open_low` / `open_high`; `why` is said after it. Config files,
    train.py's flags (both through `validate`) and sample.py's flags are checked against the same ranges, so they
    get the same message."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False
    multiple: int = 1
    why: str = ""

    def __str__(self) -> str:
        return f"{self._values()} ({self.why})" if self.why else self._values()

    def _values(self) -> str:
        if self.multiple > 1 and self.low == 0 and self.open_low and self.high is None:
            return f"a positive multiple of {self.multiple}"
        what = f"a multiple of {self.multiple}" if self.multiple > 1 else "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {self.low}"
        if self.high is not None:
            return f"{what} {'<' if self.open_high else '<='} {self.high}"
        return what

    def problem(self, value) -> str | None:
        """None if `value` is in the range, else what is wrong with it ("must be a number > 0, got -1.0")."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (number and math.isfinite(value) and (isinstance(value, int) or not (self.integer or self.multiple > 1))
              and (self.low is None or (value > self.low if self.open_low else value >= self.low))
              and (self.high is None or (value < self.high if self.open_high else value <= self.high))
              and (self.multiple == 1 or value % self.multiple == 0))
        return None if ok else f"must be {self}, got {value!r}"

    def check(self, name: str, value) -> None:
        """ValueError naming the setting unless `value` is in the range."""
        problem = self.problem(value)
        if problem:
            raise ValueError(f"{name} {problem}")


NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open_low=True)
AT_LEAST_ONE = Range(1, integer=True)
SEED = Range(0, 2**63 - 1, integer=True)  # torch.Generator.manual_seed takes up to 2**64 - 1; apla.run adds 2
GROUPNORM = ("frames", "per-frame")  # TrainConfig.groupnorm
PRECISIONS = ("auto", "no", "bf16", "fp16")  # TrainConfig.mixed_precision, sample.py's --mixed-precision
CHECKPOINTING = ("auto", "on", "off")  # train.py's --gradient-checkpointing (TrainConfig: "auto", true, false)


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

    RANGES = {"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE, "lam": NON_NEGATIVE}

    def __post_init__(self):
        self.validate()

    def validate(self):
        """ValueError naming the first field out of its range (`RANGES`), as "apla.<field>" (its config key)."""
        if self.vgt not in VARIANTS + ("none",):
            raise ValueError(f"apla.vgt must be one of {VARIANTS + ('none',)}, got {self.vgt!r}")
        for name, allowed in self.RANGES.items():
            allowed.check(f"apla.{name}", getattr(self, name))

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
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# A training run (train.py) and its presets
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run of train.py needs; saved as config.json beside its outputs.

    Defaults follow the paper ("24 frames at a resolution of 512 x 512 ... 750 steps and 1500 steps with a
    learning rate of 3e-5 and a batch size of 1") and Tune-A-Video (AdamW, betas (0.9, 0.999), weight decay 1e-2,
    gradient clipping at 1.0, its trainable set of the U-Net).
    """
    pretrained: str = "micro"            # file, diffusers folder, hub id ("runwayml/stable-diffusion-v1-5"), "micro"
    video: str = "bigbuckbunny"          # a path, or the name of a bundled clip (apla.assets.CLIPS)
    prompt: str = "a white rabbit stretching on a grassy hillside"
    output_dir: str = "runs/apla"
    max_steps: int = 750                 # the paper trains 750 (default) or 1500 steps
    frames: int = 24                     # "we uniformly sample 24 frames"
    start: int = 0
    stride: int = 1
    size: int = 512                      # "at a resolution of 512 x 512"
    seed: int = 33                       # seeds the noise, the timesteps and (unless init_seed) the new weights
    init_seed: int | None = None         # seed of VGT's, D's and the VGG features' initialisation; None: seed
    lr: float = 3e-5                     # "a learning rate of 3e-5"
    disc_lr: float = 3e-5                # D's AdamW (the paper names one learning rate; we give D the same)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # "auto" (resolved by train.py, the resolved value saved): bf16 on CUDA with native bfloat16, fp16 on older
    # CUDA devices, "no" (float32) on a CPU (apla.cli.resolve_mixed_precision)
    mixed_precision: str = "auto"
    # "auto" (resolved by train.py): on for an SD-size U-Net on CUDA (apla.cli.resolve_gradient_checkpointing)
    gradient_checkpointing: bool | str = "auto"
    compile: bool = False                # torch.compile the U-Net and VGT (APLA.compile_networks)
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    device: str = "auto"
    progress: bool = True
    trainable: Tuple[str, ...] = DEFAULT_TRAINABLE
    # GroupNorm of the U-Net's ResNet blocks and output: "frames" pools statistics over the clip's frames, as
    # Tune-A-Video's code does (the paper "build[s] the model based on Tune-A-Video"); "per-frame" normalises each
    # frame alone, as SD does per image (apla.sd.unet.UNet3DConditionModel.set_norm_over_frames)
    groupnorm: str = "frames"
    apla: APLAConfig = field(default_factory=APLAConfig)
    vgt_model: VGTConfig = field(default_factory=VGTConfig)  # VGT sizes; its variant comes from apla.vgt
    edit_prompts: Tuple[str, ...] = ()   # prompts sample.py uses by default besides the run's own
    sample_steps: int = 50               # sample.py's DDIM steps unless --steps is given
    guidance: float = 12.5               # sample.py's guidance scale unless --guidance is given (Tune-A-Video: 12.5)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
        values = dict(values)
        for key, kind in (("apla", APLAConfig), ("vgt_model", VGTConfig)):
            if isinstance(values.get(key), dict):
                values[key] = dataclass_from_dict(kind, values[key], key)
            elif key in values and not isinstance(values[key], kind):
                raise ValueError(f"{key} must be a table of {kind.__name__} fields, got {values[key]!r}")
        for key in ("trainable", "edit_prompts"):
            if key in values:
                values[key] = tuple(values[key])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    RANGES = {
        "max_steps": AT_LEAST_ONE, "frames": AT_LEAST_ONE, "start": Range(0, integer=True), "stride": AT_LEAST_ONE,
        "size": Range(0, open_low=True, multiple=VAE_DOWNSAMPLE, why=f"the VAE downsamples by {VAE_DOWNSAMPLE}"),
        "seed": SEED, "lr": POSITIVE, "disc_lr": POSITIVE,
        "adam_beta1": Range(0, 1, open_high=True), "adam_beta2": Range(0, 1, open_high=True),
        "weight_decay": NON_NEGATIVE, "adam_epsilon": POSITIVE,
        "max_grad_norm": NON_NEGATIVE,              # 0: no clipping
        "checkpoint_every": AT_LEAST_ONE, "keep_checkpoints": Range(0, integer=True),  # 0: keep all
        "sample_steps": Range(1, NUM_TRAIN_TIMESTEPS, integer=True), "guidance": NON_NEGATIVE,
    }

    def validate(self):
        """ValueError naming the first field out of its range (`RANGES`, and `APLAConfig.RANGES` as "apla.<field>");
        the one place where config files, saved runs and train.py's flags are checked."""
        if self.groupnorm not in GROUPNORM:
            raise ValueError(f"groupnorm must be one of {GROUPNORM}, got {self.groupnorm!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise ValueError(f"gradient_checkpointing must be true, false or \"auto\", got {self.gradient_checkpointing!r}")
        for name, allowed in self.RANGES.items():
            allowed.check(name, getattr(self, name))
        if self.init_seed is not None:
            SEED.check("init_seed", self.init_seed)
        self.apla.validate()


def dataclass_from_dict(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def default_config(pretrained: str = None) -> "TrainConfig":
    """The configuration a run gets before any file or flag: the dataclass defaults under the base model's preset
    (a bundled model's apla_preset.json, apla.assets)."""
    pretrained = TrainConfig.pretrained if pretrained is None else pretrained
    return TrainConfig.from_dict({**preset(pretrained), "pretrained": pretrained})


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
