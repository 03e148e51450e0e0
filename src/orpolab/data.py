"""Preference data: load, check, apply the chat template, tokenize once, cache, and batch.

Rows may come in either common schema:
  * messages: ``chosen``/``rejected`` are lists of ``{role, content}`` that include the prompt
    turns (``mlabonne/orpo-dpo-mix-40k``, UltraFeedback-binarized);
  * strings: plain-string ``prompt``/``chosen``/``rejected`` columns (Anthropic-HH style pairs).
Column names are configurable. Rows that cannot be used are skipped and counted by reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from orpolab.errors import OrpolabError
from orpolab.files import write_json_atomic

log = logging.getLogger(__name__)

# Bump when the tokenized format changes, so stale caches are not reused.
CACHE_VERSION = 2


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


class SkipRow(Exception):
    """A row that cannot be used; the message is the reason counted in the statistics."""


# ---------------------------------------------------------------- raw loading


def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def read_json_rows(path: Path) -> list[dict]:
    """JSON lines (or one JSON array) with errors that name the file and line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise OrpolabError(f"{path} is not valid JSON: {err}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise OrpolabError(
                    f"{path} is not JSON lines: line {number} does not parse ({err.msg}). "
                    "Each line must be one JSON object."
                ) from None
    if not all(isinstance(r, dict) for r in rows):
        raise OrpolabError(f"{path}: every row must be a JSON object with the configured columns")
    return rows


def load_rows(path: str, split: str) -> list[dict]:
    """Rows from a local JSONL/JSON file, a local dataset folder, or a Hugging Face dataset id."""
    if _is_local(path):
        local = Path(path).expanduser()
        if not local.exists():
            raise OrpolabError(f"data path {local} does not exist")
        if local.is_file() and local.suffix in (".jsonl", ".json"):
            return read_json_rows(local)
        import datasets

        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()):
            ds = datasets.load_from_disk(str(local))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(str(local), split=split)
        return list(ds)
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as err:  # the hub raises many types; all mean the same to the user
        raise OrpolabError(
            f"could not load dataset {path!r} (split {split!r}) from the Hugging Face hub: {err}. "
            "Check the name and your network, or point data.path at a local JSONL file or folder."
        ) from err
    return list(ds)


# ---------------------------------------------------------------- row normalisation


def _check_messages(messages: Any, column: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise SkipRow(f"{column}_not_message_list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise SkipRow(f"{column}_bad_message")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise SkipRow(f"{column}_empty_or_non_string_content")
    return messages


def normalize_row(row: dict, cfg: DataConfig) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen answer, rejected answer) of one row, or ``SkipRow``."""
    chosen, rejected = row.get(cfg.chosen_column), row.get(cfg.rejected_column)
    if chosen is None or rejected is None:
        raise SkipRow("missing_column")
    if cfg.schema == "messages":
        chosen = _check_messages(chosen, "chosen")
        rejected = _check_messages(rejected, "rejected")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise SkipRow("no_assistant_turn")
        prompt = chosen[:-1]
        if not prompt:
            # Some datasets keep the prompt only in its own column.
            raw_prompt = row.get(cfg.prompt_column)
            if not isinstance(raw_prompt, str) or not raw_prompt.strip():
                raise SkipRow("no_prompt")
            prompt = [{"role": "user", "content": raw_prompt}]
        chosen_text, rejected_text = chosen[-1]["content"], rejected[-1]["content"]
    elif cfg.schema == "strings":
        raw_prompt = row.get(cfg.prompt_column)
        for value in (raw_prompt, chosen, rejected):
            if not isinstance(value, str) or not value.strip():
                raise SkipRow("empty_or_non_string_field")
        prompt = [{"role": "user", "content": raw_prompt}]
        chosen_text, rejected_text = chosen, rejected
    else:
        raise OrpolabError(f"data.schema must be 'messages' or 'strings', got {cfg.schema!r}")
    if chosen_text.strip() == rejected_text.strip():
        raise SkipRow("identical_chosen_rejected")
    return prompt, chosen_text, rejected_text


# ---------------------------------------------------------------- tokenization


def ensure_chat_template(tokenizer, fallback: str | None) -> None:
    """Use the tokenizer's own template; the configured fallback only when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return
    if not fallback:
        raise OrpolabError(
            "the tokenizer has no chat template; set data.fallback_chat_template "
            "(conf/data/default.yaml has a ChatML one) or use an instruct model"
        )
    tokenizer.chat_template = fallback


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
    if _is_local(path):
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


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    stats: dict[str, Any]
    data_hash: str


def prepare(cfg: DataConfig, tokenizer) -> PreparedData:
    """Tokenized train and eval pairs, from the on-disk cache when this tokenizer saw them before."""
    if cfg.max_prompt_length >= cfg.max_length:
        raise OrpolabError(
            f"data.max_prompt_length ({cfg.max_prompt_length}) must be below data.max_length "
            f"({cfg.max_length}) so every completion keeps some tokens"
        )
    ensure_chat_template(tokenizer, cfg.fallback_chat_template)
    key_fields = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(cfg.path, cfg.split),
        "eval_source": source_fingerprint(cfg.eval_path, cfg.eval_split) if cfg.eval_path else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **{k: getattr(cfg, k) for k in ("schema", "prompt_column", "chosen_column", "rejected_column",
                                        "eval_size", "split_seed", "max_train_rows", "max_eval_rows",
                                        "max_length", "max_prompt_length", "split", "eval_split")},
    }
    data_hash = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir) / data_hash
    if (cache / "data.json").exists():
        log.info("tokenized data from cache %s", cache)
        blob = json.loads((cache / "data.json").read_text())
        return PreparedData(blob["train"], blob["eval"], blob["stats"], data_hash)

    train_rows = load_rows(cfg.path, cfg.split)
    if cfg.eval_path:
        eval_rows = load_rows(cfg.eval_path, cfg.eval_split)
    else:
        train_rows, eval_rows = split_rows(train_rows, cfg.eval_size, cfg.split_seed)
    if cfg.max_train_rows:
        train_rows = train_rows[: cfg.max_train_rows]
    if cfg.max_eval_rows:
        eval_rows = eval_rows[: cfg.max_eval_rows]
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
    }
    write_json_atomic(cache / "data.json", {"train": train, "eval": evals, "stats": stats, "key": key_fields},
                      indent=None)
    return PreparedData(train, evals, stats, data_hash)


def split_rows(rows: list[dict], eval_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split: the same rows for every job, whatever its training seed."""
    n_eval = int(round(eval_size * len(rows))) if eval_size < 1 else int(eval_size)
    n_eval = max(1, min(n_eval, len(rows) - 1)) if len(rows) > 1 else 0
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    eval_idx = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [rows[i] for i in sorted(eval_idx)]



class PairCollator:
    """Stacks chosen and rejected sequences into one ``[2B, L]`` batch, padded to the longest.

    Rows ``0..B-1`` are chosen, ``B..2B-1`` rejected, so one forward pass serves both.
    ``labels`` hold the completion tokens only (prompt and padding are -100).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [(e["prompt_ids"], e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
        length = max(len(p) + len(c) for p, c in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), length), dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            ids = torch.tensor(p + c, dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            attention[i, : len(ids)] = 1
            labels[i, len(p): len(ids)] = ids[len(p):]
        answer_bytes = torch.tensor([e[k] for k in ("chosen_bytes", "rejected_bytes") for e in examples])
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "answer_bytes": answer_bytes}
        if all("index" in e for e in examples):
            batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        return batch


class IndexedPairs(torch.utils.data.Dataset):
    """Prepared pairs that also carry their position, so per-pair caches (DPO's reference) can be looked up."""

    def __init__(self, pairs: list[dict]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], "index": i}


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), and that can start mid-epoch.

    Lightning's plain DataLoader restarts an interrupted epoch from its first batch; a job resumed
    from a mid-epoch checkpoint would then see other data than an uninterrupted one. Here the
    checkpoint stores how many samples of the epoch were trained on, and the resumed epoch skips
    exactly those. ``len`` stays the full epoch, because Lightning counts the batches already done.
    """

    def __init__(self, num_samples: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 megabatch: int = 50):
        self.num_samples, self.seed = num_samples, seed
        self.lengths, self.batch_size, self.megabatch = lengths, batch_size, megabatch
        self.epoch = 0
        self.resume_epoch: int | None = None
        self.resume_offset = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at the start of every epoch
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The epoch's order; with lengths, shuffled groups of ``megabatch`` batches sorted longest first."""
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        if not self.lengths:
            return order
        size = self.batch_size * self.megabatch
        groups = [sorted(order[i: i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(order), size)]
        return [j for group in groups for j in group]

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        start = self.resume_offset if self.resume_epoch == self.epoch else 0
        self.resume_epoch, self.resume_offset = None, 0
        yield from self.order(self.epoch)[start:]


class PreferenceDataModule(L.LightningDataModule):
    """Serves prepared pairs; tokenization happens once in ``prepare`` before the trainer starts.

    Its ``state_dict`` (saved in every checkpoint) records the position in the training data, so a
    resumed job continues with the very batches an uninterrupted one would have seen.
    """

    def __init__(self, data: PreparedData, cfg: DataConfig, pad_token_id: int, seed: int):
        super().__init__()
        self.data, self.cfg, self.seed = data, cfg, seed
        self.collate = PairCollator(pad_token_id)
        lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in data.train]
        self.sampler = ResumableSampler(len(data.train), seed, lengths if cfg.group_by_length else None,
                                        cfg.batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(IndexedPairs(self.data.train), batch_size=self.cfg.batch_size, sampler=self.sampler,
                          collate_fn=self.collate, num_workers=self.cfg.num_workers, drop_last=False)

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return {"epoch": trainer.current_epoch, "samples_done": done * self.cfg.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.sampler.resume_epoch, self.sampler.resume_offset = state["epoch"], state["samples_done"]

    def val_dataloader(self) -> DataLoader:
        return self.reference_dataloader("val")

    def reference_dataloader(self, split: str) -> DataLoader:
        """A split in its stored order, for one pass that fills a per-pair cache."""
        pairs = {"train": self.data.train, "val": self.data.eval}[split]
        return DataLoader(IndexedPairs(pairs), batch_size=self.cfg.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.cfg.num_workers)
