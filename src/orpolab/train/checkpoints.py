"""Checkpoints that a kill cannot corrupt: written beside the target, flushed to disk, then renamed.

Lightning's own save writes through fsspec, whose local "transaction" puts the temporary file in
the system temp folder and *moves* it: across file systems that is a copy into the final name,
which a SIGKILL or a full disk can leave half-written. Here the temporary file sits in the same
folder, is fsync'd, and ``os.replace`` swaps it in, so ``last.ckpt`` is always a complete file:
the previous one or the new one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from orpolab.core.errors import OrpolabError


def partial_name(target: Path) -> Path:
    """Where a checkpoint is written before it is renamed into place (same folder, hidden)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def remove_partial_saves(folder: Path) -> None:
    """Delete saves a kill cut short: they were never renamed, so they are never checkpoints."""
    for stale in folder.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with an atomic, durable save and a clear error when the disk is full."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(target)
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(target.parent).free / 2**20
                raise OrpolabError(
                    f"out of disk space writing checkpoint {target} ({free:.0f} MiB free); the previous checkpoint "
                    "is intact. Free some space (old multirun/ folders, .cache/) and re-run the same command "
                    "to resume"
                ) from err
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
