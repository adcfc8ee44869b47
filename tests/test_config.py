"""apla/config.py and train.py's configuration (apla.cli.parse_train_args): TrainConfig() alone is the micro run, the
base model decides the preset (the micro run's, or SD v1.5's at the model's sample size), and defaults <- preset <-
--config file <- flags, later wins, a table (vgt_model, apla) merged field by field; --resume starts from the run's
saved config.json."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from apla.assets import model_path
from apla.cli import parse_train_args, train_parser
from apla.config import (SD_V15, SINGLE_FILE_CONV_IN, TrainConfig, default_config, height_width, preset,
                         vgt_config_for)
from apla.vgt import VGTConfig


def test_the_defaults_are_the_micro_run():
    cfg = TrainConfig()
    assert cfg == default_config() == default_config("micro")
    assert (cfg.pretrained, cfg.video, cfg.frames, cfg.size) == ("micro", "red-circle-right", 8, 64)
    assert cfg.vgt_model.sample_size * 4 == cfg.size  # the micro VAE's 4x: its latents are 16 x 16


def test_a_base_model_that_is_not_bundled_gets_sd_v15s_preset():
    cfg = default_config("path/to/v1-5-pruned-emaonly.safetensors")
    assert cfg.pretrained == "path/to/v1-5-pruned-emaonly.safetensors"
    assert (cfg.video, cfg.frames, cfg.size, cfg.max_steps, cfg.lr, cfg.disc_lr) == ("bigbuckbunny", 24, 512, 750,
                                                                                      3e-5, 3e-5)
    assert (cfg.checkpoint_every, cfg.sample_steps, cfg.guidance, cfg.edit_prompts) == (250, 50, 12.5, ())
    assert cfg.vgt_model == VGTConfig()  # the paper's VGT
    assert TrainConfig.from_dict(SD_V15).pretrained == "runwayml/stable-diffusion-v1-5"
    assert "SD_V15" in train_parser().description  # --help says how the preset is chosen


def test_the_bundled_model_by_its_path_or_as_a_copy_gets_the_micro_preset(tmp_path):
    """The preset follows from the model (its U-Net's width), not its name: the micro model named by its folder, or
    copied elsewhere, runs the micro run's settings (VGT 98,192 parameters, not the paper's 59,810,320)."""
    from apla.vgt import VGT

    copy = shutil.copytree(model_path("micro"), tmp_path / "my-micro")
    micro = default_config("micro").to_dict()
    for name in ("apla/assets/micro", str(model_path("micro")), str(copy)):
        values, why = preset(name)
        assert values == {} and why.startswith("the micro preset") and "32 channels" in why, why
        assert default_config(name).to_dict() == micro | {"pretrained": name}
        cfg, _ = parse_train_args(["--pretrained", name])
        assert cfg.to_dict() == micro | {"pretrained": name}
    vgt = VGT(vgt_config_for(parse_train_args(["--pretrained", str(copy)])[0], (1, 4, 8, 16, 16)))
    assert sum(p.numel() for p in vgt.parameters()) == 98_192


def test_an_sd_size_model_gets_the_sd_preset_at_its_sample_size(tmp_path):
    """An SD-size U-Net (320 channels at its first level) gets SD_V15, its frames sample_size x 8: 768 px for SD 2.1's
    config (sample_size 96), 512 for 2.1-base's and 1.5's (64); a single file's width is read from its header, its
    sample size SD's. A model that cannot be read before loading (no such path, a hub id not cached) is taken
    for SD v1.5 at 512 px, and the line says so."""
    for sample_size, px in ((96, 768), (64, 512)):
        folder = tmp_path / f"sd-{sample_size}"
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [320, 640, 1280, 1280],
                                                                 "sample_size": sample_size}))
        values, why = preset(str(folder))
        assert values == {**SD_V15, "size": px} and why.startswith(f"the SD preset at {px} px"), why
        assert default_config(str(folder)).size == parse_train_args(["--pretrained", str(folder)])[0].size == px
    for width, micro in ((320, False), (32, True)):
        single = tmp_path / f"w{width}.safetensors"
        save_file({SINGLE_FILE_CONV_IN: torch.zeros(width, 4, 3, 3)}, single)
        values, why = preset(str(single))
        assert (values == {}) is micro and (micro or values["size"] == 512) and "header" in why, why
    (tmp_path / "garbage.safetensors").write_text("not weights\n")
    for absent, reason in ((tmp_path / "nothing-here.safetensors", "no such path"),
                           ("some-org/not-cached", "not in the local hub cache"),
                           (tmp_path / "garbage.safetensors", "header")):
        values, why = preset(str(absent))
        assert values == SD_V15 and why.startswith("the SD preset at 512 px") and reason in why, why


def test_file_then_flags_override_the_preset_and_tables_merge_field_by_field(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 20\nprompt = "a cat"\n[vgt_model]\nheads = 2\n[apla]\nbeta = 0.5\n')
    cfg, resume = parse_train_args(["--config", str(path), "--max-steps", "7", "--vgt", "hyper"])
    assert not resume and (cfg.max_steps, cfg.prompt, cfg.frames) == (7, "a cat", 8)  # flag > file > defaults
    assert (cfg.vgt_model.heads, cfg.vgt_model.width) == (2, 64)  # the file's field over the micro VGT
    assert (cfg.apla.beta, cfg.apla.vgt, cfg.apla.gamma) == (0.5, "hyper", 0.1)
    cfg, _ = parse_train_args(["--config", str(path), "--pretrained", "some-org/sd-v1-5"])
    assert (cfg.max_steps, cfg.frames, cfg.vgt_model.heads, cfg.vgt_model.width) == (20, 24, 2, 768)  # over SD's


def test_flags_left_out_change_nothing_and_switches_set_their_field(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"progress": False, "compile": True, "gradient_checkpointing": True}))
    cfg, _ = parse_train_args(["--config", str(path)])
    assert (cfg.progress, cfg.compile, cfg.gradient_checkpointing) == (False, True, True)
    cfg, _ = parse_train_args(["--no-progress", "--no-discriminator", "--no-hyper-loss",
                               "--gradient-checkpointing", "off"])
    assert (cfg.progress, cfg.apla.use_discriminator, cfg.apla.use_hyper_loss) == (False, False, False)
    assert cfg.gradient_checkpointing is False
    assert parse_train_args(["--gradient-checkpointing"])[0].gradient_checkpointing is True


def test_resume_starts_from_the_saved_configuration(tmp_path):
    saved = default_config("some-org/sd-v1-5").to_dict() | {"frames": 4, "output_dir": str(tmp_path)}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg, resume = parse_train_args(["--output-dir", str(tmp_path), "--resume", "--max-steps", "900"])
    assert resume and cfg.to_dict() == TrainConfig.from_dict(saved | {"max_steps": 900}).to_dict()


# ---------------------------------------------------------------------------------------------------------------
# Typed fields: a value of the wrong type is one line naming the key, the value and the type, never a silent change
# ---------------------------------------------------------------------------------------------------------------
WRONG_TYPES = [  # (TOML line(s), the key the message names)
    ('[apla]\nuse_discriminator = "false"', "apla.use_discriminator"),
    ('edit_prompts = "a blue circle"', "edit_prompts"),
    ('trainable = "attn1.to_q"', "trainable"),
    ("prompt = 3", "prompt"),
    ('max_steps = "300"', "max_steps"),
    ("max_steps = 3.5", "max_steps"),
    ("lr = true", "lr"),
    ("edit_prompts = [1, 2]", "edit_prompts"),
    ('[vgt_model]\nwidth = "64"', "vgt_model.width"),
    ("apla = 3", "apla"),
]


@pytest.mark.parametrize("toml, key", WRONG_TYPES, ids=[k for _, k in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(tmp_path, capsys, toml, key):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    with pytest.raises(SystemExit) as e:
        parse_train_args(["--config", str(path), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{key} must be" in err, err
    assert not (tmp_path / "run").exists()


def test_a_saved_config_json_of_the_wrong_type_is_refused_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "edit_prompts": "a blue circle"}))
    with pytest.raises(SystemExit) as e:
        parse_train_args(["--resume", "--output-dir", str(run)])
    assert e.value.code == 2 and "edit_prompts must be" in capsys.readouterr().err


def test_values_of_the_right_type_pass_and_ints_are_numbers():
    cfg = TrainConfig.from_dict({"lr": 1, "edit_prompts": ["a", "b"], "trainable": ["attn1.to_q"],
                                 "gradient_checkpointing": True, "init_seed": None, "apla": {"lam": 0}})
    assert cfg.lr == 1 and cfg.edit_prompts == ("a", "b") and cfg.trainable == ("attn1.to_q",)


# ---------------------------------------------------------------------------------------------------------------
# size: one side (a square) or height x width, from a flag, a file or a saved run; one form kept
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, toml, expect", [
    ("64", "size = 64", 64),
    ("320x576", 'size = "320x576"', (320, 576)),
    ("48x64", "size = [48, 64]", (48, 64)),
    ("64x64", "size = [64, 64]", 64),  # a square is one setting however it is written
])
def test_size_is_a_side_or_height_x_width_from_a_flag_or_a_file(tmp_path, flag, toml, expect):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    assert parse_train_args(["--size", flag])[0].size == expect
    assert parse_train_args(["--config", str(path)])[0].size == expect
    assert height_width(expect) == ((expect, expect) if isinstance(expect, int) else expect)


def test_a_non_square_size_is_saved_as_height_width_and_read_back(tmp_path):
    cfg = TrainConfig(size="48x64")
    saved = json.loads(json.dumps(cfg.to_dict()))  # as config.json holds it
    assert saved["size"] == [48, 64] and TrainConfig.from_dict(saved).size == (48, 64)
    (tmp_path / "config.json").write_text(json.dumps(saved | {"output_dir": str(tmp_path)}))
    cfg, _ = parse_train_args(["--output-dir", str(tmp_path), "--resume"])
    assert cfg.size == (48, 64) and height_width(cfg.size) == (48, 64)
    assert "320x576" in train_parser().format_help()  # --help shows the height x width form


BAD_SIZES = [("--size", "60"), ("--size", "48x60"), ("--size", "0x64"), ("--size", "48x"), ("--size", "64x48x8"),
             ("--size", "wide"), ("--size", "-8"), ("--size", "4\u00b2x64"), ('size = "64"',), ("size = [48, 60]",),
             ("size = [48]",), ("size = [48.0, 64]",), ("size = true",)]


@pytest.mark.parametrize("bad", BAD_SIZES, ids=[" ".join(b) for b in BAD_SIZES])
def test_a_bad_size_is_one_line_and_exit_2(tmp_path, capsys, bad):
    argv = ["--output-dir", str(tmp_path / "run")]
    if bad[0] == "--size":
        argv += list(bad)
    else:
        path = tmp_path / "run.toml"
        path.write_text(bad[0] + "\n")
        argv += ["--config", str(path)]
    with pytest.raises(SystemExit) as e:
        parse_train_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "size must be" in err and "multiple of 8" in err and "HxW" in err, err
    assert not (tmp_path / "run").exists()
