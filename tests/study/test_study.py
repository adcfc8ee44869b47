"""The ablation study (python -m apla.study): its statistics against closed forms and hand-computed values, its
variants as configuration values, the plan for a user's clips file and each run's line, and --quick end to end,
run by the built-in executor and by a plain process pool over the plan's lines."""
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from apla.config import ABLATIONS, APLAConfig
from apla.study import plan as study
from apla.study.__main__ import main
from apla.study import report as study_report
from apla.study.report import HAND_MARK

ROOT = Path(__file__).resolve().parents[2]


def test_variants_are_values_of_the_run_configuration():
    table = study.variants()
    assert table[study.BASELINE] == {"groupnorm": "frames",
                                     "apla": {"vgt": "none", "use_discriminator": False, "use_hyper_loss": False}}
    for row in ABLATIONS:
        cfg = APLAConfig.ablation(row)
        assert table[row]["apla"] == {"vgt": cfg.vgt, "use_discriminator": cfg.use_discriminator,
                                      "use_hyper_loss": cfg.use_hyper_loss}
    for vgt, name in study.TABLE1.items():
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
        clips = study.read_clips(path)
        assert [c.name for c in clips] == ["a_rabbit_on_a_hill", "mine"]
        assert clips[1].video == str((tmp_path / "frames").resolve()) and clips[1].settings == {"frames": 8}
        runs = study.plan(tmp_path / "out", clips, [0, 1], list(study.variants()), "path/to/sd15", [250, 500, 750],
                          None, secondary_clips=1)
        # the core variants on both clips, the others on the first only; two seeds
        assert len(runs) == 2 * (2 * len(study.CORE) + len(study.variants()) - len(study.CORE))
        core = [r for r in runs if r.variant in study.CORE]
        assert {r.config["max_steps"] for r in core} == {750}
        assert {tuple(r.sample_at) for r in core} == {(250, 500, 750)}
        assert {r.config["checkpoint_every"] for r in core} == {250}
        assert {(r.config["max_steps"], r.clip.name) for r in runs if r not in core} == {(250, "a_rabbit_on_a_hill")}
        first = runs[0].config
        assert (first["frames"], first["size"], first["pretrained"], first["keep_checkpoints"]) == \
        (24, 512, "path/to/sd15", 0)
        assert {r.config["frames"] for r in runs if r.clip.name == "mine"} == {8}
        # every variant of a clip and seed differs only in the variant's own values
        same = [r.config for r in runs if r.clip.name == "a_rabbit_on_a_hill" and r.seed == 1 and r not in core]
        strip = [{k: v for k, v in c.items() if k not in ("apla", "output_dir")} for c in same]
        assert all(s == strip[0] for s in strip)
    out = tmp_path / "o"
    assert main(["plan", "--pretrained", "path/to/sd15", "--clips", str(path), "--out", str(out), "--seeds", "3",
                 "--device", "cuda:0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(study.variants()) and all("--device cuda:0" in ln for ln in lines)
    tav = out.resolve() / "runs" / "mine" / "tune_a_video" / "seed-3"
    assert sum(str(tav / "train.json") in ln for ln in lines) == 1
    assert json.loads((tav / "train.json").read_text())["max_steps"] == 750  # 3 x a third of the preset's 750


def fake_checkpoint(run, step):
    folder = run.dir / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").touch()
    (folder / "state.pt").touch()


def test_a_runs_line_takes_it_from_where_it_stands(tmp_path):
    """Absolute paths, the repository's own scripts, the thread count; a fresh run starts afresh, a run with a
    checkpoint resumes, a stage whose output exists is left out, a finished run has no line."""
    clip = study.Clip("c", "bigbuckbunny", "a rabbit", ["a tiger"])
    [run] = study.plan(tmp_path / "out", [clip], [0], [study.BASELINE], "micro", [5, 10], 3)
    assert run.dir.is_absolute() and run.sample_at == [5, 10]
    fresh = study.line(run, "cpu", threads=3)
    assert fresh.startswith(f"cd {study.ROOT} && export OMP_NUM_THREADS=3 && rm -f {run.dir / 'log.jsonl'} && ")
    assert f"train.py --config {run.dir / 'train.json'} --device cpu --no-progress &&" in fresh
    assert fresh.count("sample.py --run") == 2 and fresh.endswith(f"-m apla.study measure {run.dir} --device cpu")
    fake_checkpoint(run, 5)
    resumed = study.line(run, "cpu")
    assert "--no-progress --resume &&" in resumed and "rm -f" not in resumed
    fake_checkpoint(run, 10)
    (run.dir / "samples" / "step-000005").mkdir(parents=True)
    (run.dir / "samples" / "step-000005" / "metrics.json").write_text("{}")
    rest = study.line(run, "cpu")
    assert "train.py" not in rest and rest.count("sample.py") == 1
    assert f"--out {run.dir / 'samples' / 'step-000010'}" in rest
    (run.dir / "measures.json").write_text("{}")
    assert study.line(run, "cpu") is None


def test_shards_split_the_whole_plan_and_never_share_a_run(tmp_path):
    clips = [study.Clip(f"c{i}", "bigbuckbunny", "a rabbit", ["a tiger"]) for i in range(2)]
    runs = study.plan(tmp_path, clips, [0, 1], list(study.variants()), "micro", [5, 10], 3)
    shards = [study.shard(runs, i, 3) for i in range(3)]
    assert sorted(str(r.dir) for s in shards for r in s) == sorted(str(r.dir) for r in runs)
    assert [r.config["max_steps"] for r in study.schedule(runs)] == sorted((r.config["max_steps"] for r in runs),
                                                                           reverse=True)
    (shards[0][0].dir).mkdir(parents=True)
    (shards[0][0].dir / "measures.json").write_text("{}")  # a finished run does not move the others between shards
    assert [study.shard(runs, i, 3) for i in range(3)] == shards


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
        main(["plan", "--clips", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_flags_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    for argv in (["plan", "--variants", "nope", *out], ["plan", "--seeds", "a,b", *out],
                 ["plan", "--steps", "0", *out], ["plan", "--shard", "3/2", *out], ["plan", "--threads", "0", *out],
                 ["run", "--jobs", "0", *out], ["report", *out], ["measure", str(tmp_path)], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (argv, err)
    assert not any(tmp_path.iterdir())  # nothing planned on bad input


def test_the_plan_refuses_without_the_repositorys_scripts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "ROOT", tmp_path)
    with pytest.raises(SystemExit) as e:
        study.check_scripts()
    assert e.value.code == 2 and "train.py and sample.py are not beside" in capsys.readouterr().err


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the worktree's apla, whatever is installed


def study_command(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apla.study", *argv], env=ENV, capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """python -m apla.study run --quick --jobs 2: the built-in executor, from a folder outside the repository."""
    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib (a dev extra)")
    cwd = tmp_path_factory.mktemp("builtin")
    done = study_command("run", "--quick", "--jobs", "2", "--out", str(cwd / "study"), cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return cwd / "study"


@pytest.fixture(scope="module")
def quick_pool(tmp_path_factory):
    """The quick plan's lines run by a plain process pool, then python -m apla.study report --quick."""
    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib (a dev extra)")
    cwd = tmp_path_factory.mktemp("pool")
    planned = study_command("plan", "--quick", "--out", str(cwd / "study"), cwd=cwd)
    assert planned.returncode == 0, planned.stderr[-2000:]
    lines = planned.stdout.splitlines()
    assert len(lines) == 4
    with ProcessPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(partial(subprocess.run, shell=True, capture_output=True, text=True, cwd=cwd), lines))
    assert all(d.returncode == 0 for d in done), [d.stderr[-2000:] for d in done if d.returncode]
    again = study_command("plan", "--quick", "--out", str(cwd / "study"), cwd=cwd)
    assert again.returncode == 0 and again.stdout == ""  # every run finished: nothing left to plan
    reported = study_command("report", "--quick", "--out", str(cwd / "study"), cwd=cwd)
    assert reported.returncode == 0, reported.stderr[-2000:]
    return cwd / "study"


def tables(report: str) -> list[str]:
    """The report above the hand-written part, less what states wall time, load, the command or step times."""
    kept, cost = [], False
    for ln in report.split(HAND_MARK)[0].splitlines():
        cost = ln.startswith("## ‖φ‖") or (cost and not ln.startswith("## "))
        if ln and not cost and not ln.startswith(("Made by", "Tables rebuilt")):
            kept.append(ln)
    return kept


def test_any_executor_of_the_plan_gives_the_same_report(quick_run, quick_pool):
    pool, builtin = (d / "REPORT.md" for d in (quick_pool, quick_run))
    assert "Made by" not in pool.read_text() and "Made by" in builtin.read_text()
    assert tables(pool.read_text()) == tables(builtin.read_text())
    assert len(tables(pool.read_text())) > 50  # the tables themselves (blank lines left out), not an empty remainder
    assert (quick_pool / "grid.png").read_bytes() == (quick_run / "grid.png").read_bytes()


def test_quick_study_end_to_end(quick_run):
    """python -m apla.study run --quick: three variants on one clip and seed, trained, sampled, measured, reported;
    a second call finds every run finished and keeps the report's hand-written tail."""
    out = quick_run
    report = (out / "REPORT.md").read_text()
    heads = [ln for ln in report.splitlines() if ln.startswith("## ")]
    assert heads == ["## Setup", "## Core variants on every clip, 1 steps", "## Core variants on every clip, 2 steps",
                     "## Table 3's other rows and Table 1's VGT versions, 1 steps",
                     "## Does the discriminator do anything?", "## ‖φ‖ / ‖ε_θ‖ over training (Fig. 5b), and cost",
                     "## Frames"]
    assert report.splitlines()[4] == "Primary endpoint: `apla.eval.metrics.source_deviation`"
    assert "Made by `python -m apla.study run --quick --jobs 2" in report and report.rstrip().endswith(HAND_MARK)
    core = report.split("## Core variants on every clip, 2 steps")[1].split("## ")[0]
    rows = [ln for ln in core.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0].startswith("| measure | source clip | VAE round trip | Tune-A-Video | full | capacity control |")
    labels = [r.split(" | ")[0][2:] for r in rows[1:]]
    assert labels == ["source deviation (primary) ↓", "edited attribute right (% of frames) ↑",
                      "unedited attribute kept (% of frames) ↑", "centroid path error (px) ↓",
                      "colour flicker (RGB, 0-255) ↓", "size flicker (px) ↓", "FCI ↓", "warping error (×1000) ↓",
                      "micro-CLIP frame consistency ↑", "micro-CLIP text alignment ↑", "PSNR of the source prompt (dB) ↑"]
    assert all(len(r.split(" | ")) == len(rows[0].split(" | ")) for r in rows)
    assert "(primary)" in rows[1] and rows[1].split(" | ")[1] == "0.000"  # the source's own deviation
    assert "| full | 2 |" in report and "| VGT-Hyper | 1 |" in report  # D's diagnostics at each checkpoint
    grid = Image.open(out / "grid.png")
    assert grid.size == (150 + 5 * 64 * 2, 4 * 64 * 2)  # the source clip and 3 core variants, 5 frames each
    csv_rows = study_report.read_csv(out / "results.csv")
    assert {r["variant"] for r in csv_rows} == {"Tune-A-Video", "full", "capacity control", "VGT-Hyper",
                                                "source clip", "VAE round trip"}
    runs = sorted(out.glob("runs/*/*/seed-0/measures.json"))
    assert len(runs) == 4
    for path in runs:
        m = json.loads(path.read_text())
        assert {s["kind"] for s in m["samples"]} == {"source", "colour", "shape"}
        assert len(m["phi_ratio"]) == m["sample_at"][-1]
        for d in m["diagnostics"]:
            if "d_accuracy" in d:
                assert 0 <= d["d_accuracy"] <= 1 and 0 < d["grad_share"] < 1 and d["grad_adv"] > 0
    (out / "REPORT.md").write_text(report + "Our reading.\n")
    again = study_command("run", "--quick", "--jobs", "2", "--out", str(out), cwd=out.parent)
    assert again.returncode == 0 and "(4 already finished)" in again.stderr
    assert (out / "REPORT.md").read_text().endswith(HAND_MARK + "\nOur reading.\n")
