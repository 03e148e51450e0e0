"""Module paths from before the stage packages, for objects pickled by older runs.

A sweep started before the move may have pickled references to ``orpolab.callbacks.run_post_stages``
(the post-sweep job of a submitit launcher) or ``orpolab.train.main`` (a submitit job requeued after
preemption). Importing an old path loads the module that holds the code now, so those jobs resume.
Checkpoints hold no orpolab objects (adapter tensors, optimizer state, plain counters) and need nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "orpolab.errors": "orpolab.core.errors", "orpolab.files": "orpolab.core.files",
    "orpolab.machine": "orpolab.core.machine", "orpolab.tracking": "orpolab.core.tracking",
    "orpolab.data": "orpolab.train.data", "orpolab.model": "orpolab.train.model",
    "orpolab.losses": "orpolab.train.losses", "orpolab.module": "orpolab.train.module",
    "orpolab.checkpoints": "orpolab.train.checkpoints",
    "orpolab.callbacks": "orpolab.sweep.callbacks", "orpolab.sweep_id": "orpolab.sweep.sweep_id",
    "orpolab.select": "orpolab.export.winners", "orpolab.merge": "orpolab.export.merge",
    "orpolab.llamacpp": "orpolab.export.llamacpp", "orpolab.verify": "orpolab.export.verify",
    "orpolab.generate": "orpolab.evaluate.generate", "orpolab.judge": "orpolab.evaluate.judge",
    "orpolab.stats": "orpolab.evaluate.stats", "orpolab.report": "orpolab.evaluate.report",
    "orpolab.chat": "orpolab.evaluate.chat",
    "orpolab.tiny": "orpolab.demo.tiny", "orpolab.warmup": "orpolab.demo.warmup",
    "orpolab.sample_task": "orpolab.demo.sample_task",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds an old module path and hands out the module now holding its code."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))
        return None


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
