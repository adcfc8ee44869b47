"""Bad input to the scripts is one line on stderr ("error: ...") and exit status 2, with nothing written: numeric
flags and config fields out of range, a hub id that cannot be reached, a missing PyAV. And the bundled SD-size clip
is a folder of JPEG frames that reads, trains and samples without PyAV."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from apla import cli
from apla import assets as bundled
from apla.config import TrainConfig, default_config
from apla.eval.score import GRID, sample_stem
from apla.micro import oneshot
from apla.video import PyAVMissing, VideoError, count_frames, read_video
from tests.helpers.runs import sample, train

ROOT = Path(__file__).resolve().parents[1]
BBB_CUT = ROOT / "tests" / "data" / "bigbuckbunny_cut.mp4"  # 24 frames, 128x72, H.264
SHAPES_GIF = ROOT / "apla" / "assets" / "shapes_red_circle_right.gif"


def one_error_line(capsys, fn, argv) -> str:
    """Run fn(argv), expect SystemExit(2) and exactly one stderr line "error: ..."; return that line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def no_pyav(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError, as without PyAV


# ------------------------------------------------------------------------------------------ numeric ranges

TRAIN_FLAGS = [  # flag, value, the field named in the message
    ("--lr", "-1", "lr must be a number > 0, got -1.0"),
    ("--lr", "nan", "lr must be a number > 0, got nan"),
    ("--disc-lr", "0", "disc_lr must be a number > 0, got 0.0"),
    ("--max-steps", "0", "max_steps must be an integer >= 1, got 0"),
    ("--frames", "0", "frames must be an integer >= 1, got 0"),
    ("--start", "-1", "start must be an integer >= 0, got -1"),
    ("--stride", "0", "stride must be an integer >= 1, got 0"),
    ("--size", "60", "size must be a positive multiple of 8, or height x width as HxW (e.g. 320x576) or [H, W], each "
                     "a positive multiple of 8 (the VAE downsamples by 8), got 60"),
    ("--size", "-8", "size must be a positive multiple of 8, or height x width as HxW (e.g. 320x576) or [H, W], each "
                     "a positive multiple of 8 (the VAE downsamples by 8), got -8"),
    ("--checkpoint-every", "0", "checkpoint_every must be an integer >= 1, got 0"),
    ("--seed", "-1", "seed must be an integer in [0, 9223372036854775807], got -1"),
]


@pytest.mark.parametrize("flag,value,message", TRAIN_FLAGS, ids=[f"{f}={v}" for f, v, _ in TRAIN_FLAGS])
def test_train_flag_out_of_range(capsys, tmp_path, flag, value, message):
    out = tmp_path / "run"
    line = one_error_line(capsys, train.main, [flag, value, "--output-dir", str(out), "--device", "cpu"])
    assert line == f"error: bad configuration: {message}"
    assert not out.exists()


CONFIG_FIELDS = [  # the fields that only a config file (or a saved run) sets
    ({"apla": {"alpha": -0.5}}, "apla.alpha must be a number >= 0, got -0.5"),
    ({"apla": {"beta": -0.1}}, "apla.beta must be a number >= 0, got -0.1"),
    ({"apla": {"gamma": float("inf")}}, "apla.gamma must be a number >= 0, got inf"),
    ({"apla": {"lam": -1}}, "apla.lam must be a number >= 0, got -1"),
    ({"weight_decay": -0.01}, "weight_decay must be a number >= 0, got -0.01"),
    ({"adam_beta1": 1.0}, "adam_beta1 must be a number in [0, 1), got 1.0"),
    ({"adam_beta2": -0.1}, "adam_beta2 must be a number in [0, 1), got -0.1"),
    ({"adam_epsilon": 0}, "adam_epsilon must be a number > 0, got 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be a number >= 0, got -1.0"),
    ({"keep_checkpoints": -1}, "keep_checkpoints must be an integer >= 0, got -1"),
    ({"guidance": -2.0}, "guidance must be a number >= 0, got -2.0"),
    ({"sample_steps": 0}, "sample_steps must be an integer in [1, 1000], got 0"),
    ({"frames": 2.5}, "frames must be an integer >= 1, got 2.5"),
    ({"init_seed": -3}, "init_seed must be an integer in [0, 9223372036854775807], got -3"),
    ({"lr": "fast"}, "lr must be a number > 0, got 'fast'"),
    ({"apla": 3}, "apla must be a table of APLAConfig fields, got 3"),
]


@pytest.mark.parametrize("values,message", CONFIG_FIELDS, ids=[json.dumps(v) for v, _ in CONFIG_FIELDS])
def test_config_file_field_out_of_range(capsys, tmp_path, values, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))  # json writes inf as Infinity, which json.loads reads back
    out = tmp_path / "run"
    line = one_error_line(capsys, train.main, ["--config", str(path), "--output-dir", str(out), "--device", "cpu"])
    assert line == f"error: bad configuration: {message}"
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_and_flag_give_the_same_message(capsys, tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_text('{"lr": -1.0}' if suffix == ".json" else "lr = -1.0\n")
    base = ["--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    from_file = one_error_line(capsys, train.main, ["--config", str(path), *base])
    from_flag = one_error_line(capsys, train.main, ["--lr", "-1", *base])
    assert from_file == from_flag == "error: bad configuration: lr must be a number > 0, got -1.0"


def test_every_range_is_checked_by_validate():
    """Each field of TrainConfig.RANGES and APLAConfig.RANGES rejects a value far outside it."""
    cfg = TrainConfig()
    for name in TrainConfig.RANGES:
        with pytest.raises(ValueError, match=f"^{name} must be "):
            TrainConfig.from_dict({**cfg.to_dict(), name: -10**30})
    for name in cfg.apla.RANGES:
        with pytest.raises(ValueError, match=f"^apla.{name} must be "):
            TrainConfig.from_dict({**cfg.to_dict(), "apla": {**cfg.apla.to_dict(), name: -1.0}})
    default_config().validate()  # the defaults and the micro preset are in range


SAMPLE_FLAGS = [
    ("--steps", "0", "must be an integer in [1, 1000], got 0"),
    ("--steps", "1001", "must be an integer in [1, 1000], got 1001"),
    ("--steps", "2.5", "must be an integer in [1, 1000], got '2.5'"),
    ("--guidance", "-1", "must be a number >= 0, got -1.0"),
    ("--guidance", "nan", "must be a number >= 0, got nan"),
    ("--fps", "0", "must be an integer in [1, 100], got 0"),
    ("--fps", "500", "must be an integer in [1, 100], got 500"),
    ("--seed", "-1", "must be an integer in [0, 9223372036854775807], got -1"),
]


@pytest.mark.parametrize("flag,value,message", SAMPLE_FLAGS, ids=[f"{f}={v}" for f, v, _ in SAMPLE_FLAGS])
def test_sample_flag_out_of_range(capsys, tmp_path, flag, value, message):
    out = tmp_path / "samples"
    line = one_error_line(capsys, sample.main, ["--run", str(tmp_path), flag, value, "--out", str(out)])
    assert line == f"error: sample.py: argument {flag}: {message} (see --help)"
    assert not out.exists()


# --------------------------------------------------------------------------------- devices, messages, hub ids

def test_unknown_device_is_one_line(capsys, tmp_path):
    line = one_error_line(capsys, train.main, ["--device", "gpu", "--output-dir", str(tmp_path / "run")])
    assert line.startswith("error: --device gpu: ")
    if not torch.cuda.is_available():
        line = one_error_line(capsys, train.main, ["--device", "cuda", "--output-dir", str(tmp_path / "run")])
        assert line == "error: --device cuda: CUDA is not available on this machine (use cpu or auto)"
    assert not (tmp_path / "run").exists()


def test_fail_joins_a_message_of_several_lines(capsys):
    with pytest.raises(SystemExit) as e:
        cli.fail("first line\nsecond  line\n")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: first line second line\n"


def test_unreachable_hub_id_is_one_line(tmp_path):
    """No network (every connection refused by a dead proxy), an empty hub cache: one line, exit 2, nothing written."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "hf_hub_offline")}
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "train.py", "--pretrained", "some-org/some-model", "--video", str(SHAPES_GIF),
                          "--frames", "2", "--size", "64", "--output-dir", str(out), "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0].startswith("error: cannot load --pretrained 'some-org/some-model': some-org/some-model: could not "
                             "be resolved as a hub id ("), err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ PyAV

INSTALL_PYAV = 'needs PyAV, which is not installed: pip install av (or pip install "apla[video]")'


def test_missing_pyav_is_a_video_error(monkeypatch):
    no_pyav(monkeypatch)
    with pytest.raises(PyAVMissing) as e:
        read_video(BBB_CUT, 2, size=64)
    assert isinstance(e.value, VideoError) and isinstance(e.value, ImportError)
    assert str(e.value) == f"reading bigbuckbunny_cut.mp4 {INSTALL_PYAV}"


def test_train_mp4_without_pyav_is_one_line(capsys, tmp_path, monkeypatch):
    no_pyav(monkeypatch)
    out = tmp_path / "run"
    line = one_error_line(capsys, train.main, ["--video", str(BBB_CUT), "--frames", "2", "--output-dir", str(out),
                                               "--device", "cpu"])
    assert line == f"error: reading bigbuckbunny_cut.mp4 {INSTALL_PYAV}"
    assert not out.exists()


def test_oneshot_mp4_without_pyav_is_one_line(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    cfg = {**default_config().to_dict(), "video": str(BBB_CUT), "frames": 4}
    (run / "config.json").write_text(json.dumps(cfg))
    no_pyav(monkeypatch)
    assert oneshot.main(["--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: reading bigbuckbunny_cut.mp4 {INSTALL_PYAV}"]


def test_make_clips_without_pyav_is_one_line(capsys, monkeypatch):
    from apla.assets import make_clips

    no_pyav(monkeypatch)
    line = one_error_line(capsys, make_clips.main, [str(BBB_CUT)])
    assert line == f"error: reading bigbuckbunny_cut.mp4 {INSTALL_PYAV}"


# ------------------------------------------------------------------------- the bundled SD-size clip, no PyAV

def test_bundled_bigbuckbunny_is_24_jpeg_frames_read_without_pyav(monkeypatch):
    folder = Path(bundled.resolve_video("bigbuckbunny"))
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{i:05d}.jpg" for i in range(24)]
    assert sum(f.stat().st_size for f in files) < 3 * 2**20  # the assets README's 2.8 MB
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (912, 512)
    no_pyav(monkeypatch)
    assert count_frames(folder) == 24
    x = read_video(bundled.resolve_video("bigbuckbunny"), 24, size=512)  # the SD-size run's read
    assert x.shape == (24, 3, 512, 512) and x.min() >= -1 and x.max() <= 1


def test_bundled_bigbuckbunny_holds_the_frames_of_the_test_cut():
    """The JPEG frames and the test's H.264 cut come from the same 24 source frames: at the cut's 128x72 each JPEG
    frame is closest to the cut's frame of the same index, above 30 dB."""
    pytest.importorskip("av")
    cut = read_video(BBB_CUT, 24, size=(72, 128)).double()
    jpeg = read_video(bundled.resolve_video("bigbuckbunny"), 24, size=(72, 128)).double()
    mse = ((jpeg[:, None] - cut[None]) ** 2).mean(dim=(2, 3, 4))  # (24 JPEG, 24 cut)
    psnr = 10 * torch.log10(4 / mse)  # range 2 of [-1, 1]
    assert torch.equal(psnr.argmax(dim=1), torch.arange(24))
    assert psnr.diagonal().min() > 30


def test_bundled_bigbuckbunny_trains_and_samples_without_pyav(capsys, tmp_path, monkeypatch):
    """The README's SD-size commands with nothing outside requirements.txt, at the micro model's size: train.py
    reads the bundled clip; sample.py writes GIFs and PNGs and says once, in one line, that it skips the MP4s."""
    no_pyav(monkeypatch)
    run = tmp_path / "run"
    assert train.main(["--video", "bigbuckbunny", "--prompt", "a white rabbit on the grass", "--frames", "2",
                       "--max-steps", "1", "--output-dir", str(run), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "samples"
    prompts = ["a red circle moving to the right", "a blue square moving to the right"]
    assert sample.main(["--run", str(run), "--prompt", prompts[0], "--prompt", prompts[1], "--steps", "1",
                        "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if "PyAV" in line]
    assert notes == [f"note: MP4s skipped, GIFs and PNGs written: writing MP4 {INSTALL_PYAV}"], err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{sample_stem(prompt)}.{ext}" for prompt in prompts for ext in ("gif", "png")] + ["metrics.json"]
        + [f"{GRID}.gif", f"{GRID}.png"])  # and the grid of all prompts
