"""The losses of APLA (Yao et al., AAAI 2024): the diffusion MSE, the hyper-loss and the final objective.

    Eq. (5)   L_MSE = E ||eps - eps_theta(z_t, t)||_2^2                       mse_loss
    Eq. (6)   L_MSE = E ||eps - eps*||_2^2, eps* = eps_theta + phi (Eq. 4)    perturbed_mse_loss
    Eq. (16)  L_L1  = E ||eps - eps*||_1                                      l1_loss
    Eq. (17)  L_per = E dist_per(eps, eps*)                                   perceptual_loss
    Eq. (18)  L_hyper = alpha L_MSE + beta L_L1 + gamma L_per                 hyper_loss
    Eq. (20)  min_theta (L_hyper + lambda L_g) + max_G L_g  (max over D)      final_objective

One training step combines them in `apla.algorithm.APLA.forward`. Expectations are means over all elements (as in
Tune-A-Video's F.mse_loss), computed in float32.

dist_per (Eq. 17) is not defined by the paper beyond its citation of Zhang et al. 2018 (LPIPS); we use the
LPIPS distance with unit layer weights: VGG16 features at relu1_2, relu2_2 and relu3_3, each unit-normalised
over channels, squared differences summed over channels, averaged over positions and summed over layers.
How a 4-channel latent noise reaches an RGB network (choice): every (frame, channel) slice is one grey image
replicated to 3 channels, (B, C, F, H, W) -> (B*F*C, 3, H, W); unit-variance noise is already on the scale of
ImageNet-normalised images, so no further normalisation.
"""

import os

import torch
import torch.nn as nn
from safetensors.torch import load_file

from apla.checkpoint import WeightsError

# torchvision's VGG16 `features`: channel widths, "M" = max-pool (indices of features.N follow from it)
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
LPIPS_TAPS = (3, 8, 15)  # features.N indices of relu1_2, relu2_2, relu3_3


class VGGFeatures(nn.Module):
    """A frozen VGG16 prefix (torchvision layout, up to the deepest tap) returning the tapped ReLU outputs.

    weights: a path to torchvision-layout VGG16 weights (keys `features.N.weight` / `features.N.bias`; a
    .safetensors file, or a .pth/.pt read with torch.load(weights_only=True)). Keys beyond the deepest tap (and
    `classifier.*`) are not used. None (default): a fixed initialisation, Kaiming-normal weights drawn from
    torch.Generator seeded with `seed`, zero biases -- a random but reproducible feature extractor, not the
    ImageNet-trained one. All parameters have requires_grad=False.
    """

    def __init__(self, weights: str | None = None, taps: tuple[int, ...] = LPIPS_TAPS, seed: int = 0):
        super().__init__()
        self.taps = tuple(sorted(taps))
        layers, in_ch = [], 3
        for v in VGG16_LAYOUT:
            if len(layers) > self.taps[-1]:
                break
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers[: self.taps[-1] + 1])
        if weights is None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for m in self.features:
                    if isinstance(m, nn.Conv2d):
                        fan_in = m.weight[0].numel()
                        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
                        m.bias.zero_()
        else:
            self.load_torchvision(weights)
        self.requires_grad_(False)
        self.eval()

    @property
    def min_side(self) -> int:
        """The least height and width an input may have: each max-pool halves it, and the last must leave 1."""
        return 2 ** sum(isinstance(m, nn.MaxPool2d) for m in self.features)

    def load_torchvision(self, path: str):
        """Copy `features.N.weight/bias` from a torchvision-layout VGG16 file; every needed key must be there."""
        if not os.path.isfile(path):
            raise WeightsError(f"perceptual weights file not found: {path}")
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.state_dict()
        for key, param in own.items():
            if key not in state:
                raise WeightsError(f"{path}: missing key {key!r} (expected torchvision VGG16 layout)")
            if tuple(state[key].shape) != tuple(param.shape):
                raise WeightsError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
        self.load_state_dict({k: state[k] for k in own}, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, 3, H, W) -> the tapped activations, one (N, C_l, H_l, W_l) tensor per tap."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def noise_to_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) noise -> (B*F*C, 3, H, W): each (frame, channel) slice as a grey RGB image."""
    B, C, F, H, W = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(B * F * C, 1, H, W)  # (B, C, F, H, W) -> (B*F*C, 1, H, W)
    return x.expand(-1, 3, -1, -1)  # (B*F*C, 1, H, W) -> (B*F*C, 3, H, W)


def perceptual_distance(features: VGGFeatures, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dist_per(a, b) of Eq. 17 on (B, C, F, H, W) tensors: LPIPS with unit layer weights (file header).

    a and b go through the network in separate passes: in training a is the true noise eps, which needs no gradient,
    so backward runs through b's half only (a single batch of both would carry gradients through both)."""

    def unit(f):  # unit norm over channels
        f = f.float()
        return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)

    dist = a.new_zeros((), dtype=torch.float32)
    for fa, fb in zip(features(noise_to_images(a)), features(noise_to_images(b))):
        # $$\sum_l \frac{1}{H_l W_l} \sum_{h,w} \| \hat f_l(a)_{hw} - \hat f_l(b)_{hw} \|_2^2$$
        dist = dist + (unit(fa) - unit(fb)).pow(2).sum(dim=1).mean()
    return dist


def mse_loss(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """Eq. (5): L_MSE = E ||eps - eps_theta(z_t, t)||_2^2 (mean over elements), the plain diffusion loss."""
    # $$\mathbb{E}\,\|\epsilon - \epsilon_\theta(z_t, t)\|_2^2$$
    return (eps.float() - eps_pred.float()).pow(2).mean()


def perturbed_mse_loss(eps: torch.Tensor, eps_star: torch.Tensor) -> torch.Tensor:
    """Eq. (6): L_MSE = E ||eps - eps*||_2^2, Eq. 5 on the perturbed prediction eps* = eps_theta + phi (Eq. 4,
    `apla.vgt.perturbed_eps`). It is the hyper-loss's MSE term (Eq. 18), and the whole loss of Table 3's "w/o
    Hyper-Loss" rows (beta = gamma = 0); without VGT, phi = 0 and it is Eq. 5."""
    # $$\mathbb{E}\,\|\epsilon - \epsilon_\theta(z_t^*, t)\|_2^2$$
    return mse_loss(eps, eps_star)


def l1_loss(eps: torch.Tensor, eps_star: torch.Tensor) -> torch.Tensor:
    """Eq. (16): L_L1 = E ||eps - eps*||_1 (mean absolute error over elements)."""
    # $$\mathbb{E}\,\|\epsilon - \epsilon_\theta(z_t^*, t)\|_1$$
    return (eps.float() - eps_star.float()).abs().mean()


def perceptual_loss(eps: torch.Tensor, eps_star: torch.Tensor, features: VGGFeatures) -> torch.Tensor:
    """Eq. (17): L_per = E dist_per(eps, eps*), with `perceptual_distance` (LPIPS, unit weights, VGG16)."""
    # $$\mathbb{E}\,\mathrm{dist}_{per}(\epsilon, \epsilon_\theta(z_t^*, t))$$
    return perceptual_distance(features, eps, eps_star)


def hyper_loss(
    eps: torch.Tensor,
    eps_star: torch.Tensor,
    features: VGGFeatures | None,
    alpha: float,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (18): L_hyper = alpha * L_MSE + beta * L_L1 + gamma * L_per, on eps* = eps_theta + phi; L_MSE is Eq. 6.

    Returns (L_hyper, {"mse", "l1", "perceptual"}). With gamma == 0 the perceptual term is skipped (and
    `features` may be None).
    """
    parts = {"mse": perturbed_mse_loss(eps, eps_star), "l1": l1_loss(eps, eps_star)}
    if gamma:
        if features is None:
            raise ValueError("hyper_loss: gamma > 0 needs a VGGFeatures instance (features=None given)")
        parts["perceptual"] = perceptual_loss(eps, eps_star, features)
    else:
        parts["perceptual"] = eps.new_zeros((), dtype=torch.float32)
    # $$\mathcal{L}_{hyper} = \alpha \mathcal{L}_{MSE} + \beta \mathcal{L}_{L1} + \gamma \mathcal{L}_{per}$$
    total = alpha * parts["mse"] + beta * parts["l1"] + gamma * parts["perceptual"]
    return total, parts


def final_objective(l_hyper: torch.Tensor, l_g: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. (20), the generator's side: L_hyper + lambda * L_g, minimised over theta (U-Net and VGT).

    The paper writes min_theta (L_hyper + lambda L_g) + max_G L_g. G, "the united block of U-Net and VGT", has the
    parameters theta, so a max over G would undo the min over theta; we read it as the max over D of Eq. 19's
    max_D min_G, D's own step on its own optimiser (`discriminator_adversarial_loss`, the negated objective).
    """
    # $$\mathcal{L}_{hyper} + \lambda L_g$$
    return l_hyper + lam * l_g
