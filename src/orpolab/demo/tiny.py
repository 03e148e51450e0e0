"""Tiny local models of the real architectures, for tests and the offline demo.

Each family gets the real model class (LlamaForCausalLM with Llama-3's rope scaling,
Phi3ForCausalLM with Phi-3.5's long-context rope, MistralForCausalLM) at toy size, and a
SentencePiece BPE tokenizer trained here on the sample task's text, carrying the family's special
tokens and chat template. Everything is written as an ordinary Hugging Face folder and later read
back through ``from_pretrained`` exactly like a hub model.

Widths are multiples of 256 so that GGUF K-quants (256-wide blocks) really apply on export.
``tokenizer.model`` is kept beside ``tokenizer.json`` because llama.cpp's converter reads the
SentencePiece file for these architectures.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from orpolab.core.files import atomic_dir

FAMILIES = ("llama", "phi", "mistral")
# Bump when what build() writes changes, so existing folders are rebuilt.
TINY_VERSION = "4"

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """SentencePiece control pieces and the extra special tokens of one family."""

    bos: str
    eos_piece: str
    eos_token: str  # the end-of-turn token generation stops at
    pad: str
    extra: tuple[str, ...]
    template: str
    unk: str = "<unk>"
    # SentencePiece's "dummy prefix": a space before every text run. Phi-3's tokenizer has it, and
    # llama.cpp's Phi-3 path always applies it (after every special token too), so the Hugging Face
    # side must do the same ("legacy" Metaspace, prepend_scheme "always") for identical token ids.
    prefix_space: bool = False


SPECS = {
    "llama": TokenizerSpec(
        bos="<|begin_of_text|>", eos_piece="<|end_of_text|>", eos_token="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
        template=LLAMA3_TEMPLATE,
    ),
    # Phi-3.5's vocabulary must hold <unk>, <s>, </s> and <|endoftext|>: llama.cpp looks them up by text.
    "phi": TokenizerSpec(
        bos="<s>", eos_piece="</s>", eos_token="<|endoftext|>", pad="<|endoftext|>",
        extra=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        template=PHI3_TEMPLATE, prefix_space=True,
    ),
    "mistral": TokenizerSpec(
        bos="<s>", eos_piece="</s>", eos_token="</s>", pad="</s>",
        extra=("[INST]", "[/INST]"),
        template=MISTRAL_TEMPLATE,
    ),
}


@dataclass
class TinyShape:
    """Toy sizes: every matrix row is a multiple of 256 wide so K-quants apply."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size_target: int = 512
    extra: dict = field(default_factory=dict)


def _corpus(data_dir: Path) -> list[str]:
    """Text to train the tokenizer on: every message of the bundled sample data."""
    texts: list[str] = []
    for name in ("train.jsonl", "eval.jsonl", "sft.jsonl", "prompts.jsonl"):
        path = data_dir / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("chosen", "rejected", "messages"):
                texts.extend(m["content"] for m in row.get(key, []))
            if "prompt" in row:
                texts.append(row["prompt"])
    # A little general text so tokens outside the task do not all fall back to bytes.
    texts += ["Hello! How can I help you today?", "Please answer the question.", "You are a helpful assistant."]
    return texts


def train_sentencepiece(texts: list[str], spec: TokenizerSpec, vocab_size: int) -> bytes:
    """A byte-fallback BPE model with the family's control and user-defined pieces."""
    import sentencepiece as spm

    model = io.BytesIO()
    user_defined = [t for t in spec.extra if t not in (spec.bos, spec.eos_piece, spec.unk)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, user_defined_symbols=user_defined, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece=spec.unk, bos_piece=spec.bos, eos_piece=spec.eos_piece, hard_vocab_limit=False,
        character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=spec.prefix_space, allow_whitespace_only_pieces=True,
        minloglevel=2, num_threads=1,
    )
    return model.getvalue()


def build_tokenizer(family: str, out: Path, data_dir: Path, vocab_size: int = 512):
    """Train, wrap as a Hugging Face LlamaTokenizer, save with the chat template; returns it."""
    from transformers import LlamaTokenizer

    spec = SPECS[family]
    proto = train_sentencepiece(_corpus(data_dir), spec, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto)
    tok = LlamaTokenizer.from_pretrained(
        str(out), bos_token=spec.bos, eos_token=spec.eos_token, unk_token=spec.unk, pad_token=spec.pad,
        add_prefix_space=spec.prefix_space, legacy=spec.prefix_space, extra_special_tokens=list(spec.extra),
    )
    tok.chat_template = spec.template
    tok.save_pretrained(str(out))
    from orpolab.export.llamacpp import write_added_tokens_decoder

    write_added_tokens_decoder(out, tok)
    return tok


def model_config(family: str, tok, shape: TinyShape):
    """A config of the real architecture at toy size, with the family's rope settings."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config

    common = dict(
        vocab_size=len(tok), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    head_dim = shape.hidden_size // shape.num_attention_heads
    if family == "llama":
        return LlamaConfig(
            **common, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        )
    if family == "phi":
        half = head_dim // 2
        # Phi-3.5-mini's LongRoPE: per-frequency factors for short and long contexts.
        short = [1.0 + 0.01 * i for i in range(half)]
        long_ = [1.0 + 0.5 * i for i in range(half)]
        return Phi3Config(
            **common, max_position_embeddings=131072, original_max_position_embeddings=4096,
            rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long_, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 4096},
            rms_norm_eps=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        )
    if family == "mistral":
        return MistralConfig(**common, max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def build(family: str, out: str | Path, data_dir: str | Path, seed: int = 0, shape: TinyShape | None = None) -> Path:
    """Build one tiny model folder (randomly initialised, seeded); written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out, data_dir = Path(out), Path(data_dir)
    shape = shape or TinyShape()
    with atomic_dir(out) as tmp:
        tok = build_tokenizer(family, tmp, data_dir, shape.vocab_size_target)
        config = model_config(family, tok, shape)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        model.save_pretrained(str(tmp))
        (tmp / ".orpolab-tiny-version").write_text(TINY_VERSION)
    return out


def is_current(folder: Path) -> bool:
    """True when ``folder`` holds a tiny model built by this version of ``build``."""
    stamp = Path(folder) / ".orpolab-tiny-version"
    return stamp.is_file() and stamp.read_text() == TINY_VERSION


def main() -> None:
    parser = argparse.ArgumentParser(description="Build tiny local models of the real architectures.")
    parser.add_argument("--out", default=".cache/tiny_models", help="folder that receives tiny_<family>/")
    parser.add_argument("--data", default="data/sample", help="sample data the tokenizer is trained on")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--force", action="store_true", help="rebuild folders that already exist")
    args = parser.parse_args()
    for family in args.families:
        target = Path(args.out) / f"tiny_{family}"
        if is_current(target) and not args.force:
            print(f"{target} is up to date (use --force to rebuild)")
            continue
        build(family, target, args.data)
        print(f"built {target}")


if __name__ == "__main__":
    main()
