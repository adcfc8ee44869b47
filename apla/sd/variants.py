"""What a single Stable Diffusion file is, told from its tensor names and its file name alone, without reading a
weight: SD v1.x or SD 2.x, and which SD 2.x variant. `apla.sd.weights` builds the networks from it
(`single_file_config`, where the choice is argued) and `apla.config.preset` sizes a run by it; both read it here.
"""
from __future__ import annotations

from pathlib import Path

SD2_TEXT_PREFIX = "cond_stage_model.model."  # OpenCLIP's text tower: only SD 2.x files have it
# What an SD 2.x single file cannot tell: its variant's prediction type and latent sample size (x8 = pixels)
SD2_VARIANTS = {
    "768-v": dict(prediction_type="v_prediction", sample_size=96),
    "512-base": dict(prediction_type="epsilon", sample_size=64),
}


def is_sd2(keys) -> bool:
    """Whether a single file's tensor names hold SD 2.x's OpenCLIP text tower."""
    return any(k.startswith(SD2_TEXT_PREFIX) for k in keys)


def sd2_variant(path) -> tuple[str, bool]:
    """(SD2_VARIANTS key, whether the file's name said it) of an SD 2.x single file: "768" in its name -> 768-v; else
    "512" or "base" -> 512-base; a name with neither -> 768-v (apla.sd.weights.single_file_config says why)."""
    stem = Path(str(path)).stem.lower()
    named = any(w in stem for w in ("768", "512", "base"))
    return ("768-v" if "768" in stem or not ("512" in stem or "base" in stem) else "512-base"), named
