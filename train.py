"""Tune a pretrained Stable Diffusion, inflated to video, on one clip with APLA (Algorithm 1).

    python train.py                                   # the defaults (see --help): the micro model on a shapes clip
    python train.py --pretrained path/to/v1-5-pruned-emaonly.safetensors --video bigbuckbunny --prompt "..."
                                                      # on CUDA: bf16 autocast and gradient checkpointing by default

Reads top to bottom: configuration -> the clip and the base model -> the clip and the prompt encoded once -> the
run's models (U-Net trainable set, VGT, D) -> Algorithm 1's loop, whose step is `apla.algorithm.APLA`
(Eq. 1 noising, Eq. 4 perturbed prediction, Eq. 18 hyper-loss, Eq. 20 for U-Net and VGT, Eq. 19 for D)
-> a JSONL log line per step (and TensorBoard's, --report-to), atomic checkpoints and (--sample-every) samples to
watch in the run directory. A step is one update: of one draw, or the mean of --gradient-accumulation-steps draws,
at the rate of the learning-rate schedule (apla.loop). SIGTERM or SIGUSR1 (a cluster's time limit) ends the run
after its step in progress, with a checkpoint of it.

Algorithm 1 says "Extract the first frame x_0 from v": we read x_0 as the whole clip (every sampled frame), since
the same algorithm outputs a video and the paper trains on "24 frames" of each clip. Its "Encode x_0 ... into a
latent code z_0" is done once; as Tune-A-Video, each step then draws a fresh sample of the VAE posterior of the
cached latents (mean + std * noise), and sampling inverts the posterior mean.
"""
from __future__ import annotations

import errno
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import apla
from apla import checkpoint as ckpt
from apla import loop, run
from apla.assets import resolve_video
from apla.cli import (autocast_for, fail, parse_train_args, pick_device, resolve_gradient_checkpointing,
                      run_precision)
from apla.config import preset
from apla.sd.weights import assumption_note
from apla.video import VideoError, read_video


def start_checkpoint(run_dir: Path, resume: bool):
    """The checkpoint a run continues from (--resume), or None for a new run; one-line errors otherwise."""
    latest = ckpt.latest_checkpoint(run_dir)
    if resume and latest is None:
        fail(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (without --resume the run starts afresh)")
    if not resume and latest is not None:
        fail(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output-dir")
    return latest


def log_line(step: int, t: torch.Tensor, terms: dict, lr: float, seconds: float) -> dict:
    """One record of log.jsonl: the step's timestep (a list of the k timesteps of an accumulated update), its terms
    as floats (means over the k draws), read from the device in one transfer, and the learning rate it used."""
    values = torch.stack([*t.float(), *terms.values()]).tolist()
    timesteps = [int(v) for v in values[:len(t)]]
    return {"step": step, "t": timesteps[0] if len(t) == 1 else timesteps, **dict(zip(terms, values[len(t):])),
            "lr": lr, "step_time": seconds}


def halt(run_dir: Path, why: str):
    """End a run whose step is not finite: one line, exit status 1; its last finite checkpoint stays the latest."""
    latest = ckpt.latest_checkpoint(run_dir)
    fail(f"{why}; stopping (a lower --lr may help), "
         f"{f'the last finite checkpoint {latest} is kept' if latest else 'no checkpoint was written'}", code=1)


def main(argv=None) -> int:
    """train(), with every way it can stop said in one line: SIGTERM or SIGUSR1 (exit status 143, after a checkpoint
    of the last step), Ctrl-C (130) and a full disk (1) say how the run continues, another writer of the run
    directory and other OS errors (2) what is at fault."""
    cfg, resume = parse_train_args(argv)
    try:
        run.absolute_paths(cfg)
    except ValueError as e:
        fail(str(e))
    run_dir = Path(cfg.output_dir)
    with ckpt.RunLock(run_dir) as lock, loop.StopOnSignal() as stop:
        try:
            return train(cfg, resume, lock, stop)
        except ckpt.CheckpointError as e:  # another writer (RunLocked), a damaged run file
            fail(str(e))
        except KeyboardInterrupt:
            fail(f"interrupted at step {run.last_logged_step(run_dir)}; {run.resume_hint(run_dir)}", code=130)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                fail(f"{ckpt.describe_os_error(e)} at step {run.last_logged_step(run_dir)}; once space is freed, "
                     f"{run.resume_hint(run_dir)}", code=1)
            fail(ckpt.describe_os_error(e))


def train(cfg, resume: bool, lock: ckpt.RunLock, stop: loop.StopOnSignal) -> int:
    """Algorithm 1 on cfg's clip, in the run directory that `lock` keeps to this process (taken before any work when
    the directory exists, else once the inputs are checked), until max_steps or a signal `stop` notes."""
    # ---- the run directory: its one writer (a second train.py is refused here, before any work) -----------------
    run_dir, device = lock.run_dir, pick_device(cfg.device)
    if run_dir.is_dir():
        lock.acquire()
    start = start_checkpoint(run_dir, resume)
    if start is not None:  # a resumed run keeps what shaped its data, models and optimisers
        conflicts = run.resume_conflicts(run.read_config(run_dir), cfg)
        if conflicts:
            fail(f"--resume cannot change: {'; '.join(conflicts)} (start a new run in another --output-dir)")
    torch.manual_seed(cfg.seed)

    # ---- the clip x (Algorithm 1's x_0: every sampled frame) and the base model, checked before anything is written
    try:
        board = loop.TensorBoard(run_dir) if cfg.report_to == "tensorboard" else None    # the optional extra
        frames = read_video(resolve_video(cfg.video), cfg.frames, start=cfg.start, stride=cfg.stride,
                            size=cfg.size)                                                 # (F, 3, H, W)
        sd = apla.load_stable_diffusion(cfg.pretrained, device=device, prediction_type=cfg.prediction_type)
    except (VideoError, ImportError) as e:
        fail(str(e))
    except (ValueError, OSError) as e:
        fail(f"cannot load --pretrained {cfg.pretrained!r}: {e}")
    if assumption_note(sd):                                                    # what an SD 2.x single file is silent on
        print(f"note: {assumption_note(sd)}", file=sys.stderr)
    cfg.prediction_type = sd.prediction_type                                   # recorded in config.json
    cfg.apla.perceptual_weights = run.resolve_perceptual_weights(cfg.apla)          # recorded in config.json

    # ---- the clip and the prompt, encoded once -----------------------------------------------------------------
    z0_mean, z0_std = run.encode_clip(sd.vae, frames, device)                  # (1, 4, F, h, w) each
    with torch.no_grad():
        context = apla.encode_prompt(sd, [cfg.prompt]).to(device)              # (1, 77, D)
        texts = {p: apla.encode_prompt(sd, [p]).to(device) for p in ["", *run.sample_prompts(cfg)] if cfg.sample_every}
    watch = run.TrainingSamples(cfg, sd.vae, texts, len(sd.alpha_bar), device) if cfg.sample_every else None
    run.release_encoders(sd)                                                   # the loop needs neither again

    # ---- the run's models: U-Net eps_theta (its trainable set), VGT phi, discriminator D; their optimisers ------
    try:
        model = run.build_apla(cfg, sd, z0_mean.shape, device)
    except ValueError as e:
        fail(str(e))
    cfg.mixed_precision, why = run_precision(cfg.mixed_precision, device)                   # "auto" -> as run
    if why:
        print(f"apla: {why}", file=sys.stderr)
    cfg.gradient_checkpointing = resolve_gradient_checkpointing(cfg.gradient_checkpointing, device, model.unet.config)
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    if cfg.compile:
        model.compile_networks()
    opt_g, opt_d = run.optimizers(cfg, model)
    schedule = loop.LRSchedule(cfg, opt_g, opt_d)                  # diffusers' lr_scheduler, update by update
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    states = {"lr_schedule": schedule, "scaler": scaler}          # saved with the optimisers' in each checkpoint
    meta, step, draws = run.checkpoint_meta(cfg, model), 0, cfg.gradient_accumulation_steps

    # ---- the run directory, written from here on: config, the encoded clip, the log cut back to the checkpoint --
    if not lock.held:  # a new run directory, made now that its inputs are checked
        lock.acquire()
        start = start_checkpoint(run_dir, resume)  # (another run may have made it meanwhile)
    if start is not None:
        step = run.load_checkpoint(start, cfg, model, opt_g, opt_d, gen, states)
    ckpt.remove_temporaries(run_dir)                                            # of an interrupted write
    ckpt.atomic_write_json(run_dir / "config.json", cfg.to_dict())
    ckpt.atomic_save_safetensors({"z0_mean": z0_mean, "z0_std": z0_std, "context": context},
                                 run_dir / "source.safetensors", metadata={"prompt": cfg.prompt})
    if start is None:  # a new run started from its base model's preset: which, and why
        print(f"apla: {preset(cfg.pretrained)[1]}", file=sys.stderr)
    sizes = {k: sum(p.numel() for p in m.parameters() if p.requires_grad)
             for k, m in (("U-Net", model.unet), (f"VGT-{cfg.apla.vgt}", model.vgt), ("D", model.disc)) if m}
    print(f"apla: trains {', '.join(f'{k} {v:,}' for k, v in sizes.items())} parameters; {frames.shape[0]} "
          f"frames at {frames.shape[-2]}x{frames.shape[-1]} px on {device}; run dir {run_dir}", file=sys.stderr)

    # ---- Algorithm 1: the fine-tuning loop ----------------------------------------------------------------------
    model.train()
    amp = autocast_for(cfg.mixed_precision, device)
    with run.StepLog(run_dir, step, board) as log:                 # each step once, restored up to the checkpoint
        for note in log.notes(resumed=start is not None):
            print(note, file=sys.stderr)
        bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, desc="APLA tuning",
                   disable=not cfg.progress)
        for step in bar:
            t0 = time.perf_counter()
            # `draws` posterior samples of the cached clip latents, timesteps t ~ U{0..T-1} and noises eps ~ N(0, I),
            # which one update averages (one draw unless --gradient-accumulation-steps)
            shape = (draws, *z0_mean.shape[1:])                                # (k, 4, F, h, w)
            z0 = z0_mean + z0_std * torch.randn(shape, generator=gen, device=device)
            t = torch.randint(0, len(sd.alpha_bar), (draws,), generator=gen, device=device)
            eps = torch.randn(shape, generator=gen, device=device)
            terms = model.train_step(z0, context, t, eps, opt_g, opt_d, scaler, cfg.max_grad_norm, amp, draws)
            record = log_line(step + 1, t, terms, schedule.lr, time.perf_counter() - t0)
            schedule.step()
            bad = [key for key, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                halt(run_dir, f"step {step + 1}: loss term {bad[0]} is not finite ({record[bad[0]]})")
            if watch and (step + 1) % cfg.sample_every == 0:  # samples to watch, their cost in the log
                record["sample_time"] = watch.write(model, z0_mean, step + 1, amp)
            log.append(record)
            bar.set_postfix(loss=f"{record['total']:.4f}")
            stopping = stop.requested and step + 1 < cfg.max_steps  # SIGTERM / SIGUSR1: checkpoint, then stop
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps or stopping:
                bad = run.nonfinite(model, z0_mean, context, amp)  # only finite checkpoints
                if bad:
                    halt(run_dir, f"step {step + 1}: after the update, {bad} is not finite")
                run.save_checkpoint(run_dir, step + 1, cfg, model, opt_g, opt_d, gen, meta, states, log)
            if stopping:
                fail(f"stopped by {stop.signal} at step {step + 1}; {run.resume_hint(run_dir)}", code=loop.STOPPED)
    if watch and watch.progression():
        print(f"apla: samples while training in {watch.dir} (progression.png: first, middle and last frames)",
              file=sys.stderr)
    print(f"apla: done, {cfg.max_steps} steps; checkpoint {ckpt.latest_checkpoint(run_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # what is left is the interpreter's exit: a Ctrl-C now would only print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
