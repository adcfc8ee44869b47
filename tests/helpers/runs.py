"""train.py and sample.py as the tests call them: the scripts loaded as modules (their `main(argv)` is what the command
line runs), the flags of a run on the tiny model of `tiny_sd`, and what a run leaves behind."""
import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from apla import checkpoint as ckpt
from tests.helpers.tiny_sd import TINY_RUN, make_tiny_sd

ROOT = Path(__file__).resolve().parents[2]
BBB = ROOT / "tests" / "data" / "bigbuckbunny_cut.mp4"
SHAPES_GIF = ROOT / "apla" / "assets" / "shapes_red_circle_right.gif"


def script(name):
    """ROOT/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"apla_script_{name}", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = script("train")
sample = script("sample")


def make_tiny(root, other: bool = False) -> dict:
    """The tiny model (and, with `other`, a second one of other weights) and a config file sized to it."""
    root = Path(root)
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY_RUN))
    out = {"model": str(make_tiny_sd(root / "sd")), "config": str(cfg)}
    if other:
        out["other"] = str(make_tiny_sd(root / "sd_other", seed=1))
    return out


def train_args(tiny, out, steps=3, video=SHAPES_GIF, frames=4, *extra):
    return ["--config", tiny["config"], "--pretrained", tiny["model"], "--video", str(video), "--prompt",
            "a red circle moving to the right", "--output-dir", str(out), "--max-steps", str(steps), "--frames",
            str(frames), "--size", "64", "--seed", "0", "--no-progress", "--device", "cpu", *extra]


def run_exit(fn, argv):
    """The exit status of fn(argv), which must end in SystemExit."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


def trained_weights(run):
    return load_file(str(ckpt.latest_checkpoint(run) / "weights.safetensors"))


def logged_steps(run) -> list:
    """The step of every record of RUN/log.jsonl, in file order."""
    return [json.loads(line)["step"] for line in (Path(run) / "log.jsonl").read_text().splitlines()]
