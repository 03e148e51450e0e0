"""The settings each stage reads, one dataclass per config group.

Every stage builds its settings from these, so a key's type and default live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from orpolab.core.errors import OrpolabError

METHODS = ("orpo", "dpo", "simpo", "sft")
QUANT_TYPES = ("F16", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0")


@dataclass
class DataConfig:
    """Where the pairs come from and how they are cut to length (see ``conf/data/``)."""

    path: str
    split: str = "train"
    schema: str = "messages"  # "messages" or "strings"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    eval_path: str | None = None
    eval_split: str = "train"
    eval_size: float = 0.02  # fraction (<1) or row count (>=1) held out when eval_path is unset
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
    cache_dir: str = ".cache/tokenized"
    num_workers: int = 0


@dataclass
class ModelConfig:
    """One entry of ``conf/model/``."""

    name_or_path: str
    dtype: str = "float32"
    lora_target_modules: list[str] | str = "all-linear"
    attn_implementation: str | None = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False
    # Log-probs straight from the hidden states of the positions a loss uses, through the output
    # layer in chunks of this many positions (0: full-vocabulary logits everywhere, as TRL does).
    logps_chunk_size: int = 1024


@dataclass
class LoraSettings:
    """``conf/lora/``: adapter shape and optional 4-bit base weights (QLoRA)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None  # None: the model config's targets
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_use_double_quant: bool = True


@dataclass
class MethodConfig:
    """``conf/method/``: which loss trains the adapter, and its parameters.

    Fields a method does not use are ignored by it (``gamma`` only matters to SimPO, and so on).
    """

    name: str = "orpo"
    beta: float = 0.1
    # ORPO: NLL over "full" (prompt + response, TRL's default) or "completion". SFT always uses completion.
    nll_on: str = "full"
    # DPO: conservative DPO's label smoothing, and whether to compute the reference once before training.
    label_smoothing: float = 0.0
    precompute_ref_logps: bool = True
    # SimPO: target reward margin.
    gamma: float = 0.5
    # Dropout off everywhere (LoRA's included), as TRL's trainers do by default.
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise OrpolabError(f"method.name must be one of {', '.join(METHODS)}, got {self.name!r}")
        if self.name != "sft" and self.beta <= 0:
            key = "orpo.beta" if self.name == "orpo" else "method.beta"  # where the user sets it
            raise OrpolabError(f"{key} must be positive, got {self.beta} (method {self.name})")
        if self.nll_on not in ("full", "completion"):
            raise OrpolabError(f"orpo.nll_on must be 'full' or 'completion', got {self.nll_on!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise OrpolabError(f"method.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class OptimConfig:
    """``conf/optim/``: AdamW with warmup and a cosine or linear decay, stepped per optimizer step."""

    lr: float = 8e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant


@dataclass
class GenerationConfig:
    """``evaluation.generation``."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    n_ctx: int = 1024
    threads: int | None = None


@dataclass
class VerifyConfig:
    """``export.verify``: limits per quantization type (keys: F16, Q8_0, Q4_K_M, ...)."""

    num_texts: int = 24
    max_ppl_ratio: dict[str, float] = field(default_factory=lambda: {"F16": 1.02, "Q8_0": 1.05, "Q4_K_M": 1.3})
    min_top1_agreement: dict[str, float] = field(
        default_factory=lambda: {"F16": 0.97, "Q8_0": 0.95, "Q4_K_M": 0.85})
    default_max_ppl_ratio: float = 1.3
    default_min_top1_agreement: float = 0.85


@dataclass
class ExportConfig:
    """``conf/export/``."""

    enabled: bool = True
    quant_types: list[str] = field(default_factory=lambda: ["Q4_K_M"])
    include_base: bool = True
    memory_headroom: float = 1.2
    log_gguf_max_mb: int = 512
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    @classmethod
    def from_node(cls, node: DictConfig | dict | None) -> ExportConfig:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        verify = VerifyConfig(**values.pop("verify", {}))
        cfg = cls(**values, verify=verify)
        for q in cfg.quant_types:
            if q.upper() not in QUANT_TYPES or q.upper() == "F16":
                raise OrpolabError(
                    f"unsupported quantization type {q!r} in export.quant_types; choose from "
                    f"{', '.join(t for t in QUANT_TYPES if t != 'F16')} (f16 is always written)"
                )
        return cfg
