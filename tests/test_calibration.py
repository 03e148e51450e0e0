"""Judge calibration with fake judges (no model): figures, the reference rule, the cache, resuming."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
from flow_judge import EvalInput, FlowJudge
from flow_judge.metrics import RESPONSE_CORRECTNESS_3POINT, RESPONSE_CORRECTNESS_5POINT, RESPONSE_CORRECTNESS_BINARY
from flow_judge.models.common import BaseFlowJudgeModel

from orpolab.core import files
from orpolab.core.errors import OrpolabError
from orpolab.demo.sample_task import LookupChecker, answer_text, make_question, value_right
from orpolab.evaluate import calibration
from orpolab.evaluate.calibration import (
    BETTER,
    NOT_BETTER,
    REFERENCE_FREE_SUFFIX,
    calibrate,
    calibration_set,
    flow_judge_scorer,
    judge_identity,
    metric_prompt,
    reference_free,
    template_sha256,
)
from orpolab.evaluate.stats import figure_text

METRIC = RESPONSE_CORRECTNESS_5POINT
CHECKER = LookupChecker()


def task(n: int, seed: int = 0) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Preference pairs and checkable prompts from the sample task, and each question's value."""
    rng = random.Random(seed)
    pairs, checkable, values = [], [], {}
    for _ in range(n):
        question, name, value, _ = make_question(rng)
        values[question] = value
        pairs.append({"prompt": question, "chosen": answer_text(name, value),
                      "rejected": answer_text(name, value + 1)})
        checkable.append({"prompt": question, "expected": value})
    return pairs, checkable, values


class Judge:
    """A fake ``score_fn`` that records every call and scores with ``rule(query, answer)``."""

    def __init__(self, rule, fail_after: int | None = None):
        self.rule, self.fail_after, self.calls = rule, fail_after, []

    def __call__(self, metric, inputs: dict[str, str], answer: str) -> int | None:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append({"metric": metric.name, "required": list(metric.required_inputs), "inputs": dict(inputs),
                           "answer": answer})
        return self.rule(inputs["query"], answer)


def never(*_):
    raise AssertionError("the judge was called although everything was cached")


@pytest.fixture()
def judge_file(tmp_path):
    path = tmp_path / "judge.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    return path


def run(score_fn, tmp_path, judge_file, n: int = 12, **kw):
    pairs, checkable, _ = task(n)
    kw = {"size": 100, "n_resamples": 300, "settings": {"max_tokens": 400, "temperature": 0.0}, **kw}
    return calibrate(score_fn, METRIC, pairs, checkable, CHECKER, tmp_path / "cache", judge_file, **kw)


def test_size_zero_does_nothing(tmp_path, judge_file):
    assert run(never, tmp_path, judge_file, size=0) == {"enabled": False}
    assert not (tmp_path / "cache").exists()


def test_a_constant_judge_is_no_better_than_chance(tmp_path, judge_file):
    out = run(Judge(lambda q, a: 3), tmp_path, judge_file)
    assert out["pairwise"]["value"] == 0.5 and out["pairwise"]["better_than_chance"] is False
    assert out["auc"]["value"] == 0.5
    assert out["verdict"] == NOT_BETTER
    assert figure_text(out["pairwise"]) == "0.500 [0.50, 0.50]"
    json.dumps(out)  # the report stores it as it is


def test_a_judge_that_scores_by_correctness(tmp_path, judge_file):
    _, _, values = task(12)
    judge = Judge(lambda q, a: 5 if value_right(a, values[q], q) else 1)
    out = run(judge, tmp_path, judge_file)
    assert out["pairwise"]["value"] == 1.0 and out["pairwise"]["ci_low"] == 1.0
    assert out["auc"]["value"] == 1.0 and (out["auc"]["n_right"], out["auc"]["n_wrong"]) == (12, 12)
    assert out["verdict"] == BETTER and out["cached"] is False
    assert out["counts"] == {"pairs": 12, "checkable": 12, "verdicts": 48, "parse_failures": 0}
    assert len(judge.calls) == 48


def test_the_judge_never_grades_an_answer_against_itself(tmp_path, judge_file):
    pairs, checkable, values = task(10)
    judge = Judge(lambda q, a: 3)
    calibrate(judge, METRIC, pairs, checkable, CHECKER, tmp_path / "cache", judge_file, size=100, n_resamples=50)
    pair_calls = [c for c in judge.calls if c["metric"].endswith(REFERENCE_FREE_SUFFIX)]
    checked_calls = [c for c in judge.calls if not c["metric"].endswith(REFERENCE_FREE_SUFFIX)]
    assert len(pair_calls) == len(checked_calls) == 20
    for call in pair_calls:  # the pairs' only reference would be their chosen answer: they get none
        assert call["required"] == ["query"] and set(call["inputs"]) == {"query"}
    for call in checked_calls:
        query, reference = call["inputs"]["query"], call["inputs"]["reference_answer"]
        assert reference == f"The correct value is {values[query]}."  # from the expected value alone
        assert reference != call["answer"]
    # one right and one wrong answer per checkable prompt
    rights = [value_right(c["answer"], values[c["inputs"]["query"]], c["inputs"]["query"]) for c in checked_calls]
    assert sum(rights) == 10


def test_a_reference_equal_to_the_graded_answer_is_refused(tmp_path):
    class Echo(LookupChecker):
        def reference(self, expected):
            return f"The answer is {int(expected)}."

        def examples(self, question, expected, rng):
            return f"The answer is {int(expected)}.", f"The answer is {int(expected) + 1}."

    _, checkable, _ = task(3)
    with pytest.raises(OrpolabError, match="against itself"):
        calibration_set(METRIC, [], checkable, Echo(), size=10)


def test_the_calibration_set_is_balanced_seeded_and_capped():
    pairs, checkable, _ = task(8)
    items = calibration_set(METRIC, pairs, checkable, CHECKER, size=5, seed=1)
    roles = [it.role for it in items]
    assert roles.count("chosen") == roles.count("rejected") == roles.count("right") == roles.count("wrong") == 5
    assert items == calibration_set(METRIC, pairs, checkable, CHECKER, size=5, seed=1)
    assert items != calibration_set(METRIC, pairs, checkable, CHECKER, size=5, seed=2)


def test_a_second_call_does_no_judging(tmp_path, judge_file):
    first = run(Judge(lambda q, a: len(a) % 5 + 1), tmp_path, judge_file)
    second = run(never, tmp_path, judge_file)
    assert second["cached"] is True and second["judged"] == 0
    assert {k: v for k, v in second.items() if k not in ("cached", "judged")} == \
           {k: v for k, v in first.items() if k not in ("cached", "judged")}


def test_the_key_follows_the_judge_and_its_settings(tmp_path, judge_file):
    run(Judge(lambda q, a: 3), tmp_path, judge_file, n=4)
    judge = Judge(lambda q, a: 3)
    out = run(judge, tmp_path, judge_file, n=4, settings={"max_tokens": 200, "temperature": 0.0})
    assert len(judge.calls) == 16 and out["cached"] is False  # other settings: judged again
    other = judge_file.parent / "other.gguf"
    other.write_bytes(b"another judge")
    judge = Judge(lambda q, a: 3)
    run(judge, tmp_path, other, n=4)
    assert len(judge.calls) == 16  # another judge file: judged again
    judge = Judge(lambda q, a: 3)
    run(judge, tmp_path, judge_file, n=6)
    assert len(judge.calls) == 8  # a larger set: only the new prompts' answers are judged


def test_a_killed_calibration_resumes(tmp_path, judge_file):
    rule = lambda q, a: len(a) % 5 + 1  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run(Judge(rule, fail_after=7), tmp_path, judge_file)
    (verdicts,) = (tmp_path / "cache").glob("*/verdicts.jsonl")
    assert len(verdicts.read_text().splitlines()) == 7
    with open(verdicts, "a") as fh:
        fh.write('{"item": "torn by a ki')  # a line cut short by the kill
    judge = Judge(rule)
    resumed = run(judge, tmp_path, judge_file)
    assert len(judge.calls) == 48 - 7 and resumed["judged"] == 41
    fresh = calibrate(Judge(rule), METRIC, *task(12)[:2], CHECKER, tmp_path / "fresh", judge_file, size=100,
                      n_resamples=300, settings={"max_tokens": 400, "temperature": 0.0})
    for key in ("pairwise", "auc", "counts", "verdict", "key"):
        assert resumed[key] == fresh[key]


def test_unparsable_wrong_answers_leave_one_class(tmp_path, judge_file):
    _, _, values = task(12)
    # The judge's verdicts on every wrong checkable answer are unparsable.
    judge = Judge(lambda q, a: 4 if value_right(a, values[q], q) else None)
    out = run(judge, tmp_path, judge_file)
    assert out["auc"]["undefined"] == "one class" and "value" not in out["auc"]
    assert figure_text(out["auc"]) == "undefined (one class)"
    assert out["parse_failures"] == {"pairs": 12, "checkable": 12}
    assert out["pairwise"]["n"] == 0 and out["verdict"] == "unmeasured"


def test_only_checkable_prompts_decide_by_auc(tmp_path, judge_file):
    _, checkable, values = task(12)
    out = calibrate(Judge(lambda q, a: 3), METRIC, [], checkable, CHECKER, tmp_path / "cache", judge_file,
                    size=100, n_resamples=100)
    assert out["pairwise"]["undefined"] and out["auc"]["value"] == 0.5 and out["verdict"] == NOT_BETTER


class RecordingBackend(BaseFlowJudgeModel):
    """A flow-judge model backend that records the prompts flow-judge sends and answers a fixed verdict."""

    def __init__(self, scores: list[int], reply: str):
        super().__init__(model_id="fake", model_type="fake", generation_params={})
        self.scores, self.reply, self.prompts, self.closed = scores, reply, [], False

    def _generate(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.reply

    def _batch_generate(self, prompts, use_tqdm=True, **kwargs):
        return [self._generate(p) for p in prompts]

    def close(self) -> None:
        self.closed = True


def test_flow_judge_builds_a_reference_free_prompt(tmp_path, judge_file):
    built = []

    def factory(scores):
        built.append(RecordingBackend(scores, "<feedback>Right value.</feedback>\n<score>4</score>"))
        return built[-1]

    pairs, checkable, values = task(3)
    with flow_judge_scorer(factory) as scorer:
        out = calibrate(scorer, METRIC, pairs, checkable, CHECKER, tmp_path / "cache", judge_file, size=100,
                        n_resamples=50)
    (backend,) = built  # the metric and its reference-free variant share one backend (same scale)
    assert backend.scores == [1, 2, 3, 4, 5] and backend.closed
    assert out["counts"]["parse_failures"] == 0 and out["pairwise"]["value"] == 0.5
    pair_prompts = [p for p in backend.prompts if "<reference_answer>" not in p]
    assert len(pair_prompts) == 6 and len(backend.prompts) == 12
    first = pair_prompts[0]
    assert f"<query>\n{pairs[0]['prompt']}\n</query>" in first
    assert f"<response>\n{pairs[0]['chosen']}\n</response>" in first
    assert calibration.REFERENCE_FREE_CRITERIA in first and "- Score 5: " in first
    assert "reference" not in first.replace("no reference answer is given", "")  # nothing it is not shown
    checked = [p for p in backend.prompts if "<reference_answer>" in p]
    query = checkable[0]["prompt"]
    assert f"<reference_answer>\nThe correct value is {values[query]}.\n</reference_answer>" in checked[0]


def test_flow_judge_unparsable_verdicts_are_none(judge_file):
    scorer = flow_judge_scorer(lambda scores: RecordingBackend(scores, "no verdict here"))
    free = reference_free(METRIC)
    assert scorer(free, {"query": "Let a = 1. What is a?"}, "a = 1.") is None
    scorer = flow_judge_scorer(lambda scores: RecordingBackend(scores, "<feedback>x</feedback><score>9</score>"))
    assert scorer(free, {"query": "Let a = 1. What is a?"}, "a = 1.") is None  # off the 1-5 scale


def test_reference_free_metric():
    free = reference_free(METRIC)
    assert free.name == METRIC.name + "_REFERENCE_FREE" and free.required_inputs == ["query"]
    assert free.required_output == METRIC.required_output
    assert [r.score for r in free.rubric] == [r.score for r in METRIC.rubric]
    prompt = metric_prompt(free, {"query": "Q?"}, "A.")
    assert "<query>\nQ?\n</query>" in prompt and "reference_answer" not in prompt
    # The judge is shown no reference, so neither the criteria nor the rubric may ask it to compare with one.
    assert "reference" not in prompt.replace("no reference answer is given", "").lower()
    for preset in (RESPONSE_CORRECTNESS_BINARY, RESPONSE_CORRECTNESS_3POINT):
        other = reference_free(preset)
        assert [r.score for r in other.rubric] == [r.score for r in preset.rubric]
        assert "reference" not in " ".join(r.description for r in other.rubric).lower()
    with pytest.raises(OrpolabError, match="takes the inputs"):  # no reference for the reference-free metric
        flow_judge_scorer(lambda s: RecordingBackend(s, ""))(free, {"query": "Q?", "reference_answer": "A."}, "A.")
    with pytest.raises(ValueError, match="do not match required inputs"):  # and flow-judge refuses one too
        FlowJudge(metric=free, model=RecordingBackend([1], ""), output_dir=None).evaluate(
            EvalInput(inputs=[{"query": "Q?"}, {"reference_answer": "A."}], output={"response": "A."}))
    assert template_sha256(free) != template_sha256(METRIC)


def test_judge_identity_hashes_once_per_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "judge.gguf"
    data = os.urandom(3000)
    path.write_bytes(data)
    cache_file = tmp_path / "hashes.json"
    ident = judge_identity(path, cache_file)
    assert ident == {"file": "judge.gguf", "sha256": hashlib.sha256(data).hexdigest()[:12]}
    # Same size and mtime: not read again (in the process, and from the cache file in a new process).
    st = path.stat()
    path.write_bytes(bytes(reversed(data)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert judge_identity(path, cache_file) == ident
    monkeypatch.setattr(files, "_FILE_HASHES", {})
    assert judge_identity(path, cache_file) == ident
    # A new mtime: hashed again.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert judge_identity(path, cache_file)["sha256"] == hashlib.sha256(bytes(reversed(data))).hexdigest()[:12]


class StreamingBackend(RecordingBackend):
    """A backend that judges a whole list at once (as ``LlamaCppFlowJudge.verdicts`` does) and returns the
    verdicts in reverse order; its score is the answer's length mod 5 + 1, so the order matters."""

    def __init__(self, scores: list[int]):
        super().__init__(scores, "")
        self.calls: list[int] = []

    def _generate(self, prompt: str) -> str:
        self.prompts.append(prompt)
        answer = prompt.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
        return f"<feedback>ok</feedback>\n<score>{len(answer) % 5 + 1}</score>"

    def verdicts(self, prompts):
        self.calls.append(len(prompts))
        replies = [self._generate(p) for p in prompts]
        yield from reversed(list(enumerate(replies)))


def test_calibration_batches_a_metrics_verdicts_and_matches_one_at_a_time(tmp_path, judge_file):
    pairs, checkable, _ = task(4)
    streaming: list[StreamingBackend] = []

    def batched(scores):
        streaming.append(StreamingBackend(scores))
        return streaming[-1]

    class OneAtATime(StreamingBackend):
        verdicts = None  # the scorer falls back to flow-judge's evaluate, one verdict per call

    with flow_judge_scorer(batched) as scorer:
        many = calibrate(scorer, METRIC, pairs, checkable, CHECKER, tmp_path / "a", judge_file, size=100,
                         n_resamples=50)
    with flow_judge_scorer(OneAtATime) as scorer:
        one = calibrate(scorer, METRIC, pairs, checkable, CHECKER, tmp_path / "b", judge_file, size=100,
                        n_resamples=50)
    (backend,) = streaming
    assert backend.calls == [8, 8]  # one call per metric: the pairs (reference-free), the checked answers
    assert many["judged"] == one["judged"] == 16
    for key in ("pairwise", "auc", "counts"):
        assert many[key] == one[key]
    lines = sorted((tmp_path / "a").glob("*/verdicts.jsonl"))[0].read_text().splitlines()
    assert len(lines) == 16
