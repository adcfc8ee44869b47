"""apla.loop, the training loop's conventions: diffusers' learning-rate schedules (against diffusers' own
get_scheduler), their state and the gradient scaler's through a checkpoint, the stop on SIGTERM / SIGUSR1, and
TensorBoard as an optional extra that is one line when missing."""
import math
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

from apla import loop, run
from apla.config import TrainConfig
from tests.helpers.runs import SHAPES_GIF, make_tiny, run_exit, train, train_args
from tests.test_run import SHAPE, config, tiny_sd

LR = 2e-4
# the schedules step here without an optimiser step between, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def settings(name, warmup, total, num_cycles=1, power=1.0):
    return SimpleNamespace(lr_scheduler=name, lr_warmup_steps=warmup, max_steps=total, lr_num_cycles=num_cycles,
                           lr_power=power)


def rates(scheduler, updates: int) -> list[float]:
    """The learning rate of each of `updates` updates: read before the schedule steps, as train.py logs it."""
    out = []
    for _ in range(updates):
        out.append(scheduler.get_last_lr()[0])
        scheduler.step()
    return out


def sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)


@pytest.mark.parametrize("name", loop.LR_SCHEDULES)
@pytest.mark.parametrize("warmup, total", [(0, 12), (3, 12), (12, 12), (5, 3)])
@pytest.mark.parametrize("num_cycles, power", [(1, 1.0), (3, 2.0)])
def test_lr_schedules_are_diffusers_get_scheduler(name, warmup, total, num_cycles, power):
    """Each name's rates over a run (and past its end) equal diffusers.optimization.get_scheduler's with the same
    warmup, horizon, cycles and power."""
    get_scheduler = pytest.importorskip("diffusers.optimization").get_scheduler
    if name == "polynomial" and warmup == total:
        pytest.skip("diffusers' polynomial divides by total - warmup = 0 here (ours takes max(1, ...))")
    ours = loop.LRSchedule(settings(name, warmup, total, num_cycles, power), sgd())
    theirs = get_scheduler(name, sgd(), num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles,
                           power=power)
    got, want = rates(ours.schedulers[0], total + 3), rates(theirs, total + 3)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert ours.lr == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-18)


def test_lr_factor_closed_forms():
    half = math.cos(math.pi / 4)  # the cosine a quarter and three quarters of the way through the decay
    assert [loop.lr_factor(s, "cosine", 2, 6) for s in range(6)] == pytest.approx(
        [0, 0.5, 1, (1 + half) / 2, 0.5, (1 - half) / 2])
    assert [loop.lr_factor(s, "linear", 0, 4) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert loop.lr_factor(3, "cosine_with_restarts", 0, 4, num_cycles=2) == pytest.approx(0.5)  # 2nd cycle's middle
    assert loop.lr_factor(2, "polynomial", 0, 4, power=2.0, lr=1.0) == pytest.approx(0.25 * (1 - 1e-7) + 1e-7)
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        loop.lr_factor(0, "piecewise_constant", 0, 4)


def test_both_optimisers_follow_the_schedule_from_their_own_rates():
    g, d = sgd(), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = loop.LRSchedule(settings("linear", 1, 3), g, None, d)
    seen = []
    for _ in range(3):
        seen.append((g.param_groups[0]["lr"], d.param_groups[0]["lr"]))
        schedule.step()
    assert seen == pytest.approx([(0, 0), (LR, 1e-3), (LR / 2, 5e-4)])


def test_schedule_and_scaler_states_go_through_a_checkpoint(tmp_path):
    """A checkpoint keeps the learning-rate schedule's position and the gradient scaler's scale: loaded into fresh
    ones, the next update's rate and scale are the saved run's."""
    cfg = config(lr_scheduler="cosine", lr_warmup_steps=2, max_steps=10)
    model = run.build_apla(cfg, tiny_sd(), SHAPE, "cpu")
    opt_g, opt_d = run.optimizers(cfg, model)
    schedule, scaler = loop.LRSchedule(cfg, opt_g, opt_d), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(4):
        schedule.step()
    scaler.scale(torch.ones(()))  # the scale exists once a loss is scaled
    scaler.update(123.0)
    run.save_checkpoint(tmp_path, 4, cfg, model, opt_g, opt_d, torch.Generator(), run.checkpoint_meta(cfg, model),
                        {"lr_schedule": schedule, "scaler": scaler})
    fresh = run.build_apla(cfg, tiny_sd(), SHAPE, "cpu")
    opt_g2, opt_d2 = run.optimizers(cfg, fresh)
    schedule2, scaler2 = loop.LRSchedule(cfg, opt_g2, opt_d2), torch.amp.GradScaler("cpu")
    assert run.load_checkpoint(tmp_path / "checkpoints" / "step-000004", cfg, fresh, opt_g2, opt_d2,
                               torch.Generator(), {"lr_schedule": schedule2, "scaler": scaler2}) == 4
    assert schedule2.lr == schedule.lr == pytest.approx(cfg.lr * loop.lr_factor(4, "cosine", 2, 10))
    assert scaler2.get_scale() == 123.0
    schedule.step(), schedule2.step()
    assert [o.param_groups[0]["lr"] for o in (opt_g2, opt_d2)] == [o.param_groups[0]["lr"] for o in (opt_g, opt_d)]


def test_config_names_the_schedule_or_refuses_it():
    assert TrainConfig(lr_scheduler="cosine_with_restarts", lr_num_cycles=3).lr_num_cycles == 3
    for bad, words in [({"lr_scheduler": "piecewise_constant"}, "lr_scheduler must be one of"),
                       ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
                       ({"report_to": "wandb"}, "report_to must be one of"),
                       ({"lr_scheduler": "polynomial", "lr": 1e-8}, "polynomial decays to 1e-07")]:
        with pytest.raises(ValueError, match=words):
            TrainConfig(**bad)


@pytest.mark.parametrize("sig", loop.STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_stop_on_signal_notes_the_signal_and_restores_the_handlers(sig):
    before = signal.getsignal(sig)
    with loop.StopOnSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)  # handled at once, in this thread
        assert stop.requested and stop.signal == signal.Signals(sig).name
    assert signal.getsignal(sig) is before
    assert loop.STOPPED == 143


def test_tensorboard_missing_is_one_line_and_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    (tmp_path / "tiny").mkdir()
    tiny, out = make_tiny(tmp_path / "tiny"), tmp_path / "run"
    capsys.readouterr()
    assert run_exit(train.main, train_args(tiny, out, 1, SHAPES_GIF, 2, "--report-to", "tensorboard")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pip install tensorboard" in err[0], err
    assert not out.exists()

