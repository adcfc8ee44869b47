"""What ships inside the package, by name: base models for `--pretrained` and clips for `--video`.

A bundled model is a diffusers-style folder under `apla/assets/`; a run on it starts from `TrainConfig`'s defaults,
which are sized to the micro model (apla.config.preset), and `CLIP_SCORERS` names the CLIP model its samples are
scored with. The library looks models, clips and scorers up here and never imports the code that made them.
"""
from __future__ import annotations

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

def model_path(name) -> Path | None:
    """The folder of a bundled model's name, or None for anything else (a file, a folder, a hub id)."""
    return MODELS.get(str(name))


def clip_scorer(pretrained) -> str | None:
    """The CLIP model a run on `pretrained` is scored with by default: a bundled model's (CLIP_SCORERS), named by its
    name or by the path of its folder, else None."""
    name = next((n for n, folder in MODELS.items() if Path(str(pretrained)).resolve() == folder), str(pretrained))
    return CLIP_SCORERS.get(name)


def resolve_video(video) -> str:
    """The path of a bundled clip's name, or `video` itself."""
    return str(CLIPS.get(str(video), video))
