"""train.py and sample.py on every kind of base model a user holds: the micro model however it is named (its preset
decided by the model), a folder of a v-prediction model, a folder that Tune-A-Video's training wrote, and a
half-precision setting on a CPU; each said in one line, a prediction type we do not build one error line, exit 2."""
import json
import shutil

import pytest
import torch

from apla import cli
from apla.assets import clip_scorer, model_path
from apla.config import TrainConfig
from apla.eval.score import GRID
from tests.helpers.runs import SHAPES_GIF, make_tiny, sample, train, train_args, trained_weights
from tests.helpers.tiny_sd import TINY_RUN, make_tiny_sd, make_tune_a_video_folder

pytest.importorskip("diffusers")


def with_prediction_type(folder, prediction_type):
    """`folder`, its scheduler config naming `prediction_type`."""
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": prediction_type}))
    return folder


def sample_args(run, out):
    return ["--run", str(run), "--steps", "2", "--prompt", "a blue circle moving to the right", "--out", str(out),
            "--no-progress", "--no-metrics", "--device", "cpu"]


def stderr_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("where", ["its path", "a copy"])
def test_the_micro_model_named_by_its_path_or_copied_trains_with_the_micro_preset(tmp_path, capsys, where):
    name = "apla/assets/micro" if where == "its path" else str(shutil.copytree(model_path("micro"), tmp_path / "m"))
    run = tmp_path / "run"
    assert train.main(["--pretrained", name, "--max-steps", "1", "--output-dir", str(run),
                       "--no-progress", "--device", "cpu"]) == 0
    err = stderr_lines(capsys)
    assert any(line.startswith("apla: the micro preset") for line in err), err
    assert any("VGT-pure 98,192," in line for line in err), err  # not the paper's 59,810,320
    cfg = json.loads((run / "config.json").read_text())
    micro = TrainConfig().to_dict()
    assert {k: cfg[k] for k in ("video", "size", "lr", "vgt_model", "guidance")} == \
        {k: micro[k] for k in ("video", "size", "lr", "vgt_model", "guidance")}
    if where == "its path":  # its samples are scored with the micro world's CLIP, as a run on `micro`'s are
        assert clip_scorer(cfg["pretrained"]) == clip_scorer("micro") == "micro"


def test_a_v_prediction_folder_trains_and_samples_as_a_v_model(tmp_path):
    """A folder whose scheduler config says v_prediction is trained and sampled as one (config.json records it); the
    flag reads the same folder as an eps-model instead, which changes the very first loss."""
    tiny = make_tiny(tmp_path)
    v_folder = with_prediction_type(make_tiny_sd(tmp_path / "sd-v"), "v_prediction")
    losses = {}
    for name, extra in (("v", []), ("as-eps", ["--prediction-type", "epsilon"])):
        run = tmp_path / name
        assert train.main(train_args({**tiny, "model": str(v_folder)}, run, 2, SHAPES_GIF, 2, *extra)) == 0
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["prediction_type"] == ("v_prediction" if name == "v" else "epsilon")
        losses[name] = json.loads((run / "log.jsonl").read_text().splitlines()[0])["mse"]
    assert losses["v"] != pytest.approx(losses["as-eps"], rel=1e-3)
    out = tmp_path / "samples"
    assert sample.main(sample_args(tmp_path / "v", out)) == 0
    assert len([p for p in out.glob("*.gif") if p.stem != GRID]) == 1  # (and grid.gif of them all)


def test_a_prediction_type_we_do_not_build_is_one_line_exit_2(tmp_path, capsys):
    tiny = make_tiny(tmp_path)
    folder = with_prediction_type(make_tiny_sd(tmp_path / "sd-sample"), "sample")
    run = tmp_path / "run"
    capsys.readouterr()  # what writing the folders printed
    for argv, message in (
            (train_args({**tiny, "model": str(folder)}, run, 1, SHAPES_GIF, 2),
             "scheduler_config.json: prediction_type 'sample' is not supported (one of epsilon, v_prediction)"),
            (train_args(tiny, run, 1, SHAPES_GIF, 2, "--prediction-type", "sample"),
             "argument --prediction-type: invalid choice: 'sample'")):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = stderr_lines(capsys)
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not run.exists()  # nothing written
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**TINY_RUN, "prediction_type": "sample"}))
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(config), "--output-dir", str(run), "--device", "cpu"])
    err = stderr_lines(capsys)
    assert e.value.code == 2 and err == ["error: bad configuration: prediction_type must be none (the base model's) "
                                         "or one of ('epsilon', 'v_prediction'), got 'sample'"]


def test_a_tune_a_video_folder_starts_an_apla_run_from_its_tuned_weights_and_samples(tmp_path):
    """--pretrained on a folder Tune-A-Video's training wrote: the run starts from its tuned temporal layers (one
    AdamW step of lr 1e-12 leaves them where they were, not at a fresh inflation's zero), and samples."""
    tiny = make_tiny(tmp_path)
    folder = make_tune_a_video_folder(tmp_path / "outputs" / "man-skiing")
    tuned = torch.load(folder / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    run = tmp_path / "run"
    assert train.main(train_args({**tiny, "model": str(folder)}, run, 1, SHAPES_GIF, 2, "--lr", "1e-12")) == 0
    weights = {k.removeprefix("unet."): v for k, v in trained_weights(run).items() if k.startswith("unet.")}
    temporal = [k for k in weights if ".attn_temp.to_out." in k]
    assert temporal and all(tuned[k].abs().max() > 0.01 for k in temporal)
    for k, v in weights.items():
        torch.testing.assert_close(v, tuned[k], rtol=0, atol=1e-9)
    out = tmp_path / "samples"
    assert sample.main(sample_args(run, out)) == 0
    assert len([p for p in out.glob("*.gif") if p.stem != GRID]) == 1  # (and grid.gif of them all)


def test_sample_py_samples_a_tune_a_video_folder_as_it_is_without_a_run(tmp_path):
    """Tune-A-Video's model under our sampler and measures: `sample.py --pretrained <its outputs folder> --video CLIP`
    inverts the clip and samples with the folder's tuned 3D U-Net (its temporal layers as tuned, no VGT, no D)."""
    from apla import sampling

    folder = make_tune_a_video_folder(tmp_path / "outputs" / "man-skiing")
    tuned = torch.load(folder / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    base = sampling.load_base(str(folder), SHAPES_GIF, frames=2, size=64, device="cpu")
    assert base.model.vgt is None and base.model.disc is None
    ours = dict(base.model.unet.named_parameters())
    assert set(ours) == set(tuned)
    for k in (k for k in tuned if ".attn_temp." in k or ".norm_temp." in k):
        assert torch.equal(ours[k].detach(), tuned[k]), k
    out = tmp_path / "samples"
    assert sample.main(["--pretrained", str(folder), "--video", str(SHAPES_GIF), "--frames", "2", "--size", "64",
                        "--prompt", "a blue circle moving to the right", "--steps", "2", "--out", str(out),
                        "--no-progress", "--device", "cpu"]) == 0
    assert len([p for p in out.glob("*.gif") if p.stem != GRID]) == 1 and (out / "metrics.json").is_file()


def test_half_precision_on_a_cpu_runs_float32_and_says_so(tmp_path, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cli.run_precision("fp16", cpu)[0] == "no" and "runs float32" in cli.run_precision("fp16", cpu)[1]
    assert cli.run_precision("bf16", cpu) == ("bf16", None) and cli.run_precision("fp16", cuda) == ("fp16", None)
    tiny, run = make_tiny(tmp_path), tmp_path / "run"
    capsys.readouterr()
    assert train.main(train_args(tiny, run, 1, SHAPES_GIF, 2, "--mixed-precision", "fp16")) == 0
    assert json.loads((run / "config.json").read_text())["mixed_precision"] == "no"
    assert "apla: --mixed-precision fp16 on a CPU runs float32" in capsys.readouterr().err
    assert sample.main(sample_args(run, tmp_path / "samples") + ["--mixed-precision", "fp16"]) == 0
    assert "sample.py: --mixed-precision fp16 on a CPU runs float32" in capsys.readouterr().err
