"""The code's shape, checked: no function over 100 lines, no import cycle between modules, and
the training package importable under both of its names (``training`` in a clone,
``hear_brainsoundnet.training`` installed), which needs every import inside it to be relative."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("hear_brainsoundnet", "training")
MAX_FUNCTION_LINES = 100


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from ``def`` to the last line of the body) of every function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lengths = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((prefix + child.name, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return lengths


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (function-local imports too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` and `from .pkg import mod` name modules too
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges from a package's ``__init__`` to its own submodules: a package that
    re-exports its modules' names is not a cycle with them."""
    return {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}


def test_no_function_over_100_lines():
    too_long = [f"{path.relative_to(REPO)}:{qualname} ({n} lines)"
                for path in modules().values() for qualname, n in function_lengths(path)
                if n > MAX_FUNCTION_LINES]
    assert not too_long, "\n".join(too_long)


def test_no_import_cycle():
    found = modules()
    graph = package_edges({name: imported_modules(name, path, set(found)) for name, path in found.items()})
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_training_imports_are_relative():
    """Installed, the package is hear_brainsoundnet.training: an absolute `training` import in it
    would fail there (or import a stranger's `training`)."""
    absolute = []
    for name, path in modules().items():
        if not name.startswith("training"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "training":
                absolute.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "training" for a in node.names):
                absolute.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not absolute, absolute


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The helpers above find a long function and a two-module cycle (so the tests can fail)."""
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 120 + "\n\nclass C:\n    def g(self):\n        return 1\n")
    assert dict(function_lengths(long)) == {"f": 121, "C.g": 2}
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import x\n")
    b.write_text("def f():\n    from . import a\n")
    known = {"p.a", "p.b"}
    graph = {"p.a": imported_modules("p.a", a, known), "p.b": imported_modules("p.b", b, known)}
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]


@pytest.mark.parametrize("module", ["training.timebase", "hear_brainsoundnet.files"])
def test_shared_modules_are_leaves_of_their_package(module):
    """The time base and the file utilities import nothing from training/."""
    found = modules()
    imported = imported_modules(module, found[module], set(found))
    assert not {m for m in imported if m.startswith("training")}, imported
