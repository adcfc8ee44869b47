"""Stable Diffusion 2.x for the tests: its configs as the published diffusers folders give them, the names and shapes
of an original single file (derived by rule from SD v1.5's manifest, since the two share the layout but for the text
tower, the cross-attention width and the transformers' linear projections), an OpenCLIP text tower of any size, and
a diffusers folder converted from a single file by diffusers' own conversion functions.

Published facts used (stabilityai/stable-diffusion-2-1 and -2-1-base; Stability's v2-inference*.yaml): the U-Net has
SD v1.5's levels with a head count per level (5, 10, 20, 20: heads 64 wide), linear projections, 1024-wide text
states; 2.1 (768) sets upcast_attention and trains at 96 latents with v-prediction, 2.1-base at 64 with ε; the text
encoder is OpenCLIP ViT-H/14's text tower (1024 wide, 16 heads, 24 blocks in the file, 23 used, exact GELU); the VAE
and the noise schedule are SD v1.5's; the tokenizer is CLIP's vocabulary padding with "!".
"""
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from apla.sd.text import clip_vocab_and_merges
from tests.conftest import load_manifest

UNET_2_1 = {**load_manifest()["configs"]["unet"], "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
            "cross_attention_dim": 1024, "upcast_attention": True, "sample_size": 96}
UNET_2_1_BASE = {**UNET_2_1, "upcast_attention": False, "sample_size": 64}
TEXT_2 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512)
VAE_2 = {**load_manifest()["configs"]["vae"], "down_block_types": ["DownEncoderBlock2D"] * 4,
         "up_block_types": ["UpDecoderBlock2D"] * 4}
SCHEDULER_2 = {**load_manifest()["configs"]["scheduler"], "_class_name": "DDIMScheduler"}
VARIANTS = {  # name: (U-Net config, prediction type, VAE sample size)
    "2.1": (UNET_2_1, "v_prediction", 768),
    "2.1-base": (UNET_2_1_BASE, "epsilon", 512),
}
OPEN_CLIP = "cond_stage_model.model."


def open_clip_entries(width=1024, blocks=24, mlp=4096, vocab=49408, context=77) -> dict[str, list[int]]:
    """Names and shapes of an OpenCLIP text tower as SD 2 files hold it (no visual tower: SD 2 deletes it)."""
    out = {"token_embedding.weight": [vocab, width], "positional_embedding": [context, width],
           "text_projection": [width, width], "logit_scale": [], "ln_final.weight": [width], "ln_final.bias": [width]}
    for n in range(blocks):
        b = f"transformer.resblocks.{n}."
        out.update({b + "ln_1.weight": [width], b + "ln_1.bias": [width], b + "attn.in_proj_weight": [3 * width, width],
                    b + "attn.in_proj_bias": [3 * width], b + "attn.out_proj.weight": [width, width],
                    b + "attn.out_proj.bias": [width], b + "ln_2.weight": [width], b + "ln_2.bias": [width],
                    b + "mlp.c_fc.weight": [mlp, width], b + "mlp.c_fc.bias": [mlp],
                    b + "mlp.c_proj.weight": [width, mlp], b + "mlp.c_proj.bias": [width]})
    return {OPEN_CLIP + k: v for k, v in out.items()}


def sd2_entries() -> dict[str, list[int]]:
    """Every tensor of an SD 2.x single file (v2-1_768-ema-pruned.safetensors layout): SD v1.5's U-Net names with
    1024-wide cross-attention keys and values and Linear proj_in / proj_out, SD v1.5's VAE, the OpenCLIP tower, and
    the noise-schedule buffers."""
    m = load_manifest()
    out = {}
    for k, shape in m["ldm"].items():
        if k.startswith("cond_stage_model."):
            continue
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            shape = [shape[0], 1024]
        elif k.endswith(("proj_in.weight", "proj_out.weight")) and k.startswith("model.diffusion_model."):
            shape = shape[:2]
        out[k] = shape
    out.update({k: v for k, v in m["ldm_extras"].items() if not k.startswith(("cond_stage_model.", "model_ema."))})
    return {**out, **open_clip_entries()}


def random_open_clip(width, blocks, mlp, seed=0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A small OpenCLIP text tower of seeded random values: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1²),
    other vectors ~ N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in open_clip_entries(width, blocks, mlp).items():
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            x = x / math.sqrt(shape[1])
        else:
            x = 1.0 + 0.1 * x if (k.endswith("weight") and "ln_" in k) else 0.1 * x
        out[k] = x.to(dtype)
    return out


def write_tokenizer(root, pad_token="!") -> Path:
    """A tokenizer/ folder as SD 2's diffusers folders hold it: CLIP's vocab.json and merges.txt, a
    tokenizer_config.json and a special_tokens_map.json (its tokens in the AddedToken form) naming the pad token."""
    vocab, merges = clip_vocab_and_merges()
    sub = Path(root) / "tokenizer"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (sub / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}), encoding="utf-8")
    (sub / "special_tokens_map.json").write_text(json.dumps({k: {
        "content": v, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        for k, v in special.items()}), encoding="utf-8")
    return sub


def folder_from_single_file(path, root, variant: str) -> Path:
    """The networks of an SD 2.x single file as a diffusers folder of the variant ("2.1" or "2.1-base"): each
    component converted by diffusers' own single-file functions, one at a time, written in the file's dtype with
    the variant's configs, plus the tokenizer and the scheduler config."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, prediction_type, vae_size = VARIANTS[variant]
    root = Path(root)
    with torch.device("meta"):
        text_model = CLIPTextModel(CLIPTextConfig(**TEXT_2))
    convert = {
        "unet": ("model.diffusion_model.", lambda c: convert_ldm_unet_checkpoint(c, unet_cfg), unet_cfg,
                 "diffusion_pytorch_model.safetensors"),
        "vae": ("first_stage_model.", lambda c: convert_ldm_vae_checkpoint(c, VAE_2), {**VAE_2, "sample_size": vae_size},
                "diffusion_pytorch_model.safetensors"),
        "text_encoder": (OPEN_CLIP, lambda c: convert_open_clip_checkpoint(text_model, c),
                         {**TEXT_2, "architectures": ["CLIPTextModel"]}, "model.safetensors"),
    }
    for component, (prefix, fn, config, weights) in convert.items():
        with safe_open(str(path), "pt") as f:
            ckpt = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        state = {k: v.contiguous() for k, v in fn(ckpt).items()}
        del ckpt
        (root / component).mkdir(parents=True)
        save_file(state, str(root / component / weights))
        (root / component / "config.json").write_text(json.dumps(config))
        del state
    write_tokenizer(root)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER_2,
                                                                         "prediction_type": prediction_type}))
    return root
