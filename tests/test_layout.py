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
            continue  # the package root (__init__, the legacy module map)
        stage = rel.parts[0]
        for line, module in orpolab_imports(path):
            target = stage_of(module)
            if target is None:
                violations.append(f"{rel}:{line} imports {module}, which is in no stage")
            elif ORDER.index(target) > ORDER.index(stage):
                violations.append(f"{rel}:{line} ({stage}) imports {module} ({target}), a later stage")
    assert not violations, "\n".join(violations)


def test_report_writes_what_it_is_given():
    """The report receives its inputs; it never calls back into the evaluation that gathers them."""
    imports = [m for _, m in orpolab_imports(PACKAGE / "evaluate" / "report.py")]
    assert "orpolab.evaluate.pipeline" not in imports
    assert not [m for m in imports if m.startswith("orpolab.core.tracking")]


def test_every_stage_folder_is_a_package_in_pipeline_order():
    stages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert sorted(ORDER) == stages


def test_old_module_paths_of_pickled_runs_still_import():
    """A submitit job pickled before the move names orpolab.callbacks / orpolab.train.main."""
    import importlib

    old = importlib.import_module("orpolab.callbacks")
    new = importlib.import_module("orpolab.sweep.callbacks")
    assert old is new and old.run_post_stages is new.run_post_stages
    from orpolab import train
    from orpolab.train.job import main

    assert train.main is main
