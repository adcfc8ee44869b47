"""Export the micro Stable Diffusion as a diffusers-style folder (float16 safetensors, configs, tokenizer, scheduler):
`python -m apla.micro.pretrain --stage export` calls `export` once the three training stages are done.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from apla.checkpoint import atomic_save_safetensors, atomic_write_bytes, atomic_write_json
from apla.micro import MODEL_INDEX, SCHEDULER_CONFIG, TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG
from apla.micro.pretrain import load_ckpt, load_trained_text_encoder, load_trained_vae


def save_safetensors(state: dict, path: Path, dtype=torch.float16) -> None:
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    atomic_save_safetensors(state, path, metadata={"format": "pt"})


def stage_seconds(work: Path, stage: str) -> float:
    """Training seconds of a stage over all its runs (kept in its checkpoint; else estimated from the log)."""
    ck = load_ckpt(work / f"{stage}.pt")
    if "train_s" in ck:
        return float(ck["train_s"])
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    last = [r for r in records if r["stage"] == stage and "s_per_step" in r][-1]
    return last["s_per_step"] * int(ck["step"])


def export(work: Path, out: Path) -> None:
    """Write the diffusers folder: the U-Net's EMA weights, the text encoder, the VAE, configs, tokenizer, scheduler."""
    from apla.sd.text import clip_vocab_and_merges

    vae, ck = load_trained_vae(work), load_ckpt(work / "unet.pt")
    if ck is None:
        raise FileNotFoundError(f"{work / 'unet.pt'}: run --stage unet first")
    scaling_factor = json.loads((work / "latent_stats.json").read_text())["scaling_factor"]
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    save_safetensors(vae.state_dict(), out / "vae" / "diffusion_pytorch_model.safetensors")
    atomic_write_json(out / "vae" / "config.json", {**VAE_CONFIG, "scaling_factor": round(scaling_factor, 5)})
    save_safetensors(ck["ema"]["unet"], out / "unet" / "diffusion_pytorch_model.safetensors")
    atomic_write_json(out / "unet" / "config.json", UNET_CONFIG)
    # SD v1.5's text_encoder/model.safetensors names carry the `text_model.` prefix
    text_state = load_trained_text_encoder(work).state_dict()
    save_safetensors({"text_model." + k: v for k, v in text_state.items()},
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
    atomic_write_json(out / "pretrain_record.json", {
        "vae_steps": int(load_ckpt(work / "vae.pt")["step"]), "vae_train_s": round(stage_seconds(work, "vae")),
        "text_steps": int(load_ckpt(work / "text.pt")["step"]), "text_train_s": round(stage_seconds(work, "text")),
        "unet_steps": int(ck["step"]), "unet_train_s": round(stage_seconds(work, "unet")),
        "scaling_factor": scaling_factor, "pretrain_config": json.loads((work / "pretrain_config.json").read_text())})
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported to {out} ({total / 2**20:.1f} MiB)", flush=True)
