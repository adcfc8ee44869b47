"""Write the micro Stable Diffusion as a diffusers-style folder (float16 safetensors, configs, tokenizer, scheduler)
from its trained networks: `python -m apla.micro.pretrain --stage export` reads them from the stages' checkpoints
(`apla.micro.pretrain.export_trained`) and calls `export`. This module knows the folder's layout, not the checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

from apla.checkpoint import atomic_save_safetensors, atomic_write_bytes, atomic_write_json
from apla.micro import MODEL_INDEX, SCHEDULER_CONFIG, TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG
from apla.sd.text import clip_vocab_and_merges


def save_safetensors(state: dict, path: Path, dtype=torch.float16) -> None:
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    atomic_save_safetensors(state, path, metadata={"format": "pt"})


def export(out: Path, vae: torch.nn.Module, unet_state: dict, text_encoder: torch.nn.Module, scaling_factor: float,
           record: dict) -> None:
    """Write the diffusers folder: the VAE, the U-Net's weights `unet_state` (diffusers names), the text encoder,
    configs (the VAE's with the measured `scaling_factor`), tokenizer, scheduler, and `record` as
    pretrain_record.json (how the networks were trained)."""
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    save_safetensors(vae.state_dict(), out / "vae" / "diffusion_pytorch_model.safetensors")
    atomic_write_json(out / "vae" / "config.json", {**VAE_CONFIG, "scaling_factor": round(scaling_factor, 5)})
    save_safetensors(unet_state, out / "unet" / "diffusion_pytorch_model.safetensors")
    atomic_write_json(out / "unet" / "config.json", UNET_CONFIG)
    # SD v1.5's text_encoder/model.safetensors names carry the `text_model.` prefix
    save_safetensors({"text_model." + k: v for k, v in text_encoder.state_dict().items()},
                     out / "text_encoder" / "model.safetensors")
    atomic_write_json(out / "text_encoder" / "config.json", TEXT_ENCODER_CONFIG)
    vocab, merges = clip_vocab_and_merges()
    atomic_write_json(out / "tokenizer" / "vocab.json", vocab)
    atomic_write_bytes(out / "tokenizer" / "merges.txt",
                       ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode("utf-8"))
    atomic_write_json(out / "tokenizer" / "tokenizer_config.json",
                      {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                       "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "do_lower_case": True})
    atomic_write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    atomic_write_json(out / "model_index.json", MODEL_INDEX)
    atomic_write_json(out / "pretrain_record.json", record)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported to {out} ({total / 2**20:.1f} MiB)", flush=True)
