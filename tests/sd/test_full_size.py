"""The researcher's path at SD v1.5's real size: train.py and sample.py end to end on full-size networks of random
weights, in the three layouts a user brings (a float32 single file, a float16 "-fp16" single file, a diffusers
folder). Each command runs in its own process, one after the other, so no two full-size models are ever held at
once. Small frames (2 of 64 px), 2 training steps and 2 DDIM steps keep it to minutes on a CPU."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from apla.eval.score import sample_stem
from tests.conftest import ldm_entries, write_checkpoint
from tests.helpers.runs import BBB, ROOT, trained_weights

PROMPT, EDIT = "a rabbit in a meadow", "a tiger in a meadow"
# About 8 minutes on 2 CPU cores (six processes each load 4.5 GB), so the default suite leaves it out.
pytestmark = pytest.mark.skipif(os.environ.get("APLA_FULL_SIZE") != "1",
                                reason="SD at full size end to end: set APLA_FULL_SIZE=1 to run it (about 8 minutes)")
FOLDER_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                  "text_encoder": "model.safetensors"}


def diffusers_folder(root, manifest):
    """The full-size networks in diffusers' layout: a config.json and a safetensors file per component."""
    for component, weights in FOLDER_WEIGHTS.items():
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text(json.dumps(manifest["configs"][component]))
        write_checkpoint(root / component / weights, manifest["diffusers"][component], seed=1)
    return root


def run_script(name, *args):
    res = subprocess.run([sys.executable, str(ROOT / name), *map(str, args), "--no-progress", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, f"{name} {' '.join(map(str, args))}:\n{res.stderr[-2000:]}"


def test_train_and_sample_at_full_size_in_every_layout(sd15_single_file, sd15_manifest, tmp_path):
    weights_dir = tmp_path / "weights"  # gigabytes: deleted at the end, whatever happens
    weights_dir.mkdir()
    try:
        fp16 = write_checkpoint(weights_dir / "sd15-fp16.safetensors", ldm_entries(sd15_manifest),
                                float_dtype=torch.float16)
        folder = diffusers_folder(weights_dir / "sd15", sd15_manifest)
        layouts = {"fp32": sd15_single_file, "fp16": fp16, "folder": folder}
        for name, pretrained in layouts.items():
            train_and_sample(name, pretrained, tmp_path)
    finally:
        shutil.rmtree(weights_dir, ignore_errors=True)


def train_and_sample(name, pretrained, tmp_path):
    """2 steps of VGT-Pure with the hyper-loss and D, then DDIM inversion of the clip and one edit of 2 steps."""
    run = tmp_path / f"run-{name}"
    run_script("train.py", "--pretrained", pretrained, "--video", BBB, "--prompt", PROMPT, "--frames", 2, "--size", 64,
               "--max-steps", 2, "--vgt", "pure", "--seed", 0, "--output-dir", run)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2], name
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in log), name
    assert {"mse", "l1", "perceptual", "adv_g", "disc"} <= set(log[-1]), name  # hyper-loss and D both on
    weights = trained_weights(run)
    for part in ("unet.", "vgt.", "disc."):
        assert any(k.startswith(part) for k in weights), (name, part)
    assert all(".attn_temp." in k or ".attn1.to_q." in k or ".attn2.to_q." in k or ".norm_temp." in k
               for k in weights if k.startswith("unet.")), name  # Tune-A-Video's trainable set only

    out = tmp_path / f"samples-{name}"
    run_script("sample.py", "--run", run, "--steps", 2, "--prompt", EDIT, "--out", out)
    with Image.open(out / f"{sample_stem(EDIT)}.gif") as im:
        assert im.size == (64, 64) and im.n_frames == 2, name
