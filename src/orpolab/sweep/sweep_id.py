"""A sweep's identity: the same command means the same sweep, a changed config means a new one.

``hydra.sweep.dir`` ends in ``${orpolab_sweep_id:}``. Its value is ``sweep_id`` when given on the
command line, else ``sweep-`` and a hash of

- the command-line overrides (sorted; the sweep's lists included, e.g. ``orpo.beta=0.05,0.1``), and
- the composed config they apply to, resolved, without ``hydra``, ``paths`` (where the project
  lives on this machine) and ``sweep_id`` itself,

both without the settings that act only after training (``export``, ``evaluation``, ``eval_prompts``:
:data:`orpolab.core.config.POST_TRAINING`) and without the overrides of them. So re-running a command
finds its sweep folder and MLflow parent run again (finished jobs are skipped, interrupted ones
resumed), also with other export or evaluation settings, which the post-sweep stages then use;
editing a YAML file under ``conf/`` that shapes training, or any other override, starts a new sweep.
``selection`` stays in the identity: besides ranking the jobs afterwards, it decides which checkpoint
each job keeps while it trains. Code changes do not count: pass ``sweep_id=<name>`` for a fresh sweep.
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from orpolab.core.config import POST_TRAINING
from orpolab.core.stage_config import is_post_training

RESOLVER = "orpolab_sweep_id"
EXCLUDED = ("hydra", "paths", "sweep_id", *POST_TRAINING)


def derive(root: DictConfig) -> str:
    """``sweep_id`` if set, else a hash of the overrides and the resolved config (see module doc)."""
    given = root.sweep_id
    if given:
        return str(given)
    task = root.hydra.overrides.task if "hydra" in root else []
    overrides = sorted(str(o) for o in task if not is_post_training(str(o)))
    body = {}
    for key in root:
        if key in EXCLUDED:
            continue
        node = root[key]
        # Enums as their names: the hash reads the values the YAML files and overrides hold.
        body[key] = OmegaConf.to_container(node, resolve=True, enum_to_str=True) if isinstance(node, DictConfig) \
            else node
    payload = json.dumps({"overrides": overrides, "config": body}, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(payload.encode()).hexdigest()[:10]


def register() -> None:
    """Register the resolver once.

    A job's config holds only that job's overrides, so it must not derive the id again: the
    sweep callback resolves the folder once when the sweep starts and pins it for every job
    (``orpolab.sweep.callbacks.pin_sweep_dir``).
    """
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda *, _root_: derive(_root_))
