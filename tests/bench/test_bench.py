"""python -m apla.bench at tiny size: the table's structure, FLOP counts against hand counts (the CPU attention
kernel included), the comparison with diffusers, the meta-device memory predictor against a measured CPU step, and one
line with exit status 2 for bad flags. No timing is asserted."""
import re

import pytest
import torch
import torch.nn.functional as F

from apla import run
from apla.bench.__main__ import main
from apla.bench.core import FLOP_FORMULAS, bench_model, build, count_flops, latent_shape, run_config
from apla.bench.predict import StorageTracker, predict_memory, step_flops

SMALL = ["--model", "tiny", "--frames", "2", "--size", "64", "--repeats", "1", "--threads", "1"]


def test_models_have_the_documented_sizes():
    sd, tiny, micro = bench_model("sd15"), bench_model("tiny"), bench_model("micro")
    assert (sd.run.frames, sd.run.size, sd.vae_factor, sd.context_dim) == (24, 512, 8, 768)
    heads = [c // tiny.unet.attention_head_dim for c in tiny.unet.block_out_channels]
    assert heads == [40, 80, 160, 160] == [c // sd.unet.attention_head_dim for c in sd.unet.block_out_channels]
    assert (tiny.run.frames, tiny.run.size // tiny.vae_factor) == (8, 32)
    assert (micro.run.frames, micro.run.size, micro.vae_factor, micro.context_dim) == (8, 64, 4, 64)


def test_flop_count_equals_hand_count_on_a_linear_and_on_cpu_attention():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    assert count_flops(lambda: lin(x)) == 2 * 5 * 16 * 8  # one multiply-add per weight and row
    B, h, L, S, d = 2, 3, 7, 11, 4
    q, k, v = torch.randn(B, h, L, d), torch.randn(B, h, S, d), torch.randn(B, h, S, d)
    # q k^T and (softmax) v: two products of 2 L S d FLOPs per batch and head
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * B * h * L * S * d)
    q.requires_grad_(True)
    # forward's two products, backward's five (the scores again, dV, dP, dQ, dK), as torch counts its CUDA kernels
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 7 * (2 * B * h * L * S * d)
    assert {str(op) for op in FLOP_FORMULAS} == {"aten._scaled_dot_product_flash_attention_for_cpu",
                                                 "aten._scaled_dot_product_flash_attention_for_cpu_backward"}


def test_table_structure_and_append(tmp_path, capsys):
    log = tmp_path / "PERF.md"
    log.write_text("# log\n")
    assert main(SMALL + ["--vgt", "pure,hyper", "--steps", "2", "--append", str(log)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    rows = [r for r in rows if not r.startswith("| ---")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["APLA step, VGT-pure", "APLA step, VGT-hyper", "DDIM inversion, 2 steps",
                     "guided DDIM sampling, 2 steps", "VAE encode, 2 frames", "VAE decode, 2 frames"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        seconds, runs, peak = float(cells[1]), int(cells[2]), cells[3]
        gflop, tflops = float(cells[4].replace(",", "")), float(cells[5])
        assert seconds > 0 and runs == 1 and re.fullmatch(r"\d+\.\d\d GB", peak) and gflop > 0
        assert tflops == pytest.approx(gflop / 1e3 / seconds, rel=0.1, abs=1e-3)  # of the printed, rounded time
    assert "2 frames x 64^2 px on cpu" in out and "float32, no checkpointing" in out
    text = log.read_text()
    assert text.startswith("# log\n") and "APLA step, VGT-hyper" in text and "python -m apla.bench" in text


def test_step_flops_are_the_meta_devices_and_the_cpus():
    """The FLOPs of one step counted on the meta device (attention as matrix products) equal those counted on a real
    CPU step (the fused CPU kernel, FLOP_FORMULAS); checkpointing adds exactly a recomputed forward's worth."""
    spec = bench_model("micro")
    cfg = run_config(spec, 2, 64, "hyper", "no", False)
    meta = step_flops(spec, cfg)
    model, _ = build(spec, cfg, "cpu", with_vae=False)
    opt_g, opt_d = run.optimizers(cfg, model)
    shape = latent_shape(spec, cfg)
    z0, eps, context = torch.randn(shape), torch.randn(shape), torch.randn(1, 77, spec.context_dim)
    cpu = count_flops(lambda: model.train_step(z0, context, torch.tensor([500]), eps, opt_g, opt_d, None, 1.0))
    assert cpu == meta["step"] and meta["unet_forward"] < meta["step"]
    with_recompute = step_flops(spec, run_config(spec, 2, 64, "hyper", "no", True))["step"]
    assert meta["step"] < with_recompute < meta["step"] + meta["unet_forward"] * 1.5


def test_storage_tracker_hand_count():
    with StorageTracker() as tracker:
        x = torch.randn(100, 10, requires_grad=True)                   # 4,000 bytes
        w = torch.randn(10, 20, requires_grad=True)                    # 800
        y = (x @ w).relu()                                             # x @ w: 8,000 until relu has run; y: 8,000
        assert tracker.live == 4000 + 800 + 8000 and tracker.peak == 4000 + 800 + 8000 + 8000
        view = y[:10]                                                  # a view: no new storage
        assert tracker.live == 12800
        y.sum().backward()
        del y, view
        assert x.grad.shape == (100, 10) and tracker.live == 4000 + 800 + 4000 + 800  # weights and their gradients


def test_memory_prediction_matches_a_measured_cpu_step():
    """The meta-device prediction (float32, no autocast: what the CPU runs) against the same step on real CPU tensors,
    measured by the tensors' storage: equal within 3% (the prediction's fused-attention backward also holds flash
    attention's float32 dq accumulator, which the CPU kernel does not)."""
    spec = bench_model("micro")
    cfg = run_config(spec, 8, 64, "pure", "no", False)
    predicted = predict_memory(spec, cfg)
    with StorageTracker() as tracker:
        model, _ = build(spec, cfg, "cpu", with_vae=False)
        opt_g, opt_d = run.optimizers(cfg, model)
        shape = latent_shape(spec, cfg)
        batch = torch.randn(shape), torch.randn(1, 77, spec.context_dim), torch.tensor([500]), torch.randn(shape)
        for _ in range(2):
            model.train_step(*batch, opt_g, opt_d, None, cfg.max_grad_norm)
    assert tracker.peak > 50e6
    assert predicted["peak"] == pytest.approx(tracker.peak, rel=0.03)
    assert predicted["peak"] > predicted["after_step"] > predicted["weights"] > 0


def test_compare_diffusers_flops_differ_by_the_text_projections_diffusers_repeats():
    """With the inflation off our U-Net is SD frame by frame; its FLOPs are diffusers' less what diffusers computes
    for each of the F images and we once per clip: the keys and values of the text, (F - 1) x 2 projections x
    2 * 77 * D * C per transformer block of width C, and the time embedding's two linear layers."""
    pytest.importorskip("diffusers")
    from apla.sd.attention import TransformerBlock
    from apla.bench.compare import compare
    from apla.sd.unet import UNet3DConditionModel

    spec, frames = bench_model("tiny"), 2
    result = compare(spec, frames, 64, torch.device("cpu"), "no", 1)
    assert set(result) == {"forward", "forward + backward"}
    with torch.device("meta"):
        widths = [m.attn2.to_k.out_features for m in UNet3DConditionModel(spec.unet).modules()
                  if isinstance(m, TransformerBlock)]
    c0 = spec.unet.block_out_channels[0]
    text = 2 * sum(2 * 77 * spec.context_dim * c for c in widths)  # to_k and to_v of every block
    time_embedding = 2 * (c0 * 4 * c0 + 16 * c0 ** 2)  # linear_1 (c0 -> 4 c0), linear_2 (4 c0 -> 4 c0)
    repeated = (frames - 1) * (text + time_embedding)
    for r in result.values():
        (td, fd), (to, fo), (ti, fi) = r["diffusers"], r["off"], r["inflated"]
        assert min(td, to, ti) > 0
        assert fd - fo == repeated and fi > fo


@pytest.mark.parametrize("argv, words", [
    (["--vgt", "pure,bogus"], "--vgt"), (["--measure", "step,fly"], "--measure"), (["--size", "60"], "--size"),
    (["--repeats", "0"], "--repeats"), (["--model", "sd21"], "--model"), (["--size", "72"], "multiple of 16")])
def test_bad_flags_one_line_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_load_measures_time_and_peak_memory_of_loading_in_a_fresh_process(tmp_path, capsys):
    """`--load`: one row per file and checkout, time and peak resident memory of the child that loaded it; the peak
    holds at least the loaded parameters."""
    pytest.importorskip("diffusers")
    from apla.bench.load import measure_load
    from tests.helpers.tiny_sd import make_tiny_sd

    folder = make_tiny_sd(tmp_path / "sd")
    r = measure_load(folder)
    assert r["seconds"] > 0 and r["peak"] > r["params"] > 0
    assert main(["--load", str(folder)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sd |")]
    assert len(rows) == 1 and re.search(r"\| \d+\.\d s \| \d+\.\d\d GB \| \d+\.\d\dx \|$", rows[0]), rows
