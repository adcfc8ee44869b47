"""The step of apla.algorithm.APLA equals the step train.py took before it (generator_loss + discriminator_loss in
apla.losses), on a tiny U-Net + VGT + D, CPU, float32: same loss terms, same weights after three steps."""
import copy

import pytest
import torch

from apla.algorithm import APLA
from apla.config import ABLATIONS, APLAConfig
from apla.losses import VGGFeatures, discriminator_loss, generator_loss
from apla.scheduler import make_alpha_bar, q_sample
from apla.unet import mark_trainable
from tests.test_objective import _models


def old_step(unet, vgt, disc, perceptual, cfg, opt_g, opt_d, gen_params, z0, context, t, eps, alpha_bar):
    """train.py's loop body before the refactor (float32, no scaler), verbatim in substance."""
    z_t = q_sample(z0, t, eps, alpha_bar)
    eps_pred = unet(z_t, t, context)
    phi = vgt(z_t, t) if vgt is not None else None
    total, terms = generator_loss(eps, eps_pred.float(), None if phi is None else phi.float(), disc, cfg, perceptual)
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(gen_params, 1.0)
    opt_g.step()
    if disc is not None:
        d_loss, d_terms = discriminator_loss(eps, eps_pred.float(), None if phi is None else phi.float(), disc, cfg)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        terms.update(d_terms)
    return terms


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_new_step_equals_old_step(row):
    cfg = APLAConfig.ablation(row)
    unet, vgt, disc = _models()
    mark_trainable(unet)
    vgt = vgt if cfg.use_vgt else None
    disc = disc if cfg.use_discriminator else None
    perceptual = VGGFeatures() if cfg.use_hyper_loss and cfg.gamma > 0 else None
    alpha_bar = make_alpha_bar()
    models_old = copy.deepcopy((unet, vgt, disc))
    u_old, v_old, d_old = models_old
    model = APLA(unet, vgt, disc, perceptual, cfg, alpha_bar)

    def optimisers(u, v, d):
        params = [p for p in u.parameters() if p.requires_grad] + (list(v.parameters()) if v is not None else [])
        return params, torch.optim.AdamW(params, lr=1e-3), torch.optim.AdamW(d.parameters(), lr=1e-3) if d else None

    gp_old, og_old, od_old = optimisers(u_old, v_old, d_old)
    _, opt_g, opt_d = optimisers(unet, vgt, disc)
    g = torch.Generator().manual_seed(3)
    context = torch.randn(1, 77, 32, generator=g)
    for _ in range(3):
        z0 = torch.randn(1, 4, 4, 8, 8, generator=g)
        eps = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        old = old_step(u_old, v_old, d_old, perceptual, cfg, og_old, od_old, gp_old, z0, context, t, eps, alpha_bar)
        new = model.train_step(z0, context, t, eps, opt_g, opt_d, max_grad_norm=1.0)
        for k, v in old.items():
            assert new[k].item() == pytest.approx(v, rel=1e-6, abs=1e-7), (row, k)
    for a, b in zip([u_old, v_old, d_old], [unet, vgt, disc]):
        if a is None:
            assert b is None
            continue
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{row}: {n}")
