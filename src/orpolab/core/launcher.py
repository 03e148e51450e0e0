"""Which Hydra launcher runs a sweep, recognised by its class rather than by its name.

A launcher config (``hydra.launcher``) names its class in ``_target_``; the class is loaded and
compared with the launcher plugins' own classes. The plugins are optional packages (Ray's is an
extra), so each is imported only when asked about, and a missing one is simply not the launcher.
"""

from __future__ import annotations

from typing import Any

from orpolab.core.machine import available_cores


def launcher_class(launcher_cfg: Any) -> type | None:
    """The class a launcher config instantiates, or None when it names none."""
    from hydra.utils import get_class

    target = launcher_cfg.get("_target_") if launcher_cfg is not None else None
    return get_class(str(target)) if target else None


def _is(launcher_cfg: Any, plugin: type) -> bool:
    cls = launcher_class(launcher_cfg)
    return cls is not None and issubclass(cls, plugin)


def is_joblib(launcher_cfg: Any) -> bool:
    """Jobs side by side in worker processes of this machine (``hydra/launcher=parallel``)."""
    try:
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
    except ImportError:
        return False
    return _is(launcher_cfg, JoblibLauncher)


def submitit_cluster(launcher_cfg: Any) -> str | None:
    """``"slurm"`` or ``"local"`` for submitit's launchers (``hydra/launcher=slurm``), else None."""
    try:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher, LocalLauncher
    except ImportError:
        return None
    if not _is(launcher_cfg, BaseSubmititLauncher):
        return None
    return "local" if _is(launcher_cfg, LocalLauncher) else "slurm"


def is_ray(launcher_cfg: Any) -> bool:
    """Jobs as tasks of a Ray cluster (``hydra/launcher=ray_cluster``, the optional ``ray`` extra)."""
    try:
        from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
    except ImportError:
        return False
    return _is(launcher_cfg, RayLauncher)


def parallel_jobs(launcher_cfg: Any) -> int:
    """How many jobs the launcher runs at once on this machine: joblib's ``n_jobs``, else one.

    A negative ``n_jobs`` counts back from the machine's cores as joblib does (-1: one per core).
    """
    if not is_joblib(launcher_cfg):
        return 1
    n_jobs = int(launcher_cfg.get("n_jobs") or 1)
    return max(1, n_jobs if n_jobs > 0 else available_cores() + 1 + n_jobs)
