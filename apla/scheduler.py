"""The diffusion process and the DDIM sampler, by hand.

Paper: APLA (Yao et al., AAAI 2024), built on DDPM (Ho et al. 2020) and DDIM (Song et al. 2020).

Implements
  Eq. (1)  z_t = phi(z_{t-1}, t-1)        the forward (noising) process      -> q_step, q_sample
  Eq. (2)  z_hat_{T-1} = pi(z_T, T)       one denoising step of the sampler  -> ddim_step
  Eq. (3)  z_hat_{t-1} = pi(z_hat_t, t)   the denoising recursion            -> ddim_sample
and the two tools APLA takes from Tune-A-Video: DDIM inversion of a clip (ddim_invert_step, ddim_invert)
and classifier-free guidance (Ho & Salimans 2022). A base model that predicts v instead of eps (SD 2.1) is read as
an eps-model through `eps_from_v`, so that every equation here and in APLA stays on eps. Also here, as the one place both networks read t from: the
sinusoidal timestep embedding (`timestep_embedding`) of the U-Net eps_theta(z_t, t) and of VGT phi(z_t, t).

Choice: the paper fixes no schedule ("The diffusion process and U-Net are represented by phi and pi respectively";
"During inference, we employ the DDIM sampler"), so the schedule is Stable Diffusion v1.5's, whose weights it tunes: "scaled_linear" betas from 0.00085 to 0.012 over T = 1000 steps,
DDIM timesteps spaced by T // n with offset 1 (50 steps: 981, 961, ..., 1), and the final step landing on
alpha_bar_0 (SD's `set_alpha_to_one = False`).

Notation (DDIM paper -> code): alpha_bar_t = alpha_bar[t] (DDIM writes it alpha_t), epsilon = eps,
epsilon_theta(z_t, t) = eps (the network's output passed in), x_0 = z0, sigma_t = sigma.
Every function takes latents of any shape -- in particular (B, C, F, H, W) -- and t as an int or a
per-sample (B,) tensor; it returns the input's dtype and device.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

Timestep = Union[int, torch.Tensor]

# SD v1.5's noise schedule (scheduler_config.json of runwayml/stable-diffusion-v1-5)
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
# What a base model's U-Net may predict (the `prediction_type` of its scheduler config): the noise eps (SD v1.x,
# SD 2.1-base) or v (SD 2.1), which eps_from_v turns into eps
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_alpha_bar(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END, schedule: str = "scaled_linear") -> torch.Tensor:
    """The table alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, as a float64 tensor of length T.

    "scaled_linear" (SD v1.x) spaces sqrt(beta) linearly; "linear" (DDPM) spaces beta linearly.
    """
    if schedule == "scaled_linear":
        # $\beta_t = \big(\sqrt{\beta_0} + \tfrac{t}{T-1}(\sqrt{\beta_{T-1}} - \sqrt{\beta_0})\big)^2$
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}: expected 'scaled_linear' or 'linear'")
    # $\bar\alpha_t = \prod_{s=0}^{t} (1 - \beta_s)$
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                   steps_offset: int = 1) -> torch.Tensor:
    """The DDIM sub-sequence of training timesteps, descending ("leading" spacing, as SD v1.5).

    50 steps of 1000 give 981, 961, ..., 21, 1.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_inference_steps}")
    step_ratio = num_train_timesteps // num_inference_steps
    return (torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long) * step_ratio) + steps_offset


def _gather(table: torch.Tensor, t: Timestep, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped to broadcast against `like` (B, ...): a scalar for an int t, (B, 1, ..., 1) for a tensor t.

    Negative timesteps mean "before the first step" and read table[0] (SD's set_alpha_to_one = False).
    """
    if isinstance(t, torch.Tensor) and t.ndim > 0:
        idx = t.to(device=table.device, dtype=torch.long).clamp(min=0)
        val = table[idx]
        val = val.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
    else:
        val = table[max(int(t), 0)]
    return val.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


def q_step(z_prev: torch.Tensor, t: Timestep, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. (1), one step: z_t = phi(z_{t-1}, t-1) = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps (DDPM Eq. 2).

    beta_t is recovered from the table as 1 - alpha_bar_t / alpha_bar_{t-1} (beta_0 = 1 - alpha_bar_0).
    Iterating it from z_0 gives the same distribution as q_sample's closed form.
    """
    a_t = _gather(alpha_bar, t, z_prev)
    # $\bar\alpha_{t-1}$, with $\bar\alpha_{-1} = 1$ (nothing added before the first step)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    a_prev = _gather(alpha_bar_prev, t, z_prev)
    # $\beta_t = 1 - \bar\alpha_t / \bar\alpha_{t-1}$
    beta_t = 1 - a_t / a_prev
    # $z_t = \sqrt{1-\beta_t}\, z_{t-1} + \sqrt{\beta_t}\,\epsilon$
    return (1 - beta_t).sqrt() * z_prev + beta_t.sqrt() * noise


def q_sample(z0: torch.Tensor, t: Timestep, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. (1) in closed form: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps (DDPM Eq. 4).

    This is the noising that training uses (Algorithm 1, "Compute z_{t+1} through Eq. 1").
    """
    a_t = _gather(alpha_bar, t, z0)
    # $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$
    return a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise


def predict_x0(eps: torch.Tensor, t: Timestep, z_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by a noise prediction: Eq. (1) solved for z_0 (DDIM Eq. 9)."""
    a_t = _gather(alpha_bar, t, z_t)
    # $\hat z_0 = \big(z_t - \sqrt{1-\bar\alpha_t}\,\epsilon_\theta\big) / \sqrt{\bar\alpha_t}$
    return (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def eps_from_v(v: torch.Tensor, t: Timestep, z_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The noise eps that a v-prediction implies at (z_t, t): eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) z_t.

    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0 (Salimans & Ho 2022, the target of SD 2.1) and Eq. (1)
    together give this line, so a v-model's output is an eps-prediction once the schedule is applied, and every
    APLA equation is used as the paper writes it, on eps: Eq. 4's eps* = eps_theta + phi, the hyper-loss of Eq. 18
    on eps*, D on eps (Eq. 19), DDIM sampling and inversion (its x_0 is then sqrt(alpha_bar_t) z_t -
    sqrt(1 - alpha_bar_t) v, diffusers' v-prediction step).

    Choice: a v-model is trained through the eps-loss on this eps. Since eps - eps_hat = sqrt(alpha_bar_t)
    (v - v_hat), the eps-MSE of Eq. 5 is the v-MSE weighted by alpha_bar_t; in terms of z_0 the eps-MSE weighs
    each t by SNR_t = alpha_bar_t / (1 - alpha_bar_t) and the v-MSE (Tune-A-Video's loss on a v-model) by
    SNR_t + 1. Both have the same minimiser at each t (the posterior mean of eps), so the model is pulled to the
    same point; the eps-loss puts less weight on the noisiest steps (alpha_bar_999 = 0.0047 of SD's schedule),
    exactly the weighting an eps-model such as SD v1.5 is tuned with in APLA. We keep it because the paper's
    losses are defined on the noise (L1, the perceptual term and D compare noise maps, which v is not), and one
    reading of them serves every base model.
    """
    a_t = _gather(alpha_bar, t, z_t)
    # $\epsilon = \sqrt{\bar\alpha_t}\, v + \sqrt{1-\bar\alpha_t}\, z_t$
    return a_t.sqrt() * v + (1 - a_t).sqrt() * z_t


def ddim_step(eps: torch.Tensor, t: Timestep, t_prev: Timestep, z_t: torch.Tensor, alpha_bar: torch.Tensor,
              eta: float = 0.0, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Eq. (2) / Eq. (3): one denoising step z_hat_{t_prev} = pi(z_hat_t, t) of DDIM (DDIM Eq. 12).

    `eps` is the (possibly guided, possibly VGT-perturbed, Eq. 4) noise prediction at (z_t, t).
    t_prev < 0 lands on alpha_bar_0. eta = 0 is deterministic DDIM; eta = 1 is DDPM-like ancestral sampling,
    which adds sigma_t * noise (noise drawn from `generator` when not given).
    """
    a_t = _gather(alpha_bar, t, z_t)
    a_prev = _gather(alpha_bar, t_prev, z_t)
    z0_pred = predict_x0(eps, t, z_t, alpha_bar)
    # $\sigma_t = \eta \sqrt{(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)}\,\sqrt{1-\bar\alpha_t/\bar\alpha_{t-1}}$
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt() if eta > 0 else torch.zeros_like(a_t)
    # $\sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\;\epsilon_\theta$  -- the "direction pointing to z_t"
    direction = (1 - a_prev - sigma ** 2).sqrt() * eps
    # $z_{t-1} = \sqrt{\bar\alpha_{t-1}}\,\hat z_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\epsilon_\theta + \sigma_t \epsilon$
    z_prev = a_prev.sqrt() * z0_pred + direction
    if eta > 0:
        if noise is None:
            noise = torch.randn(z_t.shape, generator=generator, dtype=z_t.dtype, device=z_t.device)
        z_prev = z_prev + sigma * noise
    return z_prev


def ddim_invert_step(eps: torch.Tensor, t: Timestep, t_next: Timestep, z_t: torch.Tensor,
                     alpha_bar: torch.Tensor) -> torch.Tensor:
    """One DDIM inversion step z_t -> z_{t_next} (t_next > t), the deterministic DDIM step run backwards.

    Tune-A-Video obtains the starting noise of a source clip this way: the noise prediction is taken at the
    *next* timestep's label and the ODE step is taken from alpha_bar_t up to alpha_bar_{t_next}.
    t < 0 stands for the clean latent (alpha_bar_0, as in sampling's final step).
    """
    a_t = _gather(alpha_bar, t, z_t)
    a_next = _gather(alpha_bar, t_next, z_t)
    # $\hat z_0 = (z_t - \sqrt{1-\bar\alpha_t}\,\epsilon_\theta)/\sqrt{\bar\alpha_t}$
    z0_pred = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    # $z_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat z_0 + \sqrt{1-\bar\alpha_{t'}}\,\epsilon_\theta$
    return a_next.sqrt() * z0_pred + (1 - a_next).sqrt() * eps


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_uncond + s (eps_cond - eps_uncond).

    scale = 1 returns eps_cond; scale = 0 returns eps_uncond.
    """
    # $\tilde\epsilon = \epsilon_\theta(z_t, \varnothing) + s\,(\epsilon_\theta(z_t, c) - \epsilon_\theta(z_t, \varnothing))$
    return eps_uncond + scale * (eps_cond - eps_uncond)


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _prev_timesteps(timesteps: torch.Tensor) -> list:
    """For a descending schedule [t_0, t_1, ...], the timestep each step lands on: [t_1, t_2, ..., -1]."""
    ts = [int(t) for t in timesteps]
    return ts[1:] + [-1]


def ddim_sample(eps_fn: EpsFn, z_T: torch.Tensor, timesteps: torch.Tensor, alpha_bar: torch.Tensor,
                eta: float = 0.0, generator: Optional[torch.Generator] = None,
                return_trajectory: bool = False, progress: bool = True):
    """Eq. (3): run the recursion z_hat_{t-1} = pi(z_hat_t, t) from z_hat_T down to z_hat_0 (DDIM sampling).

    eps_fn(z_t, t) returns the noise prediction (the caller folds in guidance and the VGT perturbation of
    Eq. 4). `timesteps` is descending, e.g. ddim_timesteps(50). Returns z_0, or (z_0, [z_T, ..., z_0]) when
    return_trajectory is set.
    """
    z = z_T
    trajectory = [z]
    for t, t_prev in tqdm(list(zip(timesteps.tolist(), _prev_timesteps(timesteps))), desc="DDIM sampling",
                          disable=not progress, leave=False):
        eps = eps_fn(z, torch.tensor(t, device=z.device))
        z = ddim_step(eps, t, t_prev, z, alpha_bar, eta=eta, generator=generator)
        trajectory.append(z)
    return (z, trajectory) if return_trajectory else z


def ddim_invert(eps_fn: EpsFn, z0: torch.Tensor, timesteps: torch.Tensor, alpha_bar: torch.Tensor,
                return_trajectory: bool = False, progress: bool = True):
    """DDIM inversion: walk the clean latent z_0 up the same (descending) `timesteps` that ddim_sample walks
    down, giving the z_T from which deterministic sampling with the same eps_fn returns to z_0.

    Returns z_T, or (z_T, [z_0, ..., z_T]) when return_trajectory is set.
    """
    z = z0
    trajectory = [z]
    ascending = list(reversed(_prev_timesteps(timesteps)))  # [-1, t_{n-1}, ..., t_1]: where each step starts
    targets = list(reversed(timesteps.tolist()))             # [t_{n-1}, ..., t_0]: where each step lands
    for t, t_next in tqdm(list(zip(ascending, targets)), desc="DDIM inversion", disable=not progress, leave=False):
        eps = eps_fn(z, torch.tensor(t_next, device=z.device))
        z = ddim_invert_step(eps, t, t_next, z, alpha_bar)
        trajectory.append(z)
    return (z, trajectory) if return_trajectory else z


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
    """Sinusoidal embedding of the timestep t (B,) -> (B, dim), float32 (Ho et al. 2020, Vaswani et al. 2017): how
    t enters both networks, the U-Net's eps_theta(z_t, t) (`apla.sd.unet`) and VGT's phi(z_t, t) (`apla.vgt`)."""
    half = dim // 2
    # $$\omega_k = 10000^{-k/(d/2 - s)}$$
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    omega = torch.exp(-math.log(10000.0) * k / (half - freq_shift))
    angle = t.float()[:, None] * omega[None, :]  # (B, half)
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)  # (B, dim)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # [cos, sin]
    return emb
