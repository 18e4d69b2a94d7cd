"""The package's layout: no import loops between its modules, no module over 500 lines, file I/O kept out of
the checkpoint seam. Reads the source with ``ast`` (nothing is imported), so it is cheap."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gmflow_jax"
MAX_LINES = 500


def module_files() -> dict[str, pathlib.Path]:
    """``{'gmflow_jax.data.images': path}`` of every module of the package (a package by its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (inside functions too)."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = (base or "").strip(".")
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    found.add(target)  # from package import module
                elif base in modules:
                    found.add(base)  # from module import name
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_loop_finder_finds_loops():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_every_import_form():
    graph = import_graph()
    assert "gmflow_jax.storage" in graph["gmflow_jax.checkpoint"]  # from gmflow_jax.storage import ...
    assert "gmflow_jax.checkpoint" in graph["gmflow_jax.sampling"]  # from gmflow_jax import checkpoint as ...
    assert "gmflow_jax.data.imagenet" in graph["gmflow_jax.data.sources"]  # inside a function


def test_no_two_modules_import_each_other():
    assert loops(import_graph()) == []


def test_checkpoint_holds_no_file_io_helpers():
    tree = ast.parse((PACKAGE / "checkpoint.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert "Checkpointer" in defined
    assert defined & {"write_npz", "open_npz", "copy_file", "check_writable", "workdir_path", "move"} == set()


def test_no_module_is_over_500_lines():
    files = module_files()
    assert len(files) > 50 and "gmflow_jax.sampling" in files  # the check sees the whole package
    lines = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}, "split these by job"
