"""Tune-A-Video's YAML configs read as they are (apla.tav): a config in its repository's format trains and samples
on the micro model; its fields land on ours; an unknown key or an unsupported value is one line and exit status 2."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from apla import loop, tav
from apla.algorithm import APLA
from apla.cli import parse_train_args
from apla.eval.score import sample_stem
from tests.helpers.runs import SHAPES_GIF, run_exit, sample, train, trained_weights

# Written as Tune-A-Video's configs/*.yaml are: its field names, its layout, its float spelling ("3e-5" without a dot,
# which YAML reads as a string); the paths point at a local folder and clip.
CONFIG = """\
pretrained_model_path: "micro"
output_dir: "{out}"

train_data:
  video_path: "{clip}"
  prompt: "a red circle moving to the right"
  n_sample_frames: 4
  width: 64
  height: 64
  sample_start_idx: 1
  sample_frame_rate: 2

validation_data:
  prompts:
    - "a blue circle moving to the right"
    - "a red square moving to the right"
  video_length: 4
  width: 64
  height: 64
  num_inference_steps: 2
  guidance_scale: 4.5
  use_inv_latent: True
  num_inv_steps: 2

learning_rate: 2e-4
train_batch_size: 1
max_train_steps: 2
checkpointing_steps: 1
validation_steps: 2
trainable_modules:
  - "attn1.to_q"
  - "attn2.to_q"
  - "attn_temp"

seed: 7
mixed_precision: {precision}
use_8bit_adam: False
gradient_checkpointing: False
enable_xformers_memory_efficient_attention: True
"""


def write_config(tmp_path, extra: str = "", precision: str = "no"):
    clip = tmp_path / "data" / "circle.gif"
    clip.parent.mkdir()
    shutil.copy(SHAPES_GIF, clip)
    path = tmp_path / "circle.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "outputs" / "circle", clip=clip, precision=precision) + extra)
    return path


def test_tuneavideo_config_trains_and_samples_on_the_micro_model(tmp_path, capsys):
    path = write_config(tmp_path, "apla:\n  vgt: hyper\n  lam: 0.02\n")
    assert train.main(["--config", str(path), "--no-progress", "--device", "cpu"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "use_8bit_adam" in notes[0] and "xformers" in notes[0] and "num_inv_steps" in notes[0]
    run = tmp_path / "outputs" / "circle"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["pretrained"], cfg["frames"], cfg["size"], cfg["start"], cfg["stride"]) == ("micro", 4, 64, 1, 2)
    assert (cfg["lr"], cfg["disc_lr"], cfg["max_steps"], cfg["checkpoint_every"], cfg["seed"]) == (2e-4, 2e-4, 2, 1, 7)
    assert cfg["trainable"] == ["attn1.to_q", "attn2.to_q", "attn_temp"] and cfg["gradient_checkpointing"] is False
    assert cfg["edit_prompts"] == ["a blue circle moving to the right", "a red square moving to the right"]
    assert (cfg["sample_steps"], cfg["guidance"], cfg["mixed_precision"]) == (2, 4.5, "no")
    assert cfg["apla"]["vgt"] == "hyper" and cfg["apla"]["lam"] == 0.02 and cfg["apla"]["use_discriminator"]
    assert cfg["sample_every"] == 2 and len(list((run / "samples" / "step-000002").glob("*.gif"))) == 3
    # sample.py on the run: the config's validation prompts, steps and guidance
    assert sample.main(["--run", str(run), "--no-progress", "--no-metrics", "--device", "cpu"]) == 0
    for prompt in [cfg["prompt"], *cfg["edit_prompts"]]:
        with Image.open(run / "samples" / f"{sample_stem(prompt)}.gif") as im:
            assert im.size == (64, 64) and im.n_frames == 4


def test_flags_override_a_tuneavideo_config(tmp_path):
    path = write_config(tmp_path)
    out = tmp_path / "other"
    assert train.main(["--config", str(path), "--output-dir", str(out), "--max-steps", "1", "--no-discriminator",
                       "--no-progress", "--device", "cpu"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_steps"] == 1 and cfg["apla"]["use_discriminator"] is False and cfg["frames"] == 4


@pytest.mark.parametrize("extra, words", [
    ("frobnicate: 3\n", "unknown key frobnicate"),
    ("train_data_extra: 1\n", "unknown key train_data_extra"),
    ("train_batch_size: 2\n", "train_batch_size"),
    ("resume_from_checkpoint: latest\n", "--resume"),
])
def test_unknown_or_unsupported_key_is_one_line_and_exit_2(tmp_path, capsys, extra, words):
    path = write_config(tmp_path, extra)
    assert run_exit(train.main, ["--config", str(path), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and str(path) in err[0], err


def test_nested_unknown_key_is_named_with_its_table():
    with pytest.raises(ValueError, match=r"train_data\.fps"):
        tav.from_tuneavideo({"train_data": {"fps": 8}})


def test_validation_shape_must_match_the_training_clip():
    with pytest.raises(ValueError, match="video_length"):
        tav.from_tuneavideo({"train_data": {"n_sample_frames": 8}, "validation_data": {"video_length": 24}})


def test_yaml_float_without_a_dot_is_read_as_a_number():
    values, _ = tav.from_tuneavideo(yaml.safe_load("learning_rate: 3e-5\nvalidation_data:\n  guidance_scale: 7\n"))
    assert values["lr"] == 3e-5 and values["disc_lr"] == 3e-5 and values["guidance"] == 7


def test_yaml_no_precision_is_no():
    assert tav.from_tuneavideo(yaml.safe_load("mixed_precision: no\n"))[0]["mixed_precision"] == "no"


def test_width_and_height_map_onto_size_as_height_x_width(tmp_path):
    """train_data's height 48 and width 64 are --size 48x64; a side left out is Tune-A-Video's default 512, as its
    dataset has it; equal sides are a square."""
    values, _ = tav.from_tuneavideo(yaml.safe_load("train_data:\n  height: 48\n  width: 64\n"
                                                   "validation_data:\n  height: 48\n  width: 64\n"))
    assert values["size"] == [48, 64]
    assert tav.from_tuneavideo({"train_data": {"width": 64}})[0]["size"] == [tav.TAV_SIDE, 64]
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("width: 64", "width: 96"))
    cfg, _ = parse_train_args(["--config", str(path)])
    assert cfg.size == (64, 96) and cfg.to_dict()["size"] == (64, 96)
    path.write_text(path.read_text().replace("width: 96", "width: 64"))
    assert parse_train_args(["--config", str(path)])[0].size == 64


def test_a_side_that_is_no_multiple_of_8_is_one_line_and_exit_2(tmp_path, capsys):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("width: 64", "width: 60"))
    assert run_exit(train.main, ["--config", str(path), "--no-progress", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and "size must be" in err[0] and "(64, 60)" in err[0], err


SCHEDULED = """\
lr_scheduler: "cosine"
lr_warmup_steps: 2
gradient_accumulation_steps: 2
report_to: "tensorboard"
"""


def test_a_scheduled_accumulated_tensorboard_config_trains_resumes_bit_exactly_and_reports(tmp_path, monkeypatch):
    """A Tune-A-Video config with a cosine schedule and warmup, 2 draws per update and report_to tensorboard runs as
    written: the learning rate follows the schedule update by update; a run interrupted after its step-3 checkpoint
    (step 4 logged and reported) and resumed ends bit-equal to an uninterrupted one; and the TensorBoard events, read
    with TensorBoard's own reader, hold every number of log.jsonl once per step, and the samples' images."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    path = write_config(tmp_path, SCHEDULED)
    path.write_text(path.read_text().replace("max_train_steps: 2", "max_train_steps: 6")
                    .replace("checkpointing_steps: 1", "checkpointing_steps: 3"))
    argv = ["--config", str(path), "--no-progress", "--device", "cpu"]
    whole, cut = tmp_path / "whole", tmp_path / "outputs" / "circle"
    assert train.main(argv + ["--output-dir", str(whole)]) == 0

    real, calls = APLA.train_step, []

    def interrupted(self, *a, **k):  # Ctrl-C in the 5th update: steps 1-4 logged, the checkpoint at 3
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(APLA, "train_step", interrupted)
    assert run_exit(train.main, argv) == 130
    monkeypatch.undo()
    assert train.main(argv + ["--resume"]) == 0

    got, want = trained_weights(cut), trained_weights(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and all(len(r["t"]) == 2 for r in log)
    cfg = json.loads((cut / "config.json").read_text())
    assert (cfg["lr_scheduler"], cfg["lr_warmup_steps"], cfg["gradient_accumulation_steps"]) == ("cosine", 2, 2)
    assert [r["lr"] for r in log] == pytest.approx([2e-4 * loop.lr_factor(s, "cosine", 2, 6) for s in range(6)])
    assert log[0]["lr"] == 0.0 and log[2]["lr"] == 2e-4  # warmup from 0 over 2 updates, then the full rate

    board = reader.EventAccumulator(str(cut / loop.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    scalars = {tag.removeprefix("train/"): board.Scalars(tag) for tag in board.Tags()["scalars"]}
    numbers = {k for r in log for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert set(scalars) == numbers and {"mse", "total", "disc", "lr", "step_time", "sample_time"} <= numbers
    for key, events in scalars.items():
        logged = [(r["step"], r[key]) for r in log if key in r]
        assert [e.step for e in events] == [s for s, _ in logged], key  # each step once: step 4's first write purged
        assert [e.value for e in events] == [float(np.float32(v)) for _, v in logged], key  # TensorBoard's float32
    prompts = [cfg["prompt"], *cfg["edit_prompts"]]
    assert len(board.Tags()["images"]) == len(prompts)
    for tag in board.Tags()["images"]:
        images = board.Images(tag)
        assert [e.step for e in images] == [2, 4, 6] and all((e.width, e.height) == (4 * 64, 64) for e in images)
