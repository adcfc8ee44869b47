"""The README: its equation index (every function exists, cites its equation and names an existing test), its
install and test commands (what CI runs), the package metadata beside requirements.txt, and the README and the
projects' READMEs as guides (short, every link, code name, command and flag of theirs working)."""
import importlib
import itertools
import re
import shlex
import subprocess
import sys
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


def program(command: str) -> tuple[str, ...]:
    """What a command runs: the script or `-m module`, and its subcommands (lower-case words before any flag)."""
    words = shlex.split(command)[1:]
    head = words[:2] if words[0] == "-m" else words[:1]
    rest = words[len(head):]
    subs = [w for w in itertools.takewhile(lambda w: re.fullmatch(r"[a-z][a-z-]*", w), rest)]
    return (*head, *subs)


def test_program_and_flags_of_a_command():
    assert program("python -m apla.study plan --quick --out D") == ("-m", "apla.study", "plan")
    assert program("python -m apla.eval runs/apla/samples --source red-circle-right") == ("-m", "apla.eval")
    assert program("python train.py --max-steps 3") == ("train.py",)


def test_every_command_of_the_guides_answers_help_and_knows_its_flags():
    """Each program the guides run answers --help, and every flag a guide gives it is one its help lists."""
    flags = {}
    for guide in GUIDES:
        for command in commands(guide.read_text(encoding="utf-8")):
            flags.setdefault(program(command), set()).update(re.findall(r"(?<!\S)(--[a-z][\w-]*)", command))
    assert ("train.py",) in flags and ("sample.py",) in flags
    runs = {prog: subprocess.Popen([sys.executable, *prog, "--help"], cwd=README.parent, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for prog in flags}
    for prog, p in runs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0 and "usage:" in out, f"{' '.join(prog)} --help: exit {p.returncode}\n{out[-2000:]}"
        unknown = sorted(f for f in flags[prog] if f not in out)
        assert not unknown, f"the guides give {' '.join(prog)} flags its --help does not list: {unknown}"
