"""The settings of each config group, one dataclass per group, and the same dataclasses as Hydra schemas.

Each dataclass has two uses:

- **Schema.** :func:`register_schemas` stores the root's dataclass, :class:`TrainConfig`, in
  Hydra's ConfigStore as ``base_train``, and ``conf/train.yaml`` names it first in its defaults
  list (Hydra matches no schema to a file by name). Every group is a typed field of the root, so
  each group file merged into it is checked too, the files of the global package included
  (``method/*.yaml``, ``experiment/*.yaml`` write into several groups): a misspelt key or a wrong
  type, in a YAML file (the error names the file) or on the command line, stops the command while
  Hydra composes the config, before any job starts. Values from a fixed set are enums (OmegaConf
  has no ``Literal``); values that no type expresses (a positive beta, a known judge metric) are
  checked by :func:`orpolab.core.validate.validate`.
- **Settings.** A stage reads a group as its dataclass: :func:`settings` (``settings(ModelConfig,
  cfg.model)``) merges the node onto the schema, so a job config saved as plain YAML (which the
  export and the evaluation read) is checked the same way. Stages read settings this way, or as
  attributes of a config the schema checked (``cfg.resume_from``), never by a node's ``get`` with a
  default of their own, which would be a second home for the value.

**One home for each default: the YAML files under ``conf/``.** A field that any YAML file sets is
``MISSING`` here, so the dataclasses hold types and the files hold values (with the comments that
say why); a field keeps a default here only where no file sets it (``model.logps_chunk_size``).
``tests/test_config.py`` fails when a file sets a key that also has a default here. Code that needs
settings outside a composed config (tests, benchmarks) gets the files' values from
:func:`orpolab.core.defaults.default_settings`, not from a bare dataclass.

The enums (:mod:`orpolab.core.choices`) are also plain strings, so the stages compare, format and serialise
them as the strings the YAML files hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orpolab.core.choices import (
    ComputeDtype,
    DataSchema,
    FourBitType,
    Method,
    ModelDtype,
    NllOn,
    PromptKind,
    Quant,
    Schedule,
    SelectionMode,
)
from orpolab.core.errors import OrpolabError

# ``${orpolab_first:${model.lr},8.0e-5}``: the first value that is set (conf/optim falls back from the
# model's own learning rate to the default). Registered on import: every stage that resolves a config
# reads it through this module.
FIRST_SET = "orpolab_first"
if not OmegaConf.has_resolver(FIRST_SET):
    OmegaConf.register_new_resolver(FIRST_SET, lambda *values: next((v for v in values if v is not None), None))

T = TypeVar("T")



# The groups that act only after training: the export of the winner and its evaluation. They are not
# part of a sweep's identity (orpolab.sweep.sweep_id), cannot be swept, and the stage commands
# (python -m orpolab.export / orpolab.evaluate) take overrides of them (orpolab.core.stage_config).
POST_TRAINING = ("export", "evaluation", "eval_prompts")

# The YAML files of the settings (the project's conf/ folder, beside src/).
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


@dataclass
class DataConfig:
    """Where the pairs come from and how they are cut to length (see ``conf/data/``)."""

    path: str
    split: str = MISSING
    schema: DataSchema = MISSING
    prompt_column: str = MISSING
    chosen_column: str = MISSING
    rejected_column: str = MISSING
    eval_path: str | None = MISSING
    eval_split: str = MISSING
    eval_size: float = MISSING  # fraction (<1) or row count (>=1) held out when eval_path is unset
    # The test split (evaluation prompts, judge calibration, the report's comparisons): never used to
    # train or to select; carved from the training rows after validation when test_path is unset.
    test_path: str | None = MISSING
    test_split: str = MISSING
    test_size: float = MISSING  # fraction (<1) or row count (>=1)
    max_test_rows: int | None = MISSING
    split_seed: int = MISSING
    max_train_rows: int | None = MISSING
    max_eval_rows: int | None = MISSING
    max_length: int = MISSING
    max_prompt_length: int = MISSING
    fallback_chat_template: str | None = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    # Batches of similar length (shuffled groups of 50 batches, sorted within): less padding, as
    # Hugging Face's group_by_length / TRL's train_sampling_strategy="group_by_length".
    group_by_length: bool = MISSING
    # Prefix sharing with packing: each pair laid out once as prompt, chosen, rejected, several pairs
    # per row of max_length tokens, with a block attention mask; the same numbers as the plain layout.
    # Off by itself (one log line) for attention kernels without custom masks or short sliding windows.
    packing: bool = MISSING
    cache_dir: str = MISSING
    num_workers: int = MISSING


@dataclass
class ModelConfig:
    """One entry of ``conf/model/``."""

    name_or_path: str
    dtype: ModelDtype = MISSING
    # A list of module names, or "all-linear" (OmegaConf types no union of a list and a string).
    lora_target_modules: Any = MISSING
    attn_implementation: str | None = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False
    # Log-probs straight from the hidden states of the positions a loss uses, through the output
    # layer in chunks of this many positions (0: full-vocabulary logits everywhere, as TRL does).
    logps_chunk_size: int = 1024
    # Lineage (who trained the weights this model descends from), not the architecture: SmolLM2 and
    # Llama share ``llama`` in a GGUF. The report warns when a judge judges its own family.
    family: str | None = MISSING
    # This model's own learning rate: conf/optim's default uses it when set (a method's lr, or
    # optim.lr=..., still wins).
    lr: float | None = MISSING


@dataclass
class LoraSettings:
    """``conf/lora/``: adapter shape and optional 4-bit base weights (QLoRA)."""

    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # None: the model config's targets; else as model.lora_target_modules
    load_in_4bit: bool = MISSING
    bnb_4bit_quant_type: FourBitType = MISSING
    bnb_4bit_compute_dtype: ComputeDtype = MISSING
    bnb_4bit_use_double_quant: bool = MISSING


@dataclass
class MethodConfig:
    """``conf/method/``: which loss trains the adapter, and its parameters.

    Fields a method does not use are ignored by it (``gamma`` only matters to SimPO, and so on); their
    values for the other methods are in ``conf/train.yaml``'s ``method:``.
    """

    name: Method = MISSING
    # ORPO's is orpo.beta (conf/method/orpo.yaml interpolates it here): see typed_key.
    beta: float = MISSING
    # ORPO: NLL over "full" (prompt + response, TRL's default) or "completion". SFT always uses completion.
    nll_on: NllOn = MISSING
    # DPO: conservative DPO's label smoothing, and whether to compute the reference once before training.
    label_smoothing: float = MISSING
    precompute_ref_logps: bool = MISSING
    # SimPO: target reward margin.
    gamma: float = MISSING
    # Dropout off everywhere (LoRA's included), as TRL's trainers do by default.
    disable_dropout: bool = MISSING


@dataclass
class OrpoConfig:
    """``conf/orpo/``: ORPO's parameters, which ``method/orpo.yaml`` hands to ``method``."""

    beta: float = MISSING
    nll_on: NllOn = MISSING
    disable_dropout: bool = MISSING


@dataclass
class OptimConfig:
    """``conf/optim/``: AdamW with warmup and a cosine or linear decay, stepped per optimizer step."""

    lr: float = MISSING
    weight_decay: float = MISSING
    betas: tuple[float, float] = MISSING
    eps: float = MISSING
    warmup_steps: int = MISSING
    warmup_ratio: float = MISSING
    schedule: Schedule = MISSING


@dataclass
class GenerationConfig:
    """``evaluation.generation``."""

    max_tokens: int = MISSING
    temperature: float = MISSING  # 0 = greedy
    seed: int = MISSING
    n_ctx: int = MISSING
    threads: int | None = MISSING
    # Answers decoded together per llama.cpp batch (one pass over the weights serves all of them).
    parallel: int = MISSING
    # One KV cache for all sequences (true) or one per sequence (false).
    kv_unified: bool = MISSING
    # Layers offloaded to the GPU (-1: all) on a CUDA or Metal build of llama-cpp-python; 0: the CPU.
    n_gpu_layers: int = MISSING


@dataclass
class JudgeConfig:
    """``evaluation.judge``: Flow Judge from the hub or a local GGUF, and the preset metrics it scores."""

    repo_id: str | None = MISSING
    filename: str | None = MISSING
    path: str | None = MISSING
    stand_in: bool = MISSING
    metrics: list[str] = MISSING
    max_tokens: int = MISSING
    max_feedback_chars: int = MISSING
    n_ctx: int = MISSING
    # The judge's lineage (Flow-Judge-v0.1 is a Phi-3.5-mini fine-tune): self-preference warning.
    family: str | None = MISSING
    # Pairs with known answers the judge scores before the models (cached per judge, metric, prompt
    # template and set); 0: no calibration, and the report says the judge is unmeasured.
    calibration_size: int = MISSING
    calibration_cache: str = MISSING
    # Judge only the first N evaluation prompts (null: all); the checked figures use every prompt.
    max_prompts: int | None = MISSING
    # Verdicts decoded together per llama.cpp batch, and whether they share one KV cache (as for answers).
    parallel: int = MISSING
    kv_unified: bool = MISSING
    # Layers offloaded to the GPU (-1: all), as for answers; 0: the CPU.
    n_gpu_layers: int = MISSING


@dataclass
class BootstrapConfig:
    """``evaluation.bootstrap``."""

    n_resamples: int = MISSING
    seed: int = MISSING


@dataclass
class EvaluationConfig:
    """``conf/evaluation/``."""

    enabled: bool = MISSING
    quant: Quant = MISSING
    # The winner is also answered and judged at each of these (e.g. [F16, Q4_K_M]): what
    # quantization costs, paired against F16. Empty: only ``quant``.
    quants: list[Quant] = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    # Answers and verdicts taken from the content-addressed stores under store_dir when the same work was
    # done before (any sweep, any evaluation); false: everything is made anew (and nothing is stored).
    reuse: bool = MISSING
    store_dir: str = MISSING


@dataclass
class EvalPromptsConfig:
    """``conf/eval_prompts/``: the prompts both models answer."""

    kind: PromptKind = MISSING
    path: str | None = MISSING
    split: str | None = MISSING
    prompt_field: str | None = MISSING
    reference_field: str | None = MISSING
    # null, or a node with _target_: a checker like orpolab.demo.sample_task.LookupChecker.
    checker: Any = MISSING
    max_prompts: int | None = MISSING


@dataclass
class VerifyConfig:
    """``export.verify``: limits per quantization type; a type without its own limit gets the default."""

    num_texts: int = MISSING
    max_ppl_ratio: dict[Quant, float] = MISSING
    min_top1_agreement: dict[Quant, float] = MISSING
    default_max_ppl_ratio: float = MISSING
    default_min_top1_agreement: float = MISSING


@dataclass
class ExportConfig:
    """``conf/export/``."""

    enabled: bool = MISSING
    quant_types: list[Quant] = MISSING
    include_base: bool = MISSING
    memory_headroom: float = MISSING
    log_gguf_max_mb: int = MISSING
    verify: VerifyConfig = field(default_factory=VerifyConfig)


@dataclass
class SelectionConfig:
    """``selection``: the metric that ranks a sweep's jobs and keeps each job's best checkpoint."""

    metric: str = MISSING
    mode: SelectionMode = MISSING


@dataclass
class TrainConfig:
    """``conf/train.yaml``: the root. Every group is typed here too, so files of the global package
    (``method/*.yaml``, ``experiment/*.yaml``), which write into several groups, are checked as well.

    ``paths``, ``trainer``, ``callbacks`` and ``logger`` stay open: they hold Lightning's own
    arguments (checked by Lightning when it builds them) and paths a user may extend.
    """

    paths: dict[str, Any] = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    trainer: dict[str, Any] = MISSING
    callbacks: dict[str, Any] = MISSING
    logger: dict[str, Any] = MISSING
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    eval_prompts: EvalPromptsConfig = field(default_factory=EvalPromptsConfig)
    task_name: str = MISSING
    seed: int = MISSING
    sweep_id: str | None = MISSING
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    threads: int | None = MISSING
    eval_before_training: bool = MISSING
    resume_from: str | None = MISSING
    # Experiment presets look values up by method name: optim.lr: ${lr_per_method.${method.name}}
    lr_per_method: dict[str, float] = MISSING


def register_schemas() -> None:
    """Store the root's schema in Hydra's ConfigStore (again is harmless): call before Hydra composes ``conf/``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_train", node=TrainConfig)


def settings(cls: type[T], node: DictConfig | dict | None, key: str) -> T:
    """The group ``key`` of a config as its dataclass, checked against the schema.

    A composed config is already checked; a saved one (plain YAML) is checked here, and a problem
    becomes an :class:`OrpolabError` naming the key instead of an OmegaConf traceback.
    """
    try:
        # Resolved first: the node's interpolations (method.beta: ${orpo.beta}) point into its own root.
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else (node or {})
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as err:
        raise OrpolabError(describe(err, key)) from err


def typed_key(cfg: DictConfig, key: str) -> str:
    """The key whose value ``key`` holds, following plain interpolations: ``orpo.beta`` for ``method.beta``
    under ``method=orpo`` (``method.beta: ${orpo.beta}``), ``method.beta`` itself when set directly.

    A message about a value names the key the user typed, decided from the config itself (an
    interpolation kept in a saved job config counts the same), not guessed from equal values.
    """
    seen = {key}
    while True:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node or not OmegaConf.is_interpolation(node, leaf):
            return key
        target = str(OmegaConf.to_container(node, resolve=False)[leaf])
        inner = target[2:-1] if target.startswith("${") and target.endswith("}") else ""
        if not inner.replace(".", "").replace("_", "").isalnum() or inner.startswith(".") or inner in seen:
            return key  # a resolver or a composed string: the key itself holds the value
        seen.add(inner)
        key = inner


def describe(err: OmegaConfBaseException, prefix: str = "") -> str:
    """OmegaConf's error in one line that starts with the full key (``export.quant_types[0]: ...``)."""
    full_key = getattr(err, "full_key", None) or ""
    full_key = f"{prefix}.{full_key}" if prefix and full_key else (full_key or prefix)
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    return f"{full_key}: {message}" if full_key else message
