"""The diffusion process and DDIM (Eqs. 1-3): parity with diffusers' DDIMScheduler in float64 and closed forms;
the timestep embedding both networks share."""
import math

import pytest
import torch

from apla import scheduler as S


def sd15_ddim(num_inference_steps=50, prediction_type="epsilon"):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, prediction_type=prediction_type)
    sched.set_timesteps(num_inference_steps)
    return sched


def test_alpha_bar_and_timesteps_match_diffusers():
    ref = sd15_ddim(50)
    alpha_bar = S.make_alpha_bar()
    assert alpha_bar.dtype == torch.float64 and alpha_bar.shape == (1000,)
    # diffusers builds its table in float32: agreement to float32 precision
    torch.testing.assert_close(alpha_bar, ref.alphas_cumprod.double(), rtol=1e-6, atol=1e-7)
    ts = S.ddim_timesteps(50)
    assert ts.tolist() == ref.timesteps.tolist()
    assert ts[:3].tolist() == [981, 961, 941] and ts[-1].item() == 1
    for n in (1, 10, 25, 999):
        assert S.ddim_timesteps(n).tolist() == sd15_ddim(n).timesteps.tolist()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers_float64(eta):
    ref = sd15_ddim(50)
    alpha_bar = S.make_alpha_bar()
    # run diffusers on our float64 table so the comparison is about the step itself
    ref.alphas_cumprod = alpha_bar.clone()
    ref.final_alpha_cumprod = alpha_bar[0].clone()
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 3, 8, 8)  # (B, C, F, H, W)
    for t in ref.timesteps.tolist():
        z_t = torch.randn(shape, generator=g, dtype=torch.float64)
        eps = torch.randn(shape, generator=g, dtype=torch.float64)
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        expected = ref.step(eps, t, z_t, eta=eta, variance_noise=noise).prev_sample
        t_prev = t - 1000 // 50
        got = S.ddim_step(eps, t, t_prev, z_t, alpha_bar, eta=eta, noise=noise)
        assert got.dtype == torch.float64
        assert (got - expected).abs().max().item() < 1e-10, t


def test_per_sample_timesteps_and_dtype_device():
    alpha_bar = S.make_alpha_bar()
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(3, 4, 2, 4, 4, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    t = torch.tensor([999, 500, 0])
    z_t = S.q_sample(z0, t, eps, alpha_bar)
    assert z_t.dtype == torch.float32 and z_t.shape == z0.shape
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(z_t[i], S.q_sample(z0[i:i + 1], ti, eps[i:i + 1], alpha_bar)[0])
    # per-sample DDIM step, including a sample that lands on alpha_bar_0 (t_prev < 0)
    t_prev = torch.tensor([979, 480, -20])
    out = S.ddim_step(eps, t, t_prev, z_t, alpha_bar)
    for i in range(3):
        torch.testing.assert_close(out[i], S.ddim_step(eps[i:i + 1], int(t[i]), int(t_prev[i]), z_t[i:i + 1],
                                                       alpha_bar)[0])
    assert S.ddim_step(eps.half(), 500, 480, z_t.half(), alpha_bar).dtype == torch.float16


def test_predict_x0_inverts_q_sample():
    alpha_bar = S.make_alpha_bar()
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(1, 4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    for t in (0, 1, 500, 999):
        z_t = S.q_sample(z0, t, eps, alpha_bar)
        assert (S.predict_x0(eps, t, z_t, alpha_bar) - z0).abs().max() < 1e-10


def test_invert_then_sample_returns_start():
    """With a noise predictor that ignores its input, inversion and sampling are exact inverses."""
    alpha_bar = S.make_alpha_bar()
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 4, 4, 8, 8, generator=g, dtype=torch.float64)
    table = {int(t): torch.randn(z0.shape, generator=g, dtype=torch.float64) for t in range(1000)}

    def eps_fn(z, t):  # ignores z; depends on t only
        return table[int(t)]

    ts = S.ddim_timesteps(50)
    z_T, traj_inv = S.ddim_invert(eps_fn, z0, ts, alpha_bar, return_trajectory=True, progress=False)
    assert len(traj_inv) == 51 and not torch.allclose(z_T, z0)
    z0_back, traj = S.ddim_sample(eps_fn, z_T, ts, alpha_bar, return_trajectory=True, progress=False)
    assert len(traj) == 51
    assert (z0_back - z0).abs().max().item() < 1e-10
    # every intermediate latent is revisited
    for a, b in zip(traj_inv, reversed(traj)):
        assert (a - b).abs().max().item() < 1e-10


def test_ddim_sample_matches_diffusers_loop():
    ref = sd15_ddim(10)
    alpha_bar = S.make_alpha_bar()
    ref.alphas_cumprod = alpha_bar.clone()
    ref.final_alpha_cumprod = alpha_bar[0].clone()
    z_T = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def eps_fn(z, t):  # a simple input-dependent predictor
        return 0.3 * z + 0.001 * float(t)

    ours = S.ddim_sample(eps_fn, z_T, S.ddim_timesteps(10), alpha_bar, progress=False)
    z = z_T
    for t in ref.timesteps:
        z = ref.step(eps_fn(z, t), t, z).prev_sample
    assert (ours - z).abs().max().item() < 1e-10


def test_eps_from_v_inverts_diffusers_v_target_and_its_mse_is_the_v_mse_weighted_by_alpha_bar():
    ref = sd15_ddim(10, "v_prediction")
    alpha_bar = S.make_alpha_bar()
    ref.alphas_cumprod = alpha_bar.clone()
    g = torch.Generator().manual_seed(8)
    z0, eps = (torch.randn(3, 4, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 500, 999])
    z_t = S.q_sample(z0, t, eps, alpha_bar)
    v = ref.get_velocity(z0, eps, t)  # sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z0
    torch.testing.assert_close(S.eps_from_v(v, t, z_t, alpha_bar), eps, rtol=0, atol=1e-12)
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)  # a model's imperfect v
    eps_mse = (S.eps_from_v(v_hat, t, z_t, alpha_bar) - eps).pow(2).mean(dim=(1, 2, 3, 4))
    v_mse = (v_hat - v).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(eps_mse, alpha_bar[t] * v_mse, rtol=1e-12, atol=0)


def test_ddim_on_eps_from_v_is_diffusers_v_prediction_loop():
    ref = sd15_ddim(10, "v_prediction")
    alpha_bar = S.make_alpha_bar()
    ref.alphas_cumprod = alpha_bar.clone()
    ref.final_alpha_cumprod = alpha_bar[0].clone()
    z_T = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def v_fn(z, t):  # a simple input-dependent v-predictor
        return 0.3 * z - 0.0005 * float(t)

    ours = S.ddim_sample(lambda z, t: S.eps_from_v(v_fn(z, t), t, z, alpha_bar), z_T, S.ddim_timesteps(10),
                         alpha_bar, progress=False)
    z = z_T
    for t in ref.timesteps:
        z = ref.step(v_fn(z, t), t, z).prev_sample
    assert (ours - z).abs().max().item() < 1e-10


def test_q_sample_variance_closed_form():
    alpha_bar = S.make_alpha_bar()
    g = torch.Generator().manual_seed(5)
    n = 100_000
    for t in (10, 250, 999):
        z_t = S.q_sample(torch.zeros(n, dtype=torch.float64), t, torch.randn(n, generator=g, dtype=torch.float64),
                         alpha_bar)
        assert abs(z_t.var().item() / (1 - alpha_bar[t].item()) - 1) < 0.02


def test_one_step_and_closed_form_agree_in_distribution():
    """Iterating Eq. (1) one step at a time from a fixed z_0 gives mean sqrt(alpha_bar_t) z_0 and variance
    1 - alpha_bar_t, as the closed form does."""
    alpha_bar = S.make_alpha_bar()
    g = torch.Generator().manual_seed(6)
    n, t_end = 100_000, 200
    z0 = torch.full((n,), 0.7, dtype=torch.float64)
    z = z0
    for t in range(t_end + 1):
        z = S.q_step(z, t, torch.randn(n, generator=g, dtype=torch.float64), alpha_bar)
    closed = S.q_sample(z0, t_end, torch.randn(n, generator=g, dtype=torch.float64), alpha_bar)
    a = alpha_bar[t_end].item()
    for sample in (z, closed):
        assert abs(sample.mean().item() - a ** 0.5 * 0.7) < 0.01
        assert abs(sample.var().item() / (1 - a) - 1) < 0.02
    # the one-step form's coefficients multiply to the closed form's exactly
    ones = torch.ones(1, dtype=torch.float64)
    prod = ones.clone()
    for t in range(t_end + 1):
        prod = S.q_step(prod, t, torch.zeros(1, dtype=torch.float64), alpha_bar)
    assert abs(prod.item() - a ** 0.5) < 1e-12


def test_classifier_free_guidance():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    torch.testing.assert_close(S.classifier_free_guidance(u, c, 7.5), torch.tensor([16.0, -20.5]))
    torch.testing.assert_close(S.classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(S.classifier_free_guidance(u, c, 0.0), u)


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta schedule"):
        S.make_alpha_bar(schedule="cosine-ish")
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.ddim_timesteps(0)


def test_timestep_embedding_closed_form():
    """VGT adds the U-Net's embedding at its defaults to the class token; those defaults give [cos | sin]."""
    e = S.timestep_embedding(torch.tensor([0, 7]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [math.exp(-math.log(10000.0) * i / 4) for i in range(4)]
    ref = [math.cos(7 * f) for f in freqs] + [math.sin(7 * f) for f in freqs]
    assert torch.allclose(e[1], torch.tensor(ref), atol=1e-5)
