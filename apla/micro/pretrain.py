"""Pretrain the micro Stable Diffusion on the shapes world, from a seed, on a CPU.

Not part of APLA (AAAI 2024): APLA starts from a pretrained Stable Diffusion (Sec. Experiments, "utilize the
pre-trained weights of the Stable Diffusion"); this script makes the small one the project ships. It follows
SD's recipe (Rombach et al. 2022) in three stages, then an export:

1. `vae`: the KL autoencoder on rendered scenes, loss |x - D(z)| + (x - D(z))^2 + w_KL * KL(q(z|x) || N(0, I)),
   z ~ q(z|x); w_KL is small (sharp reconstructions, as SD's 1e-6). Then the latent scale: SD multiplies
   latents by a constant so the diffusion model sees unit variance; here it is measured, 1 / std(z).
2. `text`: the text encoder, CLIP-style (SD uses a CLIP text tower pretrained contrastively on image-text
   pairs and keeps it frozen; there is none to take here): a symmetric contrastive loss between caption
   features (the mean of the final token states from the end token on, which is most of what SD's U-Net
   reads) and the features of a small convolutional image tower on the scaled latents. Captions repeat, so
   every pair with the same caption counts as a match. The towers' heads are discarded.
3. `unet`: the U-Net, text encoder frozen (as SD), with SD's epsilon-prediction objective on scaled latents,
   z_t = q_sample(z0, t, eps) (Eq. 1), t ~ U{0, ..., 999}, SD v1.5's schedule; the caption is replaced by ""
   10% of the time so that classifier-free guidance works. Single images, F = 1. Each sample's squared error
   is weighted by 1 + min(1 / SNR_t, x0_weight_cap) (`timestep_weight`): the plain epsilon loss equals
   SNR_t times the error of the implied x0, so it gives almost no weight to the noisy steps where the
   layout (place, shape) is decided. An EMA of the weights is what gets exported.

Every batch is drawn from a seed that depends on the step, and checkpoints (model, EMA, optimiser) are written
every `checkpoint_every` steps to --work-dir, so a stage can be stopped (--max-minutes) and resumed and still
reproduce the same weights. `export` writes the float16 diffusers folder (`export_trained`).

    python -m apla.micro.pretrain --stage vae --work-dir ~/.cache/apla-micro
    python -m apla.micro.pretrain --stage text --work-dir ~/.cache/apla-micro
    python -m apla.micro.pretrain --stage unet --work-dir ~/.cache/apla-micro
    python -m apla.micro.pretrain --stage export --work-dir ~/.cache/apla-micro --out apla/assets/micro
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from apla.checkpoint import atomic_torch_save, atomic_write_json
from apla.micro import MICRO_DIR, TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG, shapes
from apla.micro.contrastive import LatentImageTower, caption_features, contrastive_loss
from apla.micro.export import export
from apla.scheduler import make_alpha_bar, q_sample
from apla.sd.text import build_text_encoder, load_tokenizer, tokenize
from apla.sd.unet import UNet3DConditionModel, UNetConfig, is_temporal_param
from apla.sd.vae import AutoencoderKL, VAEConfig, sample_posterior

# Seed namespaces of the shapes world's scenes: training batches never share a seed with evaluation sets.
VAE_SEED = 1_000_000  # + step
LATENT_SEED = 2_000_000  # + chunk index (the U-Net's pool of encoded scenes)
SCALE_SEED = 3_000_000  # the scenes the latent scale is measured on


@dataclass
class PretrainConfig:
    seed: int = 0
    # stage 1: VAE
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5  # on per-element means (SD: 1e-6 on sums)
    # latent scale and the U-Net's data
    scale_samples: int = 2048
    pool_size: int = 24576  # encoded scenes the U-Net stage draws from
    clip_fraction: float = 0.2  # share of the pool that is a frame of a clip, captioned "... moving to the ..."
    # stage 2: the text encoder (contrastive, against a small image tower on latents)
    text_steps: int = 1500
    text_batch: int = 256
    text_lr: float = 1e-3
    # stage 3: U-Net (text encoder frozen)
    unet_steps: int = 6400
    unet_batch: int = 32
    unet_lr: float = 1e-3
    uncond_prob: float = 0.1  # SD: 10% empty captions for classifier-free guidance
    x0_weight_cap: float = 20.0  # per-sample loss weight 1 + min(1 / SNR_t, cap); 0 = SD's plain epsilon loss
    ema_decay: float = 0.999
    warmup: int = 200
    checkpoint_every: int = 100
    log_every: int = 25


# ---- Models ---------------------------------------------------------------------------------------------------

def build_vae() -> AutoencoderKL:
    return AutoencoderKL(VAEConfig.from_diffusers(VAE_CONFIG))


def build_unet() -> UNet3DConditionModel:
    """The SD U-Net of UNET_CONFIG; its temporal layers (Tune-A-Video's) are frozen and never saved here."""
    unet = UNet3DConditionModel(UNetConfig.from_diffusers(UNET_CONFIG))
    for name, p in unet.named_parameters():
        p.requires_grad_(not is_temporal_param(name))
    return unet


def sd_state(unet: torch.nn.Module) -> dict:
    """The U-Net's SD parameters (diffusers names), without the temporal ones."""
    return {k: v for k, v in unet.state_dict().items() if not is_temporal_param(k)}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---- Checkpoints (written atomically by apla.checkpoint) ------------------------------------------------------

def load_ckpt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def log(work: Path, stage: str, record: dict) -> None:
    line = json.dumps({"stage": stage, **record})
    print(line, flush=True)
    with open(work / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")


# ---- Stage 1: the VAE -----------------------------------------------------------------------------------------

def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per element, averaged."""
    # $$\tfrac12(\mu^2 + \sigma^2 - 1 - \log\sigma^2)$$
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def train_vae(cfg: PretrainConfig, work: Path, deadline: float) -> bool:
    """Run (or resume) stage 1; True when it has reached cfg.vae_steps."""
    path = work / "vae.pt"
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step, train_s, ck = 0, 0.0, load_ckpt(path)
    if ck is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, train_s = int(ck["step"]), float(ck.get("train_s", 0.0))
    if step >= cfg.vae_steps:
        return True
    vae.train()
    t0, seen = time.time(), 0
    while step < cfg.vae_steps:
        x, _, _ = shapes.sample_dataset(cfg.vae_batch, seed=VAE_SEED + cfg.seed * 100_000 + step)  # (B, 3, 64, 64)
        gen = torch.Generator().manual_seed(cfg.seed * 100_000 + step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        mean, logvar = vae.encode(x)
        z = sample_posterior(mean, logvar, generator=gen)
        x_rec = vae.decode(z)
        l1, mse = (x_rec - x).abs().mean(), (x_rec - x).pow(2).mean()
        kl = kl_divergence(mean, logvar)
        loss = l1 + mse + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, seen = step + 1, seen + 1
        if step % cfg.log_every == 0:
            # PSNR of images in [0, 1]: MSE in [-1, 1] units / 4
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
            log(work, "vae", dict(step=step, loss=round(loss.item(), 5), l1=round(l1.item(), 5), psnr=round(psnr, 2),
                                  kl=round(kl.item(), 3), s_per_step=round((time.time() - t0) / seen, 3)))
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps or time.time() > deadline:
            atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                         "train_s": train_s + time.time() - t0}, path)
            if time.time() > deadline:
                break
    return step >= cfg.vae_steps


def load_trained_vae(work: Path) -> AutoencoderKL:
    ck = load_ckpt(work / "vae.pt")
    if ck is None:
        raise FileNotFoundError(f"{work / 'vae.pt'}: run --stage vae first")
    vae = build_vae()
    vae.load_state_dict(ck["model"])
    return vae.eval()


@torch.no_grad()
def measure_scaling_factor(cfg: PretrainConfig, vae: AutoencoderKL) -> float:
    """1 / std of posterior samples z ~ q(z|x) over held-aside training scenes: scaled latents have std ~ 1."""
    x, _, _ = shapes.sample_dataset(cfg.scale_samples, seed=SCALE_SEED + cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    zs = [sample_posterior(*vae.encode(chunk), generator=gen) for chunk in x.split(256)]
    return 1.0 / torch.cat(zs).std().item()


# ---- Stage 2: the text encoder; the pool of encoded scenes the later stages share -----------------------------

def clip_frames(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n single frames of random moving-object clips, captioned as the clip ('a red circle moving to the right'),
    so that the text encoder knows the words of APLA prompts; the object is anywhere along its path."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        shape, colour = rng.choice(shapes.SHAPES), rng.choice(sorted(shapes.PALETTE))
        path = rng.choice(sorted(shapes.PATHS))
        size = rng.uniform(*shapes.SIZE_RANGE)
        try:
            scenes = shapes.clip_scenes(shape, colour, path, size=size, seed=rng.randrange(1 << 30))
        except shapes.ShapesError:  # the largest sizes may not fit along a diagonal
            scenes = shapes.clip_scenes(shape, colour, path, seed=rng.randrange(1 << 30))
        images.append(shapes.render_tensor(rng.choice(scenes)))
        captions.append(shapes.clip_caption(shape, colour, path))
    return torch.stack(images), captions


@torch.no_grad()
def build_pool(cfg: PretrainConfig, vae: AutoencoderKL, tokenizer, work: Path) -> dict:
    """Encode cfg.pool_size scenes once: posterior mean and std (float16), token ids, captions."""
    path = work / "pool.pt"
    pool = load_ckpt(path)
    if pool is not None:
        return pool
    chunk, means, stds, captions = min(256, cfg.pool_size), [], [], []
    n_clip = round(cfg.clip_fraction * chunk)
    for i in range(math.ceil(cfg.pool_size / chunk)):
        seed = LATENT_SEED + cfg.seed * 100_000 + i
        x, caps, _ = shapes.sample_dataset(chunk - n_clip, seed=seed)
        xc, caps_c = clip_frames(n_clip, seed)
        mean, logvar = vae.encode(torch.cat([x, xc]))  # (256, 4, 16, 16) each
        means.append(mean.half())
        stds.append(torch.exp(0.5 * logvar).half())
        captions += caps + caps_c
    n = cfg.pool_size
    pool = {"mean": torch.cat(means)[:n], "std": torch.cat(stds)[:n],
            "ids": tokenize(tokenizer, captions[:n]).int(), "empty_ids": tokenize(tokenizer, [""]).int()}
    atomic_torch_save(pool, path)
    return pool


def latent_pool(cfg: PretrainConfig, work: Path) -> tuple[dict, float]:
    """The pool of encoded scenes and the latent scale (made once from the trained VAE, then read back)."""
    stats_path = work / "latent_stats.json"
    if not stats_path.is_file() or not (work / "pool.pt").is_file():
        vae = load_trained_vae(work)
        if not stats_path.is_file():
            atomic_write_json(stats_path, {"scaling_factor": measure_scaling_factor(cfg, vae)})
        build_pool(cfg, vae, load_tokenizer(), work)
    return load_ckpt(work / "pool.pt"), json.loads(stats_path.read_text())["scaling_factor"]


def train_text(cfg: PretrainConfig, work: Path, deadline: float) -> bool:
    """Run (or resume) stage 2; True when it has reached cfg.text_steps."""
    path = work / "text.pt"
    pool, scaling_factor = latent_pool(cfg, work)
    n = pool["mean"].shape[0]
    labels = torch.unique(pool["ids"], dim=0, return_inverse=True)[1]  # (n,) caption label of each scene
    torch.manual_seed(cfg.seed + 2)
    text_encoder = build_text_encoder(TEXT_ENCODER_CONFIG).train()
    dim = TEXT_ENCODER_CONFIG["hidden_size"]
    heads = nn.ModuleDict({"image": LatentImageTower(dim), "text": nn.Linear(dim, dim, bias=False)})
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
    params = list(text_encoder.parameters()) + list(heads.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=0.01)
    step, train_s, ck = 0, 0.0, load_ckpt(path)
    if ck is not None:
        text_encoder.load_state_dict(ck["text_encoder"])
        heads.load_state_dict(ck["heads"])
        logit_scale.data.fill_(ck["logit_scale"])
        opt.load_state_dict(ck["opt"])
        step, train_s = int(ck["step"]), float(ck.get("train_s", 0.0))
    if step >= cfg.text_steps:
        return True
    eos_id = TEXT_ENCODER_CONFIG["eos_token_id"]
    t0, seen = time.time(), 0
    while step < cfg.text_steps:
        gen = torch.Generator().manual_seed(cfg.seed * 100_000 + 50_000 + step)
        idx = torch.randint(n, (cfg.text_batch,), generator=gen)
        noise_z = torch.randn(cfg.text_batch, 4, 16, 16, generator=gen)
        z0 = scaling_factor * (pool["mean"][idx].float() + pool["std"][idx].float() * noise_z)  # (B, 4, 16, 16)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.text_steps, cfg.text_lr, cfg.warmup)
        text = heads["text"](caption_features(text_encoder, pool["ids"][idx].long(), eos_id))
        loss, accuracy = contrastive_loss(text, heads["image"](z0), labels[idx], logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(max=math.log(100.0))  # CLIP's cap on the inverse temperature
        step, seen = step + 1, seen + 1
        if step % cfg.log_every == 0:
            log(work, "text", dict(step=step, loss=round(loss.item(), 4), accuracy=round(accuracy.item(), 3),
                                   s_per_step=round((time.time() - t0) / seen, 3)))
        if step % cfg.checkpoint_every == 0 or step == cfg.text_steps or time.time() > deadline:
            atomic_torch_save({"text_encoder": text_encoder.state_dict(), "heads": heads.state_dict(),
                         "logit_scale": logit_scale.item(), "opt": opt.state_dict(), "step": step,
                         "train_s": train_s + time.time() - t0}, path)
            if time.time() > deadline:
                break
    return step >= cfg.text_steps


def load_trained_text_encoder(work: Path):
    ck = load_ckpt(work / "text.pt")
    if ck is None:
        raise FileNotFoundError(f"{work / 'text.pt'}: run --stage text first")
    text_encoder = build_text_encoder(TEXT_ENCODER_CONFIG)
    text_encoder.load_state_dict(ck["text_encoder"])
    return text_encoder.eval().requires_grad_(False)


def timestep_weight(alpha_bar_t: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-sample loss weight 1 + min(1 / SNR_t, cap), SNR_t = abar_t / (1 - abar_t); all ones when cap = 0.

    ||eps - eps_hat||^2 = SNR_t ||x0 - x0_hat||^2, so the plain epsilon loss all but ignores the noisy steps
    (SNR_t = 0.005 at t = 999) where the object's place and shape are settled; adding the x0 error, capped,
    gives them weight while the epsilon term keeps the low-noise steps."""
    if cap <= 0:
        return torch.ones_like(alpha_bar_t)
    snr = alpha_bar_t / (1 - alpha_bar_t)
    # $$w_t = 1 + \min(1/\mathrm{SNR}_t, \text{cap})$$
    return 1 + (1 / snr).clamp(max=cap)


# ---- Stage 3: the U-Net ---------------------------------------------------------------------------------------

def train_unet(cfg: PretrainConfig, work: Path, deadline: float) -> bool:
    """Run (or resume) stage 3; True when it has reached cfg.unet_steps."""
    path = work / "unet.pt"
    pool, scaling_factor = latent_pool(cfg, work)
    n = pool["mean"].shape[0]
    # the frozen text encoder's context for every distinct caption, once: (U, 77, D)
    unique_ids, caption_of = torch.unique(torch.cat([pool["ids"], pool["empty_ids"]]), dim=0, return_inverse=True)
    with torch.no_grad():
        contexts = load_trained_text_encoder(work)(input_ids=unique_ids.long()).last_hidden_state
    empty = caption_of[-1]

    torch.manual_seed(cfg.seed + 1)
    unet = build_unet()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = {"unet": {k: v.clone() for k, v in sd_state(unet).items()}}
    step, train_s, ck = 0, 0.0, load_ckpt(path)
    if ck is not None:
        unet.load_state_dict(ck["unet"], strict=False)  # the frozen temporal layers keep their seeded init
        opt.load_state_dict(ck["opt"])
        ema, step, train_s = ck["ema"], int(ck["step"]), float(ck.get("train_s", 0.0))
    if step >= cfg.unet_steps:
        return True
    alpha_bar = make_alpha_bar()
    live = {"unet": dict(unet.named_parameters())}
    t0, seen = time.time(), 0
    while step < cfg.unet_steps:
        gen = torch.Generator().manual_seed(cfg.seed * 100_000 + step)
        B = cfg.unet_batch
        idx = torch.randint(n, (B,), generator=gen)
        noise_z = torch.randn(B, 4, 16, 16, generator=gen)
        # z ~ q(z|x), then SD's latent scale: z0 = scaling_factor * z
        z0 = scaling_factor * (pool["mean"][idx].float() + pool["std"][idx].float() * noise_z)
        z0 = z0.unsqueeze(2)  # (B, 4, h, w) -> (B, 4, 1, h, w): single images, F = 1
        which = caption_of[idx].clone()
        drop = torch.rand(B, generator=gen) < cfg.uncond_prob  # classifier-free guidance: 10% empty captions
        which[drop] = empty
        t = torch.randint(0, len(alpha_bar), (B,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)

        # Eq. (1): $z_t = \sqrt{\bar\alpha_t} z_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$
        z_t = q_sample(z0, t, eps, alpha_bar)
        eps_pred = unet(z_t, t, contexts[which])  # context (B, 77, D)
        # $w_t \| \epsilon - \epsilon_\theta(z_t, t, c) \|^2$, averaged
        w = timestep_weight(alpha_bar[t].float(), cfg.x0_weight_cap)  # (B,)
        loss = (w * (eps_pred - eps).pow(2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for part, named in live.items():
                for k, p in named.items():
                    if k in ema[part]:
                        ema[part][k].lerp_(p.detach(), 1 - decay)
        step, seen = step + 1, seen + 1
        if step % cfg.log_every == 0:
            log(work, "unet", dict(step=step, loss=round(loss.item(), 5), grad_norm=round(grad_norm.item(), 3),
                                   lr=round(opt.param_groups[0]["lr"], 6), s_per_step=round((time.time() - t0) / seen, 3)))
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps or time.time() > deadline:
            atomic_torch_save({"unet": sd_state(unet), "ema": ema,
                         "opt": opt.state_dict(), "step": step, "train_s": train_s + time.time() - t0}, path)
            if time.time() > deadline:
                break
    return step >= cfg.unet_steps


# ---- Export ---------------------------------------------------------------------------------------------------

def stage_seconds(work: Path, stage: str) -> float:
    """Training seconds of a stage over all its runs (kept in its checkpoint; else estimated from the log)."""
    ck = load_ckpt(work / f"{stage}.pt")
    if "train_s" in ck:
        return float(ck["train_s"])
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    last = [r for r in records if r["stage"] == stage and "s_per_step" in r][-1]
    return last["s_per_step"] * int(ck["step"])


def export_trained(work: Path, out: Path) -> None:
    """The `export` stage: the trained networks from the stages' checkpoints in `work` (the U-Net's EMA weights)
    written as the diffusers folder `out` (`apla.micro.export`), with the record of their training."""
    vae, ck = load_trained_vae(work), load_ckpt(work / "unet.pt")
    if ck is None:
        raise FileNotFoundError(f"{work / 'unet.pt'}: run --stage unet first")
    scaling_factor = json.loads((work / "latent_stats.json").read_text())["scaling_factor"]
    record = {
        "vae_steps": int(load_ckpt(work / "vae.pt")["step"]), "vae_train_s": round(stage_seconds(work, "vae")),
        "text_steps": int(load_ckpt(work / "text.pt")["step"]), "text_train_s": round(stage_seconds(work, "text")),
        "unet_steps": int(ck["step"]), "unet_train_s": round(stage_seconds(work, "unet")),
        "scaling_factor": scaling_factor, "pretrain_config": json.loads((work / "pretrain_config.json").read_text())}
    export(out, vae, ck["ema"]["unet"], load_trained_text_encoder(work), scaling_factor, record)


# ---- Command line ---------------------------------------------------------------------------------------------

def check_config(cfg: PretrainConfig, work: Path) -> None:
    """A stage that has started must resume with the settings it started with (the later stage's may change)."""
    saved_path, now = work / "pretrain_config.json", asdict(cfg)
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    started = [n for n in ("vae", "text", "unet") if (work / f"{n}.pt").is_file()]
    for key, value in saved.items():
        stage = "vae" if key.startswith("vae_") or key == "seed" else "text" if key.startswith("text_") else "unet"
        if stage in started and now.get(key) != value:
            raise SystemExit(f"{work}: stage {stage!r} started with {key}={value!r}, now {now.get(key)!r}; "
                             "use the same value or a fresh --work-dir")
    atomic_write_json(saved_path, now)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "text", "unet", "export", "all"], default="all")
    p.add_argument("--work-dir", default="~/.cache/apla-micro", help="stage checkpoints and the log (outside git)")
    p.add_argument("--out", default=str(MICRO_DIR), help="where --stage export writes the diffusers folder")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long; rerun to resume")
    p.add_argument("--threads", type=int, default=2)
    for name, value in asdict(PretrainConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(PretrainConfig())})
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    check_config(cfg, work)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    random.seed(cfg.seed)

    t0 = time.time()
    for stage, train in (("vae", train_vae), ("text", train_text), ("unet", train_unet)):
        if args.stage in (stage, "all"):
            if not train(cfg, work, deadline):
                print(f"{stage} stage paused after {time.time() - t0:.0f}s; rerun to resume", flush=True)
                return
            log(work, stage, dict(done=True, wall_s=round(time.time() - t0)))
    if args.stage in ("export", "all"):
        export_trained(work, Path(args.out))


if __name__ == "__main__":
    main()
