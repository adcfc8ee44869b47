"""The 1x1-convolution discriminator of APLA (Yao et al., AAAI 2024), section "Adversarial Training with 1x1
Convolution", and its adversarial objective:

    Eq. (19)  max_D min_G E_{x~p(x)}[log D(x)] + E_{x~p_g}[log(1 - D(x))]     discriminator_adversarial_loss
    L_g       the generator's term of Eqs. 19-20                              generator_adversarial_loss

What D sees. Paper: "the generator predicts the t-th step noise residual, then the discriminator receives the
corresponding t-th step noise in the diffusion process". Real = eps, the noise added at step t (Eq. 1);
fake = eps* = eps_theta + phi (Eq. 4), the generator (U-Net and VGT together) output.

How frames take part (choice). Paper: "The proposed discriminator structure is streamlined, comprising only a
1x1 convolutional layer. This kernel comprehensively considers frame positional data, aiding temporal
similarity extraction." We fold frames into channels, (B, C, F, H, W) -> (B, C*F, H, W), and apply one 1x1
Conv2d(C*F -> 1): the kernel has one weight per (channel, frame) pair, so it weighs every frame at every
pixel. It outputs one logit per latent pixel, (B, 1, H, W); the losses average over them. D therefore needs a
fixed number of frames (`DiscriminatorConfig.num_frames`, 24 as in the paper).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_


@dataclass
class DiscriminatorConfig:
    channels: int = 4  # C: SD v1.5 latent channels
    num_frames: int = 24  # F: the paper samples 24 frames per clip
    init_std: float = 0.02  # std of the 1x1 kernel at initialisation
    init_seed: int = 0


class Discriminator(nn.Module):
    """D: one 1x1 convolution over frames-folded-into-channels. (B, C, F, H, W) noise -> (B, 1, H, W) logits."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        self.config = c = config or DiscriminatorConfig()
        self.conv = nn.Conv2d(c.channels * c.num_frames, 1, kernel_size=1)
        g = torch.Generator().manual_seed(c.init_seed)
        with torch.no_grad():
            self.conv.weight.normal_(0.0, c.init_std, generator=g)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.channels or x.shape[2] != c.num_frames:
            raise ValueError(
                f"Discriminator input must be (B, {c.channels}, {c.num_frames}, H, W) "
                f"(DiscriminatorConfig.channels/num_frames); got {tuple(x.shape)}"
            )
        B, C, F, H, W = x.shape
        x = x.reshape(B, C * F, H, W)  # (B, C, F, H, W) -> (B, C*F, H, W): frames become channels
        return self.conv(x)  # (B, 1, H, W) logits


def discriminator_adversarial_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Eq. (19), D's side: maximise E[log D(real)] + E[log(1 - D(fake))], returned as the loss to minimise,
    -(E[log sigmoid(d_real)] + E[log(1 - sigmoid(d_fake))]) = E[softplus(-d_real)] + E[softplus(d_fake)].

    d_real, d_fake: logits of D on the true noise eps and on eps* (detached by the caller). Means over all
    elements stand for the expectations.
    """
    # $$-\big(\mathbb{E}_{x\sim p(x)}[\log D(x)] + \mathbb{E}_{x\sim p_g}[\log(1 - D(x))]\big)$$
    return F_.softplus(-d_real).mean() + F_.softplus(d_fake).mean()


def generator_adversarial_loss(d_fake: torch.Tensor, saturating: bool = True) -> torch.Tensor:
    """L_g of Eqs. 19-20, the generator's adversarial term (to minimise, weighted by lambda in Eq. 20).

    The paper defines L_g = E_{x~p(x)}[log D(x)] + E_{x~p_g}[log(1 - D(x))] and minimises lambda * L_g over the
    generator's parameters theta (Eq. 20). The first expectation does not depend on theta and is left out, so
    the default (saturating=True, faithful) is E[log(1 - sigmoid(d_fake))] = -E[softplus(d_fake)].
    saturating=False gives the common non-saturating form E[-log sigmoid(d_fake)] = E[softplus(-d_fake)]
    (not in the paper; offered because the saturating form's gradient vanishes when D wins).
    """
    if saturating:
        # $$\mathbb{E}_{x\sim p_g}[\log(1 - D(x))]$$
        return -F_.softplus(d_fake).mean()
    # $$-\mathbb{E}_{x\sim p_g}[\log D(x)]$$
    return F_.softplus(-d_fake).mean()
