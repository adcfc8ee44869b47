"""The Video Generation Transformer (VGT) of APLA (Yao et al., "APLA: Additional Perturbation for Latent
Noise with Adversarial Training Enables Consistency", AAAI 2024), section "Video Generation Transformer".

VGT phi(z_t, t) reads the noisy latent video z_t and returns a perturbation of z_t's shape that is added to
the U-Net's noise prediction. The paper writes the temporal token sequence z_t^l too; here it is z_tmp^l
(`z_tmp`), so that z_t always means the noisy latent. This file implements

    Eq. (4)   eps* = eps_theta(z_t, t, c) + phi(z_t, t)                     perturbed_eps
    Eq. (7)   z_s^{l+1} = MMSA(LN(z_s^l)) + z_s^l                          DecoderBlock.forward (VGT.spatial)
    Eq. (8)   z_tmp^{l+1} = MMSA(LN(z_tmp^l)) + z_tmp^l                    DecoderBlock.forward (VGT.temporal)
    Eq. (9)   z_s^0 = [z_cls,s, z_s^1, ..., z_s^N] + p   (paper: z_s^L)     spatial_tokens
    Eq. (10)  z_tmp^1 = [z_cls,t, D z_cls,s^{1,L}, ..., D z_cls,s^{F,L}] + p  temporal_input
    Eq. (11)  z_tmp^M = [z_cls,t^M, z_tmp^{1,M}, ..., z_tmp^{F,M}]         temporal_output
    Eq. (12)  y = z_s^{C,L} (Hadamard) z_tmp^{C,M}                         hadamard_fusion      (VGT-Pure)
    Eq. (13)  z_hat = MLP(y)                                               MLPHead.forward      (VGT-Pure)
    Eq. (14)  y* = M z_tmp^M                                               HyperBlock.forward   (VGT-Hyper)
    Eq. (15)  z_hat = MLP(y*)                                              MLPHead.forward      (VGT-Hyper)

Eqs. 7 and 8 are the same map, so one class, `DecoderBlock`, serves both decoders, each with its own blocks;
Eqs. 13 and 15 are the same MLP, `MLPHead`, read on y or on y*. `VGT(z_t, t, return_intermediates=True)` returns
the tensors in between (`VGTIntermediates`). Also here: `perturbation_ratio` (the quantity of the paper's
Fig. 5b) and the four variants of Table 1: "pure", "hyper" (masked self-attention: a transformer decoder) and
"pure-en", "hyper-en" (no mask: an encoder).

Where the paper is silent we chose as follows, once, here (the code each choice governs points back to this list):

* Input. VGT receives z_t only, plus the timestep t. Paper: "phi(z_t, t)" (Eq. 4) and "z_t is the input of
  VGT-Pure". It does not receive the text context.
* How t enters. The U-Net's parameter-free sinusoidal embedding of t (`apla.scheduler.timestep_embedding`,
  [cos | sin], width d) is added to every frame's spatial class token before the spatial decoder. Paper: Eq. 4 writes
  phi(z_t, t) but never says how t is used.
* The mask ("MMSA"). Tokens are kept in the paper's order [cls, x_1, ..., x_n] (Eqs. 9-11). Token i >= 1
  attends to tokens 1..i (causal, not to the class token); the class token attends to all tokens. So frame k
  of the temporal decoder never sees frames > k, and the class tokens, which nothing else reads, summarise the
  whole sequence. Spatially, patch tokens are causal in raster order. Paper: "we replace Multi-Headed Self
  Attention (MAS) with MASKed Multi-Headed Self Attention (MMAS)" and Fig. 4 "adapted mask operation on the
  self-attention mechanism". A strict causal mask with the class token first would let the class token see
  only itself, and the temporal decoder (which reads only class tokens) would learn nothing about the frames.
* Blocks. Exactly Eqs. 7-8: pre-LayerNorm masked self-attention with a residual and no feed-forward sublayer
  (the equations have none); one final LayerNorm after each decoder.
* The matrix D of Eq. 10 is a learned linear map (d -> d), read like the matrix M of Eq. 14. Paper: "where D
  is the decoder block".
* "+ p" in Eqs. 9-11 is the learned positional embedding added once, at the input of each decoder. Eq. 11
  repeats the notation "+ p" on the output; we do not add it a second time.
* Eq. 12 broadcasts: frame f's temporal token multiplies each of frame f's N patch tokens.
* VGT-Hyper (Eq. 14). The conv block M receives, on the (F, H/P, W/P) token grid, the channels
  [z_s^{C,L} ; z_tmp^{C,M} + z_cls,t^M]: the spatial patch tokens and the whole temporal-decoder output (frame
  tokens and the temporal class token, broadcast over patches). M = ConvTranspose3d(2d -> d, 3x3x3) -> GELU ->
  ConvTranspose3d(d -> d, 1x3x3), stride 1 (so each is a 3D convolution; both words appear in the paper).
  Paper: "in Eq. 12, rather than employing element-wise multiplication, we opt for 3D convolution" and Fig. 4
  "the whole output of the Temporal Transformer Decoder is transmitted to Transposed Convolution Block directly".
  The 3D convolution mixes neighbouring frames both ways; the mask governs the temporal decoder only.
* Sizes. Table 1 gives only parameter counts (60.362 M, 97.136 M). Our defaults (P = 2, d = 768, 12 heads,
  L = M = 12, MLP hidden 3072, 24 frames, 64x64 latents) give 60.56 M and 97.72 M.
* Small output at the start (Fig. 3: "As VGT is not trained ever, the output of VGT is tiny"): the last layer
  of the MLP head is initialised with std `out_init_std` (1e-4) and zero bias.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F_
from torch.utils.checkpoint import checkpoint

from apla.scheduler import timestep_embedding

VARIANTS = ("pure", "hyper", "pure-en", "hyper-en")  # the paper's Table 1
ALL_VARIANTS = VARIANTS + ("pure-frame",)  # and the ablation study's capacity control


@dataclass
class VGTConfig:
    """VGT hyper-parameters. Defaults are the paper-size model (Table 1) at SD v1.5's latents.

    At initialisation ||phi|| / ||eps_theta|| (Fig. 5b) is about 2e-3 at this paper size (VGT-Pure 1.8e-3, VGT-Hyper
    1.1e-3; tests/test_vgt.py::test_initial_perturbation_is_tiny_paper_size prints it) and about 1e-4 for the micro
    run's VGT (`apla.config.TrainConfig.vgt_model`, notebook 03): `out_init_std` sets the scale, the width the rest.
    """

    variant: str = "pure"  # "pure" | "hyper" | "pure-en" | "hyper-en" (Table 1); paper experiments: "pure";
    # "pure-frame": VGT-Pure with no information across frames (`frame_mask`), the ablation study's capacity control
    in_channels: int = 4  # C: SD v1.5 latent channels
    sample_size: int = 64  # largest latent side h = w (512 px / 8); sizes the spatial positional table
    max_frames: int = 24  # largest F; the paper samples 24 frames; sizes the temporal positional table
    patch_size: int = 2  # P
    width: int = 768  # d, token width (even: the timestep embedding is half cos, half sin)
    spatial_depth: int = 12  # L, spatial decoder blocks (Eq. 7)
    temporal_depth: int = 12  # M, temporal decoder blocks (Eq. 8)
    heads: int = 12  # attention heads; width % heads == 0
    mlp_hidden: int = 3072  # hidden width of the MLP head (Eqs. 13, 15)
    out_init_std: float = 1e-4  # std of the head's last layer at init: phi starts tiny (Fig. 5b)
    init_seed: int = 0  # seed of the weight initialisation

    def __post_init__(self):
        for name in ("in_channels", "sample_size", "max_frames", "patch_size", "width", "spatial_depth",
                     "temporal_depth", "heads", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VGTConfig.{name} must be an integer >= 1, got {value!r}")
        if self.variant not in ALL_VARIANTS:
            raise ValueError(f"VGTConfig.variant={self.variant!r}; expected one of {ALL_VARIANTS}")
        if self.width % self.heads or self.width % 2:
            raise ValueError(f"VGTConfig.width={self.width} must be even and divisible by heads={self.heads}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"VGTConfig.sample_size={self.sample_size} not divisible by patch_size={self.patch_size}")

    @property
    def masked(self) -> bool:
        """True for the decoder variants ("pure", "hyper"); False for the encoder ("-en") ones."""
        return not self.variant.endswith("-en")

    @property
    def per_frame(self) -> bool:
        """True for "pure-frame": the temporal decoder's tokens attend to themselves only (`frame_mask`)."""
        return self.variant == "pure-frame"

    @property
    def hyper(self) -> bool:
        return self.variant.startswith("hyper")


class VGTShapeError(ValueError):
    """An input whose shape VGT cannot take (names the offending dimension)."""


# ----------------------------------------------------------------------------------------------------------
# Equations that own no parameters, and token bookkeeping
# ----------------------------------------------------------------------------------------------------------


def perturbed_eps(eps_pred: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Eq. (4): the perturbed noise prediction eps* = eps_theta(z_t, t, c) + phi(z_t, t).

    The paper writes Eq. 4 on the latent after a denoising step, z*_{t-1} = pi(z_t, t) + phi(z_t, t), with pi the
    DDIM step of Eqs. 2-3 (`apla.scheduler.ddim_step`), and says "we add the perturbation to the U-Net". We add phi
    to the U-Net's output, its noise prediction eps_theta, so that training (Eq. 6) and sampling use the same eps*.
    The DDIM step is linear in its eps, so this adds c_t phi to z_{t-1}, with
    c_t = sqrt(1 - alpha_bar_{t-1}) - sqrt(alpha_bar_{t-1} (1 - alpha_bar_t) / alpha_bar_t): the paper's reading
    up to that t-dependent scale (phi sees t, so either reading can learn the other's). Same shape in and out.
    """
    # $$\epsilon^* = \epsilon_\theta(z_t, t, c) + \varphi(z_t, t)$$
    return eps_pred + phi


def perturbation_ratio(phi: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """The ratio ||phi(z_t)||_2 / ||eps_theta||_2 over the whole batch (the paper's Fig. 5b), as a float32
    0-d tensor without gradient. Works for any pair of same-shape tensors (e.g. a U-Net's eps_pred)."""
    phi, eps_pred = phi.detach().float(), eps_pred.detach().float()
    # $$\|\varphi(z_t)\|_2 / \|\epsilon_\theta\|_2$$
    return phi.norm() / eps_pred.norm().clamp_min(torch.finfo(torch.float32).tiny)


def decoder_mask(n: int, device=None) -> torch.Tensor:
    """The boolean attention mask of MMSA for a sequence [cls, x_1, ..., x_{n-1}] (True = may attend).

    Row 0 (the class token) sees every token; row i >= 1 sees tokens 1..i (causal, not the class token).
    Choice, resting on "we replace Multi-Headed Self Attention (MAS) with MASKed Multi-Headed Self Attention
    (MMAS)": see the file header. Shape (n, n).
    """
    idx = torch.arange(n, device=device)
    causal = idx[None, :] <= idx[:, None]  # (n, n): key j <= query i
    causal[1:, 0] = False  # tokens never read the class token
    causal[0, :] = True  # the class token reads everything
    return causal


def frame_mask(n: int, device=None) -> torch.Tensor:
    """The temporal mask of the capacity control "pure-frame" (not in the paper): every token attends to itself
    only, shape (n, n), True on the diagonal. With it, frame f's temporal token is a function of frame f's spatial
    class token alone, and since the spatial decoder, Eq. 12's product and the MLP head work frame by frame, phi of
    frame f depends on frame f of z_t only (and on t and f's position): VGT-Pure's parameters, its place in Eq. 4,
    no information across frames. The ablation study trains it beside VGT-Pure to tell "VGT helps because it sees
    other frames" from "more trainable parameters fit faster"."""
    return torch.eye(n, dtype=torch.bool, device=device)


def patchify(z: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split a latent video into P x P patches: (B, C, F, H, W) -> (B, F, H/P * W/P, C*P*P)."""
    B, C, F, H, W = z.shape
    P = patch_size
    z = z.reshape(B, C, F, H // P, P, W // P, P)  # (B, C, F, H, W) -> (B, C, F, Hp, P, Wp, P)
    z = z.permute(0, 2, 3, 5, 1, 4, 6)  # -> (B, F, Hp, Wp, C, P, P)
    return z.reshape(B, F, (H // P) * (W // P), C * P * P)  # -> (B, F, N, C*P*P)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, F, H/P * W/P, C*P*P) -> (B, C, F, H, W) (the rearrangement after Eq. 13)."""
    B, F = tokens.shape[:2]
    P, Hp, Wp = patch_size, height // patch_size, width // patch_size
    z = tokens.reshape(B, F, Hp, Wp, channels, P, P)  # (B, F, N, C*P*P) -> (B, F, Hp, Wp, C, P, P)
    z = z.permute(0, 4, 1, 2, 5, 3, 6)  # -> (B, C, F, Hp, P, Wp, P)
    return z.reshape(B, channels, F, height, width)  # -> (B, C, F, H, W)


def spatial_tokens(patch_tokens: torch.Tensor, cls_token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Eq. (9): one frame's input token sequence z_s^0 = [z_cls,s, z_s^1, ..., z_s^N] + p.

    The paper writes Eq. 9 as z_s^L = [z_cls,s^L, z_s^{1,L}, ..., z_s^{F,L}] + p: the spatial decoder's output after
    L blocks, its tokens indexed by frames. We build what that sequence starts as: a class token in front of one
    frame's N patch tokens, plus p, added once at the input (file header); the frames go into the batch, and L blocks
    of Eq. 7 turn z_s^0 into z_s^L, whose class tokens (one per frame) Eq. 10 reads.

    patch_tokens (B*F, N, d) embedded patches; cls_token (B*F, 1, d) or (1, 1, d); pos (1, 1+N, d).
    Returns (B*F, 1+N, d). The class token comes first, as in the paper.
    """
    cls_token = cls_token.expand(patch_tokens.shape[0], 1, -1)
    # $$z_s^0 = [z_{cls,s}, z_s^1, \dots, z_s^N] + p$$
    return torch.cat([cls_token, patch_tokens], dim=1) + pos


def temporal_input(cls_s: torch.Tensor, cls_t: torch.Tensor, D: nn.Linear, pos: torch.Tensor) -> torch.Tensor:
    """Eq. (10): the temporal decoder's input z_tmp^1 = [z_cls,t, D z_cls,s^{1,L}, ..., D z_cls,s^{F,L}] + p.

    cls_s (B, F, d): the spatial decoder's class-token output of each frame; cls_t (1, 1, d) the learned
    temporal class token; D a learned linear map (our reading of "where D is the decoder block", a matrix like
    M in Eq. 14); pos (1, 1+F, d). Returns (B, 1+F, d).
    """
    B = cls_s.shape[0]
    # $$z_{tmp}^1 = [z_{cls,t}, \mathbf{D} z_{cls,s}^{1,L}, \dots, \mathbf{D} z_{cls,s}^{F,L}] + p$$
    return torch.cat([cls_t.expand(B, 1, -1), D(cls_s)], dim=1) + pos


def temporal_output(z_tmp_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (11): split the temporal decoder's output z_tmp^M = [z_cls,t^M, z_tmp^{1,M}, ..., z_tmp^{F,M}].

    (B, 1+F, d) -> (z_cls,t^M (B, d), z_tmp^{C,M} (B, F, d)). The "+ p" of Eq. 11 is read as the same positional
    embedding as Eq. 10's, added once at the input, so nothing is added here.
    """
    # $$z_{tmp}^M = [z_{cls,t}^M, z_{tmp}^{C,M}]$$
    return z_tmp_M[:, 0], z_tmp_M[:, 1:]


def hadamard_fusion(z_s_C: torch.Tensor, z_tmp_C: torch.Tensor) -> torch.Tensor:
    """Eq. (12) (VGT-Pure): y = z_s^{C,L} (Hadamard) z_tmp^{C,M}.

    z_s_C (B, F, N, d) spatial patch tokens (class token removed); z_tmp_C (B, F, d) temporal frame tokens
    (class token removed). Frame f's temporal token multiplies each of its N patch tokens (broadcast).
    """
    # $$y = z_s^{C,L} \odot z_{tmp}^{C,M}$$
    return z_s_C * z_tmp_C[:, :, None, :]  # (B, F, N, d) * (B, F, 1, d)


# ----------------------------------------------------------------------------------------------------------
# Blocks: each forward is its equation
# ----------------------------------------------------------------------------------------------------------


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention (torch SDPA) with an optional boolean mask: MMSA when a mask is given."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, d = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, d // self.heads)  # (B, N, 3d) -> (B, N, 3, h, d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # -> 3 x (B, h, N, d/h)
        out = F_.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d/h)
        return self.proj(out.transpose(1, 2).reshape(B, N, d))  # (B, h, N, d/h) -> (B, N, d)


class DecoderBlock(nn.Module):
    """One decoder block: Eq. (7) in the spatial decoder (`VGT.spatial`) and Eq. (8) in the temporal decoder
    (`VGT.temporal`). The two equations are the same map, so one class serves both; each decoder has its own blocks.

    Pre-LayerNorm (masked) multi-head self-attention with a residual and no feed-forward sublayer: Eqs. 7-8 have
    none (choice; see the file header).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = MaskedSelfAttention(width, heads)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Eq. (7) on each frame's spatial tokens z_s^l (B*F, 1+N, d), Eq. (8) on the temporal tokens z_tmp^l
        (B, 1+F, d): z^{l+1} = MMSA(LN(z^l)) + z^l, same shape out.

        mask from `decoder_mask` (then token k >= 1 depends on tokens 1..k only), or None for plain MSA (the "-en"
        variants).
        """
        # $$z^{\ell+1} = \mathrm{MMSA}(\mathrm{LN}(z^\ell)) + z^\ell$$
        return self.attn(self.norm(z), mask) + z


class MLPHead(nn.Module):
    """The MLP of Eqs. 13 and 15: Linear(d, hidden) -> GELU -> Linear(hidden, C*P*P). VGT-Pure reads it on y
    (Eq. 13), VGT-Hyper on y* (Eq. 15): the paper writes the same MLP in both."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Eq. (13) z_hat = MLP(y) (VGT-Pure) and Eq. (15) z_hat = MLP(y*) (VGT-Hyper): (B, F, N, d) ->
        (B, F, N, C*P*P), one token's C*P*P numbers per patch."""
        # $$\hat z_t = \mathrm{MLP}(y)$$
        return self.fc2(F_.gelu(self.fc1(y)))


class HyperBlock(nn.Module):
    """The convolution block M of Eq. 14: ConvTranspose3d(2d->d, 3x3x3) -> GELU -> ConvTranspose3d(d->d, 1x3x3).

    Stride 1 and "same" padding, so both layers are 3D convolutions over (F, H/P, W/P) that keep the grid.
    """

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose3d(2 * width, width, kernel_size=3, padding=1)
        self.conv2 = nn.ConvTranspose3d(width, width, kernel_size=(1, 3, 3), padding=(0, 1, 1))

    def forward(
        self, z_s_C: torch.Tensor, cls_t_M: torch.Tensor, z_tmp_C: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Eq. (14) (VGT-Hyper): y* = M z_tmp^M, the 3D (transposed) convolution block in place of Eq. 12's product.

        z_s_C (B, F, N, d) spatial patch tokens; cls_t_M (B, d) and z_tmp_C (B, F, d) the whole temporal output
        (Eq. 11); grid = (H/P, W/P) with N = H/P * W/P. Choice: M sees the channels
        [z_s^{C,L} ; z_tmp^{C,M} + z_cls,t^M] (temporal tokens broadcast over patches); see the file header.
        Returns y* (B, F, N, d).
        """
        B, F, N, d = z_s_C.shape
        Hp, Wp = grid
        spatial = z_s_C.permute(0, 3, 1, 2).reshape(B, d, F, Hp, Wp)  # (B, F, N, d) -> (B, d, F, Hp, Wp)
        temporal = (z_tmp_C + cls_t_M[:, None, :]).permute(0, 2, 1)  # (B, F, d) -> (B, d, F)
        temporal = temporal[:, :, :, None, None].expand(B, d, F, Hp, Wp)  # (B, d, F) -> (B, d, F, Hp, Wp)
        # $$y^* = \mathbf{M} z_{tmp}^M$$
        y = self.conv2(F_.gelu(self.conv1(torch.cat([spatial, temporal], dim=1))))  # (B, 2d, ...) -> (B, d, ...)
        return y.reshape(B, d, F, N).permute(0, 2, 3, 1)  # (B, d, F, Hp, Wp) -> (B, F, N, d)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class VGTIntermediates(NamedTuple):
    """What VGT computes on the way to phi, for z_t of shape (B, C, F, H, W), N = (H/P)(W/P) and width d."""

    z_s_0: torch.Tensor  # Eq. 9, the spatial decoder's input: (B*F, 1+N, d), class token first
    z_s_L: torch.Tensor  # after L blocks of Eq. 7 and the final LayerNorm: (B*F, 1+N, d)
    z_tmp_1: torch.Tensor  # Eq. 10, the temporal decoder's input: (B, 1+F, d)
    z_tmp_M: torch.Tensor  # after M blocks of Eq. 8 and the final LayerNorm: (B, 1+F, d)
    y: torch.Tensor  # y of Eq. 12 (VGT-Pure) or y* of Eq. 14 (VGT-Hyper): (B, F, N, d)
    z_hat: torch.Tensor  # Eq. 13 / 15: (B, F, N, C*P*P)
    phi: torch.Tensor  # z_hat rearranged to z_t's shape: (B, C, F, H, W)


class VGT(nn.Module):
    """Video Generation Transformer phi(z_t, t): (B, C, F, H, W) latent -> perturbation of the same shape.

    `VGT(config)(z_t, t)` with t an int or a (B,) long tensor returns phi; with `return_intermediates=True`, the
    `VGTIntermediates` of that same computation. Variant by `config.variant` (Table 1).
    """

    gradient_checkpointing = False

    def __init__(self, config: VGTConfig):
        super().__init__()
        self.config = c = config
        d, P = c.width, c.patch_size
        n_max = (c.sample_size // P) ** 2
        self.patch_embed = nn.Linear(c.in_channels * P * P, d)
        self.cls_s = nn.Parameter(torch.zeros(1, 1, d))  # z_cls,s
        self.cls_t = nn.Parameter(torch.zeros(1, 1, d))  # z_cls,t
        self.pos_s = nn.Parameter(torch.zeros(1, 1 + n_max, d))  # p of Eq. 9, for the largest patch grid
        self.pos_t = nn.Parameter(torch.zeros(1, 1 + c.max_frames, d))  # p of Eq. 10
        self.spatial = nn.ModuleList(DecoderBlock(d, c.heads) for _ in range(c.spatial_depth))  # Eq. 7
        self.norm_s = nn.LayerNorm(d)
        self.D = nn.Linear(d, d)  # the matrix D of Eq. 10
        self.temporal = nn.ModuleList(DecoderBlock(d, c.heads) for _ in range(c.temporal_depth))  # Eq. 8
        self.norm_t = nn.LayerNorm(d)
        self.fusion = HyperBlock(d) if c.hyper else None  # M of Eq. 14
        self.head = MLPHead(d, c.mlp_hidden, c.in_channels * P * P)  # Eqs. 13, 15
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        g = torch.Generator().manual_seed(self.config.init_seed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02, generator=g)
                m.bias.zero_()
            elif isinstance(m, nn.ConvTranspose3d):
                fan_in = m.weight.shape[0] * m.weight[0, 0].numel()  # in_channels * kernel volume
                m.weight.normal_(0.0, fan_in**-0.5, generator=g)
                m.bias.zero_()
        for p in (self.cls_s, self.cls_t, self.pos_s, self.pos_t):
            p.normal_(0.0, 0.02, generator=g)
        # phi starts tiny: Fig. 3, "As VGT is not trained ever, the output of VGT is tiny"
        self.head.fc2.weight.normal_(0.0, self.config.out_init_std, generator=g)

    def enable_gradient_checkpointing(self, flag: bool = True) -> None:
        """Recompute each decoder block in backward instead of storing its activations (its input is kept)."""
        self.gradient_checkpointing = flag

    def _block(self, block: DecoderBlock, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, z, mask, use_reentrant=False)
        return block(z, mask)

    def _check(self, z_t: torch.Tensor):
        c = self.config
        if z_t.ndim != 5 or z_t.shape[1] != c.in_channels:
            raise VGTShapeError(f"z_t must be (B, {c.in_channels}, F, H, W); got {tuple(z_t.shape)}")
        _, _, F, H, W = z_t.shape
        if F > c.max_frames:
            raise VGTShapeError(f"z_t has F={F} frames; VGTConfig.max_frames={c.max_frames}")
        for name, s in (("H", H), ("W", W)):
            if s % c.patch_size or s > c.sample_size:
                raise VGTShapeError(
                    f"z_t has {name}={s}; it must divide by patch_size={c.patch_size} and be <= sample_size={c.sample_size}"
                )

    def forward(self, z_t: torch.Tensor, t, return_intermediates: bool = False) -> torch.Tensor | VGTIntermediates:
        """phi(z_t, t): (B, C, F, H, W) -> (B, C, F, H, W), through Eqs. 9, 7, 10, 8, 11 and 12-13 (VGT-Pure) or
        14-15 (VGT-Hyper). With return_intermediates, the `VGTIntermediates` whose `phi` is that same tensor."""
        self._check(z_t)
        c = self.config
        B, C, F, H, W = z_t.shape
        P, d = c.patch_size, c.width
        Hp, Wp, side = H // P, W // P, c.sample_size // P
        t = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(B)  # int or (B,) -> (B,)
        x = self.patch_embed(patchify(z_t, P))  # (B, F, N, C*P*P) -> (B, F, N, d)
        x = x.reshape(B * F, Hp * Wp, d)  # (B, F, N, d) -> (B*F, N, d)
        # t enters through the spatial class token (choice; see the file header)
        cls = self.cls_s + timestep_embedding(t, d).to(x.dtype)[:, None, :]  # (B, 1, d)
        cls = cls.repeat_interleave(F, dim=0)  # (B, 1, d) -> (B*F, 1, d)
        grid = self.pos_s[:, 1:].reshape(1, side, side, d)[:, :Hp, :Wp]  # (1, side^2, d) -> (1, Hp, Wp, d), a crop
        pos = torch.cat([self.pos_s[:, :1], grid.reshape(1, Hp * Wp, d)], dim=1)  # (1, Hp, Wp, d) -> (1, 1+N, d)
        z_s = z_s_0 = spatial_tokens(x, cls, pos)  # Eq. 9: (B*F, 1+N, d)
        mask = decoder_mask(1 + Hp * Wp, z_t.device) if c.masked else None
        for block in self.spatial:
            z_s = self._block(block, z_s, mask)  # Eq. 7
        z_s_L = self.norm_s(z_s)  # (B*F, 1+N, d)
        cls_s_L = z_s_L[:, 0].reshape(B, F, d)  # (B*F, d) -> (B, F, d)
        z_tmp = z_tmp_1 = temporal_input(cls_s_L, self.cls_t, self.D, self.pos_t[:, : 1 + F])  # Eq. 10: (B, 1+F, d)
        mask = (frame_mask(1 + F, z_t.device) if c.per_frame else decoder_mask(1 + F, z_t.device) if c.masked
                else None)
        for block in self.temporal:
            z_tmp = self._block(block, z_tmp, mask)  # Eq. 8
        z_tmp_M = self.norm_t(z_tmp)  # (B, 1+F, d)
        z_s_C = z_s_L[:, 1:].reshape(B, F, Hp * Wp, d)  # (B*F, 1+N, d) -> (B, F, N, d), class token removed
        cls_t_M, z_tmp_C = temporal_output(z_tmp_M)  # Eq. 11: (B, d), (B, F, d)
        if c.hyper:
            y = self.fusion(z_s_C, cls_t_M, z_tmp_C, (Hp, Wp))  # Eq. 14: y*, (B, F, N, d)
        else:
            y = hadamard_fusion(z_s_C, z_tmp_C)  # Eq. 12: (B, F, N, d)
        z_hat = self.head(y)  # Eq. 13 / Eq. 15: (B, F, N, C*P*P)
        phi = unpatchify(z_hat, P, C, H, W)  # (B, F, N, C*P*P) -> (B, C, F, H, W)
        if return_intermediates:
            return VGTIntermediates(z_s_0, z_s_L, z_tmp_1, z_tmp_M, y, z_hat, phi)
        return phi
