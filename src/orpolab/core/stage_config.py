"""The settings a post-training stage runs with: the job's recorded config, plus the command's overrides.

``python -m orpolab.export <sweep> key=value ...`` and ``python -m orpolab.evaluate <sweep> key=value ...``
change only settings that act after training (:data:`~orpolab.core.config.POST_TRAINING`), each command
its own groups. The config is composed with Hydra's compose API against ``conf/``, from the overrides the
job was recorded with (``<job>/.hydra/overrides.yaml``, else the sweep's ``multirun.yaml``) followed by the
command's (later ones win, as on Hydra's command line). The training groups are then replaced by the job's
recorded config (``<job>/.hydra/config.yaml``), so a YAML file edited since cannot change what the model
is said to have been trained as, while ``paths`` stay this machine's (a sweep folder may have moved).
The stage's groups are checked with the same schema and value checks as ``train.py``, before any work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orpolab.core.config import POST_TRAINING, EvalPromptsConfig, EvaluationConfig, ExportConfig, describe, settings
from orpolab.core.errors import OrpolabError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
SCHEMAS = {"export": ExportConfig, "evaluation": EvaluationConfig, "eval_prompts": EvalPromptsConfig}


def override_group(override: str) -> str:
    """The top-level key an override sets: ``evaluation`` for ``evaluation.judge.path=x``, ``+evaluation.y=1``,
    ``~export.verify``; ``eval_prompts`` for ``eval_prompts=finetome`` (a group choice)."""
    key = str(override).lstrip("~+").split("=", 1)[0].strip()
    return key.split("@", 1)[0].split(".", 1)[0]


def is_post_training(override: str) -> bool:
    return override_group(override) in POST_TRAINING


def is_sweep_override(override: str) -> bool:
    """Whether an override is a sweep (``a=1,2``, ``a=range(3)``), by Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(str(override)).is_sweep_override()


def refuse_other_groups(overrides: Sequence[str], groups: Sequence[str], command: str) -> None:
    """One sentence naming the overrides a stage command does not take (training settings are the sweep's)."""
    other = [o for o in overrides if override_group(o) not in groups]
    if other:
        raise OrpolabError(f"{command} takes overrides of {', '.join(groups)} only, got {' '.join(other)} "
                           "(training settings belong to the sweep: change them with train.py, which starts a new "
                           "sweep)")


def recorded_overrides(sweep: Path, job_dir: Path | None) -> list[str]:
    """The overrides a job ran with (its ``.hydra/overrides.yaml``), else the sweep's without its lists."""
    if job_dir is not None and (job_dir / ".hydra" / "overrides.yaml").is_file():
        return [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    multirun = sweep / "multirun.yaml"
    if multirun.is_file():
        task = OmegaConf.select(OmegaConf.load(multirun), "hydra.overrides.task") or []
        return [str(o) for o in task if not is_sweep_override(str(o))]
    return []


def recorded_config(job_dir: Path | None, fallback: dict | None = None) -> DictConfig | None:
    """A job's config as Hydra saved it (interpolations kept), else ``fallback`` (an older export's copy)."""
    if job_dir is not None and (job_dir / ".hydra" / "config.yaml").is_file():
        return OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    return OmegaConf.create(fallback) if fallback else None


def compose_stage(sweep: Path, job_dir: Path | None, overrides: Sequence[str], groups: Sequence[str],
                  command: str, fallback: dict | None = None) -> DictConfig:
    """The stage's config (see module doc); an :class:`OrpolabError` of one sentence for any bad override."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from orpolab.core.config import register_schemas

    overrides = [str(o) for o in overrides]
    refuse_other_groups(overrides, groups, command)
    # paths.* are this project's on this machine, as for train.py (which sets the same), whatever the cwd.
    os.environ.setdefault("ORPOLAB_ROOT", str(CONF_DIR.parent))
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*recorded_overrides(sweep, job_dir), *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        # The schema's own words when it refused a value ("evaluation.bogus: Key 'bogus' not in ..."),
        # else Hydra's first sentence ("Could not find 'eval_prompts/nosuch' Available options ...").
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
        text = " ".join(str(err).split()).split(" Config search path")[0].removeprefix("In 'train': ")
        raise OrpolabError(describe(cause) if cause is not None else text) from err
    # Plain values from here on (the schema has checked them): the recorded groups replace the composed ones.
    values = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    recorded = recorded_config(job_dir, fallback)
    if recorded is not None:
        for key in recorded:
            if key not in (*POST_TRAINING, "paths", "hydra"):
                node = recorded[key]
                values[key] = plain(node) if isinstance(node, DictConfig | ListConfig) else node
    cfg = OmegaConf.create(values)
    check(cfg, groups)
    return cfg


def check(cfg: DictConfig, groups: Sequence[str]) -> None:
    """The stage's groups against their schemas (keys added with ``+`` included) and ``train.py``'s value checks."""
    from orpolab.core.validate import post_training_problems

    for group in groups:
        settings(SCHEMAS[group], cfg[group], group)
    problems = post_training_problems(cfg, tuple(groups))
    if problems:
        raise OrpolabError("; ".join(problems))


def plain(node: DictConfig | ListConfig) -> object:
    """A node as plain values, interpolations unresolved (what a settings file and an id are made of)."""
    return OmegaConf.to_container(node, resolve=False, enum_to_str=True)
