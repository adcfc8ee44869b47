"""Sampling as a Python call: videos from a run of train.py, or from a base model and a clip, as tensors.

    import apla
    videos = apla.sample("runs/apla", ["a blue circle moving to the right"])      # [(8, 3, 64, 64)] in [-1, 1]
    videos = apla.sample("runs/apla", ["a red square"], invert=False, frames=4, size=48, seed=0)
    from apla.sampling import load_base
    base = load_base("micro", "red-circle-right")                 # no run: the base model, its clip encoded now
    videos = apla.sample(base, ["a blue circle moving to the right"])

Algorithm 1's second loop, "Sampling z_{t-1} using DDIM inversion", is read as Tune-A-Video does it: DDIM inversion
of the clip's latents (their posterior mean) to z_T with the empty prompt, then DDIM sampling (Eq. 3) from z_T with
the new prompt under classifier-free guidance; both evaluate the perturbed prediction eps* = eps_theta + phi, since
Eq. 4 defines the tuned model's output. Without inversion, z_T is seeded noise.

The inverted latent is kept (`inversion`): RUN/inversions/ holds one safetensors file per checkpoint and inversion
settings, named by what it depends on (`inversion_key`), written atomically and read back by every later call that
asks for the same; a new checkpoint or another setting inverts again. A base model sampled without a run inverts its
clip at each call: there is no run directory to keep it in.

sample.py is this module and its outputs: `load_run` or `load_base`, `sample`, then files and scores.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from apla import checkpoint as ckpt
from apla import run
from apla.algorithm import APLA
from apla.assets import resolve_video
from apla.cli import autocast_for, run_precision, unet_dtype
from apla.config import (DDIM_STEPS, NON_NEGATIVE, SIZE, TrainConfig, default_config, height_width, integer, merge,
                         problem)
from apla.scheduler import ddim_timesteps
from apla.sd.text import encode_prompt
from apla.sd.weights import StableDiffusion, assumption_note, load_stable_diffusion
from apla.video import read_video

INVERSION_PROMPT = ""  # Tune-A-Video inverts with the empty prompt
INVERSIONS = "inversions"  # RUN/inversions/: the kept z_T of each checkpoint and inversion settings


class SamplingError(ValueError):
    """A request sampling cannot honour (a frame count or size the run's VGT was not trained for, a base model that
    does not load, no prompt to sample); the message is one line."""


@dataclass
class Sampler:
    """What sampling needs, loaded once (`load_run`, `load_base`): the run's models with a checkpoint's weights (or
    the base model alone: no VGT, no D), the base model's VAE and text encoder, the configuration (the run's, or the
    base model's defaults), and the clip's latents z0 that inversion starts from and that sized VGT."""

    model: APLA
    sd: StableDiffusion
    cfg: TrainConfig
    z0: torch.Tensor  # (1, 4, F, h, w): the clip's scaled posterior mean
    precision: str  # the resolved mixed precision: "no", "bf16" or "fp16"
    run_dir: Path | None = None  # None for a base model sampled without a run
    checkpoint: Path | None = None  # the checkpoint whose weights the model holds
    precision_note: str | None = None  # why the precision is not the one asked (apla.cli.run_precision)
    model_note: str | None = None  # what loading the base model assumed (apla.sd.weights.assumption_note)

    @property
    def downsampling(self) -> int:
        """Pixels per latent along a side: the VAE's factor (8 for SD v1.5, 4 for the micro SD), as the clip shows
        it (read at cfg.size, encoded to z0)."""
        return height_width(self.cfg.size)[0] // self.z0.shape[-2]


def load_model(pretrained, device: torch.device, precision: str, seed: int,
               prediction_type: str | None = None) -> StableDiffusion:
    """The base model for sampling: on CUDA its U-Net in the autocast dtype (apla.cli.unet_dtype), the VAE and the
    text encoder in float32; `prediction_type` None is the model's own (apla.sd.weights). Torch is seeded with
    `seed` while it loads, as train.py seeds it before loading, so that the freshly initialised temporal layers of a
    base model are those a run on it started from (the caller's random state is left as it was). SamplingError (one
    line) for a model that does not load."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            return load_stable_diffusion(pretrained, device=device, dtype={"unet": unet_dtype(precision, device)},
                                         prediction_type=prediction_type)
        except (ValueError, OSError) as e:
            raise SamplingError(f"cannot load base model {pretrained!r}: {e}") from None


def resolve_device(device) -> torch.device:
    """`device` as a torch.device; None: cuda when available, else cpu."""
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(run_dir, checkpoint=None, pretrained=None, device=None, mixed_precision: str = "auto",
             prediction_type: str | None = None) -> Sampler:
    """A run of train.py, ready to sample: its config.json and source.safetensors (the clip's latents), its base model
    (or `pretrained`, read as predicting `prediction_type`, default the run's) and a checkpoint's weights (the latest,
    read safely while a train.py may go on writing the run, or the folder `checkpoint`). CheckpointError (one line)
    for what the run lacks or holds damaged."""
    run_dir, device = Path(run_dir), resolve_device(device)
    cfg = run.read_config(run_dir)
    if checkpoint is not None and not (Path(checkpoint) / "weights.safetensors").is_file():
        raise ckpt.CheckpointError(f"--checkpoint {checkpoint}: no weights.safetensors there")
    if checkpoint is None and ckpt.latest_checkpoint(run_dir) is None:
        raise ckpt.CheckpointError(f"--run {run_dir}: no checkpoint found (train first, or pass --checkpoint)")
    precision, why = run_precision(mixed_precision, device)  # as train.py runs it
    sd = load_model(pretrained or cfg.pretrained, device, precision, cfg.seed, prediction_type or cfg.prediction_type)
    z0 = run.read_source(run_dir)["z0_mean"].to(device)  # (1, 4, F, h, w)
    model = run.build_apla(cfg, sd, z0.shape, device, train=False)
    if checkpoint is not None:
        run.load_checkpoint(Path(checkpoint), cfg, model)
        used = Path(checkpoint)
    else:
        used = run.load_latest(run_dir, cfg, model)
    return Sampler(model.eval(), sd, cfg, z0, precision, run_dir, used, why, assumption_note(sd))


def load_base(pretrained, video=None, prompt: str | None = None, frames: int | None = None, size=None, device=None,
              mixed_precision: str = "auto", prediction_type: str | None = None) -> Sampler:
    """A base model sampled without a run: no VGT and no D, so the base model itself under this sampler (and
    sample.py's measures); any base model `load_stable_diffusion` takes (a bundled name, an SD file or folder, a hub
    id). Its clip `video` (default: the base model's clip, apla.config.default_config) is read at `frames` and `size`
    (default: the base model's, the micro run's 8 at 64 px or the paper's 24 at 512 px) and encoded now. `prompt` is
    the clip's caption (default: the base model's own clip's, else unknown, "", so that the prompts to sample must be
    named). SamplingError or apla.video.VideoError (one line) for what cannot be read or loaded."""
    device, base = resolve_device(device), default_config(pretrained)
    own_clip = video is None or resolve_video(video) == resolve_video(base.video)
    given = {"video": base.video if video is None else str(video), "apla": {"vgt": "none", "use_discriminator": False}}
    given.update({k: v for k, v in (("frames", frames), ("size", size)) if v is not None})
    if prompt is not None or not own_clip:  # another clip's caption is not the base model's, nor its edits
        given.update(prompt=prompt or "", edit_prompts=())
    try:
        cfg = TrainConfig.from_dict(merge(base.to_dict(), given))
    except (TypeError, ValueError) as e:
        raise SamplingError(str(e)) from None
    clip = read_video(resolve_video(cfg.video), cfg.frames, start=cfg.start, stride=cfg.stride,
                      size=cfg.size)  # (F, 3, H, W)
    precision, why = run_precision(mixed_precision, device)
    sd = load_model(cfg.pretrained, device, precision, cfg.seed, prediction_type)
    z0, _ = run.encode_clip(sd.vae, clip, device)  # (1, 4, F, h, w)
    model = run.build_apla(cfg, sd, z0.shape, device, train=False)
    return Sampler(model.eval(), sd, cfg, z0, precision, precision_note=why, model_note=assumption_note(sd))


# ---------------------------------------------------------------------------------------------------------------
# What a call may ask for: the clip's shape with inversion; without it, what the U-Net and the run's VGT can run
# ---------------------------------------------------------------------------------------------------------------

def vgt_limit(shape, trained, patch_size: int, down: int) -> str | None:
    """Why the run's VGT cannot honestly perturb latents of `shape` (1, C, F, h, w), trained on its clip's latents of
    shape `trained` (`down` pixels per latent, for the message); None when it can.

    VGT's positional embeddings are learned tables sized by the clip it was trained on (apla.config.vgt_config_for):
    p of Eq. 10 has a row for the temporal class token and one per frame, max_frames = the clip's F; p of Eq. 9 is a
    square grid of (sample_size / P)^2 patch positions, sample_size = the clip's longer latent side, read cropped to
    its top-left (h / P, w / P) corner (apla.vgt.VGT.forward). So F' <= F frames read the first F' rows, all
    trained, and h' <= h, w' <= w latents read a corner of the trained h x w crop; more frames have no row at all,
    and a side past the clip's own reads rows training never updated (a wide clip's square table loads a taller
    frame, untrained, which is why the limit is the clip's h and w and not sample_size). Each side must also split
    into patches of P. A shorter or smaller input is honest in this sense only: its tokens are trained ones, while
    the masked attention then runs over fewer of them than in training."""
    _, _, f0, h0, w0 = trained
    _, _, f, h, w = shape
    if f <= f0 and h <= h0 and w <= w0 and not (h % patch_size or w % patch_size):
        return None
    return (f"the run's VGT was trained on {f0} frames at {h0 * down}x{w0 * down} px (latents {h0}x{w0}): its learned "
            f"positional embeddings (p of Eqs. 9-10) have trained rows for at most {f0} frames and that size, each "
            f"side a multiple of {patch_size * down} px (patches of {patch_size} latents); {f} frames at "
            f"{h * down}x{w * down} px is past them: ask for at most that, or sample without VGT (use_vgt=False, "
            f"--no-vgt)")


def latent_shape(sampler: Sampler, frames: int | None = None, size=None, invert: bool = True,
                 use_vgt: bool = True) -> tuple:
    """The shape (1, C, F, h, w) of the latents a call samples, or SamplingError (one line) naming the limit it
    passes. With inversion it is the clip's own: z_T is the clip's latents inverted, so another frame count or size
    is refused. Without, any frame count >= 1 and frame size (each side a multiple of 8, apla.config.SIZE, and of
    the VAE's factor) that the U-Net takes, which is any (its temporal attention has no positional encoding,
    GroupNorm pools whatever frames there are, odd latent sides round as in SD), and that the run's VGT can
    honestly perturb (`vgt_limit`, unless use_vgt is False)."""
    trained, down = tuple(sampler.z0.shape), sampler.downsampling
    _, c, f0, h0, w0 = trained
    if frames is not None and not (integer(frames) and frames >= 1):
        raise SamplingError(f"frames={frames!r}: must be an integer >= 1")
    hw = (h0 * down, w0 * down) if size is None else height_width(size)
    if hw is None or hw[0] % down or hw[1] % down:
        raise SamplingError(f"size={size!r}: must be {SIZE[1]}, and of whole latents ({down} px each)")
    shape = (1, c, f0 if frames is None else frames, hw[0] // down, hw[1] // down)
    if invert and shape != trained:
        raise SamplingError(f"with inversion the samples have the clip's {f0} frames at {h0 * down}x{w0 * down} px "
                            f"(z_T is its latents inverted); sample without inversion (invert=False, --no-inversion) "
                            f"for {shape[2]} frames at {hw[0]}x{hw[1]}")
    vgt = sampler.model.vgt
    limit = vgt_limit(shape, trained, vgt.config.patch_size, down) if use_vgt and vgt is not None else None
    if limit:
        raise SamplingError(limit)
    return shape


# ---------------------------------------------------------------------------------------------------------------
# The inverted latent, kept in the run directory
# ---------------------------------------------------------------------------------------------------------------

def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def tensor_digest(x: torch.Tensor) -> str:
    return digest(x.detach().double().cpu().contiguous().numpy().tobytes())


def inversion_key(sampler: Sampler, steps: int, use_vgt: bool) -> dict:
    """What an inverted latent depends on, as the strings its file keeps: the checkpoint (a hash of its weights file,
    so a checkpoint written again at the same step is another one), its step, the DDIM steps, whether phi is added,
    the prompt of inversion, the precision, U-Net dtype and kind of device it was computed in, the base model (the
    fingerprint a checkpoint is bound to, apla.checkpoint.model_signature, what its U-Net is read as predicting, the
    schedule's alpha_bar), and the clip's latents. Paths are left out, so a run folder that moves keeps its
    inversions."""
    model = sampler.model
    return {"checkpoint": file_digest(sampler.checkpoint / "weights.safetensors"),
            "checkpoint_step": str(ckpt.checkpoint_step(sampler.checkpoint)), "steps": str(steps),
            "vgt": str(use_vgt and model.vgt is not None), "prompt": INVERSION_PROMPT,
            "precision": sampler.precision, "unet_dtype": str(next(model.unet.parameters()).dtype),
            "device": sampler.z0.device.type, "prediction_type": str(sampler.sd.prediction_type),
            "base_model": digest(json.dumps(ckpt.model_signature(model.unet), sort_keys=True).encode()),
            "alpha_bar": tensor_digest(model.alpha_bar), "z0": tensor_digest(sampler.z0)}


def inversion_file(sampler: Sampler, key: dict) -> Path:
    """RUN/inversions/<checkpoint>-ddim<steps>-<vgt|no-vgt>-<precision>-<hash of the whole key>.safetensors."""
    name = (f"{sampler.checkpoint.name}-ddim{key['steps']}-{'vgt' if key['vgt'] == 'True' else 'no-vgt'}-"
            f"{key['precision']}-{digest(json.dumps(key, sort_keys=True).encode())[:12]}.safetensors")
    return sampler.run_dir / INVERSIONS / name


def read_inversion(path: Path, key: dict, shape) -> torch.Tensor | None:
    """The z_T a file keeps when its key is `key` and its tensor finite and of `shape`; None for anything else (no
    file, another key, a damaged file: inverted again and written over)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            z_T = f.get_tensor("z_T") if f.metadata() == key else None
    except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: invert again
        return None
    return z_T if z_T is not None and tuple(z_T.shape) == tuple(shape) and torch.isfinite(z_T).all() else None


class Inversion(NamedTuple):
    z_T: torch.Tensor  # (1, 4, F, h, w)
    path: Path | None  # the file that keeps it (None: a base model without a run, or a run folder not writable)
    reused: bool  # read back from `path` instead of inverted now


def inversion(sampler: Sampler, steps: int | None = None, use_vgt: bool = True, progress: bool = False) -> Inversion:
    """z_T of the clip by DDIM inversion with the empty prompt on eps* (apla.run.invert_clip), `steps` DDIM steps
    (default: the run's sample_steps), read back from RUN/inversions/ when it holds one of the same `inversion_key`,
    else inverted now and kept there (atomically). A run folder that cannot be written (read-only, full) keeps
    nothing, and neither does a checkpoint pruned by a running train.py since it was loaded (its file is gone to
    hash): said in one line on stderr, and the samples are made all the same."""
    steps = sampler.cfg.sample_steps if steps is None else steps
    use_vgt = use_vgt and sampler.model.vgt is not None
    path = key = None
    if sampler.run_dir is not None:
        try:
            key = inversion_key(sampler, steps, use_vgt)
        except FileNotFoundError as e:
            print(f"note: the inversion is not kept ({ckpt.describe_os_error(e)})", file=sys.stderr)
    if key is not None:
        path = inversion_file(sampler, key)
        z_T = read_inversion(path, key, sampler.z0.shape)
        if z_T is not None:
            return Inversion(z_T.to(sampler.z0.device), path, True)
    with torch.no_grad():
        uncond = encode_prompt(sampler.sd, [INVERSION_PROMPT]).to(sampler.z0.device)  # (1, 77, D)
    timesteps = ddim_timesteps(steps, len(sampler.sd.alpha_bar))
    amp = autocast_for(sampler.precision, sampler.z0.device)
    z_T = run.invert_clip(sampler.model, sampler.z0, uncond, timesteps, amp, use_vgt, progress=progress)
    if path is not None:
        try:
            ckpt.atomic_save_safetensors({"z_T": z_T.float()}, path, metadata=key)
        except OSError as e:
            print(f"note: the inversion is not kept ({ckpt.describe_os_error(e)}); the next call inverts again",
                  file=sys.stderr)
            path = None
    return Inversion(z_T, path, False)


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------

def sample(source, prompts=None, *, frames: int | None = None, size=None, steps: int | None = None,
           guidance: float | None = None, negative_prompt: str = "", invert: bool = True, seed: int = 33,
           use_vgt: bool = True, latents: torch.Tensor | None = None, progress: bool = False) -> list[torch.Tensor]:
    """Videos of `prompts` (a string or a list; default: the run's prompt and its edits), one (F, 3, H, W) tensor in
    [-1, 1] on the CPU per prompt, in order: Tune-A-Video's
    `pipeline(prompt, video_length, height, width, num_inference_steps, guidance_scale, latents=ddim_inv_latent)`.

    source: a run directory (loaded with `load_run`'s defaults) or a `Sampler` (`load_run`, `load_base`).
    invert: start from the clip's latents inverted (`inversion`, kept in the run directory), so the clip's own frame
      count and size; else from seeded noise (`seed`) of `frames` frames at `size` (default: the clip's), whatever
      the U-Net and the run's VGT can run (`latent_shape`: VGT's positional embeddings bound both). `latents` (1, 4,
      F, h, w) gives z_T instead.
    steps, guidance: DDIM steps and classifier-free guidance scale (default: the run's sample_steps and guidance).
    negative_prompt: guidance's unconditional branch (the inversion keeps the empty prompt); use_vgt: add phi (Eq. 4).
    SamplingError (one line) for what cannot be honoured, before any sampling; also for latents that come out not
    finite (a checkpoint of a run that blew up)."""
    sampler = source if isinstance(source, Sampler) else load_run(source)
    cfg, device = sampler.cfg, sampler.z0.device
    if prompts is None and not cfg.prompt:
        raise SamplingError("no prompts to sample: the clip's caption is not known, so name them")
    prompts = [prompts] if isinstance(prompts, str) else list(run.sample_prompts(cfg) if prompts is None else prompts)
    steps = cfg.sample_steps if steps is None else steps
    guidance = cfg.guidance if guidance is None else guidance
    wrong = problem(DDIM_STEPS, steps) or problem(NON_NEGATIVE, guidance)
    if wrong:
        raise SamplingError(f"steps={steps!r}, guidance={guidance!r}: {wrong}")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SamplingError(f"prompts={prompts!r}: expected a string or a non-empty list of strings")
    use_vgt = use_vgt and sampler.model.vgt is not None
    if latents is None:
        shape = latent_shape(sampler, frames, size, invert, use_vgt)
        if invert:
            latents = inversion(sampler, steps, use_vgt, progress).z_T
        else:
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    else:
        latent_shape(sampler, latents.shape[2], tuple(s * sampler.downsampling for s in latents.shape[-2:]), False,
                     use_vgt)
    timesteps = ddim_timesteps(steps, len(sampler.sd.alpha_bar))
    amp = autocast_for(sampler.precision, device)
    with torch.no_grad():
        uncond = encode_prompt(sampler.sd, [negative_prompt]).to(device)  # (1, 77, D)
    videos = []
    for prompt in prompts:
        with torch.no_grad():
            cond = encode_prompt(sampler.sd, [prompt]).to(device)  # (1, 77, D)
        z0 = run.guided_sample(sampler.model, latents.to(device), uncond, cond, timesteps, guidance, amp, use_vgt,
                               progress=progress)
        if not torch.isfinite(z0).all():
            raise SamplingError(f"{prompt!r}: the sampled latents are not finite; no video made (is the checkpoint "
                                f"{sampler.checkpoint} one of a run that blew up?)")
        videos.append(run.decode_latents(sampler.sd.vae, z0))  # (F, 3, H, W)
    return videos
