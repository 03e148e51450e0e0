"""Apply a trained LoRA adapter to a full-precision reload of its base model and merge it (peft).

The base is reloaded unquantized, in its own 16-bit dtype (float32 for float32 models), even when
the job trained with 4-bit QLoRA: merging into 4-bit layers would round the adapter away.
Before loading, the memory the model needs is compared with what the machine has, so a model that
does not fit stops with a sentence instead of being killed by the operating system.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import torch

from orpolab.core.config import LoraSettings, ModelConfig
from orpolab.core.errors import OrpolabError
from orpolab.core.files import atomic_dir
from orpolab.export.llamacpp import write_added_tokens_decoder
from orpolab.train.data import ensure_chat_template
from orpolab.train.model import DTYPES, apply_lora, load_tokenizer

SIXTEEN_BIT = {torch.bfloat16, torch.float16}


def available_memory() -> int:
    """Bytes the process can still allocate (a function so tests can pretend a small machine)."""
    import psutil

    return int(psutil.virtual_memory().available)


def free_disk(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def merge_dtype(model_cfg: ModelConfig, hf_config) -> torch.dtype:
    """The base model's own 16-bit dtype, else float32 (never a quantized type)."""
    own = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    own = DTYPES.get(str(own).replace("torch.", ""), own) if own is not None else None
    if own in SIXTEEN_BIT:
        return own
    configured = DTYPES.get(model_cfg.dtype)
    return configured if configured in SIXTEEN_BIT else torch.float32


def parameter_count(hf_config) -> int:
    """Parameters of the architecture, counted on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def check_memory(name: str, n_params: int, dtype: torch.dtype, headroom: float = 1.2) -> int:
    """Raise a clear error when the model will not fit in memory; returns the bytes needed."""
    need = int(n_params * torch.finfo(dtype).bits // 8 * headroom)
    have = available_memory()
    if need > have:
        raise OrpolabError(
            f"merging {name} needs about {need / 2**30:.1f} GiB of memory in {str(dtype).replace('torch.', '')} "
            f"({n_params / 1e9:.2f}B parameters) but only {have / 2**30:.1f} GiB is available. Run the export "
            "on a machine with more memory: `python -m orpolab.export <sweep folder>`."
        )
    return need


def check_disk(path: Path, need: int, what: str) -> None:
    have = free_disk(path)
    if need > have:
        raise OrpolabError(
            f"{what} needs about {need / 2**30:.2f} GiB of disk in {path} but only {have / 2**30:.2f} GiB is free"
        )


def load_adapter_state(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """LoRA tensors from a Lightning checkpoint, keys as peft names them (``model.`` prefix removed)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise OrpolabError(f"adapter checkpoint {path} does not exist")
    try:
        # Tensors and plain containers only: unpickling a checkpoint must not run code from it.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    except Exception as err:
        raise checkpoint_error(path, err) from err
    lora = {k.removeprefix("model."): v for k, v in state.items() if "lora_" in k}
    if not lora:
        raise OrpolabError(f"adapter checkpoint {path} holds no LoRA weights")
    return lora


def checkpoint_error(path: Path, err: Exception) -> OrpolabError:
    """Why a checkpoint did not load, in a sentence: an object torch refuses to unpickle, or a damaged file."""
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if unsafe:
        return OrpolabError(f"adapter checkpoint {path} holds an object of type {unsafe.group(1)} besides tensors and "
                            "plain values; it is not loaded, because unpickling it could run code. Export a checkpoint "
                            "written by orpolab's training.")
    reason = "not a PyTorch file" if isinstance(err, pickle.UnpicklingError) else f"{type(err).__name__}: {err}"
    return OrpolabError(f"adapter checkpoint {path} is corrupt or not a Lightning checkpoint ({reason})")


def build_adapted(model_cfg: ModelConfig, lora_cfg: LoraSettings, ckpt_path: str | Path, dtype: torch.dtype):
    """Base model (unquantized) + the trained adapter, as a peft model."""
    from transformers import AutoModelForCausalLM

    lora_cfg = LoraSettings(**{**lora_cfg.__dict__, "load_in_4bit": False})
    state = load_adapter_state(ckpt_path)
    base = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=dtype, revision=model_cfg.revision)
    model = apply_lora(base, model_cfg, lora_cfg)
    expected = {k for k, _ in model.named_parameters() if "lora_" in k}
    missing = expected - set(state)
    if missing:
        raise OrpolabError(
            f"adapter checkpoint {ckpt_path} does not match the model: {len(missing)} LoRA tensors missing "
            f"(e.g. {sorted(missing)[0]})"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k in expected}, strict=False)
    return model.eval()


def tokenizer_model_file(name_or_path: str) -> Path | None:
    """``tokenizer.model`` of the base (llama.cpp's converter reads it for SentencePiece vocabularies)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        f = local / "tokenizer.model"
        return f if f.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(name_or_path, "tokenizer.model", _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def save_tokenizer(tokenizer, folder: Path, model_cfg: ModelConfig) -> None:
    """The tokenizer, its chat template and what llama.cpp's converter reads besides, into ``folder``."""
    tokenizer.save_pretrained(str(folder))
    write_added_tokens_decoder(folder, tokenizer)
    sp_model = tokenizer_model_file(model_cfg.name_or_path)
    if sp_model is not None:
        shutil.copy(sp_model, Path(folder) / "tokenizer.model")


def merge(model_cfg: ModelConfig, lora_cfg: LoraSettings, ckpt_path: str | Path, out_dir: Path,
          adapter_dir: Path | None = None, headroom: float = 1.2, fallback_chat_template: str | None = None) -> Path:
    """Write the merged model, its tokenizer and chat template to ``out_dir`` (atomically).

    ``adapter_dir`` also receives the adapter alone, in peft's format, for users who prefer to
    load base + adapter. ``fallback_chat_template``: the job's ``data.fallback_chat_template``; a
    base tokenizer without a template of its own gets it, as in training, so the merged model (and
    through llama.cpp's converter its GGUF) formats chats the way the model was trained on.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    dtype = merge_dtype(model_cfg, hf_config)
    n_params = parameter_count(hf_config)
    check_memory(model_cfg.name_or_path, n_params, dtype, headroom)
    check_disk(out_dir.parent, n_params * torch.finfo(dtype).bits // 8, "the merged model")
    tokenizer = load_tokenizer(model_cfg)
    ensure_chat_template(tokenizer, fallback_chat_template)
    model = build_adapted(model_cfg, lora_cfg, ckpt_path, dtype)
    if adapter_dir is not None:
        with atomic_dir(adapter_dir) as tmp:
            model.save_pretrained(str(tmp))  # the adapter alone, in peft's format
    with atomic_dir(out_dir) as tmp:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp, model_cfg)
    return out_dir


def with_chat_template(model_cfg: ModelConfig, model_dir: Path, fallback_chat_template: str | None,
                       out_dir: Path) -> Path:
    """``model_dir`` itself, or, when its tokenizer has no chat template, a copy that has the fallback.

    For the base model's GGUF: the evaluation has base and trained model answer through their own
    GGUF's template, which must be the same for a fair comparison. The copy links the weights and
    writes the tokenizer anew; llama.cpp's converter reads it like any model folder.
    """
    tokenizer = load_tokenizer(model_cfg)
    if not ensure_chat_template(tokenizer, fallback_chat_template):
        return model_dir
    with atomic_dir(out_dir) as tmp:
        for item in Path(model_dir).iterdir():
            if item.is_file():
                (tmp / item.name).symlink_to(item.resolve())
        for name in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "special_tokens_map.json",
                     "tokenizer.model"):
            (tmp / name).unlink(missing_ok=True)  # links to the base's files: written anew, not through them
        save_tokenizer(tokenizer, tmp, model_cfg)
    return out_dir
