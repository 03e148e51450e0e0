"""What a review shows: an evaluation's prompts, its models' saved answers, and the pairs to compare.

Only files of the evaluation are read (``<sweep>/evaluation/<id>/answers-<model>.jsonl`` and its
``settings.yaml``), and the prompt set those settings name, composed onto the winner's recorded config
as the evaluation composed it. The pairs come from the models that answered: the base against each
exported model (``winner``, or each method's best), and each other quantization of a model against
that model (``winner`` against ``winner@F16``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from orpolab.core.errors import OrpolabError
from orpolab.core.files import read_jsonl, write_json_atomic


def model_order(labels: list[str]) -> list[str]:
    """The base first, then the exported models, then the other quantizations (as the evaluation orders them)."""
    return sorted(labels, key=lambda m: (m != "base", "@" in m, m))


def pairs_of(models: list[str]) -> list[tuple[str, str]]:
    """(first, second) pairs: base against each exported model, each model against its other quantizations."""
    out = [("base", m) for m in models if m != "base" and "@" not in m and "base" in models]
    out += [(m.partition("@")[0], m) for m in models if "@" in m and m.partition("@")[0] in models]
    return out


def pair_id(first: str, second: str) -> str:
    return f"{first}~{second}"


@dataclass
class ReviewSet:
    """The items of a review: every (prompt, pair) where both models have an answer."""

    evaluation: str
    prompts: dict[int, dict]  # prompt id -> {"prompt", "reference"}
    answers: dict[str, dict[int, str]]  # model -> prompt id -> answer text
    pairs: list[tuple[str, str]]
    items: list[tuple[int, str]] = field(default_factory=list)  # (prompt id, pair id), in review order

    def __post_init__(self) -> None:
        if not self.items:
            self.items = [(pid, pair_id(a, b)) for pid in self.prompts for a, b in self.pairs
                          if pid in self.answers.get(a, {}) and pid in self.answers.get(b, {})]

    @property
    def pair_ids(self) -> dict[str, tuple[str, str]]:
        return {pair_id(a, b): (a, b) for a, b in self.pairs}

    def pair_code(self, pair: str) -> str:
        """What the page calls a pair (``p1``, ``p2``...): a pair id names its models, which the page must not see."""
        return f"p{list(self.pair_ids).index(pair) + 1}"

    def pair_from_code(self, code: object) -> str | None:
        """The pair id of a page's pair code, None for anything else."""
        codes = {self.pair_code(p): p for p in self.pair_ids}
        return codes.get(code) if isinstance(code, str) else None

    def order(self, reviewer: str, prompt: int, pair: str) -> tuple[str, str, int]:
        """(model shown as A, model shown as B, the seed that drew it), drawn per reviewer, prompt and pair.

        A hash, not a random generator's state: the same item shows the same order after a restart,
        and two reviewers see independent orders, so one's position bias does not line up with another's.
        """
        first, second = self.pair_ids[pair]
        seed = int.from_bytes(hashlib.sha256(f"{self.evaluation}\0{reviewer}\0{prompt}\0{pair}".encode())
                              .digest()[:4], "little")
        return (second, first, seed) if seed & 1 else (first, second, seed)


def evaluation_folder(sweep: Path, eid: str | None) -> Path:
    """The evaluation to review: the one named, or the sweep's only one; a sentence when that is unclear."""
    root = Path(sweep) / "evaluation"
    found = sorted(f.name for f in root.iterdir() if (f / "settings.yaml").is_file()) if root.is_dir() else []
    if not found:
        raise OrpolabError(f"{sweep} has no evaluation yet (no evaluation/<id>/settings.yaml); run "
                           f"`python -m orpolab.evaluate {sweep} --stage generate` first")
    if eid is None:
        if len(found) > 1:
            raise OrpolabError(f"{sweep} has {len(found)} evaluations ({', '.join(found)}); name the one to review")
        eid = found[0]
    if eid not in found:
        raise OrpolabError(f"{sweep} has no evaluation {eid!r} (it has {', '.join(found)})")
    return root / eid


def evaluation_prompts(sweep: Path, folder: Path) -> list[dict]:
    """The evaluation's prompts, as its stages loaded them: its ``settings.yaml`` on the winner's recorded config."""
    from orpolab.core import sweep_layout
    from orpolab.core.config import EvalPromptsConfig, settings
    from orpolab.core.files import inside
    from orpolab.core.stage_config import compose_stage
    from orpolab.evaluate.evaluations import evaluation_id
    from orpolab.evaluate.prompts import load_prompts, make_checker

    sweep = Path(sweep).resolve()
    export_file = sweep / "export" / "export.json"
    if not export_file.is_file():
        raise OrpolabError(f"{sweep} has no export (export/export.json): it is not an evaluated sweep")
    export = json.loads(export_file.read_text())
    sweep_layout.check_export(sweep, export)
    job_dir = inside(sweep, export["winner"]["job_dir"], export.get("sweep_dir"))
    cfg = compose_stage(sweep, job_dir, (), ("evaluation", "eval_prompts"), "python -m orpolab.evaluate.review")
    recorded = OmegaConf.load(folder / "settings.yaml")
    cfg.evaluation, cfg.eval_prompts = recorded.evaluation, recorded.eval_prompts
    if evaluation_id(cfg) != folder.name:
        raise OrpolabError(f"{folder / 'settings.yaml'} does not give evaluation {folder.name} (edited by hand?)")
    prompt_settings = settings(EvalPromptsConfig, cfg.eval_prompts, "eval_prompts")
    return load_prompts(prompt_settings, cfg, make_checker(prompt_settings))


def review_prompts(sweep: Path, folder: Path) -> list[dict]:
    """The prompts as first shown to a reviewer, kept in ``review/prompts.json`` beside the ratings.

    Composing them again needs the training stack (seconds to import); the copy is also what every
    rating refers to. It is made again when the evaluation's ``settings.yaml`` is not the one it was made from.
    """
    settings = hashlib.sha256((folder / "settings.yaml").read_bytes()).hexdigest()
    kept = folder / "review" / "prompts.json"
    if kept.is_file():
        saved = json.loads(kept.read_text(encoding="utf-8"))
        if saved.get("settings_sha256") == settings:
            return saved["prompts"]
    prompts = [{"id": int(p["id"]), "prompt": p["prompt"],
                "reference": None if p.get("reference") is None else str(p["reference"])}
               for p in evaluation_prompts(sweep, folder)]
    write_json_atomic(kept, {"settings_sha256": settings, "prompts": prompts})
    return prompts


def load(sweep: Path, eid: str | None = None) -> tuple[Path, ReviewSet]:
    """The evaluation folder and its review set; a sentence when there is nothing to compare yet."""
    folder = evaluation_folder(sweep, eid)
    labels = model_order([f.name.removeprefix("answers-").removesuffix(".jsonl")
                          for f in folder.glob("answers-*.jsonl")])
    answers = {m: {int(a["id"]): str(a["answer"]) for a in read_jsonl(folder / f"answers-{m}.jsonl") if "answer" in a}
               for m in labels}
    pairs = [(a, b) for a, b in pairs_of(labels) if answers[a] and answers[b]]
    if not pairs:
        raise OrpolabError(f"evaluation {folder.name} has no two models' answers to compare yet (answers of "
                           f"{', '.join(labels) or 'no model'}); run its generate stage first")
    prompts = {p["id"]: {"prompt": p["prompt"], "reference": p["reference"]} for p in review_prompts(sweep, folder)}
    return folder, ReviewSet(folder.name, prompts, answers, pairs)
