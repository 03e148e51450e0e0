"""What several test modules use: the project's paths, composed configs, ``train.py`` as a user runs it,
the MLflow runs of a store, copies of a shared sweep.

A plain module (not ``conftest.py``, whose job is fixtures and hooks): test modules import it, and so can
a script a test starts in a subprocess (``from tests.helpers import ...``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = ROOT / ".cache" / "tiny_models"
FAMILIES = ("llama", "phi", "mistral")
# experiment=demo starts from the warmed-up tiny models; tests start from the random ones.
RANDOM_TINY = "paths.tiny_variant=''"

# The tiny base GGUF stands in for the judge (judge.path null): fast, and every stage still runs for real.
EVAL_SMALL = ["evaluation.judge.stand_in=true", "evaluation.judge.path=null", "evaluation.judge.family=null",
              "evaluation.judge.calibration_size=4", "eval_prompts=sample", "eval_prompts.max_prompts=6",
              "evaluation.generation.max_tokens=32", "evaluation.judge.max_tokens=64",
              "evaluation.judge.max_feedback_chars=60"]

# How long each job of the demo sweep (the `sweep` fixture) trains; a test that re-runs its command says the same.
SWEEP_STEPS = 30
SWEEP_TRAINING = [f"trainer.max_steps={SWEEP_STEPS}", f"trainer.val_check_interval={SWEEP_STEPS // 2}"]


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


# ------------------------------------------------------------------ MLflow


def new_store(empty_store: Path, folder: Path) -> str:
    """The URI of a new SQLite MLflow store ``folder/mlflow.db``, a copy of the ``empty_store`` fixture's."""
    shutil.copy(empty_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def experiment_name() -> str:
    """The experiment every job logs to, as ``conf/logger/mlflow.yaml`` names it."""
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "conf" / "logger" / "mlflow.yaml").mlflow.experiment_name


def runs(uri: str, filter_string: str = "") -> list:
    """The runs of orpolab's experiment in a store, looked up by its name (none if it was never created)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=filter_string)


def job_runs(uri: str) -> list:
    """The runs of training jobs (not of sweeps or evaluations)."""
    return [r for r in runs(uri) if r.data.tags.get("orpolab.role") == "job"]


def losses(uri: str, run_id: str, key: str = "train/loss") -> dict[int, float]:
    """Step -> value; a resumed run re-logs the steps between its last checkpoint and the kill (same values)."""
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key),
                                            key=lambda m: m.timestamp)}


# ------------------------------------------------------------------ sweeps


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
    for run in runs(uri, f"tags.`{tracking.SWEEP_TAG}` = '{shared['dir'].resolve()}' "
                         f"and tags.`{tracking.ROLE_TAG}` = 'sweep'"):
        client.set_tag(run.info.run_id, tracking.SWEEP_TAG, str(folder.resolve()))
    return {**shared, "dir": folder, "uri": uri}


# ------------------------------------------------------------------ a DPO module on the random tiny_llama


def tiny_dpo_module(seed: int = 0):
    """A DPO module on tiny_llama whose adapter is live (LoRA's B perturbed), with 24 prepared pairs:
    ``(module, model_cfg, data, data_cfg, tokenizer)``."""
    import torch

    from orpolab.core.defaults import default_settings
    from orpolab.train.data import prepare
    from orpolab.train.model import apply_lora, load_model, load_tokenizer
    from orpolab.train.module import PreferenceModule

    model_cfg = default_settings("model", "model=tiny_llama", name_or_path=str(TINY_DIR / "tiny_llama"),
                                 lora_target_modules=["q_proj", "v_proj", "up_proj"])
    lora = default_settings("lora", r=4, alpha=8, dropout=0.0)
    tokenizer = load_tokenizer(model_cfg)
    model = apply_lora(load_model(model_cfg, lora), model_cfg, lora)
    # A trained adapter, in effect: LoRA's B starts at zero, so perturb it or disabling would change nothing.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    module = PreferenceModule(model, default_settings("method", "method=dpo"), default_settings("optim"))
    data_cfg = default_settings("data", path=str(ROOT / "data" / "sample" / "train.jsonl"),
                                eval_path=str(ROOT / "data" / "sample" / "eval.jsonl"), max_train_rows=24,
                                max_eval_rows=8, batch_size=4, eval_batch_size=8,
                                cache_dir=str(ROOT / ".cache" / "tokenized"))
    data = prepare(data_cfg, tokenizer)
    return module, model_cfg, data, data_cfg, tokenizer
