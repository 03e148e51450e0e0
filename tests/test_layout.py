"""The package's dependency rules, read from the source: stages import only the stages before them."""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import ROOT

PACKAGE = ROOT / "src" / "orpolab"
# Each stage may import itself and the stages before it; demo/ is imported by nothing else.
ORDER = ("core", "train", "sweep", "export", "evaluate", "demo")


def orpolab_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``orpolab.*`` import in a file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "orpolab":
                found += [(node.lineno, f"orpolab.{alias.name}") for alias in node.names]
            elif node.module.startswith("orpolab."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("orpolab.")]
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def test_stages_depend_downwards_only_and_nothing_imports_demo():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2:
            continue  # the package root (its __init__)
        stage = rel.parts[0]
        for line, module in orpolab_imports(path):
            target = stage_of(module)
            if target is None:
                violations.append(f"{rel}:{line} imports {module}, which is in no stage")
            elif ORDER.index(target) > ORDER.index(stage):
                violations.append(f"{rel}:{line} ({stage}) imports {module} ({target}), a later stage")
    assert not violations, "\n".join(violations)


def module_of(path: Path) -> str:
    """``orpolab.core.config`` for src/orpolab/core/config.py, ``orpolab.train`` for its ``__init__.py``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each orpolab module and the orpolab modules it imports, at any depth (a function's lazy import runs
    too, only later; ``if TYPE_CHECKING:`` blocks count as well). ``from orpolab.core import config``
    imports the module ``orpolab.core.config``; ``from orpolab.train.data import SkipRow`` the package
    ``orpolab.train.data`` (its ``__init__``). A package imported only as the parent of a module is no
    edge: Python has started its ``__init__`` before any of its modules runs."""
    files = {module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("orpolab"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as the path that closes it (``[a, b, a]``), or [] when it has none."""
    state: dict[str, str] = {}  # "open": on the current path; "done": every path from it explored
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []  # a diamond is no cycle
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    assert "orpolab.core.config" in graph and "orpolab.core.config" in graph["orpolab.core.validate"]
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_report_writes_what_it_is_given():
    """The report receives its inputs; it never calls back into the evaluation that gathers them."""
    imports = [m for _, m in orpolab_imports(PACKAGE / "evaluate" / "report.py")]
    assert "orpolab.evaluate.pipeline" not in imports
    assert not [m for m in imports if m.startswith("orpolab.core.tracking")]


def test_every_stage_folder_is_a_package_in_pipeline_order():
    stages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert sorted(ORDER) == stages
