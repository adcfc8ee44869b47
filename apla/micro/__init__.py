"""The micro Stable Diffusion: SD v1.5's architecture at toy size, pretrained on the shapes world.

APLA (AAAI 2024) "utilize[s] the pre-trained weights of the Stable Diffusion" (Sec. Experiments) and tunes them
on one clip. Real SD v1.5 needs a GPU; this package ships a stand-in that keeps every piece of SD end to end --
the KL autoencoder, the cross-attention U-Net with SD's block types, a `CLIPTextModel` with CLIP's tokenizer and
full 49,408-token BPE vocabulary, the v1.5 noise schedule -- at sizes 2 CPU cores train in about 70 minutes:

    x (B, 3, 64, 64) --VAE encoder--> z (B, 4, 16, 16)      (4x down, two levels fewer than SD's 8x)
    prompt --CLIP tokenizer--> ids (B, 77) --CLIPTextModel--> context (B, 77, 64)
    eps_theta(z_t, t, context): SD U-Net, widths 32/64/64, on (B, 4, F, 16, 16)

It is stored as a diffusers folder (`apla/assets/micro/`: unet/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json; float16 safetensors) with the same names and layouts as SD v1.5, so
`apla.load_stable_diffusion("micro")` loads it through the same code as the real model. No APLA equation lives
here; the pretraining (`apla.micro.pretrain`: VAE, a contrastive text encoder as CLIP's, then the U-Net with
SD's epsilon-prediction objective) makes it, the evaluation (`apla.micro.evaluate`) measures it with the shapes
world's evaluator.

`MICRO_PRESET` is the APLA run sized to this model (frames, resolution, steps, learning rate, guidance, VGT). The shapes
world the model is trained on and measured with is `apla.micro.shapes`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from apla.config import TrainConfig

# Where the shipped weights live (a diffusers-style folder inside the package).
MICRO_DIR = Path(str(resources.files("apla"))) / "assets" / "micro"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose folder layout the configs follow

# vae/config.json. SD v1.5 in comments. 64x64 -> 16x16x4: three levels (two downsamplings), not four.
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": DIFFUSERS_VERSION,
    "act_fn": "silu",
    "block_out_channels": [32, 64, 64],  # SD v1.5: [128, 256, 512, 512]
    "down_block_types": ["DownEncoderBlock2D"] * 3,  # SD v1.5: 4 of them
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,  # SD v1.5: 4
    "layers_per_block": 1,  # SD v1.5: 2
    "norm_num_groups": 16,  # SD v1.5: 32
    "sample_size": 64,  # SD v1.5: 512
    "scaling_factor": 1.0,  # SD v1.5: 0.18215; set from data by the pretraining (std of scaled latents ~ 1)
}

# unet/config.json: a plain SD U-Net (2D names; apla.sd.unet inflates it). SD v1.5 in comments.
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    "act_fn": "silu",
    "attention_head_dim": 4,  # SD v1.5: 8 (a head count, despite the name); head width 8 / 16
    "block_out_channels": [32, 64, 64],  # SD v1.5: [320, 640, 1280, 1280]
    "center_input_sample": False,
    "cross_attention_dim": 64,  # SD v1.5: 768 (= the text encoder's hidden_size)
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],  # SD v1.5: 3 x CrossAttn + Down
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],  # SD v1.5: Up + 3 x CrossAttn
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,  # SD v1.5: 2
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 16,  # SD v1.5: 32
    "sample_size": 16,  # SD v1.5: 64
}

# text_encoder/config.json (transformers CLIPTextModel). SD v1.5 (CLIP ViT-L/14 text tower) in comments.
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,  # SD v1.5: 49408, CLIP's full BPE vocabulary
    "hidden_size": 64,  # SD v1.5: 768
    "intermediate_size": 256,  # SD v1.5: 3072
    "num_hidden_layers": 3,  # SD v1.5: 12
    "num_attention_heads": 4,  # SD v1.5: 12
    "max_position_embeddings": 77,  # SD v1.5: 77
    "hidden_act": "quick_gelu",  # SD v1.5: quick_gelu
    "layer_norm_eps": 1e-05,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "projection_dim": 64,  # unused by CLIPTextModel (SD v1.5: 768)
    "torch_dtype": "float16",
}

# scheduler/scheduler_config.json: SD v1.5's training schedule, sampled with DDIM.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "trained_betas": None,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# An APLA run sized to the micro model: TrainConfig's defaults (apla.config), what `python train.py` runs with no
# arguments, as config.json's keys; SD v1.5's values are the preset apla.config.SD_V15.
MICRO_PRESET = TrainConfig().to_dict()

# Sampling settings the micro model is evaluated with (apla.micro.evaluate), the preset's.
NUM_INFERENCE_STEPS = MICRO_PRESET["sample_steps"]  # SD v1.5 default: 50 DDIM steps
GUIDANCE_SCALE = MICRO_PRESET["guidance"]  # SD v1.5 default: 7.5; chosen on 128 validation captions among 3, 5, 7.5
