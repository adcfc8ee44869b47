"""apla.sd.vae against diffusers' AutoencoderKL (tiny, float64) and against the SD v1.5 manifest (names, shapes)."""
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers (a dev extra) is the reference")
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

from apla.sd.vae import SCALING_FACTOR, AutoencoderKL, VAEConfig, sample_posterior, vae_key_from_ldm

TINY = dict(block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, sample_size=32)


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    ref = DiffusersVAE(**TINY).double().eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial values everywhere (diffusers zero-inits nothing here, but be sure)
            p.add_(0.05 * torch.randn_like(p))
    ours = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config))).double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_encode_decode_match_diffusers_tiny_float64(tiny_pair):
    ours, ref = tiny_pair
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 48, generator=g, dtype=torch.float64) * 2 - 1  # non-square on purpose
    z = torch.randn(2, 4, 8, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        post = ref.encode(x).latent_dist
        torch.testing.assert_close(mean, post.mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(logvar, post.logvar, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-10)
    assert mean.shape == (2, 4, 8, 12)


def test_sample_posterior_matches_diffusers_diagonal_gaussian():
    g = torch.Generator().manual_seed(2)
    mean, logvar = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    z = sample_posterior(mean, logvar, torch.Generator().manual_seed(3))
    ref = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-6)


def test_scaling_factor_is_sd15s():
    assert SCALING_FACTOR == DiffusersVAE().config.scaling_factor == 0.18215
    assert AutoencoderKL(VAEConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8)).scaling_factor == SCALING_FACTOR


def test_full_size_names_shapes_and_count_equal_sd15_manifest(sd15_manifest):
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == sd15_manifest["diffusers"]["vae"]
    n = sum(p.numel() for p in vae.parameters())
    assert round(n / 1e6, 3) == sd15_manifest["param_counts_millions"]["vae"]


def test_single_file_name_rules_reach_every_diffusers_name(sd15_manifest):
    prefix = "first_stage_model."
    ldm = {k[len(prefix):]: s for k, s in sd15_manifest["ldm"].items() if k.startswith(prefix)}
    mapped = {vae_key_from_ldm(k): s for k, s in ldm.items()}
    folder = sd15_manifest["diffusers"]["vae"]
    assert len(mapped) == len(ldm) and set(mapped) == set(folder)
    for k, s in mapped.items():  # equal, or a 1x1 conv weight standing for a Linear
        assert s == folder[k] or (s[2:] == [1, 1] and s[:2] == folder[k]), k
