"""Generate videos from a run of train.py: DDIM-invert the source clip, then guided DDIM sampling with new prompts.

    python sample.py                                  # the default run, its prompt and its edit prompts
    python sample.py --run runs/apla --prompt "a blue square moving to the right" --steps 50 --guidance 12.5

Algorithm 1's second loop, "Sampling z_{t-1} using DDIM inversion", is read as Tune-A-Video does it: DDIM inversion
of the clip's latents to z_T with the empty prompt, then DDIM sampling from z_T with the new prompt; both evaluate
the perturbed prediction eps*, since Eq. 4 defines the tuned model's output.

Reads top to bottom: the run's config and latest checkpoint (its weights; no optimiser state) -> the base model
with the run's tuned weights -> z_T by DDIM inversion of the cached clip latents with the empty prompt
(Tune-A-Video's recipe, on eps*), or seeded noise -> for each prompt, DDIM sampling (Eq. 3) with classifier-free
guidance on the perturbed prediction eps* = eps_theta + phi (Eq. 4) -> VAE decode -> GIF (+ MP4 with PyAV) and a
PNG strip per prompt, named by apla.eval.score.sample_stem (a readable slug and a hash of the exact prompt) -> the
samples scored as the paper's tables do (apla.eval.score: FCI, warping error, PSNR, CLIP scores) into metrics.json,
which maps each prompt to its files. A checkpoint or a video with values that are not finite is refused, and
nothing of it is written.
"""
from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import torch

import apla
from apla import checkpoint as ckpt
from apla import run
from apla.eval import score as evaluate
from apla.cli import autocast_for, fail, pick_device, run_precision, sample_parser, unet_dtype
from apla.scheduler import ddim_timesteps
from apla.sd.weights import assumption_note
from apla.video import PyAVMissing, require_av, write_gif, write_mp4, write_png_strip


def mp4_possible() -> bool:
    """Whether PyAV is installed to write MP4s; if not, says so once, in one line (GIF and PNG need only Pillow)."""
    try:
        require_av("writing MP4")
    except PyAVMissing as e:
        print(f"note: MP4s skipped, GIFs and PNGs written: {e}", file=sys.stderr)
        return False
    return True


def write_outputs(frames: torch.Tensor, stem: Path, fps: int, mp4: bool) -> list:
    """A GIF and a PNG strip of (F, 3, H, W) frames, and an MP4 if `mp4`; returns the paths."""
    written = [write_gif(frames, stem.with_suffix(".gif"), fps=fps), write_png_strip(frames, stem.with_suffix(".png"))]
    if mp4:
        written.append(write_mp4(frames, stem.with_suffix(".mp4"), fps=fps))
    return written


def main(argv=None) -> int:
    """generate(), with Ctrl-C (exit status 130), a full disk (1) and other OS errors (2) said in one line."""
    args = sample_parser().parse_args(argv)
    try:
        return generate(args)
    except ckpt.CheckpointError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; the files written so far are whole, the others were not written", code=130)
    except OSError as e:
        fail(ckpt.describe_os_error(e), code=1 if e.errno == errno.ENOSPC else 2)


def generate(args) -> int:
    run_dir, device = Path(args.run), pick_device(args.device)
    cfg = run.read_config(run_dir)
    if args.checkpoint and not (Path(args.checkpoint) / "weights.safetensors").is_file():
        fail(f"--checkpoint {args.checkpoint}: no weights.safetensors there")
    if not args.checkpoint and ckpt.latest_checkpoint(run_dir) is None:
        fail(f"--run {run_dir}: no checkpoint found (train first, or pass --checkpoint)")
    steps = args.steps if args.steps is not None else cfg.sample_steps
    guidance = args.guidance if args.guidance is not None else cfg.guidance
    pretrained = args.pretrained or cfg.pretrained
    prediction_type = args.prediction_type or cfg.prediction_type                   # None in runs saved before it
    precision, why = run_precision(args.mixed_precision, device)                     # auto: as train.py
    if why:
        print(f"sample.py: {why}", file=sys.stderr)

    # ---- the base model (on CUDA its U-Net in the autocast dtype) + the run's tuned weights (trainable set, VGT) --
    try:
        sd = apla.load_stable_diffusion(pretrained, device=device, dtype={"unet": unet_dtype(precision, device)},
                                        prediction_type=prediction_type)
    except (ValueError, OSError) as e:
        fail(f"cannot load base model {pretrained!r}: {e}")
    if assumption_note(sd):                                                    # what an SD 2.x single file is silent on
        print(f"note: {assumption_note(sd)}", file=sys.stderr)
    z0 = run.read_source(run_dir)["z0_mean"].to(device)                        # (1, 4, F, h, w)
    model = run.build_apla(cfg, sd, z0.shape, device, train=False)
    if args.checkpoint:
        used = Path(args.checkpoint)
        run.load_checkpoint(used, cfg, model)
    else:  # while a train.py may go on writing the run
        used = run.load_latest(run_dir, cfg, model)
    model.eval()
    use_vgt = not args.no_vgt
    timesteps = ddim_timesteps(steps, len(sd.alpha_bar))
    try:  # the CLIP model of the scores, loaded first so that a bad --clip-model costs no sampling
        clip = (None, None) if args.no_metrics else evaluate.run_clip(cfg, args.clip_model, device)
    except evaluate.MetricsError as e:
        fail(str(e))
    out_dir = Path(args.out) if args.out else run_dir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)                                 # an unwritable --out fails here
    print(f"sample.py: checkpoint {used}", file=sys.stderr)
    amp = autocast_for(precision, device)

    # ---- z_T: DDIM inversion of the clip with the empty prompt, on eps* (or seeded noise) ----------------------
    with torch.no_grad():
        uncond = apla.encode_prompt(sd, [""]).to(device)                       # (1, 77, D)
        negative = apla.encode_prompt(sd, [args.negative_prompt]).to(device) if args.negative_prompt else uncond
    if args.no_inversion:
        z_T = torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    else:
        z_T = run.invert_clip(model, z0, uncond, timesteps, amp, use_vgt, progress=not args.no_progress)

    # ---- each prompt: guided DDIM sampling on eps* (Eq. 3 with Eq. 4), decode, write ---------------------------
    mp4 = mp4_possible()
    videos, files = [], {}
    for prompt in dict.fromkeys(args.prompt or run.sample_prompts(cfg)):  # each prompt once, in order
        with torch.no_grad():
            cond = apla.encode_prompt(sd, [prompt]).to(device)                 # (1, 77, D)
        z0_new = run.guided_sample(model, z_T, negative, cond, timesteps, guidance, amp, use_vgt,
                                   progress=not args.no_progress)
        if not torch.isfinite(z0_new).all():
            fail(f"{prompt!r}: the sampled latents are not finite; no video written (is the checkpoint {used} one "
                 "of a run that blew up?)")
        frames = run.decode_latents(sd.vae, z0_new)                            # (F, 3, H, W)
        files[prompt] = write_outputs(frames, out_dir / evaluate.sample_stem(prompt), args.fps, mp4)
        print(f"{prompt!r}: {', '.join(str(p) for p in files[prompt])}", file=sys.stderr)
        videos.append((prompt, frames))

    # ---- the samples scored: metrics.json and a table (python -m apla.eval OUT prints the same) ------------
    if not args.no_metrics:
        try:
            report = evaluate.score_samples(videos, cfg, out_dir / "metrics.json", clip, device, files)
        except (evaluate.MetricsError, evaluate.VideoError) as e:
            fail(f"scoring the samples: {e} (--no-metrics skips it)")
        print(evaluate.format_table(report))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # what is left is the interpreter's exit: a Ctrl-C now would only print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
