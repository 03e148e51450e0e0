"""A training progress bar counted in optimizer steps, and one closing line per job.

Lightning's own bars count batches per epoch; orpolab's jobs stop at ``trainer.max_steps`` with
``max_epochs=-1``, which its bars show as ``Epoch 1/-2``. This one counts steps out of
``max_steps`` across epochs. It draws only on a terminal; either way, the job ends with one line
(steps, time, the latest metrics), which also goes to the job's log file.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from lightning.pytorch.callbacks.progress import ProgressBar
from tqdm.auto import tqdm

from orpolab.core import console

log = logging.getLogger(__name__)


class StepProgressBar(ProgressBar):
    """``steps: 75/150 [01:02<01:02] train/loss=0.103 val/chosen_bpb=0.093``, updated at most every ``interval`` s."""

    def __init__(self, metrics: list[str] | tuple[str, ...] = ("train/loss", "val/chosen_bpb", "val/pref_accuracy"),
                 interval: float = 0.5):
        super().__init__()
        self.metrics, self.interval = tuple(dict.fromkeys(metrics)), interval
        self.enabled = True
        self.bar: tqdm | None = None
        self.started = 0.0
        self.first_step = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print above the bar instead of through it."""
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)), **kwargs)

    def shown_metrics(self, trainer) -> dict[str, float]:
        values = {}
        for name in self.metrics:
            value = trainer.callback_metrics.get(name)
            if value is not None and value.numel() == 1:
                values[name] = float(value)
        return values

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.first_step = time.monotonic(), trainer.global_step
        if not (self.enabled and trainer.is_global_zero):
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        # disable=None: drawn on a terminal only, so a log file or a pipe gets no stream of redraws.
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="steps", unit="step", leave=False,
                        dynamic_ncols=True, mininterval=self.interval, file=sys.stderr, disable=None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.bar is None or trainer.global_step <= self.bar.n:
            return  # mid-accumulation: the step counter has not moved
        self.bar.set_postfix({k.split("/", 1)[-1] if k.startswith("train/") else k: f"{v:.3f}"
                              for k, v in self.shown_metrics(trainer).items()}, refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not trainer.is_global_zero:
            return
        elapsed = time.monotonic() - self.started
        figures = ", ".join(f"{k} {v:.3f}" for k, v in self.shown_metrics(trainer).items())
        steps = trainer.global_step - self.first_step
        resumed = f" (resumed at step {self.first_step})" if self.first_step else ""
        log.info("  trained %d steps%s in %dm%02ds%s", steps, resumed, elapsed // 60, elapsed % 60,
                 f": {figures}" if figures else "", extra=console.SHOW)
