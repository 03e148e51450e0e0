"""The settings ``conf/`` composes, as typed dataclasses, for code that runs outside a composed config.

The YAML files under ``conf/`` are the only home of the settings' values (the schema dataclasses of
:mod:`orpolab.core.config` leave them ``MISSING``), so a bare ``DataConfig(path=...)`` is not a
usable config. Tests and benchmarks that build one stage's settings by hand start from what
``train.py`` would compose instead, and change only what they mean to change::

    default_settings("data", path="pairs.jsonl", eval_size=2)
    default_settings("model", "model=tiny_llama", name_or_path=str(folder))
    default_settings("evaluation.generation", max_tokens=16, n_ctx=256)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from orpolab.core.config import CONF_DIR, TrainConfig, register_schemas, settings


def default_settings(key: str, *overrides: str, **values: Any) -> Any:
    """The settings at ``key`` (``data``, ``evaluation.judge``) as ``conf/train.yaml`` composes them with
    ``overrides`` (group choices such as ``method=dpo``), with the fields in ``values`` replaced."""
    node = OmegaConf.select(_composed(tuple(overrides)), key, throw_on_missing=False)
    if not isinstance(node, DictConfig):
        raise KeyError(f"{key} is no group of settings in conf/")
    composed = OmegaConf.to_container(node, resolve=True)
    return settings(schema_of(key), {**composed, **values}, key)


def schema_of(key: str) -> type:
    """The dataclass of the settings at a dotted key of :class:`TrainConfig` (``export.verify``: VerifyConfig)."""
    cls: type = TrainConfig
    for part in key.split("."):
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise KeyError(f"{key} is no group of settings with a schema")
    return cls


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """``conf/train.yaml`` composed as ``train.py`` would, paths of this project (as the stage commands set)."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("ORPOLAB_ROOT", str(CONF_DIR.parent))
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))
