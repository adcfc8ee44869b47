"""The inflated 3D U-Net ε_θ(z_t, t, c) of APLA, built by hand.

Paper: "APLA: Additional Perturbation for Latent Noise with Adversarial Training Enables Consistency"
(AAAI 2024). APLA "build[s] the model based on Tune-A-Video (Wu et al. 2022) and utilize[s] the pre-trained
weights of the Stable Diffusion" (Sec. Experiments). This file is that network: the Stable Diffusion v1.5
U-Net (Rombach et al. 2022), inflated to video as Tune-A-Video does. SD 2.x's U-Net is the same network under other
`UNetConfig` values (linear projections, a head count per level, 1024-wide text states, upcast attention). It is the U-Net π of Eqs. (2)–(4) and the
noise predictor ε_θ(z_t, t) of Eq. (5); Eq. (4) adds the VGT's perturbation φ to its output (ε* = ε_θ + φ).

Inflation (Tune-A-Video, Sec. 4.2 of Wu et al.):
  * every 2D convolution runs per frame: (B, C, F, H, W) -> (B*F, C, H, W), so SD's 2D weights load unchanged;
  * the spatial self-attention becomes sparse-causal attention: the queries of frame i attend to the keys and
    values of frame 0 and frame i-1 together (frame 0 attends to itself twice);
  * after the feed-forward, a temporal self-attention across frames at each spatial position (`attn_temp`,
    with its own LayerNorm `norm_temp`), no positional encoding; its output projection's weight starts at zero,
    its bias at PyTorch's default init, as in Tune-A-Video (`apla.sd.attention.TransformerBlock.start_temporal_output`);
  * the cross-attention to the text runs per frame.

The attention kinds live in `apla/sd/attention.py` (`TransformerBlock`); every attention is one call of
`torch.nn.functional.scaled_dot_product_attention`. Module names equal diffusers' `UNet2DConditionModel` names, plus `attn_temp`/`norm_temp` in each
transformer block, so a diffusers `unet/diffusion_pytorch_model.safetensors` loads by identity and a single-file
checkpoint through `apla.sd.weights.unet_key_from_ldm`.

Shapes: internally the U-Net keeps activations as (B*F, C, H, W) and passes `num_frames` down; only the
attention layers (and, optionally, GroupNorm, see `UNetConfig.norm_over_frames`) look across frames.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from apla.scheduler import timestep_embedding
from apla.sd.attention import TransformerBlock
# SD's upsampler is one module in the VAE's decoder and the U-Net: the U-Net takes the VAE's (read first, in
# notebook 02) rather than a second copy; vae.py imports nothing of the U-Net, so the tie runs one way.
from apla.sd.vae import Upsample


class UNetConfigError(ValueError):
    """A U-Net config value this implementation does not support (SD v1.5's architecture only)."""


@dataclass
class UNetConfig:
    in_channels: int = 4  # SD v1.5: latent channels
    out_channels: int = 4  # SD v1.5: ε has the latent's shape
    block_out_channels: tuple = (320, 640, 1280, 1280)  # SD v1.5
    layers_per_block: int = 2  # SD v1.5
    # SD v1.5's config calls this attention_head_dim = 8 but it is the number of heads at every level
    # (diffusers keeps the misnomer for compatibility); head width = channels // heads (40, 80, 160, 160).
    # A tuple gives the head count per level, down the U-Net: SD 2.x's (5, 10, 20, 20) keeps every head 64 wide.
    attention_head_dim: int | tuple = 8
    cross_attention_dim: int = 768  # SD v1.5: CLIP ViT-L/14 text width (SD 2.x: 1024, OpenCLIP ViT-H/14's)
    norm_num_groups: int = 32  # SD v1.5
    norm_eps: float = 1e-5  # SD v1.5: ResNet and output GroupNorm, transformer LayerNorms
    transformer_norm_eps: float = 1e-6  # SD v1.5: the transformer's input GroupNorm (fixed in SD's code)
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    flip_sin_to_cos: bool = True  # SD v1.5: time embedding is [cos, sin]
    freq_shift: int = 0  # SD v1.5
    # SD v1.5: False, the transformer's proj_in / proj_out are 1x1 convolutions on (B*F, C, H, W); SD 2.x: True,
    # Linear layers on the (B*F, H*W, C) tokens (the same map, applied after the reshape to tokens instead of before)
    use_linear_projection: bool = False
    upcast_attention: bool = False  # SD v1.5: False; SD 2.1 (768): True (apla.sd.attention.attention)
    sample_size: int = 64  # the latent side the model was trained at: SD v1.5 and 2.1-base 64 (512 px), 2.1 96 (768 px)
    # False (default, so that a loaded SD equals SD): every GroupNorm normalises each frame alone, exactly as SD does
    # per image, which keeps the network causal in frames while the temporal attention's output is zero. True:
    # Tune-A-Video's code, which applies the ResNet and output GroupNorms to the whole (B, C, F, H, W) tensor,
    # pooling statistics over frames; APLA runs use it by default (TrainConfig.groupnorm, set_norm_over_frames).
    # Identical frames give the same result either way.
    norm_over_frames: bool = False

    # diffusers config keys we accept only with SD's value (anything else is an architecture we do not build)
    _SD_ONLY = {
        "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
        "dual_cross_attention": False, "only_cross_attention": False,
        "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
        "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "transformer_layers_per_block": 1, "encoder_hid_dim": None,
        "num_class_embeds": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "time_cond_proj_dim": None,
        "class_embeddings_concat": False, "attention_type": "default", "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "time_embedding_dim": None, "time_embedding_act_fn": None,
        "timestep_post_act": None, "cross_attention_norm": None, "mid_block_only_cross_attention": None,
        "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
    }

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNetConfig":
        """Read a diffusers `unet/config.json` dict (SD v1.x or 2.x); reject settings outside their architecture by
        name.

        Tune-A-Video's `UNet3DConditionModel` writes the config of SD's U-Net with its blocks named "...3D"
        (`CrossAttnDownBlock3D`, `UNetMidBlock3DCrossAttn`, ...); its modules are SD's with the temporal layers
        added, which is this network, so those names are read as SD's 2D ones (`is_tune_a_video` tells them)."""
        as_2d = {k: [b.replace("3D", "2D") for b in config[k]] for k in ("down_block_types", "up_block_types")
                 if k in config}
        if isinstance(config.get("mid_block_type"), str):
            as_2d["mid_block_type"] = config["mid_block_type"].replace("3D", "2D")
        config = {**config, **as_2d}
        for key, sd_value in cls._SD_ONLY.items():
            value = config.get(key, sd_value)
            if isinstance(value, list) and len(set(map(str, value))) == 1:
                value = value[0]  # per-level lists with one repeated value
            if value != sd_value:
                raise UNetConfigError(f"unet config: {key}={value!r} is not supported (SD uses {sd_value!r})")
        names = {f.name for f in fields(cls)} - {"norm_over_frames", "transformer_norm_eps"}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
        if isinstance(kwargs.get("sample_size"), tuple):
            raise UNetConfigError(f"unet config: sample_size={config['sample_size']!r}: SD's latents are square")
        return cls(**kwargs)

    def heads(self, level: int) -> int:
        """The head count of the transformers at `level` (0 = the first down level; the middle block is the last
        level's; an up block has its level's, as diffusers reverses the list for the way up)."""
        h = self.attention_head_dim
        return int(h if isinstance(h, int) else h[level])


def is_tune_a_video(config: dict) -> bool:
    """Whether a diffusers `unet/config.json` dict is one Tune-A-Video's `UNet3DConditionModel` wrote (its class, or
    its blocks named "...3D"): a U-Net already inflated and tuned, whose file holds the temporal weights."""
    blocks = [*config.get("down_block_types", ()), *config.get("up_block_types", ()), config.get("mid_block_type", "")]
    return config.get("_class_name") == "UNet3DConditionModel" or any("3D" in str(b) for b in blocks)


# ---------------------------------------------------------------------------------------------------------------
# Time embedding: the sinusoidal features of t (`apla.scheduler.timestep_embedding`, shared with VGT), then an MLP
# ---------------------------------------------------------------------------------------------------------------

class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------------------------
# Convolutional parts (per frame on (B*F, C, H, W))
# ---------------------------------------------------------------------------------------------------------------

class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm on (B*F, C, H, W): per frame, or with statistics over all F frames of a clip (Tune-A-Video)."""

    def __init__(self, num_groups, num_channels, eps, over_frames: bool):
        super().__init__(num_groups, num_channels, eps=eps)
        self.over_frames = over_frames

    def forward(self, x, num_frames: int = 1):
        if not self.over_frames or num_frames == 1:
            return super().forward(x)
        BF, C, H, W = x.shape
        x = x.view(BF // num_frames, num_frames, C, H * W).transpose(1, 2)  # (B*F, C, H, W) -> (B, C, F, H*W)
        x = super().forward(x)
        return x.transpose(1, 2).reshape(BF, C, H, W)  # (B, C, F, H*W) -> (B*F, C, H, W)


class _Checkpointable(nn.Module):
    """A module whose forward is recomputed in backward when `gradient_checkpointing` is on."""

    gradient_checkpointing = False

    def forward(self, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class ResnetBlock(_Checkpointable):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-conv, + (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, temb_dim: int, cfg: UNetConfig):
        super().__init__()
        g, eps, over = cfg.norm_num_groups, cfg.norm_eps, cfg.norm_over_frames
        self.norm1 = FrameGroupNorm(g, cin, eps, over)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = FrameGroupNorm(g, cout, eps, over)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def _forward(self, x, temb, num_frames: int):
        h = self.conv1(F.silu(self.norm1(x, num_frames)))  # (B*F, cout, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # temb: (B*F, temb_dim)
        h = self.conv2(F.silu(self.norm2(h, num_frames)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class SpatialTransformer(_Checkpointable):
    """GroupNorm, projection in, one TransformerBlock on the H*W tokens, projection out, residual. The projections are
    1x1 convolutions on the feature map (SD v1) or, with `use_linear_projection` (SD 2.x), Linear layers on the tokens."""

    def __init__(self, c: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, c, eps=cfg.transformer_norm_eps)  # per frame (as Tune-A-Video)
        self.linear = cfg.use_linear_projection
        self.proj_in = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(c, heads, cfg.cross_attention_dim, cfg.norm_eps,
                                                                  cfg.upcast_attention)])
        self.proj_out = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)

    def _forward(self, x, context, num_frames: int):
        BF, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(BF, H * W, C)  # (B*F, C, H, W) -> (B*F, H*W, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, num_frames)
        if self.linear:
            h = self.proj_out(h)
        h = h.view(BF, H, W, C).permute(0, 3, 1, 2)  # (B*F, H*W, C) -> (B*F, C, H, W)
        return (h if self.linear else self.proj_out(h)) + x


# ---------------------------------------------------------------------------------------------------------------
# U-Net levels
# ---------------------------------------------------------------------------------------------------------------

class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, heads: int, temb_dim: int, cross_attn: bool, downsample: bool,
                 cfg: UNetConfig):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, temb_dim, cfg) for i in range(n)])
        self.attentions = nn.ModuleList([SpatialTransformer(cout, heads, cfg) for _ in range(n)]) if cross_attn else None
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, x, temb, context, num_frames):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, c: int, heads: int, temb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, temb_dim, cfg), ResnetBlock(c, c, temb_dim, cfg)])
        self.attentions = nn.ModuleList([SpatialTransformer(c, heads, cfg)])

    def forward(self, x, temb, context, num_frames):
        x = self.resnets[0](x, temb, num_frames)
        x = self.attentions[0](x, context, num_frames)
        return self.resnets[1](x, temb, num_frames)


class UpBlock(nn.Module):
    def __init__(self, cprev: int, cout: int, cskips: list, heads: int, temb_dim: int, cross_attn: bool, upsample: bool,
                 cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock((cprev if i == 0 else cout) + cs, cout, temb_dim, cfg) for i, cs in enumerate(cskips)])
        self.attentions = nn.ModuleList([SpatialTransformer(cout, heads, cfg) for _ in cskips]) if cross_attn else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x, skips, temb, context, num_frames, size=None):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B*F, C + C_skip, H, W)
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNet3DConditionModel(nn.Module):
    """ε_θ(z_t, t, c): (B, 4, F, h, w), t int or (B,), context (B, 77, D) -> (B, 4, F, h, w); D = 768 (SD v1.5),
    1024 (SD 2.x)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        ch = list(cfg.block_out_channels)
        temb_dim = 4 * ch[0]  # SD v1.5: 1280
        for kind in cfg.down_block_types + cfg.up_block_types:
            if kind not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
                raise UNetConfigError(f"unet config: block type {kind!r} is not supported")
        if len(cfg.down_block_types) != len(ch) or len(cfg.up_block_types) != len(ch):
            raise UNetConfigError(f"unet config: {len(ch)} levels but block types "
                                  f"{cfg.down_block_types!r} / {cfg.up_block_types!r}")
        if not isinstance(cfg.attention_head_dim, int) and len(cfg.attention_head_dim) != len(ch):
            raise UNetConfigError(f"unet config: {len(ch)} levels but attention_head_dim={cfg.attention_head_dim!r}")

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]  # channels of every skip tensor, in push order
        for i, kind in enumerate(cfg.down_block_types):
            last = i == len(ch) - 1
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], cfg.heads(i), temb_dim,
                                              kind.startswith("CrossAttn"), not last, cfg))
            skip_channels += [ch[i]] * (cfg.layers_per_block + (0 if last else 1))

        self.mid_block = MidBlock(ch[-1], cfg.heads(len(ch) - 1), temb_dim, cfg)

        self.up_blocks = nn.ModuleList()
        cprev = ch[-1]
        for i, kind in enumerate(cfg.up_block_types):
            cout = ch[len(ch) - 1 - i]
            cskips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(cprev, cout, cskips, cfg.heads(len(ch) - 1 - i), temb_dim,
                                          kind.startswith("CrossAttn"), i < len(ch) - 1, cfg))
            cprev = cout

        self.conv_norm_out = FrameGroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, cfg.norm_over_frames)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def set_norm_over_frames(self, flag: bool) -> None:
        """GroupNorm of the ResNet blocks and the output: statistics over all frames of a clip (True, Tune-A-Video's
        code) or per frame (False, SD per image, the default of a loaded model). No weight changes."""
        self.config.norm_over_frames = flag
        for m in self.modules():
            if isinstance(m, FrameGroupNorm):
                m.over_frames = flag

    def set_inflation(self, flag: bool) -> None:
        """Tune-A-Video's inflation on (True, the default: sparse-causal self-attention and temporal attention) or off
        (False: per-frame self-attention and no temporal attention, so with per-frame GroupNorm the network is SD
        applied to each frame; what `python -m apla.bench --compare-diffusers` measures against diffusers). No
        weight changes: the temporal parameters stay and are unused while it is off."""
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.inflated = flag

    def enable_gradient_checkpointing(self, flag: bool = True):
        """Recompute each ResNet block and spatial transformer in backward instead of storing its activations."""
        for m in self.modules():
            if isinstance(m, _Checkpointable):
                m.gradient_checkpointing = flag

    def forward(self, z: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        if z.dim() != 5:
            raise ValueError(f"unet: z must be (B, C, F, h, w), got shape {tuple(z.shape)}")
        B, C, Fr, H, W = z.shape
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(B)  # int or (B,) -> (B,)

        temb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                  self.config.freq_shift).to(z.dtype)
        temb = self.time_embedding(temb).repeat_interleave(Fr, dim=0)  # (B, 1280) -> (B*F, 1280)

        x = z.transpose(1, 2).reshape(B * Fr, C, H, W)  # (B, C, F, H, W) -> (B*F, C, H, W)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context, Fr)
            skips += s
        x = self.mid_block(x, temb, context, Fr)
        for i, block in enumerate(self.up_blocks):
            # the size the next skip tensor has (odd latent sizes round down on the way in)
            size = skips[-(len(block.resnets) + 1)].shape[-2:] if block.upsamplers is not None else None
            x = block(x, skips, temb, context, Fr, size)
        x = self.conv_out(F.silu(self.conv_norm_out(x, Fr)))
        return x.view(B, Fr, -1, H, W).transpose(1, 2)  # (B*F, C, H, W) -> (B, C, F, H, W)


# ---------------------------------------------------------------------------------------------------------------
# Parameter names: temporal set, trainable set, single-file names
# ---------------------------------------------------------------------------------------------------------------

TEMPORAL_MODULES = ("attn_temp", "norm_temp")


def _has_module(name: str, pattern: str) -> bool:
    """True when the dotted `pattern` is a run of whole components of the dotted `name`."""
    return f".{pattern}." in f".{name}."


def is_temporal_param(name: str) -> bool:
    """True for the parameters inflation adds (absent from SD checkpoints)."""
    return any(_has_module(name, m) for m in TEMPORAL_MODULES)


def mark_trainable(unet: nn.Module, patterns) -> int:
    """Freeze every parameter except those inside a module named by `patterns` (a run's: TrainConfig.trainable,
    Tune-A-Video's set by default, apla.config.DEFAULT_TRAINABLE); return how many scalars train."""
    n = 0
    for name, p in unet.named_parameters():
        p.requires_grad_(any(_has_module(name, pat) for pat in patterns))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ValueError(f"mark_trainable: no parameter matches {patterns!r}")
    return n


def trainable_state(unet: nn.Module) -> dict:
    """The trainable parameters (requires_grad) by name: what a fine-tuned run saves."""
    return {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet: nn.Module, tensors: dict, where: str = "checkpoint") -> None:
    """Copy `tensors` into the trainable set; names and shapes must equal it exactly (errors name the key)."""
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    for name in sorted(set(params) - set(tensors)):
        raise ValueError(f"{where}: missing trainable parameter {name}")
    for name in sorted(set(tensors) - set(params)):
        raise ValueError(f"{where}: unexpected tensor {name} (not in the trainable set)")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[name])
