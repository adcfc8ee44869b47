"""apla/config.py and train.py's configuration (apla.cli.parse_train_args): TrainConfig() alone is the micro run, a
base model that is not bundled gets SD v1.5's preset, and defaults <- preset <- --config file <- flags, later wins,
a table (vgt_model, apla) merged field by field; --resume starts from the run's saved config.json."""
import json

import pytest

from apla.cli import parse_train_args, train_parser
from apla.config import SD_V15, TrainConfig, default_config, height_width
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
