"""A run of APLA, the one place `train.py` and `sample.py` share: the models of a run built from its TrainConfig,
the clip encoded once and decoded back, checkpoints of everything that trains, and the step log.

A run directory holds config.json, source.safetensors (the clip's latents and the prompt's text states),
log.jsonl (one line per step), checkpoints/step-NNNNNN/ (weights.safetensors with `unet.`, `vgt.` and `disc.`
parts + state.pt with the optimiser and random-generator states) and samples/. Everything is written atomically
(apla.checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from apla import checkpoint as ckpt
from apla.algorithm import APLA
from apla.config import APLAConfig, TrainConfig, vgt_config_for
from apla.discriminator import Discriminator, DiscriminatorConfig
from apla.losses import VGGFeatures
from apla.sd.unet import load_trainable_state, mark_trainable, trainable_state
from apla.vgt import VGT

# torchvision's ImageNet VGG16 file, as torch.hub caches it (torchvision.models.VGG16_Weights.IMAGENET1K_V1)
TORCHVISION_VGG16 = "vgg16-397923af.pth"
RANDOM = "random"


def init_seeds(cfg: TrainConfig) -> dict:
    """The seeds of the weights a run creates: TrainConfig.init_seed, or the run's seed when it is None; VGT takes
    it, D the next integer, the random VGG features (when no weights file is used) the one after."""
    s = cfg.seed if cfg.init_seed is None else cfg.init_seed
    return {"vgt": s, "disc": s + 1, "vgg": s + 2}


def resolve_perceptual_weights(cfg: APLAConfig) -> str | None:
    """The VGG16 weights L_per (Eq. 17) will use, as recorded in the run's config: the file the user gave, else
    torchvision's ImageNet file if the torch hub cache holds it, else "random" (a seeded random VGG16 prefix), said
    in one line on stderr. Unchanged when the run has no perceptual term (no hyper-loss, or gamma = 0)."""
    setting = cfg.perceptual_weights
    if not (cfg.use_hyper_loss and cfg.gamma > 0) or setting not in (None, RANDOM):
        return setting
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16
    if setting is None and cached.is_file():
        return str(cached)
    if setting is None:
        print("apla: the perceptual term (Eq. 17) uses random VGG16 features: no --perceptual-weights given and no "
              f"{cached}; pass --perceptual-weights PATH (torchvision VGG16, .pth or .safetensors)", file=sys.stderr)
    return RANDOM


def build_apla(cfg: TrainConfig, sd, latent_shape, device, train: bool = True) -> APLA:
    """The models of a run on the base model `sd`: the U-Net with the run's trainable set and GroupNorm setting,
    VGT sized from the clip's latents (B, C, F, h, w), D for its frame count, and (for training, gamma > 0) the
    VGG features of L_per from cfg.apla.perceptual_weights (resolved, see resolve_perceptual_weights)."""
    seeds = init_seeds(cfg)
    for frozen in (sd.vae, sd.text_encoder):
        if frozen is not None:
            frozen.requires_grad_(False)
    unet = sd.unet
    mark_trainable(unet, cfg.trainable)
    unet.set_norm_over_frames(cfg.groupnorm == "frames")
    vgt = VGT(dataclasses.replace(vgt_config_for(cfg, latent_shape), init_seed=seeds["vgt"])) if cfg.apla.use_vgt else None
    disc = (Discriminator(DiscriminatorConfig(channels=latent_shape[1], num_frames=latent_shape[2],
                                              init_seed=seeds["disc"])) if cfg.apla.use_discriminator else None)
    perceptual = None
    if train and cfg.apla.use_hyper_loss and cfg.apla.gamma > 0:
        weights = cfg.apla.perceptual_weights
        perceptual = VGGFeatures(weights=None if weights == RANDOM else weights, seed=seeds["vgg"])
    return APLA(unet, vgt, disc, perceptual, cfg.apla, sd.alpha_bar).to(device)


def optimizers(cfg: TrainConfig, model: APLA):
    """AdamW for theta (U-Net trainable set + VGT) and for D (None without D), with the run's settings; the fused
    implementation (one kernel for all parameters) when they live on a CUDA device."""
    fused = model.generator_parameters()[0].device.type == "cuda"
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
              fused=fused or None)
    opt_g = torch.optim.AdamW(model.generator_parameters(), lr=cfg.lr, **kw)
    opt_d = torch.optim.AdamW(model.disc.parameters(), lr=cfg.disc_lr, **kw) if model.disc is not None else None
    return opt_g, opt_d


def release_encoders(sd) -> None:
    """Move the VAE and the text encoder to the CPU once the clip and the prompt are encoded: the training loop needs
    neither, and on a GPU they would hold 0.83 GB at SD size through every step (nothing moves on a CPU)."""
    for part in (sd.vae, sd.text_encoder):
        if part is not None:
            part.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_clip(vae, frames: torch.Tensor, device, chunk: int = 4):
    """Encode (F, 3, H, W) frames once: the scaled posterior mean and std of z0, each (1, 4, F, h, w)."""
    means, stds = [], []
    for i in range(0, frames.shape[0], chunk):
        mean, logvar = vae.encode(frames[i:i + chunk].to(device))           # (f, 4, h, w) each
        means.append(mean.float())
        stds.append((0.5 * logvar.float()).exp())
    s = vae.scaling_factor
    mean = torch.cat(means).permute(1, 0, 2, 3).unsqueeze(0) * s           # (F, 4, h, w) -> (1, 4, F, h, w)
    std = torch.cat(stds).permute(1, 0, 2, 3).unsqueeze(0) * s             # (F, 4, h, w) -> (1, 4, F, h, w)
    return mean, std


@torch.no_grad()
def decode_latents(vae, z0: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Decode latents (1, 4, F, h, w) to frames (F, 3, H, W) in [-1, 1] on the CPU, a few frames at a time."""
    z = z0[0].permute(1, 0, 2, 3) / vae.scaling_factor                     # (1, 4, F, h, w) -> (F, 4, h, w)
    return torch.cat([vae.decode(z[i:i + chunk]).float().clamp(-1, 1).cpu() for i in range(0, z.shape[0], chunk)])


def checkpoint_meta(cfg: TrainConfig, model: APLA) -> dict:
    """What a checkpoint is bound to: the frozen base model, the VGT variant and whether D exists."""
    return {"base_model": ckpt.model_signature(model.unet), "vgt": cfg.apla.vgt if cfg.apla.use_vgt else "none",
            "discriminator": cfg.apla.use_discriminator, "pretrained": cfg.pretrained}


def save_checkpoint(run_dir, step: int, cfg: TrainConfig, model: APLA, opt_g, opt_d, gen: torch.Generator,
                    meta: dict) -> Path:
    """checkpoints/step-N/: the U-Net's trainable set, VGT and D as `unet.` / `vgt.` / `disc.` tensors, and the
    optimiser and random-generator states to resume from exactly."""
    weights = {f"unet.{k}": v for k, v in trainable_state(model.unet).items()}
    for prefix, part in (("vgt", model.vgt), ("disc", model.disc)):
        if part is not None:
            weights.update({f"{prefix}.{k}": v for k, v in part.state_dict().items()})
    state = {"step": step, "opt_g": opt_g.state_dict(), "generator": gen.get_state()}
    if opt_d is not None:
        state["opt_d"] = opt_d.state_dict()
    return ckpt.write_checkpoint(run_dir, step, weights, state, meta, keep=cfg.keep_checkpoints)


def load_checkpoint(path, cfg: TrainConfig, model: APLA, opt_g=None, opt_d=None, gen=None) -> int:
    """Load a checkpoint into the run's models (and optimisers and generator, when given); returns its step.
    Raises CheckpointError (one line) for a checkpoint of another base model, VGT variant or D setting."""
    expect = {k: v for k, v in checkpoint_meta(cfg, model).items() if k != "pretrained"}
    weights, state, _ = ckpt.read_checkpoint(path, expect=expect)
    part = {p: {k[len(p) + 1:]: v for k, v in weights.items() if k.startswith(p + ".")} for p in ("unet", "vgt", "disc")}
    try:
        load_trainable_state(model.unet, part["unet"], where=str(path))
        for name in ("vgt", "disc"):
            if getattr(model, name) is not None:
                getattr(model, name).load_state_dict(part[name])
    except (ValueError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    if opt_g is not None:
        opt_g.load_state_dict(state["opt_g"])
    if opt_d is not None:
        opt_d.load_state_dict(state["opt_d"])
    if gen is not None:
        gen.set_state(state["generator"])
    return int(state["step"])


def truncate_log(run_dir, step: int) -> None:
    """Keep one record of each step 1..step (a resumed run rewrites what came after its checkpoint)."""
    path = Path(run_dir) / "log.jsonl"
    if path.is_file():
        records = {json.loads(ln)["step"]: ln for ln in path.read_text().splitlines() if ln.strip()}  # last wins
        keep = [records[s] for s in sorted(records) if s <= step]
        ckpt.atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def read_config(run_dir) -> TrainConfig:
    """A run directory's config.json as a TrainConfig (CheckpointError, one line, when missing or unreadable)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ckpt.CheckpointError(f"{run_dir}: not a run directory of train.py (no config.json)")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"{path}: unreadable: {e}") from None
