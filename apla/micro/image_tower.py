"""The micro CLIP: an image tower on pixels, trained against the frozen micro text encoder, so that the CLIP scores
of APLA's Tables 2–3 can be measured on shapes-world videos with no download.

Not part of APLA (AAAI 2024). The paper scores "the CLIP score (Radford et al. 2021) across all generated frames
by employing average cosine measurements" with OpenAI's CLIP; the micro SD's text encoder was itself trained
CLIP-style (`apla.micro.pretrain`, stage `text`) against a tower on VAE latents, which was then discarded. This
module makes the image side the metrics need, in pixel space:

    frames (F, 3, H, W) in [-1, 1] --resize shorter side to 64, centre crop--> (F, 3, 64, 64)
        --PixelImageTower--> image features (F, D)
    prompts --CLIP tokenizer--> ids (P, 77) --micro text encoder (frozen)--> caption_features (P, D)
        --text_head (linear)--> text features (P, D)

Training (`python -m apla.micro.image_tower`): the text encoder stays exactly as shipped (frozen; its caption
features are computed once for every caption of the world); the tower, a linear text head and CLIP's temperature
learn with CLIP's symmetric contrastive loss (`apla.micro.contrastive.contrastive_loss`, pairs with the same caption
count as matches) on rendered shapes-world images: half single scenes captioned with colour, shape and position
("a red circle on the left"), half frames of moving-object clips captioned as the clip ("a red circle moving to the
right"). It is measured by retrieval on held-out scenes (seeds never used in training): for each image, is its own
caption the most similar among all captions of its kind?

    python -m apla.micro.image_tower                      # train (13 min on one core of a shared machine), write
                                                          # apla/assets/micro/clip_image/, print the retrieval table
    python -m apla.micro.image_tower --evaluate-only      # re-measure the shipped tower
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from apla.checkpoint import atomic_write_bytes, atomic_write_json
from apla.micro import MICRO_DIR, shapes
from apla.micro.contrastive import LatentImageTower, caption_features, contrastive_loss
from apla.micro.pretrain import clip_frames, lr_at
from apla.sd.text import tokenize
from apla.sd.weights import load_stable_diffusion

TOWER_DIR = MICRO_DIR / "clip_image"
TRAIN_SEED = 5_000_000  # + chunk index; other seed namespaces: pretrain.py's 1e6..3e6, evaluations 7000-8001
HELD_OUT_SEED = 6_000_000  # the retrieval measurement's scenes


@dataclass
class TowerConfig:
    """The image tower's sizes and its training run (saved as clip_image/config.json)."""

    image_size: int = shapes.IMAGE_SIZE  # the tower's input side (pixels)
    patch: int = 4  # the stem's patch size: (3, 64, 64) -> (width, 16, 16)
    width: int = 16  # channels after the stem
    dim: int = 64  # feature size = the micro text encoder's hidden size
    seed: int = 0
    pool_size: int = 16384  # rendered training images (half scenes, half clip frames)
    steps: int = 1500
    batch: int = 256
    lr: float = 2e-3
    warmup: int = 100
    noise: float = 0.05  # std of the Gaussian noise added to training images (generated frames are not clean)


class PixelImageTower(nn.Module):
    """Pixels (B, 3, 64, 64) in [-1, 1] -> features (B, D): a patch embedding (conv, kernel = stride = patch)
    down to the micro latents' 16x16 grid, then the same small convolutional tower the text stage used on
    latents (`LatentImageTower`, which flattens rather than pools, so position survives)."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        side = cfg.image_size // cfg.patch
        self.stem = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)  # (B, 3, 64, 64) -> (B, width, 16, 16)
        self.tower = LatentImageTower(cfg.dim, channels=cfg.width, side=side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(F.silu(self.stem(x)))


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(F, 3, H, W) -> (F, 3, size, size): scale the shorter side to `size` (bilinear, antialiased), crop the
    centre. The shapes world's 64x64 frames pass unchanged."""
    h, w = frames.shape[-2:]
    if (h, w) == (size, size):
        return frames
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(frames, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


class MicroCLIP(nn.Module):
    """The micro world's CLIP pair, with the interface `apla.eval.metrics` scores with: `image_features(frames)` ->
    (F, D) and `text_features(prompts)` -> (P, D) (not normalised; the metrics take cosines)."""

    def __init__(self, cfg: TowerConfig, text_encoder, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.image = PixelImageTower(cfg)
        self.text_head = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
        self.text_encoder = text_encoder.requires_grad_(False).eval()  # frozen: never trained here
        self.tokenizer = tokenizer
        self.eos_id = text_encoder.config.eos_token_id

    def trainable_state(self) -> dict:
        """What this module adds to the shipped micro SD: tower, text head, temperature."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}

    @torch.no_grad()
    def encode_captions(self, prompts: list[str]) -> torch.Tensor:
        """The frozen text encoder's caption features (P, D), before the text head."""
        ids = tokenize(self.tokenizer, prompts).to(self.text_head.weight.device)  # (P, 77)
        return caption_features(self.text_encoder, ids, self.eos_id)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.text_head(self.encode_captions(list(prompts)))

    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(frames.to(self.text_head.weight), self.cfg.image_size)
        return self.image(x)


def load_micro_clip(folder: str | Path = TOWER_DIR, device="cpu") -> MicroCLIP:
    """The shipped micro CLIP: the micro SD's text encoder and tokenizer plus clip_image/ (config.json,
    model.safetensors). float32, eval mode."""
    folder = Path(folder)
    cfg = TowerConfig(**json.loads((folder / "config.json").read_text())["tower"])
    sd = load_stable_diffusion("micro", components=("text_encoder",))
    model = MicroCLIP(cfg, sd.text_encoder, sd.tokenizer)
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    missing = set(model.trainable_state()) - set(state)
    unexpected = set(state) - set(model.trainable_state())
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def scene_captions() -> list[str]:
    """Every image caption of the world: 6 colours x 4 shapes x 9 positions = 216."""
    return [f"a {c} {s} {shapes.position_phrase(p)}" for c in shapes.PALETTE for s in shapes.SHAPES
            for p in shapes.POSITIONS]


def clip_captions() -> list[str]:
    """Every clip caption of the world: 6 colours x 4 shapes x 8 paths = 192."""
    return [shapes.clip_caption(s, c, p) for c in shapes.PALETTE for s in shapes.SHAPES for p in shapes.PATHS]


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n images (uint8, (n, 3, 64, 64)) and captions: half random scenes, half frames of random clips."""
    images, captions, chunk = [], [], 256
    for i in range(math.ceil(n / chunk)):
        x, caps, _ = shapes.sample_dataset(chunk // 2, seed=seed + i)
        xc, caps_c = clip_frames(chunk - chunk // 2, seed + i)
        images.append(((torch.cat([x, xc]) + 1) * 127.5).round().to(torch.uint8))
        captions += caps + caps_c
    return torch.cat(images)[:n], captions[:n]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------------
# Training and measurement
# ---------------------------------------------------------------------------------------------------------------

def train(cfg: TowerConfig, log_every: int = 100) -> tuple[MicroCLIP, float]:
    """Train the tower, the text head and the temperature against the frozen micro text encoder; returns the
    model and the training seconds."""
    torch.manual_seed(cfg.seed)
    sd = load_stable_diffusion("micro", components=("text_encoder",))
    model = MicroCLIP(cfg, sd.text_encoder, sd.tokenizer)
    images, captions = render_pool(cfg.pool_size, TRAIN_SEED + cfg.seed * 100_000)
    vocabulary = sorted(set(captions))
    label_of = {c: i for i, c in enumerate(vocabulary)}
    labels = torch.tensor([label_of[c] for c in captions])  # (n,)
    features = model.encode_captions(vocabulary)  # (U, D), frozen: computed once
    params = [p for n, p in model.named_parameters() if not n.startswith("text_encoder.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(labels), (cfg.batch,), generator=gen)
        x = to_float(images[idx]) + cfg.noise * torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size,
                                                             generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        loss, accuracy = contrastive_loss(model.text_head(features[labels[idx]]), model.image(x), labels[idx],
                                          model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))  # CLIP's cap on the inverse temperature
        if (step + 1) % log_every == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4), "batch_accuracy": round(accuracy.item(), 3),
                              "s_per_step": round((time.time() - t0) / (step + 1), 3)}), flush=True)
    return model.eval(), time.time() - t0


@torch.no_grad()
def retrieval(model: MicroCLIP, n: int = 512, seed: int = HELD_OUT_SEED) -> dict:
    """Held-out retrieval: for n scenes and n clip frames (seeds never trained on), the caption with the highest
    cosine among all 216 scene captions (resp. all 192 clip captions). Returns accuracies and their chance levels:
    scenes: the exact caption (chance 1/216), and colour, shape, position each right; clip frames: the exact
    caption (chance 1/192; one frame does not show the direction) and its colour and shape both right (chance 1/24)."""
    x, caps, _ = shapes.sample_dataset(n, seed=seed)
    xc, caps_c = clip_frames(n, seed + 1)
    out = {}
    for kind, images, truth, vocabulary in (("scene", x, caps, scene_captions()), ("clip", xc, caps_c, clip_captions())):
        sim = F.normalize(model.image_features(images), dim=-1) @ F.normalize(model.text_features(vocabulary), dim=-1).T
        best = [vocabulary[i] for i in sim.argmax(1).tolist()]  # (n,) the retrieved captions
        got = [shapes.parse_caption(b) for b in best]
        want = [shapes.parse_caption(t) for t in truth]
        out[f"{kind}_exact"] = sum(b == t for b, t in zip(best, truth)) / n
        out[f"{kind}_exact_chance"] = 1 / len(vocabulary)
        if kind == "scene":
            for key in ("colour", "shape", "position"):
                out[f"scene_{key}"] = sum(g[key] == w[key] for g, w in zip(got, want)) / n
        else:
            out["clip_colour_shape"] = sum(g["colour"] == w["colour"] and g["shape"] == w["shape"]
                                           for g, w in zip(got, want)) / n
            out["clip_colour_shape_chance"] = 1 / (len(shapes.PALETTE) * len(shapes.SHAPES))
    out["held_out_images"] = 2 * n
    return out


def to_markdown(r: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    return "\n".join([
        "| held-out images | retrieved among | right | chance |", "| --- | --- | --- | --- |",
        f"| {r['held_out_images'] // 2} scenes | 216 scene captions: exact caption | {pct(r['scene_exact'])} | "
        f"{pct(r['scene_exact_chance'])} |",
        f"| | colour / shape / position | {pct(r['scene_colour'])} / {pct(r['scene_shape'])} / "
        f"{pct(r['scene_position'])} | 16.7% / 25.0% / 11.1% |",
        f"| {r['held_out_images'] // 2} clip frames | 192 clip captions: exact caption | {pct(r['clip_exact'])} | "
        f"{pct(r['clip_exact_chance'])} |",
        f"| | colour and shape | {pct(r['clip_colour_shape'])} | {pct(r['clip_colour_shape_chance'])} |"])


def export(model: MicroCLIP, out: Path, record: dict) -> None:
    """clip_image/: config.json (sizes, training run, held-out retrieval) and model.safetensors (float16)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.trainable_state().items()}
    atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", {"tower": asdict(model.cfg), **record})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m apla.micro.image_tower", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(TOWER_DIR), help="where to write the tower (default: the shipped folder)")
    p.add_argument("--evaluate-only", action="store_true", help="measure the tower in --out, train nothing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small network)")
    for name, value in asdict(TowerConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.evaluate_only:
        print(to_markdown(retrieval(load_micro_clip(out))))
        return
    cfg = TowerConfig(**{k: getattr(args, k) for k in asdict(TowerConfig())})
    model, seconds = train(cfg)
    # round-trip through float16, as shipped, before measuring
    model.load_state_dict({k: v.half().float() for k, v in model.trainable_state().items()}, strict=False)
    result = retrieval(model)
    export(model, out, {"train_seconds": round(seconds), "retrieval": result})
    print(to_markdown(result))


if __name__ == "__main__":
    main()
