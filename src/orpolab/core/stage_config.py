"""The settings a post-training stage runs with: the job's recorded config, plus the command's overrides.

``python -m orpolab.export <sweep> key=value ...`` and ``python -m orpolab.evaluate <sweep> key=value ...``
change only settings that act after training (:data:`~orpolab.core.config.POST_TRAINING`), each command
its own groups. The config is composed with Hydra's compose API against ``conf/``, from the overrides the
job was recorded with (``<job>/.hydra/overrides.yaml``; for the export, which reads no job's settings, the
sweep's ``multirun.yaml``) followed by the
command's (later ones win, as on Hydra's command line). The training groups are then replaced by the job's
recorded config (``<job>/.hydra/config.yaml``), so a YAML file edited since cannot change what the model
is said to have been trained as, while ``paths`` stay this machine's (a sweep folder may have moved).
The stage's groups are checked with the same schema and value checks as ``train.py``, before any work,
and the recorded groups against today's schema: a sweep folder an older orpolab wrote (no recorded job
folder or settings, or settings of another shape) is refused with what to do (:func:`older_layout`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orpolab.core.config import (
    CONF_DIR,
    POST_TRAINING,
    EvalPromptsConfig,
    EvaluationConfig,
    ExportConfig,
    TrainConfig,
    describe,
    settings,
)
from orpolab.core.errors import OrpolabError

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
    """The overrides a job ran with (its ``.hydra/overrides.yaml``); without a job, the sweep's without its lists."""
    if job_dir is not None:
        return [str(o) for o in OmegaConf.load(job_record(sweep, job_dir, "overrides.yaml"))]
    multirun = sweep / "multirun.yaml"
    if multirun.is_file():
        task = OmegaConf.select(OmegaConf.load(multirun), "hydra.overrides.task") or []
        return [str(o) for o in task if not is_sweep_override(str(o))]
    return []


# The oldest commit whose sweep folders the stage commands read: since it, an export records the winner's
# job folder (export.json's winner.job_dir), whose .hydra/ holds the settings the job trained with; the
# training settings' schema has not changed since either.
LAYOUT_SINCE = "86983ec (2026-11-24)"
RERUN = "re-run the sweep with train.py"


def older_layout(sweep: Path, sign: str, remedy: str = RERUN) -> OrpolabError:
    """The refusal of a sweep folder an older orpolab wrote: ``sign``, what shows it; ``remedy``, what to do."""
    return OrpolabError(f"{sweep} was written by an orpolab older than {LAYOUT_SINCE} ({sign}), which this "
                        f"version does not read; {remedy}")


def job_record(sweep: Path, job_dir: Path, name: str) -> Path:
    """One of the files Hydra saved in a job's folder (``.hydra/config.yaml``, ``.hydra/overrides.yaml``)."""
    file = job_dir / ".hydra" / name
    if not file.is_file():
        raise older_layout(sweep, f"the job folder {job_dir} has no .hydra/{name}")
    return file


def check_recorded(sweep: Path, cfg: DictConfig, keys: Sequence[str]) -> None:
    """The job's recorded training groups against today's schema: a key it lacks or one the schema no longer
    has means an older orpolab wrote it (its stages would fail half-way on it)."""
    hints = typing.get_type_hints(TrainConfig)
    for key in keys:
        if dataclasses.is_dataclass(hints.get(key)):
            try:
                settings(hints[key], cfg[key], key)
            except OrpolabError as err:
                raise older_layout(sweep, f"its job's settings do not match this version's: {err}") from err


def compose_stage(sweep: Path, job_dir: Path | None, overrides: Sequence[str], groups: Sequence[str],
                  command: str) -> DictConfig:
    """The stage's config (see module doc); an :class:`OrpolabError` of one sentence for any bad override.

    ``job_dir`` None: the sweep's settings without a job's (the export's, which reads no training group).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from orpolab.core.config import register_schemas

    overrides = [str(o) for o in overrides]
    refuse_other_groups(overrides, groups, command)
    recorded = OmegaConf.load(job_record(sweep, job_dir, "config.yaml")) if job_dir is not None else None
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
    training = [key for key in recorded or () if key not in (*POST_TRAINING, "paths", "hydra")]
    for key in training:
        node = recorded[key]
        values[key] = plain(node) if isinstance(node, DictConfig | ListConfig) else node
    cfg = OmegaConf.create(values)
    check_recorded(sweep, cfg, training)
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
