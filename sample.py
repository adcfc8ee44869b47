"""Generate videos from a run of train.py (or from a base model and a clip, without a run) and score them.

    python sample.py                                  # the default run, its prompt and its edit prompts
    python sample.py --run runs/apla --prompt "a blue square moving to the right" --steps 50 --guidance 12.5
    python sample.py --run runs/apla --no-inversion --frames 4 --size 48    # seeded noise, within what VGT allows
    python sample.py --pretrained micro --video red-circle-right --prompt "a blue circle moving to the right"

Reads top to bottom: the run (its config, latest checkpoint and cached clip latents: apla.sampling.load_run), or a
base model with no VGT and no D and its clip encoded now (load_base) -> the CLIP model of the scores -> the videos
of `apla.sampling.sample`, the Python call: z_T by DDIM inversion of the clip with the empty prompt on eps*, kept
in RUN/inversions/ and reused by later calls on the same checkpoint and settings (or seeded noise), then guided
DDIM sampling per prompt (Eq. 3 with Eq. 4), decoded -> a GIF (+ MP4 with PyAV) and a PNG strip per prompt, named
by apla.eval.score.sample_stem (a readable slug and a hash of the exact prompt), and grid.gif / grid.png of all
prompts, labelled -> the samples scored as the paper's tables do (apla.eval.score: FCI, warping error, PSNR, CLIP
scores) into metrics.json, which maps each prompt to its files (relative to the run directory). A checkpoint or a
video with values that are not finite is refused, and nothing of it is written.
"""
from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import torch

from apla import checkpoint as ckpt
from apla import run, sampling
from apla.cli import fail, pick_device, sample_parser
from apla.config import TrainConfig
from apla.eval import score as evaluate
from apla.video import PyAVMissing, VideoError, require_av, write_gif, write_grid, write_mp4, write_png_strip

BASE_SAMPLES = "runs/base/samples"  # where --video's samples of a base model go unless --out says


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
    device = pick_device(args.device)
    if args.video is not None and (args.run or args.checkpoint):
        fail("--video samples a base model without a run; it takes no --run or --checkpoint")
    try:  # the run (or the base model and its clip), then the CLIP model of the scores, before any sampling
        if args.video is not None:
            sampler = sampling.load_base(args.pretrained or TrainConfig.pretrained, args.video, frames=args.frames,
                                         size=args.size, device=device, mixed_precision=args.mixed_precision,
                                         prediction_type=args.prediction_type)
        else:
            sampler = sampling.load_run(args.run or TrainConfig.output_dir, args.checkpoint, args.pretrained, device,
                                        args.mixed_precision, args.prediction_type)
        if sampler.precision_note:
            print(f"sample.py: {sampler.precision_note}", file=sys.stderr)
        if sampler.model_note:                                                 # what an SD 2.x single file is silent on
            print(f"note: {sampler.model_note}", file=sys.stderr)
        invert, use_vgt = not args.no_inversion, not args.no_vgt
        sampling.latent_shape(sampler, args.frames, args.size, invert, use_vgt)  # a request VGT cannot honour
        if not args.prompt and not sampler.cfg.prompt:
            fail(f"--video {args.video}: the clip's caption is not known; name the prompts to sample with --prompt")
        prompts = list(dict.fromkeys(args.prompt or run.sample_prompts(sampler.cfg)))  # each once, in order
        clip = (None, None) if args.no_metrics else evaluate.run_clip(sampler.cfg, args.clip_model, device)
    except (sampling.SamplingError, VideoError, evaluate.MetricsError) as e:
        fail(str(e))
    root = sampler.run_dir or Path(args.out or BASE_SAMPLES)  # what metrics.json's paths are relative to
    out_dir = Path(args.out) if args.out else root / "samples" if sampler.run_dir else root
    out_dir.mkdir(parents=True, exist_ok=True)                                 # an unwritable --out fails here
    source = f"checkpoint {sampler.checkpoint}" if sampler.run_dir else f"base model {sampler.cfg.pretrained}, no run"
    print(f"sample.py: {source}", file=sys.stderr)

    # ---- z_T: the clip inverted, or read back from RUN/inversions/ (or seeded noise); each prompt sampled ----------
    latents = None
    if invert:
        kept = sampling.inversion(sampler, args.steps, use_vgt, progress=not args.no_progress)
        latents = kept.z_T
        if kept.path is not None:
            print(f"sample.py: z_T {'read back from' if kept.reused else 'kept in'} {kept.path}", file=sys.stderr)
    try:
        frames = sampling.sample(sampler, prompts, frames=args.frames, size=args.size, steps=args.steps,
                                 guidance=args.guidance, negative_prompt=args.negative_prompt, invert=invert,
                                 seed=args.seed, use_vgt=use_vgt, latents=latents, progress=not args.no_progress)
    except sampling.SamplingError as e:
        fail(str(e))

    # ---- the files: per prompt, and the grid of them all ----------------------------------------------------------
    mp4 = mp4_possible()
    files = {}
    for prompt, video in zip(prompts, frames):
        files[prompt] = write_outputs(video, out_dir / evaluate.sample_stem(prompt), args.fps, mp4)
        print(f"{prompt!r}: {', '.join(str(p) for p in files[prompt])}", file=sys.stderr)
    grid = write_grid(list(zip(prompts, frames)), out_dir / evaluate.GRID, fps=args.fps)
    print(f"all prompts: {', '.join(grid)}", file=sys.stderr)

    # ---- the samples scored: metrics.json and a table (python -m apla.eval OUT prints the same) ------------
    if not args.no_metrics:
        try:
            report = evaluate.score_samples(list(zip(prompts, frames)), sampler.cfg, out_dir / "metrics.json", clip,
                                            device, files, root)
        except (evaluate.MetricsError, evaluate.VideoError) as e:
            fail(f"scoring the samples: {e} (--no-metrics skips it)")
        print(evaluate.format_table(report))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # what is left is the interpreter's exit: a Ctrl-C now would only print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
