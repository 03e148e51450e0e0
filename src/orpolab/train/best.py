"""The held-out figures of a job's best evaluation, logged as ``best/val/*`` next to the latest ``val/*``.

The export and the evaluation use a job's BEST checkpoint (by ``selection.metric``), but MLflow's
latest ``val/*`` values are those of its LAST evaluation, which training may have made worse. So
whenever an evaluation gives a new best selection value, every ``val/*`` metric of that evaluation
is logged again as ``best/val/*``, with ``best/step`` (the optimizer step, as in the checkpoint's
name ``best-step<N>.ckpt``): the latest ``best/*`` values then all describe the exported checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

PREFIX = "best/"


class BestValMetrics(Callback):
    """Logs ``best/val/*`` and ``best/step`` at each evaluation that improves ``monitor``.

    "Improves" is decided as Lightning's ``ModelCheckpoint`` decides which checkpoint is best:
    strictly better in ``mode``, NaN never better, only evaluations during ``fit`` (not the step-0
    ``trainer.validate``, which writes no checkpoint). The best value so far is part of the
    checkpoint (:meth:`state_dict`), so a resumed job compares with the evaluations before the
    interruption; a checkpoint written before this callback existed gives it the best checkpoint's
    own value instead. Lightning runs checkpoint callbacks after all others, so the ``last.ckpt``
    written at an evaluation already holds that evaluation's outcome here.
    """

    def __init__(self, monitor: str, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_step: int | None = None

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return self.best is None  # as ModelCheckpoint: the first value is kept whatever it is
        if self.best is None or math.isnan(self.best):
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best is not None:
            return
        # Resumed from a checkpoint without this callback's state: the best checkpoint's value stands in.
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor == self.monitor and cb.best_model_score is not None:
                self.best = float(cb.best_model_score)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        current = trainer.callback_metrics.get(self.monitor)
        if current is None or not self.improves(float(current)):
            return
        self.best, self.best_step = float(current), int(trainer.global_step)
        metrics = {f"{PREFIX}{name}": float(value) for name, value in trainer.callback_metrics.items()
                   if name.startswith("val/") and value.numel() == 1}
        metrics[f"{PREFIX}step"] = float(trainer.global_step)
        # At the step Lightning logged this evaluation's val/* (one below global_step mid-training), so
        # best/val/* and val/* line up in MLflow's charts.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") == self.monitor and state_dict.get("mode") == self.mode:
            self.best, self.best_step = state_dict.get("best"), state_dict.get("best_step")
