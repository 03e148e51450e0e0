"""A Lightning callback for tests: which pairs every rank trained on at every step.

Named in a run's config (``+callbacks.record._target_=tests.batch_record.RecordBatches``); every
process of a DDP job (Lightning starts the others by re-running the command) appends to its own file.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordBatches(L.pytorch.callbacks.Callback):
    """Appends ``{"step", "index"}`` per training batch to ``<folder>/rank<r>.jsonl``."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "index": batch["index"].tolist()}) + "\n")


def recorded(folder: Path, rank: int) -> dict[int, list[int]]:
    """Step -> pair indices of one rank's batch at that step."""
    lines = (folder / f"rank{rank}.jsonl").read_text().splitlines()
    return {row["step"]: row["index"] for row in map(json.loads, lines)}
