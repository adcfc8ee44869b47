"""The library's own code on a notebook's page.

    from apla.show import show
    show(apla.vgt.perturbed_eps)                       # the whole function, as it is in apla/vgt.py now
    show(apla.vgt.VGT.forward, start="z_s =", end="return")   # the lines that matter of a long body
    show(apla.losses.hyper_loss, docstring=False)      # the code alone

    show(apla.vgt.VGT)                                 # a class: its whole source
    vgt_diagram(vgt, vgt(z_t, t, return_intermediates=True))   # VGT drawn from a model and one forward pass

The notebooks never copy the library's code (tests/test_notebooks.py forbids it); they render it from the source
file with `inspect`, so what a student reads is what runs, and a notebook run after a change shows the change. The
result is shown by Jupyter (and by a repository page) as a highlighted Python block under a line naming the object,
its file and its line numbers; elided lines are marked `# ⋮ n lines ...`. It needs no IPython: any object with a
`_repr_markdown_` is rendered by Jupyter, and `str(show(f))` is the same block as plain text with line numbers.
Drawings are `Diagram`s, boxes on a grid joined by labelled arrows, which Jupyter renders as SVG (written here by
hand: the runtime has no plotting library).
"""
from __future__ import annotations

import ast
import html
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
