"""Measure the micro Stable Diffusion on held-out scenes of the shapes world.

Not part of APLA (AAAI 2024); it checks the pretrained model that APLA's recipe starts from. Two figures:

- the VAE: reconstruction PSNR (images in [0, 1]) of x -> E -> posterior mean -> D on held-out scenes;
- text-to-image: for held-out captions ("a blue square at the top left"), DDIM sampling (Eq. 3, 50 steps) from
  seeded noise with classifier-free guidance, decoded and read back by the shapes evaluator
  (`apla.micro.shapes_eval.score_images`): the fractions of images whose colour, shape and position word match the caption.

Held-out sets come from seeds no pretraining batch uses (apla.micro.pretrain's seed namespaces). `--split val`
evaluates on validation prompts instead, for choosing the guidance scale without touching the held-out set.
Writes `samples.png` (a grid of samples) and its part of `README.md` (figures, settings, the command, the grid's
captions) to --out-dir: the text between the markers GENERATED and HAND_WRITTEN; the README's hand-written head
(what the project is for, how to run it) and tail (notes, other commands' tables) are kept as they are.

    python -m apla.micro.evaluate                      # the shipped model, writes apla/micro/README.md
    python -m apla.micro.evaluate --split val --guidance 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apla.checkpoint import atomic_write, atomic_write_bytes
from apla.micro import GUIDANCE_SCALE, MICRO_DIR, NUM_INFERENCE_STEPS, shapes
from apla.micro.shapes_eval import score_images
from apla.scheduler import classifier_free_guidance, ddim_sample, ddim_timesteps
from apla.sd.text import encode_prompt
from apla.sd.unet import is_temporal_param
from apla.sd.weights import count_parameters, load_stable_diffusion

# Seeds of the evaluation sets (pretraining uses 1_000_000 and up, see apla.micro.pretrain).
HELD_OUT_VAE_SEED = 7_000
HELD_OUT_PROMPT_SEED = 7_001
VAL_VAE_SEED = 8_000
VAL_PROMPT_SEED = 8_001
TARGETS = {"psnr": 28.0, "colour": 0.90, "shape": 0.75, "position": 0.85}
CHOICES = {"colour": len(shapes.PALETTE), "shape": len(shapes.SHAPES), "position": len(shapes.POSITIONS)}


@torch.no_grad()
def reconstruction_psnr(vae, x: torch.Tensor, batch: int = 64) -> tuple[float, torch.Tensor]:
    """Mean per-image PSNR (dB, images in [0, 1]) of D(mean of E(x)); returns it and the reconstructions."""
    recs = []
    for chunk in x.split(batch):
        mean, _ = vae.encode(chunk)
        recs.append(vae.decode(mean).clamp(-1, 1))
    rec = torch.cat(recs)
    # MSE in [0, 1] units: ((x - x_rec) / 2)^2
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    # $$\mathrm{PSNR} = 10 \log_{10}(1 / \mathrm{MSE})$$
    return (10 * torch.log10(1.0 / mse)).mean().item(), rec


@torch.no_grad()
def text_to_image(sd, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 64) -> torch.Tensor:
    """DDIM samples (N, 3, 64, 64) in [-1, 1] for the prompts, one per prompt, noise from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    h = shapes.IMAGE_SIZE // 2 ** (len(sd.vae.config.block_out_channels) - 1)  # latent side: 16 for 64 px
    z_T = torch.randn(len(prompts), sd.unet.config.in_channels, 1, h, h, generator=gen)  # (N, 4, F=1, h, w)
    timesteps = ddim_timesteps(steps)
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        B = len(chunk)
        context = encode_prompt(sd, [""] * B + chunk)  # (2B, 77, D): unconditional, then conditional

        def eps_fn(z_t, t):
            eps_uncond, eps_cond = sd.unet(torch.cat([z_t, z_t]), t, context).chunk(2)  # (2B, ...) -> 2 x (B, ...)
            return classifier_free_guidance(eps_uncond, eps_cond, guidance)

        z0 = ddim_sample(eps_fn, z_T[i:i + B], timesteps, sd.alpha_bar, progress=False)
        z = z0[:, :, 0] / sd.vae.scaling_factor  # (B, 4, 1, h, w) -> (B, 4, h, w), unscaled
        images.append(sd.vae.decode(z).clamp(-1, 1))
    return torch.cat(images)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, scale: int = 2) -> None:
    """Images (N, 3, H, W) in [-1, 1] -> one PNG grid, row-major, 2 px gaps, written atomically."""
    N, _, H, W = images.shape
    rows = math.ceil(N / columns)
    grid = np.full((rows * (H + 2), columns * (W + 2), 3), 255, np.uint8)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (N, 3, H, W) -> (N, H, W, 3)
    for k in range(N):
        r, c = divmod(k, columns)
        grid[r * (H + 2):r * (H + 2) + H, c * (W + 2):c * (W + 2) + W] = pixels[k]
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


GENERATED = "<!-- Written by `python -m apla.micro.evaluate` below this line, up to the hand-written part. -->"
HAND_WRITTEN = "<!-- Written by hand below this line; `python -m apla.micro.evaluate` keeps it. -->"


def write_results(path: Path, r: dict) -> None:
    """Write the figures of `r` into the README at `path`, after GENERATED, keeping what is above that marker and
    from HAND_WRITTEN on (an absent marker: nothing kept on its side)."""
    def mark(ok):
        return "yes" if ok else "**no**"

    lines = [
        "## The shipped model on held-out scenes",
        "",
        f"Model: `{r['source']}` ({r['params']['vae']:,} VAE, {r['params']['unet']:,} U-Net, "
        f"{r['params']['text_encoder']:,} text-encoder parameters; {r['weights_mib']:.1f} MiB of files).",
        f"Made by: `{r['command']}` ({r['wall_s']:.0f} s on {r['threads']} CPU threads).",
        "",
        "| measure | held-out set | value | target | met |",
        "| --- | --- | --- | --- | --- |",
        f"| VAE reconstruction PSNR (posterior mean, images in [0, 1]) | {r['vae_scenes']} scenes "
        f"(`sample_dataset(seed={r['vae_seed']})`) | {r['psnr']:.2f} dB | >= {TARGETS['psnr']:.0f} dB "
        f"| {mark(r['psnr'] >= TARGETS['psnr'])} |",
    ]
    for key in ("colour", "shape", "position"):
        lines.append(f"| text-to-image {key} accuracy (chance {100 / CHOICES[key]:.0f}%) | {r['prompts']} captions "
                     f"(`sample_dataset(seed={r['prompt_seed']})`) | {100 * r[key]:.1f}% | >= {100 * TARGETS[key]:.0f}% "
                     f"| {mark(r[key] >= TARGETS[key])} |")
    lines += [
        "",
        f"Sampling: {r['steps']} DDIM steps (SD v1.5 schedule, `apla.scheduler.ddim_sample`), classifier-free "
        f"guidance {r['guidance']}, z_T ~ N(0, I) of shape (1, 4, 1, 16, 16) per prompt from seed {r['seed']}; "
        "accuracies by `apla.micro.shapes_eval.score_images` against the captions. The guidance scale was chosen on "
        "validation captions (other seeds), never on this set.",
        "",
        f"`samples.png`: the first {r['grid']} samples, row-major, for these captions:",
        "",
    ]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(r["grid_prompts"])]
    rec = r.get("pretrain")
    if rec:
        c = rec["pretrain_config"]
        lines += [
            "",
            "## Pretraining",
            "",
            f"`python -m apla.micro.pretrain` (seed {c['seed']}), float32 on CPU, then exported to float16:",
            "",
            f"- VAE: {rec['vae_steps']} steps of {c['vae_batch']} fresh scenes, AdamW lr {c['vae_lr']}, "
            f"loss L1 + MSE + {c['vae_kl_weight']} KL, {rec['vae_train_s'] / 60:.0f} min; latent scale "
            f"1 / std(z) = {rec['scaling_factor']:.4f} (`scaling_factor` in vae/config.json).",
            f"- Text encoder: {rec['text_steps']} steps of {c['text_batch']} caption-latent pairs from a pool of "
            f"{c['pool_size']} encoded scenes ({100 * c['clip_fraction']:.0f}% of them single frames of moving-object "
            f"clips with clip captions), CLIP's contrastive loss against a small convolutional tower on the latents "
            f"(pairs with the same caption count as matches), AdamW lr {c['text_lr']}, "
            f"{rec['text_train_s'] / 60:.0f} min; then frozen.",
            f"- U-Net: {rec['unet_steps']} steps of {c['unet_batch']} from the same pool, epsilon-prediction MSE "
            f"weighted per sample by 1 + min(1 / SNR_t, {c['x0_weight_cap']:g}), SD v1.5 schedule, "
            f"{100 * c['uncond_prob']:.0f}% empty captions, AdamW lr {c['unet_lr']}, EMA {c['ema_decay']}, "
            f"{rec['unet_train_s'] / 60:.0f} min.",
            f"- In all {(rec['vae_train_s'] + rec['text_train_s'] + rec['unet_train_s']) / 60:.0f} min of training "
            "steps (measuring the latent scale and encoding the pool are not counted).",
        ]
    # The head (what the project is for) and the sections under HAND_WRITTEN (the one-shot table, notes): kept.
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    head = old[:old.index(GENERATED)] if GENERATED in old else ""
    tail = old[old.index(HAND_WRITTEN):] if HAND_WRITTEN in old else ""
    text = head + GENERATED + "\n\n" + "\n".join(lines) + "\n" + ("\n" + tail if tail else "")
    atomic_write_bytes(path, text.encode("utf-8"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="micro", help="what apla.load_stable_diffusion loads")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--vae-scenes", type=int, default=256)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--steps", type=int, default=NUM_INFERENCE_STEPS)
    p.add_argument("--guidance", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--grid", type=int, default=32, help="how many samples go into samples.png")
    p.add_argument("--out-dir", default=str(Path(__file__).parent))
    p.add_argument("--no-write", action="store_true", help="print the figures only")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    sd = load_stable_diffusion(args.model)
    vae_seed, prompt_seed = (HELD_OUT_VAE_SEED, HELD_OUT_PROMPT_SEED) if args.split == "test" else (VAL_VAE_SEED, VAL_PROMPT_SEED)
    x, _, _ = shapes.sample_dataset(args.vae_scenes, seed=vae_seed)
    psnr, _ = reconstruction_psnr(sd.vae, x)
    _, prompts, _ = shapes.sample_dataset(args.prompts, seed=prompt_seed)
    images = text_to_image(sd, prompts, args.steps, args.guidance, args.seed)
    scores = score_images(images, prompts)

    folder = MICRO_DIR if args.model == "micro" else Path(args.model)
    r = dict(psnr=psnr, colour=scores["colour"], shape=scores["shape"], position=scores["position"],
             source=args.model, vae_scenes=args.vae_scenes, prompts=args.prompts, vae_seed=vae_seed,
             prompt_seed=prompt_seed, steps=args.steps, guidance=args.guidance, seed=args.seed, threads=args.threads,
             params={"vae": count_parameters(sd.vae), "unet": count_parameters(sd.unet, is_temporal_param),
                     "text_encoder": count_parameters(sd.text_encoder)},
             weights_mib=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20 if folder.is_dir() else 0.0,
             pretrain=json.loads((folder / "pretrain_record.json").read_text()) if (folder / "pretrain_record.json").is_file() else None,
             grid=min(args.grid, len(prompts)), grid_prompts=prompts[:args.grid], wall_s=time.time() - t0,
             command=" ".join(["python -m apla.micro.evaluate"] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]))
    print(json.dumps({"split": args.split, **{k: r[k] for k in ("psnr", "colour", "shape", "position", "guidance",
                                                                   "steps", "wall_s")}}), flush=True)
    if not args.no_write:
        out = Path(args.out_dir)
        save_grid(images[:args.grid], out / "samples.png")
        write_results(out / "README.md", r)
    return r


if __name__ == "__main__":
    main()
