"""Evaluate the exported model(s) against their base on the CPU: answers, Flow Judge verdicts, scores.

The models are the base and the sweep's winner, or, for a mixed-method sweep, the best job of each
method; every trained model is compared with the base on the same prompts.

Stages, each runnable alone on an existing sweep and each resuming from its saved results:

    python -m orpolab.evaluate <sweep> --stage generate   # answers of base and trained models (GGUF)
    python -m orpolab.evaluate <sweep> --stage judge      # Flow Judge verdicts
    python -m orpolab.evaluate <sweep> --stage score      # objective accuracy, bootstrap, ... -> results.json
    python -m orpolab.evaluate <sweep> --stage report     # report/ (Markdown + plots) and MLflow
    python -m orpolab.evaluate <sweep>                    # all of them
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orpolab.core import console, tracking
from orpolab.core.config import DataConfig, GenerationConfig, settings
from orpolab.core.errors import OrpolabError
from orpolab.core.files import append_jsonl, read_jsonl, write_json_atomic
from orpolab.evaluate.generate import answer_prompts
from orpolab.evaluate.stats import bootstrap_mean_ci, judge_agreement, paired_comparison
from orpolab.export import llamacpp
from orpolab.train.data import SkipRow, load_rows, normalize_row, three_splits

STAGES = ("generate", "judge", "score", "report")
STAGE_TITLES = {"generate": "answers of the base and trained models", "judge": "a verdict on every answer",
                "score": "means, paired differences, bootstrap intervals", "report": "report.md, plots, MLflow"}


def make_checker(cfg: DictConfig):
    """``eval_prompts.checker``: an object with ``is_correct(answer, expected)`` and ``reference(expected)``,
    built from its ``_target_`` (``orpolab.demo.sample_task.LookupChecker`` for the sample task), or None."""
    node = cfg.get("checker")
    if not node:
        return None
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as err:
        raise OrpolabError(f"eval_prompts.checker could not be built from {OmegaConf.to_container(node)}: {err}") \
            from err


def load_prompts(cfg: DictConfig, job_cfg: DictConfig, checker=None) -> list[dict]:
    """Evaluation prompts as ``{id, prompt, reference, expected}``; ``expected`` only where ``checker`` can check."""
    kind, limit = cfg.kind, cfg.max_prompts
    rows: list[dict] = []
    if kind == "heldout":
        # The test split: never trained on, and not the validation rows that picked the checkpoints
        # and the winner (evaluating on those would favour the winner: the winner's curse).
        data_cfg = settings(DataConfig, job_cfg.data, "data")
        for row in three_splits(data_cfg, need_train=False).test:
            try:
                prompt, chosen, _ = normalize_row(row, data_cfg)
            except SkipRow:
                continue
            if prompt[-1]["role"] == "user":
                expected = row.get(cfg.reference_field or "answer") if checker else None
                rows.append({"prompt": prompt[-1]["content"], "expected": expected,
                             "reference": checker.reference(expected) if checker and expected is not None
                             else chosen})
    elif kind == "conversations":
        for row in load_rows(cfg.path, cfg.split):
            turns = row.get(cfg.prompt_field) or []
            human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
            gpt = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
            if human and gpt:
                rows.append({"prompt": human, "reference": gpt, "expected": None})
            if limit and len(rows) >= limit:
                break
    elif kind == "fields":
        for row in load_rows(cfg.path, cfg.split):
            prompt = row.get(cfg.prompt_field)
            if not isinstance(prompt, str) or not prompt.strip():
                continue
            ref = row.get(cfg.reference_field) if cfg.reference_field else None
            rows.append({"prompt": prompt, "expected": ref if checker else None,
                         "reference": checker.reference(ref) if checker and ref is not None else ref})
    else:
        raise OrpolabError(f"eval_prompts.kind must be heldout, conversations or fields, got {kind!r}")
    rows = rows[:limit] if limit else rows
    if not rows:
        raise OrpolabError(f"the evaluation prompt set ({kind}: {cfg.get('path')}) is empty")
    return [{"id": i, **r} for i, r in enumerate(rows)]


class Evaluation:
    """Paths and settings of one sweep's evaluation, read from its export and its config."""

    def __init__(self, sweep_dir: str | Path, tracking_uri: str):
        self.sweep = Path(sweep_dir).resolve()
        export_file = self.sweep / "export" / "export.json"
        if not export_file.is_file():
            raise OrpolabError(f"{self.sweep} has no export (export/export.json); run `python -m orpolab.export "
                               f"{self.sweep}` first")
        self.export = json.loads(export_file.read_text())
        self.tracking_uri = tracking_uri
        self.job_cfg = OmegaConf.create(self.export["winner"]["config"])
        if "evaluation" not in self.job_cfg or "eval_prompts" not in self.job_cfg:
            raise OrpolabError("the winner's config has no evaluation settings (conf/evaluation, conf/eval_prompts)")
        self.cfg, self.prompts_cfg = self.job_cfg.evaluation, self.job_cfg.eval_prompts
        self.checker = make_checker(self.prompts_cfg)
        self.out = self.sweep / "evaluation"
        self.out.mkdir(parents=True, exist_ok=True)
        # "base" first, then the exported models: "winner", or one per method in a mixed-method sweep.
        self.trained = tuple(self.export.get("winners", {"winner": None}))
        self.models = ("base", *self.trained)

    def gguf(self, model: str) -> Path:
        quant = str(self.cfg.quant).upper()
        files = self.export["gguf"][model]
        if quant not in files:
            raise OrpolabError(f"no {quant} GGUF of the {model} model in the export (have {sorted(files)}); "
                               "set evaluation.quant or export.quant_types")
        return Path(files[quant])

    def prompts(self) -> list[dict]:
        return load_prompts(self.prompts_cfg, self.job_cfg, self.checker)

    def answers(self) -> dict[str, dict[int, dict]]:
        """Every model's saved answers by prompt id (empty for a model whose answers are not generated yet)."""
        return {m: {a["id"]: a for a in read_jsonl(self.out / f"answers-{m}.jsonl")} for m in self.models}

    def checked(self, prompts: list[dict], answers: dict[str, dict[int, dict]]) -> dict[str, dict[int, bool]]:
        """Per model, in prompt order: whether the checker accepts its answer to each checkable prompt.

        A prompt without an answer (skipped, or not generated yet) counts as wrong. Empty without a checker.
        """
        if self.checker is None:
            return {}
        def exact(a: dict, p: dict) -> bool:
            return self.checker.check(a.get("answer", ""), p["expected"], p["prompt"],
                                      a.get("finish_reason") == "stop")["exact"]

        return {m: {p["id"]: exact(answers[m].get(p["id"], {}), p) for p in prompts if p.get("expected") is not None}
                for m in self.models}

    def judge_name(self) -> str:
        """How the report names the judge; from the config, without loading or downloading it."""
        j = self.cfg.judge
        if j.stand_in:
            return (f"STAND-IN judge: {self.gguf('base').name} (a tiny local model, not Flow Judge; "
                    "its scores mean nothing)")
        return f"Flow Judge ({Path(j.path).name if j.path else f'{j.repo_id}/{j.filename}'})"

    def judge_file(self) -> Path:
        j = self.cfg.judge
        if j.stand_in:
            return self.gguf("base")
        from orpolab.evaluate.judge import resolve_judge_file

        return resolve_judge_file(j.path, j.repo_id, j.filename)

    # ---------------------------------------------------------------- stages

    def generate(self) -> None:
        gen = settings(GenerationConfig, self.cfg.generation, "evaluation.generation")
        prompts = self.prompts()
        for model in self.models:
            rows = answer_prompts(self.gguf(model), prompts, self.out / f"answers-{model}.jsonl", gen, model)
            answered = [r for r in rows if "answer" in r]
            ended = sum(r["finish_reason"] == "stop" for r in answered) / max(1, len(answered))
            skipped = f", {len(rows) - len(answered)} skipped (too long)" if len(rows) > len(answered) else ""
            print(f"    {model}: {len(answered)} answers, {ended:.0%} ended by themselves{skipped}", flush=True)

    def judge(self) -> None:
        from flow_judge import EvalInput, FlowJudge

        from orpolab.evaluate.judge import LlamaCppFlowJudge, metric_by_name

        prompts = {p["id"]: p for p in self.prompts()}
        answers = self.answers()
        if not all(answers.values()):
            raise OrpolabError("no answers to judge yet; run the generate stage first")
        judge_file, judge_name = self.judge_file(), self.judge_name()
        j = self.cfg.judge
        for metric_name in j.metrics:
            metric = metric_by_name(metric_name)
            out_file = self.out / f"verdicts-{metric_name}.jsonl"
            done = {(v["model"], v["id"]) for v in read_jsonl(out_file)}
            todo = [(pid, m) for pid in prompts for m in self.models  # all answers to a question back to back
                    if (m, pid) not in done and pid in answers[m] and "answer" in answers[m][pid]]
            if not todo:
                continue
            backend = LlamaCppFlowJudge(judge_file, [r.score for r in metric.rubric], j.max_tokens,
                                        j.max_feedback_chars, j.n_ctx, name=judge_name)
            judge = FlowJudge(metric=metric, model=backend, output_dir=str(self.out / "flow_judge"))
            try:
                from tqdm.auto import tqdm

                started = time.time()
                for i, (pid, model) in enumerate(tqdm(todo, desc=f"judging {metric_name}", unit="verdict",
                                                      disable=None)):
                    if i == 2 and len(todo) > 3:  # an estimate once the judge's speed is known
                        per = (time.time() - started) / 2
                        tqdm.write(f"    judging: about {per * (len(todo) - 2) / 60:.1f} min left for "
                                   f"{len(todo) - 2} verdicts ({per:.1f} s each)")
                    inputs = {"query": prompts[pid]["prompt"]}
                    if "reference_answer" in metric.required_inputs:
                        inputs["reference_answer"] = str(prompts[pid].get("reference") or "")
                    if "context" in metric.required_inputs:
                        inputs["context"] = str(prompts[pid].get("reference") or "")
                    ordered = [{k: inputs[k]} for k in metric.required_inputs]
                    verdict = judge.evaluate(EvalInput(inputs=ordered, output={metric.required_output:
                                                                              answers[model][pid]["answer"]}))
                    append_jsonl(out_file, {"id": pid, "model": model, "score": verdict.score,
                                            "feedback": verdict.feedback, "judge": judge_name})
            finally:
                backend.close()
            verdicts = read_jsonl(out_file)
            failures = sum(v["score"] < 0 for v in verdicts)
            print(f"    {metric_name}: {len(verdicts)} verdicts, {failures} unparsable", flush=True)

    def score(self) -> dict:
        boot = self.cfg.bootstrap
        prompts = self.prompts()
        answers = self.answers()
        checked = self.checked(prompts, answers)
        results: dict = {"prompts": len(prompts), "judge": self.judge_name(), "models_order": list(self.models),
                         "stand_in": bool(self.cfg.judge.stand_in),
                         "generation": OmegaConf.to_container(self.cfg.generation, resolve=True),
                         "quant": str(self.cfg.quant).upper(), "models": {}, "metrics": {}}
        for m in self.models:
            rows = [answers[m].get(p["id"], {}) for p in prompts]
            answered = [r for r in rows if "answer" in r]
            n = max(1, len(answered))
            stats = {
                "answered": len(answered), "skipped": sum("skipped" in r for r in rows),
                "ended_by_eos": sum(r["finish_reason"] == "stop" for r in answered) / n,
                "mean_tokens": sum(r["completion_tokens"] for r in answered) / n,
                "mean_repeated_3gram_fraction": sum(r["repeated_3gram_fraction"] for r in answered) / n,
            }
            if checked.get(m):
                correct = [float(c) for c in checked[m].values()]
                lo, hi = bootstrap_mean_ci(correct, boot.n_resamples, seed=boot.seed)
                stats["accuracy"] = {"mean": sum(correct) / len(correct), "ci_low": lo, "ci_high": hi,
                                     "n": len(correct)}
            results["models"][m] = stats
        if any(checked.values()):
            correct = {m: [float(c) for c in checked[m].values()] for m in self.models}
            # Each trained model against the base, on the same prompts.
            results["accuracy_paired"] = {m: paired_comparison(correct[m], correct["base"], boot.n_resamples,
                                                               boot.seed) for m in self.trained}
        for metric_name in self.cfg.judge.metrics:
            verdicts = read_jsonl(self.out / f"verdicts-{metric_name}.jsonl")
            score = {(v["model"], v["id"]): (v["score"] if v["score"] >= 0 else None) for v in verdicts}
            per = {m: [score.get((m, p["id"])) for p in prompts] for m in self.models}
            entry = {"parse_failures": sum(v["score"] < 0 for v in verdicts), "verdicts": len(verdicts),
                     "paired": {m: paired_comparison(per[m], per["base"], boot.n_resamples, boot.seed)
                                for m in self.trained}}
            for m in self.models:
                vals = [s for s in per[m] if s is not None]
                if vals:
                    lo, hi = bootstrap_mean_ci(vals, boot.n_resamples, seed=boot.seed)
                    entry[m] = {"mean": sum(vals) / len(vals), "ci_low": lo, "ci_high": hi, "n": len(vals)}
                checkable = [(s, checked[m][p["id"]]) for p, s in zip(prompts, per[m], strict=True)
                             if p.get("expected") is not None]
                if checkable:
                    entry.setdefault("agreement", {})[m] = judge_agreement([s for s, _ in checkable],
                                                                           [c for _, c in checkable],
                                                                           self.cfg.judge.good_threshold)
            results["metrics"][metric_name] = entry
        write_json_atomic(self.out / "results.json", results)
        return results

    def report(self, report_dir: Path) -> Path:
        """Gather what the report shows (MLflow, the stages' files), write it, log it on the parent run."""
        from orpolab.evaluate.report import CURVES, ReportInputs, write_report

        results_file = self.out / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else self.score()
        prompts = self.prompts()
        answers = self.answers()
        first_metric = next(iter(results["metrics"]), None)
        scores: dict[str, dict[int, int]] = {m: {} for m in self.models}
        if first_metric:
            for v in read_jsonl(self.out / f"verdicts-{first_metric}.jsonl"):
                scores.setdefault(v["model"], {})[v["id"]] = v["score"]
        checked = self.checked(prompts, answers)
        jobs = sweep_jobs(self.tracking_uri, self.export)
        c = tracking.client(self.tracking_uri)
        curves = {j["run_id"]: {k: [(m.step, m.value) for m in c.get_metric_history(j["run_id"], k)] for k in CURVES}
                  for j in jobs}
        inputs = ReportInputs(sweep=self.sweep, parent_run_id=self.export["parent_run_id"], export=self.export,
                              results=results, models=self.models, prompts=prompts, jobs=jobs, curves=curves,
                              answers=answers, scores=scores, checked=checked)
        out = write_report(inputs, report_dir)
        run = tracking.JobRun(self.tracking_uri, self.export["parent_run_id"])
        for f in (out, report_dir / "training_curves.png", report_dir / "scores.png", results_file):
            if f.is_file():
                tracking.with_retry(lambda f=f: run.client.log_artifact(run.run_id, str(f), "report"))
        return out


def sweep_jobs(tracking_uri: str, export: dict) -> list[dict]:
    """Every job of the sweep with its config, status and selection value, from MLflow."""
    from orpolab.evaluate.report import SWEEP_PARAMS

    exported = export.get("winners") or {"winner": export["winner"]}
    labels = {e["run_id"]: label for label, e in exported.items()}
    rows = []
    for r in tracking.child_runs(tracking_uri, export["parent_run_id"]):
        metric = r.data.tags.get("orpolab.selection_metric", "")
        rows.append({"job": int(r.data.tags.get("orpolab.job_num", "0")), "run_id": r.info.run_id,
                     "status": r.info.status, "metric": metric, "value": r.data.metrics.get(f"best/{metric}"),
                     **{p: r.data.params.get(p, "") for p in SWEEP_PARAMS},
                     "method": r.data.tags.get("orpolab.method", "orpo"),
                     "exported": labels.get(r.info.run_id, ""), "metrics": dict(r.data.metrics)})
    return sorted(rows, key=lambda row: row["job"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a sweep's exported winner against its base on the CPU.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (repeatable)")
    parser.add_argument("--report-dir", default=None, help="default: report/ in the project")
    parser.add_argument("--tracking-uri", default=None)
    console.add_debug_flag(parser)
    args = parser.parse_args(argv)
    root = Path(os.environ.get("ORPOLAB_ROOT", Path.cwd()))
    uri = args.tracking_uri or tracking.default_uri()
    console.quiet_libraries()
    console.log_to(None)

    def evaluate() -> None:
        ev = Evaluation(args.sweep_dir, uri)
        console.log_to(ev.sweep / "logs" / "evaluation.log")  # libraries' logs; the console keeps orpolab's lines
        llamacpp.route_logs(ev.sweep / "logs" / "llama.cpp.log")
        for stage in args.stage or STAGES:
            print(f"  {stage}: {STAGE_TITLES[stage]} ...", flush=True)
            if stage == "report":
                path = ev.report(Path(args.report_dir) if args.report_dir else root / "report")
                from orpolab.evaluate.report import headline

                results = json.loads((ev.out / "results.json").read_text())
                print("\n".join(headline(results, ev.export)), flush=True)
                print(f"report: {path}", flush=True)
            else:
                getattr(ev, stage)()

    return console.run_cli(evaluate, args.debug)
