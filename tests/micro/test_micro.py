"""Tests for apla/micro: the shipped micro Stable Diffusion, its pretraining script and its preset."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import apla
import apla.micro
import apla.sd.text
from apla import assets as bundled
from apla.micro import MICRO_DIR, MICRO_PRESET, TEXT_ENCODER_CONFIG
from apla.scheduler import classifier_free_guidance, ddim_sample, ddim_timesteps, make_alpha_bar
from apla.sd.unet import is_temporal_param
from tests.helpers.inflation import temporal_output_zero

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
    ids = apla.sd.text.tokenize(sd.tokenizer, ["a green triangle at the bottom", ""])
    z = torch.randn(2, 4, 16, 16, generator=gen)
    x = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        context = sd.text_encoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(context, ref_text(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)
        with temporal_output_zero(sd.unet):  # one frame through the inflated U-Net is the 2D U-Net
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
    assert cfg.frames == 8 and cfg.size == 64 and Path(bundled.resolve_video(cfg.video)).is_file()
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


def test_timestep_weight_adds_the_capped_x0_error():
    """||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2, so 1 + min(1/SNR, cap) adds the x0 error, capped."""
    from apla.micro.pretrain import timestep_weight

    abar = make_alpha_bar().float()
    assert torch.equal(timestep_weight(abar, 0.0), torch.ones_like(abar))  # cap 0: SD's plain epsilon loss
    w = timestep_weight(abar, 20.0)
    snr = abar / (1 - abar)
    assert torch.allclose(w[:100], 1 + 1 / snr[:100])  # low noise: SNR > 8, under the cap
    assert w[999] == 21.0 and w.max() == 21.0 and (w >= 1).all()
    # the weighted epsilon error of a fixed x0 error is SNR + min(1, cap * SNR): never below the x0 error, capped
    assert torch.allclose(w * snr, snr + torch.clamp(20.0 * snr, max=1.0))


def test_contrastive_loss_matches_a_written_out_loop():
    from apla.micro.contrastive import contrastive_loss

    torch.manual_seed(0)
    text, image = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    loss, acc = contrastive_loss(text, image, labels, scale)
    tn, im = text / text.norm(dim=1, keepdim=True), image / image.norm(dim=1, keepdim=True)
    total, hits = 0.0, 0
    for i in range(6):
        matches = [j for j in range(6) if labels[j] == labels[i]]
        row = [10.0 * float(im[i] @ tn[j]) for j in range(6)]  # image i against every caption
        col = [10.0 * float(im[j] @ tn[i]) for j in range(6)]  # caption i against every image
        for logits in (row, col):
            lse = math.log(sum(math.exp(v) for v in logits))
            total += sum(lse - logits[j] for j in matches) / len(matches) / 2
        hits += max(range(6), key=lambda j: row[j]) in matches
    assert abs(loss.item() - total / 6) < 1e-10 and acc.item() == hits / 6
    # features that tell the labels apart perfectly: accuracy 1 and a loss that falls as the scale grows
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    low, acc1 = contrastive_loss(onehot, onehot, labels, torch.tensor(math.log(100.0)))
    high, _ = contrastive_loss(onehot, onehot, labels, torch.tensor(0.0))
    assert acc1.item() == 1.0 and low < high


def test_caption_features_average_the_states_from_the_end_token_on():
    from apla.micro.contrastive import caption_features

    text_encoder = apla.sd.text.build_text_encoder(TEXT_ENCODER_CONFIG)
    ids = apla.sd.text.tokenize(apla.sd.text.load_tokenizer(), ["a red circle on the left", "a blue square"])
    with torch.no_grad():
        h = text_encoder(input_ids=ids).last_hidden_state
        feats = caption_features(text_encoder, ids, TEXT_ENCODER_CONFIG["eos_token_id"])
    assert torch.allclose(feats[0], h[0, 7:].mean(0), atol=1e-6)  # bos + 6 words, then the end token at 7
    assert torch.allclose(feats[1], h[1, 4:].mean(0), atol=1e-6)


def test_pretraining_stages_resume_and_export_a_loadable_folder(tmp_path):
    """All stages on a tiny fake pool: text and U-Net stages stopped after one step and resumed end with the
    weights of uninterrupted runs; the export loads through apla.load_stable_diffusion and samples."""
    from apla.micro import pretrain

    cfg = pretrain.PretrainConfig(vae_steps=1, vae_batch=2, text_steps=2, text_batch=4, unet_steps=2, unet_batch=2,
                                  checkpoint_every=1, log_every=1, warmup=1)
    tokenizer = apla.sd.text.load_tokenizer()
    captions = ["a red circle on the left", "a blue square at the top", "a red circle on the left", "a green diamond"]
    g = torch.Generator().manual_seed(0)
    pool = {"mean": torch.randn(4, 4, 16, 16, generator=g).half(), "std": torch.full((4, 4, 16, 16), 0.1).half(),
            "ids": apla.sd.text.tokenize(tokenizer, captions).int(), "empty_ids": apla.sd.text.tokenize(tokenizer, [""]).int()}
    runs = {}
    for name in ("whole", "split"):
        work = tmp_path / name
        work.mkdir()
        torch.save(pool, work / "pool.pt")
        pretrain.atomic_write_json(work / "latent_stats.json", {"scaling_factor": 0.5})
        pretrain.atomic_write_json(work / "pretrain_config.json", {})
        assert pretrain.train_vae(cfg, work, deadline=float("inf"))
        for stage in (pretrain.train_text, pretrain.train_unet):
            if name == "split":
                assert not stage(cfg, work, deadline=0.0)  # stops after one step, with a checkpoint
            assert stage(cfg, work, deadline=float("inf"))
        runs[name] = work
    for file, key in (("text.pt", "text_encoder"), ("unet.pt", "unet"), ("unet.pt", "ema")):
        a, b = (torch.load(runs[n] / file, weights_only=True)[key] for n in ("whole", "split"))
        a, b = (x["unet"] if key == "ema" else x for x in (a, b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (file, key)
    out = tmp_path / "model"
    pretrain.export_trained(runs["whole"], out)
    sd = apla.load_stable_diffusion(out)
    assert sd.vae.scaling_factor == 0.5
    text = pretrain.load_trained_text_encoder(runs["whole"]).state_dict()
    loaded = sd.text_encoder.state_dict()
    assert all(torch.equal(loaded[k], text[k].half().float()) for k in text if k in loaded and text[k].is_floating_point())
    context = apla.sd.text.encode_prompt(sd, ["", "a red circle"])  # (2, 77, D)
    z = ddim_sample(lambda z_t, t: classifier_free_guidance(*sd.unet(torch.cat([z_t, z_t]), t, context).chunk(2), 3.0),
                    torch.randn(1, 4, 1, 16, 16, generator=g), ddim_timesteps(2), sd.alpha_bar, progress=False)
    assert torch.isfinite(z).all()


def test_readme_rewrite_keeps_the_hand_written_head_and_tail(tmp_path):
    """python -m apla.micro.evaluate rewrites only its part of the project's README: between the markers, the head
    (what the project is for, how to run it) and the hand-written tail kept as they are."""
    from apla.micro.evaluate import GENERATED, HAND_WRITTEN, write_results

    r = dict(source="micro", params={"vae": 1, "unet": 2, "text_encoder": 3}, weights_mib=1.0, command="cmd",
             wall_s=1.0, threads=2, vae_scenes=4, vae_seed=1, psnr=30.0, prompts=4, prompt_seed=2,
             colour=1.0, shape=0.5, position=0.9, steps=2, guidance=3.0, seed=0, grid=1, grid_prompts=["a red circle"])
    path = tmp_path / "README.md"
    write_results(path, r)
    first = path.read_text()
    assert "| 50.0% | >= 75% | **no** |" in first and HAND_WRITTEN not in first
    path.write_text(first + "\n" + HAND_WRITTEN + "\n\n## One-shot\n\nkept\n")
    write_results(path, {**r, "shape": 0.8})
    text = path.read_text()
    assert text.startswith(first.replace("| 50.0% | >= 75% | **no** |", "| 80.0% | >= 75% | yes |"))
    assert text.endswith(HAND_WRITTEN + "\n\n## One-shot\n\nkept\n") and text.count(HAND_WRITTEN) == 1
    head = "# The project\n\nWhat it is for.\n\n"
    path.write_text(head + text)
    write_results(path, r)
    again = path.read_text()
    assert again.startswith(head + first) and again.count(GENERATED) == 1
    assert again.endswith(HAND_WRITTEN + "\n\n## One-shot\n\nkept\n")


def test_project_readme_opens_with_its_purpose_and_commands_then_the_generated_results():
    from apla.micro.evaluate import GENERATED, HAND_WRITTEN

    text = (Path(apla.micro.__file__).parent / "README.md").read_text()
    head, rest = text.split(GENERATED)
    assert head.startswith("# ") and HAND_WRITTEN in rest
    assert rest.index("## The shipped model") < rest.index(HAND_WRITTEN)
    for command in ("python -m apla.micro.pretrain", "python -m apla.micro.evaluate", "python -m apla.micro.oneshot",
                    "python -m apla.micro.image_tower", "python -m apla.micro.shapes", "python -m apla.eval"):
        assert command in head, command
