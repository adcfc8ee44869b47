"""Generate videos from a run of train.py: DDIM-invert the source clip, then guided DDIM sampling with new prompts.

    python sample.py                                  # the default run, its prompt and its preset's edits
    python sample.py --run runs/apla --prompt "a blue square moving to the right" --steps 50 --guidance 12.5

Reads top to bottom: the run's config and latest checkpoint -> the base model with the tuned weights ->
z_T by DDIM inversion of the cached clip latents (empty prompt, as Tune-A-Video) or seeded noise ->
for each prompt, DDIM sampling (Eq. 3) with classifier-free guidance on the perturbed prediction
eps* = eps_theta + phi (Eq. 4) -> VAE decode in chunks -> GIF (+ MP4 with PyAV) and a PNG strip per prompt.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import apla
from apla import checkpoint as ckpt
from apla.cli import autocast_for, fail, pick_device, sample_parser
from apla.config import TrainConfig, slug, vgt_config_for
from apla.scheduler import classifier_free_guidance, ddim_invert, ddim_sample, ddim_timesteps
from apla.unet import load_trainable_state, mark_trainable
from apla.video import PyAVMissing, write_gif, write_mp4, write_png_strip
from apla.vgt import VGT, perturbed_eps


@torch.no_grad()
def decode(sd, z0: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Decode latents (1, 4, F, h, w) to frames (F, 3, H, W) in [-1, 1], a few frames at a time."""
    z = z0[0].permute(1, 0, 2, 3) / sd.vae.scaling_factor                # (1, 4, F, h, w) -> (F, 4, h, w)
    return torch.cat([sd.vae.decode(z[i:i + chunk]).float().clamp(-1, 1).cpu() for i in range(0, z.shape[0], chunk)])


def main(argv=None) -> int:
    args = sample_parser().parse_args(argv)
    run_dir = Path(args.run)
    if not (run_dir / "config.json").is_file():
        fail(f"--run {run_dir}: not a run directory of train.py (no config.json)")
    latest = Path(args.checkpoint) if args.checkpoint else ckpt.latest_checkpoint(run_dir)
    if latest is None or not (latest / "weights.safetensors").is_file():
        fail(f"--run {run_dir}: no checkpoint found (train first, or pass --checkpoint)")
    try:
        cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (ValueError, TypeError) as e:
        fail(f"--run {run_dir}: unreadable config.json: {e}")
    steps = args.steps if args.steps is not None else cfg.sample_steps
    guidance = args.guidance if args.guidance is not None else cfg.guidance
    device = pick_device(args.device)
    pretrained = args.pretrained or cfg.pretrained

    # ---- base model + the run's tuned weights ------------------------------------------------------------------
    try:
        sd = apla.load_stable_diffusion(pretrained, device=device)
    except (ValueError, OSError) as e:
        fail(f"cannot load base model {pretrained!r}: {e}")
    unet = sd.unet
    mark_trainable(unet, cfg.trainable)
    source = load_file(str(run_dir / "source.safetensors"))
    z0 = source["z0_mean"].to(device)                                       # (1, 4, F, h, w)
    vgt = VGT(vgt_config_for(cfg, z0.shape)).to(device) if cfg.apla.use_vgt else None
    expect = {"base_model": ckpt.model_signature(unet), "vgt": cfg.apla.vgt if cfg.apla.use_vgt else "none"}
    try:
        weights, _, meta = ckpt.load_checkpoint(latest, expect=expect)
        load_trainable_state(unet, {k[5:]: v for k, v in weights.items() if k.startswith("unet.")})
        if vgt is not None:
            vgt.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("vgt.")})
    except (ckpt.CheckpointError, RuntimeError, KeyError) as e:
        fail(str(e).splitlines()[0])
    unet.eval()
    use_vgt = vgt is not None and not args.no_vgt
    alpha_bar = sd.alpha_bar.to(device)
    timesteps = ddim_timesteps(steps, alpha_bar.shape[0])
    amp = autocast_for(args.mixed_precision, device)

    def eps_star(z, t, context):
        """Eq. (4): the tuned U-Net's prediction plus the VGT perturbation (unless --no-vgt)."""
        t = t.reshape(-1).expand(z.shape[0])                               # () or (1,) -> (B,)
        with amp:
            eps_pred = unet(z, t, context).float()
            return perturbed_eps(eps_pred, vgt(z, t).float()) if use_vgt else eps_pred

    prompts = args.prompt or [cfg.prompt, *cfg.edit_prompts]
    with torch.no_grad():
        uncond = apla.encode_prompt(sd, [""]).to(device)                   # (1, 77, D)
        if args.no_inversion:
            g = torch.Generator(device="cpu").manual_seed(args.seed)
            z_T = torch.randn(z0.shape, generator=g).to(device)
        else:
            # z_T from DDIM inversion of the clip with the empty prompt (Tune-A-Video's recipe)
            z_T = ddim_invert(lambda z, t: eps_star(z, t, uncond), z0, timesteps, alpha_bar,
                              progress=not args.no_progress)

    out_dir = Path(args.out) if args.out else run_dir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    written, mp4_skipped = [], False
    for prompt in prompts:
        with torch.no_grad():
            cond = apla.encode_prompt(sd, [prompt]).to(device)             # (1, 77, D)

            def guided(z, t):
                # classifier-free guidance on eps*: eps*(z, "") + s (eps*(z, c) - eps*(z, ""))
                both = eps_star(torch.cat([z, z]), t, torch.cat([uncond, cond]))       # (2, 4, F, h, w)
                return classifier_free_guidance(both[:1], both[1:], guidance)

            z0_new = ddim_sample(guided, z_T, timesteps, alpha_bar, progress=not args.no_progress)
            frames = decode(sd, z0_new)                                    # (F, 3, H, W)
        stem = out_dir / slug(prompt)
        write_gif(frames, stem.with_suffix(".gif"), fps=args.fps)
        write_png_strip(frames, stem.with_suffix(".png"))
        written += [stem.with_suffix(".gif"), stem.with_suffix(".png")]
        try:
            write_mp4(frames, stem.with_suffix(".mp4"), fps=args.fps)
            written.append(stem.with_suffix(".mp4"))
        except PyAVMissing as e:  # the GIF and the PNG need only Pillow; no MP4, said once
            if not mp4_skipped:
                print(f"note: MP4s skipped, GIFs and PNGs written: {e}", file=sys.stderr)
            mp4_skipped = True
        print(f"{prompt!r}: {', '.join(str(p) for p in written[-3:] if p.stem == stem.name)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
