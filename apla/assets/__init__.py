"""What ships inside the package, by name: base models for `--pretrained` and clips for `--video`.

A bundled model is a diffusers-style folder under `apla/assets/`; it may hold `apla_preset.json`, the
`TrainConfig` fields (apla.config) that an APLA run on that model starts from (sizes tied to the model's scale),
and `CLIP_SCORERS` names the CLIP model its samples are scored with. The paper's modules look models, clips and
scorers up here and never import the code that made them (`apla.micro`).
"""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent

MODELS = {
    "micro": ASSETS / "micro",  # the micro SD pretrained on the shapes world (python -m apla.micro.pretrain)
}

CLIPS = {
    "bigbuckbunny": ASSETS / "bigbuckbunny_24f_512",             # 24 JPEG frames of Big Buck Bunny (CC BY 3.0), 912x512
    "red-circle-right": ASSETS / "shapes_red_circle_right.gif",  # the shapes world: a red circle moving right, 8 frames
}

# The CLIP model a bundled model's samples are scored with when the user names none (apla.eval.score): a name that
# a project registers in the entry-point group apla.clip_models; the micro project's "micro" is a CLIP trained on the
# shapes world the micro SD was pretrained on, so its scores need no download.
CLIP_SCORERS = {
    "micro": "micro",
}

PRESET_FILE = "apla_preset.json"


def model_path(name) -> Path | None:
    """The folder of a bundled model's name, or None for anything else (a file, a folder, a hub id)."""
    return MODELS.get(str(name))


def preset(pretrained) -> dict:
    """The TrainConfig fields a run on `pretrained` starts from: a bundled model's `apla_preset.json`, else {}
    (the dataclass defaults are SD v1.5's)."""
    folder = model_path(pretrained)
    if folder is None or not (folder / PRESET_FILE).is_file():
        return {}
    return json.loads((folder / PRESET_FILE).read_text())


def clip_scorer(pretrained) -> str | None:
    """The CLIP model a run on `pretrained` is scored with by default: a bundled model's (CLIP_SCORERS), else None."""
    return CLIP_SCORERS.get(str(pretrained))


def resolve_video(video) -> str:
    """The path of a bundled clip's name, or `video` itself."""
    return str(CLIPS.get(str(video), video))
