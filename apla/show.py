"""The library on a notebook's page: its own code, and drawings made from its models.

    show(apla.vgt.perturbed_eps)                       # the whole function, as it is in apla/vgt.py now
    show(apla.vgt.VGT.forward, start="z_s =", end="return")   # the lines that matter of a long body
    show(apla.losses.hyper_loss, docstring=False)      # the code alone
    calls = trace(sd.unet, z_t, t, context, level=2)   # every block's call: name, class, output shape, what it read
    draw(calls)                                        # the U-Net's block diagram from that record (matplotlib)
    vgt_diagram(vgt, vgt(z_t, t, return_intermediates=True))   # VGT as the paper's Fig. 4, from a model (SVG)

The notebooks never copy the library's code (tests/test_notebooks.py forbids it); `show` renders it from the source
file with `inspect`, so what a student reads is what runs, and a notebook run after a change shows the change: a
highlighted Python block under a line naming the object, its file and its line numbers, elided lines marked
`# ⋮ n lines ...` (`str(show(f))` is the same as plain text). Nothing in a drawing is listed by hand but its layout:
`trace` records a real forward pass (the data flow between blocks, followed through every torch operation), and
`vgt_diagram` reads each box's sizes from the modules and each shape from one pass's intermediates; it is a
`Diagram`, boxes on a grid joined by labelled arrows that Jupyter renders as SVG written here, without matplotlib.
"""
from __future__ import annotations

import ast
import functools
import html
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


# ---------------------------------------------------------------------------------------------------------------
# Drawings: block diagrams made from a model, rendered as SVG
# ---------------------------------------------------------------------------------------------------------------
COLUMN, GAP, ROW, BOX, LINE, PAD = 360, 150, 84, 66, 14, 12  # px: column width, gap, row pitch, box height, text line
FILL = {"tensor": "#ececec", "spatial": "#dae8f5", "temporal": "#fde3c6", "fusion": "#dbeed6"}


@dataclass
class Box:
    """One block of a `Diagram`: its grid cell, a bold title and lines of detail; `kind` picks its colour (FILL)."""

    col: int
    row: int
    title: str
    lines: tuple[str, ...]
    kind: str

    @property
    def x(self) -> int:  # left side, px
        return PAD + self.col * (COLUMN + GAP)

    @property
    def y(self) -> int:  # top, px (below the diagram's title)
        return 2 * PAD + LINE + self.row * ROW


def _text(x: int, y: int, s: str, style: str = "") -> str:
    return f'<text x="{x}" y="{y}"{style}>{html.escape(s)}</text>'


@dataclass
class Diagram:
    """Boxes on a grid and arrows (from, to, label) between them. Jupyter renders it as SVG; `str` gives the same
    as text. An arrow runs down within a column, across within a row, else down from its source and across into
    its target's side."""

    title: str
    boxes: dict[str, Box]
    arrows: list[tuple[str, str, str]]

    def __str__(self) -> str:
        lines = [self.title] + [f"[{b.title}] " + " | ".join(b.lines) for b in self.boxes.values()]
        return "\n".join(lines + [f"{a} -> {b}" + (f": {label}" if label else "") for a, b, label in self.arrows])

    def _repr_svg_(self) -> str:
        cols, rows = (1 + max(getattr(b, k) for b in self.boxes.values()) for k in ("col", "row"))
        width, height = 2 * PAD + cols * (COLUMN + GAP) - GAP, 3 * PAD + LINE + rows * ROW - (ROW - BOX)
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12" '
               'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
               '<defs><marker id="head" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
               'orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>',
               '<rect width="100%" height="100%" fill="white"/>', _text(PAD, PAD + LINE - 2, self.title, ' font-weight="bold"')]
        for b in self.boxes.values():
            out.append(f'<rect x="{b.x}" y="{b.y}" width="{COLUMN}" height="{BOX}" rx="6" fill="{FILL[b.kind]}" stroke="#555"/>')
            out += [_text(b.x + 8, b.y + 4 + LINE * (i + 1), s, ' font-weight="bold"' if i == 0 else "")
                    for i, s in enumerate((b.title, *b.lines))]
        for a, b, label in self.arrows:
            a, b = self.boxes[a], self.boxes[b]
            if a.col == b.col:  # down: bottom centre to top centre
                x = a.x + COLUMN // 2
                points, at = [(x, a.y + BOX), (x, b.y)], (x + 6, (a.y + BOX + b.y) // 2 + 4)
            else:  # across into b's side: from a's side (same row), or down from a's bottom first
                y, into = b.y + BOX // 2, b.x + (COLUMN if b.col < a.col else 0)
                start = ([(a.x + (0 if b.col < a.col else COLUMN), y)] if a.row == b.row
                         else [(a.x + COLUMN // 2, a.y + BOX), (a.x + COLUMN // 2, y)])
                points, at = start + [(into, y)], (min(start[-1][0], into) + 6, y - 5)
            path = " ".join(f"{px},{py}" for px, py in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="#333" marker-end="url(#head)"/>')
            if label:
                out.append(_text(*at, label, ' font-size="11" fill="#333"'))
        return "\n".join(out + ["</svg>"])

    __repr__ = __str__


def _shape(x) -> str:
    return str(tuple(x.shape))


def vgt_diagram(vgt, out) -> Diagram:
    """VGT as the paper's Fig. 4 draws it, from a model (`apla.vgt.VGT`) and the `VGTIntermediates` of one forward
    pass of it: each box is one of its modules or equation functions, its sizes read from the module, and the shape
    of each tensor read from `out` (so the drawing is the model it was given, at the input it was given)."""
    c = vgt.config
    (BF, n, d), (B, f1, _) = out.z_s_0.shape, out.z_tmp_1.shape  # n = 1 + N tokens per frame, f1 = 1 + F

    def decoder(blocks, norm, k):
        mask = ("frame_mask" if c.per_frame and norm == "norm_t" else "decoder_mask") + f"({k})"
        return f"{len(blocks)} × DecoderBlock (LN, MMSA, {c.heads} heads), {norm}", (
            f"mask {mask}" if c.masked else "no mask (an encoder)")

    fc1, fc2 = vgt.head.fc1, vgt.head.fc2
    boxes = {
        "z_t": Box(0, 0, "input: the noisy latent video", (f"z_t {_shape(out.phi)}  (B, C, F, H, W)",), "tensor"),
        "embed": Box(0, 1, "patchify, patch_embed", (
            f"{c.patch_size}×{c.patch_size} patches, Linear({vgt.patch_embed.in_features} → {d})",
            f"frames into the batch: ({BF}, {n - 1}, {d})  (B·F, N, d)"), "spatial"),
        "tokens": Box(0, 2, "spatial_tokens · Eq. 9", (
            "[cls_s + emb(t), patches] + pos_s", f"z_s_0 {_shape(out.z_s_0)}  (B·F, 1+N, d)"), "spatial"),
        "spatial": Box(0, 3, "spatial decoder · Eq. 7", (
            *decoder(vgt.spatial, "norm_s", n), f"z_s_L {_shape(out.z_s_L)}"), "spatial"),
        "t_in": Box(1, 3, "temporal_input · Eq. 10", (
            "[cls_t, D(class tokens)] + pos_t", f"D: Linear({d} → {d})", f"z_tmp_1 {_shape(out.z_tmp_1)}  (B, 1+F, d)"),
            "temporal"),
        "temporal": Box(1, 4, "temporal decoder · Eq. 8", (
            *decoder(vgt.temporal, "norm_t", f1), f"z_tmp_M {_shape(out.z_tmp_M)}"), "temporal"),
        "t_out": Box(1, 5, "temporal_output · Eq. 11", (
            f"split off the class token z_cls,t^M ({B}, {d})", f"frame tokens z_tmp^(C,M) ({B}, {f1 - 1}, {d})"),
            "temporal"),
        "head": Box(0, 7, f"MLPHead · Eq. {15 if c.hyper else 13}", (
            f"Linear({fc1.in_features} → {fc1.out_features}), GELU, Linear({fc2.in_features} → {fc2.out_features})",
            f"z_hat {_shape(out.z_hat)}  (B, F, N, C·P·P)"), "fusion"),
        "phi": Box(0, 8, "unpatchify: VGT's output", (
            f"phi {_shape(out.phi)}, z_t's shape: ε* = ε_θ + phi (Eq. 4)",), "tensor"),
    }
    if c.hyper:
        k1, k2 = ("×".join(map(str, m.kernel_size)) for m in (vgt.fusion.conv1, vgt.fusion.conv2))
        boxes["fusion"] = Box(0, 6, "HyperBlock M · Eq. 14", (
            f"conv1: ConvTranspose3d({2 * d} → {d}, {k1}), GELU", f"conv2: ConvTranspose3d({d} → {d}, {k2})",
            f"y* {_shape(out.y)}  (B, F, N, d)"), "fusion")
        into = f"the whole z_tmp^M {_shape(out.z_tmp_M)}"
    else:
        boxes["fusion"] = Box(0, 6, "hadamard_fusion · Eq. 12", (
            "each frame's patch tokens ⊙ its frame token", f"y {_shape(out.y)}  (B, F, N, d)"), "fusion")
        into = f"frame tokens ({B}, {f1 - 1}, {d})"
    arrows = [("z_t", "embed", ""), ("embed", "tokens", ""), ("tokens", "spatial", ""),
              ("spatial", "t_in", f"class tokens ({B}, {f1 - 1}, {d})"), ("t_in", "temporal", ""),
              ("temporal", "t_out", ""), ("spatial", "fusion", f"patch tokens z_s^(C,L) {_shape(out.y)}"),
              ("t_out", "fusion", into), ("fusion", "head", ""), ("head", "phi", "")]
    count = sum(p.numel() for p in vgt.parameters())
    return Diagram(f"VGT, variant {c.variant!r}: {count:,} parameters (L = {len(vgt.spatial)}, M = {len(vgt.temporal)}, "
                   f"d = {d}, P = {c.patch_size})", boxes, arrows)
