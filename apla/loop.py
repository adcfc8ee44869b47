"""The training loop's conventions around Algorithm 1, as diffusers' and Tune-A-Video's training scripts have them:
learning-rate schedules with warmup under diffusers' names, a stop on a cluster's signal, TensorBoard.

  lr_factor, LRSchedule     TrainConfig.lr_scheduler: "constant", "constant_with_warmup", "linear", "cosine",
                            "cosine_with_restarts", "polynomial", the formulas of diffusers' get_scheduler, on
                            torch.optim.lr_scheduler.LambdaLR (tests/test_loop.py compares the two)
  StopOnSignal, STOPPED     SIGTERM and SIGUSR1 (a SLURM job's time limit) ask train.py to checkpoint and stop
  TensorBoard               report_to "tensorboard": every number of log.jsonl, the learning rate, the samples

Gradient accumulation is Algorithm 1's step over k draws: apla.algorithm.APLA.train_step (accumulation_steps).
"""
from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence
from torch.optim.lr_scheduler import LambdaLR

# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_LR_END = 1e-7  # where "polynomial" decays to (diffusers' lr_end; its training scripts never change it)


def lr_factor(step: int, name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
              lr: float = 1.0) -> float:
    """The learning rate of update `step` (0 for the first) as a multiple of the optimiser's `lr`, for the schedule
    `name` with `warmup` updates of linear warmup and `total` updates in all, as diffusers.optimization.get_scheduler
    computes it: the warmup rises from 0 (the first update of a warmup has rate 0), then
      constant(_with_warmup): 1;  linear: down to 0 at `total`;  cosine: half a cosine period down to 0;
      cosine_with_restarts: `num_cycles` such halves, each restarting at 1;  polynomial: (1 - progress)^power from
      1 down to POLYNOMIAL_LR_END / lr."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the updates after the warmup
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
    if name == "polynomial":
        if step > total:
            return POLYNOMIAL_LR_END / lr
        return ((lr - POLYNOMIAL_LR_END) * (1.0 - progress) ** power + POLYNOMIAL_LR_END) / lr
    raise ValueError(f"unknown lr_scheduler {name!r}; expected one of {LR_SCHEDULES}")


class LRSchedule:
    """The learning rates of a run's optimisers, update by update: one LambdaLR of lr_factor per optimiser (theta's
    and D's, each from its own rate), stepped once per update, its state part of every checkpoint.

    A step is an update, as Tune-A-Video's max_train_steps and its global_step count them: the warmup takes
    lr_warmup_steps updates and the decay ends at max_steps, whatever gradient_accumulation_steps is. Tune-A-Video's
    script passes both counts to get_scheduler multiplied by gradient_accumulation_steps, which was right for the
    accelerate it was written against: that stepped the schedule at every accumulated batch (huggingface/accelerate
    #963, "Scheduler always steps when training with gradient accumulation", changed by #999 in January 2023);
    since then the product makes its schedule k times too slow (huggingface/diffusers#4387). We keep what it meant.
    D follows the same schedule as theta (Tune-A-Video's configs give one learning rate, which D shares), so their
    balance stays as set. A resumed run that changes max_steps follows the new horizon from the step it resumes at."""

    def __init__(self, cfg, *optimizers):
        """cfg: the run's TrainConfig (lr_scheduler, lr_warmup_steps, lr_num_cycles, lr_power, max_steps); the
        optimisers (None, for a run without D, is skipped), theta's first."""
        def factor(lr: float):
            return lambda step: lr_factor(step, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps,
                                          cfg.lr_num_cycles, cfg.lr_power, lr)

        self.schedulers = [LambdaLR(opt, factor(opt.defaults["lr"])) for opt in optimizers if opt is not None]

    @property
    def lr(self) -> float:
        """theta's learning rate of the next update (log.jsonl's "lr")."""
        return self.schedulers[0].get_last_lr()[0]

    def step(self) -> None:
        """After an update: every optimiser's rate moves to the next update's."""
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> list:
        return [scheduler.state_dict() for scheduler in self.schedulers]

    def load_state_dict(self, states: list) -> None:
        if len(states) != len(self.schedulers):
            raise ValueError(f"{len(states)} learning-rate schedules saved, {len(self.schedulers)} optimisers here")
        for scheduler, state in zip(self.schedulers, states):
            scheduler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# A stop on a cluster's signal
# ---------------------------------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# train.py's exit status after such a stop, for both signals: 128 + SIGTERM, as a shell reports a process SIGTERM
# ended, so that a job script tests one number to requeue (apla/study/README.md)
STOPPED = 128 + signal.SIGTERM


class StopOnSignal:
    """SIGTERM and SIGUSR1 as a request to stop, not a kill: SLURM ends a job at its time limit with SIGTERM (then
    SIGKILL after its grace period, 30 s by default), and sends SIGUSR1, or the signal a job names, ahead of the limit
    when asked (`#SBATCH --signal=USR1@300`). The handler only notes the signal; train.py finishes the step in
    progress (its samples too), writes a checkpoint of it, says in one line how to continue and exits with
    STOPPED. Installed on entry, the previous handlers restored on exit."""

    def __init__(self):
        self.signal: str | None = None  # the name of the signal received, once one is
        self._previous = {}

    def _note(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopOnSignal":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard (the optional extra `tensorboard`)
# ---------------------------------------------------------------------------------------------------------------
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: `tensorboard --logdir RUN` (or a folder of runs) shows them


class TensorBoard:
    """log.jsonl's records as TensorBoard sees them, through torch's SummaryWriter: each number of a record as the
    scalar train/<key> at its step (the loss terms, t, the learning rate lr, step_time, sample_time; t is a list,
    no scalar, for an accumulated update), and each GIF written while training at that step as the image
    samples/<file name> (its frames side by side).

    Made before anything is written (train.py), so that a missing package is one line, ImportError; the event file
    is opened at the first record. Its purge_step is that record's step: TensorBoard then drops what an earlier,
    stopped process of the run wrote from that step on, so a resumed run shows each step once, as log.jsonl does."""

    def __init__(self, run_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter  # the optional extra
        except ImportError:
            raise ImportError("report_to tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e '.[tensorboard]')") from None
        self._writer_class, self.run_dir, self.writer = SummaryWriter, Path(run_dir), None

    def write(self, record: dict) -> None:
        step = record["step"]
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=step)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)
        if "sample_time" in record:  # apla.run.TrainingSamples wrote samples/step-NNNNNN/ at this step
            for gif in sorted((self.run_dir / "samples" / f"step-{step:06d}").glob("*.gif")):
                self.writer.add_image(f"samples/{gif.stem}", frames_side_by_side(gif), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def frames_side_by_side(gif: Path) -> np.ndarray:
    """A GIF's frames in a row, (H, F * W, 3) uint8."""
    with Image.open(gif) as im:
        return np.concatenate([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(im)], axis=1)
