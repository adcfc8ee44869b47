"""The report of the ablation study (`python -m apla.study report`, and the end of `run`): statistics over clips x
seeds, one table per question, a grid of frames and the plot of ||phi|| / ||eps_theta|| over training (the paper's
Fig. 5b), from the measures.json of every finished run, whatever executed the plan's lines.

Statistics. A *unit* is one clip and one seed; a variant's value on a unit is its measure averaged over the prompts
it applies to (the edits for the attribute measures, the source prompt for PSNR, every prompt otherwise). Over the
n units a table gives
    mean +- t_{0.975, n-1} * s / sqrt(n)        (s: the sample standard deviation; a 95% t-interval)
and each variant's paired difference from Tune-A-Video, d_u = value_u(variant) - value_u(Tune-A-Video) on the same
clip and seed, with the same interval over the d_u; a difference is significant when its interval excludes 0.
Units that share a clip are not independent draws of clips, so the intervals speak about these clips.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from apla import checkpoint as ckpt
from apla.assets import resolve_video
from apla.eval.score import sample_stem
from apla.study.measures import samples_dir
from apla.video import read_video

HAND_MARK = "<!-- Written by hand below this line; python -m apla.study keeps it. -->"
ALL = ("source", "colour", "shape", "edit")
EDITS = ("colour", "shape", "edit")
# key in measures.json, label, +1 if higher is better / -1 if lower, prompt kinds it is averaged over, scale
MEASURES = [
    ("edited_right", "edited attribute right (% of frames)", +1, EDITS, 100.0),
    ("kept_right", "unedited attribute kept (% of frames)", +1, EDITS, 100.0),
    ("path_error", "centroid path error (px)", -1, ALL, 1.0),
    ("colour_flicker", "colour flicker (RGB, 0-255)", -1, ALL, 1.0),
    ("size_flicker", "size flicker (px)", -1, ALL, 1.0),
    ("fci", "FCI", -1, ALL, 1.0),
    ("warping_error", "warping error (×1000)", -1, ALL, 1000.0),
    ("clip_frame_consistency", "CLIP frame consistency", +1, ALL, 1.0),
    ("clip_text_alignment", "CLIP text alignment", +1, ALL, 1.0),
    ("psnr", "PSNR of the source prompt (dB)", +1, ("source",), 1.0),
]
DIGITS = {"fci": 3, "size_flicker": 3}  # decimals shown (else 2)


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 1/2) of Student's t with df degrees of freedom: bisection on the CDF, the CDF integrated
    from the density Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + x^2/df)^(-(df+1)/2) with Simpson's rule
    after the substitution x = tan(u), which maps the heavy tails onto a finite interval."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 1/2 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x):  # P(T <= x) for x >= 0: 1/2 + integral_0^atan(x) f(tan u) sec^2 u du
        u = np.linspace(0.0, math.atan(x), 2001)
        tan = np.tan(u)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(tan ** 2 / df)) * (1 + tan ** 2)
        h = u[1] - u[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values, level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t-interval at `level`, n) of the finite values; half-width NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) < 2:
        return float(x[0]), math.nan, 1
    half = t_quantile(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


def paired_ci(values: dict, baseline: dict, level: float = 0.95) -> tuple[float, float, int]:
    """mean_ci of values[u] - baseline[u] over the units u both have."""
    return mean_ci([values[u] - baseline[u] for u in values if u in baseline
                    and all(v is not None and math.isfinite(v) for v in (values[u], baseline[u]))], level)


def significant(mean: float, half: float) -> bool:
    return math.isfinite(half) and abs(mean) > half


# ---------------------------------------------------------------------------------------------------------------
# From measures.json files to per-unit values
# ---------------------------------------------------------------------------------------------------------------
def unit_values(runs: list[dict], variant: str, step: int, key: str, kinds) -> dict:
    """(clip, seed) -> the variant's `key` at `step`, averaged over its samples of the given kinds."""
    out = {}
    for r in runs:
        if r["variant"] != variant:
            continue
        vals = [s["measures"][key] for s in r["samples"] if s["step"] == step and s["kind"] in kinds
                and s["measures"].get(key) is not None and math.isfinite(s["measures"][key])]
        if vals:
            out[(r["clip"], r["seed"])] = float(np.mean(vals))
    return out


def fmt(mean: float, half: float, scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
    if not math.isfinite(mean):
        return "–"
    m = f"{mean * scale:+.{digits}f}" if sign else f"{mean * scale:.{digits}f}"
    return m + (f" ± {half * scale:.{digits}f}" if math.isfinite(half) else "")


def measure_table(runs: list[dict], names: list[str], step: int, baseline: str, measures=MEASURES) -> tuple[list, list]:
    """Markdown lines of two tables, a row per measure and a column per variant: the means over the units every
    variant has (the same clips and seeds), then the paired differences from the baseline; and the significant
    differences as (variant, label, mean, half, better)."""
    table = {}
    for m in measures:
        vals = {v: unit_values(runs, v, step, m[0], m[3]) for v in names}
        shared = set.intersection(*(set(x) for x in vals.values()))
        if shared:
            table[m] = {v: {u: x[u] for u in shared} for v, x in vals.items()}
    others = [v for v in names if v != baseline]
    n = max((len(next(iter(t.values()))) for t in table.values()), default=0)
    means = [f"| measure (n = {n} clip × seed) | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    diffs = [f"| Δ from {baseline} | " + " | ".join(others) + " |", "| --- |" + " --- |" * len(others)]
    found = []
    for (key, label, direction, kinds, scale), vals in table.items():
        title, digits = f"{label} {'↑' if direction > 0 else '↓'}", DIGITS.get(key, 2)
        means.append(f"| {title} | " + " | ".join(fmt(*mean_ci(vals[v].values())[:2], scale, digits) for v in names)
                     + " |")
        cells = []
        for v in others:
            dm, dh, _ = paired_ci(vals[v], vals[baseline])
            sig = significant(dm, dh)
            cells.append(fmt(dm, dh, scale, digits, sign=True) + (" *" if sig else ""))
            if sig:
                found.append((v, label, dm * scale, dh * scale, dm * direction > 0))
        diffs.append(f"| {title} | " + " | ".join(cells) + " |")
    return means + ([""] + diffs if others else []), found


def best_by_measure(runs: list[dict], names: list[str], step: int, measures=MEASURES) -> list[str]:
    """For each measure, the variant with the best mean (ties: all of them)."""
    lines = []
    for key, label, direction, kinds, scale in measures:
        ms = {v: mean_ci(unit_values(runs, v, step, key, kinds).values())[0] for v in names}
        ms = {v: m for v, m in ms.items() if math.isfinite(m)}
        if ms:
            best = max(direction * m for m in ms.values())
            winners = [v for v, m in ms.items() if math.isclose(direction * m, best, rel_tol=1e-9, abs_tol=1e-12)]
            lines.append(f"- {label}: {', '.join(winners)} ({best * direction * scale:.2f})")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics: D's accuracy, the gradient share of lambda L_g, ||phi|| / ||eps_theta||
# ---------------------------------------------------------------------------------------------------------------
def diagnostics_table(runs: list[dict], names: list[str]) -> list[str]:
    with_d = [v for v in names if any(r["variant"] == v and r["diagnostics"] and "d_accuracy" in r["diagnostics"][0]
                                       for r in runs)]
    if not with_d:
        return ["(no variant with a discriminator was run)"]
    steps = sorted({d["step"] for r in runs if r["variant"] in with_d for d in r["diagnostics"]})
    lines = ["| variant | measure | " + " | ".join(f"step {s}" for s in steps) + " |",
             "| --- | --- |" + " --- |" * len(steps)]
    for v in with_d:
        for key, label, scale in (("d_accuracy", "D accuracy (%)", 100), ("d_real", "D(ε) mean", 1),
                                  ("d_fake", "D(ε*) mean", 1), ("grad_share", "λ·L_g share of ‖∇θ‖ (%)", 100)):
            cells = [fmt(*mean_ci([d[key] for r in runs if r["variant"] == v for d in r["diagnostics"]
                                   if d["step"] == s])[:2], scale, 3 if scale == 1 else 2) for s in steps]
            lines.append(f"| {v} | {label} | " + " | ".join(cells) + " |")
    return lines


def phi_curves(runs: list[dict], names: list[str]) -> dict:
    """variant -> (steps, mean over units of ||phi|| / ||eps_theta|| at each step) for variants with VGT."""
    curves = {}
    for v in names:
        series = [dict(r["phi_ratio"]) for r in runs if r["variant"] == v]
        if not series or not any(val > 0 for s in series for val in s.values()):
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        curves[v] = (np.asarray(steps), np.asarray([np.mean([s[k] for s in series]) for k in steps]))
    return curves


def phi_table(runs: list[dict], names: list[str]) -> list[str]:
    lines = ["| variant | ‖φ‖/‖ε_θ‖ over the first 10 steps | over the last 10 steps | VGT parameters |",
             "| --- | --- | --- | --- |"]
    for v in names:
        rs = [r for r in runs if r["variant"] == v and any(x > 0 for _, x in r["phi_ratio"])]
        if rs:
            first = mean_ci([np.mean([x for _, x in r["phi_ratio"][:10]]) for r in rs])
            last = mean_ci([np.mean([x for _, x in r["phi_ratio"][-10:]]) for r in rs])
            lines.append(f"| {v} | {fmt(*first[:2], digits=5)} | {fmt(*last[:2], digits=5)} | "
                         f"{rs[0]['vgt_params']:,} |")
    return lines


def cost_table(runs: list[dict], names: list[str]) -> list[str]:
    """Mean seconds per training step of each variant (as logged by train.py, under the study's parallel load)."""
    lines = ["| variant | s per training step | runs |", "| --- | --- | --- |"]
    for v in names:
        times = [t for r in runs if r["variant"] == v for t in r["step_time"][1:]]  # the first step warms up
        if times:
            lines.append(f"| {v} | {np.mean(times):.3f} | {sum(r['variant'] == v for r in runs)} |")
    return lines


def plot_phi(curves: dict, path: Path, smooth: int = 10) -> None:
    """The paper's Fig. 5b on our runs: ||phi|| / ||eps_theta|| over training steps (running mean of `smooth`
    steps), one line per VGT variant. Needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for v, (steps, ratio) in curves.items():
        k = min(smooth, len(ratio))
        ax.plot(steps[k - 1:], np.convolve(ratio, np.ones(k) / k, mode="valid"), label=v)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("‖φ‖ / ‖ε_θ‖ (running mean)")
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
PAPER_ORDER = [  # the paper's orderings, best first, to set ours beside: (question, measure, budget, order)
    ("Table 3, CLIP score, default budget", "clip_frame_consistency", 1,
     ["full", "w/o vgt&hyper-loss", "w/o discriminator", "w/o hyper-loss&discriminator", "w/o vgt&discriminator"]),
    ("Table 3, CLIP score, twice the budget", "clip_frame_consistency", 2,
     ["full", "w/o vgt&hyper-loss", "w/o vgt&discriminator", "w/o discriminator", "w/o hyper-loss&discriminator"]),
    ("Table 3, FCI, default budget", "fci", 1,
     ["w/o vgt&discriminator", "w/o hyper-loss&discriminator", "w/o vgt&hyper-loss", "w/o discriminator", "full"]),
    ("Table 3, FCI, twice the budget", "fci", 2,
     ["w/o vgt&hyper-loss", "w/o discriminator", "full", "w/o hyper-loss&discriminator", "w/o vgt&discriminator"]),
    ("Table 1, PSNR", "psnr", 1, ["VGT-Hyper", "VGT-Pure-EN", "full", "VGT-Hyper-EN"]),
]


def ordering(runs: list[dict], names: list[str], step: int, key: str, kinds, direction: int) -> list[str]:
    ms = {v: mean_ci(unit_values(runs, v, step, key, kinds).values())[0] for v in names}
    return sorted([v for v in ms if math.isfinite(ms[v])], key=lambda v: -direction * ms[v])


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


def write_report(planned, path, stages: list[dict], command: str, plots: bool = True) -> int:
    """Write the markdown report (and its PNGs beside it) from every finished run of `planned`; keeps a hand-written
    tail below HAND_MARK. `stages`: what each `python -m apla.study run` recorded (OUT/stages.json); runs finished by
    another executor are counted apart, with `command`, the one writing the report. Returns 2 when the plot could not
    be made (no matplotlib), else 0."""
    path = Path(path)
    runs = load_runs(planned)
    names = list(dict.fromkeys(p.variant for p in planned))
    baseline = names[0]
    n = min(min(p.sample_at) for p in planned)
    long_names = [v for v in names if any(2 * n in p.sample_at for p in planned if p.variant == v)]
    table1 = [v for v in names if v == "full" or v.startswith("VGT-")]
    cfg = planned[0].config
    ran = [s for s in stages if s["runs"]] or stages[-1:]
    clips = list(dict.fromkeys(p.clip.name for p in planned))
    seeds = sorted({p.seed for p in planned})
    code = 0
    L = [f"# Does APLA beat Tune-A-Video? Tables 1 and 3 on {len(clips)} clip(s) × {len(seeds)} seed(s)", ""]
    for s in ran:  # every invocation that ran runs (one, unless the study was run in stages)
        L += [f"Made by `{s['command']}`: {s['wall_s'] / 60:.1f} min wall for {s['runs']} runs "
              f"({s['runs_before']} were already finished), {s['jobs']} at a time with {s['threads']} torch "
              f"thread(s) each on {s['cpus']} CPU cores; 1-minute load average {s['load_before']:.2f} before the "
              f"start, {s['load_mean']:.2f} on average and at most {s['load_max']:.2f} while it ran "
              f"(finished {s['finished_at']}).", ""]
    if len(ran) > 1:
        L += [f"In all {sum(s['wall_s'] for s in ran) / 60:.1f} min over {len(ran)} stages.", ""]
    outside = len(runs) - (stages[-1]["finished"] if stages else 0)
    if outside > 0:
        L += [f"{outside} run(s) finished by another executor of the lines of `python -m apla.study plan`, which "
              f"records no wall time or load; reported by `{command}`.", ""]
    train_min = sum(sum(r["step_time"]) for r in runs) / 60
    L += ["## Setup", "",
          f"- Base model `{cfg['pretrained']}`; {cfg['frames']} frames at {cfg['size']}×{cfg['size']}; AdamW lr "
          f"{cfg['lr']:g} (D: {cfg['disc_lr']:g}), constant; loss weights α, β, γ, λ = {cfg['apla']['alpha']:g}, "
          f"{cfg['apla']['beta']:g}, {cfg['apla']['gamma']:g}, {cfg['apla']['lam']:g}; U-Net GroupNorm "
          f"`{cfg['groupnorm']}` for every variant.",
          f"- Budget: N = {n} steps (the default column) and 2N = {2 * n} (Table 3's second column, the same runs "
          f"continued: constant learning rate, same random stream). Sampling: DDIM inversion of the clip, then "
          f"{planned[0].sample_steps} guided DDIM steps (guidance {cfg['guidance']:g}) for the source prompt and each "
          f"edit.",
          f"- Seeds {', '.join(map(str, seeds))}: each run's seed sets its noise, timesteps and the initial weights "
          f"of VGT, D and the random VGG features; every variant sees the same clip, seed and budget.",
          f"- Runs: {len(runs)} of {len(planned)} finished; {train_min:.1f} min of training steps in all.",
          "- Variants: Tune-A-Video = no VGT (φ = 0), no D (λ = 0), MSE only; Table 3's rows by "
          "`APLAConfig.ablation`; Table 1's VGT versions in full APLA (`full` is VGT-Pure).",
          "- Statistics: mean ± 95% t-interval over clips × seeds; Δ = the paired difference from Tune-A-Video on "
          "the same clip and seed, with its interval; * marks an interval that excludes 0.", "",
          "## Clips", "", "| clip | source caption | edits |", "| --- | --- | --- |"]
    seen = {}
    for p in planned:
        seen.setdefault(p.clip.name, p.clip)
    L += [f"| {c.name} | {c.prompt} | {'; '.join(c.edits)} |" for c in seen.values()]
    sig_all = []
    for title, vs, step in ((f"Table 3 at the default budget ({n} steps)", long_names, n),
                            (f"Table 3 at twice the budget ({2 * n} steps)", long_names, 2 * n),
                            (f"Table 1: VGT versions in full APLA ({n} steps)",
                             list(dict.fromkeys([baseline] + table1)), n)):
        if len(vs) < 1 or not any(step in p.sample_at for p in planned if p.variant in vs):
            continue
        lines, found = measure_table(runs, vs, step, baseline)
        sig_all += [(title, *f) for f in found]
        L += ["", f"## {title}", "", *lines, "", "Best mean per measure:", "", *best_by_measure(runs, vs, step)]
    L += ["", "## Orderings beside the paper's", "",
          "Best first, by mean (the paper: one run per row on DAVIS; ours: the means above, whose intervals say "
          "which places are told apart).", "", "| question | the paper | ours |", "| --- | --- | --- |"]
    for question, key, budget, paper in PAPER_ORDER:
        _, _, d, kinds, _ = next(m for m in MEASURES if m[0] == key)
        ours = ordering(runs, [v for v in paper if v in names], budget * n, key, kinds, d)
        L.append(f"| {question} | {' > '.join(paper)} | {' > '.join(ours) or '– (not measured)'} |")
    L += ["", "## Does the discriminator do anything?", "",
          "Measured after training from the saved checkpoints (`apla.study.measures.diagnostics`): APLA.forward on "
          "fresh seeded batches, D's per-pixel accuracy on real noise ε and on ε*, D's mean outputs, and the share of "
          "the generator's gradient norm (over U-Net trainable set + VGT) that λ·L_g carries against the hyper-loss.",
          "", *diagnostics_table(runs, names), "", "## ‖φ‖ / ‖ε_θ‖ over training (Fig. 5b)", "",
          *phi_table(runs, names)]
    curves = phi_curves(runs, [v for v in names if v in table1] or names)
    if plots and curves:
        try:
            plot_phi(curves, path.parent / "phi_ratio.png")
            L += ["", "![‖φ‖/‖ε_θ‖ over training](phi_ratio.png)"]
        except ImportError:
            print("error: the plot of ||phi|| / ||eps_theta|| needs matplotlib (pip install matplotlib, or the "
                  "extra apla[plots]); the rest of the report is written", file=sys.stderr)
            code = 2
    caption, rows = grid_rows(planned, runs, n)
    if len(rows) > 1:
        write_grid(rows, path.parent / "grid.png")
        L += ["", "## Frames", "", f"{caption} (rows: the source clip, then each variant; columns: frames).", "",
              "![variants × frames](grid.png)"]
    L += ["", "## Cost", "", *cost_table(runs, names)]
    L += ["", "## Significant differences from Tune-A-Video", ""]
    L += [f"- {t}: {v}, {label}: {m:+.2f} ± {h:.2f} ({'better' if b else 'worse'})" for t, v, label, m, h, b
          in sig_all] or ["- none: every interval includes 0"]
    tail = ""
    if path.is_file() and HAND_MARK in path.read_text():
        tail = path.read_text().split(HAND_MARK, 1)[1]
    ckpt.atomic_write_bytes(path, ("\n".join(L) + "\n\n" + HAND_MARK + tail.rstrip("\n") + "\n").encode())
    return code
