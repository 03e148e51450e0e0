"""Preference rows from a file, a dataset folder or the hub, checked and normalised.

Rows may come in either common schema:
  * messages: ``chosen``/``rejected`` are lists of ``{role, content}`` that include the prompt
    turns (``mlabonne/orpo-dpo-mix-40k``, UltraFeedback-binarized);
  * strings: plain-string ``prompt``/``chosen``/``rejected`` columns (Anthropic-HH style pairs).
Column names are configurable. Rows that cannot be used are skipped and counted by reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orpolab.core.config import DataConfig
from orpolab.core.errors import OrpolabError
from orpolab.core.files import looks_local


class SkipRow(Exception):
    """A row that cannot be used; the message is the reason counted in the statistics."""


# ---------------------------------------------------------------- raw loading


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
    if looks_local(path):
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


def _count(size: float, n: int) -> int:
    """A fraction (< 1) of ``n`` rows, or a row count (>= 1)."""
    return int(round(size * n)) if size < 1 else int(size)


def split_rows(rows: list[dict], eval_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split: the same rows for every job, whatever its training seed."""
    rest, held, _ = carve(rows, [eval_size], seed)
    return rest, held[0]


def carve(rows: list[dict], sizes: list[float], seed: int) -> tuple[list[dict], list[list[dict]], list[int]]:
    """Cut consecutive parts of one seeded permutation out of ``rows``: (the rest, the parts, the rest's indices).

    The first part is what :func:`split_rows` always held out, so adding a second (the test split)
    keeps the validation rows as they were. Each part keeps the rows' file order; at least one row
    stays in the rest.
    """
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    parts, start = [], 0
    for size in sizes:
        n = max(1, min(_count(size, len(rows)), len(rows) - 1 - start)) if len(rows) - start > 1 else 0
        parts.append(sorted(order[start: start + n]))
        start += n
    taken = set(order[:start])
    rest = [i for i in range(len(rows)) if i not in taken]
    return [rows[i] for i in rest], [[rows[i] for i in part] for part in parts], rest


@dataclass
class Splits:
    """Train (fitting), validation (checkpoint and winner selection) and test (evaluation, judge calibration).

    Disjoint and deterministic: the same rows for every job of a sweep, whatever its training seed.
    ``sources`` says where each came from, for the report ("data/sample/test.jsonl", "20 rows of
    mlabonne/orpo-dpo-mix-40k held out with split_seed 42").
    """

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    sources: dict[str, str] = field(default_factory=dict)


def three_splits(cfg: DataConfig, need_train: bool = True) -> Splits:
    """The three splits of ``cfg``: from their own files where set, else carved from the training source.

    Validation is carved first (as before the test split existed), then test, from one permutation
    seeded by ``split_seed``. ``need_train=False`` skips loading the training source when both held-out
    splits have files of their own (the evaluation then reads only what it needs).
    """
    sizes, names = [], []
    if not cfg.eval_path:
        sizes.append(cfg.eval_size)
        names.append("validation")
    if not cfg.test_path:
        sizes.append(cfg.test_size)
        names.append("test")
    rows: list[dict] = load_rows(cfg.path, cfg.split) if (sizes or need_train) else []
    rest, parts, _ = carve(rows, sizes, cfg.split_seed) if sizes else (rows, [], [])
    carved = dict(zip(names, parts, strict=True))
    sources = {"train": f"{cfg.path} ({cfg.split})" + (" minus the held-out rows" if sizes else "")}
    for name, path, split in (("validation", cfg.eval_path, cfg.eval_split), ("test", cfg.test_path, cfg.test_split)):
        if path:
            carved[name] = load_rows(path, split)
            sources[name] = f"{path}" + (f" ({split})" if not str(path).endswith((".jsonl", ".json")) else "")
        else:
            sources[name] = f"{len(carved[name])} rows held out of {cfg.path} (split_seed {cfg.split_seed})"
    validation = carved["validation"][: cfg.max_eval_rows] if cfg.max_eval_rows else carved["validation"]
    test = carved["test"][: cfg.max_test_rows] if cfg.max_test_rows else carved["test"]
    train = rest[: cfg.max_train_rows] if cfg.max_train_rows else rest
    return Splits(train, validation, test, sources)


def prompt_key(row: dict, cfg: DataConfig) -> str | None:
    """The row's last user turn, whitespace-normalised: what "the same prompt" means for overlap checks."""
    try:
        prompt, _, _ = normalize_row(row, cfg)
    except SkipRow:
        return None
    return " ".join(prompt[-1]["content"].split()) if prompt[-1]["role"] == "user" else None


def overlap(prompts: list[str], rows: list[dict], cfg: DataConfig) -> int:
    """How many of ``prompts`` appear (identically, up to whitespace) as a prompt of ``rows``."""
    seen = {k for k in (prompt_key(r, cfg) for r in rows) if k}
    return sum(" ".join(p.split()) in seen for p in prompts)
