"""train.py and sample.py end to end on a tiny random SD-layout model: outputs, exact resume, NaN stop, atomic
checkpoints, and one clear line with exit status 2 for each bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from apla import checkpoint as ckpt
from apla.algorithm import APLA
from apla import cli, sampling
from apla.eval.score import sample_stem
from apla.run import PROGRESSION_HEADER
from tests.helpers.runs import (BBB, ROOT, SHAPES_GIF, make_tiny, run_exit, sample, train,  # noqa: F401 (test_cuda)
                                train_args, trained_weights)

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), other=True)


def test_train_then_sample_writes_outputs(tiny, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_args(tiny, run, 3, SHAPES_GIF, 8)) == 0
    for name in ("config.json", "log.jsonl", "source.safetensors"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for key in ("total", "mse", "l1", "perceptual", "adv_g", "phi_ratio", "disc", "step_time"):
        assert key in log[0], key
    assert ckpt.latest_checkpoint(run).name == "step-000003"
    weights = trained_weights(run)
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("vgt.") for k in weights)
    assert any(k.startswith("disc.") for k in weights)
    assert not any("to_k" in k and k.startswith("unet.") and "attn_temp" not in k for k in weights)

    out, stem = tmp_path / "samples", sample_stem("a blue square moving to the right")
    assert sample.main(["--run", str(run), "--steps", "3", "--prompt", "a blue square moving to the right",
                        "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    gif = out / f"{stem}.gif"
    with Image.open(gif) as im:
        assert im.size == (64, 64) and im.n_frames == 8
    with Image.open(gif.with_suffix(".png")) as im:
        assert im.size == (8 * 64, 64)
    assert gif.with_suffix(".mp4").is_file()

    # every path of the run directory that apla/checkpoint.py's docstring lists exists in this run
    named = re.findall(r"^  (\S+)\s{2,}", ckpt.__doc__, flags=re.M)
    assert len(named) >= 5, f"no run-directory listing in apla/checkpoint.py's docstring: {named}"
    for entry in named:
        if entry.startswith("samples/"):
            for ext in (".gif", ".png", ".mp4"):
                assert (run / "samples" / stem).with_suffix(ext).exists() or (out / stem).with_suffix(ext).exists(), ext
        else:
            assert list(run.glob(re.sub(r"\d{6}", "*", entry).rstrip("/"))), entry


def test_a_non_square_run_trains_resumes_and_samples_at_its_size(tiny, tmp_path):
    """--size 48x64 is height x width: the cached latents are 6 x 8 (the tiny VAE's 8x), config.json keeps [48, 64],
    --resume reads it back as the same setting, and sample.py writes 48-row, 64-column frames."""
    run = tmp_path / "wide"
    assert train.main(train_args(tiny, run, 1, SHAPES_GIF, 2, "--size", "48x64")) == 0
    assert json.loads((run / "config.json").read_text())["size"] == [48, 64]
    assert load_file(str(run / "source.safetensors"))["z0_mean"].shape == (1, 4, 2, 6, 8)  # (B, C, F, h, w)
    assert train.main(train_args(tiny, run, 2, SHAPES_GIF, 2, "--size", "48x64", "--resume")) == 0
    assert ckpt.latest_checkpoint(run).name == "step-000002"
    out, stem = tmp_path / "samples", sample_stem("a blue square moving to the right")
    assert sample.main(["--run", str(run), "--steps", "2", "--prompt", "a blue square moving to the right",
                        "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    with Image.open(out / f"{stem}.gif") as im:
        assert im.size == (64, 48) and im.n_frames == 2  # PIL's size is (width, height)
    with Image.open(out / f"{stem}.png") as im:
        assert im.size == (2 * 64, 48)
    video = json.loads((out / "metrics.json").read_text())["videos"][0]  # scored against the source at 48 x 64
    assert video["prompt"] == "a blue square moving to the right" and "warping_error" in video["metrics"]


def test_readme_usage_snippet_runs(tiny, trained_run):
    """The README's Python snippet, on the tiny model at 64x64: the shapes it promises (scaled by 8), and sample.py's
    call on a run of it (4 frames): a list of one (F, 3, H, W) video in [-1, 1], its inverted z_T kept in the run."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    code = next(block for block in blocks if "load_stable_diffusion" in block)
    code = code.replace('"path/to/v1-5-pruned-emaonly.safetensors"', repr(tiny["model"])).replace("512", "64")
    scope = {}
    exec(code.replace('"runs/apla"', repr(str(trained_run))), scope)
    assert scope["mean"].shape == (8, 4, 8, 8)
    assert scope["z0"].shape == (1, 4, 8, 8, 8)
    assert scope["context"].shape == (1, 77, 32)
    assert scope["eps_pred"].shape == (1, 4, 8, 8, 8)
    assert [tuple(v.shape) for v in scope["videos"]] == [(4, 3, 64, 64)]
    assert all(v.min() >= -1 and v.max() <= 1 for v in scope["videos"])
    assert len(list((trained_run / "inversions").iterdir())) >= 1


def test_bigbuckbunny_cut_trains(tiny, tmp_path):
    run = tmp_path / "bbb"
    assert train.main(train_args(tiny, run, 2, BBB, 8, "--vgt", "hyper")) == 0
    z0 = load_file(str(run / "source.safetensors"))["z0_mean"]
    assert z0.shape == (1, 4, 8, 8, 8)  # (B, C, F, h, w): 8 frames at 64x64 -> 8x8 latents


def test_resume_is_exact(tiny, tmp_path):
    one_go, split = tmp_path / "one", tmp_path / "split"
    assert train.main(train_args(tiny, one_go, 4)) == 0
    assert train.main(train_args(tiny, split, 2)) == 0
    # a resumed run takes its saved configuration: only the run directory and the new step count are given
    assert train.main(["--output-dir", str(split), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert json.loads((split / "config.json").read_text()) == json.loads((one_go / "config.json").read_text()) | {
        "output_dir": str(split)}
    a, b = trained_weights(one_go), trained_weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line)["step"] for line in (split / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    real = APLA.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.terms["l1"] = out.terms["l1"] * float("nan")
        return out

    monkeypatch.setattr(APLA, "forward", poisoned)
    run = tmp_path / "nan"
    code = run_exit(train.main, train_args(tiny, run, 5, SHAPES_GIF, 4, "--checkpoint-every", "1"))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step 3" in err and "l1" in err
    assert ckpt.latest_checkpoint(run).name == "step-000002"
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_checkpoint_is_atomic(tiny, tmp_path, monkeypatch):
    run = tmp_path / "atomic"
    real_replace, saves = os.replace, {"n": 0}

    def crash_second_checkpoint_rename(src, dst):
        if Path(dst).name.startswith("step-"):
            saves["n"] += 1
            if saves["n"] == 2:
                raise KeyboardInterrupt("killed between write and rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_second_checkpoint_rename)
    assert run_exit(train.main, train_args(tiny, run, 4, SHAPES_GIF, 4, "--checkpoint-every", "1")) == 130  # Ctrl-C
    assert [d.name for d in ckpt.list_checkpoints(run)] == ["step-000001"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # temporary folder removed
    # a leftover temporary folder of a hard kill is ignored, and the run resumes from the last complete checkpoint
    (run / "checkpoints" / ".step-000002.x.tmp").mkdir()
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert train.main(train_args(tiny, run, 2, SHAPES_GIF, 4, "--resume")) == 0
    assert ckpt.latest_checkpoint(run).name == "step-000002"
    # the log holds each step once: the records written after the checkpoint it resumed from were cut back
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def trained_run(tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(train_args(tiny, run, 1)) == 0
    return run


@pytest.mark.parametrize("case", ["missing video", "unreadable video", "too few frames", "size not multiple of 8",
                                  "width not multiple of 8", "unknown flag", "resume without checkpoint", "resume other vgt",
                                  "existing run"])
def test_train_bad_input(tiny, tmp_path, trained_run, capsys, case):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    out = tmp_path / "out"
    argv, expect = {
        "missing video": (train_args(tiny, out, video=tmp_path / "nope.mp4"), "nope.mp4"),
        "unreadable video": (train_args(tiny, out, video=bad), "broken.mp4"),
        "too few frames": (train_args(tiny, out, 1, SHAPES_GIF, 50), "frames"),
        "size not multiple of 8": (train_args(tiny, out) + ["--size", "60"], "multiple of 8"),
        "width not multiple of 8": (train_args(tiny, out) + ["--size", "48x60"], "'48x60'"),
        "unknown flag": (train_args(tiny, out) + ["--frobnicate"], "--frobnicate"),
        "resume without checkpoint": (train_args(tiny, out, 2, SHAPES_GIF, 4, "--resume"), "no checkpoint"),
        "resume other vgt": (train_args(tiny, trained_run, 2, SHAPES_GIF, 4, "--resume", "--vgt", "hyper"), "vgt"),
        "existing run": (train_args(tiny, trained_run, 2), "--resume"),
    }[case]
    assert run_exit(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    if case not in ("resume other vgt", "existing run"):
        assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("case", ["run without checkpoint", "other base model", "unknown flag", "missing CLIP model"])
def test_sample_bad_input(tiny, tmp_path, trained_run, capsys, case):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text((trained_run / "config.json").read_text())
    out = tmp_path / "samples"
    argv, expect = {
        "run without checkpoint": (["--run", str(empty)], "no checkpoint"),
        "other base model": (["--run", str(trained_run), "--pretrained", tiny["other"]], "another base model"),
        "unknown flag": (["--run", str(trained_run), "--frobnicate"], "--frobnicate"),
        "missing CLIP model": (["--run", str(trained_run), "--clip-model", str(tmp_path / "no_clip")], "no_clip"),
    }[case]
    assert run_exit(sample.main, argv + ["--out", str(out), "--steps", "2", "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_help_lists_every_flag_with_default(script):
    env = {**os.environ, "COLUMNS": "1000"}  # no line wrapping inside long defaults
    res = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert res.returncode == 0
    parser = (cli.train_parser if script == "train.py" else cli.sample_parser)()
    text = " ".join(res.stdout.split())
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in text, action.option_strings[0]
        if action.default is None:  # the help says in words what the default is
            assert "(default:" in " ".join(action.help.split()), action.dest
        else:
            assert f"(default: {action.default})" in text, action.dest


def test_unknown_flag_subprocess_exit_status():
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--frobnicate"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--frobnicate" in res.stderr


def test_default_run_on_the_micro_model(tmp_path):
    """`python train.py` / `python sample.py` with the defaults (the micro model, the red circle), cut short."""
    run = tmp_path / "default"
    assert train.main(["--output-dir", str(run), "--max-steps", "2", "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["pretrained"] == "micro" and cfg["frames"] == 8 and cfg["size"] == 64
    assert sample.main(["--run", str(run), "--steps", "2", "--no-progress"]) == 0
    for prompt in [cfg["prompt"], *cfg["edit_prompts"]]:
        with Image.open(run / "samples" / f"{sample_stem(prompt)}.gif") as im:
            assert im.size == (64, 64)
    # sample.py scored what it wrote: samples/metrics.json, the micro CLIP on a micro run
    report = json.loads((run / "samples" / "metrics.json").read_text())
    rows = {r["prompt"]: r["metrics"] for r in report["videos"]}
    assert set(rows) == {cfg["prompt"], *cfg["edit_prompts"]} and report["clip_model"] == "micro"
    for measures in rows.values():
        assert {"fci", "warping_error", "clip_frame_consistency", "clip_text_alignment"} <= set(measures)
    assert "psnr" in rows[cfg["prompt"]] and "psnr" not in rows[cfg["edit_prompts"][0]]


def test_groupnorm_setting_is_saved_and_honoured_by_sample(tiny, tmp_path, monkeypatch):
    from apla import run as apla_run
    from apla.sd.unet import FrameGroupNorm

    built = []
    real = apla_run.build_apla
    monkeypatch.setattr(apla_run, "build_apla", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    for setting, pooled in (("per-frame", False), ("frames", True)):
        run = tmp_path / setting
        assert train.main(train_args(tiny, run, 1, SHAPES_GIF, 4, "--groupnorm", setting)) == 0
        assert json.loads((run / "config.json").read_text())["groupnorm"] == setting
        assert sample.main(["--run", str(run), "--steps", "1", "--no-progress", "--device", "cpu",
                            "--prompt", "a red circle"]) == 0
        norms = [m for m in built[-1].unet.modules() if isinstance(m, FrameGroupNorm)]
        assert norms and all(m.over_frames is pooled for m in norms), setting


def test_sample_holds_the_unet_in_the_autocast_dtype_on_cuda(tiny, trained_run, tmp_path, monkeypatch):
    """On CUDA with mixed precision, sample.py loads the U-Net in the autocast dtype and the VAE and text encoder in
    float32; the same path, forced on the CPU in bfloat16, samples what a float32 U-Net under bf16 autocast samples,
    to within the rounding of its normalisation weights (measured on the tiny model: the same 8-bit frames, against
    a mean difference of 0.079 between two prompts)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (cli.unet_dtype("bf16", cuda), cli.unet_dtype("fp16", cuda)) == (torch.bfloat16, torch.float16)
    assert cli.unet_dtype("no", cuda) == cli.unet_dtype("bf16", cpu) == cli.unet_dtype("fp16", cpu) == torch.float32
    held, load = [], sampling.load_stable_diffusion

    def spy(*args, **kwargs):
        sd = load(*args, **kwargs)
        held.append({n: next(getattr(sd, n).parameters()).dtype for n in ("unet", "vae", "text_encoder")})
        return sd

    monkeypatch.setattr(sampling, "load_stable_diffusion", spy)  # sample.py loads through apla.sampling
    prompts = ["a blue circle moving to the right", "a red square moving to the right"]
    strips = {}
    for label, rule in (("float32", cli.unet_dtype), ("bf16", lambda precision, device: torch.bfloat16)):
        monkeypatch.setattr(sampling, "unet_dtype", rule)
        out = tmp_path / label
        argv = ["--run", str(trained_run), "--steps", "2", "--prompt", prompts[0], "--prompt", prompts[1], "--out",
                str(out), "--no-progress", "--no-metrics", "--device", "cpu", "--mixed-precision", "bf16"]
        assert sample.main(argv) == 0
        strips[label] = [np.asarray(Image.open(out / f"{sample_stem(p)}.png"), dtype=np.float64) / 255 for p in prompts]
    f32 = torch.float32
    assert held == [{"unet": f32, "vae": f32, "text_encoder": f32}, {"unet": torch.bfloat16, "vae": f32,
                                                                    "text_encoder": f32}]
    rounding = max(np.abs(a - b).mean() for a, b in zip(strips["float32"], strips["bf16"]))
    prompt_change = np.abs(strips["float32"][0] - strips["float32"][1]).mean()
    print(f"mean |bf16 U-Net - float32 U-Net| {rounding:.5f}; between the two prompts {prompt_change:.5f}")
    assert rounding < prompt_change / 20


def test_auto_precision_and_checkpointing_resolve_by_device(monkeypatch):
    from apla.sd.unet import UNetConfig

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cli.resolve_mixed_precision("auto", cpu) == "no"
    with pytest.raises(ValueError, match="not resolved"):  # autocast only for a resolved setting
        cli.autocast_for("auto", cpu)
    for given in ("no", "bf16", "fp16"):
        assert cli.resolve_mixed_precision(given, cpu) == given == cli.resolve_mixed_precision(given, cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert cli.resolve_mixed_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no native bf16
    assert cli.resolve_mixed_precision("auto", cuda) == "fp16"

    sd, small = UNetConfig(), UNetConfig(block_out_channels=(32, 64, 64, 64))
    assert cli.resolve_gradient_checkpointing("auto", cuda, sd) is True
    assert cli.resolve_gradient_checkpointing("auto", cpu, sd) is False
    assert cli.resolve_gradient_checkpointing("auto", cuda, small) is False
    for given, want in ((True, True), ("on", True), (False, False), ("off", False)):
        assert cli.resolve_gradient_checkpointing(given, cuda, small) is want
        assert cli.resolve_gradient_checkpointing(given, cpu, sd) is want


@pytest.mark.parametrize("flags, precision, checkpointing", [
    ([], "no", False), (["--gradient-checkpointing"], "no", True), (["--gradient-checkpointing", "off"], "no", False),
    (["--mixed-precision", "bf16", "--gradient-checkpointing", "on"], "bf16", True)])
def test_resolved_precision_and_checkpointing_saved_in_config(tiny, tmp_path, flags, precision, checkpointing):
    run = tmp_path / "run"
    assert train.main(train_args(tiny, run, 1, SHAPES_GIF, 2, *flags)) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["mixed_precision"], cfg["gradient_checkpointing"]) == (precision, checkpointing)


def test_sample_every_writes_gifs_while_training_and_a_progression(tmp_path):
    """--sample-every on the micro default run: samples/step-N/ holds a GIF per prompt at every n-th step, the log
    says what each sampling cost, and progression.png shows each prompt's first, middle and last frame per step."""
    run, config = tmp_path / "watched", tmp_path / "few-steps.json"
    config.write_text(json.dumps({"sample_steps": 4}))  # few DDIM steps: the files are the point here
    assert train.main(["--output-dir", str(run), "--max-steps", "4", "--sample-every", "2", "--no-progress",
                       "--config", str(config)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["sample_steps"] == 4
    prompts = [cfg["prompt"], *cfg["edit_prompts"]]
    assert sorted(p.name for p in (run / "samples").glob("step-*")) == ["step-000002", "step-000004"]
    for step in (2, 4):
        for prompt in prompts:
            with Image.open(run / "samples" / f"step-{step:06d}" / f"{sample_stem(prompt)}.gif") as im:
                assert im.size == (64, 64) and im.n_frames > 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "sample_time" in r] == [2, 4] and all(r.get("sample_time", 1) > 0 for r in log)
    with Image.open(run / "samples" / "progression.png") as im:
        grid = np.asarray(im.convert("RGB"))
    header, top = grid[:PROGRESSION_HEADER], PROGRESSION_HEADER
    assert grid.shape == (top + 3 * len(prompts) * 64, 2 * 64, 3)
    assert all((header[:, j * 64:(j + 1) * 64] < 128).any() for j in range(2))  # each column's step number
    for i, prompt in enumerate(prompts):  # rows: each prompt's first, middle, last frame; columns: steps 2 and 4
        for j, step in enumerate((2, 4)):
            with Image.open(run / "samples" / f"step-{step:06d}" / f"{sample_stem(prompt)}.gif") as im:
                picks = [0, im.n_frames // 2, im.n_frames - 1]
                for k, frame in enumerate(picks):
                    im.seek(frame)
                    y = top + (3 * i + k) * 64
                    assert (grid[y:y + 64, j * 64:(j + 1) * 64] == np.asarray(im.convert("RGB"))).all()
    assert not list((run / "samples").rglob(f"*{ckpt.TMP_SUFFIX}"))


def test_sample_every_is_off_for_the_micro_run_and_100_at_sd_size():
    from apla.config import default_config
    assert default_config().sample_every == 0 and default_config("sd15.safetensors").sample_every == 100


def test_negative_prompt_is_the_unconditional_branch(tiny, tmp_path, trained_run, monkeypatch):
    """sample.py --negative-prompt: guidance steers from that prompt's prediction instead of the empty one's."""
    seen = []
    real = APLA.guided_eps

    def spy(self, z_t, t, uncond, cond, scale, use_vgt=True):
        seen.append(uncond.clone())
        return real(self, z_t, t, uncond, cond, scale, use_vgt)

    monkeypatch.setattr(APLA, "guided_eps", spy)
    outs = {}
    for name, extra in (("plain", []), ("negative", ["--negative-prompt", "a blurry picture"])):
        seen.clear()
        args = ["--run", str(trained_run), "--steps", "2", "--prompt", "a red circle", "--no-progress",
                "--no-metrics", "--out", str(tmp_path / name), *extra]
        assert sample.main(args) == 0
        outs[name] = seen[0]
    assert not torch.equal(outs["plain"], outs["negative"])
