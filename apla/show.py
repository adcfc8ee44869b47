"""The library's own code on a notebook's page.

    from apla.show import show
    show(apla.vgt.perturbed_eps)                       # the whole function, as it is in apla/vgt.py now
    show(apla.vgt.VGT.forward, start="z_s =", end="return")   # the lines that matter of a long body
    show(apla.losses.hyper_loss, docstring=False)      # the code alone

The notebooks never copy the library's code (tests/test_notebooks.py forbids it); they render it from the source
file with `inspect`, so what a student reads is what runs, and a notebook run after a change shows the change. The
result is shown by Jupyter (and by a repository page) as a highlighted Python block under a line naming the object,
its file and its line numbers; elided lines are marked `# ⋮ n lines ...`. It needs no IPython: any object with a
`_repr_markdown_` is rendered by Jupyter, and `str(show(f))` is the same block as plain text with line numbers.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ELIDED = "# ⋮"  # the start of a line that stands for lines left out (tests/test_notebooks.py reads it)
MARK = "<!-- apla.show {} -->"  # invisible in the rendered page; names what is shown, for the notebooks' test


@dataclass
class Source:
    """Lines of one function, class or method as its file holds them: `name` (module.qualname), `path` (relative
    to the repository), `numbers` (the file's line number of each shown line, None for an elision marker)."""

    name: str
    path: str
    lines: list[str]
    numbers: list[int | None]

    @property
    def code(self) -> str:
        return "\n".join(self.lines)

    def _repr_markdown_(self) -> str:
        shown = [n for n in self.numbers if n is not None]
        where = f"`{self.path}`, lines {shown[0]}–{shown[-1]}" if shown else f"`{self.path}`"
        return f"{MARK.format(self.name)}\n**`{self.name}`** · {where}\n\n```python\n{self.code}\n```"

    def __str__(self) -> str:
        width = len(str(max((n for n in self.numbers if n), default=0)))
        body = [f"{'' if n is None else n:>{width}}  {line}" for n, line in zip(self.numbers, self.lines)]
        return "\n".join([f"{self.name} ({self.path})", *body])

    __repr__ = __str__


def _body(lines: list[str]) -> tuple[int, range]:
    """Of a dedented definition's lines: the 0-based index of its body's first line (the signature is above it),
    and the indices of its docstring (empty if it has none)."""
    first = ast.parse("\n".join(lines)).body[0].body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.lineno - 1, range(first.lineno - 1, first.end_lineno)
    return first.lineno - 1, range(0)


def _find(lines: list[str], text: str, after: int, what: str) -> int:
    for i in range(after, len(lines)):
        if text in lines[i]:
            return i
    raise ValueError(f"show: no line containing {text!r} {what}")


def show(obj, start: str | None = None, end: str | None = None, docstring: bool = True) -> Source:
    """The source of `obj` (a function, method or class of apla) as a `Source` that Jupyter renders.

    start, end: show only the lines from the first containing `start` to the first after it containing `end`
    (each included); the signature line(s) stay above them, the rest is marked as elided. docstring=False leaves
    the docstring out (marked as elided)."""
    obj = inspect.unwrap(obj)
    raw, first = inspect.getsourcelines(obj)
    lines = textwrap.dedent("".join(raw)).rstrip("\n").split("\n")
    keep = [True] * len(lines)
    head, doc = _body(lines)
    if not docstring:
        for i in doc:
            keep[i] = False
    if start is not None or end is not None:
        lo = _find(lines, start, head, f"in {obj.__qualname__}") if start is not None else head
        hi = _find(lines, end, lo, f"after {start!r} in {obj.__qualname__}") if end is not None else len(lines) - 1
        keep = [k and (i < head or lo <= i <= hi) for i, k in enumerate(keep)]
    shown, numbers, i = [], [], 0
    while i < len(lines):
        if keep[i]:
            shown.append(lines[i])
            numbers.append(first + i)
            i += 1
            continue
        j = i
        while j < len(lines) and not keep[j]:
            j += 1
        indent = next((ln[: len(ln) - len(ln.lstrip())] for ln in lines[i:j] if ln.strip()), "")
        what = "docstring" if docstring is False and set(range(i, j)) <= set(doc) else "not shown"
        shown.append(f"{indent}{ELIDED} {j - i} line{'s' * (j - i != 1)} {what}")
        numbers.append(None)
        i = j
    path = Path(inspect.getsourcefile(obj)).resolve()
    try:
        path = path.relative_to(ROOT)
    except ValueError:
        pass
    return Source(f"{obj.__module__}.{obj.__qualname__}", path.as_posix(), shown, numbers)
