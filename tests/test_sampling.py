"""Sampling as a Python call (apla.sample, apla.sampling) on the tiny model: tensors that are what sample.py writes,
other frame counts and sizes where VGT allows and one-line refusals where it does not, the inverted latent kept per
checkpoint and settings, a base model sampled without a run, the grid of all prompts, metrics.json's paths."""
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import apla
from apla import checkpoint as ckpt
from apla import run as run_mod
from apla import sampling
from apla.config import TrainConfig
from apla.eval.score import GRID, sample_stem
from apla.sd.unet import UNet3DConditionModel
from apla.video import to_uint8
from tests.helpers.runs import SHAPES_GIF, make_tiny, run_exit, sample, train, train_args

pytest.importorskip("diffusers")

PROMPTS = ["a blue circle moving to the right", "a red square moving to the right"]
CPU = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 2-step run of 4 frames at 64x64 px (latents 4 x 8 x 8)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(train_args(tiny, run, 2)) == 0
    return run


def strips(folder: Path, prompts) -> list:
    """The PNG strips sample.py wrote for `prompts`, (H, F*W, 3) uint8 each."""
    return [np.asarray(Image.open(folder / f"{sample_stem(p)}.png").convert("RGB")) for p in prompts]


class Calls:
    """Counts of the U-Net's forward passes and of the clip's inversions while a block runs."""

    def __init__(self, monkeypatch):
        self.unet = self.inversions = 0
        forward, invert = UNet3DConditionModel.forward, run_mod.invert_clip

        def counted_forward(module, *a, **k):
            self.unet += 1
            return forward(module, *a, **k)

        def counted_invert(*a, **k):
            self.inversions += 1
            return invert(*a, **k)

        monkeypatch.setattr(UNet3DConditionModel, "forward", counted_forward)
        monkeypatch.setattr(run_mod, "invert_clip", counted_invert)


# ---------------------------------------------------------------------------------------------------------------
# The Python call, and sample.py writing what it returns
# ---------------------------------------------------------------------------------------------------------------

def test_sample_returns_videos_that_sample_py_writes(trained, tmp_path):
    videos = apla.sample(trained, PROMPTS, steps=2)
    assert len(videos) == 2
    for video in videos:
        assert video.shape == (4, 3, 64, 64) and video.dtype == torch.float32 and video.device.type == "cpu"
        assert video.min() >= -1 and video.max() <= 1
    assert not torch.equal(videos[0], videos[1])
    out = tmp_path / "samples"
    assert sample.main(["--run", str(trained), "--steps", "2", "--out", str(out), *CPU,
                        *[x for p in PROMPTS for x in ("--prompt", p)]]) == 0
    for written, video in zip(strips(out, PROMPTS), videos):  # the PNG strip is lossless: exactly the 8-bit frames
        assert np.array_equal(written, np.concatenate(list(to_uint8(video)), axis=1))


def test_no_inversion_at_another_frame_count_and_size_where_vgt_allows(trained):
    sampler = sampling.load_run(trained, device="cpu")
    one = sampling.sample(sampler, PROMPTS[0], invert=False, frames=2, size=48, steps=2, seed=1)[0]
    assert one.shape == (2, 3, 48, 48)
    assert torch.equal(one, sampling.sample(sampler, [PROMPTS[0]], invert=False, frames=2, size=48, steps=2,
                                            seed=1)[0])  # seeded
    other_seed = sampling.sample(sampler, PROMPTS[0], invert=False, frames=2, size=48, steps=2, seed=2)[0]
    no_vgt = sampling.sample(sampler, PROMPTS[0], invert=False, frames=2, size=48, steps=2, seed=1, use_vgt=False)[0]
    assert not torch.equal(one, other_seed) and not torch.equal(one, no_vgt)  # phi is added at the smaller size
    wide = sampling.sample(sampler, PROMPTS[0], invert=False, size="32x64", steps=1)[0]
    assert wide.shape == (4, 3, 32, 64)


def test_requests_vgt_or_inversion_cannot_honour_are_one_line(trained, tmp_path, capsys):
    sampler = sampling.load_run(trained, device="cpu")
    for frames, size, limit in ((8, None, "8 frames at 64x64 px is past them"),
                                (4, 128, "4 frames at 128x128 px is past them"), (4, 56, "multiple of 16 px")):
        with pytest.raises(sampling.SamplingError, match=limit) as e:
            sampling.sample(sampler, PROMPTS[0], invert=False, frames=frames, size=size, steps=1)
        assert "trained on 4 frames at 64x64 px" in str(e.value) and "--no-vgt" in str(e.value)
        assert "\n" not in str(e.value)
    # without VGT, the U-Net alone takes more frames and a larger size
    assert sampling.sample(sampler, PROMPTS[0], invert=False, frames=8, size=128, steps=1, use_vgt=False)[0].shape \
        == (8, 3, 128, 128)
    with pytest.raises(sampling.SamplingError, match="with inversion the samples have the clip's 4 frames at 64x64"):
        sampling.sample(sampler, PROMPTS[0], frames=2, steps=1)
    out = tmp_path / "refused"
    for extra in (["--no-inversion", "--frames", "8"], ["--frames", "2"], ["--no-inversion", "--size", "70"]):
        assert run_exit(sample.main, ["--run", str(trained), "--steps", "1", "--out", str(out), *CPU, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
    assert not out.exists()  # refused before anything is written


def test_vgt_limit_is_the_clips_own_sides_not_its_square_table():
    """A wide clip's VGT holds a square table of positions (sample_size = the longer side), so VGT itself would take a
    taller frame; only the clip's own h x w crop of it was trained, and the limit says so."""
    from apla.vgt import VGT, VGTConfig

    trained = (1, 4, 4, 6, 8)  # a 48x64 clip's latents
    assert sampling.vgt_limit((1, 4, 4, 6, 8), trained, 2, 8) is None
    assert sampling.vgt_limit((1, 4, 2, 4, 4), trained, 2, 8) is None
    vgt = VGT(VGTConfig(sample_size=8, max_frames=4, width=8, spatial_depth=1, temporal_depth=1, heads=2,
                        mlp_hidden=8))
    assert vgt(torch.zeros(1, 4, 4, 8, 8), 10).shape == (1, 4, 4, 8, 8)  # loads: rows 6-7 of the table untrained
    assert "4 frames at 64x64 px is past them" in sampling.vgt_limit((1, 4, 4, 8, 8), trained, 2, 8)
    assert "multiple of 16 px" in sampling.vgt_limit((1, 4, 4, 5, 8), trained, 2, 8)


# ---------------------------------------------------------------------------------------------------------------
# The inverted latent, kept per checkpoint and settings
# ---------------------------------------------------------------------------------------------------------------

def test_a_second_sample_reuses_the_inversion_and_a_new_checkpoint_inverts_again(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train.main(train_args(tiny, run, 1)) == 0
    argv = ["--run", str(run), "--steps", "3", "--prompt", PROMPTS[0], "--no-metrics", *CPU]
    calls, outs = Calls(monkeypatch), {}
    for name in ("first", "second"):
        before = (calls.unet, calls.inversions)
        assert sample.main(argv + ["--out", str(tmp_path / name)]) == 0
        outs[name] = (calls.unet - before[0], calls.inversions - before[1])
    assert outs["first"][1] == 1 and outs["second"][1] == 0  # the second call does not invert
    assert outs["first"][0] - outs["second"][0] == 3  # the 3 U-Net passes of the inversion, and only those, saved
    assert np.array_equal(strips(tmp_path / "first", PROMPTS[:1])[0], strips(tmp_path / "second", PROMPTS[:1])[0])
    kept = sorted(p.name for p in (run / "inversions").iterdir())
    assert len(kept) == 1 and kept[0].startswith("step-000001-ddim3-vgt-no-"), kept
    with safe_open(str(run / "inversions" / kept[0]), "pt") as f:
        assert f.metadata()["checkpoint_step"] == "1" and f.metadata()["prompt"] == ""
        assert tuple(f.get_tensor("z_T").shape) == (1, 4, 4, 8, 8)

    def inversions_of(extra) -> int:
        before = calls.inversions
        assert sample.main(argv + ["--out", str(tmp_path / "other"), *extra]) == 0
        return calls.inversions - before

    assert inversions_of(["--no-vgt"]) == 1 and inversions_of(["--no-vgt"]) == 0  # another setting: its own file
    assert inversions_of(["--steps", "2"]) == 1 and inversions_of(["--steps", "2"]) == 0
    assert inversions_of(["--no-inversion"]) == 0
    assert train.main(train_args(tiny, run, 2, SHAPES_GIF, 4, "--resume")) == 0  # a new checkpoint
    assert inversions_of([]) == 1 and inversions_of([]) == 0
    assert any(p.name.startswith("step-000002-ddim3-vgt-") for p in (run / "inversions").iterdir())

    # the same step written again with other weights is another checkpoint; a damaged file is inverted again
    path = ckpt.latest_checkpoint(run) / "weights.safetensors"
    weights = load_file(str(path))
    key = next(k for k in weights if k.startswith("vgt."))
    weights[key] = weights[key] + 1e-3
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(weights, str(path), metadata=metadata)
    assert inversions_of([]) == 1 and inversions_of([]) == 0
    for kept in (run / "inversions").iterdir():
        kept.write_bytes(kept.read_bytes()[:40])
    assert inversions_of([]) == 1 and inversions_of([]) == 0


def test_a_run_folder_that_cannot_keep_the_inversion_still_samples(trained, tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(trained / "inversions" / "x.safetensors"))

    monkeypatch.setattr(ckpt, "atomic_save_safetensors", full)
    assert sample.main(["--run", str(trained), "--steps", "5", "--prompt", "x", "--no-metrics", "--out",
                        str(tmp_path / "s"), *CPU]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "inversion is not kept" in line]
    assert len(notes) == 1 and "no space left on device" in notes[0], notes
    assert (tmp_path / "s" / f"{sample_stem('x')}.gif").is_file()
    assert not any("ddim5" in p.name for p in (trained / "inversions").glob("*"))


def test_the_python_call_reuses_the_inversion_sample_py_kept(trained, tmp_path, monkeypatch):
    assert sample.main(["--run", str(trained), "--steps", "4", "--prompt", PROMPTS[1], "--no-metrics", "--out",
                        str(tmp_path / "s"), *CPU]) == 0
    calls = Calls(monkeypatch)
    video = apla.sample(trained, PROMPTS[1], steps=4)[0]
    assert calls.inversions == 0
    assert np.array_equal(strips(tmp_path / "s", PROMPTS[1:])[0], np.concatenate(list(to_uint8(video)), axis=1))


# ---------------------------------------------------------------------------------------------------------------
# A base model without a run
# ---------------------------------------------------------------------------------------------------------------

def test_a_base_model_samples_without_a_run(tiny, tmp_path, capsys, monkeypatch):
    caption = "a red circle moving to the right"  # the clip's, which the base model is not told
    foreign = Path(shutil.copy(SHAPES_GIF, tmp_path / "clip.gif"))  # not the base model's own clip: no caption
    base = sampling.load_base(tiny["model"], foreign, frames=4, size=64, device="cpu")
    assert base.model.vgt is None and base.model.disc is None and base.run_dir is None
    assert base.cfg.prompt == "" and sampling.latent_shape(base) == (1, 4, 4, 8, 8)
    calls = Calls(monkeypatch)
    first = apla.sample(base, caption, steps=2)[0]
    again = apla.sample(sampling.load_base(tiny["model"], foreign, frames=4, size=64, device="cpu"), caption,
                        steps=2)[0]
    assert first.shape == (4, 3, 64, 64) and torch.equal(first, again)  # its fresh temporal layers seeded
    assert calls.inversions == 2  # no run directory to keep the inversion in
    # any frame count and size without inversion: no VGT to bound them
    assert apla.sample(base, PROMPTS[0], invert=False, frames=6, size=32, steps=1)[0].shape == (6, 3, 32, 32)
    with pytest.raises(sampling.SamplingError, match="caption is not known"):
        apla.sample(base)

    out = tmp_path / "base"
    assert sample.main(["--pretrained", tiny["model"], "--video", str(foreign), "--frames", "4", "--size", "64",
                        "--prompt", caption, "--steps", "2", "--out", str(out), *CPU]) == 0
    assert np.array_equal(strips(out, [caption])[0], np.concatenate(list(to_uint8(first)), axis=1))
    report = json.loads((out / "metrics.json").read_text())
    assert report["files"][caption][0] == f"{sample_stem(caption)}.gif"  # relative to the samples' folder
    assert "psnr" in report["videos"][0]["metrics"]  # of unknown caption, not an edit: scored as a reconstruction
    capsys.readouterr()
    for argv in (["--video", str(SHAPES_GIF), "--run", str(tmp_path)], ["--video", str(foreign)]):
        argv += ["--pretrained", tiny["model"], "--frames", "4", "--size", "64", "--out", str(tmp_path / "no"), *CPU]
        assert run_exit(sample.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("takes no --run" in err[0] or "--prompt" in err[0]), err
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------------------------
# Outputs: the grid of all prompts, metrics.json's paths, the samples written while training
# ---------------------------------------------------------------------------------------------------------------

def test_grid_of_all_prompts_labelled_and_paths_relative_to_the_run(trained, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    assert sample.main(["--run", str(run), "--steps", "2", *CPU, *[x for p in PROMPTS for x in ("--prompt", p)]]) == 0
    samples = run / "samples"
    with Image.open(samples / f"{GRID}.png") as im:
        grid = np.asarray(im.convert("RGB"))
    rows = grid.shape[0] // len(PROMPTS)
    assert grid.shape[0] == len(PROMPTS) * rows and rows >= 64
    for i, strip in enumerate(strips(samples, PROMPTS)):  # each prompt's row: its label, then its frames
        band = grid[i * rows:(i + 1) * rows]
        label = band[:, :band.shape[1] - strip.shape[1]]
        assert np.array_equal(band[:64, -strip.shape[1]:], strip)
        assert (label < 100).any() and (label == 255).mean() > 0.5  # dark text on white
    with Image.open(samples / f"{GRID}.gif") as im:
        assert im.n_frames == 4 and im.size == (grid.shape[1] - 3 * 64, grid.shape[0])

    report = json.loads((samples / "metrics.json").read_text())
    assert [Path(f).parent for p in PROMPTS for f in report["files"][p]] == [Path("samples")] * (2 * len(
        report["files"][PROMPTS[0]]))
    assert GRID not in {r["name"] for r in report["videos"]}
    moved = Path(shutil.move(run, tmp_path / "moved"))  # a moved run folder still points at its files
    assert all((moved / f).is_file() for files in report["files"].values() for f in files)
    assert sample.main(["--run", str(moved), "--steps", "2", "--prompt", "x", "--out", str(tmp_path / "outside"),
                        *CPU]) == 0
    outside = json.loads((tmp_path / "outside" / "metrics.json").read_text())["files"]["x"]
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in outside)  # outside the run: absolute


def test_samples_while_training_take_the_configs_sample_steps():
    """--sample-every's samples use the run's sample_steps (Tune-A-Video's validation_data.num_inference_steps)."""
    from apla.tav import from_tuneavideo

    values, _ = from_tuneavideo({"validation_data": {"num_inference_steps": 7}})
    cfg = TrainConfig.from_dict({**values, "output_dir": "unused"})
    assert cfg.sample_steps == 7
    watch = run_mod.TrainingSamples(cfg, None, {}, 1000, "cpu")
    assert len(watch.timesteps) == 7
