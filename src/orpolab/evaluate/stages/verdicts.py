"""Stage ``judge``: a verdict on every answer to the judged prompts, per metric (saved as they come).

A verdict is keyed by what decides it: the judge file's sha256, the grammar and sampling, and the exact
prompt flow-judge builds (criteria, rubric, question, reference, answer). Identical prompts within the
evaluation (base and winner giving the same answer, the winner at two quantizations) are judged once,
and verdicts made before by any evaluation are taken from the verdict store (:mod:`orpolab.evaluate.store`).
A saved verdict whose key no longer matches (its answer changed) is judged again.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from orpolab.core.errors import OrpolabError
from orpolab.core.files import append_jsonl, read_jsonl, write_jsonl_atomic
from orpolab.evaluate.calibration import metric_prompt
from orpolab.evaluate.judge import eval_input, judge_many, metric_by_name, metric_inputs
from orpolab.evaluate.plan import EvaluationPlan
from orpolab.evaluate.store import Store, content_key

TITLE = "a verdict on every answer"


def judge_inputs(metric, prompt: dict) -> dict[str, str]:
    """The metric's inputs for one evaluation prompt (its reference, where the metric takes one)."""
    return metric_inputs(metric, prompt["prompt"], str(prompt.get("reference") or ""))


def verdict_key(judge_sha256: str, identity: dict, prompt_text: str) -> str:
    """What decides a verdict: the judge file, its grammar and sampling (``identity``), the prompt it reads."""
    return content_key("verdict", judge_sha256, identity["grammar_sha256"], identity["sampling"], prompt_text)


def run(plan: EvaluationPlan) -> None:
    prompts = {p["id"]: p for p in plan.judged}
    answers = plan.answers()
    if not all(answers.values()):
        raise OrpolabError("no answers to judge yet; run the generate stage first")
    store = plan.store("verdicts")
    judge_sha256 = plan.file_sha256(plan.judge_file())
    for metric_name in plan.settings.judge.metrics:
        judge_metric(plan, metric_name, prompts, answers, store, judge_sha256)
    plan.record_reuse("verdicts", store.reuse)


def judge_metric(plan: EvaluationPlan, metric_name: str, prompts: dict, answers: dict, store: Store,
                 judge_sha256: str) -> None:
    """Every verdict of one metric: kept from the saved file, taken from the store, or judged (once per key)."""
    metric = metric_by_name(metric_name)
    out_file = plan.verdicts_file(metric_name)
    saved = {(v["model"], v["id"]): v for v in read_jsonl(out_file)}
    rows: dict[tuple[str, int], dict] = {}
    todo: dict[str, list[tuple]] = {}  # key -> the (prompt id, model) pairs that share it, and the input
    judge_name, identity = plan.judge_name(), plan.judge_identity(metric_name)
    for pid in prompts:
        for model in plan.models:  # all answers to a question back to back: they share the question's KV cache
            answer = answers[model].get(pid)
            if not answer or "answer" not in answer:
                continue
            inputs = judge_inputs(metric, prompts[pid])
            key = verdict_key(judge_sha256, identity, metric_prompt(metric, inputs, answer["answer"]))
            row = saved.get((model, pid))
            if row is not None and row.get("key") == key:
                rows[(model, pid)] = row
            elif (entry := store.get(key)) is not None:
                store.took(entry)
                rows[(model, pid)] = {"id": pid, "model": model, "score": entry["score"],
                                      "feedback": entry["feedback"], "judge": judge_name, "key": key}
                append_jsonl(out_file, rows[(model, pid)])
            else:
                todo.setdefault(key, []).append((pid, model, inputs, answer["answer"]))
    if todo:
        judge_new(plan, metric, metric_name, todo, store, out_file, rows)
    order = [(m, pid) for pid in prompts for m in plan.models if (m, pid) in rows]
    write_jsonl_atomic(out_file, [rows[k] for k in order])  # exactly the current verdicts
    failures = sum(rows[k]["score"] < 0 for k in order)
    print(f"    {metric_name}: {len(order)} verdicts, {failures} unparsable", flush=True)


def judge_new(plan: EvaluationPlan, metric, metric_name: str, todo: dict[str, list[tuple]], store: Store,
              out_file, rows: dict) -> None:
    """Judge each new key once; its verdict goes to every answer that shares it, the file and the store."""
    from flow_judge import FlowJudge

    keys = list(todo)
    backend = plan.judge_backend([r.score for r in metric.rubric])
    judge = FlowJudge(metric=metric, model=backend, output_dir=str(plan.out / "flow_judge"))
    judge_name = plan.judge_name()
    try:
        inputs = [eval_input(metric, todo[k][0][2], todo[k][0][3]) for k in keys]
        started = time.time()
        with tqdm(total=len(keys), desc=f"judging {metric_name}", unit="verdict", disable=None) as bar:
            # Each verdict is saved as soon as it is written: a kill loses only those being written.
            for n, (i, verdict) in enumerate(judge_many(judge, inputs), start=1):
                key = keys[i]
                for pid, model, _, _ in todo[key]:
                    rows[(model, pid)] = {"id": pid, "model": model, "score": verdict.score,
                                          "feedback": verdict.feedback, "judge": judge_name, "key": key}
                    append_jsonl(out_file, rows[(model, pid)])
                store.put(key, {"score": verdict.score, "feedback": verdict.feedback,
                                "seconds": (time.time() - started) / n})
                store.reuse.made += 1
                bar.update()
                if n == 2 and len(keys) > 3:  # an estimate once the judge's speed is known
                    per = (time.time() - started) / 2
                    tqdm.write(f"    judging: about {per * (len(keys) - 2) / 60:.1f} min left for "
                               f"{len(keys) - 2} verdicts ({per:.1f} s each)")
    finally:
        backend.close()
