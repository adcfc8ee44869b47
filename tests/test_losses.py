"""Tests of apla/losses.py, apla/discriminator.py and apla/config.py: Eqs. 5, 6, 16-20 against hand values and
closed forms, the VGG perceptual features (seeded and loaded), and the per-step helpers' ablation switches."""

import math

import pytest
import torch
import torch.nn.functional as F_
from safetensors.torch import save_file

from apla import losses as L
from apla.config import ABLATIONS, APLAConfig
from apla.discriminator import (Discriminator, DiscriminatorConfig, discriminator_adversarial_loss,
                                generator_adversarial_loss)
from apla.vgt import perturbed_eps


def seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------- Eqs. 5-6, 16-18


def test_eq5_eq16_mse_and_l1_hand_values():
    eps = torch.tensor([1.0, -2.0, 3.0, 4.0])
    pred = torch.zeros(4)
    assert L.mse_loss(eps, pred).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert L.l1_loss(eps, pred).item() == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_eq6_perturbed_mse_hand_value():
    eps = torch.tensor([1.0, 1.0])
    pred = torch.tensor([0.5, 2.0])
    phi = torch.tensor([0.5, -0.5])  # eps* = [1.0, 1.5]
    assert L.perturbed_mse_loss(eps, perturbed_eps(pred, phi)).item() == pytest.approx((0 + 0.25) / 2)
    assert L.perturbed_mse_loss(eps, perturbed_eps(pred, torch.zeros(2))).item() == pytest.approx(
        L.mse_loss(eps, pred).item())


def test_eq18_hyper_loss_is_its_weighted_parts():
    feats = L.VGGFeatures()
    eps, eps_star = seeded(1, 4, 2, 8, 8, seed=1), seeded(1, 4, 2, 8, 8, seed=2)
    total, parts = L.hyper_loss(eps, eps_star, feats, alpha=0.7, beta=0.2, gamma=0.3)
    mse, l1, per = L.mse_loss(eps, eps_star), L.l1_loss(eps, eps_star), L.perceptual_loss(eps, eps_star, feats)
    assert L.perturbed_mse_loss(eps, eps_star).item() == mse.item()  # Eq. 18's L_MSE is Eq. 6
    assert parts["mse"].item() == pytest.approx(mse.item()) and parts["l1"].item() == pytest.approx(l1.item())
    assert parts["perceptual"].item() == pytest.approx(per.item(), rel=1e-6) and per.item() > 0
    assert total.item() == pytest.approx(0.7 * mse.item() + 0.2 * l1.item() + 0.3 * per.item(), rel=1e-6)
    total0, parts0 = L.hyper_loss(eps, eps_star, None, alpha=1.0, beta=1.0, gamma=0.0)
    assert total0.item() == pytest.approx(mse.item() + l1.item()) and parts0["perceptual"].item() == 0.0


def test_eq20_final_objective_hand_value():
    assert L.final_objective(torch.tensor(2.0), torch.tensor(-0.5), 0.1).item() == pytest.approx(1.95)


# --------------------------------------------------------------------------------------------- Eq. 17, VGG


def _reference_lpips(state: dict, a: torch.Tensor, b: torch.Tensor) -> float:
    """Written out in float64 with functional ops: VGG16 convs 0..14, taps relu1_2/2_2/3_3, unit weights."""
    def grey(x):
        B, C, F, H, W = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(-1, 1, H, W).repeat(1, 3, 1, 1).double()

    def taps(x):
        out = []
        for i in (0, 2, "M", 5, 7, "M", 10, 12, 14):
            if i == "M":
                x = F_.max_pool2d(x, 2)
                continue
            x = F_.relu(F_.conv2d(x, state[f"features.{i}.weight"].double(), state[f"features.{i}.bias"].double(),
                                  padding=1))
            if i in (2, 7, 14):
                out.append(x)
        return out

    total = 0.0
    for fa, fb in zip(taps(grey(a)), taps(grey(b))):
        fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        total += ((fa - fb) ** 2).sum(dim=1).mean().item()
    return total


def test_eq17_perceptual_closed_forms_and_reference():
    feats = L.VGGFeatures(seed=3)
    a, b = seeded(1, 4, 2, 8, 8, seed=4), seeded(1, 4, 2, 8, 8, seed=5)
    d = L.perceptual_loss(a, b, feats).item()
    assert d > 0
    assert L.perceptual_loss(a, a, feats).item() == 0.0
    assert L.perceptual_loss(b, a, feats).item() == pytest.approx(d, rel=1e-6)
    # zero biases + ReLU + max-pool are positively homogeneous, and the features are unit-normalised
    assert L.perceptual_loss(2.5 * a, a, feats).item() == pytest.approx(0.0, abs=1e-10)
    assert d == pytest.approx(_reference_lpips(feats.state_dict(), a, b), rel=1e-5)


def test_noise_to_images_layout():
    x = seeded(2, 4, 3, 5, 6)
    img = L.noise_to_images(x)
    assert img.shape == (2 * 3 * 4, 3, 5, 6)
    # batch 1, frame 2, channel 3 -> index (1*3 + 2)*4 + 3, all three RGB planes equal
    for rgb in range(3):
        assert torch.equal(img[(1 * 3 + 2) * 4 + 3, rgb], x[1, 3, 2])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vgg_loads_torchvision_layout(tmp_path, suffix):
    g = torch.Generator().manual_seed(7)
    shapes = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
              14: (256, 256), 17: (512, 256)}  # 17 lies beyond relu3_3: present in the file, not used
    state = {}
    for i, (o, c) in shapes.items():
        state[f"features.{i}.weight"] = 0.05 * torch.randn(o, c, 3, 3, generator=g)
        state[f"features.{i}.bias"] = 0.1 * torch.randn(o, generator=g)
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = str(tmp_path / f"vgg16{suffix}")
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    feats = L.VGGFeatures(weights=path)
    assert torch.equal(feats.features[12].weight, state["features.12.weight"])
    assert not any(p.requires_grad for p in feats.parameters())
    a, b = seeded(1, 4, 1, 8, 8, seed=8), seeded(1, 4, 1, 8, 8, seed=9)
    assert L.perceptual_loss(a, b, feats).item() == pytest.approx(_reference_lpips(state, a, b), rel=1e-5)
    del state["features.10.bias"]
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(L.WeightsError, match="features.10.bias"):
        L.VGGFeatures(weights=path)


def test_perceptual_passes_gradient_to_input_only():
    feats = L.VGGFeatures()
    a = seeded(1, 4, 1, 8, 8, seed=1).requires_grad_(True)
    L.perceptual_loss(seeded(1, 4, 1, 8, 8, seed=2), a, feats).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in feats.parameters())


# --------------------------------------------------------------------------------------------- D, Eq. 19, L_g


def test_discriminator_is_one_1x1_conv_over_frames_and_channels():
    D = Discriminator(DiscriminatorConfig(channels=4, num_frames=3))
    assert sum(p.numel() for p in D.parameters()) == 4 * 3 + 1
    x = seeded(2, 4, 3, 5, 5, dtype=torch.float32)
    w = D.conv.weight.reshape(4, 3)  # weight of (channel c, frame f) at index c*F + f
    ref = torch.einsum("bcfhw,cf->bhw", x, w)[:, None] + D.conv.bias
    assert torch.allclose(D(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match="num_frames"):
        D(seeded(1, 4, 2, 5, 5))


def test_eq19_hand_values():
    assert discriminator_adversarial_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))
    d_real = torch.tensor([0.3, -1.0], requires_grad=True)
    d_fake = torch.tensor([0.5, 2.0], requires_grad=True)
    loss = discriminator_adversarial_loss(d_real, d_fake)
    s = torch.sigmoid
    ref = -(torch.log(s(d_real)).mean() + torch.log(1 - s(d_fake)).mean())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert (d_real.grad < 0).all()  # descent raises D(real)
    assert (d_fake.grad > 0).all()  # descent lowers D(fake)


def test_eq19_one_sgd_step_on_D_separates_real_from_fake():
    D = Discriminator(DiscriminatorConfig(num_frames=2))
    real, fake = seeded(4, 4, 2, 6, 6, seed=1), 0.5 * seeded(4, 4, 2, 6, 6, seed=2) + 0.3
    before = (D(real).mean() - D(fake).mean()).item()
    discriminator_adversarial_loss(D(real), D(fake)).backward()
    with torch.no_grad():
        for p in D.parameters():
            p -= 0.1 * p.grad
    assert (D(real).mean() - D(fake).mean()).item() > before


@pytest.mark.parametrize("saturating", [True, False])
def test_generator_term_hand_value_and_pushes_D_fake_up(saturating):
    d_fake = torch.tensor([0.2, -0.7], requires_grad=True)
    l_g = generator_adversarial_loss(d_fake, saturating=saturating)
    s = torch.sigmoid(d_fake.detach())
    ref = torch.log(1 - s).mean() if saturating else -torch.log(s).mean()
    assert l_g.item() == pytest.approx(ref.item(), rel=1e-6)
    l_g.backward()
    assert (d_fake.grad < 0).all()  # the generator's descent raises D(fake)


# --------------------------------------------------------------------------------------------- config, helpers


def test_config_ablations_and_validation():
    assert APLAConfig().use_vgt and APLAConfig().use_discriminator and APLAConfig().use_hyper_loss
    c = APLAConfig.ablation("w/o vgt&hyper-loss")
    assert (c.use_vgt, c.use_discriminator, c.use_hyper_loss) == (False, True, False) and c.vgt == "none"
    for name, flags in ABLATIONS.items():
        c = APLAConfig.ablation(name, vgt="hyper")
        assert (c.use_vgt, c.use_discriminator, c.use_hyper_loss) == flags
    with pytest.raises(ValueError, match="vgt"):
        APLAConfig(vgt="big")
    with pytest.raises(ValueError, match="lam"):
        APLAConfig(lam=-1.0)


def _step_tensors():
    eps, eps_pred = seeded(1, 4, 2, 8, 8, seed=1), seeded(1, 4, 2, 8, 8, seed=2)
    phi = 0.01 * seeded(1, 4, 2, 8, 8, seed=3)
    return eps, eps_pred, phi
