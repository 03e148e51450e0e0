"""A training job that is a trial of a hyperparameter search: where its study is, and its pruning callback.

The search's sweeper (``orpolab.sweep.search``) asks Optuna for a trial and launches it as the Hydra
job whose number is the trial's number. The job finds the study from its own Hydra config (the
sweeper's settings and the sweep folder), so nothing about the trial has to travel in the job's
overrides: they stay the sampled values only, which is what MLflow, the summary and the command that
reproduces a trial show. The job reports its selection metric to the trial at every validation and
stops when the pruner says so; the sweeper, not the job, tells Optuna how the trial ended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

# The sweeper's class path ends with this name (conf/hydra/sweeper/orpolab_optuna.yaml).
SWEEPER_NAME = "OptunaSearchSweeper"
STUDY_FILE = "optuna.db"


@dataclass(frozen=True)
class TrialRef:
    """Which Optuna trial a job is: the study's storage URL and name, and the trial number (= job number)."""

    storage: str
    study: str
    number: int
    pruner: Any = None  # the sweeper's pruner config: should_prune() asks the study's pruner, built here too


def is_search(sweeper_cfg: Any) -> bool:
    """Whether a Hydra sweeper config (``hydra.sweeper``) is the Optuna search's."""
    return bool(sweeper_cfg) and str(sweeper_cfg._target_).endswith(SWEEPER_NAME)  # every Hydra plugin has one


def study_location(storage: str | None, study_name: str | None, sweep_dir: str) -> tuple[str, str]:
    """The study's storage URL and name: SQLite in the sweep folder and the folder's name (the sweep id)
    unless the sweeper's ``storage`` (an RDB URL, for several machines) or ``study_name`` say otherwise."""
    folder = Path(sweep_dir).resolve()
    return str(storage or f"sqlite:///{folder / STUDY_FILE}"), str(study_name or folder.name)


def trial_of_job() -> TrialRef | None:
    """This job's trial when it runs inside a search (Hydra's runtime says so), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or not is_search(hc.sweeper):
        return None
    storage, study = study_location(hc.sweeper.storage, hc.sweeper.study_name, hc.sweep.dir)
    # Absent only with hydra/sweeper/pruner=null: no pruner, as the sweeper itself takes it.
    pruner = OmegaConf.select(hc.sweeper, "pruner")
    return TrialRef(storage, study, int(hc.job.num),
                    OmegaConf.to_container(pruner, resolve=True) if pruner is not None else None)


def load_trial(ref: TrialRef):
    """The Optuna trial object of a trial the sweeper asked for (possibly in another process)."""
    import optuna

    optuna.logging.disable_default_handler()  # its lines go to the job's log file, not the console
    from hydra.utils import instantiate

    # The pruner is not stored with the study: without the sweeper's, Optuna's default would decide.
    pruner = instantiate(ref.pruner) if ref.pruner else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=ref.study, storage=ref.storage, pruner=pruner)
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == ref.number), None)
    if frozen is None:
        from orpolab.core.errors import OrpolabError

        raise OrpolabError(f"trial {ref.number} is not in study {ref.study!r} ({ref.storage})")
    return optuna.trial.Trial(study, frozen._trial_id)


class TrialPruned(Exception):
    """Raised by :class:`PruningReporter` when the pruner stops the trial; the job records it as pruned."""

    def __init__(self, step: int, value: float):
        super().__init__(f"pruned at step {step} (value {value:.6g})")
        self.step, self.value = step, value


class PruningReporter(Callback):
    """Reports ``monitor`` to the Optuna trial at every validation of ``fit``, at the optimizer step.

    optuna-integration's Lightning callback reports once per epoch; these jobs validate every
    ``trainer.val_check_interval`` steps within one long epoch, so the pruner would see one value.
    The step-0 evaluation (``trainer.validate`` before training) is reported too, as step 0. A NaN
    value is not reported (Optuna refuses it); the job then fails on its loss anyway. ``prune=False``
    (a confirmation re-run of the best trial) reports without ever stopping.
    """

    def __init__(self, trial, monitor: str, prune: bool = True):
        self.trial, self.monitor, self.prune = trial, monitor, prune

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn not in (TrainerFn.FITTING, TrainerFn.VALIDATING):
            return
        current = trainer.callback_metrics.get(self.monitor)
        if current is None or math.isnan(float(current)):
            return
        step, value = int(trainer.global_step), float(current)
        self.trial.report(value, step)
        if self.prune and trainer.state.fn == TrainerFn.FITTING and self.trial.should_prune():
            raise TrialPruned(step, value)
