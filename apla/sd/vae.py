"""Stable Diffusion v1's KL autoencoder, written out by hand.

APLA (AAAI 2024) works in the latent space of a pre-trained Stable Diffusion: its encoder
$\\mathcal{E}$ maps a frame x to a latent z and its decoder $\\mathcal{D}$ maps it back,
$\\tilde{x} = \\mathcal{D}(z) = \\mathcal{D}(\\mathcal{E}(x))$ (APLA, "Method", the paragraph before Eq. 1).
The paper uses this autoencoder unchanged (Rombach et al. 2022); no APLA equation lives here.

- `AutoencoderKL.encode(x)`  -> (mean, logvar) of the diagonal Gaussian posterior q(z | x), unscaled.
- `sample_posterior(mean, logvar)` draws z = mean + exp(logvar / 2) * noise.
- `AutoencoderKL.decode(z)`  -> x in (about) [-1, 1] from an unscaled latent.
- `SCALING_FACTOR` (0.18215): SD multiplies latents by it before diffusion, z0 = SCALING_FACTOR * z.

Module names equal diffusers' `vae/diffusion_pytorch_model.safetensors` names, so a diffusers folder
loads by identity; `vae_key_from_ldm` maps the single-file (`first_stage_model.`) names by a few rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# SD v1's latent scale: unit variance for the diffusion model, z0 = SCALING_FACTOR * z.
SCALING_FACTOR = 0.18215
# GroupNorm epsilon used everywhere inside SD's autoencoder.
NORM_EPS = 1e-6
# log-variance clamp of the posterior, as in the reference autoencoder.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class VAEConfig:
    in_channels: int = 3  # SD v1.5: 3 (RGB)
    out_channels: int = 3  # SD v1.5: 3
    latent_channels: int = 4  # SD v1.5: 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # SD v1.5: (128, 256, 512, 512)
    layers_per_block: int = 2  # SD v1.5: 2 (the decoder uses layers_per_block + 1)
    norm_num_groups: int = 32  # SD v1.5: 32
    scaling_factor: float = SCALING_FACTOR  # SD v1.5: 0.18215
    sample_size: int = 512  # SD v1.5: 512 (informational)

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        """Take the fields we know from a diffusers `vae/config.json`; the rest is ignored (the strict
        weight loader catches any architecture those fields would change)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)


class VAEResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected when channels change) skip."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map (the VAE's mid block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        h = self.group_norm(x).reshape(N, C, H * W).transpose(1, 2)  # (N, C, H, W) -> (N, H*W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # $$\mathrm{softmax}(q k^\top / \sqrt{C})\, v$$
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.to_out[0](h)
        h = h.transpose(1, 2).reshape(N, C, H, W)  # (N, H*W, C) -> (N, C, H, W)
        return x + h


class VAEMidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEDownsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (SD's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `size`), then a 3x3 conv: SD's upsampler in both the VAE's decoder
    and the U-Net (`apla.sd.unet` uses this class; the U-Net passes `size` when a latent side was odd)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, C, H, W) -> (N, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (N, C, H, W) -> (N, C, *size)
        return self.conv(x)


class VAEEncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([VAEDownsample(cout)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class VAEDecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """x (N, 3, H, W) -> moments (N, 2*latent, H/2^(L-1), W/2^(L-1)) for L blocks."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                VAEEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
                for i in range(len(ch))
            ]
        )
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (N, latent, h, w) -> x (N, 3, h*2^(L-1), w*2^(L-1)); channels run the encoder's in reverse."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            [
                VAEDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD v1's VAE: $\\mathcal{E}$ (`encode`) and $\\mathcal{D}$ (`decode`); 8x spatial downsampling at SD sizes."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        self.scaling_factor = self.config.scaling_factor
        c = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """$\\mathcal{E}$: x in [-1, 1], (N, 3, H, W) -> (mean, logvar), each (N, 4, H/8, W/8), unscaled."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)  # (N, 2c, h, w) -> 2 x (N, c, h, w)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """$\\mathcal{D}$: unscaled latent (N, 4, h, w) -> x (N, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def sample_posterior(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw z ~ N(mean, exp(logvar)) from the diagonal Gaussian posterior q(z | x)."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    # $$z = \mu + \sigma \odot n, \quad \sigma = e^{\frac{1}{2}\log\sigma^2}$$
    return mean + torch.exp(0.5 * logvar) * noise


VAE_LDM_PREFIX = "first_stage_model."  # the VAE's prefix inside a single-file checkpoint
# Single-file (prefix stripped) -> diffusers names. Order matters: block renames first.
_LDM_VAE_RULES = [
    (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", lambda m: f"{m[1]}.mid_block.attentions.0."),
    (r"^encoder\.down\.(\d+)\.block\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
    (r"\.nin_shortcut\.", lambda m: ".conv_shortcut."),
    (r"\.norm_out\.", lambda m: ".conv_norm_out."),
    (r"\.attentions\.0\.norm\.", lambda m: ".attentions.0.group_norm."),
    (r"\.attentions\.0\.(q|k|v)\.", lambda m: f".attentions.0.to_{m[1]}."),
    (r"\.attentions\.0\.proj_out\.", lambda m: ".attentions.0.to_out.0."),
]


def vae_key_from_ldm(key: str, num_blocks: int = 4) -> str:
    """Map a single-file VAE name (`first_stage_model.` optional) to ours (= diffusers').

    The decoder's `up.{i}` counts from the lowest resolution upward, ours from the top:
    `decoder.up.{i}.block.{j}` -> `decoder.up_blocks.{num_blocks-1-i}.resnets.{j}`.
    """
    key = key.removeprefix(VAE_LDM_PREFIX)
    up = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.", key)
    if up:
        i = num_blocks - 1 - int(up[1])
        part = "resnets." if up[2] == "block" else "upsamplers.0."
        key = f"decoder.up_blocks.{i}.{part}" + key[up.end():]
    for pattern, repl in _LDM_VAE_RULES:
        key = re.sub(pattern, repl, key)
    return key
