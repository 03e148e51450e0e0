"""Typed configs: every group option composes; wrong keys, types and values stop before any job starts."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, OmegaConf, open_dict

from orpolab.core import config as schema
from orpolab.core.config import ExportConfig, MethodConfig, settings
from orpolab.core.defaults import default_settings
from orpolab.core.errors import OrpolabError
from orpolab.core.stage_config import compose_stage
from orpolab.core.tracking import flatten
from orpolab.core.validate import export_quant_types, validate
from orpolab.sweep import preflight
from orpolab.sweep.sweep_id import derive

from .helpers import RANDOM_TINY, ROOT, compose, run_train

CONF = ROOT / "conf"
# Every option of every group (the files under conf/); the root's own defaults fill in the rest.
OPTIONS = [*(f"{f.parent.name}={f.stem}" for f in sorted(CONF.glob("*/*.yaml")) if f.parent.name != "hydra"),
           "hydra/launcher=parallel"]
# The values a user must give: model=hf names no model, data=pairs no data set.
MANDATORY = {"model=hf": {"model.name_or_path"}, "data=pairs": {"data.path"}}
# A config that passes validation without local files: the default hub model on the bundled data.
VALID = ["data=sample", "eval_prompts=sample"]


def nothing_tracked(tracking_uri: str) -> bool:
    """No MLflow run, not even an experiment: the test's store holds MLflow's Default experiment only."""
    from mlflow.tracking import MlflowClient

    return [e.name for e in MlflowClient(tracking_uri).search_experiments()] == ["Default"]


def composition_error(overrides: list[str], tmp_path: Path) -> str:
    """Hydra's message for a config it refuses to compose, with the cause it prints below it."""
    with pytest.raises(ConfigCompositionException) as info:
        compose(overrides, tmp_path)
    return f"{info.value} {info.value.__cause__ or ''}"


def test_every_group_option_composes_with_every_value_set(tmp_path):
    """The schema leaves every value the YAML files hold MISSING: each option must still compose complete."""
    assert len(OPTIONS) > 30
    for option in OPTIONS:
        cfg = compose([option], tmp_path)
        assert cfg.method.name in ("orpo", "dpo", "simpo", "sft"), option
        missing = OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
        assert missing == MANDATORY.get(option, set()), option
    demo = compose(["experiment=demo", "method=dpo"], tmp_path)
    assert demo.optim.lr == 5.0e-5  # ${lr_per_method.${method.name}}: the enum resolves as its name


@pytest.mark.parametrize("override,key,hint", [
    ("optim.lr=abc", "optim.lr", "could not be converted to Float"),
    ("selection.mode=maximum", "selection.mode", "expected one of [min, max]"),
    ("lora.bnb_4bit_compute_dtype=float8", "lora.bnb_4bit_compute_dtype", "expected one of [bfloat16, float16"),
    ("export.verify.max_ppl_ratio.Q4_KM=1.2", "export.verify.max_ppl_ratio.Q4_KM",
     "valid: [F16, Q8_0, Q4_K_M, Q5_K_M, Q6_K, Q4_0]"),
    ("+export.verify.min_top1_agreement.q4_k_m=0.9", "export.verify.min_top1_agreement.q4_k_m", "valid: [F16"),
    ("export.quant_types=[Q4_K_M,Q3_K]", "export.quant_types[1]", "Invalid value 'Q3_K'"),
    ("evaluation.quant=Q2_K", "evaluation.quant", "Invalid value 'Q2_K'"),
    ("model.dtype=int8", "model.dtype", "Invalid value 'int8'"),
    ("method.name=ipo", "method.name", "expected one of [orpo, dpo, simpo, sft]"),
    ("orpo.nll_on=prompt", "orpo.nll_on", "expected one of [full, completion]"),
    ("data.schema=json", "data.schema", "expected one of [messages, strings]"),
    ("optim.schedule=step", "optim.schedule", "expected one of [cosine, linear, constant]"),
    ("seed=abc", "seed", "could not be converted to Integer"),
    ("eval_before_training=maybe", "eval_before_training", "is not a valid bool"),
    ("+lr_per_method.orpo=fast", "lr_per_method.orpo", "could not be converted to Float"),
])
def test_wrong_type_or_value_on_the_command_line_names_the_key(tmp_path, override, key, hint):
    message = composition_error([override], tmp_path)
    assert f"full_key: {key}" in message and hint in message, message


def test_typo_or_wrong_type_in_a_yaml_file_names_the_file_and_the_key(tmp_path):
    (tmp_path / "optim").mkdir()
    (tmp_path / "optim" / "typo.yaml").write_text("defaults:\n  - adamw\n  - _self_\nlearning_rate: 1.0e-4\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "long.yaml").write_text("defaults:\n  - sample\n  - _self_\nmax_length: long\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    message = composition_error([search, "optim=typo"], tmp_path / "out")
    assert "In 'optim/typo'" in message and "Key 'learning_rate' not in 'OptimConfig'" in message
    message = composition_error([search, "data=long"], tmp_path / "out")
    assert "In 'data/long'" in message and "full_key: data.max_length" in message


@pytest.mark.parametrize("overrides,message", [
    (["orpo.beta=0"], "orpo.beta must be positive, got 0.0"),
    (["method=dpo", "method.beta=-0.1"], "method.beta must be positive, got -0.1"),
    (["method=simpo", "method.beta=0"], "method.beta must be positive"),
    # Set directly, method.beta is what ORPO trains with, whatever orpo.beta holds.
    (["orpo.beta=0", "method.beta=0"], "method.beta must be positive, got 0.0 (method orpo)"),
    (["optim.lr=-1.0"], "optim.lr must be positive, got -1.0"),
    (["method=dpo", "method.label_smoothing=0.5"], "method.label_smoothing must be in [0, 0.5), got 0.5"),
    (["data.max_prompt_length=160"], "data.max_prompt_length (160) must be positive and below data.max_length (160)"),
    (["evaluation.judge.metrics=[RESPONSE_CORRECTNESS_5POINTS]"],
     "unknown judge metric(s) RESPONSE_CORRECTNESS_5POINTS; available: RESPONSE_CORRECTNESS_3POINT"),
    (["model.name_or_path=./no/such/model"], "model.name_or_path: model path ./no/such/model does not exist"),
    (["trainer.max_steps=50"], "trainer.val_check_interval (100) must be at most trainer.max_steps (50)"),
    (["export.quant_types=[F16]"], "export.quant_types must not include F16"),
    (["evaluation.quant=Q8_0"], "evaluation.quant Q8_0 is not among the exported files (F16, Q4_K_M)"),
    (["eval_prompts.checker=lookup"], "eval_prompts.checker must be null or a node with _target_"),
    (["data.test_path=null", "data.test_size=0"], "data.test_size must be positive (a fraction below 1 or a row"),
    (["evaluation.judge.calibration_size=-1"], "evaluation.judge.calibration_size must be 0 (off) or positive"),
    (["evaluation.judge.max_prompts=0"], "evaluation.judge.max_prompts must be null (all) or at least 1, got 0"),
    (["evaluation.quants=[F16,Q8_0]"], "evaluation.quants: Q8_0 not exported; add to export.quant_types"),
    (["model=hf"], "model.name_or_path: Missing mandatory value"),
    (["data=pairs"], "data.path: Missing mandatory value"),  # not orpo_dpo_mix's, which pairs.yaml once extended
    (["experiment=demo", "method=dpo", "~lr_per_method.dpo"],
     "optim.lr: Interpolation key 'lr_per_method.dpo' not found"),
])
def test_validator_names_each_bad_value(tmp_path, overrides, message):
    cfg = compose(VALID + overrides, tmp_path)
    with pytest.raises(OrpolabError) as info:
        validate(cfg)
    assert message in str(info.value)


def test_a_value_is_named_by_the_key_it_was_typed_under():
    cfg = OmegaConf.create({"orpo": {"beta": 0.1}, "a": "${orpo.beta}", "method": {"beta": "${a}", "lr": 1.0,
                            "x": "${oc.env:HOME}", "y": "${orpo.beta}/2", "loop": "${method.loop}"}})
    assert schema.typed_key(cfg, "method.beta") == "orpo.beta"  # through a chain of interpolations
    assert schema.typed_key(cfg, "method.lr") == "method.lr"
    assert schema.typed_key(cfg, "method.x") == "method.x"  # a resolver's value: its own key
    assert schema.typed_key(cfg, "method.y") == "method.y"  # a string composed from one
    assert schema.typed_key(cfg, "method.loop") == "method.loop"


def test_validator_reports_every_problem_in_one_line(tmp_path):
    assert validate(compose(VALID, tmp_path)) is None
    with pytest.raises(OrpolabError) as info:
        validate(compose(VALID + ["optim.lr=0", "orpo.beta=-1"], tmp_path))
    assert "\n" not in str(info.value)
    assert "orpo.beta must be positive" in str(info.value) and "optim.lr must be positive" in str(info.value)


def test_single_run_stops_before_its_mlflow_run(tracking_uri, tmp_path):
    from orpolab.train.job import run

    with pytest.raises(OrpolabError, match="optim.lr must be positive, got 0.0"):
        run(compose(VALID + ["optim.lr=0"], tmp_path / "job"))
    assert nothing_tracked(tracking_uri)


def sweep_problems(overrides: list[str], tmp_path: Path) -> str:
    """``train.py -m <overrides>`` as far as the sweep's check: the config Hydra composes, then check_sweep."""
    schema.register_schemas()
    fixed = [o for o in overrides if "," not in o]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=fixed, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = overrides
            cfg.hydra.job.config_name = "train"
        assert len(preflight.job_overrides(cfg)) > 1
        try:
            preflight.check_sweep(cfg)
        except OrpolabError as err:
            return str(err)
    return ""


def test_sweep_check_composes_every_job(tiny_models, tmp_path):
    # The values interact: the base config (ORPO) is fine, the DPO job's learning rate is not.
    message = sweep_problems(VALID + ["experiment=demo", RANDOM_TINY, "lr_per_method.dpo=-1", "method=orpo,dpo"],
                             tmp_path)
    assert message == "optim.lr must be positive, got -1.0, in job 1 (method=dpo)"
    # A sweep value of the wrong type, which Hydra would only find when that job starts.
    message = sweep_problems(VALID + ["optim.lr=1e-4,abc"], tmp_path)
    assert "Error merging override optim.lr=abc" in message and "optim.lr: Value 'abc'" in message
    assert "in job 1 (optim.lr=abc)" in message
    assert sweep_problems(VALID + ["orpo.beta=0.05,0.1"], tmp_path) == ""


@pytest.mark.subprocess
def test_bad_sweep_value_stops_the_command_before_any_job(tracking_uri, tmp_path):
    proc = run_train(["-m", "experiment=demo", RANDOM_TINY, "orpo.beta=0.05,-1", f"hydra.sweep.dir={tmp_path / 's'}"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: orpo.beta must be positive, got -1.0 (method orpo), in job 1 (orpo.beta=-1)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "s" / "0").exists()
    assert nothing_tracked(tracking_uri)


@pytest.mark.subprocess
def test_wrong_type_stops_the_command_without_a_traceback(tracking_uri):
    proc = run_train(["lora.bnb_4bit_compute_dtype=float8"])
    assert proc.returncode == 1
    assert "Error merging override lora.bnb_4bit_compute_dtype=float8" in proc.stderr
    assert "full_key: lora.bnb_4bit_compute_dtype" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert nothing_tracked(tracking_uri)


def test_enums_reach_code_mlflow_and_the_sweep_id_as_plain_strings(tmp_path):
    cfg = compose(["experiment=demo", "selection.mode=max", "export.quant_types=[Q8_0]"], tmp_path)
    flat = flatten(cfg)
    assert flat["selection.mode"] == "max" and flat["method.name"] == "orpo" and flat["model.dtype"] == "float32"
    assert flat["export.quant_types"] == "['Q8_0']"
    method = settings(MethodConfig, cfg.method, "method")
    assert method.name == "orpo" and f"{method.name}" == "orpo" and json.dumps(method.name) == '"orpo"'
    assert {"orpo": 1}[method.name] == 1
    assert derive(cfg) == derive(compose(["experiment=demo", "selection.mode=max", "export.quant_types=[Q8_0]"],
                                         tmp_path))


def test_every_choice_is_named_as_its_value():
    """OmegaConf matches an enum by name, and the code compares its value: they must be the same string."""
    from orpolab.core.choices import Choice

    for choice in Choice.__subclasses__():
        assert all(name == member.value or member.value in choice.__members__
                   for name, member in choice.__members__.items()), choice


def test_export_settings_outside_hydra_are_checked_the_same_way():
    assert export_quant_types(["q8_0", "Q4_K_M"]) == ["Q8_0", "Q4_K_M"]  # the export's --quant
    with pytest.raises(OrpolabError, match="export.quant_types: unknown quantization type.s. Q3_K; choose from Q8_0"):
        export_quant_types(["q8_0", "q3_k"])
    with pytest.raises(OrpolabError, match="export.quant_types must not include F16"):
        export_quant_types(["f16"])
    saved = OmegaConf.to_container(OmegaConf.structured(default_settings("export")))  # a saved sweep config
    assert settings(ExportConfig, saved, "export") == default_settings("export")
    saved["verify"]["max_ppl_ratio"]["Q4_KM"] = 1.2
    with pytest.raises(OrpolabError, match=r"export.verify.max_ppl_ratio.Q4_KM: Key 'Q4_KM' is incompatible .*"
                                           r"valid: \[F16, Q8_0, Q4_K_M"):
        settings(ExportConfig, saved, "export")


def yaml_settings(file: Path) -> tuple[list[str], dict]:
    """Where a YAML file under conf/ writes (its package as key parts: [] for the root) and what, as written."""
    rel = file.relative_to(CONF)
    values = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
    values.pop("defaults", None)
    root = rel == Path("train.yaml") or "# @package _global_" in file.read_text()
    return ([] if root else [rel.parts[0]]), values


def defaults_beside_yaml(cls: type, path: list[str], values: dict, file: str) -> list[str]:
    """Each key that a YAML file sets while the schema's dataclass also holds a default for it."""
    found = []
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            continue  # hydra: (no schema), or a key the schema refuses while composing
        kind, f = hints[key], fields[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            found += defaults_beside_yaml(kind, [*path, key], value, file)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and default != MISSING:  # a field without a default is mandatory
            found.append(f"{file} sets {'.'.join([*path, key])}: {value!r}, and {cls.__name__}.{key} "
                         f"defaults to {default!r}{'' if default == value else ' (they differ)'}")
    return found


def test_each_value_has_one_home_the_yaml_files():
    """A key any YAML file sets has no default in the schema (orpolab.core.config), so they cannot drift."""
    found, checked = [], 0
    for file in sorted(CONF.rglob("*.yaml")):
        if file.relative_to(CONF).parts[0] == "hydra":
            continue  # Hydra's own settings, no schema of ours
        path, values = yaml_settings(file)
        for part in reversed(path):
            values = {part: values}
        found += defaults_beside_yaml(schema.TrainConfig, [], values, str(file.relative_to(ROOT)))
        checked += 1
    assert checked > 30
    assert not found, "\n".join(found)
    # The check itself: a default beside a YAML value is found, and named with both values.
    drifted = defaults_beside_yaml(DriftedJudge, ["evaluation", "judge"], {"parallel": 1, "n_ctx": 4096}, "x.yaml")
    assert drifted == ["x.yaml sets evaluation.judge.parallel: 1, and DriftedJudge.parallel defaults to 2 "
                       "(they differ)"]


@dataclasses.dataclass
class DriftedJudge:
    parallel: int = 2
    n_ctx: int = MISSING


def test_a_sweep_folder_of_an_older_layout_is_refused_with_what_to_do(tmp_path):
    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    evaluate = ("evaluation", "eval_prompts")
    with pytest.raises(OrpolabError) as info:
        compose_stage(sweep, job, [], evaluate, "python -m orpolab.evaluate")
    message = str(info.value)
    assert f"{sweep} was written by an orpolab older than 86983ec (2026-11-24) (the job folder {job} has no " \
           ".hydra/config.yaml)" in message
    assert message.endswith("which this version does not read; re-run the sweep with train.py")
    # A job recorded with settings of another shape (a key this version's schema requires is not there).
    recorded = OmegaConf.to_container(compose(VALID, tmp_path / "out"), resolve=False)
    recorded.pop("hydra")
    del recorded["model"]["lr"]
    OmegaConf.save(OmegaConf.create(recorded), job / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(VALID), job / ".hydra" / "overrides.yaml")
    with pytest.raises(OrpolabError, match=r"older than 86983ec .*its job's settings do not match this version's: "
                                           r"model.lr: .*missing mandatory value"):
        compose_stage(sweep, job, [], evaluate, "python -m orpolab.evaluate")
    recorded["model"]["lr"] = None  # the same job as this version records it
    OmegaConf.save(OmegaConf.create(recorded), job / ".hydra" / "config.yaml")
    cfg = compose_stage(sweep, job, ["evaluation.judge.max_prompts=3"], evaluate, "python -m orpolab.evaluate")
    assert cfg.evaluation.judge.max_prompts == 3 and cfg.model.lr is None



def test_an_export_of_an_older_layout_is_refused_with_what_to_do(tmp_path):
    from orpolab.evaluate.plan import EvaluationPlan

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export.json").write_text(json.dumps({"winner": {"config": {}, "best_checkpoint": "x"}}))
    with pytest.raises(OrpolabError) as info:
        EvaluationPlan(tmp_path, "sqlite:///unused.db")
    assert str(info.value) == (
        f"the export of {tmp_path} was written by orpolab before exports recorded the winner's job folder (before "
        f"commit 86983ec); export it again: python -m orpolab.export {tmp_path}")
