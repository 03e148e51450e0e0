"""Load a causal LM and its tokenizer, and wrap the model with a LoRA adapter (peft).

The same ``from_pretrained`` path serves hub ids and local folders (the tiny models), so what the
tests exercise is what a user with network runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from orpolab.core.config import LoraSettings, ModelConfig
from orpolab.core.errors import OrpolabError
from orpolab.core.files import looks_local

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}




def _explain_load_error(name: str, err: Exception) -> OrpolabError:
    text = f"{type(err).__name__}: {err}"
    if "gated" in text.lower() or "401" in text or "403" in text:
        return OrpolabError(
            f"{name} is a gated model on the Hugging Face hub and no valid token was sent. Accept its "
            f"licence at https://huggingface.co/{name}, then log in with `hf auth login` (or set HF_TOKEN)."
        )
    if "offline" in text.lower() or "connection" in text.lower() or "resolve" in text.lower():
        return OrpolabError(
            f"could not download {name} from the Hugging Face hub ({type(err).__name__}). Check your network, "
            "or set model.name_or_path to a local folder."
        )
    return OrpolabError(f"could not load {name}: {text}")


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer with a pad token (the end-of-sequence token when it has none)."""
    from transformers import AutoTokenizer

    _check_path(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except OrpolabError:
        raise
    except Exception as err:
        raise _explain_load_error(cfg.name_or_path, err) from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_path(name_or_path: str) -> None:
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise OrpolabError(
            f"model path {name_or_path} does not exist. Point model.name_or_path at a Hugging Face model "
            "folder or a hub id; for the tiny offline models run `make tiny-models`."
        )


def load_model(cfg: ModelConfig, lora: LoraSettings | None = None, gradient_checkpointing: bool = False):
    """The base model (optionally 4-bit), with gradient checkpointing enabled before LoRA wraps it."""
    from transformers import AutoModelForCausalLM

    _check_path(cfg.name_or_path)
    kwargs = {"dtype": DTYPES.get(cfg.dtype, "auto"), "revision": cfg.revision,
              "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if lora is not None and lora.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=lora.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=DTYPES[lora.bnb_4bit_compute_dtype],
            bnb_4bit_use_double_quant=lora.bnb_4bit_use_double_quant,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except Exception as err:
        raise _explain_load_error(cfg.name_or_path, err) from err
    if lora is not None and lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def apply_lora(model, cfg: ModelConfig, lora: LoraSettings):
    """Wrap with a fresh LoRA adapter; only its parameters train."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if lora.target_modules is not None else cfg.lora_target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(targets) if not isinstance(targets, str) else targets,
                             task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        raise OrpolabError(
            f"LoRA targets {targets} do not match modules of {cfg.name_or_path}: {err}. "
            "Set model.lora_target_modules (or lora.target_modules) to its linear layer names, or 'all-linear'."
        ) from err
