"""Tokenizing preference pairs through the chat template, once per sweep (cached by content)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from orpolab.core.config import DataConfig
from orpolab.core.errors import OrpolabError
from orpolab.core.files import looks_local, write_json_atomic
from orpolab.train.data.loading import SkipRow, normalize_row, overlap, prompt_key, three_splits

log = logging.getLogger(__name__)

# Bump when the tokenized format changes, so stale caches are not reused.
CACHE_VERSION = 3


def ensure_chat_template(tokenizer, fallback: str | None) -> bool:
    """Use the tokenizer's own template; the configured fallback only when it has none (a base model).

    Returns whether the fallback was set. The fallback must close the assistant's turn with the
    tokenizer's EOS token: that is the one token llama.cpp, like transformers, stops generating at,
    so a template closing turns with anything else would train a model that never stops in its GGUF.
    The export sets the same fallback on the merged model's tokenizer, so its GGUF carries it.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    if not fallback:
        raise OrpolabError(
            "the tokenizer has no chat template; set data.fallback_chat_template "
            "(conf/data/orpo_dpo_mix.yaml has one) or use an instruct model"
        )
    if not tokenizer.eos_token:
        raise OrpolabError("the tokenizer has neither a chat template nor an end-of-sequence token to end the "
                           "assistant's turn with; use a model whose tokenizer has one of them")
    tokenizer.chat_template = fallback
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    try:
        _, completion = render(tokenizer, probe[:1], probe[1]["content"])
    except Exception as err:
        tokenizer.chat_template = None
        raise OrpolabError(f"data.fallback_chat_template does not render: {type(err).__name__}: {err}") from err
    if tokenizer.eos_token not in completion:
        tokenizer.chat_template = None
        raise OrpolabError(
            "data.fallback_chat_template must close the assistant's turn with the tokenizer's end-of-sequence "
            f"token ({{{{ eos_token }}}}, here {tokenizer.eos_token!r}), the token llama.cpp stops at; "
            f"it renders the answer as {completion!r}"
        )
    return True


def render(tokenizer, prompt: list[dict], answer: str) -> tuple[str, str]:
    """Prompt text (with the generation prompt) and completion text, via the chat template.

    The completion is what the template adds after the prompt for the assistant turn, end-of-turn
    tokens included, so the model learns to stop the way the template says.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": answer}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        # Templates that rewrite earlier turns (rare) cannot be split at the prompt boundary.
        raise SkipRow("template_prompt_not_prefix")
    return prompt_text, full_text[len(prompt_text):]


def tokenize_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_length: int,
                  max_prompt_length: int) -> dict[str, Any]:
    """Token ids of prompt and both completions, truncated so every completion keeps tokens.

    When prompt plus the longer completion exceeds ``max_length``, the prompt keeps its last
    ``max_prompt_length`` tokens (the question nearest the answer) and each completion keeps its
    first ``max_length - len(prompt)`` tokens, at least ``max_length - max_prompt_length``.
    """
    prompt_text, chosen_completion = render(tokenizer, prompt, chosen)
    _, rejected_completion = render(tokenizer, prompt, rejected)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    p = enc(prompt_text)

    def completion_ids(completion: str) -> list[int]:
        # Tokenize the whole conversation and cut at the prompt: the ids then equal what
        # inference sees (tokenizing the answer on its own can differ at the boundary, e.g. a
        # SentencePiece prefix space). Fall back to the answer alone if the prompt is not a prefix.
        full = enc(prompt_text + completion)
        return full[len(p):] if full[: len(p)] == p else enc(completion)

    c, r = completion_ids(chosen_completion), completion_ids(rejected_completion)
    truncated = len(p) + max(len(c), len(r)) > max_length
    if truncated:
        p = p[-max_prompt_length:] if len(p) > max_prompt_length else p
        c, r = c[: max_length - len(p)], r[: max_length - len(p)]

    def answer_bytes(ids: list[int], text: str) -> int:
        # Tokenizer-independent denominator: bytes of the answer text that the tokens cover.
        if not truncated:
            return len(text.encode("utf-8"))
        return max(1, len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")))

    return {
        "prompt_ids": p,
        "chosen_ids": c,
        "rejected_ids": r,
        "chosen_bytes": answer_bytes(c, chosen),
        "rejected_bytes": answer_bytes(r, rejected),
        "truncated": truncated,
    }


def tokenize_rows(rows: Iterable[dict], tokenizer, cfg: DataConfig, desc: str) -> tuple[list[dict], Counter]:
    """Tokenize usable rows; returns them and the count of skipped rows by reason."""
    out, skipped = [], Counter()
    for row in tqdm(list(rows), desc=desc, unit="pair", mininterval=1.0, disable=None):
        try:
            prompt, chosen, rejected = normalize_row(row, cfg)
            out.append(tokenize_pair(tokenizer, prompt, chosen, rejected, cfg.max_length, cfg.max_prompt_length))
        except SkipRow as reason:
            skipped[str(reason)] += 1
    return out, skipped


# ---------------------------------------------------------------- cache


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(path: str, split: str) -> str:
    """Content hash for local data (so edits invalidate the cache); name and split for hub data."""
    if looks_local(path):
        local = Path(path).expanduser()
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        return hashlib.sha256("".join(_file_digest(f) for f in files).encode()).hexdigest()
    return f"hub:{path}:{split}"


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes with vocabulary, merges, special tokens and chat template, not with the model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    payload += str(tokenizer.chat_template) + str(tokenizer.all_special_tokens)
    return hashlib.sha256(payload.encode()).hexdigest()


def prompts_of(rows: list[dict], cfg: DataConfig) -> list[str]:
    """The usable rows' prompts (last user turns), for overlap counts."""
    return [k for k in (prompt_key(r, cfg) for r in rows) if k]


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    stats: dict[str, Any]
    data_hash: str


def prepare(cfg: DataConfig, tokenizer) -> PreparedData:
    """Tokenized train and eval pairs, from the on-disk cache when this tokenizer saw them before."""
    ensure_chat_template(tokenizer, cfg.fallback_chat_template)
    key_fields = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(cfg.path, cfg.split),
        "eval_source": source_fingerprint(cfg.eval_path, cfg.eval_split) if cfg.eval_path else None,
        "test_source": source_fingerprint(cfg.test_path, cfg.test_split) if cfg.test_path else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **{k: getattr(cfg, k) for k in ("schema", "prompt_column", "chosen_column", "rejected_column",
                                        "eval_size", "test_size", "split_seed", "max_train_rows",
                                        "max_eval_rows", "max_test_rows", "max_length", "max_prompt_length",
                                        "split", "eval_split", "test_split")},
    }
    data_hash = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir) / data_hash
    if (cache / "data.json").exists():
        log.info("tokenized data from cache %s", cache)
        blob = json.loads((cache / "data.json").read_text())
        return PreparedData(blob["train"], blob["eval"], blob["stats"], data_hash)

    # The test split is set aside here, never tokenized: it is the evaluation's, not training's.
    splits = three_splits(cfg)
    train_rows, eval_rows = splits.train, splits.validation
    train, skipped_train = tokenize_rows(train_rows, tokenizer, cfg, "tokenize train")
    evals, skipped_eval = tokenize_rows(eval_rows, tokenizer, cfg, "tokenize eval")
    for name, kept, skipped, total in (("train", train, skipped_train, len(train_rows)),
                                       ("eval", evals, skipped_eval, len(eval_rows))):
        if skipped:
            log.warning("%s: skipped %d of %d rows: %s", name, sum(skipped.values()), total, dict(skipped))
        if not kept:
            raise OrpolabError(
                f"no usable {name} pairs in {cfg.eval_path if name == 'eval' and cfg.eval_path else cfg.path}: "
                f"all {total} rows were skipped ({dict(skipped) or 'the source is empty'}). Check data.schema "
                "and the column names in conf/data/."
            )
    stats = {
        "train_pairs": len(train), "eval_pairs": len(evals),
        "train_skipped": dict(skipped_train), "eval_skipped": dict(skipped_eval),
        "train_truncated": sum(r["truncated"] for r in train), "eval_truncated": sum(r["truncated"] for r in evals),
        "test_rows": len(splits.test), "sources": splits.sources,
        # Identical prompts across splits would leak: counted here, shown in the report.
        "validation_prompts_in_train": overlap(prompts_of(eval_rows, cfg), train_rows, cfg),
        "test_prompts_in_train": overlap(prompts_of(splits.test, cfg), train_rows, cfg),
    }
    write_json_atomic(cache / "data.json", {"train": train, "eval": evals, "stats": stats, "key": key_fields},
                      indent=None)
    return PreparedData(train, evals, stats, data_hash)


