"""A run of APLA, the one place `train.py` and `sample.py` share: the models of a run built from its TrainConfig,
the clip encoded once and decoded back, checkpoints of everything that trains, and the step log.

A run directory holds config.json, source.safetensors (the clip's latents and the prompt's text states),
log.jsonl (one line per step), checkpoints/step-NNNNNN/ (weights.safetensors with `unet.`, `vgt.` and `disc.`
parts + state.pt with the optimiser, schedule, scaler and random-generator states + log.jsonl, the records since the
checkpoint before), inversions/ (the clip's z_T kept by sample.py, apla.sampling) and samples/ (sample.py's outputs;
with --sample-every, step-NNNNNN/ folders of GIFs written while training, and progression.png). Everything is
written atomically (apla.checkpoint), by one train.py at a time (apla.checkpoint.RunLock; inversions/ and samples/
are sample.py's); what an interrupted run leaves is always a state that `--resume` (or, before the first
checkpoint, the same command) continues from.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from apla import checkpoint as ckpt
from apla.algorithm import APLA
from apla.assets import CLIPS, model_path
from apla.config import APLAConfig, TrainConfig, vgt_config_for
from apla.discriminator import Discriminator, DiscriminatorConfig
from apla.eval.score import sample_stem
from apla.losses import VGGFeatures
from apla.scheduler import ddim_invert, ddim_sample, ddim_timesteps
from apla.sd.unet import load_trainable_state, mark_trainable, trainable_state
from apla.video import write_gif
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
    """The models of a run on the base model `sd`: the U-Net with the run's trainable set and GroupNorm setting (its
    output read as `sd.prediction_type` says),
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
        if min(latent_shape[-2:]) < perceptual.min_side:
            raise ValueError(f"latents of {latent_shape[-2]}x{latent_shape[-1]} are smaller than the "
                             f"{perceptual.min_side}x{perceptual.min_side} the perceptual term's VGG features take "
                             f"(Eq. 17); choose a larger --size")
    return APLA(unet, vgt, disc, perceptual, cfg.apla, sd.alpha_bar, sd.prediction_type).to(device)


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
                    meta: dict, states: dict | None = None, log: "StepLog | None" = None) -> Path:
    """checkpoints/step-N/: the U-Net's trainable set, VGT and D as `unet.` / `vgt.` / `disc.` tensors, and the
    optimiser and random-generator states to resume from exactly, with the state_dict() of each of `states` (name ->
    object: the learning-rate schedule, the gradient scaler). With the run's `log`, the log is made durable first
    and the checkpoint carries its records since the checkpoint before (StepLog.sync), so a checkpoint implies its
    log: --resume restores what the log lost up to the checkpoint's step (truncate_log)."""
    weights = {f"unet.{k}": v for k, v in trainable_state(model.unet).items()}
    for prefix, part in (("vgt", model.vgt), ("disc", model.disc)):
        if part is not None:
            weights.update({f"{prefix}.{k}": v for k, v in part.state_dict().items()})
    state = {"step": step, "opt_g": opt_g.state_dict(), "generator": gen.get_state()}
    if opt_d is not None:
        state["opt_d"] = opt_d.state_dict()
    state.update({name: part.state_dict() for name, part in (states or {}).items()})
    files = {CARRIED_LOG: log.sync()} if log is not None else {}
    path = ckpt.write_checkpoint(run_dir, step, weights, state, meta, keep=cfg.keep_checkpoints, files=files)
    if log is not None:
        log.carried()
    return path


def load_checkpoint(path, cfg: TrainConfig, model: APLA, opt_g=None, opt_d=None, gen=None,
                    states: dict | None = None) -> int | None:
    """Load a checkpoint into the run's models (and optimisers, generator and `states`, as save_checkpoint names
    them, when given: only then is state.pt read); returns its step. A state the checkpoint lacks, or holds empty,
    is left as it is: a checkpoint written before schedules were saved had a constant rate, one of a run without
    fp16 has no scale. Raises CheckpointError (one line) for a checkpoint of another base model, VGT variant or
    D setting, a damaged file or values that are not finite; FileNotFoundError for a checkpoint that is gone."""
    expect = {k: v for k, v in checkpoint_meta(cfg, model).items() if k != "pretrained"}
    weights, _ = ckpt.read_weights(path, expect=expect)
    part = {p: {k[len(p) + 1:]: v for k, v in weights.items() if k.startswith(p + ".")} for p in ("unet", "vgt", "disc")}
    try:
        load_trainable_state(model.unet, part["unet"], where=str(path))
        for name in ("vgt", "disc"):
            if getattr(model, name) is not None:
                getattr(model, name).load_state_dict(part[name])
    except (ValueError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    if opt_g is None and gen is None:
        return ckpt.checkpoint_step(path)
    state = ckpt.read_state(path)
    try:
        if opt_g is not None:
            opt_g.load_state_dict(state["opt_g"])
        if opt_d is not None:
            opt_d.load_state_dict(state["opt_d"])
        if gen is not None:
            gen.set_state(state["generator"])
        for name, obj in (states or {}).items():
            if state.get(name):
                obj.load_state_dict(state[name])
        return int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"cannot resume from {path}/state.pt: {type(e).__name__} {e}") from None


def load_latest(run_dir, cfg: TrainConfig, model: APLA) -> Path:
    """Load the weights of a run's newest checkpoint (sample.py) while its train.py may go on writing: a
    checkpoint pruned between listing and opening is passed over for the newer one that replaced it (a file once
    opened stays readable after its removal, so what is read is one whole checkpoint)."""
    while True:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise ckpt.CheckpointError(f"--run {run_dir}: no checkpoint found (train first, or pass --checkpoint)")
        try:
            load_checkpoint(latest, cfg, model)
            return latest
        except FileNotFoundError:
            if ckpt.latest_checkpoint(run_dir) == latest:
                raise ckpt.CheckpointError(f"{latest}: weights.safetensors vanished while it was read") from None


@torch.no_grad()
def nonfinite(model: APLA, z0: torch.Tensor, context: torch.Tensor, autocast) -> str | None:
    """What of a model about to be checkpointed is not finite: a trainable parameter's name, or the perturbed
    prediction eps* (Eq. 4) on the clip's latents z0 (1, 4, F, h, w) at the middle timestep; None when all is
    finite. Weights can be finite and still so large (a blow-up) that the next prediction is not, hence both."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            return f"parameter {name}"
    with autocast:
        eps_star = model.eps_star(z0, len(model.alpha_bar) // 2, context)          # (1, 4, F, h, w)
    return None if torch.isfinite(eps_star).all() else "the prediction eps* on the clip"


def read_source(run_dir) -> dict:
    """A run's source.safetensors (the clip's latents z0_mean, z0_std and the prompt's context); CheckpointError in
    one line when it is missing or damaged."""
    path = Path(run_dir) / "source.safetensors"
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors: the same one-line message
        raise ckpt.CheckpointError(f"{path}: missing or unreadable ({e}); train.py writes it as a run starts") from None


def read_config(run_dir) -> TrainConfig:
    """A run directory's config.json as a TrainConfig (CheckpointError, one line, when missing or unreadable)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ckpt.CheckpointError(f"{run_dir}: not a run directory of train.py (no config.json)")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"{path}: unreadable: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# The run directory: where it is, what a resumed run may change, the log as a journal, where a stopped run stands
# ---------------------------------------------------------------------------------------------------------------

# the settings a resumed run may change; every other one shapes the data, the models or their optimisers' state
RESUMABLE = ("output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "device", "progress",
             "mixed_precision", "gradient_checkpointing", "compile", "edit_prompts", "sample_steps", "guidance",
             "report_to")


def run_directory(output_dir: str) -> Path:
    """--output-dir as an absolute path; ValueError (one line) for an empty name or a file."""
    if not str(output_dir).strip():
        raise ValueError("--output-dir is empty: name the run directory")
    path = Path(os.path.abspath(output_dir))
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {path} is a file, not a folder")
    return path


def absolute_paths(cfg: TrainConfig) -> None:
    """Make cfg's paths absolute, as config.json keeps them (read again by --resume and sample.py from any folder):
    the run directory, the clip and the base model unless they are bundled names or a hub id, the VGG weights."""
    cfg.output_dir = str(run_directory(cfg.output_dir))
    if cfg.video not in CLIPS:
        cfg.video = os.path.abspath(cfg.video)
    if model_path(cfg.pretrained) is None and Path(cfg.pretrained).exists():
        cfg.pretrained = os.path.abspath(cfg.pretrained)
    if cfg.apla.perceptual_weights not in (None, RANDOM):
        cfg.apla.perceptual_weights = os.path.abspath(cfg.apla.perceptual_weights)


def resume_conflicts(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """The settings a resumed run asks to change but cannot (all but RESUMABLE), each as "key saved -> asked". The
    saved paths are made absolute first: a run saved with relative ones is read from the folder it is resumed in."""
    absolute_paths(saved)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = (flat(json.loads(json.dumps(c.to_dict()))) for c in (saved, cfg))  # tuples as lists, as in config.json
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k.split(".")[0] not in RESUMABLE and a.get(k) != b.get(k)]


CARRIED_LOG = "log.jsonl"  # in checkpoints/step-N/: the log's records since the checkpoint before


def log_records(text: str) -> tuple[dict, int]:
    """The records of log.jsonl's text, step -> line (the last written of each), and the count of unreadable lines
    (a line cut short by a kill or a full disk)."""
    records, torn = {}, 0
    for line in text.splitlines():
        try:
            records[int(json.loads(line)["step"])] = line
        except (ValueError, KeyError, TypeError):
            torn += bool(line.strip())
    return records, torn


def truncate_log(run_dir, step: int) -> tuple[int, int, int]:
    """Make log.jsonl hold one record of each step 1..step: the last written of each (a resumed run rewrites what
    came after its checkpoint), and each that the log lost but a checkpoint up to `step` carries (save_checkpoint).
    Returns (records dropped, unreadable lines dropped, records restored)."""
    path = Path(run_dir) / "log.jsonl"
    records, torn = log_records(path.read_text(errors="replace")) if path.is_file() else ({}, 0)
    restored = 0
    for checkpoint in ckpt.list_checkpoints(run_dir):
        carried = checkpoint / CARRIED_LOG
        if ckpt.checkpoint_step(checkpoint) <= step and carried.is_file():
            for s, line in log_records(carried.read_text(errors="replace"))[0].items():
                restored += s not in records
                records.setdefault(s, line)
    if not records and not path.is_file():
        return 0, 0, 0
    keep = [records[s] for s in sorted(records) if s <= step]
    ckpt.atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())
    return len(records) - len(keep), torn, restored


class StepLog:
    """log.jsonl as a journal: opened at the step a run starts from (0 for a new run), it first keeps one record of
    each step 1..step, restoring from the checkpoints what the log lost (truncate_log: `dropped`, `torn` and
    `restored` count what changed); each record is then appended whole or not at all, so a failed write (a full
    disk, Ctrl-C) leaves the file ending on a whole line, and passed on to `board` (apla.loop.TensorBoard) when
    given. `sync` makes the log durable before a checkpoint and hands it the records since the one before."""

    def __init__(self, run_dir, step: int, board=None):
        self.path, self.board = Path(run_dir) / "log.jsonl", board
        self.dropped, self.torn, self.restored = truncate_log(run_dir, step)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._since_checkpoint = []  # the lines appended since the last checkpoint

    def append(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        end = os.fstat(self._fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except BaseException as e:
            os.ftruncate(self._fd, end)
            raise ckpt.naming(e, self.path) from None
        self._since_checkpoint.append(data)
        if self.board is not None:
            self.board.write(record)

    def sync(self) -> bytes:
        """The log flushed to the disk (fsync) and TensorBoard's events flushed; returns the records appended since
        the last checkpoint, for the next one to carry."""
        os.fsync(self._fd)
        if self.board is not None:
            self.board.flush()
        return b"".join(self._since_checkpoint)

    def carried(self) -> None:
        """A checkpoint now carries the records since the one before: start the next list."""
        self._since_checkpoint = []

    def notes(self, resumed: bool) -> list[str]:
        """What opening the log changed, one line each for stderr."""
        notes = []
        if self.torn:
            notes.append(f"apla: {self.path}: dropped {self.torn} line(s) cut short by an interrupted write")
        if self.restored:
            notes.append(f"apla: {self.path}: restored {self.restored} record(s) it had lost from the checkpoints")
        if self.dropped and not resumed:
            notes.append(f"apla: {self.path} held {self.dropped} step(s) of a run that saved no checkpoint; the log "
                         "starts afresh")
        return notes

    def close(self) -> None:
        os.close(self._fd)
        if self.board is not None:
            self.board.close()

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def last_logged_step(run_dir) -> int:
    """The step of log.jsonl's last readable record (0 when none)."""
    path = Path(run_dir) / "log.jsonl"
    for line in reversed(path.read_text(errors="replace").splitlines() if path.is_file() else []):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def resume_hint(run_dir) -> str:
    """What continues a stopped run: `--resume` from its latest checkpoint, or the same command before the first."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return "no checkpoint yet: the same command starts the run afresh"
    return f"--resume continues from step {ckpt.checkpoint_step(latest)}"


# ---------------------------------------------------------------------------------------------------------------
# Sampling: DDIM inversion of the clip, then guided DDIM per prompt (sample.py, and train.py's --sample-every)
# ---------------------------------------------------------------------------------------------------------------
def sample_prompts(cfg: TrainConfig) -> list[str]:
    """The prompts a run samples unless told otherwise: its own, then its edits, each once."""
    return list(dict.fromkeys([cfg.prompt, *cfg.edit_prompts]))


def invert_clip(model: APLA, z0, uncond, timesteps, amp, use_vgt: bool = True, progress: bool = False):
    """z_T of the clip latents z0 (1, 4, F, h, w) by DDIM inversion on eps* with the empty prompt (Tune-A-Video's
    recipe, on Eq. 4's prediction)."""
    with amp:
        return ddim_invert(lambda z, t: model.eps_star(z, t, uncond, use_vgt), z0, timesteps, model.alpha_bar,
                           progress=progress)


def guided_sample(model: APLA, z_T, uncond, cond, timesteps, guidance: float, amp, use_vgt: bool = True,
                  progress: bool = False):
    """z_0 by DDIM sampling (Eq. 3) from z_T with classifier-free guidance on eps* (Eq. 4)."""
    with amp:
        return ddim_sample(lambda z, t: model.guided_eps(z, t, uncond, cond, guidance, use_vgt), z_T, timesteps,
                           model.alpha_bar, progress=progress)


PROGRESSION_HEADER = 12  # px: the row of step numbers above progression.png's columns


class TrainingSamples:
    """train.py's --sample-every: at a step, a GIF per prompt in samples/step-NNNNNN/ (the clip inverted and sampled
    again with the run's sample_steps guided DDIM steps, as sample.py does: Tune-A-Video's validation samples take
    its validation_data.num_inference_steps, apla.tav), so that a run overfitting to its clip shows while it trains;
    at the end, progression.png. `texts` maps "" and each prompt to its encoded text (1, 77, D)."""

    def __init__(self, cfg: TrainConfig, vae, texts: dict, alpha_bar_len: int, device):
        self.vae, self.texts, self.device, self.guidance = vae, texts, torch.device(device), cfg.guidance
        self.prompts = sample_prompts(cfg)
        self.dir = Path(cfg.output_dir) / "samples"
        self.timesteps = ddim_timesteps(cfg.sample_steps, alpha_bar_len)

    @torch.no_grad()
    def write(self, model: APLA, z0, step: int, amp) -> float:
        """The GIFs of `step`, written atomically; returns the seconds it took (the model is back in training)."""
        start, out = time.perf_counter(), self.dir / f"step-{step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        model.eval()
        z_T = invert_clip(model, z0, self.texts[""], self.timesteps, amp)
        self.vae.to(self.device)  # released to the CPU between samplings (release_encoders)
        for prompt in self.prompts:
            z = guided_sample(model, z_T, self.texts[""], self.texts[prompt], self.timesteps, self.guidance, amp)
            write_gif(decode_latents(self.vae, z), out / f"{sample_stem(prompt)}.gif")
        if self.device.type != "cpu":
            self.vae.to("cpu")
        model.train()
        return time.perf_counter() - start

    def progression(self) -> Path | None:
        """samples/progression.png: a header of step numbers, then for each prompt a band of three rows (its
        first, middle and last frame), one column per sampled step in order, read back from every step-NNNNNN/
        (those of a resumed run's earlier part too); None when none was written."""
        steps = sorted(self.dir.glob("step-[0-9]*"))
        if not steps:
            return None
        rows = []
        for prompt in self.prompts:
            cells = [gif_frames(step / f"{sample_stem(prompt)}.gif") for step in steps]
            rows += [np.concatenate([c[k] for c in cells], axis=1) for k in range(3)]  # first, middle, last
        header = Image.new("RGB", (rows[0].shape[1], PROGRESSION_HEADER), "white")
        draw, width = ImageDraw.Draw(header), rows[0].shape[1] // len(steps)
        for j, step in enumerate(steps):
            draw.text((j * width + 2, 1), str(int(step.name.removeprefix("step-"))), fill="black")
        image = Image.fromarray(np.concatenate([np.asarray(header), *rows], axis=0))
        return Path(ckpt.atomic_write(self.dir / "progression.png", lambda tmp: image.save(tmp, format="PNG")))


def gif_frames(path: Path) -> list[np.ndarray]:
    """The first, middle and last frame of a GIF as (H, W, 3) uint8 arrays."""
    with Image.open(path) as im:
        picks = []
        for k in (0, im.n_frames // 2, im.n_frames - 1):
            im.seek(k)
            picks.append(np.asarray(im.convert("RGB")))
        return picks
