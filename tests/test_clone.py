"""A clone used as it is: with only `pip install -r requirements.txt` (no `pip install -e .`), `python train.py`,
`python sample.py` and `python -m apla.eval` find every bundled name, the micro CLIP scorer and the shapes world's
measures included, which the installed package finds through its entry points (apla.eval.metrics.registered).

The commands run in a copy of this checkout, under a virtual environment that sees this interpreter's packages
but not the installed apla: `pip install -e .` puts a distribution's metadata (apla-*.dist-info, with
entry_points.txt) and an import finder with its .pth file (__editable__*apla*) into site-packages, and the
environment's site-packages links every other entry."""
import json
import os
import re
import shutil
import site
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_APLA = re.compile(r"apla|apla[-.].*|__editable__.*apla.*")  # a regular, egg or editable install's entries


def clone(to: Path) -> Path:
    """The files of this checkout as a clone has them (tracked, and new ones git does not ignore), copied to `to`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_symlink():  # notebooks/apla, the package seen from the notebooks' folder
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(source), to / name)
        elif source.is_file():  # (a tracked file deleted in the working tree is not copied)
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)
    return to


def environment_without_apla(root: Path) -> Path:
    """A virtual environment with this interpreter's packages (torch, transformers, ...: what requirements.txt
    installs) and no apla installed; returns its python."""
    venv.create(root, with_pip=False, symlinks=True)
    packages = Path(sysconfig.get_paths(vars={"base": str(root), "platbase": str(root)})["purelib"])
    ours = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    if site.ENABLE_USER_SITE:
        ours.add(site.getusersitepackages())
    for folder in filter(os.path.isdir, ours):
        for entry in Path(folder).iterdir():
            if not INSTALLED_APLA.fullmatch(entry.name) and not (packages / entry.name).exists():
                (packages / entry.name).symlink_to(entry)
    return root / "bin" / "python"


def run(python: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    done = subprocess.run([str(python), *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """(python of an environment without apla installed, a clone of this checkout)."""
    root = tmp_path_factory.mktemp("bare")
    return environment_without_apla(root / "env"), clone(root / "clone")


def test_the_bare_environment_has_no_apla_installed(bare):
    python, repo = bare
    probe = ("import importlib.metadata as m, importlib.util as u\n"
             "try:\n    m.distribution('apla'); print('installed')\nexcept m.PackageNotFoundError:\n"
             "    print('not installed' if u.find_spec('apla') is None else 'importable')")
    assert run(python, repo.parent, "-c", probe).stdout.strip() == "not installed"  # outside the clone: no apla
    assert run(python, repo, "-c", "import apla, torch; print(apla.__file__)").stdout.strip() == str(
        repo / "apla" / "__init__.py")


def test_a_clone_trains_samples_and_scores_with_the_micro_clip_without_installing(bare, tmp_path):
    """`python train.py && python sample.py` (cut short) write the samples with their micro-CLIP scores and the
    shapes world's measures, and `python -m apla.eval` scores a 64x64 GIF with the micro CLIP: all from the clone."""
    python, repo = bare
    run(python, repo, "train.py", "--max-steps", "2", "--no-progress")
    run(python, repo, "sample.py", "--steps", "2", "--no-progress")
    report = json.loads((repo / "runs" / "apla" / "samples" / "metrics.json").read_text())
    assert report["clip_model"] == "micro" and len(report["videos"]) == 3
    for row in report["videos"]:
        assert {"clip_frame_consistency", "clip_text_alignment", "path_error"} <= set(row["metrics"]), row

    gif = repo / "apla" / "assets" / "shapes_red_circle_right.gif"  # 64x64, 8 frames
    out = tmp_path / "report.json"
    table = run(python, repo, "-m", "apla.eval", str(gif), "--prompt", "a red circle moving to the right", "--json",
                str(out)).stdout
    scored = json.loads(out.read_text())
    assert scored["clip_model"] == "micro" and "micro-CLIP frames" in table
    assert {"clip_frame_consistency", "clip_text_alignment", "colour_flicker"} <= set(scored["videos"][0]["metrics"])


def test_the_notebooks_of_a_clone_import_its_apla_and_find_its_plugins(bare):
    """A notebook's kernel starts in notebooks/, where `notebooks/apla` (a link to ../apla) is the package: the
    clone's own apla, with the micro CLIP and the shapes measures found as from the clone's root."""
    python, repo = bare
    probe = ("import apla, apla.eval.metrics as m; from pathlib import Path; print(Path(apla.__file__).resolve()); "
             "print(sorted(m.registered('apla.clip_models')), sorted(m.registered('apla.measures')))")
    where, plugins = run(python, repo / "notebooks", "-c", probe).stdout.strip().splitlines()
    assert where == str((repo / "apla" / "__init__.py").resolve())
    assert plugins == "['micro'] ['shapes']"
