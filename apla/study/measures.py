"""What one finished run of the ablation study measured (`python -m apla.study measure RUN`, the last command of
the run's line in the plan): the measures sample.py wrote for each prompt, the discriminator's diagnostics at each
checkpoint and ||phi|| / ||eps_theta|| over training, gathered into RUN/measures.json, the one file the report
(`apla.study.report`) reads. A run is finished when its measures.json exists."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import apla
from apla import checkpoint as ckpt
from apla import run
from apla.cli import fail
from apla.discriminator import generator_adversarial_loss

DIAG_SEED = 12345  # the fresh batches of `diagnostics`, the same for every run and checkpoint
DIAG_BATCHES = 4


def best_linear_d(real: torch.Tensor, fake: torch.Tensor, held_out: float = 0.5, iterations: int = 25) -> dict:
    """The best 1x1-convolution discriminator for the noise pairs of a trained run, fitted directly: logistic
    regression of "real" on the per-pixel channel vectors (N, C) of eps (label 1) and eps* (label 0), Eq. 19's loss
    with D(x) = sigmoid(w . x + b), minimised by Newton's method in float64 on the first (1 - held_out) of the rows
    of each and scored on the rest.

    Why it should stay at chance: Eq. 19's loss is convex in (w, b). When eps and eps* are both distributed
    symmetrically about zero (eps ~ N(0, I); eps* = eps_theta + phi is trained to match it), the expected loss is
    unchanged by (w, b) -> (-w, b), so by convexity its minimum lies at w = 0 (and then b = 0 for equal counts):
    D = 1/2 everywhere, whatever the two variances. A linear score cannot use a variance difference here because
    flipping x -> -x leaves both distributions as they are. Returns held-out accuracy, |w| and b."""
    def split(x):
        k = int(len(x) * (1 - held_out))
        return x[:k].double(), x[k:].double()
    (r_fit, r_test), (f_fit, f_test) = split(real), split(fake)
    x = torch.cat([r_fit, f_fit])
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, C + 1): a bias column
    y = torch.cat([torch.ones(len(r_fit)), torch.zeros(len(f_fit))]).double()
    theta = torch.zeros(x.shape[1], dtype=x.dtype)
    for _ in range(iterations):  # Newton: theta <- theta - H^-1 g for the mean logistic loss
        p = torch.sigmoid(x @ theta)
        g = x.T @ (p - y) / len(y)
        h = (x * (p * (1 - p)).unsqueeze(1)).T @ x / len(y) + 1e-9 * torch.eye(x.shape[1], dtype=x.dtype)
        theta = theta - torch.linalg.solve(h, g)
    w, b = theta[:-1], theta[-1]
    accuracy = 0.5 * (((r_test @ w + b) > 0).double().mean() + ((f_test @ w + b) < 0).double().mean())
    return {"linear_d_accuracy": accuracy.item(), "linear_d_w_norm": w.norm().item(), "linear_d_bias": b.item()}


def samples_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "samples" / f"step-{step:06d}"


def sample_measures(run_dir: Path, step: int, prompts: list[str], shapes: dict | None) -> list[dict]:
    """Per prompt sampled at `step`: its kind (source; colour or shape on a shapes clip, edit otherwise) and the
    measures sample.py wrote in samples/step-N/metrics.json (apla.eval.metrics, scored on the files' 8-bit frames)."""
    rows = {r["prompt"]: r for r in json.loads((samples_dir(run_dir, step) / "metrics.json").read_text())["videos"]}
    out = []
    for prompt in prompts:
        r = rows[prompt]
        kind = "source" if prompt == prompts[0] else (r["edited"][0] if shapes and len(r["edited"]) == 1 else "edit")
        out.append({"step": step, "prompt": prompt, "kind": kind, "measures": r["metrics"]})
    return out


def diagnostics(run_dir: Path, device: str, batches: int = DIAG_BATCHES) -> tuple[list, int]:
    """At every checkpoint of a run: APLA.forward (Algorithm 1's step, apla.algorithm) on `batches` fresh batches
    (seed DIAG_SEED: posterior sample of the clip's latents, t ~ U{0..T-1}, eps ~ N(0, I)), and from it
      grad_hyper = ||d L_hyper / d theta||,  grad_adv = ||d (lambda L_g) / d theta||   over APLA.generator_parameters
      grad_share = grad_adv / (grad_adv + grad_hyper)           the share of the generator's gradient that D drives
      d_accuracy = (P[D(eps) > 0] + P[D(eps*) < 0]) / 2         per pixel: real noise called real, eps* called fake
    lambda L_g is computed from the step's own eps* with the step's own functions, and L_hyper's gradient as that
    of loss_g - lambda L_g. Returns (one record per checkpoint, none without D; VGT's parameter count)."""
    cfg = run.read_config(run_dir)
    if not cfg.apla.use_discriminator and cfg.apla.vgt == "none":  # nothing to measure
        return [], 0
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    sd = apla.load_stable_diffusion(cfg.pretrained, device=dev)
    src = load_file(str(run_dir / "source.safetensors"))
    z0_mean, z0_std, context = (src[k].to(dev) for k in ("z0_mean", "z0_std", "context"))
    model = run.build_apla(cfg, sd, z0_mean.shape, dev)
    params = model.generator_parameters()
    vgt_params = sum(p.numel() for p in model.vgt.parameters()) if model.vgt is not None else 0

    def norm(grads):
        return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()

    records = []
    paths = ckpt.list_checkpoints(run_dir) if model.disc is not None else []
    for path in paths:
        step = run.load_checkpoint(path, cfg, model)
        model.train()
        gen = torch.Generator(device=dev).manual_seed(DIAG_SEED)
        acc = {k: [] for k in ("grad_hyper", "grad_adv", "grad_share", "d_accuracy", "d_real", "d_fake")}
        pairs = ([], [])  # per-pixel channel vectors of eps and eps* at the last checkpoint
        for _ in range(batches):
            z0 = z0_mean + z0_std * torch.randn(z0_mean.shape, generator=gen, device=dev)
            t = torch.randint(0, len(sd.alpha_bar), (1,), generator=gen, device=dev)
            eps = torch.randn(z0.shape, generator=gen, device=dev)
            out = model(z0, context, t, eps)
            d_fake = model.disc(out.eps_star).float()
            adv = model.lam * generator_adversarial_loss(d_fake, model.saturating)
            if not torch.allclose(adv.detach(), model.lam * out.terms["adv_g"], rtol=1e-4, atol=1e-7):
                raise RuntimeError("lambda L_g recomputed from eps* differs from the step's own")
            g_adv = norm(torch.autograd.grad(adv, params, retain_graph=True, allow_unused=True))
            g_hyper = norm(torch.autograd.grad(out.loss_g - adv, params, allow_unused=True))
            with torch.no_grad():
                d_real = model.disc(eps).float()
            acc["grad_hyper"].append(g_hyper)
            acc["grad_adv"].append(g_adv)
            acc["grad_share"].append(g_adv / max(g_adv + g_hyper, 1e-30))
            acc["d_accuracy"].append(0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean()).item())
            acc["d_real"].append(torch.sigmoid(d_real).mean().item())
            acc["d_fake"].append(torch.sigmoid(d_fake).mean().item())
            if path == paths[-1]:
                for store, x in zip(pairs, (eps, out.eps_star)):
                    store.append(x.detach().float().movedim(1, -1).reshape(-1, x.shape[1]).cpu())
        record = {"step": step, **{k: sum(v) / len(v) for k, v in acc.items() if v}}
        if pairs[0]:
            record.update(best_linear_d(torch.cat(pairs[0]), torch.cat(pairs[1])))
        records.append(record)
    return records, vgt_params


def measure_run(run_dir, device: str = "cpu") -> dict:
    """Everything the report needs from one trained and sampled run (RUN/study.json says what was planned for it)
    -> RUN/measures.json (written atomically); one-line exit when the run is not one of a study or not sampled."""
    run_dir = Path(run_dir)
    if not (run_dir / "study.json").is_file():
        fail(f"{run_dir}: no study.json; not a run of a study's plan (python -m apla.study plan)")
    study = json.loads((run_dir / "study.json").read_text())
    missing = [step for step in study["sample_at"] if not (samples_dir(run_dir, step) / "metrics.json").is_file()]
    if missing:
        fail(f"{run_dir}: not sampled at step {missing[0]} (no {samples_dir(run_dir, missing[0]) / 'metrics.json'}); "
             "run the rest of its line first")
    samples = [row for step in study["sample_at"]
               for row in sample_measures(run_dir, step, study["prompts"], study["shapes"])]
    diag, vgt_params = diagnostics(run_dir, device, study["diag_batches"])
    log = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln.strip()]
    result = {**study, "samples": samples, "diagnostics": diag, "vgt_params": vgt_params,
              "phi_ratio": [[r["step"], r["phi_ratio"]] for r in log], "step_time": [r["step_time"] for r in log]}
    ckpt.atomic_write_json(run_dir / "measures.json", result)
    return result
