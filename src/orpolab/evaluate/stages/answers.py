"""Stage ``generate``: every model answers every evaluation prompt from its GGUF (saved as they come).

Answers made before with the same GGUF, formatted prompt and settings (by any sweep or evaluation) are
taken from the answer store instead of generated again (:mod:`orpolab.evaluate.store`).
"""

from __future__ import annotations

from orpolab.evaluate.generate import answer_prompts
from orpolab.evaluate.plan import EvaluationPlan

TITLE = "answers of the base and trained models"


def run(plan: EvaluationPlan) -> None:
    store = plan.store("answers")
    for model in plan.models:
        gguf = plan.gguf(model)
        rows = answer_prompts(gguf, plan.prompts, plan.answers_file(model), plan.settings.generation, model,
                              store=store, gguf_sha256=plan.file_sha256(gguf))
        answered = [r for r in rows if "answer" in r]
        ended = sum(r["finish_reason"] == "stop" for r in answered) / max(1, len(answered))
        skipped = f", {len(rows) - len(answered)} skipped (too long)" if len(rows) > len(answered) else ""
        print(f"    {model}: {len(answered)} answers, {ended:.0%} ended by themselves{skipped}", flush=True)
    plan.record_reuse("answers", store.reuse)
