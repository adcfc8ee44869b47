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
