"""Tests for apla/micro: the shipped micro Stable Diffusion, its pretraining script and its preset."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import apla
import apla.text
from apla.micro import MICRO_DIR, MICRO_PRESET, TEXT_ENCODER_CONFIG
from apla.scheduler import classifier_free_guidance, ddim_sample, ddim_timesteps
from apla.unet import is_temporal_param

COMPONENT_FILES = {
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture(scope="module")
def sd():
    return apla.load_stable_diffusion("micro")


def config(component: str) -> dict:
    return json.loads((MICRO_DIR / component / "config.json").read_text())


def file_numel(component: str) -> int:
    with safe_open(str(MICRO_DIR / COMPONENT_FILES[component]), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def count(module, skip=lambda name: False) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not skip(n))


def clip_text_params(c: dict) -> int:
    """CLIPTextModel's parameter count in closed form from its config."""
    d, i, L, V, P = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"], c["max_position_embeddings"]
    per_layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d  # q, k, v, out; fc1; fc2; two LayerNorms
    return V * d + P * d + L * per_layer + 2 * d  # embeddings, layers, final LayerNorm


def test_shipped_folder_is_a_small_float16_diffusers_folder():
    for sub in ("vae", "unet", "text_encoder", "scheduler", "tokenizer"):
        assert (MICRO_DIR / sub).is_dir(), sub
    assert (MICRO_DIR / "model_index.json").is_file()
    for component, rel in COMPONENT_FILES.items():
        with safe_open(str(MICRO_DIR / rel), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16"}, (component, dtypes)
    total = sum(f.stat().st_size for f in MICRO_DIR.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, total


def test_loads_by_name_with_config_parameter_counts(sd):
    assert Path(sd.source).resolve() == MICRO_DIR.resolve()
    # every stored tensor is a parameter and every parameter was stored (the U-Net's temporal layers aside)
    assert count(sd.vae) == file_numel("vae")
    assert count(sd.unet, is_temporal_param) == file_numel("unet")
    assert count(sd.text_encoder) == file_numel("text_encoder")
    assert count(sd.text_encoder) == clip_text_params(config("text_encoder"))
    assert sd.text_encoder.config.vocab_size == len(sd.tokenizer) == 49408
    # the latent scale is the one measured at pretraining time, not SD v1.5's
    assert sd.vae.scaling_factor == config("vae")["scaling_factor"] != 0.18215


def test_parameter_counts_match_diffusers_models_of_the_same_configs(sd):
    diffusers = pytest.importorskip("diffusers")
    ref_vae = diffusers.AutoencoderKL.from_config(config("vae"))
    ref_unet = diffusers.UNet2DConditionModel.from_config(config("unet"))
    assert count(sd.vae) == count(ref_vae)
    assert count(sd.unet, is_temporal_param) == count(ref_unet)
    assert set(ref_unet.state_dict()) == {k for k in sd.unet.state_dict() if not is_temporal_param(k)}


def test_folder_loads_in_diffusers_and_transformers_with_the_same_outputs(sd):
    """The shipped folder is a standard one: the reference libraries read it and compute what we compute."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextModel

    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(MICRO_DIR / "unet", torch_dtype=torch.float32).eval()
    ref_vae = diffusers.AutoencoderKL.from_pretrained(MICRO_DIR / "vae", torch_dtype=torch.float32).eval()
    ref_text = CLIPTextModel.from_pretrained(MICRO_DIR / "text_encoder", torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    ids = apla.text.tokenize(sd.tokenizer, ["a green triangle at the bottom", ""])
    z = torch.randn(2, 4, 16, 16, generator=gen)
    x = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        context = sd.text_encoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(context, ref_text(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)
        ours = sd.unet(z[:, :, None], torch.tensor([10, 900]), context)[:, :, 0]  # (B, 4, 1, h, w) -> (B, 4, h, w)
        torch.testing.assert_close(ours, ref_unet(z, torch.tensor([10, 900]), context).sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sd.vae.decode(z), ref_vae.decode(z).sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sd.vae.encode(x)[0], ref_vae.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-4)
    assert ref_vae.config.scaling_factor == sd.vae.scaling_factor


def test_few_step_guided_sample_has_the_right_shapes(sd):
    gen = torch.Generator().manual_seed(0)
    z_T = torch.randn(2, 4, 1, 16, 16, generator=gen)  # (B, 4, F=1, h, w)
    context = apla.encode_prompt(sd, ["", "", "a red circle on the left", "a blue square at the top"])
    assert context.shape == (4, 77, TEXT_ENCODER_CONFIG["hidden_size"])

    def eps_fn(z_t, t):
        eps_uncond, eps_cond = sd.unet(torch.cat([z_t, z_t]), t, context).chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, 5.0)

    with torch.no_grad():
        z0 = ddim_sample(eps_fn, z_T, ddim_timesteps(3), sd.alpha_bar, progress=False)
        x = sd.vae.decode(z0[:, :, 0] / sd.vae.scaling_factor)  # (B, 4, 1, h, w) -> (B, 4, h, w)
    assert z0.shape == z_T.shape and x.shape == (2, 3, 64, 64)
    assert torch.isfinite(x).all()


def test_preset_is_a_valid_training_config_for_the_default_clip():
    config = pytest.importorskip("apla.config")
    vgt = pytest.importorskip("apla.vgt")
    cfg = config.TrainConfig.from_dict(MICRO_PRESET)  # unknown keys would be an error
    assert cfg.frames == 8 and cfg.size == 64 and Path(config.resolve_video(cfg.video)).is_file()
    assert config.default_config() == cfg  # it is what `python train.py` runs with no arguments
    model = vgt.VGT(cfg.vgt_model)
    z_t = torch.randn(1, 4, cfg.frames, 16, 16)  # (B, C, F, h, w) of the micro model's latents
    assert model(z_t, torch.tensor([500])).shape == z_t.shape


def test_pretraining_resumes_to_the_same_weights(tmp_path):
    """A stage stopped after its first step and resumed ends with the weights of an uninterrupted run."""
    from apla.micro import pretrain

    cfg = pretrain.PretrainConfig(vae_steps=2, vae_batch=2, checkpoint_every=1, log_every=1, warmup=1)
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    assert pretrain.train_vae(cfg, whole, deadline=float("inf"))
    assert not pretrain.train_vae(cfg, split, deadline=0.0)  # stops after one step, with a checkpoint
    assert pretrain.train_vae(cfg, split, deadline=float("inf"))
    a = pretrain.load_trained_vae(whole).state_dict()
    b = pretrain.load_trained_vae(split).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(cfg.seed)
    init = pretrain.build_vae().state_dict()  # the seeded initialisation train_vae starts from
    assert not any(torch.equal(a[k], init[k]) for k in a if k.endswith("weight"))  # every layer moved
