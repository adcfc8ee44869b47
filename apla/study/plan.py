"""The ablation study as a plan of runs: does APLA make videos more consistent than Tune-A-Video, and is it VGT's
view across frames that does it? Every clip, seed and variant is one ordinary run.

Every variant is a value of the run configuration, never a code branch (`variants`): Tune-A-Video is APLA with
phi = 0, lambda = 0 and the hyper-loss off (MSE only, Eq. 5) on Tune-A-Video's network (GroupNorm pooled over the
frames); Table 3's rows are `APLAConfig.ablation(row)`; Table 1's VGT versions are full APLA with another VGT; the
capacity control is full APLA with VGT-Pure that sees no other frame (`apla.vgt.frame_mask`).

The core variants (CORE: Tune-A-Video, full APLA, the capacity control) run on every clip, trained to the last
budget with a checkpoint at each budget (100, 200, 300 steps), every checkpoint sampled: the learning rate is
constant and the random stream is the run's seed, so the step-100 checkpoint of a 300-step run *is* the 100-step
run. The other variants (Table 3's other rows, Table 1's other VGT versions) run on the first `secondary_clips`
clips to the first budget, compared with Tune-A-Video's checkpoint at that budget.

A run lives in RUN = OUT/runs/<clip>/<variant>/seed-<seed>/, and its `line` is one shell line of the repository's
own commands joined with `&&`, every path in it absolute:
  train.py   --config RUN/train.json
  sample.py  at each sampled checkpoint: DDIM inversion of the clip, then the source prompt and its edits
  python -m apla.study measure RUN   what the report reads -> RUN/measures.json (`apla.study.measures`).
A line is written from where its run stands: a finished run (measures.json) has none, a run with a checkpoint
resumes from it (--resume), one killed before its first checkpoint starts afresh, and a stage whose output exists
is left out. The torch thread count (OMP_NUM_THREADS) and the device are part of the line, so that what a run
computes does not depend on what executes the lines.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import apla
from apla import checkpoint as ckpt
from apla.assets import CLIPS, MODELS
from apla.cli import fail
from apla.config import ABLATIONS, APLAConfig, default_config, slug
from apla.study.clips import ClipSpec, write_frames
from apla.study.measures import DIAG_BATCHES, samples_dir

ROOT = Path(apla.__file__).resolve().parents[1]  # the repository: train.py and sample.py live here
BASELINE = "Tune-A-Video"
FULL = "full"
CONTROL = "capacity control"  # full APLA, VGT-Pure with no information across frames (VGT variant "pure-frame")
CORE = [BASELINE, FULL, CONTROL]  # every clip, every budget
TABLE1 = {"pure": "full", "hyper": "VGT-Hyper", "pure-en": "VGT-Pure-EN", "hyper-en": "VGT-Hyper-EN"}
BUDGETS = (100, 200, 300)  # training steps sampled; the last is the default run's and the primary comparison's
SECONDARY_CLIPS = 12  # clips the other variants run on
QUICK_VARIANTS = [BASELINE, FULL, CONTROL, "VGT-Hyper"]


def variants() -> dict:
    """Variant name -> the TrainConfig values it sets (the same keys for every variant)."""
    def values(cfg: APLAConfig) -> dict:
        return {"groupnorm": "frames", "apla": {"vgt": cfg.vgt, "use_discriminator": cfg.use_discriminator,
                                                "use_hyper_loss": cfg.use_hyper_loss}}
    out = {BASELINE: values(APLAConfig(vgt="none", use_discriminator=False, use_hyper_loss=False))}
    out.update({row: values(APLAConfig.ablation(row)) for row in ABLATIONS})
    out[CONTROL] = values(APLAConfig.ablation("full", vgt="pure-frame"))
    out.update({name: values(APLAConfig.ablation("full", vgt=vgt)) for vgt, name in TABLE1.items() if name != "full"})
    return out


def absolute(value: str) -> str:
    """A path that exists, made absolute (the lines run from the repository); a bundled name (apla.assets) or
    anything else (a hub id) as it is."""
    bundled = value in MODELS or value in CLIPS
    return str(Path(value).resolve()) if not bundled and Path(value).exists() else value


# ---------------------------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Clip:
    """A source clip: a video (path or bundled name), its caption, the edit prompts; `spec` is the benchmark's
    ClipSpec when the clip comes from the shapes world (its frames are drawn into `video` by `prepare`)."""

    name: str
    video: str
    prompt: str
    edits: list
    settings: dict = field(default_factory=dict)  # TrainConfig fields of this clip: frames, start, stride, size
    spec: ClipSpec | None = None


CLIP_SETTINGS = ("frames", "start", "stride", "size")


def read_clips(path) -> list[Clip]:
    """A clips file: JSON (a list, or {"clips": [...]}) or TOML ([[clip]] tables) of {video, prompt, edits} with
    optional name, frames, start, stride, size. Relative video paths are relative to the file."""
    p = Path(path)
    if not p.is_file():
        fail(f"--clips {path}: no such file")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - one line for any parse error
        fail(f"--clips {path}: cannot parse: {e}")
    entries = (data if isinstance(data, list) else data.get("clips", data.get("clip")) if isinstance(data, dict)
               else None)
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
        clips.append(Clip(e.get("name") or slug(e["prompt"]), absolute(video), e["prompt"], list(e["edits"]),
                          {k: e[k] for k in CLIP_SETTINGS if k in e}))
    if len({c.name for c in clips}) < len(clips):
        fail(f"--clips {path}: clip names must be distinct")
    return clips


def shapes_clips(out: Path, specs, frames: int | None = None) -> list[Clip]:
    """Shapes-world clips (apla.study.clips.ClipSpec), their frames in OUT/clips/<name>/; the runs take the first
    `frames` of them (all when None)."""
    return [Clip(s.name, str((Path(out) / "clips" / s.name).resolve()), s.caption, list(s.edits),
                 {"frames": frames or s.num_frames}, s) for s in specs]


# ---------------------------------------------------------------------------------------------------------------
# The plan: one run per clip, seed and variant
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: Path
    variant: str
    clip: Clip
    seed: int
    config: dict  # the run's TrainConfig values (RUN/train.json, train.py's --config)
    sample_at: list  # checkpoint steps sampled
    sample_steps: int  # DDIM steps
    diag_batches: int = DIAG_BATCHES  # fresh batches per checkpoint in `apla.study.measures.diagnostics`
    clip_model: str | None = None  # sample.py's --clip-model (its default: the micro CLIP on micro runs)

    @property
    def name(self) -> str:
        return f"{self.clip.name} / {self.variant} / seed {self.seed}"

    @property
    def finished(self) -> bool:
        return (self.dir / "measures.json").is_file()


def plan(out: Path, clips: list[Clip], seeds: list[int], names: list[str], pretrained: str, budgets,
         sample_steps: int | None, secondary_clips: int | None = None, diag_batches: int = DIAG_BATCHES,
         clip_model: str | None = None) -> list[Run]:
    """Every run of the study, by clip, seed and variant (nothing is written). The CORE variants train to the last
    of `budgets` and are sampled at each; the others train to the first budget on the first `secondary_clips` clips
    (all when None) and are sampled there."""
    out = Path(out).resolve()
    base = default_config(pretrained)
    budgets = sorted(budgets)
    every = math.gcd(*budgets)
    table = variants()
    runs = []
    for i, clip in enumerate(clips):
        for seed in seeds:
            for name in names:
                core = name in CORE
                if not core and secondary_clips is not None and i >= secondary_clips:
                    continue
                at = list(budgets) if core else budgets[:1]
                run_dir = out / "runs" / clip.name / slug(name) / f"seed-{seed}"
                cfg = base.to_dict()
                cfg.update(clip.settings)
                cfg.update(pretrained=absolute(pretrained), video=clip.video, prompt=clip.prompt,
                           edit_prompts=list(clip.edits), seed=seed, max_steps=at[-1],
                           checkpoint_every=every if core else at[0], keep_checkpoints=0, output_dir=str(run_dir),
                           progress=False, groupnorm=table[name]["groupnorm"])
                cfg["apla"] = {**cfg["apla"], **table[name]["apla"]}
                runs.append(Run(run_dir, name, clip, seed, cfg, at, sample_steps or base.sample_steps, diag_batches,
                                absolute(clip_model) if clip_model else None))
    return runs


def schedule(runs: list[Run]) -> list[Run]:
    """The order of the lines: the longest runs first, so that a pool does not end on one long run."""
    return sorted(runs, key=lambda r: -r.config["max_steps"])


def shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """Shard `index` of `count` (0 <= index < count): every count-th run of the whole schedule, finished or not,
    so that shards made at different times never share a run."""
    return schedule(runs)[index::count]


def check_scripts() -> None:
    """One-line exit unless the repository's train.py and sample.py are beside the package."""
    if not (ROOT / "train.py").is_file() or not (ROOT / "sample.py").is_file():
        fail(f"train.py and sample.py are not beside the apla package in {ROOT}; run the study from a clone of "
             "the repository")


def line(run: Run, device: str = "auto", threads: int = 1) -> str | None:
    """The shell line that takes `run` from where it stands to finished; None when it is finished."""
    if run.finished:
        return None
    q = shlex.quote
    python, common = q(sys.executable), f"--device {q(device)} --no-progress"
    commands, latest = [], ckpt.latest_checkpoint(run.dir)
    if latest != ckpt.checkpoint_dir(run.dir, run.config["max_steps"]):  # not trained to the end yet
        if latest is not None:
            resume = " --resume"
        else:  # a run killed before its first checkpoint starts afresh
            resume = ""
            commands.append(f"rm -f {q(str(run.dir / 'log.jsonl'))}")
        commands.append(f"{python} train.py --config {q(str(run.dir / 'train.json'))} {common}{resume}")
    for step in run.sample_at:
        out = samples_dir(run.dir, step)
        if not (out / "metrics.json").is_file():  # sample.py writes it last
            clip_model = f" --clip-model {q(run.clip_model)}" if run.clip_model else ""
            commands.append(f"{python} sample.py --run {q(str(run.dir))} --checkpoint "
                            f"{q(str(ckpt.checkpoint_dir(run.dir, step)))} --out {q(str(out))} --steps "
                            f"{run.sample_steps} {common}{clip_model}")
    commands.append(f"{python} -m apla.study measure {q(str(run.dir))} --device {q(device)}")
    return f"cd {q(str(ROOT))} && export OMP_NUM_THREADS={threads} && " + " && ".join(commands)


def prepare(run: Run) -> None:
    """Write what the run's line reads: the clip's frames (a shapes clip), RUN/study.json (what `measure` needs)
    and RUN/train.json (train.py's --config; left as it is once the run has a checkpoint)."""
    run.dir.mkdir(parents=True, exist_ok=True)
    spec = run.clip.spec
    if spec is not None and not (Path(run.clip.video) / f"{spec.num_frames - 1:03d}.png").is_file():
        write_frames(spec, run.clip.video)
    ckpt.atomic_write_json(run.dir / "study.json", {
        "variant": run.variant, "clip": run.clip.name, "seed": run.seed, "sample_at": run.sample_at,
        "sample_steps": run.sample_steps, "prompts": [run.clip.prompt, *run.clip.edits],
        "diag_batches": run.diag_batches, "clip_model": run.clip_model,
        "shapes": spec.to_dict() if spec is not None else None})
    if ckpt.latest_checkpoint(run.dir) is None:
        ckpt.atomic_write_json(run.dir / "train.json", run.config)
