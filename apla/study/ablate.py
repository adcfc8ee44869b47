"""The ablation study of APLA (Yao et al., AAAI 2024): Table 3 (which components matter, at the default budget and at
twice as many steps) and Table 1 (which VGT version), against Tune-A-Video, over several clips and seeds.

    python -m apla.study --quick                          # 1 clip, 1 seed, a few steps: the pipeline end to end
    python -m apla.study --jobs 2 --report apla/study/REPORT.md   # the micro study (apla/study/clips.py)
    python -m apla.study --pretrained path/to/sd15 --clips davis.toml --devices cuda:0,cuda:1   # real clips

Every variant is a value of the run configuration, never a code branch (`variants`): Tune-A-Video is APLA with
phi = 0, lambda = 0 and the hyper-loss off (MSE only, Eq. 5) on Tune-A-Video's network (GroupNorm pooled over the
frames); Table 3's rows are `APLAConfig.ablation(row)`; Table 1's VGT versions are full APLA with another VGT.

For each clip, seed and variant the study runs one subprocess (`python -m apla.study job RUN`, one torch thread
unless --threads) that calls the repository's own train.py and sample.py (their `main`, the command lines' code):
  train.py   to 2N steps (Table 3's rows and Tune-A-Video) or N steps (the other VGT versions), a checkpoint at
             steps N and 2N, both kept. The learning rate is constant and the random stream is the run's seed, so
             the step-N checkpoint of a 2N-step run *is* the N-step run: Table 3's two columns cost one run.
  sample.py  at step N and at step 2N: DDIM inversion of the clip, then the source prompt and its edits.
  measure    the samples' measures, the discriminator's accuracy and the share of the generator's gradient norm
             carried by lambda * L_g at each checkpoint, and ||phi|| / ||eps_theta|| over training from the run's
             log.jsonl -> RUN/measures.json (`apla.study.measures`).
A run whose measures.json exists is skipped, a half-trained run resumes from its checkpoint and a sampled checkpoint
is not sampled again, so the study can run in stages; `--jobs N` runs N of them at once, `--devices` spreads them
over GPUs. The report (`apla.study.report`) is written at the end from every measures.json found.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import apla
from apla import checkpoint as ckpt
from apla.cli import fail
from apla.study.measures import DIAG_BATCHES, measure_run, samples_dir
from apla.config import ABLATIONS, APLAConfig, default_config, slug

ROOT = Path(apla.__file__).resolve().parents[1]  # the repository: train.py and sample.py live here
BASELINE = "Tune-A-Video"
TABLE3 = [BASELINE, *ABLATIONS]  # Tune-A-Video and Table 3's five rows, trained to 2N steps
TABLE1 = {"pure": "full", "hyper": "VGT-Hyper", "pure-en": "VGT-Pure-EN", "hyper-en": "VGT-Hyper-EN"}
QUICK_VARIANTS = [BASELINE, "full", "VGT-Hyper"]


def variants() -> dict:
    """Variant name -> the TrainConfig values it sets (the same keys for every variant)."""
    def values(cfg: APLAConfig) -> dict:
        return {"groupnorm": "frames", "apla": {"vgt": cfg.vgt, "use_discriminator": cfg.use_discriminator,
                                                "use_hyper_loss": cfg.use_hyper_loss}}
    out = {BASELINE: values(APLAConfig(vgt="none", use_discriminator=False, use_hyper_loss=False))}
    out.update({row: values(APLAConfig.ablation(row)) for row in ABLATIONS})
    out.update({name: values(APLAConfig.ablation("full", vgt=vgt)) for vgt, name in TABLE1.items() if name != "full"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Clip:
    """A source clip: a video (path or bundled name), its caption, the edit prompts; `shapes` holds the benchmark
    spec (apla.study.clips.ClipSpec.to_dict) when the clip comes from the shapes world."""

    name: str
    video: str
    prompt: str
    edits: list
    settings: dict = field(default_factory=dict)  # TrainConfig fields of this clip: frames, start, stride, size
    shapes: dict | None = None


CLIP_SETTINGS = ("frames", "start", "stride", "size")


def read_clips(path) -> list[Clip]:
    """A clips file: JSON (a list, or {"clips": [...]}) or TOML ([[clip]] tables) of {video, prompt, edits} with
    optional name, frames, start, stride, size. Relative video paths are relative to the file."""
    p = Path(path)
    if not p.is_file():
        fail(f"--clips {path}: no such file")
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - one line for any parse error
        fail(f"--clips {path}: cannot parse: {e}")
    entries = data if isinstance(data, list) else data.get("clips", data.get("clip")) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        fail(f"--clips {path}: expected a non-empty list of clips (JSON list, or TOML [[clip]] tables)")
    clips = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"video", "prompt", "edits"} <= set(e) or not isinstance(e["edits"], list):
            fail(f"--clips {path}: clip {i} needs video, prompt and a list of edits")
        unknown = set(e) - {"name", "video", "prompt", "edits", *CLIP_SETTINGS}
        if unknown:
            fail(f"--clips {path}: clip {i} has unknown keys {sorted(unknown)}")
        video = e["video"]
        if not Path(video).is_absolute() and (p.parent / video).exists():
            video = str((p.parent / video).resolve())
        clips.append(Clip(e.get("name") or slug(e["prompt"]), video, e["prompt"], list(e["edits"]),
                          {k: e[k] for k in CLIP_SETTINGS if k in e}))
    if len({c.name for c in clips}) < len(clips):
        fail(f"--clips {path}: clip names must be distinct")
    return clips


def shapes_clips(out: Path, specs) -> list[Clip]:
    """Shapes-world clips (apla.study.clips.ClipSpec) rendered from code into out/clips/<name>/."""
    from apla.study import clips as benchmark

    clips = []
    for spec in specs:
        folder = out / "clips" / spec.name
        if not (folder / f"{spec.num_frames - 1:03d}.png").is_file():
            benchmark.write_frames(spec, folder)
        clips.append(Clip(spec.name, str(folder.resolve()), spec.caption, list(spec.edits),
                          {"frames": spec.num_frames}, spec.to_dict()))
    return clips


# ---------------------------------------------------------------------------------------------------------------
# The plan: one run per clip, seed and variant
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    dir: Path
    variant: str
    clip: Clip
    seed: int
    config: dict  # the run's TrainConfig values (train.py --config)
    sample_at: list  # checkpoint steps sampled
    sample_steps: int  # DDIM steps
    diag_batches: int = DIAG_BATCHES  # fresh batches per checkpoint in `apla.study.measures.diagnostics`
    clip_model: str | None = None  # sample.py's --clip-model (its default: the micro CLIP on micro runs)

    @property
    def name(self) -> str:
        return f"{self.clip.name} / {self.variant} / seed {self.seed}"


def plan(out: Path, clips: list[Clip], seeds: list[int], names: list[str], pretrained: str, steps: int | None,
         sample_steps: int | None, table1_seeds: int | None = None, diag_batches: int = DIAG_BATCHES,
         double: bool = True, clip_model: str | None = None) -> list[Job]:
    """Every run of the study. Table 3's variants train 2N steps and are sampled at N and 2N (only N steps with
    double=False); the other VGT versions train N steps on the first `table1_seeds` seeds (all when None)."""
    base = default_config(pretrained)
    n = steps or base.max_steps
    table = variants()
    jobs = []
    for clip in clips:
        for seed in seeds:
            for name in names:
                long = double and name in TABLE3
                if not long and table1_seeds is not None and seed not in seeds[:table1_seeds]:
                    continue
                run_dir = out / "runs" / clip.name / slug(name) / f"seed-{seed}"
                cfg = base.to_dict()
                cfg.update(clip.settings)
                cfg.update(video=clip.video, prompt=clip.prompt, edit_prompts=list(clip.edits), seed=seed,
                           max_steps=2 * n if long else n, checkpoint_every=n, keep_checkpoints=0,
                           output_dir=str(run_dir), progress=False, groupnorm=table[name]["groupnorm"])
                cfg["apla"] = {**cfg["apla"], **table[name]["apla"]}
                jobs.append(Job(run_dir, name, clip, seed, cfg, [n, 2 * n] if long else [n],
                                sample_steps or base.sample_steps, diag_batches, clip_model))
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# Running one job: train.py, sample.py and the measurement in one subprocess, resumable at every stage
# ---------------------------------------------------------------------------------------------------------------
def script(name: str):
    """The repository's train.py or sample.py as a module (its `main(argv)` is what the command line runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"apla_study_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stages(run_dir, device: str = "auto") -> None:
    """What one job's subprocess does (`python -m apla.study job RUN`), each stage skipped when its output exists:
    train.py's main on RUN/study-config.json (resumed from its latest checkpoint if any), sample.py's main at each
    checkpoint of study.json's sample_at (outputs in RUN/samples/step-N/), then `measure_run`."""
    run_dir = Path(run_dir)
    study = json.loads((run_dir / "study.json").read_text())
    config = json.loads((run_dir / "study-config.json").read_text())
    if not (ckpt.checkpoint_dir(run_dir, config["max_steps"]) / "weights.safetensors").is_file():
        resume = ckpt.latest_checkpoint(run_dir) is not None
        if not resume:  # a run killed before its first checkpoint starts again from scratch
            (run_dir / "log.jsonl").unlink(missing_ok=True)
        script("train").main(["--config", str(run_dir / "study-config.json"), "--device", device, "--no-progress",
                              *(["--resume"] if resume else [])])
    for step in study["sample_at"]:
        out = samples_dir(run_dir, step)
        if not (out / "metrics.json").is_file():  # sample.py writes it last
            script("sample").main(["--run", str(run_dir), "--checkpoint", str(ckpt.checkpoint_dir(run_dir, step)),
                                   "--out", str(out), "--steps", str(study["sample_steps"]), "--device", device,
                                   "--no-progress", *(["--clip-model", study["clip_model"]] if study["clip_model"]
                                                      else [])])
    if not (run_dir / "measures.json").is_file():
        measure_run(run_dir, device, study["diag_batches"])


def run_job(job: Job, device: str, threads: int) -> None:
    """Write the job's files and run `python -m apla.study job RUN` with `threads` torch threads; raises
    RuntimeError naming its log when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    job.dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(job.dir / "study.json", {
        "variant": job.variant, "clip": job.clip.name, "seed": job.seed, "sample_at": job.sample_at,
        "sample_steps": job.sample_steps, "prompts": [job.clip.prompt, *job.clip.edits],
        "diag_batches": job.diag_batches, "clip_model": job.clip_model, "shapes": job.clip.shapes})
    if not ckpt.latest_checkpoint(job.dir):
        ckpt.atomic_write_json(job.dir / "study-config.json", job.config)
    with open(job.dir / "job.log", "a") as log:
        rc = subprocess.run([sys.executable, "-m", "apla.study.ablate", "job", str(job.dir), "--device", device],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise RuntimeError(f"{job.name}: exited with {rc}; see {job.dir / 'job.log'}")


def run_all(jobs: list[Job], devices: list[str], workers: int, threads: int) -> tuple[list, list]:
    """Run the jobs `workers` at a time, each on a device taken from `devices` in turn, printing progress; returns
    the errors and the 1-minute load averages seen (before the start, then every 10 s)."""
    free: queue.Queue = queue.Queue()
    for i in range(workers):
        free.put(devices[i % len(devices)])
    errors, done, loads, started, stop = [], [], [os.getloadavg()[0]], time.time(), threading.Event()
    lock = threading.Lock()

    def sample_load():
        while not stop.wait(10):
            loads.append(os.getloadavg()[0])

    def one(job):
        device = free.get()
        try:
            run_job(job, device, threads)
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            free.put(device)
            with lock:
                done.append(job)
                print(f"  [{len(done)}/{len(jobs)}] {job.name} ({(time.time() - started) / 60:.1f} min)",
                      file=sys.stderr)

    threading.Thread(target=sample_load, daemon=True).start()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, jobs))
    stop.set()
    return errors, loads


def finished(job: Job) -> bool:
    return (job.dir / "measures.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from apla.cli import DefaultsFormatter, OneLineParser

    p = OneLineParser(prog="python -m apla.study", formatter_class=DefaultsFormatter,
                      description="Tables 1 and 3 of APLA against Tune-A-Video over clips x seeds, with 95%% "
                                  "confidence intervals; writes the runs under --out and a markdown report.")
    a = p.add_argument
    a("--out", default="runs/ablation", help="folder of the study's clips and runs (resumable)")
    a("--report", default=None, help="the report's path; its PNGs go beside it (default: OUT/REPORT.md)")
    a("--pretrained", default="micro", help="base model, as train.py's --pretrained")
    a("--clips", default=None,
      help="a JSON/TOML list of {video, prompt, edits[, name, frames, start, stride, size]} (default: the micro "
           "shapes benchmark, apla/study/clips.py)")
    a("--seeds", default="0,1,2", help="comma-separated run seeds")
    a("--table1-seeds", type=int, default=None,
      help="train the other VGT versions (Table 1) on only the first n seeds (default: all)")
    a("--steps", type=int, default=None, help="the default budget N (Table 3's columns: N and 2N; default: the "
                                               "base model's preset, 300 for micro, 750 for SD)")
    a("--sample-steps", type=int, default=None, help="DDIM steps of sampling (default: the preset's)")
    a("--clip-model", default=None, help="CLIP for sample.py's CLIP scores: a local folder or hub id (default: the "
                                         "micro CLIP on micro runs, none otherwise)")
    a("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    a("--jobs", type=int, default=None, help="runs at once (default: the number of --devices, else 1)")
    a("--threads", type=int, default=None, help="torch threads per run (default: cores // jobs, at least 1)")
    a("--devices", default=None, help="comma-separated devices the runs are spread over (default: auto)")
    a("--quick", action="store_true", help="1 clip, 1 seed, 3 variants, a few steps: the pipeline end to end")
    a("--dry-run", action="store_true", help="print the planned runs and exit")
    a("--no-plots", action="store_true", help="skip the plot that needs matplotlib")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["job"]:  # one run's stages, in the subprocess run_job starts
        m = argparse.ArgumentParser(prog="python -m apla.study job")
        m.add_argument("run")
        m.add_argument("--device", default="auto")
        a = m.parse_args(argv[1:])
        run_stages(a.run, a.device)
        return 0
    args = parser().parse_args(argv)
    if not (ROOT / "train.py").is_file() or not (ROOT / "sample.py").is_file():
        fail(f"train.py and sample.py are not beside the apla package in {ROOT}; run the study from a clone of "
             "the repository")
    out = Path(args.out)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {args.seeds!r}: expected comma-separated integers")
    table = variants()
    names = list(table) if not args.variants else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in table]
    if unknown or not seeds:
        fail(f"unknown variant {unknown[0]!r}; expected some of {list(table)}" if unknown else "--seeds: none given")
    names = [v for v in table if v in names]  # the table's order: Tune-A-Video, the baseline of the report, first
    steps, sample_steps = args.steps, args.sample_steps
    if args.quick:
        seeds, names, steps, sample_steps = seeds[:1], [v for v in QUICK_VARIANTS if v in names] or names[:1], 2, 3
    for flag, v in (("--steps", steps), ("--sample-steps", sample_steps), ("--jobs", args.jobs),
                    ("--threads", args.threads)):
        if v is not None and v < 1:
            fail(f"{flag} must be at least 1, got {v}")
    if args.clips:
        clips = read_clips(args.clips)
    else:  # the micro benchmark, at the budget its clips were selected with
        from apla.study import clips as benchmark

        record = benchmark.read_record()
        clips = shapes_clips(out, benchmark.benchmark_clips(record)[:1 if args.quick else None])
        steps, sample_steps = steps or record["steps"], sample_steps or record["sample_steps"]
    if args.quick:
        clips = clips[:1]
    jobs = plan(out, clips, seeds, names, args.pretrained, steps, sample_steps, args.table1_seeds,
                1 if args.quick else DIAG_BATCHES, clip_model=args.clip_model)
    if args.dry_run:
        for job in jobs:
            print(f"{job.name}: {job.config['max_steps']} steps, sampled at {job.sample_at} "
                  f"({job.sample_steps} DDIM steps) -> {job.dir}")
        return 0
    devices = args.devices.split(",") if args.devices else ["auto"]
    workers = args.jobs or (len(devices) if args.devices else 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    todo = sorted([j for j in jobs if not finished(j)], key=lambda j: -j.config["max_steps"])  # long runs first
    print(f"apla.study.ablate: {len(jobs)} runs ({len(jobs) - len(todo)} already finished), {workers} at a time, "
          f"{threads} thread(s) each -> {out}", file=sys.stderr)
    started = time.time()
    errors, loads = run_all(todo, devices, workers, threads)
    stage = {"command": "python -m apla.study " + shlex.join(argv), "wall_s": time.time() - started,
             "runs": len(todo), "runs_before": len(jobs) - len(todo), "jobs": workers, "threads": threads,
             "cpus": os.cpu_count(), "load_before": loads[0], "load_mean": float(np.mean(loads[1:] or loads)),
             "load_max": max(loads), "errors": errors, "finished_at": time.strftime("%Y-%m-%d %H:%M")}
    stages_path = out / "stages.json"
    stages = json.loads(stages_path.read_text()) if stages_path.is_file() else []
    ckpt.atomic_write_json(stages_path, stages + [stage])
    from apla.study.report import write_report

    report = Path(args.report) if args.report else out / "REPORT.md"
    code = write_report(jobs, report, stages + [stage], plots=not args.no_plots)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else code


if __name__ == "__main__":
    sys.exit(main())
