"""How far to trust the judge: it scores answers whose quality is known before it scores the models.

Two calibration sets, both from the test split (never trained on, never used to select):

* **preference pairs**: the chosen and the rejected answer to the same prompt. They are scored with
  a reference-free variant of the metric (:func:`reference_free`: same criteria and rubric, only the
  query as input), because the only reference a pair has is its chosen answer, and a judge shown
  the graded answer as its own reference only has to notice the copy. Figure: how often the chosen
  answer is scored above the rejected one, ties ½ (:func:`orpolab.evaluate.stats.pairwise_preference`).
* **checkable prompts**: per prompt one right and one wrong answer built by the task's checker
  (``checker.examples``), graded with the metric itself, whose reference is ``checker.reference(expected)``:
  the correct value, never the graded answer and never derived from it. Figure: the AUC of the
  score against correctness (:func:`orpolab.evaluate.stats.auc`).

A judge whose pairwise interval reaches 0.5 is reported as "no better than chance": its verdicts on
the models cannot be told from noise. Verdicts are cached under a folder keyed by what decides them
(the judge file's sha256, the metric and the prompt text flow-judge builds for it, the grammar and
sampling settings), appended to a JSONL one by one so a killed run resumes, and keyed per answer,
so a larger or changed calibration set only judges what is new. A second call with the same key
does no judging and loads no judge (:func:`flow_judge_scorer` opens its backend on first use).

The judging itself is a function ``score_fn(metric, inputs, answer) -> score | None``, so this module
runs without a model in the tests and without an evaluation plan.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpolab.core.errors import OrpolabError
from orpolab.core.files import append_jsonl, file_sha256, write_json_atomic
from orpolab.evaluate.judge import eval_input, judge_many, metric_inputs
from orpolab.evaluate.stats import auc, pairwise_preference

if TYPE_CHECKING:
    from flow_judge.metrics import CustomMetric, Metric
    from flow_judge.models.common import BaseFlowJudgeModel

ScoreFn = Callable[["Metric", dict[str, str], str], "int | None"]

REFERENCE_FREE_SUFFIX = "_REFERENCE_FREE"
SHORT_HASH = 12
NOT_BETTER = "no better than chance"
BETTER = "better than chance"
UNMEASURED = "unmeasured"



# ------------------------------------------------------------------ metrics and prompts


# The reference-free variant's criteria and rubric: the judge is shown the query alone, so no sentence
# may ask it to compare with a reference it never sees. One rubric per scale of flow-judge's presets.
REFERENCE_FREE_CRITERIA = ("How correct, complete and relevant is the system's response as an answer to the query? "
                           "Judge it from the query alone; no reference answer is given.")
REFERENCE_FREE_RUBRICS: dict[tuple[int, ...], tuple[str, ...]] = {
    (0, 1): ("The response does not answer the query correctly: it is inaccurate, incomplete, off topic or "
             "misleading.",
             "The response answers the query correctly and completely, with no inaccuracies or irrelevant details."),
    (1, 2, 3): ("The response does not answer the query: it is incorrect, irrelevant or misleading.",
                "The response partly answers the query: it addresses it but contains some incorrect, irrelevant or "
                "incomplete information.",
                "The response answers the query accurately and completely, with no incorrect or irrelevant "
                "information."),
    (1, 2, 3, 4, 5): ("The response is incorrect or irrelevant to the query.",
                      "The response addresses the query but is mostly incorrect or incomplete.",
                      "The response is partly correct: it answers part of the query, with some inaccuracies or "
                      "missing details.",
                      "The response is mostly correct and complete, with minor inaccuracies or missing details.",
                      "The response answers the query correctly and completely, at the right level of detail."),
}


def reference_free(metric: Metric) -> CustomMetric:
    """The metric with the query as its only input: same name + ``_REFERENCE_FREE``, scale and output.

    Used for preference pairs, which have no reference but their own chosen answer; showing that
    to the judge would grade the chosen answer against itself. flow-judge's correctness criteria
    and rubrics speak of a reference answer throughout, so the variant gets criteria and a rubric
    of its own that ask the same question of the query alone.
    """
    from flow_judge.metrics import CustomMetric, RubricItem

    scale = tuple(sorted(r.score for r in metric.rubric))
    if scale not in REFERENCE_FREE_RUBRICS:
        raise OrpolabError(f"metric {metric.name}: no reference-free rubric for the scale {list(scale)}")
    rubric = [RubricItem(score=score, description=text)
              for score, text in zip(scale, REFERENCE_FREE_RUBRICS[scale], strict=True)]
    return CustomMetric(name=metric.name + REFERENCE_FREE_SUFFIX, criteria=REFERENCE_FREE_CRITERIA, rubric=rubric,
                        required_inputs=["query"], required_output=metric.required_output)


def metric_prompt(metric: Metric, inputs: dict[str, str], answer: str) -> str:
    """The prompt flow-judge sends the judge for this metric, inputs and answer, built by flow-judge's own code."""
    from flow_judge.flow_judge import BaseFlowJudge

    return BaseFlowJudge(metric, model=None, output_dir=None)._format_prompt(eval_input(metric, inputs, answer))


def template_sha256(metric: Metric) -> str:
    """sha256 of the metric's prompt with placeholders for its inputs and answer.

    It changes with anything in the text the judge reads other than the graded material: the
    criteria, the rubric, flow-judge's template (a new flow-judge version), the inputs' names.
    """
    placeholders = {k: "{" + k + "}" for k in metric.required_inputs or []}
    prompt = metric_prompt(metric, placeholders, "{" + metric.required_output + "}")
    return hashlib.sha256(prompt.encode()).hexdigest()


# ------------------------------------------------------------------ the judge file


def judge_identity(path: str | Path, cache_file: Path | None = None) -> dict:
    """The judge as the report names it: file name and the first 12 hex digits of its sha256."""
    return {"file": Path(path).name, "sha256": file_sha256(path, cache_file)[:SHORT_HASH]}


# ------------------------------------------------------------------ the calibration set


@dataclass(frozen=True)
class Item:
    """One answer to judge: which set and role (``chosen``/``rejected``, ``right``/``wrong``), prompt index,
    the metric it is graded with, the metric's inputs and the graded answer."""

    role: str
    group: int
    metric: Metric
    inputs: dict[str, str]
    answer: str

    @property
    def key(self) -> str:
        """What the judge is shown, hashed: the same answer to the same inputs under the same metric
        is judged once, whichever calibration set it is part of."""
        blob = json.dumps([self.metric.name, self.inputs, self.answer], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def calibration_set(metric: Metric, pairs: Iterable[dict], checkable: Iterable[dict], checker: Any,
                    size: int, seed: int = 0) -> list[Item]:
    """Every answer the judge scores, in judging order (the two answers of a prompt back to back).

    ``pairs``: ``{prompt, chosen, rejected}`` with string answers, graded by :func:`reference_free`
    (only the query). ``checkable``: ``{prompt, expected}``; per prompt ``checker.examples`` builds a
    right and a wrong answer (one seeded generator, in prompt order), graded by ``metric`` with
    ``checker.reference(expected)`` as the reference. Each set is capped at its first ``size`` prompts.
    Raises when a reference would be the graded answer: the judge never grades an answer against itself.
    """
    free = reference_free(metric)
    items: list[Item] = []
    for i, pair in enumerate(list(pairs)[:size]):
        for role in ("chosen", "rejected"):
            if not isinstance(pair.get(role), str):
                raise OrpolabError(f"calibration pair {i}: {role} must be the answer's text, got "
                                   f"{type(pair.get(role)).__name__}")
            items.append(Item(role, i, free, metric_inputs(free, pair["prompt"], None), pair[role]))
    rows = [r for r in checkable if r.get("expected") is not None][:size]
    if rows and checker is None:
        raise OrpolabError("checkable calibration prompts need a checker (eval_prompts.checker)")
    rng = random.Random(seed)
    for i, row in enumerate(rows):
        right, wrong = checker.examples(row["prompt"], row["expected"], rng)
        reference = checker.reference(row["expected"])
        for role, answer in (("right", right), ("wrong", wrong)):
            if reference == answer:
                raise OrpolabError(f"the checker's reference for prompt {i} is the graded answer itself "
                                   f"({answer!r}); a judge must never grade an answer against itself")
            items.append(Item(role, i, metric, metric_inputs(metric, row["prompt"], reference), answer))
    return items


def set_sha256(items: list[Item]) -> str:
    """sha256 of the calibration set: every answer's role, prompt index and what the judge is shown."""
    blob = json.dumps([[it.role, it.group, it.key] for it in items])
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------ figures


def figures(items: list[Item], scores: dict[str, int | None], n_resamples: int, seed: int) -> dict:
    """Pairwise preference on the pairs, AUC on the checkable answers, parse failures, and the verdict."""
    by_role: dict[str, dict[int, int | None]] = {}
    for it in items:
        by_role.setdefault(it.role, {})[it.group] = scores[it.key]
    chosen, rejected = by_role.get("chosen", {}), by_role.get("rejected", {})
    groups = sorted(chosen)
    pairwise = pairwise_preference([chosen[g] for g in groups], [rejected[g] for g in groups], n_resamples, seed)
    labelled = [(s, True) for s in by_role.get("right", {}).values()] + \
               [(s, False) for s in by_role.get("wrong", {}).values()]
    if labelled:
        auc_entry = auc([s for s, _ in labelled], [c for _, c in labelled], n_resamples, seed)
    else:
        auc_entry = {"n": 0, "undefined": "no checkable prompts"}
    failures = {"pairs": sum(scores[it.key] is None for it in items if it.role in ("chosen", "rejected")),
                "checkable": sum(scores[it.key] is None for it in items if it.role in ("right", "wrong"))}
    return {"pairwise": pairwise, "auc": auc_entry, "parse_failures": failures,
            "counts": {"pairs": len(groups), "checkable": len(by_role.get("right", {})), "verdicts": len(items),
                       "parse_failures": sum(failures.values())},
            "verdict": verdict(pairwise, auc_entry)}


def verdict(pairwise: dict, auc_entry: dict) -> str:
    """"no better than chance" when the interval's lower bound is at or below 0.5: the pairwise
    figure when there is one, else the AUC; "unmeasured" when neither has a number."""
    for entry in (pairwise, auc_entry):
        if "undefined" not in entry:
            return BETTER if entry["ci_low"] > 0.5 else NOT_BETTER
    return UNMEASURED


# ------------------------------------------------------------------ calibrating, cached


def _short(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_verdicts(path: Path) -> dict[str, int | None]:
    """Scores by answer key; a line torn by a kill is skipped (that answer is judged again)."""
    out: dict[str, int | None] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "item" in row:
            out.setdefault(row["item"], row.get("score"))
    return out


def calibrate(score_fn: ScoreFn, metric: Metric, pairs: Iterable[dict], checkable: Iterable[dict], checker: Any,
              cache_dir: str | Path, judge_file: str | Path, settings: dict | None = None, size: int = 100,
              seed: int = 0, n_resamples: int = 1000) -> dict:
    """Score the calibration set with the judge (what is not cached yet) and return its figures.

    ``score_fn(metric, inputs, answer)`` gives one verdict's score, ``None`` when unparsable
    (:func:`flow_judge_scorer` wraps flow-judge). ``settings``: everything else that changes a
    verdict, the grammar and the sampling (max tokens, feedback length, n_ctx, temperature), each
    JSON-serialisable. ``size`` caps each set (so up to ``4 * size`` verdicts); 0 disables
    calibration: ``{"enabled": False}``, nothing judged or written.

    Under ``cache_dir``: ``<judge key>/verdicts.jsonl`` (one line per verdict, appended as they
    come) and ``<judge key>/summary-<set key>.json`` (written atomically), where the judge key
    hashes the judge file's sha256, the metric's name, the sha256 of the prompt text flow-judge
    builds for the metric and its reference-free variant, and ``settings``; the set key hashes the
    calibration set, ``seed`` and ``n_resamples``. ``file-hashes.json`` remembers the judge's sha256.
    A process working on the same judge key waits for the other to finish (a file lock).
    """
    from filelock import FileLock
    from tqdm.auto import tqdm

    if size < 0:
        raise OrpolabError(f"the calibration size must be 0 (off) or positive, got {size}")
    if size == 0:
        return {"enabled": False}
    cache_dir = Path(cache_dir)
    settings = dict(settings or {})
    items = calibration_set(metric, pairs, checkable, checker, size, seed)
    free = reference_free(metric)
    sha = file_sha256(judge_file, cache_dir / "file-hashes.json")
    templates = {metric.name: template_sha256(metric), free.name: template_sha256(free)}
    judge_key = _short({"judge_sha256": sha, "metric": metric.name, "templates": templates, "settings": settings})
    set_hash = set_sha256(items)
    set_key = _short({"set": set_hash, "seed": seed, "n_resamples": n_resamples})
    identity = {"key": f"{judge_key}-{set_key}", "judge": {"file": Path(judge_file).name, "sha256": sha[:SHORT_HASH]},
                "metric": metric.name, "reference_free_metric": free.name,
                "template_sha256": {k: v[:SHORT_HASH] for k, v in templates.items()}, "settings": settings,
                "set_sha256": set_hash[:SHORT_HASH], "size": size, "seed": seed, "n_resamples": n_resamples}
    folder = cache_dir / judge_key
    folder.mkdir(parents=True, exist_ok=True)
    summary_file = folder / f"summary-{set_key}.json"
    with FileLock(str(folder / ".lock")):
        if summary_file.is_file():
            try:
                summary = json.loads(summary_file.read_text())
            except ValueError:
                summary = {}
            if summary.get("key") == identity["key"]:
                return {**summary, "judged": 0, "cached": True}
        if not (folder / "judge.json").is_file():
            write_json_atomic(folder / "judge.json", {k: identity[k] for k in
                                                      ("judge", "metric", "template_sha256", "settings")})
        verdicts_file = folder / "verdicts.jsonl"
        scores = _read_verdicts(verdicts_file)
        todo, seen = [], set(scores)
        for it in items:
            if it.key not in seen:
                seen.add(it.key)
                todo.append(it)
        # A scorer that can judge several at once (flow_judge_scorer over a batched backend) streams
        # (index, score) as verdicts finish, in any order; each is saved as it comes, as one at a time.
        many = getattr(score_fn, "many", None)
        requests = [(it.metric, dict(it.inputs), it.answer) for it in todo]
        stream = many(requests) if many is not None else ((i, score_fn(*r)) for i, r in enumerate(requests))
        for i, score in tqdm(stream, total=len(todo), desc=f"calibrating the judge ({metric.name})",
                             unit="verdict", disable=None):
            it = todo[i]
            score = int(score) if score is not None and score >= 0 else None
            append_jsonl(verdicts_file, {"item": it.key, "role": it.role, "score": score})
            scores[it.key] = score
        summary = {"enabled": True, **identity, **figures(items, scores, n_resamples, seed), "judged": len(todo)}
        write_json_atomic(summary_file, summary)
    return {**summary, "cached": not todo}


# ------------------------------------------------------------------ flow-judge as score_fn


class FlowJudgeScorer:
    """``score_fn`` over flow-judge: one ``FlowJudge`` per metric, ``judge.evaluate(EvalInput(...))`` per answer.

    ``backend_factory(scores)`` builds the flow-judge model backend for a metric's scores (e.g.
    ``LlamaCppFlowJudge(gguf, scores, ...)``, whose grammar allows exactly those scores). It is
    called on the first verdict, not before, so a calibration served from the cache never loads
    the judge; metrics with the same scores (a metric and its reference-free variant) share one
    backend. An unparsable verdict (flow-judge's -1) or a score off the metric's scale is ``None``.
    """

    def __init__(self, backend_factory: Callable[[list[int]], BaseFlowJudgeModel]):
        self.backend_factory = backend_factory
        self.backends: dict[tuple[int, ...], BaseFlowJudgeModel] = {}
        self.judges: dict[str, Any] = {}

    def _judge(self, metric: Metric) -> Any:
        from flow_judge import FlowJudge

        scale = tuple(sorted(r.score for r in metric.rubric))
        judge = self.judges.get(metric.name)
        if judge is None:
            if scale not in self.backends:
                self.backends[scale] = self.backend_factory(list(scale))
            judge = self.judges[metric.name] = FlowJudge(metric=metric, model=self.backends[scale], output_dir=None)
        return judge

    @staticmethod
    def _on_scale(metric: Metric, score: int) -> int | None:
        return score if score in {r.score for r in metric.rubric} else None

    def __call__(self, metric: Metric, inputs: dict[str, str], answer: str) -> int | None:
        score = self._judge(metric).evaluate(eval_input(metric, inputs, answer)).score
        return self._on_scale(metric, score)

    def many(self, requests: list[tuple[Metric, dict[str, str], str]]) -> Iterator[tuple[int, int | None]]:
        """(index, score) for every (metric, inputs, answer), each as soon as its verdict is written.

        Judged through :func:`orpolab.evaluate.judge.judge_many`, as the verdict stage judges: several per
        llama.cpp batch where the backend can, one at a time otherwise.
        """
        by_metric: dict[str, list[int]] = {}
        for i, (metric, _, _) in enumerate(requests):
            by_metric.setdefault(metric.name, []).append(i)
        for indices in by_metric.values():
            metric = requests[indices[0]][0]
            inputs = [eval_input(metric, requests[i][1], requests[i][2]) for i in indices]
            for k, verdict in judge_many(self._judge(metric), inputs):
                yield indices[k], self._on_scale(metric, verdict.score)

    def close(self) -> None:
        """Close the backends that were opened (a llama.cpp model holds GBs of memory)."""
        for backend in self.backends.values():
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        self.backends.clear()
        self.judges.clear()

    def __enter__(self) -> FlowJudgeScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def flow_judge_scorer(backend_factory: Callable[[list[int]], BaseFlowJudgeModel]) -> FlowJudgeScorer:
    """A ``score_fn`` for :func:`calibrate` that judges with flow-judge (see :class:`FlowJudgeScorer`)."""
    return FlowJudgeScorer(backend_factory)

