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

A network's data flow, recorded from a real forward pass and drawn from that record (nothing listed by hand):

    calls = trace(sd.unet, z_t, t, context, level=2)   # every block's call: name, class, output shape, what it read
    draw(calls)                                         # boxes by call order and resolution, arrows for the data flow
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

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


# ---- a network's data flow: what each block computes, from what, at which shape ------------------------------

@dataclass
class Call:
    """One call of a traced block: its dotted `name` in the model, its class (`kind`), the shape of its (first)
    output, and `reads`: the blocks, or the model's arguments by name, whose outputs its computation used."""

    name: str
    kind: str
    shape: tuple
    reads: list[str] = field(default_factory=list)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _Origins(TorchFunctionMode):
    """Follows every torch operation: each result is marked with the origins of its operands (the traced blocks or
    model arguments it was computed from), and each operand's origins count as read by the block now running. So a
    skip tensor a block pops from a list and concatenates is read; one it is handed but never touches is not."""

    def __init__(self):
        super().__init__()
        self.marks = {}  # id(tensor) -> (weak reference to it, its origins); ids of freed tensors are not trusted
        self.running: list[set] = []  # the reads of the traced block being run (at most one: blocks do not nest)

    def of(self, obj) -> set:
        found = set()
        for x in _tensors(obj):
            ref, names = self.marks.get(id(x), (None, ()))
            if ref is not None and ref() is x:
                found |= names
        return found

    def mark(self, obj, names) -> None:
        for x in _tensors(obj):
            self.marks[id(x)] = (weakref.ref(x), frozenset(names))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        origins = self.of((args, kwargs))
        if origins:
            if self.running:
                self.running[-1] |= origins
            self.mark(out, origins)
        return out


def blocks(model: torch.nn.Module, level: int = 1) -> dict:
    """{dotted name: module} of what a trace at `level` records: the model's children (a ModuleList stands for its
    entries), each block that holds ModuleLists opened into its children `level - 1` more times. For the U-Net,
    level 1 is conv_in, time_embedding, each down block, the mid block, each up block, the output layers; level 2
    opens the blocks into their ResNet blocks, spatial transformers and resamplers."""
    def opened(prefix, module):  # its children, a ModuleList standing for its entries
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList):
                yield from ((f"{prefix}{name}.{i}", m) for i, m in enumerate(child))
            else:
                yield f"{prefix}{name}", child

    found = dict(opened("", model))
    for _ in range(level - 1):
        holds_lists = lambda m: any(isinstance(c, torch.nn.ModuleList) for c in m.children())
        found = dict(kv for name, m in found.items()
                     for kv in (opened(f"{name}.", m) if holds_lists(m) else [(name, m)]))
    return found


def trace(model: torch.nn.Module, *args, level: int = 1, **kwargs) -> list[Call]:
    """Run `model(*args, **kwargs)` once, without gradients, and record each block of `blocks(model, level)` in the
    order it runs: its output shape and what it read (the model's tensor arguments are named as its forward names
    them). The model is left as it was."""
    mode, calls, hooks = _Origins(), [], []
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def record(name, module, inputs, output):
        calls.append(Call(name, type(module).__name__, tuple(next(_tensors(output)).shape), sorted(mode.running.pop())))
        mode.mark(output, {name})  # what reads it from now on reads this block

    for name, module in blocks(model, level).items():
        hooks.append(module.register_forward_pre_hook(lambda module, inputs: mode.running.append(set())))
        hooks.append(module.register_forward_hook(functools.partial(record, name)))
    try:
        with torch.no_grad(), mode:
            for name, value in bound.arguments.items():
                mode.mark(value, {name})
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def draw(calls: list[Call], ax=None, fanout: int = 3):
    """A block diagram of a trace: one box per call, coloured by class, left to right in call order and lower the
    smaller its output's spatial size (so a U-Net draws a U), its output shape inside (C over h×w; the batch left
    out), the parent block's name under its boxes; an arrow for each output read by at most `fanout` calls (solid to
    the next box, dashed and arched for a skip), and a dot on each call that reads a model argument or a widely read
    output (the time embedding, the text). Needs matplotlib (the `plots` extra)."""
    try:
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyBboxPatch, Patch
    except ImportError as e:
        raise ImportError("apla.show.draw needs matplotlib: pip install matplotlib") from e
    if ax is None:
        ax = plt.subplots(figsize=(max(6.0, 0.5 * len(calls)), 3.6))[1]
    names = [c.name for c in calls]
    sizes = {c.name: c.shape[-1] for c in calls if len(c.shape) == 4}
    top = max(sizes.values(), default=1)
    y = {n: 1.0 - (top // sizes[n]).bit_length() if n in sizes else 1.0 for n in names}  # 0, -1, ... halving
    readers = {r: sum(r in c.reads for c in calls) for c in calls for r in c.reads}
    dots = sorted(r for r, k in readers.items() if r not in names or k > fanout)
    kinds = list(dict.fromkeys(c.kind for c in calls))
    face = dict(zip(kinds, plt.get_cmap("Pastel1").colors + plt.get_cmap("Pastel2").colors))
    dot = dict(zip(dots, plt.get_cmap("Dark2").colors))
    for i, c in enumerate(calls):
        ax.add_patch(FancyBboxPatch((i - 0.4, y[c.name] - 0.25), 0.8, 0.5, boxstyle="round,pad=0.02",
                                    fc=face[c.kind], ec="#555", lw=0.6))
        shape = f"{c.shape[1]}\n{c.shape[2]}×{c.shape[3]}" if len(c.shape) == 4 else ", ".join(map(str, c.shape[1:]))
        ax.text(i, y[c.name], shape, ha="center", va="center", fontsize=6)
        for k, r in enumerate(r for r in dots if r in c.reads):
            ax.plot(i - 0.25 + 0.17 * k, y[c.name] + 0.36, "o", ms=3.5, c=dot[r])
        for r in (r for r in c.reads if r in names and r not in dots):
            j = names.index(r)
            if j == i - 1:  # the main path: side to side
                tail, head, style = (j + 0.4, y[r]), (i - 0.4, y[c.name]), dict(ls="-")
            else:  # a skip: top to top, arched
                tail, head = (j, y[r] + 0.3), (i, y[c.name] + 0.3)
                style = dict(ls="--", connectionstyle="arc3,rad=-0.2")
            ax.annotate("", head, tail, arrowprops=dict(arrowstyle="->", lw=0.7, color="#333", **style))
    groups = {}  # parent block -> its boxes' positions
    for i, n in enumerate(names):
        groups.setdefault(n.rsplit(".", 2)[0] if n.count(".") >= 2 else n, []).append(i)
    for g, xs in groups.items():
        ax.text(sum(xs) / len(xs), min(y[names[i]] for i in xs) - 0.34, g, ha="center", va="top", fontsize=6,
                rotation=0 if len(xs) > 1 else 90)
    handles = [Patch(fc=face[k], ec="#555", label=k) for k in kinds]
    handles += [plt.Line2D([], [], ls="", marker="o", ms=3.5, c=dot[r], label=f"reads {r}") for r in dots]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6.5, frameon=False)
    ax.set_xlim(-0.6, len(calls) - 0.4)
    ax.set_ylim(min(y.values()) - 0.8, max(y.values()) + 0.6)
    ax.axis("off")
    return ax
