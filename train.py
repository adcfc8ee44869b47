"""Tune a pretrained Stable Diffusion, inflated to video, on one clip with APLA (Algorithm 1, Eqs. 1 and 4-20).

    python train.py                                   # the defaults (see --help)
    python train.py --pretrained path/to/v1-5-pruned-emaonly.safetensors --video clip.mp4 --prompt "..." \
        --mixed-precision bf16 --gradient-checkpointing

Reads top to bottom: configuration -> base model -> clip encoded once -> the step of Algorithm 1 repeated
(Eq. 1 noising, Eq. 4 perturbed prediction, Eq. 18 hyper-loss + Eq. 20 adversarial term for U-Net and VGT,
Eq. 19 for the discriminator) -> checkpoints and a JSONL log in the run directory.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import apla
from apla import checkpoint as ckpt
from apla.cli import autocast_for, fail, parse_train_args, pick_device
from apla.bundled import resolve_video
from apla.config import vgt_config_for
from apla.discriminator import Discriminator, DiscriminatorConfig
from apla.losses import VGGFeatures, discriminator_loss, generator_loss
from apla.scheduler import q_sample
from apla.unet import load_trainable_state, mark_trainable, trainable_state
from apla.video import VideoError, read_video
from apla.vgt import VGT


@torch.no_grad()
def encode_clip(sd, frames: torch.Tensor, device, chunk: int = 4):
    """Encode (F, 3, H, W) frames once: the posterior mean and std of z0, scaled, as (1, 4, F, h, w)."""
    means, stds = [], []
    for i in range(0, frames.shape[0], chunk):
        mean, logvar = sd.vae.encode(frames[i:i + chunk].to(device))   # (f, 4, h, w) each
        means.append(mean.float())
        stds.append((0.5 * logvar.float()).exp())
    s = sd.vae.scaling_factor
    mean = torch.cat(means).permute(1, 0, 2, 3).unsqueeze(0) * s   # (F, 4, h, w) -> (1, 4, F, h, w)
    std = torch.cat(stds).permute(1, 0, 2, 3).unsqueeze(0) * s     # (F, 4, h, w) -> (1, 4, F, h, w)
    return mean, std


def main(argv=None) -> int:
    # ---- configuration: dataclass defaults <- preset of the base model <- --config file <- flags ----------------
    cfg, resume = parse_train_args(argv)
    run_dir = Path(cfg.output_dir)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # ---- inputs are checked before anything is written ---------------------------------------------------------
    try:
        frames = read_video(resolve_video(cfg.video), cfg.frames, start=cfg.start, stride=cfg.stride,
                            size=cfg.size)                                                 # (F, 3, H, W)
    except VideoError as e:
        fail(str(e))
    start_ckpt = None
    if resume:
        start_ckpt = ckpt.latest_checkpoint(run_dir)
        if start_ckpt is None:
            fail(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    elif ckpt.latest_checkpoint(run_dir) is not None:
        fail(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output-dir")

    try:
        sd = apla.load_stable_diffusion(cfg.pretrained, device=device)
    except (ValueError, OSError) as e:
        fail(f"cannot load --pretrained {cfg.pretrained!r}: {e}")

    # ---- the models: U-Net's trainable set (Tune-A-Video), VGT (phi), discriminator (D) -------------------------
    unet = sd.unet
    sd.vae.requires_grad_(False)
    sd.text_encoder.requires_grad_(False)
    n_unet = mark_trainable(unet, cfg.trainable)
    unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    base_signature = ckpt.model_signature(unet)

    # ---- the clip and the prompt, encoded once ------------------------------------------------------------------
    z0_mean, z0_std = encode_clip(sd, frames, device)                  # (1, 4, F, h, w) each
    with torch.no_grad():
        context = apla.encode_prompt(sd, [cfg.prompt]).to(device)      # (1, 77, D)
    try:
        vgt = VGT(vgt_config_for(cfg, z0_mean.shape)).to(device) if cfg.apla.use_vgt else None
    except ValueError as e:
        fail(str(e))
    disc = (Discriminator(DiscriminatorConfig(channels=z0_mean.shape[1], num_frames=z0_mean.shape[2]))
            .to(device) if cfg.apla.use_discriminator else None)
    perceptual = (VGGFeatures(weights=cfg.apla.perceptual_weights).to(device).requires_grad_(False)
                  if cfg.apla.use_hyper_loss and cfg.apla.gamma > 0 else None)
    gen_params = [p for p in unet.parameters() if p.requires_grad] + (list(vgt.parameters()) if vgt else [])
    opt_g = torch.optim.AdamW(gen_params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon) if disc else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")

    alpha_bar = sd.alpha_bar.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step = 0

    meta = {"base_model": base_signature, "vgt": cfg.apla.vgt if cfg.apla.use_vgt else "none",
            "discriminator": cfg.apla.use_discriminator, "pretrained": cfg.pretrained}
    if start_ckpt is not None:
        try:
            weights, state, _ = ckpt.load_checkpoint(start_ckpt, expect={k: meta[k] for k in
                                                                          ("base_model", "vgt", "discriminator")})
            load_trainable_state(unet, {k[5:]: v for k, v in weights.items() if k.startswith("unet.")},
                                 where=str(start_ckpt))
            if vgt is not None:
                vgt.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("vgt.")})
            if disc is not None:
                disc.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("disc.")})
        except (ckpt.CheckpointError, ValueError, RuntimeError) as e:
            fail(f"cannot resume from {start_ckpt}: {str(e).splitlines()[0]}")
        opt_g.load_state_dict(state["opt_g"])
        if opt_d is not None:
            opt_d.load_state_dict(state["opt_d"])
        gen.set_state(state["generator"])
        step = int(state["step"])

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(run_dir / "config.json", cfg.to_dict())
    ckpt.atomic_save_safetensors({"z0_mean": z0_mean, "z0_std": z0_std, "context": context},
                                 run_dir / "source.safetensors", metadata={"prompt": cfg.prompt})

    def save(step_done: int):
        weights = {f"unet.{k}": v for k, v in trainable_state(unet).items()}
        if vgt is not None:
            weights.update({f"vgt.{k}": v for k, v in vgt.state_dict().items()})
        if disc is not None:
            weights.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
        state = {"step": step_done, "opt_g": opt_g.state_dict(), "generator": gen.get_state()}
        if opt_d is not None:
            state["opt_d"] = opt_d.state_dict()
        ckpt.save_checkpoint(run_dir, step_done, weights, state, meta, keep=cfg.keep_checkpoints)

    print(f"apla: {n_unet / 1e6:.3f} M U-Net parameters train"
          + (f", VGT-{cfg.apla.vgt} {sum(p.numel() for p in vgt.parameters()) / 1e6:.3f} M" if vgt else "")
          + (f", D {sum(p.numel() for p in disc.parameters())} parameters" if disc else "")
          + f"; {frames.shape[0]} frames at {cfg.size}px on {device}; run dir {run_dir}", file=sys.stderr)

    # ---- Algorithm 1: the fine-tuning loop ----------------------------------------------------------------------
    unet.train()
    log = open(run_dir / "log.jsonl", "a")
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, desc="APLA tuning",
               disable=not cfg.progress)
    for step in bar:
        t0 = time.perf_counter()
        # a posterior sample of the cached clip latents, a timestep t ~ U{0..T-1} and the noise eps ~ N(0, I)
        z0 = z0_mean + z0_std * torch.randn(z0_mean.shape, generator=gen, device=device)
        t = torch.randint(0, alpha_bar.shape[0], (z0.shape[0],), generator=gen, device=device)
        eps = torch.randn(z0.shape, generator=gen, device=device)
        # Eq. (1): z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps
        z_t = q_sample(z0, t, eps, alpha_bar)
        with autocast_for(cfg.mixed_precision, device):
            eps_pred = unet(z_t, t, context)                               # (1, 4, F, h, w)
            phi = vgt(z_t, t) if vgt is not None else None                 # (1, 4, F, h, w)
            # Eq. (4), Eqs. (16)-(18) and (20): the generator's (U-Net + VGT) objective
            total, terms = generator_loss(eps, eps_pred.float(), None if phi is None else phi.float(), disc,
                                          cfg.apla, perceptual)
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad or not torch.isfinite(total):
            log.close()
            fail(f"step {step + 1}: loss term {bad[0] if bad else 'total'} is not finite "
                 f"({terms.get(bad[0]) if bad else total.item()}); stopping, the last good checkpoint is kept",
                 code=1)
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if cfg.max_grad_norm > 0:
            scaler.unscale_(opt_g)
            torch.nn.utils.clip_grad_norm_(gen_params, cfg.max_grad_norm)
        scaler.step(opt_g)
        if disc is not None:
            # Eq. (19): D learns to tell the true noise (real) from the perturbed prediction (fake), detached
            d_loss, d_terms = discriminator_loss(eps, eps_pred.float(), None if phi is None else phi.float(), disc,
                                                 cfg.apla)
            if not torch.isfinite(d_loss):
                log.close()
                fail(f"step {step + 1}: loss term discriminator is not finite ({d_loss.item()}); stopping, "
                     f"the last good checkpoint is kept", code=1)
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(d_loss).backward()
            scaler.step(opt_d)
            terms.update(d_terms)
        scaler.update()

        record = {"step": step + 1, "t": int(t[0]), **terms, "step_time": time.perf_counter() - t0}
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{terms['total']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps:
            save(step + 1)
    log.close()
    print(f"apla: done, {cfg.max_steps} steps; checkpoint {ckpt.latest_checkpoint(run_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
