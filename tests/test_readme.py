"""The README: its equation index (every function exists, cites its equation and names an existing test), its
install and test commands (what CI runs) and the package metadata beside requirements.txt."""
import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def equation_rows():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Equations", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*Eq\.\s*(\d+)\s*\|\s*`([\w.]+)`\s*\|\s*`([\w/.]+)::(\w+)`\s*\|", section, flags=re.M)
    return [(int(n), dotted, path, test) for n, dotted, path, test in rows]


def resolve(dotted):
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def test_equation_table_is_complete_and_ordered():
    numbers = [n for n, *_ in equation_rows()]
    assert numbers, "no equation rows found in README"
    assert numbers == sorted(set(numbers)), "one row per equation, in order"
    assert numbers == list(range(1, 21)), "the paper's Eqs. 1-20, one row each, without gaps"


def test_every_indexed_function_cites_its_equation():
    for n, dotted, *_ in equation_rows():
        fn = resolve(dotted)
        assert callable(fn), dotted
        doc = fn.__doc__ or ""
        assert re.search(rf"Eq\. \({n}\)", doc), f"{dotted} docstring does not cite Eq. ({n})"


def test_every_indexed_equation_names_an_existing_test():
    import ast

    for n, _, path, test in equation_rows():
        file = README.parent / path
        assert file.is_file(), f"Eq. {n}: {path} does not exist"
        names = {f.name for f in ast.walk(ast.parse(file.read_text())) if isinstance(f, ast.FunctionDef)}
        assert test in names and test.startswith("test_"), f"Eq. {n}: no test {test} in {path}"


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    readme = README.read_text()
    test_cmd = readme.split("## Test", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert test_cmd in ci.splitlines(), f"{test_cmd!r} is not a line of .ci/run"


def test_pyproject_dependencies_mirror_requirements_txt():
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    lines = [ln.split("#")[0].strip() for ln in (README.parent / "requirements.txt").read_text().splitlines()]
    assert project["dependencies"] == [ln for ln in lines if ln]
    assert "av" in project["optional-dependencies"]["video"]


def test_readme_install_command_is_what_ci_installs():
    ci = (README.parent / ".ci" / "run").read_text()
    install = README.read_text().split("## Install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = install.split("#")[0].strip()
    assert any(line.endswith(command.removeprefix("pip ")) for line in ci.splitlines()), command


# ---------------------------------------------------------------------------------------------------------------
# The README as a guide: short, narrow, every link and command of it (and of the projects' READMEs) working
# ---------------------------------------------------------------------------------------------------------------
GUIDES = [README, *sorted((README.parent / "apla").glob("*/README.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def test_readme_is_a_short_guide():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    wide = [line for line in prose_lines(text) if len(line) > 120]
    assert not wide, f"lines over 120 columns: {wide}"


def test_every_relative_link_of_the_guides_exists():
    for guide in GUIDES:
        for target in re.findall(r"\]\(([^)\s]+)\)", guide.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (guide.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{guide.relative_to(README.parent)} links to {target}, which does not exist"


def commands(text: str) -> list[str]:
    """Every `python ...` command of a guide: lines of its bash blocks (continuations joined, comments dropped,
    pipelines split) and inline code spans."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found += [re.sub(r"\s+\d?>.*$", "", c) for c in re.split(r"\s*(?:\||&&|;)\s*", line.split(" #")[0])]
    found += re.findall(r"`(python [^`]+)`", text)
    return sorted({c.strip() for c in found if c.strip().startswith("python ")})


def test_commands_helper_finds_commands():
    text = "```bash\npython a.py --x 1 \\\n  --y 2   # comment\nls | python -m b c && python d.py > out.txt\n```\n`python e.py`"
    assert commands(text) == ["python -m b c", "python a.py --x 1    --y 2", "python d.py", "python e.py"]


def test_every_command_of_the_guides_answers_help():
    import shlex
    import subprocess
    import sys

    cmds = sorted({c for guide in GUIDES for c in commands(guide.read_text(encoding="utf-8"))})
    assert any(c.startswith("python train.py") for c in cmds) and any(c.startswith("python sample.py") for c in cmds)
    runs = {c: subprocess.Popen([sys.executable, *shlex.split(c)[1:], "--help"], cwd=README.parent, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in cmds}
    for c, p in runs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0 and "usage:" in out, f"{c} --help: exit {p.returncode}\n{out[-2000:]}"


def test_every_code_name_the_readme_points_to_exists():
    """Each `apla.x.y` the README names resolves, and each path of ours it names (`apla/...`, `*.py`) exists."""
    text = README.read_text(encoding="utf-8")
    for name in re.findall(r"`(apla(?:\.\w+)+)`", text):
        resolve(name)
    for path in re.findall(r"`((?:apla|tests|notebooks)/[\w/.]*|\w+\.py)`", text):
        assert (README.parent / path).exists() or (README.parent / "apla" / path).exists(), path
