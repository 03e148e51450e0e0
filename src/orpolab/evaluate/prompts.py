"""The prompts an evaluation asks, and the checker that marks answers to them right or wrong.

Three kinds (``eval_prompts.kind``): the sweep's own test split (``heldout``: never trained on, and not
the validation rows that picked the checkpoints and the winner), a conversation file (``conversations``:
ShareGPT-style turns) or any file with a prompt field (``fields``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from orpolab.core.config import DataConfig, EvalPromptsConfig, settings
from orpolab.core.errors import OrpolabError
from orpolab.train.data import SkipRow, load_rows, normalize_row, three_splits


def make_checker(prompts_cfg: EvalPromptsConfig) -> Any:
    """``eval_prompts.checker``: an object with ``figures``, ``check``, ``reference`` and ``examples``
    built from its ``_target_`` (``orpolab.demo.sample_task.LookupChecker`` for the sample task), or None."""
    node = prompts_cfg.checker
    if not node:
        return None
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as err:
        raise OrpolabError(f"eval_prompts.checker could not be built from {node}: {err}") from err


def test_pairs(job_cfg: DictConfig) -> list[tuple[dict, str, str, str]]:
    """(row, question, chosen answer, rejected answer) of the test split's usable single-question rows."""
    data_cfg = settings(DataConfig, job_cfg.data, "data")
    out = []
    for row in three_splits(data_cfg, need_train=False).test:
        try:
            prompt, chosen, rejected = normalize_row(row, data_cfg)
        except SkipRow:
            continue
        if prompt[-1]["role"] == "user":
            out.append((row, prompt[-1]["content"], chosen, rejected))
    return out


def _heldout(cfg: EvalPromptsConfig, job_cfg: DictConfig, checker: Any) -> list[dict]:
    rows = []
    for row, prompt, chosen, _ in test_pairs(job_cfg):
        expected = row.get(cfg.reference_field or "answer") if checker else None
        rows.append({"prompt": prompt, "expected": expected,
                     "reference": checker.reference(expected) if checker and expected is not None else chosen})
    return rows


def _conversations(cfg: EvalPromptsConfig) -> list[dict]:
    rows = []
    for row in load_rows(cfg.path, cfg.split):
        turns = row.get(cfg.prompt_field) or []
        human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        gpt = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if human and gpt:
            rows.append({"prompt": human, "reference": gpt, "expected": None})
        if cfg.max_prompts and len(rows) >= cfg.max_prompts:
            break
    return rows


def _fields(cfg: EvalPromptsConfig, checker: Any) -> list[dict]:
    rows = []
    for row in load_rows(cfg.path, cfg.split):
        prompt = row.get(cfg.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            continue
        ref = row.get(cfg.reference_field) if cfg.reference_field else None
        rows.append({"prompt": prompt, "expected": ref if checker else None,
                     "reference": checker.reference(ref) if checker and ref is not None else ref})
    return rows


def load_prompts(cfg: EvalPromptsConfig | DictConfig, job_cfg: DictConfig, checker: Any = None) -> list[dict]:
    """Evaluation prompts as ``{id, prompt, reference, expected}``; ``expected`` only where ``checker`` can check."""
    if isinstance(cfg, DictConfig):
        cfg = settings(EvalPromptsConfig, cfg, "eval_prompts")
    kind = str(cfg.kind)
    if kind == "heldout":
        rows = _heldout(cfg, job_cfg, checker)
    elif kind == "conversations":
        rows = _conversations(cfg)
    elif kind == "fields":
        rows = _fields(cfg, checker)
    else:
        raise OrpolabError(f"eval_prompts.kind must be heldout, conversations or fields, got {kind!r}")
    rows = rows[:cfg.max_prompts] if cfg.max_prompts else rows
    if not rows:
        raise OrpolabError(f"the evaluation prompt set ({kind}: {cfg.path}) is empty")
    return [{"id": i, **r} for i, r in enumerate(rows)]
