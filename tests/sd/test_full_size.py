"""The researcher's path at SD v1.5's real size: train.py and sample.py end to end on full-size networks of random
weights, in the three layouts a user brings: a float32 single file, a float16 "-fp16" single file, and a diffusers
folder (in float16) named by a Tune-A-Video config (its YAML as its repository writes them). Each command runs in its own
process, one after the other, and each layout's files are made just before its run and deleted after it, so no two
full-size models are ever held in memory, and at most two on disk. Small frames (2 of 64 px), 2 training steps and
2 DDIM steps keep it to about 3 minutes on 2 CPU cores."""
import json
import shutil
import subprocess
import sys

import torch
from PIL import Image

from apla.eval.score import sample_stem
from apla.run import PROGRESSION_HEADER
from tests.conftest import ldm_entries, write_checkpoint
from tests.helpers.runs import BBB, ROOT, trained_weights

PROMPT, EDIT = "a rabbit in a meadow", "a tiger in a meadow"
FOLDER_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                  "text_encoder": "model.safetensors"}
# Tune-A-Video's configs/*.yaml, with its field names and layout; the model folder and the clip are local
TAV_CONFIG = """\
pretrained_model_path: "{model}"
output_dir: "{out}"

train_data:
  video_path: "{clip}"
  prompt: "{prompt}"
  n_sample_frames: 2
  width: 64
  height: 64
  sample_start_idx: 0
  sample_frame_rate: 1

validation_data:
  prompts:
    - "{edit}"
  video_length: 2
  width: 64
  height: 64
  num_inference_steps: 2
  guidance_scale: 12.5
  use_inv_latent: True
  num_inv_steps: 2

learning_rate: 3e-5
train_batch_size: 1
max_train_steps: 2
checkpointing_steps: 2
validation_steps: 2
trainable_modules:
  - "attn1.to_q"
  - "attn2.to_q"
  - "attn_temp"

seed: 33
mixed_precision: fp16
use_8bit_adam: False
gradient_checkpointing: True
enable_xformers_memory_efficient_attention: True

apla:
  vgt: pure
"""


def diffusers_folder(root, manifest):
    """The full-size networks in diffusers' layout: a config.json and a safetensors file per component, in float16
    as diffusers' fp16 variants are (half the bytes to write and read; a float32 file is the single file's run)."""
    for component, weights in FOLDER_WEIGHTS.items():
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text(json.dumps(manifest["configs"][component]))
        write_checkpoint(root / component / weights, manifest["diffusers"][component], seed=1,
                         float_dtype=torch.float16)
    return root


def run_script(name, *args):
    res = subprocess.run([sys.executable, str(ROOT / name), *map(str, args), "--no-progress", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, f"{name} {' '.join(map(str, args))}:\n{res.stderr[-2000:]}"
    return res


def test_train_and_sample_at_full_size_in_every_layout(sd15_single_file, sd15_manifest, tmp_path):
    weights = tmp_path / "weights"  # gigabytes: each layout deleted after its run, all at the end whatever happens
    weights.mkdir()
    try:
        flags = ["--video", BBB, "--prompt", PROMPT, "--frames", 2, "--size", 64, "--max-steps", 2, "--vgt", "pure",
                 "--seed", 0]
        run = tmp_path / "run-fp32"
        check_run(run, ["--pretrained", sd15_single_file, *flags, "--output-dir", run], ["--prompt", EDIT])

        fp16 = write_checkpoint(weights / "sd15-fp16.safetensors", ldm_entries(sd15_manifest),
                                float_dtype=torch.float16)
        run = tmp_path / "run-fp16"
        check_run(run, ["--pretrained", fp16, *flags, "--output-dir", run], ["--prompt", EDIT])
        fp16.unlink()

        folder = diffusers_folder(weights / "sd15", sd15_manifest)
        yaml_path = tmp_path / "rabbit.yaml"
        run = tmp_path / "run-folder"  # the config's output_dir
        yaml_path.write_text(TAV_CONFIG.format(model=folder, out=run, clip=BBB, prompt=PROMPT, edit=EDIT))
        res = check_run(run, ["--config", yaml_path], [])
        assert sum(line.startswith("note:") for line in res.stderr.splitlines()) == 1  # xformers, 8-bit Adam, ...
    finally:
        shutil.rmtree(weights, ignore_errors=True)


def check_run(run, train_args, sample_args):
    """2 steps of VGT-Pure with the hyper-loss and D into `run` (which train_args name), then DDIM inversion of the
    clip and the edit (2 steps each); the run and its samples are deleted once checked. Returns train.py's result."""
    name = run.name
    res = run_script("train.py", *train_args)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2], name
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in log), name
    assert {"mse", "l1", "perceptual", "adv_g", "disc"} <= set(log[-1]), name  # hyper-loss and D both on
    weights = trained_weights(run)
    for part in ("unet.", "vgt.", "disc."):
        assert any(k.startswith(part) for k in weights), (name, part)
    assert all(".attn_temp." in k or ".attn1.to_q." in k or ".attn2.to_q." in k or ".norm_temp." in k
               for k in weights if k.startswith("unet.")), name  # Tune-A-Video's trainable set only
    cfg = json.loads((run / "config.json").read_text())
    sampled = [r["step"] for r in log if "sample_time" in r]  # 100 at SD size unless the config says otherwise
    assert sampled == [s for s in (1, 2) if s % cfg["sample_every"] == 0], name
    if sampled:  # samples while training: a GIF per prompt at step 2, and the progression
        gifs = sorted(p.name for p in (run / "samples" / "step-000002").glob("*.gif"))
        assert gifs == sorted(f"{sample_stem(p)}.gif" for p in (PROMPT, EDIT)), name
        with Image.open(run / "samples" / "progression.png") as im:
            assert im.size == (64, PROGRESSION_HEADER + 2 * 3 * 64), name  # one step; per prompt 3 frames

    out = run.parent / f"samples-{name}"
    run_script("sample.py", "--run", run, "--steps", 2, *sample_args, "--out", out)
    prompts = [EDIT] if sample_args else [cfg["prompt"], *cfg["edit_prompts"]]  # a config's validation prompts
    for prompt in prompts:
        with Image.open(out / f"{sample_stem(prompt)}.gif") as im:
            assert im.size == (64, 64) and im.n_frames == 2, (name, prompt)
    shutil.rmtree(run)
    shutil.rmtree(out)
    return res
