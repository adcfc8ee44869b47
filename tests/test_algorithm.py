"""Algorithm 1's step, apla.algorithm.APLA: equal to the step train.py took before it existed (recorded values),
Eq. 20 and Eq. 19 on real tensors, ablations as values, only what trains moves, phi small at initialisation; a
v-prediction base model trains and samples as the eps-model it is converted from."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F_
from torch import nn

from apla.algorithm import APLA, effective_weights
from apla.config import ABLATIONS, DEFAULT_TRAINABLE, APLAConfig
from apla.discriminator import Discriminator, DiscriminatorConfig, discriminator_adversarial_loss
from apla.losses import VGGFeatures, hyper_loss, mse_loss, perturbed_mse_loss
from apla.scheduler import ddim_invert, ddim_sample, ddim_timesteps, make_alpha_bar, q_sample
from apla.sd.unet import UNet3DConditionModel, UNetConfig, is_temporal_param, mark_trainable
from apla.vgt import VGT, VGTConfig, perturbation_ratio

TINY_UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                       norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
F = 4
REFERENCE = Path(__file__).parent / "data" / "step_reference.json"


def _models(variant="pure"):
    torch.manual_seed(0)
    unet = UNet3DConditionModel(TINY_UNET)
    with torch.no_grad():  # temporal output projections away from zero, so their gradients are not trivially tied
        for n, p in unet.named_parameters():
            if "attn_temp.to_out" in n:
                p.normal_(std=0.02)
    vgt = VGT(VGTConfig(variant=variant, width=32, spatial_depth=1, temporal_depth=1, heads=2, mlp_hidden=64,
                        sample_size=8, max_frames=F, init_seed=0))
    disc = Discriminator(DiscriminatorConfig(channels=4, num_frames=F, init_seed=0))
    return unet, vgt, disc


def _model(row="full", **overrides):
    cfg = APLAConfig.ablation(row, **overrides)
    unet, vgt, disc = _models()
    mark_trainable(unet, DEFAULT_TRAINABLE)
    w = effective_weights(cfg)
    return APLA(unet, vgt if cfg.use_vgt else None, disc if cfg.use_discriminator else None,
                VGGFeatures(seed=0) if w["gamma"] > 0 else None, cfg, make_alpha_bar())


def _optimisers(model):
    """Plain SGD: its update is lr * gradient, so weights recorded on one CPU are reproduced on another to rounding.
    (AdamW's first update is lr * g / (|g| + eps): for a gradient element near eps, a last-bit difference between
    two CPUs' kernels moves the weight by a sizeable fraction of lr.)"""
    opt_d = torch.optim.SGD(model.disc.parameters(), lr=0.05) if model.disc is not None else None
    return torch.optim.SGD(model.generator_parameters(), lr=0.05), opt_d


def _batch(g):
    z0 = torch.randn(1, 4, F, 8, 8, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    return z0, torch.randint(0, 1000, (1,), generator=g), eps


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_step_equals_the_recorded_step_of_the_earlier_train_py(row):
    """tests/data/step_reference.json holds the loss terms of three steps and the trainable weights after them, as
    train.py computed them (generator_loss + discriminator_loss, float32, CPU, SGD with lr 0.05) before
    APLA.train_step replaced them (the code of commit 0bf378b, where both steps also ran side by side)."""
    ref = json.loads(REFERENCE.read_text())[row]
    model = _model(row)
    opt_g, opt_d = _optimisers(model)
    g = torch.Generator().manual_seed(3)
    context = torch.randn(1, 77, 32, generator=g)
    for want in ref["terms"]:
        z0, t, eps = _batch(g)
        got = model.train_step(z0, context, t, eps, opt_g, opt_d, max_grad_norm=1.0)
        for k, v in want.items():
            assert got[k].item() == pytest.approx(v, rel=1e-4, abs=1e-6), (row, k)
    params = {f"{prefix}.{n}": p for prefix in ("unet", "vgt", "disc") if getattr(model, prefix) is not None
              for n, p in getattr(model, prefix).named_parameters() if p.requires_grad}
    assert set(params) == set(ref["weights"])
    for k, (total, squares) in ref["weights"].items():
        assert params[k].double().sum().item() == pytest.approx(total, rel=1e-4, abs=1e-5), k
        assert params[k].double().pow(2).sum().item() == pytest.approx(squares, rel=1e-4, abs=1e-6), k


def test_forward_is_eq20_and_eq19_on_the_same_eps_star():
    model = _model("full", beta=0.5, gamma=0.2, lam=0.3)
    g = torch.Generator().manual_seed(1)
    z0, t, eps = _batch(g)
    context = torch.randn(1, 77, 32, generator=g)
    out = model(z0, context, t, eps)
    z_t = q_sample(z0, t, eps, model.alpha_bar)
    eps_pred, phi = model.unet(z_t, t, context), model.vgt(z_t, t)
    eps_star = eps_pred + phi
    torch.testing.assert_close(out.eps_star, eps_star)
    hyper, _ = hyper_loss(eps, eps_star, model.perceptual, 1.0, 0.5, 0.2)
    l_g = -F_.softplus(model.disc(eps_star)).mean()                       # E[log(1 - D(eps*))]
    assert out.loss_g.item() == pytest.approx(hyper.item() + 0.3 * l_g.item(), rel=1e-6)
    assert out.loss_d.item() == pytest.approx(discriminator_adversarial_loss(model.disc(eps), model.disc(eps_star)).item(),
                                              rel=1e-6)
    assert out.terms["phi_ratio"].item() == pytest.approx((phi.norm() / eps_pred.norm()).item(), rel=1e-5)
    # D's loss reaches D only: eps* is detached for it
    out.loss_d.backward()
    assert all(p.grad is None for p in model.generator_parameters())
    assert model.disc.conv.weight.grad is not None


def test_ablations_are_values():
    assert effective_weights(APLAConfig.ablation("w/o hyper-loss&discriminator")) == {
        "alpha": 1.0, "beta": 0.0, "gamma": 0.0, "lam": 0.0}
    g = torch.Generator().manual_seed(2)
    z0, t, eps = _batch(g)
    context = torch.randn(1, 77, 32, generator=g)
    # no VGT, no hyper-loss: plain Eq. 5 on the U-Net alone (phi = 0), no D
    model = _model("w/o vgt&hyper-loss", lam=0.0)
    assert model.vgt is None and model.perceptual is None
    out = model(z0, context, t, eps)
    eps_pred = model.unet(q_sample(z0, t, eps, model.alpha_bar), t, context)
    assert out.loss_g.item() == pytest.approx(mse_loss(eps, eps_pred).item(), rel=1e-6)
    assert out.terms["phi_ratio"].item() == 0.0
    # VGT, no hyper-loss: Eq. 6 on eps* = eps_theta + phi, no D
    model = _model("w/o hyper-loss&discriminator")
    out = model(z0, context, t, eps)
    z_t = q_sample(z0, t, eps, model.alpha_bar)
    eps_star = model.unet(z_t, t, context) + model.vgt(z_t, t)
    assert out.loss_g.item() == pytest.approx(perturbed_mse_loss(eps, eps_star).item(), rel=1e-6)
    with pytest.raises(ValueError, match="lambda > 0 needs a discriminator"):
        APLA(model.unet, None, None, None, APLAConfig(vgt="none"), make_alpha_bar())


def test_one_step_moves_trainable_parts_only():
    model = _model("full")
    assert 0 < sum(p.numel() for p in model.unet.parameters() if p.requires_grad) < \
        sum(p.numel() for p in model.unet.parameters())
    named = {f"{prefix}.{n}": p for prefix in ("unet", "vgt", "disc", "perceptual")
             for n, p in getattr(model, prefix).named_parameters()}
    before = {k: p.detach().clone() for k, p in named.items()}
    # Adam without weight decay: a parameter moves exactly when its gradient is not zero, however small
    opt_g = torch.optim.AdamW(model.generator_parameters(), lr=1e-3, weight_decay=0.0)
    opt_d = torch.optim.AdamW(model.disc.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    z0, t, eps = _batch(g)
    model.train_step(z0, torch.randn(1, 77, 32, generator=g), t, eps, opt_g, opt_d)
    moved = {k for k in before if not torch.equal(before[k], named[k])}
    trainable = {f"unet.{n}" for n, p in model.unet.named_parameters() if p.requires_grad}
    frozen = {k for k in before if k.startswith(("unet.", "perceptual.")) and k not in trainable}
    assert not moved & frozen, sorted(moved & frozen)[:5]
    assert trainable <= moved, sorted(trainable - moved)[:5]
    # VGT-Pure never reads the temporal class token: Eq. 11's z_cls,t^M feeds only VGT-Hyper's Eq. 14, and the
    # decoder mask keeps the other tokens from attending to it, so its gradient is exactly zero
    assert torch.count_nonzero(model.vgt.cls_t.grad) == 0
    assert {k for k in before if k.startswith(("vgt.", "disc."))} - {"vgt.cls_t"} <= moved
    # the frozen set is everything SD ships: the temporal layers are all trainable
    assert all(k in trainable for k in before if k.startswith("unet.") and is_temporal_param(k[5:]))


def test_phi_ratio_small_at_init_with_a_tiny_unet():
    g = torch.Generator().manual_seed(1)
    z0, t, eps = _batch(g)
    context = torch.randn(1, 77, 32, generator=g)
    for variant in ("pure", "hyper", "pure-en", "hyper-en"):
        unet, vgt, _ = _models(variant)
        with torch.no_grad():
            z_t = q_sample(z0, t, eps, make_alpha_bar())
            ratio = perturbation_ratio(vgt(z_t, t), unet(z_t, t, context)).item()
        assert ratio < 1e-2, (variant, ratio)


def test_guidance_adds_phi_once():
    """phi(z_t, t) does not see the text, so it cancels from the guidance difference: guided eps* = guided
    eps_theta + phi."""
    model = _model("full").eval()
    g = torch.Generator().manual_seed(4)
    z_t = torch.randn(1, 4, F, 8, 8, generator=g)
    uncond, cond = torch.randn(2, 1, 77, 32, generator=g)
    t = torch.tensor([321])
    e_u, e_c = model.eps_star(z_t, t, uncond), model.eps_star(z_t, t, cond)
    guided = e_u + 7.5 * (e_c - e_u)                                   # |guided| ~ 10: float32 rounding ~ 1e-5
    torch.testing.assert_close(model.guided_eps(z_t, t, uncond, cond, 7.5), guided, rtol=1e-5, atol=1e-4)
    assert (model.guided_eps(z_t, t, uncond, cond, 7.5) - model.guided_eps(z_t, t, uncond, cond, 7.5, use_vgt=False)
            - model.perturbation(z_t, t)).abs().max() < 1e-5


def test_an_accumulated_step_is_the_mean_of_its_draws():
    """train_step over k = 2 micro-batches moves theta and D as one SGD step on the mean of the two draws' gradients
    (theta's of Eq. 20, D's of Eq. 19 only, both at the weights before the step), and returns the terms' means."""
    model = _model("full")
    g = torch.Generator().manual_seed(5)
    draws = [_batch(g) for _ in range(2)]
    context = torch.randn(1, 77, 32, generator=g)
    theta, d_params = model.generator_parameters(), list(model.disc.parameters())
    grads, terms = [], []
    for z0, t, eps in draws:  # each draw alone, at the starting weights
        out = model(z0, context, t, eps)
        grads.append((torch.autograd.grad(out.loss_g, theta), torch.autograd.grad(out.loss_d, d_params)))
        terms.append(out.terms)
    before = [p.detach().clone() for p in theta + d_params]
    opt_g, opt_d = _optimisers(model)
    z0, t, eps = (torch.cat(parts) for parts in zip(*draws))  # (2, ...): the two draws along dim 0
    got = model.train_step(z0, context, t, eps, opt_g, opt_d, accumulation_steps=2)
    mean = [(a + b) / 2 for a, b in zip(grads[0][0] + grads[0][1], grads[1][0] + grads[1][1])]
    for p, p0, grad in zip(theta + d_params, before, mean):
        torch.testing.assert_close(p.detach(), p0 - 0.05 * grad, rtol=1e-5, atol=1e-7)
    for name, value in got.items():
        assert value.item() == pytest.approx((terms[0][name].item() + terms[1][name].item()) / 2, rel=1e-5), name
    with pytest.raises(ValueError, match="does not divide"):
        model.train_step(z0, context, t, eps, opt_g, opt_d, accumulation_steps=3)


class VFromEps(nn.Module):
    """An eps-network's output rewritten as v = (eps - sqrt(1 - alpha_bar_t) z_t) / sqrt(alpha_bar_t), from v's
    definition (v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0 with Eq. 1), not from apla.scheduler: the
    v-model that this eps-model is."""

    def __init__(self, unet, alpha_bar):
        super().__init__()
        self.inner, self.alpha_bar = unet, alpha_bar

    def forward(self, z_t, t, context):
        a = self.alpha_bar[t].to(z_t.dtype).reshape(-1, 1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1, 1)
        return (self.inner(z_t, t, context) - (1 - a).sqrt() * z_t) / a.sqrt()


def _eps_and_v_models(dtype=torch.float32):
    """The same networks twice: an eps-model, and the v-model its U-Net's output wrapped as v makes."""
    cfg = APLAConfig(gamma=0.0)
    unet, vgt, disc = (m.to(dtype) for m in _models())
    mark_trainable(unet, DEFAULT_TRAINABLE)
    alpha_bar = make_alpha_bar()
    return (APLA(unet, vgt, disc, None, cfg, alpha_bar),
            APLA(VFromEps(unet, alpha_bar), vgt, disc, None, cfg, alpha_bar, prediction_type="v_prediction"))


def test_a_v_model_trains_as_the_eps_model_it_is_converted_from():
    eps_model, v_model = _eps_and_v_models()
    g = torch.Generator().manual_seed(5)
    z0, t, eps = _batch(g)
    context = torch.randn(1, 77, 32, generator=g)
    steps = []
    for model in (eps_model, v_model):
        model.zero_grad()
        out = model(z0, context, t, eps)
        out.loss_g.backward()
        steps.append((out, {n: p.grad.clone() for n, p in eps_model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = steps
    torch.testing.assert_close(b.eps_star, a.eps_star, rtol=1e-5, atol=1e-5)
    for k in a.terms:
        assert b.terms[k].item() == pytest.approx(a.terms[k].item(), rel=1e-5, abs=1e-7), k
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("unet.") for k in grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        APLA(eps_model.unet, None, None, None, APLAConfig(vgt="none", lam=0.0), make_alpha_bar(), "sample")


def test_a_v_model_and_its_eps_model_give_the_same_ddim_trajectories_float64():
    """DDIM inversion with the empty prompt, then guided DDIM sampling, both on eps* (sample.py's recipe), are the
    same walk for the v-model as for the eps-model: the v-prediction is read as eps where the U-Net's output
    becomes eps_theta, and from there every step is on eps."""
    eps_model, v_model = (m.eval() for m in _eps_and_v_models(torch.float64))
    g = torch.Generator().manual_seed(6)
    z0 = torch.randn(1, 4, F, 8, 8, generator=g, dtype=torch.float64)
    uncond, cond = torch.randn(2, 1, 77, 32, generator=g, dtype=torch.float64)
    timesteps = ddim_timesteps(10)
    walks = []
    for model in (eps_model, v_model):
        z_T, up = ddim_invert(lambda z, t: model.eps_star(z, t, uncond), z0, timesteps, model.alpha_bar,
                              return_trajectory=True, progress=False)
        _, down = ddim_sample(lambda z, t: model.guided_eps(z, t, uncond, cond, 7.5), z_T, timesteps,
                              model.alpha_bar, return_trajectory=True, progress=False)
        walks.append(torch.stack(up + down))  # (2 * 11, 1, 4, F, 8, 8)
    assert walks[0].dtype == torch.float64 and walks[0][-1].abs().max() > 0.1
    torch.testing.assert_close(walks[1], walks[0], rtol=0, atol=1e-10)
