"""The package's layout: a library a student reads and projects that use it (README "Read the code").

Read from the source with `ast`, imports inside functions included: the library never imports a project, no two
files import each other (directly or round a longer circle), an import inside a function is only for an optional
dependency, and `apla/__init__.py`'s docstring names every file of the library in its reading order.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "apla"
PROJECTS = ("apla.micro", "apla.study", "apla.bench")
SCRIPTS = ("train.py", "sample.py")
# Imported inside a function on purpose: optional extras (pyproject.toml), what only a test needs, and transformers
# (with the hub client it brings), whose import takes seconds; each such import says why where it is made.
OPTIONAL = ("av", "matplotlib", "diffusers", "cv2", "transformers", "huggingface_hub", "torch.utils.tensorboard")
# Imported inside a function on purpose, with the reason written where it is done: transformers is slow to import.
LAZY = {("apla/__init__.py", "apla.sd.weights"), ("apla/__init__.py", "apla.sd.text"),
        ("apla/__init__.py", "apla.sampling")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    files.update({name.removesuffix(".py"): ROOT / name for name in SCRIPTS})
    return files


def is_library(module: str) -> bool:
    return module.startswith("apla") and not module.startswith(PROJECTS)


def imports(path: Path, modules) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of `path`; `from a import b` names the module
    a.b when that is a module of ours, else a."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        inner = id(node) in nested
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, inner) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports: none in this package; refuse rather than guess
                out.append((f"<relative import level {node.level}>", node.lineno, inner))
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in modules else node.module, node.lineno, inner))
    return out


def graph():
    files = source_files()
    edges = {m: set() for m in files}
    found = []
    for m, path in files.items():
        for target, line, inner in imports(path, files):
            found.append((m, path, target, line, inner))
            if target in files and target != m:
                edges[m].add(target)
    return files, edges, found


def test_the_library_never_imports_a_project():
    _, _, found = graph()
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}" for m, path, target, line, _ in found
           if is_library(m) and target.startswith(PROJECTS)]
    assert not bad, "the library imports a project:\n" + "\n".join(bad)


def cycles(edges: dict) -> list[list[str]]:
    """The strongly connected components of more than one file (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_files_import_each_other():
    _, edges, _ = graph()
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_inside_functions_are_only_for_optional_dependencies():
    _, _, found = graph()
    bad = []
    for m, path, target, line, inner in found:
        where = str(path.relative_to(ROOT))
        if inner and not target.startswith(OPTIONAL) and (where, target) not in LAZY:
            bad.append(f"{where}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_package_docstring_is_the_reading_order_of_the_library():
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8")))
    assert doc, "apla/__init__.py has no docstring"
    files, _, _ = graph()
    library = sorted(str(p.relative_to(PACKAGE)) for m, p in files.items()
                     if p.is_relative_to(PACKAGE) and is_library(m) and p.name != "__init__.py")
    missing = [f for f in library if f not in doc]
    assert not missing, f"apla/__init__.py's reading order does not name {missing}"
    for project in PROJECTS:
        folder = project.replace(".", "/").removeprefix("apla/")
        assert f"{folder}/" in doc, f"apla/__init__.py does not point to the project {folder}/"
        assert (PACKAGE / folder / "README.md").is_file(), f"{folder}/ has no README.md"
