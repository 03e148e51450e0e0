"""The fixed sets of values a setting takes, as enums that are also the plain strings the YAML files hold.

OmegaConf has no ``Literal``: an enum field makes it check the name (``mode: maximum`` is refused,
naming the allowed ones) while Hydra composes the config, before any job starts.
"""

from __future__ import annotations

from enum import Enum


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
