"""Algorithm 1 of APLA (Yao et al., AAAI 2024): one fine-tuning step, read top to bottom in `APLA.forward`.

    Eq. (1)   z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps                         q_sample
    Eq. (4)   eps* = eps_theta(z_t, t, c) + phi(z_t, t)                                      perturbed_eps
    Eq. (6)   L_MSE = E ||eps - eps*||_2^2                                                   perturbed_mse_loss
    Eq. (18)  L_hyper = alpha L_MSE + beta L_L1 + gamma L_per, on eps*  (Eq. 6 if beta = gamma = 0)  hyper_loss
    Eq. (20)  min_theta L_hyper + lambda L_g(D(eps*))                                        final_objective
    Eq. (19)  max_D E[log D(eps)] + E[log(1 - D(eps*))], eps* detached                       discriminator_adversarial_loss

`APLA` holds the generator (the U-Net eps_theta with its trainable set, and VGT phi) and the discriminator D, so
`train.py`'s loop is `model.train_step(...)` and a test or a notebook calls the very same step.

Table 3's ablations are values, not branches (`effective_weights`): without VGT phi = 0 (no VGT module), without
the hyper-loss beta = gamma = 0 (Eq. 18 becomes alpha * Eq. 6), without the discriminator lambda = 0 (no D).

eps_theta is the U-Net's output as eps (`APLA.eps_theta`): a base model that predicts v (SD 2.1) is turned into an
eps-model by the schedule there (apla.scheduler.eps_from_v, which argues the choice), so every equation above holds
unchanged for it.

Eq. 6 reads eps_theta(z*_t, t): we take it as the perturbed prediction eps* = eps_theta(z_t, t) + phi(z_t, t) of
Eq. 4, since Eq. 4 is where the paper defines the starred quantity ("we add the perturbation to the U-Net"); the
literal alternative, the U-Net evaluated on a perturbed input z*_t, is defined nowhere in the paper.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn

from apla.config import APLAConfig
from apla.discriminator import discriminator_adversarial_loss, generator_adversarial_loss
from apla.losses import final_objective, hyper_loss
from apla.scheduler import PREDICTION_TYPES, classifier_free_guidance, eps_from_v, q_sample
from apla.vgt import perturbation_ratio, perturbed_eps


class StepOutput(NamedTuple):
    """What one step computes: the two objectives (tensors with graphs) and the terms to log (0-d tensors)."""

    loss_g: torch.Tensor  # Eq. 20, minimised over theta (U-Net trainable set and VGT)
    loss_d: torch.Tensor | None  # Eq. 19 as a loss for D; None without D
    terms: dict  # name -> 0-d float32 tensor, detached: mse, l1, perceptual, hyper, adv_g, total, phi_ratio, ...
    eps_star: torch.Tensor  # Eq. 4, (B, C, F, h, w)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """A network's output in float32 at least: autocast's bf16/fp16 -> float32, float64 kept (the float64 tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def effective_weights(cfg: APLAConfig) -> dict:
    """The loss weights a run trains with, Table 3's ablations written as values: no hyper-loss -> beta = gamma = 0,
    no discriminator -> lambda = 0."""
    hyper, adversarial = cfg.use_hyper_loss, cfg.use_discriminator
    return {"alpha": cfg.alpha, "beta": cfg.beta if hyper else 0.0, "gamma": cfg.gamma if hyper else 0.0,
            "lam": cfg.lam if adversarial else 0.0}


class APLA(nn.Module):
    """The generator G = (U-Net eps_theta, VGT phi) and the discriminator D of Algorithm 1, and its step.

    unet: the inflated U-Net with its trainable set marked; vgt: a VGT, or None (phi = 0); disc: a Discriminator,
    or None (lambda = 0); perceptual: VGGFeatures for L_per (needed by forward when gamma > 0; sampling needs
    none); alpha_bar: (T,) the noise schedule of Eq. 1; prediction_type: what the U-Net predicts, "epsilon" or
    "v_prediction" (the base model's, apla.sd.weights.StableDiffusion.prediction_type).
    """

    def __init__(self, unet: nn.Module, vgt: nn.Module | None, disc: nn.Module | None, perceptual: nn.Module | None,
                 cfg: APLAConfig, alpha_bar: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"APLA: prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type
        self.unet, self.vgt, self.disc, self.perceptual = unet, vgt, disc, perceptual
        w = effective_weights(cfg)
        if w["lam"] > 0 and disc is None:
            raise ValueError("APLA: lambda > 0 needs a discriminator (disc=None given)")
        self.alpha, self.beta, self.gamma, self.lam = w["alpha"], w["beta"], w["gamma"], w["lam"]
        self.saturating = cfg.saturating
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def generator_parameters(self) -> list:
        """theta of Eq. 20: the U-Net's trainable set and all of VGT."""
        unet = [p for p in self.unet.parameters() if p.requires_grad]
        return unet + (list(self.vgt.parameters()) if self.vgt is not None else [])

    def enable_gradient_checkpointing(self, flag: bool = True) -> None:
        """Recompute the U-Net's ResNet blocks and spatial transformers and VGT's decoder blocks in backward instead
        of storing their activations (apla.sd.unet, apla.vgt)."""
        self.unet.enable_gradient_checkpointing(flag)
        if self.vgt is not None:
            self.vgt.enable_gradient_checkpointing(flag)

    def compile_networks(self) -> None:
        """torch.compile the U-Net's and VGT's forward in place (nn.Module.compile: parameter names, and so
        checkpoints, are unchanged). The first steps pay for the compilation; on a CPU it gained nothing
        (apla/bench/README.md)."""
        self.unet.compile()
        if self.vgt is not None:
            self.vgt.compile()

    def perturbation(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """phi(z_t, t) in float32 (float64 for a float64 VGT), or 0 for a run without VGT (Table 3's "w/o VGT")."""
        return upcast(self.vgt(z_t, t)) if self.vgt is not None else torch.zeros_like(z_t, dtype=torch.float32)

    def eps_theta(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """eps_theta(z_t, t, c) for z_t (B, C, F, h, w), t (B,), context (B, 77, D), in float32 (float64 for a
        float64 U-Net): the U-Net's output, or, for a v-model, the eps its v implies (eps_from_v). The one place the
        network's output becomes Eq. 4's eps_theta."""
        out = upcast(self.unet(z_t, t, context))
        return eps_from_v(out, t, z_t, self.alpha_bar) if self.prediction_type == "v_prediction" else out

    def forward(self, z0: torch.Tensor, context: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> StepOutput:
        """One step of Algorithm 1 on clean latents z0 (B, C, F, h, w), text states context (B, 77, D), timesteps
        t (B,) and noise eps ~ N(0, I) of z0's shape."""
        z_t = q_sample(z0, t, eps, self.alpha_bar)                                   # Eq. (1)
        eps_pred = self.eps_theta(z_t, t, context)                                   # eps_theta(z_t, t, c)
        phi = self.perturbation(z_t, t)                                              # phi(z_t, t)
        eps_star = perturbed_eps(eps_pred, phi)                                      # Eq. (4)
        l_hyper, parts = hyper_loss(eps, eps_star, self.perceptual, self.alpha, self.beta, self.gamma)  # Eq. (18)
        d_fake = self.disc(eps_star).float() if self.disc is not None else None      # D(eps*)
        l_g = generator_adversarial_loss(d_fake, self.saturating) if d_fake is not None else l_hyper.new_zeros(())
        loss_g = final_objective(l_hyper, l_g, self.lam)                             # Eq. (20)
        terms = {**parts, "hyper": l_hyper, "adv_g": l_g, "total": loss_g, "phi_ratio": perturbation_ratio(phi, eps_pred)}
        loss_d = None
        if self.disc is not None:
            d_real, d_fake_d = self.disc(eps).float(), self.disc(eps_star.detach()).float()
            loss_d = discriminator_adversarial_loss(d_real, d_fake_d)                # Eq. (19)
            terms.update(disc=loss_d, d_real=torch.sigmoid(d_real).mean(), d_fake=torch.sigmoid(d_fake_d).mean())
        return StepOutput(loss_g, loss_d, {k: v.detach().float() for k, v in terms.items()}, eps_star)

    def train_step(self, z0, context, t, eps, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None,
                   scaler: torch.amp.GradScaler | None = None, max_grad_norm: float = 0.0,
                   autocast=None, accumulation_steps: int = 1) -> dict:
        """forward, then theta's AdamW step on Eq. 20 (gradients clipped at max_grad_norm when > 0), then D's step
        on Eq. 19. Returns the logged terms as 0-d tensors (no host synchronisation here).

        Gradient accumulation: z0, t and eps hold `accumulation_steps` = k micro-batches along dim 0 (train.py: k
        draws of batch 1). Each runs forward and backward alone (the memory of one), with both losses divided by k,
        so that each optimiser steps once on the gradient of the mean of the k losses. D stays as it is for all k
        draws (their L_g and L_D see the same D) and steps after theta, as with one draw; L_g's backward reaches
        theta only, L_D's D only. The terms returned are the means over the k draws."""
        scaler = scaler or torch.amp.GradScaler(enabled=False)
        theta, k = self.generator_parameters(), accumulation_steps
        if k < 1 or z0.shape[0] % k:
            raise ValueError(f"accumulation_steps {k} does not divide the batch of {z0.shape[0]}")
        d_params = list(self.disc.parameters()) if self.disc is not None else []
        opt_g.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        draws = []
        for z0_i, t_i, eps_i in zip(z0.chunk(k), t.chunk(k), eps.chunk(k)):  # (k B, ...) -> k x (B, ...)
            with autocast or nullcontext():
                out = self(z0_i, context, t_i, eps_i)
            scaler.scale(out.loss_g / k).backward(inputs=theta)
            if out.loss_d is not None:
                scaler.scale(out.loss_d / k).backward(inputs=d_params)
            draws.append(out.terms)
        if max_grad_norm > 0:
            scaler.unscale_(opt_g)
            torch.nn.utils.clip_grad_norm_(theta, max_grad_norm)
        scaler.step(opt_g)
        if self.disc is not None:
            scaler.step(opt_d)
        scaler.update()
        return {name: torch.stack([terms[name] for terms in draws]).mean() for name in draws[0]}

    @torch.no_grad()
    def guided_eps(self, z_t: torch.Tensor, t, uncond: torch.Tensor, cond: torch.Tensor, scale: float,
                   use_vgt: bool = True) -> torch.Tensor:
        """Classifier-free guidance on eps*: eps*(z, "") + s (eps*(z, c) - eps*(z, "")).

        phi(z_t, t) does not see the text, so it cancels from the difference: the guided eps* equals the guided
        eps_theta plus phi once, and VGT runs once per step instead of twice.
        """
        t = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(z_t.shape[0])  # () or (1,) -> (B,)
        both = self.eps_theta(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        guided = classifier_free_guidance(*both.chunk(2), scale)  # (2B, ...) -> uncond, cond
        return perturbed_eps(guided, self.perturbation(z_t, t)) if use_vgt else guided

    @torch.no_grad()
    def eps_star(self, z_t: torch.Tensor, t, context: torch.Tensor, use_vgt: bool = True) -> torch.Tensor:
        """Eq. (4) at sampling time: eps_theta(z_t, t, c) + phi(z_t, t) (phi left out with use_vgt=False)."""
        t = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(z_t.shape[0])  # () or (1,) -> (B,)
        eps_pred = self.eps_theta(z_t, t, context)
        return perturbed_eps(eps_pred, self.perturbation(z_t, t)) if use_vgt else eps_pred
