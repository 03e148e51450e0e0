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
  export and the evaluation read) is checked the same way.

The enums are also plain strings (:class:`Choice`), so the stages compare, format and serialise
them as the strings the YAML files hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orpolab.core.errors import OrpolabError

# ``${orpolab_first:${model.lr},8.0e-5}``: the first value that is set (conf/optim falls back from the
# model's own learning rate to the default). Registered on import: every stage that resolves a config
# reads it through this module.
FIRST_SET = "orpolab_first"
if not OmegaConf.has_resolver(FIRST_SET):
    OmegaConf.register_new_resolver(FIRST_SET, lambda *values: next((v for v in values if v is not None), None))

T = TypeVar("T")


class Choice(str, Enum):
    """A value from a fixed set that is also the plain string it stands for.

    OmegaConf checks the name (``mode: maximum`` is refused, naming the allowed ones); the code
    reading it gets a ``str`` that compares, hashes, formats and JSON-encodes as ``"min"``, so no
    reader needs to know it came from an enum. Member names equal their values for that reason.
    """

    def __str__(self) -> str:
        return str.__str__(self)


class Method(Choice):
    orpo = "orpo"
    dpo = "dpo"
    simpo = "simpo"
    sft = "sft"


class NllOn(Choice):
    full = "full"
    completion = "completion"


class DataSchema(Choice):
    messages = "messages"
    strings = "strings"


class Schedule(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class ModelDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"
    # Short names some model cards use.
    fp32 = "float32"
    bf16 = "bfloat16"
    fp16 = "float16"


class ComputeDtype(Choice):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class FourBitType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class Quant(Choice):
    """llama.cpp's file types this project writes (F16 is the converter's output, the rest quantize it)."""

    F16 = "F16"
    Q8_0 = "Q8_0"
    Q4_K_M = "Q4_K_M"
    Q5_K_M = "Q5_K_M"
    Q6_K = "Q6_K"
    Q4_0 = "Q4_0"


class SelectionMode(Choice):
    min = "min"
    max = "max"


class PromptKind(Choice):
    heldout = "heldout"
    conversations = "conversations"
    fields = "fields"


QUANT_TYPES = tuple(q.value for q in Quant)

# The groups that act only after training: the export of the winner and its evaluation. They are not
# part of a sweep's identity (orpolab.sweep.sweep_id), cannot be swept, and the stage commands
# (python -m orpolab.export / orpolab.evaluate) take overrides of them (orpolab.core.stage_config).
POST_TRAINING = ("export", "evaluation", "eval_prompts")


@dataclass
class DataConfig:
    """Where the pairs come from and how they are cut to length (see ``conf/data/``)."""

    path: str
    split: str = "train"
    schema: DataSchema = DataSchema.messages
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    eval_path: str | None = None
    eval_split: str = "train"
    eval_size: float = 0.02  # fraction (<1) or row count (>=1) held out when eval_path is unset
    # The test split (evaluation prompts, judge calibration, the report's comparisons): never used to
    # train or to select; carved from the training rows after validation when test_path is unset.
    test_path: str | None = None
    test_split: str = "train"
    test_size: float = 0.02  # fraction (<1) or row count (>=1)
    max_test_rows: int | None = None
    split_seed: int = 42
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    max_length: int = 1024
    max_prompt_length: int = 512
    fallback_chat_template: str | None = None
    batch_size: int = 8
    eval_batch_size: int = 16
    # Batches of similar length (shuffled groups of 50 batches, sorted within): less padding, as
    # Hugging Face's group_by_length / TRL's train_sampling_strategy="group_by_length".
    group_by_length: bool = True
    # Prefix sharing with packing: each pair laid out once as prompt, chosen, rejected, several pairs
    # per row of max_length tokens, with a block attention mask; the same numbers as the plain layout.
    # Off by itself (one log line) for attention kernels without custom masks or short sliding windows.
    packing: bool = True
    cache_dir: str = ".cache/tokenized"
    num_workers: int = 0


@dataclass
class ModelConfig:
    """One entry of ``conf/model/``."""

    name_or_path: str
    dtype: ModelDtype = ModelDtype.float32
    # A list of module names, or "all-linear" (OmegaConf types no union of a list and a string).
    lora_target_modules: Any = "all-linear"
    attn_implementation: str | None = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False
    # Log-probs straight from the hidden states of the positions a loss uses, through the output
    # layer in chunks of this many positions (0: full-vocabulary logits everywhere, as TRL does).
    logps_chunk_size: int = 1024
    # Lineage (who trained the weights this model descends from), not the architecture: SmolLM2 and
    # Llama share ``llama`` in a GGUF. The report warns when a judge judges its own family.
    family: str | None = None
    # This model's own learning rate: conf/optim's default uses it when set (a method's lr, or
    # optim.lr=..., still wins).
    lr: float | None = None


@dataclass
class LoraSettings:
    """``conf/lora/``: adapter shape and optional 4-bit base weights (QLoRA)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = None  # None: the model config's targets; else as model.lora_target_modules
    load_in_4bit: bool = False
    bnb_4bit_quant_type: FourBitType = FourBitType.nf4
    bnb_4bit_compute_dtype: ComputeDtype = ComputeDtype.bfloat16
    bnb_4bit_use_double_quant: bool = True


@dataclass
class MethodConfig:
    """``conf/method/``: which loss trains the adapter, and its parameters.

    Fields a method does not use are ignored by it (``gamma`` only matters to SimPO, and so on).
    """

    name: Method = Method.orpo
    beta: float = 0.1
    # ORPO: NLL over "full" (prompt + response, TRL's default) or "completion". SFT always uses completion.
    nll_on: NllOn = NllOn.full
    # DPO: conservative DPO's label smoothing, and whether to compute the reference once before training.
    label_smoothing: float = 0.0
    precompute_ref_logps: bool = True
    # SimPO: target reward margin.
    gamma: float = 0.5
    # Dropout off everywhere (LoRA's included), as TRL's trainers do by default.
    disable_dropout: bool = True


@dataclass
class OrpoConfig:
    """``conf/orpo/``: ORPO's parameters, which ``method/orpo.yaml`` hands to ``method``."""

    beta: float = 0.1
    nll_on: NllOn = NllOn.full
    disable_dropout: bool = True


@dataclass
class OptimConfig:
    """``conf/optim/``: AdamW with warmup and a cosine or linear decay, stepped per optimizer step."""

    lr: float = 8e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Schedule = Schedule.cosine


@dataclass
class GenerationConfig:
    """``evaluation.generation``."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    n_ctx: int = 1024
    threads: int | None = None
    # Answers decoded together per llama.cpp batch (one pass over the weights serves all of them).
    parallel: int = 32
    # One KV cache for all sequences (true) or one per sequence (false).
    kv_unified: bool = False


@dataclass
class JudgeConfig:
    """``evaluation.judge``: Flow Judge from the hub or a local GGUF, and the preset metrics it scores."""

    repo_id: str | None = "flowaicom/Flow-Judge-v0.1-GGUF"
    filename: str | None = "flow-judge-v0.1-Q4_K_M.gguf"
    path: str | None = None
    stand_in: bool = False
    metrics: list[str] = field(default_factory=lambda: ["RESPONSE_CORRECTNESS_5POINT"])
    max_tokens: int = 400
    max_feedback_chars: int = 600
    n_ctx: int = 4096
    # The judge's lineage (Flow-Judge-v0.1 is a Phi-3.5-mini fine-tune): self-preference warning.
    family: str | None = "phi3"
    # Pairs with known answers the judge scores before the models (cached per judge, metric, prompt
    # template and set); 0: no calibration, and the report says the judge is unmeasured.
    calibration_size: int = 100
    calibration_cache: str = ".cache/judge-calibration"
    # Judge only the first N evaluation prompts (null: all); the checked figures use every prompt.
    max_prompts: int | None = None
    # Verdicts decoded together per llama.cpp batch, and whether they share one KV cache (as for answers).
    parallel: int = 1
    kv_unified: bool = False


@dataclass
class BootstrapConfig:
    """``evaluation.bootstrap``."""

    n_resamples: int = 1000
    seed: int = 0


@dataclass
class EvaluationConfig:
    """``conf/evaluation/``."""

    enabled: bool = True
    quant: Quant = Quant.Q4_K_M
    # The winner is also answered and judged at each of these (e.g. [F16, Q4_K_M]): what
    # quantization costs, paired against F16. Empty: only ``quant``.
    quants: list[Quant] = field(default_factory=list)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)


@dataclass
class EvalPromptsConfig:
    """``conf/eval_prompts/``: the prompts both models answer."""

    kind: PromptKind = PromptKind.heldout
    path: str | None = None
    split: str | None = None
    prompt_field: str | None = None
    reference_field: str | None = None
    # null, or a node with _target_: a checker like orpolab.demo.sample_task.LookupChecker.
    checker: Any = None
    max_prompts: int | None = 100


@dataclass
class VerifyConfig:
    """``export.verify``: limits per quantization type; a type without its own limit gets the default."""

    num_texts: int = 24
    max_ppl_ratio: dict[Quant, float] = field(default_factory=lambda: {"F16": 1.02, "Q8_0": 1.05, "Q4_K_M": 1.3})
    min_top1_agreement: dict[Quant, float] = field(
        default_factory=lambda: {"F16": 0.97, "Q8_0": 0.95, "Q4_K_M": 0.85})
    default_max_ppl_ratio: float = 1.3
    default_min_top1_agreement: float = 0.85


@dataclass
class ExportConfig:
    """``conf/export/``."""

    enabled: bool = True
    quant_types: list[Quant] = field(default_factory=lambda: [Quant.Q4_K_M])
    include_base: bool = True
    memory_headroom: float = 1.2
    log_gguf_max_mb: int = 512
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    @classmethod
    def from_node(cls, node: DictConfig | dict | None) -> ExportConfig:
        """The export settings of a saved sweep config or the export's command line, checked as a sweep's are.

        Quantization types may be given in lower case on the command line (``--quant q8_0``).
        """
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        if values.get("quant_types"):
            values["quant_types"] = [str(q).upper() for q in values["quant_types"]]
        cfg = settings(cls, values, "export")
        from orpolab.core.validate import check_export

        check_export(cfg)
        return cfg


@dataclass
class SelectionConfig:
    """``selection``: the metric that ranks a sweep's jobs and keeps each job's best checkpoint."""

    metric: str = "val/chosen_bpb"
    mode: SelectionMode = SelectionMode.min


@dataclass
class TrainConfig:
    """``conf/train.yaml``: the root. Every group is typed here too, so files of the global package
    (``method/*.yaml``, ``experiment/*.yaml``), which write into several groups, are checked as well.

    ``paths``, ``trainer``, ``callbacks`` and ``logger`` stay open: they hold Lightning's own
    arguments (checked by Lightning when it builds them) and paths a user may extend.
    """

    paths: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    eval_prompts: EvalPromptsConfig = field(default_factory=EvalPromptsConfig)
    task_name: str = "orpo"
    seed: int = 42
    sweep_id: str | None = None
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    threads: int | None = None
    eval_before_training: bool = True
    resume_from: str | None = None
    # Experiment presets look values up by method name: optim.lr: ${lr_per_method.${method.name}}
    lr_per_method: dict[str, float] = field(default_factory=dict)


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


def describe(err: OmegaConfBaseException, prefix: str = "") -> str:
    """OmegaConf's error in one line that starts with the full key (``export.quant_types[0]: ...``)."""
    full_key = getattr(err, "full_key", None) or ""
    full_key = f"{prefix}.{full_key}" if prefix and full_key else (full_key or prefix)
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    return f"{full_key}: {message}" if full_key else message
