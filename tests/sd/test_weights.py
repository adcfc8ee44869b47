"""apla.sd.weights: every published layout loads, every tensor is accounted for, everything else is refused clearly.

References: diffusers' AutoencoderKL and transformers' CLIPTextModel saved as a diffusers folder (tiny), and
diffusers' own single-file conversion functions on a full-size SD v1.5 file of random weights.
"""
import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers (a dev extra) is the reference")
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers import DDIMScheduler
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

import apla
from apla.scheduler import make_alpha_bar
from apla.sd.weights import WeightsError
from tests.conftest import ldm_entries, write_checkpoint

VAE_TEXT = ("vae", "text_encoder")
TINY_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A diffusers-layout folder written by diffusers and transformers themselves (no tokenizer/: the shipped one)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    vae = perturb(DiffusersVAE(**TINY_VAE), 1)
    text = perturb(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), 2)
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", **SCHEDULER}))
    return root, vae, text


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_tiny_folder_matches_diffusers_and_transformers(tiny_folder):
    root, vae, text = tiny_folder
    sd = apla.load_stable_diffusion(root, components=VAE_TEXT)
    assert sd.unet is None and sd.source == str(root)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=g)
    ids = torch.randint(0, TINY_TEXT["vocab_size"], (2, 77), generator=g)
    with torch.no_grad():
        mean, logvar = sd.vae.encode(x)
        post = vae.encode(x).latent_dist
        torch.testing.assert_close(mean, post.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(logvar, post.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(sd.vae.decode(z), vae.decode(z).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(sd.text_encoder(input_ids=ids).last_hidden_state,
                                   text(input_ids=ids).last_hidden_state, rtol=0, atol=1e-5)
    # alpha_bar from the folder's scheduler config, as diffusers' scheduler computes it
    torch.testing.assert_close(sd.alpha_bar, make_alpha_bar(1000, 0.0001, 0.02, "linear"))
    torch.testing.assert_close(sd.alpha_bar.float(), DDIMScheduler(**SCHEDULER).alphas_cumprod)
    assert sd.tokenizer.bos_token_id == 49406


def test_folder_with_pickled_weights_loads_through_weights_only(tiny_folder, tmp_path):
    root, vae, _ = tiny_folder
    shutil.copytree(root, tmp_path / "sd", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(vae.state_dict(), tmp_path / "sd" / "vae" / "diffusion_pytorch_model.bin")
    sd = apla.load_stable_diffusion(tmp_path / "sd", components=("vae",), dtype=torch.float64)
    assert sd.text_encoder is None and sd.vae.decoder.conv_out.weight.dtype == torch.float64
    torch.testing.assert_close(sd.vae.decoder.conv_out.weight.float(), vae.decoder.conv_out.weight)
    # a pickle that holds more than tensors is refused by weights_only, with the file named
    torch.save({"w": torch.zeros(1), "obj": shutil.copytree}, tmp_path / "sd" / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.bin: not a loadable weights-only pickle"):
        apla.load_stable_diffusion(tmp_path / "sd", components=("vae",))


def test_a_dtype_per_component_leaves_the_others_float32(tiny_folder):
    root, _, _ = tiny_folder
    sd = apla.load_stable_diffusion(root, components=VAE_TEXT, dtype={"vae": torch.float64})
    assert sd.vae.decoder.conv_out.weight.dtype == torch.float64
    assert {p.dtype for p in sd.text_encoder.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unknown component 'clip'"):
        apla.load_stable_diffusion(root, components=VAE_TEXT, dtype={"clip": torch.float16})


def test_hub_id_resolves_through_a_local_cache(tiny_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    root, vae, _ = tiny_folder
    repo = tmp_path / "hub" / "models--apla-test--tiny-sd"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(root, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    sd = apla.load_stable_diffusion("apla-test/tiny-sd", components=VAE_TEXT)
    assert sd.source == "apla-test/tiny-sd"
    torch.testing.assert_close(sd.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight, rtol=0, atol=0)
    with pytest.raises(WeightsError, match="apla-test/not-there: could not be resolved as a hub id"):
        apla.load_stable_diffusion("apla-test/not-there", components=VAE_TEXT)


def test_full_size_single_file_matches_diffusers_conversion(sd15_single_file, sd15_manifest):
    from safetensors import safe_open

    sd = apla.load_stable_diffusion(sd15_single_file, components=VAE_TEXT)
    assert sd.unet is None
    torch.testing.assert_close(sd.alpha_bar, make_alpha_bar())
    cfg = sd15_manifest["configs"]
    with safe_open(str(sd15_single_file), "pt") as f:  # the networks' tensors, as diffusers would read them
        ckpt = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("first_stage_model.", "cond_stage_model."))}

    vae_cfg = {**cfg["vae"], "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    ref_vae = DiffusersVAE(**vae_cfg).eval()
    ref_vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_cfg), strict=True)
    ref_text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval()
    text_sd = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    text_sd.pop("embeddings.position_ids")  # an int64 entry of real files, not a parameter
    ref_text.load_state_dict(text_sd, strict=True)

    # every VAE / text-encoder tensor of the file sits where diffusers' conversion puts it
    ours = {**{f"vae.{k}": v for k, v in sd.vae.state_dict().items()},
            **{f"text.{k}": v for k, v in sd.text_encoder.state_dict().items()}}
    refs = {**{f"vae.{k}": v for k, v in ref_vae.state_dict().items()},
            **{f"text.{k}": v for k, v in ref_text.state_dict().items()}}
    n_file = sum(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in sd15_manifest["ldm"])
    assert len(ours) == len(refs) == n_file == 248 + 196
    assert all(torch.equal(ours[k], refs[k]) for k in refs)

    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        x = sd.vae.decode(z)
        assert x.shape == (1, 3, 64, 64)
        assert rel_err(x, ref_vae.decode(z).sample) < 1e-4
        context = apla.encode_prompt(sd, ["a photo of a cat", "A Man Riding a Horse, on the BEACH!"])
        ids = sd.tokenizer(["a photo of a cat", "A Man Riding a Horse, on the BEACH!"], padding="max_length",
                           max_length=77, return_tensors="pt").input_ids
        assert context.shape == (2, 77, 768)
        assert rel_err(context, ref_text(input_ids=ids).last_hidden_state) < 1e-4


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    import apla, apla.sd.weights  # imports first: the baseline includes them

    def hwm_mib():  # this process's peak resident set (file-backed pages included), in MiB
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    try:  # restart the peak count here (Linux >= 4.0); else the import peak is the baseline
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    base = hwm_mib()
    sd = apla.load_stable_diffusion(sys.argv[1], components=("vae", "text_encoder"))
    loaded = hwm_mib()
    params = [p for m in (sd.vae, sd.text_encoder) for p in m.parameters()]
    with torch.no_grad():
        total = sum(float(p.sum()) for p in params)  # touch every byte of every parameter
    print(json.dumps(dict(base_mib=base, load_peak_mib=loaded - base, peak_mib=hwm_mib() - base,
                          float32_mib=sum(p.numel() for p in params) * 4 / 2**20)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_vae_and_text_from_the_single_file_stays_under_1_5x_their_size(sd15_single_file):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(sd15_single_file)], capture_output=True,
                         text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print("memory:", m)
    assert m["peak_mib"] < 1.5 * m["float32_mib"], m


# ---- refusals: sparse files (names and shapes only; the checks run before any data is read) ----

def test_prediction_type_comes_from_the_scheduler_config_or_the_argument(tiny_folder, tmp_path):
    root, _, _ = tiny_folder
    assert apla.load_stable_diffusion(root, components=("vae",)).prediction_type == "epsilon"  # none named
    shutil.copytree(root, tmp_path / "v")
    sched = tmp_path / "v" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({"_class_name": "DDIMScheduler", **SCHEDULER, "prediction_type": "v_prediction"}))
    assert apla.load_stable_diffusion(tmp_path / "v", components=("vae",)).prediction_type == "v_prediction"
    sd = apla.load_stable_diffusion(tmp_path / "v", components=("vae",), prediction_type="epsilon")
    assert sd.prediction_type == "epsilon"  # the argument wins
    sched.write_text(json.dumps({**SCHEDULER, "prediction_type": "sample"}))
    with pytest.raises(WeightsError, match=r"scheduler_config.json: prediction_type 'sample' is not supported") as e:
        apla.load_stable_diffusion(tmp_path / "v", components=("vae",))
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="prediction_type 'sample' is not supported"):
        apla.load_stable_diffusion(root, components=("vae",), prediction_type="sample")
    file = write_checkpoint(tmp_path / "sd.safetensors", vae_text_entries(), fill="zeros")
    assert apla.load_stable_diffusion(file, components=("vae",)).prediction_type == "epsilon"  # an SD v1 file
    assert apla.load_stable_diffusion(file, components=("vae",),
                                      prediction_type="v_prediction").prediction_type == "v_prediction"


def test_a_tune_a_video_folder_loads_its_tuned_unet_as_it_is(tmp_path):
    """A folder that Tune-A-Video's pipeline.save_pretrained wrote: its U-Net (3D block names, temporal weights in a
    pickle) is loaded as it was tuned, and gives what the same weights give loaded our way, in memory."""
    from apla.sd.unet import UNet3DConditionModel, UNetConfig, is_temporal_param
    from tests.helpers.tiny_sd import TINY_UNET, make_tune_a_video_folder

    root = make_tune_a_video_folder(tmp_path / "man-skiing")
    state = torch.load(root / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    ours = UNet3DConditionModel(UNetConfig.from_diffusers(TINY_UNET)).eval()  # from the SD config it was tuned from
    ours.load_state_dict(state)  # strict: the file holds exactly our names, temporal ones included
    sd = apla.load_stable_diffusion(root, components=("unet",))
    temporal = [k for k in state if is_temporal_param(k)]
    assert temporal and all(state[k].abs().max() > 0 for k in temporal if "attn_temp.to_out" in k)
    loaded = sd.unet.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)  # none afresh
    g = torch.Generator().manual_seed(0)
    z, context = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    for over_frames in (False, True):  # SD's per-frame GroupNorm, and Tune-A-Video's over the frames
        for net in (sd.unet, ours):
            net.set_norm_over_frames(over_frames)
        with torch.no_grad():
            torch.testing.assert_close(sd.unet(z, 321, context), ours(z, 321, context), rtol=0, atol=0)
    # a Tune-A-Video U-Net with a temporal weight missing is refused, naming it, rather than inflated afresh
    del state[temporal[0]]
    torch.save(state, root / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=rf"missing key '{re.escape(temporal[0])}'"):
        apla.load_stable_diffusion(root, components=("unet",))


def vae_text_entries():
    return {k: s for k, s in ldm_entries().items() if not k.startswith("model.diffusion_model.")}


def refuse(tmp_path, entries, match):
    path = write_checkpoint(tmp_path / "sd.safetensors", entries, fill="zeros")
    with pytest.raises(WeightsError, match=match) as e:
        apla.load_stable_diffusion(path, components=VAE_TEXT)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_extras_are_skipped_and_older_text_names_load(tmp_path):
    entries = {k.replace("transformer.text_model.", "transformer."): s for k, s in vae_text_entries().items()}
    path = write_checkpoint(tmp_path / "old.safetensors", entries, fill="zeros")
    sd = apla.load_stable_diffusion(path, components=VAE_TEXT)
    assert sd.vae is not None and sd.text_encoder is not None


def test_missing_key_is_named(tmp_path):
    entries = vae_text_entries()
    del entries["first_stage_model.decoder.up.0.block.2.conv2.weight"]
    refuse(tmp_path, entries, r"missing key 'decoder\.up_blocks\.3\.resnets\.2\.conv2\.weight'")


def test_unknown_key_is_named(tmp_path):
    entries = {**vae_text_entries(), "first_stage_model.encoder.mid.attn_2.q.weight": [512, 512, 1, 1]}
    refuse(tmp_path, entries, r"unknown key 'first_stage_model\.encoder\.mid\.attn_2\.q\.weight'")
    refuse(tmp_path, {**vae_text_entries(), "lora_unet_down.alpha": [1]}, r"unknown key 'lora_unet_down\.alpha'")


def test_wrong_shape_is_named(tmp_path):
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    refuse(tmp_path, {**vae_text_entries(), key: [1024]}, rf"wrong shape for '{key}': \[1024\]")


@pytest.mark.parametrize("key, match", [
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
     r"not a Stable Diffusion 1\.x or 2\.x checkpoint \(has SDXL keys"),
    # an OpenCLIP key makes the file SD 2.x, whose text tower is not CLIP's: SD v1's text keys are then refused
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
     r"unknown key 'cond_stage_model\.transformer\..*' \(outside the U-Net, VAE and text encoder\)"),
])
def test_sdxl_and_mixed_generations_are_refused_in_one_line(tmp_path, key, match):
    refuse(tmp_path, {**vae_text_entries(), key: [8]}, match)


def test_truncated_or_foreign_files_get_a_clear_error(tmp_path):
    good = write_checkpoint(tmp_path / "good.safetensors", {"first_stage_model.quant_conv.bias": [8]})
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-5])
    (tmp_path / "text.safetensors").write_text("not weights at all\n" * 10)
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(WeightsError, match=rf"{name}: not a readable \.safetensors file") as e:
            apla.load_stable_diffusion(tmp_path / name, components=VAE_TEXT)
        assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="neither a checkpoint file"):
        apla.load_stable_diffusion(tmp_path / "absent", components=VAE_TEXT)


def test_single_file_pickle_loads_through_weights_only(tmp_path):
    entries = vae_text_entries()
    flat = torch.zeros(max(torch.Size(s).numel() for s in entries.values()))  # one storage, saved once
    state = {k: (torch.arange(77).reshape(s) if k.endswith("position_ids") else flat[: torch.Size(s).numel()].view(s))
             for k, s in entries.items()}
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "sd.ckpt")
    sd = apla.load_stable_diffusion(tmp_path / "sd.ckpt", components=VAE_TEXT)
    assert sd.vae.decoder.conv_out.weight.shape == (3, 128, 3, 3)
    assert sd.text_encoder.embeddings.token_embedding.weight.shape == (49408, 768)


def test_two_names_for_one_parameter_are_refused(tmp_path):
    key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    entries = {**vae_text_entries(), key.replace("text_model.", ""): [768]}  # old and new naming at once
    refuse(tmp_path, entries, r"several keys map to 'final_layer_norm\.bias'")
