"""SD 2.1 (768, v-prediction) and SD 2.1-base (512, ε) at full size, random weights, in the two layouts a user brings:
an original single file (float16, named as published) and a diffusers folder converted from that file by diffusers'
own functions.

In the default run: the three networks loaded from a single file equal those loaded from its folder, tensor for
tensor (one network at a time, in float16). Marked slow (minutes on 2 cores), per variant: train.py 2 steps and
sample.py 2 steps on the single file, the folder written and checked as above, the single file deleted, train.py and
sample.py on the folder, at 2 frames of 64 px; one model on disk and in memory at a time (2.6 GB each in float16):
python -m pytest -m slow tests/sd/test_full_size_sd2.py
"""
import shutil
import time

import pytest
import torch

import apla
from apla.sd.unet import is_temporal_param
from apla.sd.weights import COMPONENTS
from tests.conftest import write_checkpoint
from tests.helpers.runs import BBB
from tests.helpers.sd2 import VARIANTS, folder_from_single_file, sd2_entries
from tests.sd.test_full_size import EDIT, PROMPT, check_run

pytest.importorskip("diffusers", reason="diffusers (a dev extra) converts the single file into the folder")

FLAGS = ["--video", BBB, "--prompt", PROMPT, "--frames", 2, "--size", 64, "--max-steps", 2, "--vgt", "pure",
         "--seed", 0]


def assert_same_networks(single, folder, variant):
    """Each network, loaded in float16 from the single file and from the folder (one network at a time): the same
    tensors under the same names (the fresh temporal layers aside), the same architecture. The file's assumed
    variant is the folder's, but for upcast attention, which a single file always gets and 2.1-base's config
    leaves off."""
    unet_cfg, _, _ = VARIANTS[variant]
    for component in COMPONENTS:
        a, b = (apla.load_stable_diffusion(s, components=(component,), dtype=torch.float16) for s in (single, folder))
        net_a, net_b = getattr(a, component), getattr(b, component)
        sa = {k.removeprefix("text_model."): v for k, v in net_a.state_dict().items() if not is_temporal_param(k)}
        sb = {k.removeprefix("text_model."): v for k, v in net_b.state_dict().items() if not is_temporal_param(k)}
        assert sa.keys() == sb.keys() and len(sa) > 0, component
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (component, k)
        if component == "unet":
            assert net_a.config.upcast_attention and net_b.config.upcast_attention == unet_cfg["upcast_attention"]
            net_b.config.upcast_attention = True
            assert net_a.config == net_b.config and net_a.config.sample_size == unet_cfg["sample_size"]
        if component == "text_encoder":
            assert net_a.config.num_hidden_layers == net_b.config.num_hidden_layers == 23
            assert a.tokenizer.pad_token_id == b.tokenizer.pad_token_id == 0
        del a, b, net_a, net_b, sa, sb


def test_single_file_and_its_folder_load_the_same_three_networks(tmp_path):
    """SD 2.1-base, the variant whose single file and folder differ in a setting (upcast attention)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    try:
        single = write_checkpoint(weights / "v2-1_512-ema-pruned.safetensors", sd2_entries(),
                                  float_dtype=torch.float16, seed=2)
        assert_same_networks(single, folder_from_single_file(single, weights / "folder", "2.1-base"), "2.1-base")
    finally:
        shutil.rmtree(weights, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant, name", [("2.1", "v2-1_768-ema-pruned.safetensors"),
                                           ("2.1-base", "v2-1_512-ema-pruned.safetensors")])
def test_sd2_train_and_sample_at_full_size_as_single_file_and_folder(tmp_path, variant, name):
    weights = tmp_path / "weights"  # gigabytes: deleted as soon as used, all at the end whatever happens
    weights.mkdir()
    try:
        single = write_checkpoint(weights / name, sd2_entries(), float_dtype=torch.float16, seed=2)
        run, start = tmp_path / "run-single", time.perf_counter()
        res = check_run(run, ["--pretrained", single, *FLAGS, "--output-dir", run], ["--prompt", EDIT])
        print(f"\nSD {variant} single file: train.py + sample.py {time.perf_counter() - start:.0f} s")
        notes = [line for line in res.stderr.splitlines() if "does not say its variant" in line]
        assumed = {"2.1": "768-v", "2.1-base": "512-base"}[variant]
        assert len(notes) == 1 and notes[0].startswith("note:") and f"assumed {assumed} (its name)" in notes[0], notes

        folder = folder_from_single_file(single, weights / "folder", variant)
        assert_same_networks(single, folder, variant)
        single.unlink()
        run, start = tmp_path / "run-folder", time.perf_counter()
        res = check_run(run, ["--pretrained", folder, *FLAGS, "--output-dir", run], ["--prompt", EDIT])
        print(f"SD {variant} folder: train.py + sample.py {time.perf_counter() - start:.0f} s")
        assert "does not say its variant" not in res.stderr  # a folder says what it is
    finally:
        shutil.rmtree(weights, ignore_errors=True)
