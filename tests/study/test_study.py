"""The ablation study (python -m apla.study): its statistics against closed forms and hand-computed values, its
variants as configuration values, the plan for a user's clips file, and --quick end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from apla.study import ablate
from apla.study.report import HAND_MARK, mean_ci, paired_ci, significant, t_quantile
from apla.config import ABLATIONS, APLAConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
def test_t_quantile_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_quantile_known_values():
    # printed tables of Student's t, two-sided 95%
    for df, q in ((3, 3.182446), (11, 2.200985), (30, 2.042272), (1000, 1.962339)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-6)
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)


def test_mean_ci_and_paired_differences_by_hand():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3), half-width t_{0.975,3} s / 2 = 3.182446 * 0.645497 = 2.054260
    m, h, n = mean_ci([1, 2, 3, 4])
    assert (m, n) == (2.5, 4) and h == pytest.approx(2.054260, abs=1e-5)
    assert mean_ci([7.0])[:2] == (7.0, pytest.approx(math.nan, nan_ok=True))
    assert mean_ci([float("nan"), 1.0, 3.0])[2] == 2
    # pairs on the shared units a, b, c: differences 2, 3, 2 -> mean 7/3, s = 0.57735, t_{0.975,2} = 4.302653
    m, h, n = paired_ci({"a": 3, "b": 5, "c": 4}, {"a": 1, "b": 2, "c": 2, "d": 9})
    assert n == 3 and m == pytest.approx(7 / 3) and h == pytest.approx(4.302653 * 0.57735 / math.sqrt(3), abs=1e-5)
    assert significant(m, h) and not significant(0.5, 0.6) and not significant(1.0, math.nan)


def test_variants_are_values_of_the_run_configuration():
    table = ablate.variants()
    assert table[ablate.BASELINE] == {"groupnorm": "frames",
                                      "apla": {"vgt": "none", "use_discriminator": False, "use_hyper_loss": False}}
    for row in ABLATIONS:
        cfg = APLAConfig.ablation(row)
        assert table[row]["apla"] == {"vgt": cfg.vgt, "use_discriminator": cfg.use_discriminator,
                                      "use_hyper_loss": cfg.use_hyper_loss}
    for vgt, name in ablate.TABLE1.items():
        assert table[name]["apla"] == {"vgt": vgt, "use_discriminator": True, "use_hyper_loss": True}
    assert all(v["groupnorm"] == "frames" for v in table.values())


def clips_files(tmp_path):
    (tmp_path / "frames").mkdir()
    entries = [{"video": "bigbuckbunny", "prompt": "a rabbit on a hill", "edits": ["a tiger on a hill"]},
               {"name": "mine", "video": "frames", "prompt": "a dog", "edits": ["a cat", "a fox"], "frames": 8}]
    (tmp_path / "clips.json").write_text(json.dumps(entries))
    (tmp_path / "clips.toml").write_text(
        '[[clip]]\nvideo = "bigbuckbunny"\nprompt = "a rabbit on a hill"\nedits = ["a tiger on a hill"]\n\n'
        '[[clip]]\nname = "mine"\nvideo = "frames"\nprompt = "a dog"\nedits = ["a cat", "a fox"]\nframes = 8\n')
    return tmp_path / "clips.json", tmp_path / "clips.toml"


def test_a_users_clips_file_plans_the_papers_study(tmp_path, capsys):
    """The path a GPU user takes with SD v1.5 and DAVIS clips: nothing is loaded, the plan uses SD's defaults."""
    for path in clips_files(tmp_path):
        clips = ablate.read_clips(path)
        assert [c.name for c in clips] == ["a_rabbit_on_a_hill", "mine"]
        assert clips[1].video == str((tmp_path / "frames").resolve()) and clips[1].settings == {"frames": 8}
        jobs = ablate.plan(tmp_path / "out", clips, [0, 1], list(ablate.variants()), "path/to/sd15", None, None)
        assert len(jobs) == 2 * 2 * len(ablate.variants())
        long = [j for j in jobs if j.variant in ablate.TABLE3]
        assert {j.config["max_steps"] for j in long} == {1500} and {tuple(j.sample_at) for j in long} == {(750, 1500)}
        assert {j.config["max_steps"] for j in jobs if j not in long} == {750}
        first = jobs[0].config
        assert (first["frames"], first["size"], first["pretrained"], first["keep_checkpoints"]) == (24, 512, "path/to/sd15", 0)
        assert {j.config["frames"] for j in jobs if j.clip.name == "mine"} == {8}
        # every variant of a clip and seed differs only in the variant's own values
        same = [j.config for j in jobs if j.clip.name == "mine" and j.seed == 1 and j.variant in ablate.TABLE3]
        strip = [{k: v for k, v in c.items() if k not in ("apla", "output_dir")} for c in same]
        assert all(s == strip[0] for s in strip)
    assert ablate.main(["--pretrained", "path/to/sd15", "--clips", str(path), "--out", str(tmp_path / "o"),
                        "--seeds", "3", "--devices", "cuda:0,cuda:1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(ablate.variants()) and "mine / Tune-A-Video / seed 3: 1500 steps" in "\n".join(lines)


@pytest.mark.parametrize("content, message", [
    ("[{\"video\": \"x\"}]", "needs video, prompt and a list of edits"),
    ("{\"clips\": []}", "non-empty list"),
    ("not json", "cannot parse"),
    ("[{\"video\": \"x\", \"prompt\": \"p\", \"edits\": [], \"fps\": 3}]", "unknown keys"),
])
def test_bad_clips_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "clips.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        ablate.main(["--clips", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_flags_are_one_line(capsys):
    for argv in (["--variants", "nope"], ["--seeds", "a,b"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            ablate.main([*argv, "--dry-run"])
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")


def test_quick_study_end_to_end(tmp_path):
    """python -m apla.study --quick: three variants on one clip and seed, trained, sampled, measured, reported;
    a second call finds every run finished and keeps the report's hand-written tail."""
    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib (a dev extra)")
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "apla.study.ablate", "--quick", "--jobs", "2", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "REPORT.md").read_text()
    heads = [ln for ln in report.splitlines() if ln.startswith("## ")]
    assert heads[:5] == ["## Setup", "## Clips", "## Table 3 at the default budget (2 steps)",
                         "## Table 3 at twice the budget (4 steps)", "## Table 1: VGT versions in full APLA (2 steps)"]
    assert {"## Does the discriminator do anything?", "## ‖φ‖ / ‖ε_θ‖ over training (Fig. 5b)", "## Frames",
            "## Significant differences from Tune-A-Video"} <= set(heads)
    assert "Made by `python -m apla.study --quick --jobs 2" in report and report.rstrip().endswith(HAND_MARK)
    table3 = report.split("## Table 3 at the default budget")[1].split("## ")[0]
    rows = [ln for ln in table3.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0] == "| measure (n = 1 clip × seed) | Tune-A-Video | full |"
    assert "| Δ from Tune-A-Video | full |" in rows
    labels = [r.split(" | ")[0][2:] for r in rows]
    for label in ("edited attribute right (% of frames) ↑", "unedited attribute kept (% of frames) ↑",
                  "centroid path error (px) ↓", "colour flicker (RGB, 0-255) ↓", "size flicker (px) ↓", "FCI ↓",
                  "warping error (×1000) ↓", "CLIP frame consistency ↑", "CLIP text alignment ↑",
                  "PSNR of the source prompt (dB) ↑"):
        assert labels.count(label) == 2  # in the means and in the differences
    assert all(len(r.split(" | ")) == len(rows[0].split(" | ")) for r in rows[:rows.index("| Δ from Tune-A-Video | full |")])
    assert "| full | D accuracy (%) |" in report and "| VGT-Hyper | λ·L_g share of ‖∇θ‖ (%) |" in report
    grid = Image.open(out / "grid.png")
    assert grid.size == (150 + 12 * 64 * 2, 4 * 64 * 2)  # the source clip and 3 variants, 12 frames each
    runs = sorted(out.glob("runs/*/*/seed-0/measures.json"))
    assert len(runs) == 3
    for path in runs:
        m = json.loads(path.read_text())
        assert {s["kind"] for s in m["samples"]} == {"source", "colour", "shape"}
        assert len(m["phi_ratio"]) == m["sample_at"][-1]
        for d in m["diagnostics"]:
            if "d_accuracy" in d:
                assert 0 <= d["d_accuracy"] <= 1 and 0 < d["grad_share"] < 1 and d["grad_adv"] > 0
    (out / "REPORT.md").write_text(report + "Our reading.\n")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "(3 already finished)" in again.stderr
    assert (out / "REPORT.md").read_text().endswith(HAND_MARK + "\nOur reading.\n")
