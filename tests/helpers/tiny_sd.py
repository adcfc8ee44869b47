"""A tiny random Stable Diffusion in the diffusers folder layout (unet/, vae/, text_encoder/, scheduler/), built with
diffusers and transformers the way a real folder is, for end-to-end tests of train.py and sample.py on a CPU.

The VAE has four levels like SD's (downsampling by 8), so 64x64 frames give 8x8 latents.
"""
import json
from pathlib import Path

import torch

TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
# a run configuration sized to the tiny model (VGT small enough for a CPU)
TINY_RUN = {"vgt_model": {"width": 32, "spatial_depth": 1, "temporal_depth": 1, "heads": 2, "mlp_hidden": 64,
                          "sample_size": 8, "max_frames": 8}}


def make_tiny_sd(root, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(root / "unet", safe_serialization=True)
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae", safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).save_pretrained(root / "text_encoder", safe_serialization=True)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return root


# unet/config.json as Tune-A-Video's UNet3DConditionModel.save_pretrained writes it: every argument of its __init__
# (register_to_config) with the 3D block names its from_pretrained_2d sets, and diffusers' two bookkeeping keys
TAV_UNET = dict(
    _class_name="UNet3DConditionModel", _diffusers_version="0.11.1", sample_size=8, in_channels=4, out_channels=4,
    center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"], mid_block_type="UNetMidBlock3DCrossAttn",
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"], only_cross_attention=False, block_out_channels=[16, 32],
    layers_per_block=1, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=8,
    norm_eps=1e-5, cross_attention_dim=32, attention_head_dim=4, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default")


def make_tune_a_video_folder(root, seed: int = 0) -> Path:
    """A tiny outputs/<run> folder as Tune-A-Video's train_tuneavideo.py leaves it: the pipeline's save_pretrained
    (model_index.json, the tiny SD's vae/, text_encoder/, scheduler/, and unet/ as its UNet3DConditionModel saves
    itself: TAV_UNET and diffusion_pytorch_model.bin, a pickle of every weight, the temporal ones tuned, here
    random), its config.yaml, inv_latents/ddim_latent-N.pt and samples/. Its weights are the tiny SD's, the
    temporal ones drawn from `seed`."""
    import apla

    root = make_tiny_sd(Path(root), seed)
    unet = apla.load_stable_diffusion(root, components=("unet",)).unet
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn_temp." in name or ".norm_temp." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm_temp.weight") else 0.0))
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), root / "unet" / "diffusion_pytorch_model.bin")
    (root / "unet" / "config.json").write_text(json.dumps(TAV_UNET))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "TuneAVideoPipeline", "_diffusers_version":
                                                       "0.11.1", "unet": ["tuneavideo.models.unet",
                                                                          "UNet3DConditionModel"]}))
    (root / "config.yaml").write_text("pretrained_model_path: ./checkpoints/stable-diffusion-v1-4\n")
    (root / "inv_latents").mkdir()
    torch.save(torch.randn(1, 4, 2, 8, 8, generator=g), root / "inv_latents" / "ddim_latent-2.pt")
    (root / "samples").mkdir()
    return root
