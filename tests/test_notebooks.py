"""The notebooks: each runs top to bottom on CPU and is committed with the outputs that run produces (so its figures
show on a repository page); the paper's Eqs. 1-20 are each named in some notebook's markdown beside the function the
README's equation table gives it; and the notebooks import the package instead of rewriting it (no function longer
than a few lines, no class, no sys.path)."""
import ast
import copy
import os
import re
from pathlib import Path

import pytest

from tests.test_readme import equation_rows

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_DEF_LINES = 5  # a helper in a notebook is a few lines of plotting or probing; anything longer belongs in apla/
MAX_TOTAL_BYTES = 3 * 2**20  # the committed notebooks with their figures, all together
INLINE = "module://matplotlib_inline.backend_inline"  # figures become outputs, as in Jupyter


def read(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def shown(cell) -> tuple[bool, int]:
    """(whether the cell shows anything besides stderr, how many images it shows). stderr is left out: a warning one
    environment prints and another does not is not an output the notebook is committed for."""
    outputs = [o for o in cell.get("outputs", []) if not (o.output_type == "stream" and o.name == "stderr")]
    images = sum(any(k.startswith("image/") for k in o.get("data", {})) for o in outputs)
    return bool(outputs), images


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_is_committed_with_its_outputs(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", INLINE)
    # the kernel imports this checkout's apla, whatever an installed copy points at (the notebooks need no path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # one torch thread unless told otherwise: the models are small, and on a shared machine a second thread that
    # waits for a busy core costs far more than it gains
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    committed = read(path)
    nb = copy.deepcopy(committed)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in code_cells(nb) for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    for i, (ran, kept) in enumerate(zip(code_cells(nb), code_cells(committed))):
        (ran_any, ran_images), (kept_any, kept_images) = shown(ran), shown(kept)
        where = f"{path.name}, code cell {i}: {ran.source.splitlines()[0] if ran.source else ''!r}"
        assert kept_any or not ran_any, f"{where} shows output when run but is committed without it"
        assert kept_images == ran_images, f"{where} shows {ran_images} figure(s) when run, {kept_images} committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_outputs_come_from_one_run_top_to_bottom(path):
    cells = code_cells(read(path))
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: execution counts {counts}; re-run it top to bottom"
    errors = [o for c in cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name} is committed with an error output"
    assert any(shown(c)[1] for c in cells), f"{path.name} is committed without a single figure"


def test_every_equation_is_named_beside_its_function():
    lines = [ln for p in NOTEBOOKS for c in read(p).cells if c.cell_type == "markdown" for ln in c.source.splitlines()]
    for n, dotted, *_ in equation_rows():
        assert any(re.search(rf"Eq\. \({n}\)", ln) and f"`{dotted}`" in ln for ln in lines), (
            f"no notebook's markdown has a line naming Eq. ({n}) beside `{dotted}` (the README's function for it)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_imports_the_package_and_rewrites_none_of_it(path):
    sources = [c.source for c in code_cells(read(path))]
    assert any(re.search(r"^\s*(import apla|from apla[ .])", s, flags=re.M) for s in sources), f"{path.name} never imports apla"
    for i, source in enumerate(sources):
        assert "sys.path" not in source, f"{path.name}, code cell {i}: the notebooks import apla without path tricks"
        python = "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!")))  # no magics
        for node in ast.walk(ast.parse(python)):
            assert not isinstance(node, ast.ClassDef), f"{path.name}, code cell {i}: class {node.name} (models live in apla/)"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno
                assert length <= MAX_DEF_LINES, (f"{path.name}, code cell {i}: def {node.name} has a {length}-line body; "
                                                 f"a notebook helper stays within {MAX_DEF_LINES} lines, longer code belongs in apla/")


def test_committed_notebooks_stay_small():
    total = sum(p.stat().st_size for p in NOTEBOOKS)
    assert total < MAX_TOTAL_BYTES, f"the notebooks take {total / 2**20:.1f} MiB; keep figures small (JPEG, modest size)"


# ---- the code on the page (apla.show): every equation function shown, from the source as it is now -------------
MAX_MARKDOWN_LINES = 15  # a cell a student reads at once; a longer story is several cells, each before its code


def shown_sources(nb) -> dict[str, list[str]]:
    """{object name: its shown code lines} for every apla.show block in a notebook's outputs."""
    from apla.show import MARK

    found = {}
    for cell in code_cells(nb):
        for out in cell.get("outputs", []):
            md = out.get("data", {}).get("text/markdown", "")
            head = re.match(re.escape(MARK).replace(r"\{\}", r"(\S+)"), md)
            if head:
                found[head.group(1)] = md.split("```python\n", 1)[1].rsplit("\n```", 1)[0].split("\n")
    return found


def notebook_of(n: int, dotted: str) -> list[Path]:
    """The notebooks whose markdown names Eq. (n) beside `dotted` on one line."""
    return [p for p in NOTEBOOKS if any(re.search(rf"Eq\. \({n}\)", ln) and f"`{dotted}`" in ln
                                        for c in read(p).cells if c.cell_type == "markdown" for ln in c.source.splitlines())]


def test_every_equation_function_is_shown_in_its_notebook_and_names_its_test():
    for n, dotted, path, test in equation_rows():
        homes = notebook_of(n, dotted)
        showing = [p for p in homes if dotted in shown_sources(read(p))]
        assert showing, f"Eq. ({n}): no notebook naming it beside `{dotted}` shows its source (apla.show.show)"
        for p in showing:
            text = "\n".join(c.source for c in read(p).cells if c.cell_type == "markdown")
            assert f"{path}::{test}" in text, f"{p.name} shows Eq. ({n})'s `{dotted}` but never names its test {path}::{test}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_shown_source_is_the_source_as_it_is_now(path):
    """Each apla.show block's lines stand, in order, in the object's source today (so a notebook that shows a function
    is re-run when the function changes)."""
    import inspect
    import textwrap

    from apla.show import ELIDED
    from tests.test_readme import resolve

    for name, lines in shown_sources(read(path)).items():
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(resolve(name)))).rstrip("\n").split("\n")
        it = iter(source)
        missing = [ln for ln in lines if not ln.strip().startswith(ELIDED) and not any(ln == s for s in it)]
        assert not missing, f"{path.name} shows {name} as it no longer is (re-run the notebook): {missing[0]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_cells_a_student_can_follow(path):
    """No markdown cell over MAX_MARKDOWN_LINES lines; no temporary path in any output."""
    nb = read(path)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "markdown":
            n = len(c.source.strip().splitlines())
            assert n <= MAX_MARKDOWN_LINES, f"{path.name}, cell {i}: a {n}-line markdown cell (at most {MAX_MARKDOWN_LINES})"
    for i, c in enumerate(code_cells(nb)):
        for out in c.get("outputs", []):
            text = out.get("text", "") + "".join(v for k, v in out.get("data", {}).items() if k.startswith("text/"))
            assert "/tmp/" not in text and "/var/folders/" not in text, f"{path.name}, code cell {i} prints a temporary path"
