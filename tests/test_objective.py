"""One optimisation step of the full objective (Eq. 20) on a tiny U-Net + VGT + D: every trainable part moves,
nothing frozen does; the ||phi|| / ||eps_theta|| ratio starts far below 1 with a real (tiny) U-Net."""
import torch

from apla.config import APLAConfig
from apla.discriminator import Discriminator, DiscriminatorConfig
from apla.losses import VGGFeatures, discriminator_loss, generator_loss
from apla.scheduler import make_alpha_bar, q_sample
from apla.unet import UNet3DConditionModel, UNetConfig, is_temporal_param, mark_trainable
from apla.vgt import VGT, VGTConfig, perturbation_ratio

TINY_UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                       norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
F = 4


def _models(variant="pure"):
    torch.manual_seed(0)
    unet = UNet3DConditionModel(TINY_UNET)
    with torch.no_grad():  # temporal output projections away from zero, so their gradients are not trivially tied
        for n, p in unet.named_parameters():
            if "attn_temp.to_out" in n:
                p.normal_(std=0.02)
    vgt = VGT(VGTConfig(variant=variant, width=32, spatial_depth=1, temporal_depth=1, heads=2, mlp_hidden=64,
                        sample_size=8, max_frames=F))
    disc = Discriminator(DiscriminatorConfig(channels=4, num_frames=F))
    return unet, vgt, disc


def _batch():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, F, 8, 8, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    t = torch.tensor([500])
    return q_sample(z0, t, eps, make_alpha_bar()), t, eps, torch.randn(1, 77, 32, generator=g)


def test_one_step_of_eq20_moves_trainable_parts_only():
    unet, vgt, disc = _models()
    n_train = mark_trainable(unet)
    assert 0 < n_train < sum(p.numel() for p in unet.parameters())
    cfg = APLAConfig()
    perceptual = VGGFeatures().requires_grad_(False)
    before = {f"unet.{n}": p.detach().clone() for n, p in unet.named_parameters()}
    before.update({f"vgt.{n}": p.detach().clone() for n, p in vgt.named_parameters()})
    before.update({f"disc.{n}": p.detach().clone() for n, p in disc.named_parameters()})
    vgg_before = [p.detach().clone() for p in perceptual.parameters()]

    opt_g = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad] + list(vgt.parameters()), lr=1e-3)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    z_t, t, eps, context = _batch()
    eps_pred = unet(z_t, t, context)
    phi = vgt(z_t, t)
    total, terms = generator_loss(eps, eps_pred, phi, disc, cfg, perceptual)
    assert {"mse", "l1", "perceptual", "adv_g", "total"} <= set(terms)
    opt_g.zero_grad()
    total.backward()
    opt_g.step()
    d_loss, _ = discriminator_loss(eps, eps_pred.detach(), phi.detach(), disc, cfg)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()

    trainable = {f"unet.{n}" for n, p in unet.named_parameters() if p.requires_grad}
    after = {f"unet.{n}": p for n, p in unet.named_parameters()}
    after.update({f"vgt.{n}": p for n, p in vgt.named_parameters()})
    after.update({f"disc.{n}": p for n, p in disc.named_parameters()})
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = {k for k in before if k.startswith("unet.") and k not in trainable}
    assert not moved & frozen, sorted(moved & frozen)[:5]
    assert trainable <= moved, sorted(trainable - moved)[:5]
    assert {k for k in before if k.startswith("vgt.")} <= moved
    assert {k for k in before if k.startswith("disc.")} <= moved
    assert all(torch.equal(a, b) for a, b in zip(vgg_before, perceptual.parameters()))
    # the frozen set is everything SD ships: the temporal layers are all trainable
    assert all(k in trainable for k in before if k.startswith("unet.") and is_temporal_param(k[5:]))


def test_phi_ratio_small_at_init_with_a_tiny_unet():
    for variant in ("pure", "hyper", "pure-en", "hyper-en"):
        unet, vgt, _ = _models(variant)
        z_t, t, _, context = _batch()
        with torch.no_grad():
            ratio = perturbation_ratio(vgt(z_t, t), unet(z_t, t, context)).item()
        assert ratio < 1e-2, (variant, ratio)
