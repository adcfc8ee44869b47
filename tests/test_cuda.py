"""On a CUDA device: train.py and sample.py for a few steps on the tiny SD in bf16 and fp16, 'auto' resolving as
documented, a bf16 step without a host-device synchronisation, the meta-device memory prediction against
torch.cuda.max_memory_allocated, and the bench's table. Every test here is skipped, with its reason, on a machine
without CUDA."""
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False on this machine)")
pytest.importorskip("diffusers")

from apla.eval.score import sample_stem  # noqa: E402
from tests.test_train import SHAPES_GIF, sample, train  # noqa: E402  (the scripts, loaded as modules)
from tests.helpers.tiny_sd import TINY_RUN, make_tiny_sd  # noqa: E402


def native_bf16() -> bool:
    return torch.cuda.is_available() and (bool(torch.version.hip) or torch.cuda.get_device_capability()[0] >= 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cuda")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY_RUN))
    return {"model": str(make_tiny_sd(root / "sd")), "config": str(cfg)}


def cuda_train_args(tiny, out, *extra):
    return ["--config", tiny["config"], "--pretrained", tiny["model"], "--video", str(SHAPES_GIF), "--prompt",
            "a red circle moving to the right", "--output-dir", str(out), "--max-steps", "3", "--frames", "4",
            "--size", "64", "--seed", "0", "--no-progress", "--device", "cuda", *extra]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_and_sample_on_cuda(tiny, tmp_path, precision):
    if precision == "bf16" and not native_bf16():
        pytest.skip("bf16 needs compute capability 8.0 or later")
    run = tmp_path / precision
    assert train.main(cuda_train_args(tiny, run, "--mixed-precision", precision)) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["mixed_precision"] == precision and cfg["gradient_checkpointing"] is False  # a tiny U-Net
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(abs(r["total"]) < 1e3 for r in log)
    out = tmp_path / f"samples-{precision}"
    assert sample.main(["--run", str(run), "--steps", "3", "--prompt", "a blue square moving to the right", "--out",
                        str(out), "--no-progress", "--device", "cuda", "--mixed-precision", precision,
                        "--no-metrics"]) == 0
    assert (out / f"{sample_stem('a blue square moving to the right')}.gif").is_file()


def test_auto_defaults_on_cuda(tiny, tmp_path):
    run = tmp_path / "auto"
    assert train.main(cuda_train_args(tiny, run, "--gradient-checkpointing", "on")) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["mixed_precision"] == ("bf16" if native_bf16() else "fp16") and cfg["gradient_checkpointing"] is True


def test_compile_option_trains(tiny, tmp_path):
    run = tmp_path / "compiled"
    assert train.main(cuda_train_args(tiny, run, "--compile")) == 0
    assert json.loads((run / "config.json").read_text())["compile"] is True
    assert len((run / "log.jsonl").read_text().splitlines()) == 3


def _tiny_bench(variant="pure", checkpointing=True, precision=None):
    from apla.bench.core import bench_model, run_config

    spec = bench_model("tiny")
    precision = precision or ("bf16" if native_bf16() else "fp16")
    return spec, run_config(spec, 8, 256, variant, precision, checkpointing)


def test_bf16_step_has_no_host_device_synchronisation():
    if not native_bf16():
        pytest.skip("bf16 needs compute capability 8.0 or later")
    from apla import run
    from apla.bench.core import build, latent_shape
    from apla.cli import autocast_for

    spec, cfg = _tiny_bench(precision="bf16")
    device = torch.device("cuda")
    model, _ = build(spec, cfg, device, with_vae=False)
    opt_g, opt_d = run.optimizers(cfg, model)
    shape = latent_shape(spec, cfg)
    batch = (torch.randn(shape, device=device), torch.randn(1, 77, spec.context_dim, device=device),
             torch.tensor([500], device=device), torch.randn(shape, device=device))
    amp = autocast_for("bf16", device)
    model.train_step(*batch, opt_g, opt_d, None, cfg.max_grad_norm, amp)  # the warm-up creates AdamW's states
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = model.train_step(*batch, opt_g, opt_d, None, cfg.max_grad_norm, amp)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(v).item() for v in terms.values())


@pytest.mark.parametrize("variant", ["pure", "hyper"])
def test_memory_prediction_against_max_memory_allocated(variant):
    """The meta-device prediction of apla.bench.predict against the allocator's peak of the same two steps; the
    prediction leaves out cuBLAS/cuDNN workspaces and the allocator's rounding, hence the tolerance."""
    from apla import run
    from apla.bench.core import build, latent_shape
    from apla.bench.predict import predict_memory
    from apla.cli import autocast_for

    spec, cfg = _tiny_bench(variant)
    predicted = predict_memory(spec, cfg)["peak"]
    device = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model, _ = build(spec, cfg, device, with_vae=False)
    opt_g, opt_d = run.optimizers(cfg, model)
    shape = latent_shape(spec, cfg)
    batch = (torch.randn(shape, device=device), torch.randn(1, 77, spec.context_dim, device=device),
             torch.tensor([500], device=device), torch.randn(shape, device=device))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16")
    for _ in range(2):
        model.train_step(*batch, opt_g, opt_d, scaler, cfg.max_grad_norm, autocast_for(cfg.mixed_precision, device))
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(device) - base
    print(f"\nVGT-{variant}: predicted {predicted / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB")
    assert predicted == pytest.approx(measured, rel=0.15)


def test_bench_table_on_cuda(capsys):
    from apla.bench.__main__ import main

    assert main(["--model", "tiny", "--frames", "2", "--size", "64", "--device", "cuda", "--steps", "2",
                       "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "APLA step, VGT-pure" in out and "peak allocated" in out and "VAE decode, 2 frames" in out
