"""The report of the ablation study (`python -m apla.study report`, and the end of `run`): every number it prints is
computed from one table of raw data, the CSV (`results.csv` beside the report; columns COLUMNS, one measured value
per row), which `collect` makes from the measures.json of every finished run and the two references of each clip.
`python -m apla.study report --csv results.csv` rebuilds the tables from the CSV alone.

The analysis, fixed before the study ran:
- The unit is the clip (runs of one clip correlate; a clip's seeds are averaged first). A variant's value on a clip
  is its measure averaged over the prompts the measure applies to (every prompt for the primary endpoint: the
  source prompt and its edits), then over seeds.
- PRIMARY: `apla.eval.metrics.source_deviation` (0 = the source clip; lower is better), full APLA minus
  Tune-A-Video at the last budget (300 steps, the default run), paired by clip: mean, percentile bootstrap 95%
  interval and two-sided sign-flip p (`apla.study.stats`). It is the one test named in advance, so it is not
  corrected; the opening sentence follows from it by the rule in `primary_sentence`.
- SECONDARY: every other (measure, comparison, budget): full vs Tune-A-Video, the capacity control vs Tune-A-Video
  and full vs the capacity control at each budget, and each other variant vs Tune-A-Video at the first budget on
  the clips it ran on; one family, Holm-adjusted. Count measures (attributes right in k of F frames) use the exact
  sign test over clips, the others the sign-flip test.
- Each measure is shown beside the source clip's own value and that of the micro VAE's round trip of the clip (the
  best the base model can draw): "lower is better" holds for FCI and the warping error only down to the source's.
"""
from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import apla
from apla import checkpoint as ckpt
from apla.assets import resolve_video
from apla.eval import metrics
from apla.eval.score import load_measures, pick_clip, quantize, sample_stem, score_video
from apla.run import decode_latents, encode_clip
from apla.study.measures import samples_dir
from apla.study.stats import bootstrap_ci, holm, sign_flip_test, sign_test
from apla.video import read_video

HAND_MARK = "<!-- Written by hand below this line; python -m apla.study keeps it. -->"
COLUMNS = ("clip", "seed", "variant", "steps", "prompt_kind", "measure", "value")
PRIMARY = metrics.source_deviation.__name__  # the primary endpoint, by its function's name
BASELINE, FULL, CONTROL = "Tune-A-Video", "full", "capacity control"
SOURCE, VAE = "source clip", "VAE round trip"  # the references (steps 0)
ALL = ("source", "colour", "shape", "edit")
EDITS = ("colour", "shape", "edit")
TRAINING = "training"  # prompt_kind of what is measured on the training run rather than on a sample
# key, label, +1 if higher is better / -1 if lower, prompt kinds it is averaged over, scale, a count measure
MEASURES = [
    (PRIMARY, "source deviation (primary)", -1, ALL, 1.0, False),
    ("edited_right", "edited attribute right (% of frames)", +1, EDITS, 100.0, True),
    ("kept_right", "unedited attribute kept (% of frames)", +1, EDITS, 100.0, True),
    ("path_error", "centroid path error (px)", -1, ALL, 1.0, False),
    ("colour_flicker", "colour flicker (RGB, 0-255)", -1, ALL, 1.0, False),
    ("size_flicker", "size flicker (px)", -1, ALL, 1.0, False),
    ("fci", "FCI", -1, ALL, 1.0, False),
    ("warping_error", "warping error (×1000)", -1, ALL, 1000.0, False),
    ("clip_frame_consistency", "{clip} frame consistency", +1, ALL, 1.0, False),
    ("clip_text_alignment", "{clip} text alignment", +1, ALL, 1.0, False),
    ("psnr", "PSNR of the source prompt (dB)", +1, ("source",), 1.0, False),
]
DIAGNOSTICS = ("d_accuracy", "d_real", "d_fake", "grad_share", "grad_adv", "grad_hyper", "linear_d_accuracy",
               "linear_d_w_norm")
PHI_BIN = 10  # training steps per phi_ratio row of the CSV
ALPHA = 0.05


# ---------------------------------------------------------------------------------------------------------------
# The raw data: runs and references -> rows of COLUMNS
# ---------------------------------------------------------------------------------------------------------------
def run_rows(r: dict) -> list[dict]:
    """The rows of one run's measures.json."""
    base = {"clip": r["clip"], "seed": r["seed"], "variant": r["variant"]}
    rows = [{**base, "steps": s["step"], "prompt_kind": s["kind"], "measure": k, "value": v}
            for s in r["samples"] for k, v in s["measures"].items() if isinstance(v, (int, float))]
    rows += [{**base, "steps": d["step"], "prompt_kind": TRAINING, "measure": k, "value": d[k]}
             for d in r["diagnostics"] for k in DIAGNOSTICS if k in d]
    phi = r["phi_ratio"]
    for i in range(0, len(phi), PHI_BIN):  # the mean of each PHI_BIN steps, at the bin's last step
        chunk = phi[i:i + PHI_BIN]
        rows.append({**base, "steps": chunk[-1][0], "prompt_kind": TRAINING, "measure": "phi_ratio",
                     "value": float(np.mean([x for _, x in chunk]))})
    last = max(s["step"] for s in r["samples"]) if r["samples"] else len(r["step_time"])
    rows.append({**base, "steps": last, "prompt_kind": TRAINING, "measure": "step_time",
                 "value": float(np.mean(r["step_time"][1:] or r["step_time"]))})  # the first step warms up
    rows.append({**base, "steps": last, "prompt_kind": TRAINING, "measure": "vgt_params", "value": r["vgt_params"]})
    return rows


def reference_rows(planned) -> list[dict]:
    """Per clip: the measures of the source clip itself and of the base model's VAE round trip of it (8-bit, as
    the samples are scored), scored as sample.py scores a sample of the source prompt."""
    rows, seen, sd, scorers = [], set(), {}, {}
    measures = load_measures()
    for p in planned:
        if p.clip.name in seen:
            continue
        seen.add(p.clip.name)
        cfg = p.config
        source = read_video(resolve_video(p.clip.video), cfg["frames"], start=cfg["start"], stride=cfg["stride"],
                            size=cfg["size"])
        if cfg["pretrained"] not in sd:
            sd[cfg["pretrained"]] = apla.load_stable_diffusion(cfg["pretrained"])
        with torch.no_grad():
            back = quantize(decode_latents(sd[cfg["pretrained"]].vae,
                                           encode_clip(sd[cfg["pretrained"]].vae, source, "cpu")[0]))
        key = (p.clip_model, tuple(source.shape[-2:]))  # None: the model the frame size implies
        if key not in scorers:  # each CLIP model loaded once
            scorers[key] = pick_clip(p.clip_model, [source], "cpu")[0]
        clip = scorers[key]
        motion = metrics.source_motion(source)
        for variant, video in ((SOURCE, source), (VAE, back)):
            scored = score_video(video, measures, p.clip.prompt, source, p.clip.prompt, clip, motion=motion)
            rows += [{"clip": p.clip.name, "seed": p.seed, "variant": variant, "steps": 0, "prompt_kind": "source",
                      "measure": k, "value": v} for k, v in scored["metrics"].items()
                     if isinstance(v, (int, float)) and math.isfinite(v)]
    return rows


def collect(planned) -> list[dict]:
    """Every row of the study: the finished runs of `planned`, then the references of their clips."""
    runs = load_runs(planned)
    done = {r["clip"] for r in runs}
    return [row for r in runs for row in run_rows(r)] + reference_rows([p for p in planned if p.clip.name in done])


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "value": repr(float(r["value"]))})
    ckpt.atomic_write_bytes(Path(path), buf.getvalue().encode())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(COLUMNS)}")
        return [{**r, "seed": int(r["seed"]), "steps": int(r["steps"]), "value": float(r["value"])} for r in reader]


# ---------------------------------------------------------------------------------------------------------------
# Per-clip values and comparisons
# ---------------------------------------------------------------------------------------------------------------
def clip_values(rows: list[dict], variant: str, steps: int, measure: str, kinds) -> dict:
    """clip -> the variant's measure at `steps`: the mean over the prompts of `kinds` within each seed, then over
    seeds."""
    by = {}
    for r in rows:
        if r["variant"] == variant and r["steps"] == steps and r["measure"] == measure and r["prompt_kind"] in kinds \
                and math.isfinite(r["value"]):
            by.setdefault(r["clip"], {}).setdefault(r["seed"], []).append(r["value"])
    return {c: float(np.mean([np.mean(v) for v in seeds.values()])) for c, seeds in by.items()}


def reference(rows: list[dict], variant: str, measure: str) -> float:
    vals = clip_values(rows, variant, 0, measure, ("source",))
    return float(np.mean(list(vals.values()))) if vals else math.nan


def compare(rows, a: str, b: str, steps: int, measure: str, kinds, count: bool) -> dict:
    """a minus b on the clips both have: mean, bootstrap interval, the test's p (sign test for counts)."""
    va, vb = clip_values(rows, a, steps, measure, kinds), clip_values(rows, b, steps, measure, kinds)
    clips = sorted(set(va) & set(vb))
    d = [va[c] - vb[c] for c in clips]
    out = {"a": a, "b": b, "steps": steps, "measure": measure, "n": len(d),
           "mean": float(np.mean(d)) if d else math.nan, "ci": bootstrap_ci(d),
           "mean_a": float(np.mean([va[c] for c in clips])) if d else math.nan,
           "mean_b": float(np.mean([vb[c] for c in clips])) if d else math.nan}
    if count:
        out["gains"], out["losses"], out["p"] = sign_test(d)
    else:
        out["p"] = sign_flip_test(d) if d else math.nan
    return out


def budgets_of(rows) -> list[int]:
    return sorted({r["steps"] for r in rows if r["variant"] == FULL and r["prompt_kind"] != TRAINING})


def primary(rows) -> dict:
    """The primary comparison (module doc) from the rows."""
    return compare(rows, FULL, BASELINE, budgets_of(rows)[-1], PRIMARY, ALL, False)


def secondary(rows) -> list[dict]:
    """Every secondary test (module doc), Holm-adjusted as one family ("p_holm")."""
    budgets = budgets_of(rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    others = [v for v in variants if v not in (BASELINE, FULL, CONTROL, SOURCE, VAE)]
    tests = []
    for key, _, _, kinds, _, count in MEASURES:
        for steps in budgets:
            for a, b in ((FULL, BASELINE), (CONTROL, BASELINE), (FULL, CONTROL)):
                if (a, b, steps, key) != (FULL, BASELINE, budgets[-1], PRIMARY):
                    tests.append(compare(rows, a, b, steps, key, kinds, count))
        for v in others:
            tests.append(compare(rows, v, BASELINE, budgets[0], key, kinds, count))
    tests = [t for t in tests if t["n"] > 0]
    for t, p in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = p
    return tests


def primary_sentence(p: dict) -> str:
    """The report's opening sentence, by a rule fixed before the study ran: a difference is claimed only when the
    sign-flip p is below ALPHA and the bootstrap interval excludes 0; otherwise the interval is stated as the range
    of effects the data allow."""
    lo, hi = p["ci"]
    rel = f"{100 * p['mean'] / p['mean_b']:+.0f}% of Tune-A-Video's mean {p['mean_b']:.3f}"
    numbers = (f"Δ = {p['mean']:+.3f} (95% CI [{lo:+.3f}, {hi:+.3f}]; {rel}) over {p['n']} clips, sign-flip "
               f"p = {p['p']:.3g}, the one test named in advance")
    if p["p"] < ALPHA and (lo > 0 or hi < 0):
        better = "less" if p["mean"] < 0 else "more"
        return (f"At {p['steps']} steps full APLA's videos depart {better} from their source clips' motion and "
                f"appearance than Tune-A-Video's: {numbers}.")
    return (f"At {p['steps']} steps we find no difference between full APLA and Tune-A-Video in how far their "
            f"videos depart from the source clips' motion and appearance: {numbers}; the data allow effects from "
            f"{lo:+.3f} to {hi:+.3f}.")


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def num(x: float, scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x * scale:{'+' if sign else ''}.{digits}f}"


def cell(t: dict, scale: float) -> str:
    lo, hi = t["ci"]
    s = f"{num(t['mean'], scale, sign=True)} [{num(lo, scale, sign=True)}, {num(hi, scale, sign=True)}]"
    if "gains" in t:
        s += f" {t['gains']}↑{t['losses']}↓"
    p = t.get("p_holm", t["p"])
    return s + (f" **p={p:.2g}**" if p < ALPHA else f" p={p:.2g}")


def label_of(key: str, clip: str) -> str:
    return next(m[1] for m in MEASURES if m[0] == key).replace("{clip}", clip)


def core_table(rows, tests, pri: dict, steps: int, clip: str) -> list[str]:
    """Rows: measures; columns: the references, the three core variants' means over clips, the three differences."""
    index = {(t["a"], t["b"], t["steps"], t["measure"]): t for t in tests}
    lines = ["| measure | source clip | VAE round trip | Tune-A-Video | full | capacity control | full − TAV | "
             "control − TAV | full − control |", "| --- |" + " --- |" * 8]
    for key, _, direction, kinds, scale, _ in MEASURES:
        means = [clip_values(rows, v, steps, key, kinds) for v in (BASELINE, FULL, CONTROL)]
        if not any(means):
            continue
        diffs = []
        for a, b in ((FULL, BASELINE), (CONTROL, BASELINE), (FULL, CONTROL)):
            t = pri if (a, b, key) == (FULL, BASELINE, PRIMARY) and steps == pri["steps"] else \
                index.get((a, b, steps, key))
            diffs.append(cell(t, scale) + (" (primary)" if t is pri else "") if t else "–")
        lines.append(f"| {label_of(key, clip)} {'↑' if direction > 0 else '↓'} | "
                     f"{num(reference(rows, SOURCE, key), scale)} | {num(reference(rows, VAE, key), scale)} | "
                     + " | ".join(num(np.mean(list(m.values())) if m else math.nan, scale) for m in means)
                     + " | " + " | ".join(diffs) + " |")
    return lines


def secondary_table(rows, tests, steps: int, clip: str) -> list[str]:
    others = list(dict.fromkeys(t["a"] for t in tests if t["b"] == BASELINE and t["a"] not in (FULL, CONTROL)))
    if not others:
        return []
    index = {(t["a"], t["measure"]): t for t in tests if t["steps"] == steps and t["b"] == BASELINE}
    lines = ["| measure | Tune-A-Video | " + " | ".join(f"{v} − TAV" for v in others) + " |",
             "| --- | --- |" + " --- |" * len(others)]
    for key, _, direction, kinds, scale, _ in MEASURES:
        ts = [index.get((v, key)) for v in others]
        if not any(ts):
            continue
        base = next(t for t in ts if t)["mean_b"]
        lines.append(f"| {label_of(key, clip)} {'↑' if direction > 0 else '↓'} | {num(base, scale)} | "
                     + " | ".join(cell(t, scale) if t else "–" for t in ts) + " |")
    return lines


def training_mean(rows, variant: str, steps: int, measure: str) -> tuple[float, tuple, int]:
    vals = clip_values(rows, variant, steps, measure, (TRAINING,))
    v = list(vals.values())
    return (float(np.mean(v)) if v else math.nan), bootstrap_ci(v), len(v)


def diagnostics_table(rows, variants) -> list[str]:
    with_d = [v for v in variants if any(r["variant"] == v and r["measure"] == "d_accuracy" for r in rows)]
    steps = sorted({r["steps"] for r in rows if r["measure"] == "d_accuracy"})
    lines = ["| variant | step | D accuracy (%) | D(ε) | D(ε*) | best linear D, held out (%) | ‖w‖ of the best "
             "linear D | gradient share of λ·L_g (%) | clips |", "| --- " * 9 + "|"]
    for v in with_d:
        for s in steps:
            m = {k: training_mean(rows, v, s, k) for k in ("d_accuracy", "d_real", "d_fake", "linear_d_accuracy",
                                                              "linear_d_w_norm", "grad_share")}
            if m["d_accuracy"][2] == 0:
                continue
            lines.append(f"| {v} | {s} | {num(m['d_accuracy'][0], 100, 2)} | {num(m['d_real'][0])} | "
                         f"{num(m['d_fake'][0])} | {num(m['linear_d_accuracy'][0], 100, 2)} | "
                         f"{num(m['linear_d_w_norm'][0], 1, 4)} | {num(m['grad_share'][0], 100, 2)} | "
                         f"{m['d_accuracy'][2]} |")
    return lines


def phi_curves(rows, variants) -> dict:
    """variant -> (steps, mean over clips of the binned ||phi|| / ||eps_theta||) for variants with VGT."""
    curves = {}
    for v in variants:
        steps = sorted({r["steps"] for r in rows if r["variant"] == v and r["measure"] == "phi_ratio"})
        ys = [np.mean(list(clip_values(rows, v, s, "phi_ratio", (TRAINING,)).values())) for s in steps]
        if steps and max(ys) > 0:
            curves[v] = (np.asarray(steps), np.asarray(ys))
    return curves


def phi_and_cost_table(rows, variants) -> list[str]:
    lines = ["| variant | ‖φ‖/‖ε_θ‖, first 10 steps | last 10 steps | VGT parameters | s per training step | "
             "runs |", "| --- " * 6 + "|"]
    for v in variants:
        curve = phi_curves(rows, [v]).get(v)
        params = [r["value"] for r in rows if r["variant"] == v and r["measure"] == "vgt_params"]
        times = [r["value"] for r in rows if r["variant"] == v and r["measure"] == "step_time"]
        if not times:
            continue
        lines.append(f"| {v} | {num(curve[1][0], 1, 5) if curve else '0'} | {num(curve[1][-1], 1, 5) if curve else '0'}"
                     f" | {int(max(params, default=0)):,} | {np.mean(times):.3f} | {len(times)} |")
    return lines


def plot_phi(curves: dict, path: Path) -> None:
    """The paper's Fig. 5b on our runs: ||phi|| / ||eps_theta|| over training steps (`phi_curves`: the mean of each
    PHI_BIN steps, averaged over clips), one line per VGT variant. Needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for v, (steps, ratio) in curves.items():
        ax.plot(steps, ratio, label=v)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"‖φ‖ / ‖ε_θ‖ (mean of {PHI_BIN} steps, over clips)")
    ax.set_title("VGT's perturbation relative to the U-Net's prediction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The grid: rows = the source clip and each variant's sample, columns = frames
# ---------------------------------------------------------------------------------------------------------------
def strip_frames(png: Path, frames: int) -> np.ndarray:
    """A PNG strip of sample.py (H, F * W, 3) -> (F, H, W, 3) uint8."""
    a = np.asarray(Image.open(png).convert("RGB"))
    return np.stack(np.split(a, frames, axis=1))


def write_grid(rows: list[tuple[str, np.ndarray]], path: Path, scale: int = 2, label_width: int = 150) -> None:
    """rows of (label, (F, H, W, 3) uint8 frames) -> one PNG, a label column on the left."""
    f, h, w, _ = rows[0][1].shape
    canvas = Image.new("RGB", (label_width + f * w * scale, len(rows) * h * scale), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (label, frames) in enumerate(rows):
        strip = Image.fromarray(np.concatenate(list(frames), axis=1))  # (F, H, W, 3) -> (H, F*W, 3)
        canvas.paste(strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST),
                     (label_width, i * h * scale))
        draw.text((4, i * h * scale + h * scale // 2 - 6), label, fill=(0, 0, 0))
    ckpt.atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))





# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
def load_runs(planned) -> list[dict]:
    """The measures.json of every finished run of the plan (apla.study.plan.Run)."""
    return [json.loads((p.dir / "measures.json").read_text()) for p in planned if (p.dir / "measures.json").is_file()]


def grid_rows(planned, runs: list[dict], step: int) -> tuple[str, list]:
    """The grid's rows for the first clip and seed at `step`: the source clip, then each variant's sample of the
    shape edit (the first edit on clips that are not from the shapes world)."""
    first = planned[0]
    mine = [p for p in planned if p.clip.name == first.clip.name and p.seed == first.seed and step in p.sample_at]
    shape_edit = first.clip.edits[1] if first.clip.spec and len(first.clip.edits) > 1 else first.clip.edits[0]
    n = first.config["frames"]
    source = read_video(resolve_video(first.clip.video), n, start=first.config["start"], stride=first.config["stride"],
                        size=first.config["size"])
    rows = [("source clip", ((source.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())]
    for p in mine:
        png = samples_dir(p.dir, step) / f"{sample_stem(shape_edit)}.png"
        if png.is_file():
            rows.append((p.variant, strip_frames(png, n)))
    return f"{first.clip.name}, seed {first.seed}, step {step}: \"{shape_edit}\"", rows


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


D_ARGUMENT = (
    "Why D stays at chance. D is a 1×1 convolution, a linear score w·x + b of each pixel's C channels, trained with "
    "Eq. 19's logistic loss to call ε real and ε* fake. That loss is convex in (w, b). ε ~ N(0, I) is symmetric "
    "about zero, and ε* = ε_θ + φ is trained to match it and is symmetric about zero as well; then replacing w by "
    "−w leaves the expected loss unchanged (x → −x maps each distribution onto itself), so by convexity the "
    "minimum lies at w = 0, where D ≡ ½, whatever the two variances are. A linear D cannot use a difference of "
    "variance, only of mean. The check: the best linear D, fitted directly (Newton's method on Eq. 19's loss, "
    "`apla.study.measures.best_linear_d`) to the per-pixel (ε, ε*) pairs of each trained run's last checkpoint, "
    "scored on held-out pairs.")
GRAD_SHARE = (
    "Gradient share: ‖∇θ λL_g‖ / (‖∇θ λL_g‖ + ‖∇θ L_hyper‖), norms of the two terms' gradients over the "
    "generator's trainable parameters (U-Net's trainable set and VGT) on fresh batches; a ratio of norms, not the "
    "fraction of the update D causes (the two gradients are not orthogonal).")


def render(rows: list[dict], stages: list[dict], command: str, planned=None) -> list[str]:
    """The report's lines from the rows (and, for the setup and the clips, the plan when given)."""
    clip = "micro-CLIP" if planned and planned[0].config["pretrained"] == "micro" else "CLIP"
    if planned is None and any(r["measure"] == "clip_frame_consistency" for r in rows):
        clip = "micro-CLIP"  # the study's CSV of the micro benchmark
    budgets = budgets_of(rows)
    pri, tests = primary(rows), secondary(rows)
    survivors = sorted([t for t in tests if t["p_holm"] < ALPHA], key=lambda t: t["p_holm"])
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] not in (SOURCE, VAE)))
    clips = sorted({r["clip"] for r in rows if r["variant"] == BASELINE})
    L = [f"# Does APLA make videos more consistent than Tune-A-Video? {len(clips)} clip{'s' * (len(clips) != 1)}",
         "",
         primary_sentence(pri), "",
         f"Primary endpoint: `apla.eval.metrics.{PRIMARY}`", "",
         "(Lower is better; 0 is the source clip itself. Full APLA minus Tune-A-Video at the default budget, per "
         "clip, averaged over the source prompt and its edits; the analysis is fixed in `apla.study.report`'s "
         "docstring.)", ""]
    L += [f"Secondary differences surviving Holm's correction over {len(tests)} tests: "
          + ("; ".join(f"{t['a']} − {t['b']} at {t['steps']} steps, {label_of(t['measure'], clip)}: "
                       f"{cell(t, next(m[4] for m in MEASURES if m[0] == t['measure']))}" for t in survivors)
             if survivors else "none") + ".", ""]
    trend = [compare(rows, FULL, BASELINE, s, PRIMARY, ALL, False) for s in budgets]
    control = [compare(rows, FULL, CONTROL, s, PRIMARY, ALL, False) for s in budgets]
    L += ["Full − Tune-A-Video on the primary endpoint by budget (uncorrected, for the trend): "
          + "; ".join(f"{t['steps']} steps {cell(t, 1)}" for t in trend) + ". Full − capacity control: "
          + "; ".join(f"{t['steps']} steps {cell(t, 1)}" for t in control) + ".", ""]
    for s in stages:
        if s["runs"]:
            L += [f"Made by `{s['command']}` at commit {s.get('commit', 'unknown')}: {s['wall_s'] / 60:.1f} min wall "
                  f"for {s['runs']} runs ({s['runs_before']} already finished), {s['jobs']} at a time with "
                  f"{s['threads']} torch thread(s) each on {s['cpus']} CPU cores (finished {s['finished_at']}).", ""]
    L += [f"Tables rebuilt from `results.csv` (columns {', '.join(COLUMNS)}) by `{command}` at commit {commit()}.",
          ""]
    if planned:
        cfg = planned[0].config
        L += ["## Setup", "",
              f"- Base model `{cfg['pretrained']}`; the first {cfg['frames']} frames of each clip at {cfg['size']} px; "
              f"AdamW lr {cfg['lr']:g} (D: {cfg['disc_lr']:g}), constant; α, β, γ, λ = {cfg['apla']['alpha']:g}, "
              f"{cfg['apla']['beta']:g}, {cfg['apla']['gamma']:g}, {cfg['apla']['lam']:g}; seed "
              f"{', '.join(map(str, sorted({p.seed for p in planned})))}.",
              f"- Budgets {', '.join(map(str, budgets))}: checkpoints of one {budgets[-1]}-step run per clip and core "
              f"variant (constant learning rate, the run's own random stream); each sampled by DDIM inversion and "
              f"{planned[0].sample_steps} guided DDIM steps for the source prompt and each edit.",
              "- Variants: Tune-A-Video = no VGT (φ = 0), no D, MSE only; full = APLA with VGT-Pure, hyper-loss and "
              "D; capacity control = full APLA whose VGT has the same parameters and place in Eq. 4 but attends "
              "only to its own frame (`apla.vgt.frame_mask`); Table 3's other rows (`APLAConfig.ablation`) and Table "
              f"1's other VGT versions at {budgets[0]} steps on {len(clips_of(rows, variants))} clips.",
              f"- {clip}: the micro CLIP tower (`apla.micro.tower_check` checks it on generated frames against the "
              "shapes world's ground truth); its scores are on its own scale.", ""]
    for s in budgets:
        L += [f"## Core variants on every clip, {s} steps", "",
              "Means over clips; differences: mean [95% bootstrap interval] over clips, ↑↓ clips gaining / losing "
              "(exact sign test) for counts, p Holm-adjusted (the primary: unadjusted).", "",
              *core_table(rows, tests, pri, s, clip), ""]
    sec = secondary_table(rows, tests, budgets[0], clip)
    if sec:
        L += [f"## Table 3's other rows and Table 1's VGT versions, {budgets[0]} steps", "",
              f"Differences from Tune-A-Video on the clips each ran on (Tune-A-Video's mean over the same clips).", "",
              *sec, ""]
    L += ["## Does the discriminator do anything?", "", D_ARGUMENT, "", GRAD_SHARE, "",
          *diagnostics_table(rows, variants), "", "## ‖φ‖ / ‖ε_θ‖ over training (Fig. 5b), and cost", "",
          *phi_and_cost_table(rows, variants), ""]
    return L


def clips_of(rows, variants) -> set:
    others = [v for v in variants if v not in (BASELINE, FULL, CONTROL)]
    return {r["clip"] for r in rows if r["variant"] in others}


def write_report(planned, path, stages: list[dict], command: str, plots: bool = True, csv_path=None) -> int:
    """Write the CSV (`results.csv` beside the report; from the finished runs of `planned`, or read from
    `csv_path` when given), the markdown report and its PNGs; keeps a hand-written tail below HAND_MARK. Returns 2
    when the plot could not be made (no matplotlib), else 0."""
    path = Path(path)
    if csv_path is not None:
        rows = read_csv(csv_path)
    else:
        rows = collect(planned)
        write_csv(rows, path.parent / "results.csv")
    code = 0
    L = render(rows, stages, command, planned)
    curves = phi_curves(rows, [v for v in dict.fromkeys(r["variant"] for r in rows) if v not in (SOURCE, VAE)])
    if plots and curves:
        try:
            plot_phi(curves, path.parent / "phi_ratio.png")
            L += ["![‖φ‖/‖ε_θ‖ over training](phi_ratio.png)", ""]
        except ImportError:
            print("error: the plot of ||phi|| / ||eps_theta|| needs matplotlib (pip install matplotlib, or the "
                  "extra apla[plots]); the rest of the report is written", file=sys.stderr)
            code = 2
    if planned and csv_path is None:
        caption, grid = grid_rows(planned, None, budgets_of(rows)[-1])
        if len(grid) > 1:
            write_grid(grid, path.parent / "grid.png")
    if (path.parent / "grid.png").is_file():
        L += ["## Frames", "", "The first clip's shape edit at the last budget (rows: the source clip, then each "
              "variant; columns: frames).", "", "![variants × frames](grid.png)", ""]
    tail = ""
    if path.is_file() and HAND_MARK in path.read_text():
        tail = path.read_text().split(HAND_MARK, 1)[1]
    ckpt.atomic_write_bytes(path, ("\n".join(L) + "\n" + HAND_MARK + tail.rstrip("\n") + "\n").encode())
    return code
