"""The checks of a job's settings that no type expresses, in one place, run before any job starts.

Key names and types are the schemas' (:mod:`orpolab.core.config`), checked while Hydra composes.
What is left is checked here on a job's composed config: every interpolation resolves and no
mandatory value is missing, a positive beta and learning rate, lengths that leave room for an
answer, a local model folder that exists, a known judge metric, and so on. :func:`validate` is
called for a single run by :func:`orpolab.train.job.run` before its MLflow run exists, and for a
sweep on every job's config when the sweep starts (:mod:`orpolab.sweep.preflight`).

Every problem found is reported, in one line: ``optim.lr must be positive, got -1.0``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orpolab.core.choices import QUANT_TYPES
from orpolab.core.config import POST_TRAINING, describe, typed_key
from orpolab.core.errors import OrpolabError
from orpolab.core.files import looks_local


def validate(cfg: DictConfig) -> None:
    """Raise an :class:`OrpolabError` naming every problem of one job's composed config."""
    problems = problems_of(cfg)
    if problems:
        raise OrpolabError("; ".join(problems))


def problems_of(cfg: DictConfig) -> list[str]:
    """Every problem of one job's config, each a sentence naming its key (empty: the config is fine)."""
    try:
        # Resolving everything once finds broken interpolations and unset mandatory values (model=hf
        # without model.name_or_path) now rather than in the middle of a job.
        c = {key: OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=True, enum_to_str=True)
             if isinstance(cfg[key], DictConfig) else cfg[key] for key in cfg if key != "hydra"}
    except OmegaConfBaseException as err:
        return [describe(err)]
    return [*_method(c, typed_key(cfg, "method.beta")), *(problem for check in CHECKS for problem in check(c))]


def post_training_problems(cfg: DictConfig, groups: tuple[str, ...] = ("export", "evaluation")) -> list[str]:
    """The problems of the export settings or the evaluation settings alone (``python -m orpolab.export`` /
    ``evaluate``): a stage checks its own, so the export is not refused for an evaluation setting.

    The training groups are a finished job's and are not checked again: on another machine its local
    model folder need not exist, and the evaluation does not need it.
    """
    try:
        c = {key: OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=True, enum_to_str=True)
             for key in POST_TRAINING}
    except OmegaConfBaseException as err:
        return [describe(err)]
    if "evaluation" not in groups:
        return export_problems(c["export"]["quant_types"])
    return [problem for check in (_export, _evaluation) for problem in check(c)]


def _method(c: dict, beta_key: str) -> list[str]:
    """``beta_key``: where the method's beta was typed (``orpo.beta`` under ``method=orpo``; see typed_key)."""
    method, out = c["method"], []
    if method["name"] != "sft" and not method["beta"] > 0:
        out.append(f"{beta_key} must be positive, got {method['beta']} (method {method['name']})")
    if not 0.0 <= method["label_smoothing"] < 0.5:
        out.append(f"method.label_smoothing must be in [0, 0.5), got {method['label_smoothing']}")
    return out


def _optim(c: dict) -> list[str]:
    optim, out = c["optim"], []
    if not optim["lr"] > 0:
        out.append(f"optim.lr must be positive, got {optim['lr']}")
    if not 0.0 <= optim["warmup_ratio"] <= 1.0:
        out.append(f"optim.warmup_ratio must be in [0, 1], got {optim['warmup_ratio']}")
    if optim["warmup_steps"] < 0:
        out.append(f"optim.warmup_steps must not be negative, got {optim['warmup_steps']}")
    return out


def _data(c: dict) -> list[str]:
    data, out = c["data"], []
    if not 0 < data["max_prompt_length"] < data["max_length"]:
        out.append(f"data.max_prompt_length ({data['max_prompt_length']}) must be positive and below "
                   f"data.max_length ({data['max_length']}) so every completion keeps some tokens")
    for key in ("batch_size", "eval_batch_size"):
        if data[key] < 1:
            out.append(f"data.{key} must be at least 1, got {data[key]}")
    for path, size in (("eval_path", "eval_size"), ("test_path", "test_size")):
        if data[path] is None and not data[size] > 0:
            out.append(f"data.{size} must be positive (a fraction below 1 or a row count), got {data[size]}")
    return out


def _model(c: dict) -> list[str]:
    out = []
    path = c["model"]["name_or_path"]
    if looks_local(path) and not Path(path).expanduser().is_dir():
        out.append(f"model.name_or_path: model path {path} does not exist; point it at a Hugging Face model folder "
                   "or a hub id (for the tiny offline models run `make tiny-models`)")
    for key, targets in (("model.lora_target_modules", c["model"]["lora_target_modules"]),
                         ("lora.target_modules", c["lora"]["target_modules"])):
        unset_allowed = key == "lora.target_modules"  # null: the model's own targets
        if not (targets is None and unset_allowed or _is_targets(targets)):
            out.append(f"{key} must be a list of module names or 'all-linear', got {targets!r}")
    if c["lora"]["r"] < 1:
        out.append(f"lora.r must be at least 1, got {c['lora']['r']}")
    return out


def _is_targets(value: Any) -> bool:
    return isinstance(value, str) and bool(value) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))


def _trainer(c: dict) -> list[str]:
    trainer = c["trainer"]
    # Every trainer option extends conf/trainer/default.yaml, which sets both.
    steps, interval = trainer["max_steps"], trainer["val_check_interval"]
    # A float interval is a fraction of an epoch; max_steps -1 trains without a step limit.
    if isinstance(steps, int) and steps > 0 and isinstance(interval, int) and interval > steps:
        return [f"trainer.val_check_interval ({interval}) must be at most trainer.max_steps ({steps}), or no "
                "job ever logs its selection metric"]
    return []


def _run(c: dict) -> list[str]:
    out = []
    if not c["selection"]["metric"]:
        out.append("selection.metric must name a logged metric, e.g. val/chosen_bpb")
    resume = c["resume_from"]
    if resume and resume != "last" and not Path(resume).expanduser().is_file():
        out.append(f"resume_from: checkpoint {resume} does not exist (use 'last' or a path to a .ckpt)")
    return out


def _export(c: dict) -> list[str]:
    out = export_problems(c["export"]["quant_types"])
    evaluation = c["evaluation"]
    written = ("F16", *(q for q in c["export"]["quant_types"] if q != "F16"))
    if c["export"]["enabled"] and evaluation["enabled"] and evaluation["quant"] not in written:
        out.append(f"evaluation.quant {evaluation['quant']} is not among the exported files ({', '.join(written)}); "
                   "add it to export.quant_types or choose one of them")
    return out


def export_problems(quant_types: list[str]) -> list[str]:
    if "F16" in [str(q).upper() for q in quant_types]:
        return ["export.quant_types must not include F16 (the f16 GGUF is always written); choose from "
                + ", ".join(q for q in QUANT_TYPES if q != "F16")]
    return []


def export_quant_types(values: list[str]) -> list[str]:
    """The quantization types of the export's ``--quant`` option, in llama.cpp's upper case (``q8_0`` is
    ``Q8_0``), checked as ``export.quant_types`` is in a config: a known type, and not F16."""
    quants = [str(q).upper() for q in values]
    unknown = [q for q in quants if q not in QUANT_TYPES]
    problems = [f"export.quant_types: unknown quantization type(s) {', '.join(unknown)}; choose from "
                + ", ".join(q for q in QUANT_TYPES if q != "F16")] if unknown else []
    problems += export_problems(quants)
    if problems:
        raise OrpolabError("; ".join(problems))
    return quants


def judge_metric_names() -> list[str]:
    """flow-judge's preset metrics (``RESPONSE_CORRECTNESS_5POINT``, ...), the names ``evaluation.judge.metrics`` takes.

    Imported only when asked: flow-judge is a third-party package every stage may use.
    """
    from flow_judge import metrics

    return sorted(n for n in dir(metrics) if n.isupper() and n.startswith("RESPONSE_"))


def _evaluation(c: dict) -> list[str]:
    out = []
    wanted = c["evaluation"]["judge"]["metrics"]
    known = judge_metric_names() if wanted else []
    unknown = [m for m in wanted if m not in known]
    if unknown:
        out.append(f"evaluation.judge.metrics: unknown judge metric(s) {', '.join(unknown)}; available: "
                   f"{', '.join(known)}")
    judge = c["evaluation"]["judge"]
    if judge["calibration_size"] < 0:
        out.append(f"evaluation.judge.calibration_size must be 0 (off) or positive, got {judge['calibration_size']}")
    if judge["max_prompts"] is not None and judge["max_prompts"] < 1:
        out.append(f"evaluation.judge.max_prompts must be null (all) or at least 1, got {judge['max_prompts']}")
    for key in ("generation", "judge"):
        parallel = c["evaluation"][key]["parallel"]
        if not isinstance(parallel, int) or parallel < 1:
            out.append(f"evaluation.{key}.parallel (sequences per llama.cpp batch) must be at least 1, got {parallel}")
    exported = {"F16", *(str(q).upper() for q in c["export"]["quant_types"])}
    missing = [str(q) for q in c["evaluation"]["quants"] if str(q).upper() not in exported]
    if missing:
        out.append(f"evaluation.quants: {', '.join(missing)} not exported; add to export.quant_types "
                   f"(now {', '.join(sorted(exported))})")
    prompts = c["eval_prompts"]
    checker = prompts["checker"]
    if checker is not None and not (isinstance(checker, dict) and "_target_" in checker and checker["_target_"]):
        out.append(f"eval_prompts.checker must be null or a node with _target_ (an object with figures, "
                   f"check(answer, expected, question, ended), reference(expected) and examples(question, expected, "
                   f"rng), like orpolab.demo.sample_task.LookupChecker), got {checker!r}")
    if prompts["kind"] in ("conversations", "fields") and not (prompts["path"] and prompts["prompt_field"]):
        out.append(f"eval_prompts.path and eval_prompts.prompt_field must be set for eval_prompts.kind "
                   f"{prompts['kind']}")
    return out


CHECKS: tuple[Callable[[dict], list[str]], ...] = (_optim, _data, _model, _trainer, _run, _export,
                                                    _evaluation)
