"""Evaluate the exported model(s) against their base on the CPU: answers, Flow Judge verdicts, scores.

The models are the base and the sweep's winner, or, for a mixed-method sweep, the best job of each
method; every trained model is compared with the base on the same prompts.

Stages, each runnable alone on an existing sweep and each resuming from its saved results:

    python -m orpolab.evaluate <sweep> --stage generate   # answers of base and trained models (GGUF)
    python -m orpolab.evaluate <sweep> --stage calibrate  # the judge on answers of known quality (cached)
    python -m orpolab.evaluate <sweep> --stage judge      # Flow Judge verdicts
    python -m orpolab.evaluate <sweep> --stage score      # checked figures, bootstrap, ... -> results.json
    python -m orpolab.evaluate <sweep> --stage report     # report/<sweep id>/<evaluation id>/ and MLflow
    python -m orpolab.evaluate <sweep>                    # all of them
    python -m orpolab.evaluate <sweep> eval_prompts=finetome evaluation.judge.path=/x.gguf   # other settings

The settings are the winner's recorded ones composed with the command's overrides of ``evaluation`` and
``eval_prompts`` (:mod:`orpolab.core.stage_config`); each set of settings is its own evaluation, in
``<sweep>/evaluation/<id>/`` (:mod:`orpolab.evaluate.evaluations`), a nested MLflow run of the sweep's
parent run when the tracking store has it, else only local files. Only the export's GGUFs,
``export/export.json`` and the jobs' recorded configs are read from the sweep folder: a copy of those
on another machine evaluates there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orpolab.core import console, tracking
from orpolab.core.config import DataConfig, GenerationConfig, settings
from orpolab.core.errors import OrpolabError
from orpolab.core.files import append_jsonl, inside, read_jsonl, relative_to, write_json_atomic
from orpolab.core.stage_config import compose_stage
from orpolab.evaluate import evaluations
from orpolab.evaluate.generate import answer_prompts
from orpolab.evaluate.stats import bootstrap_mean_ci, paired_comparison
from orpolab.export import llamacpp
from orpolab.train.data import SkipRow, load_rows, normalize_row, overlap, three_splits

STAGES = ("generate", "calibrate", "judge", "score", "report")
STAGE_TITLES = {"generate": "answers of the base and trained models",
                "calibrate": "the judge on answers of known quality (cached per judge)",
                "judge": "a verdict on every answer",
                "score": "means, paired differences, bootstrap intervals", "report": "report.md, plots, MLflow"}


def make_checker(cfg: DictConfig):
    """``eval_prompts.checker``: an object with ``figures``, ``check``, ``reference`` and ``examples``
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


def load_prompts(cfg: DictConfig, job_cfg: DictConfig, checker=None) -> list[dict]:
    """Evaluation prompts as ``{id, prompt, reference, expected}``; ``expected`` only where ``checker`` can check."""
    kind, limit = cfg.kind, cfg.max_prompts
    rows: list[dict] = []
    if kind == "heldout":
        # The test split: never trained on, and not the validation rows that picked the checkpoints
        # and the winner (evaluating on those would favour the winner: the winner's curse).
        for row, prompt, chosen, _ in test_pairs(job_cfg):
            expected = row.get(cfg.reference_field or "answer") if checker else None
            rows.append({"prompt": prompt, "expected": expected,
                         "reference": checker.reference(expected) if checker and expected is not None else chosen})
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
    """Paths and settings of one evaluation of a sweep: its export, the winner's recorded config and the
    command's overrides (see module doc). Everything is checked here, before any stage runs."""

    def __init__(self, sweep_dir: str | Path, tracking_uri: str, overrides: tuple[str, ...] | list[str] = ()):
        self.sweep = Path(sweep_dir).resolve()
        export_file = self.sweep / "export" / "export.json"
        if not export_file.is_file():
            raise OrpolabError(f"{self.sweep} has no export (export/export.json); run `python -m orpolab.export "
                               f"{self.sweep}` first")
        self.export = json.loads(export_file.read_text())
        self.tracking_uri = tracking_uri
        winner = self.export["winner"]
        job_dir = self.path(winner["job_dir"]) if winner.get("job_dir") else old_job_dir(self.sweep, self.export)
        self.job_cfg = compose_stage(self.sweep, job_dir, overrides, ("evaluation", "eval_prompts"),
                                     "python -m orpolab.evaluate", fallback=winner.get("config"))
        self.cfg, self.prompts_cfg = self.job_cfg.evaluation, self.job_cfg.eval_prompts
        self.checker = make_checker(self.prompts_cfg)
        self.id = evaluations.evaluation_id(self.job_cfg)
        self.out = self.sweep / "evaluation" / self.id
        self._run: tracking.JobRun | None | bool = False  # False: not looked up yet
        # "base" first, then the exported models: "winner", or one per method in a mixed-method sweep;
        # then the winner at the other quantizations of evaluation.quants ("winner@F16").
        self.trained = tuple(self.export.get("winners", {"winner": None}))
        self.quant_labels = quant_labels(self.trained[0], str(self.cfg.quant).upper(),
                                         [str(q).upper() for q in self.cfg.get("quants") or []])
        extra = tuple(label for label in self.quant_labels.values() if label not in self.trained)
        self.models = ("base", *self.trained, *extra)
        for model in self.models:
            self.gguf(model)  # every GGUF the settings ask for is in the export, or say so now
        judge_path = self.cfg.judge.get("path")
        if judge_path and not Path(str(judge_path)).expanduser().is_file():
            raise OrpolabError(f"evaluation.judge.path: judge file {judge_path} does not exist")
        evaluations.write_settings(self.out, self.job_cfg, self.id)

    def path(self, recorded: str) -> Path:
        """A path export.json names, on this machine: relative to the sweep folder (absolute in older sweeps)."""
        return inside(self.sweep, recorded, self.export.get("sweep_dir"))

    def tracking_run(self) -> tracking.JobRun | None:
        """This evaluation's nested run under the sweep's parent run; None when the tracking store lacks the
        parent (a copied sweep evaluated on another machine): results and report are then local only."""
        if self._run is False:
            j = self.cfg.judge
            self._run = tracking.evaluation_run(self.tracking_uri, self.export["parent_run_id"], self.id, {
                "orpolab.judge": self.judge_name(), "orpolab.eval_prompts": str(self.prompts_cfg.kind),
                "orpolab.evaluation_dir": str(self.out), "orpolab.judge_path": str(j.get("path") or "")})
        return self._run or None

    def gguf(self, model: str) -> Path:
        """The GGUF a model label answers with: ``winner`` at ``evaluation.quant``, ``winner@F16`` at F16."""
        name, _, quant = model.partition("@")
        quant = quant or str(self.cfg.quant).upper()
        files = self.export["gguf"][name]
        if quant not in files:
            raise OrpolabError(f"no {quant} GGUF of the {name} model in the export (have {sorted(files)}); "
                               "set evaluation.quant / evaluation.quants, or export.quant_types")
        return self.path(files[quant])

    def prompts(self) -> list[dict]:
        return load_prompts(self.prompts_cfg, self.job_cfg, self.checker)

    def judged(self, prompts: list[dict]) -> list[dict]:
        """The prompts the judge scores: the first ``evaluation.judge.max_prompts`` (all when null).

        Judging is the slow part on a CPU (a verdict reads several hundred prompt tokens); the checked
        figures still use every prompt.
        """
        limit = self.cfg.judge.get("max_prompts")
        return prompts[:limit] if limit else prompts

    def answers(self) -> dict[str, dict[int, dict]]:
        """Every model's saved answers by prompt id (empty for a model whose answers are not generated yet)."""
        return {m: {a["id"]: a for a in read_jsonl(self.out / f"answers-{m}.jsonl")} for m in self.models}

    def checked(self, prompts: list[dict], answers: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
        """Per model and checkable prompt, the checker's figures (``{"value_right": True, "exact": False}``).

        A prompt without an answer (skipped, or not generated yet) counts as wrong. Empty without a checker.
        """
        if self.checker is None:
            return {}

        def check(a: dict, p: dict) -> dict[str, bool]:
            if "answer" not in a:
                return dict.fromkeys(self.checker.figures, False)
            return self.checker.check(a["answer"], p["expected"], p["prompt"], a.get("finish_reason") == "stop")

        return {m: {p["id"]: check(answers[m].get(p["id"], {}), p) for p in prompts if p.get("expected") is not None}
                for m in self.models}

    def judge_name(self) -> str:
        """How the report names the judge; from the config, without loading or downloading it."""
        j = self.cfg.judge
        name = Path(j.path).name if j.path else (self.gguf("base").name if j.stand_in else f"{j.repo_id}/{j.filename}")
        if j.stand_in:
            return f"STAND-IN judge: {name} (a small local model, not Flow Judge)"
        return f"Flow Judge ({name})"

    def judge_file(self) -> Path:
        j = self.cfg.judge
        if j.stand_in and not j.path:
            return self.gguf("base")
        from orpolab.evaluate.judge import resolve_judge_file

        return resolve_judge_file(j.path, j.repo_id, j.filename)

    def judge_identity(self, metric_name: str) -> dict:
        """What makes two judges' verdicts comparable: the file (name, sha256), its quantization, the
        grammar, the sampling and the prompt template. Recorded in results, report and MLflow."""
        from orpolab.evaluate.calibration import judge_identity, template_sha256
        from orpolab.evaluate.judge import metric_by_name, verdict_grammar

        j = self.cfg.judge
        metric = metric_by_name(metric_name)
        grammar = verdict_grammar([r.score for r in metric.rubric], j.max_feedback_chars)
        hashes = Path(str(j.calibration_cache)) / "file-hashes.json"  # a 2.4 GB judge is hashed once
        judge_file = self.judge_file()
        return {**judge_identity(judge_file, hashes), "quant": quant_of(judge_file.name),
                "stand_in": bool(j.stand_in), "family": j.family, "metric": metric_name,
                "grammar_sha256": hashlib.sha256(grammar.encode()).hexdigest()[:12],
                "grammar": f"flow-judge's <feedback>...</feedback><score>N</score>, feedback at most "
                           f"{j.max_feedback_chars} characters",
                "sampling": {"temperature": 0.0, "max_tokens": int(j.max_tokens), "n_ctx": int(j.n_ctx)},
                "prompt_template_sha256": template_sha256(metric)[:12]}

    def splits(self, prompts: list[dict]) -> dict:
        """Which data each figure comes from, with sizes, and whether the evaluation prompts leak.

        The evaluation prompts are compared with the training and validation prompts (identical up to
        whitespace); the report shows the counts, so a prompt file that overlaps is seen, not trusted.
        """
        data_cfg = settings(DataConfig, self.job_cfg.data, "data")
        s = three_splits(data_cfg)
        texts = [p["prompt"] for p in prompts]
        kind = str(self.prompts_cfg.kind)
        return {
            "train": {"rows": len(s.train), "source": s.sources["train"], "used_for": "training"},
            "validation": {"rows": len(s.validation), "source": s.sources["validation"],
                           "used_for": "checkpoint and winner selection, export verification"},
            "test": {"rows": len(s.test), "source": s.sources["test"],
                     "used_for": "judge calibration" + (", evaluation prompts" if kind == "heldout" else "")},
            "evaluation_prompts": {"n": len(prompts), "kind": kind,
                                   "source": "the test split" if kind == "heldout" else str(self.prompts_cfg.path),
                                   "in_train": overlap(texts, s.train, data_cfg),
                                   "in_validation": overlap(texts, s.validation, data_cfg)},
        }

    def calibration_sets(self) -> tuple[list[dict], list[dict]]:
        """Preference pairs (chosen, rejected) of the test split, and the checkable evaluation prompts."""
        pairs = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}
                 for _, prompt, chosen, rejected in test_pairs(self.job_cfg)]
        checkable = [{"prompt": p["prompt"], "expected": p["expected"]} for p in self.prompts()
                     if p.get("expected") is not None] if self.checker else []
        return pairs, checkable

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

    def _backend(self, scores: list[int]):
        from orpolab.evaluate.judge import LlamaCppFlowJudge

        j = self.cfg.judge
        return LlamaCppFlowJudge(self.judge_file(), scores, j.max_tokens, j.max_feedback_chars, j.n_ctx,
                                 name=self.judge_name(), parallel=int(j.get("parallel", 1)),
                                 kv_unified=bool(j.get("kv_unified", False)))

    def calibrate(self) -> dict:
        """The judge scores answers whose quality is known, before it scores the models (cached per judge)."""
        from orpolab.evaluate.calibration import calibrate, flow_judge_scorer
        from orpolab.evaluate.judge import metric_by_name

        j = self.cfg.judge
        out: dict = {"size": int(j.calibration_size), "metrics": {}}
        if not j.calibration_size:
            out["enabled"] = False
            write_json_atomic(self.out / "calibration.json", out)
            print("    calibration off (evaluation.judge.calibration_size=0): the judge is unmeasured", flush=True)
            return out
        pairs, checkable = self.calibration_sets()
        with flow_judge_scorer(self._backend) as scorer:
            for name in j.metrics:
                ident = self.judge_identity(name)
                settings = {k: ident[k] for k in ("grammar_sha256", "sampling")}
                result = calibrate(scorer, metric_by_name(name), pairs, checkable, self.checker,
                                   Path(str(j.calibration_cache)), self.judge_file(), settings=settings,
                                   size=int(j.calibration_size), seed=int(self.cfg.bootstrap.seed),
                                   n_resamples=int(self.cfg.bootstrap.n_resamples))
                out["metrics"][name] = result
                print(f"    {name}: {calibration_line(result)}", flush=True)
        out["enabled"] = True
        write_json_atomic(self.out / "calibration.json", out)
        return out

    @staticmethod
    def _eval_input(metric, prompt: dict, answer: dict):
        """flow-judge's input for one answer: the metric's inputs in its order, the answer as its output."""
        from flow_judge import EvalInput

        inputs = {"query": prompt["prompt"]}
        if "reference_answer" in metric.required_inputs:
            inputs["reference_answer"] = str(prompt.get("reference") or "")
        if "context" in metric.required_inputs:
            inputs["context"] = str(prompt.get("reference") or "")
        return EvalInput(inputs=[{k: inputs[k]} for k in metric.required_inputs],
                         output={metric.required_output: answer["answer"]})

    def judge(self) -> None:
        from flow_judge import EvalOutput, FlowJudge

        from orpolab.evaluate.judge import metric_by_name

        prompts = {p["id"]: p for p in self.judged(self.prompts())}
        answers = self.answers()
        if not all(answers.values()):
            raise OrpolabError("no answers to judge yet; run the generate stage first")
        judge_name = self.judge_name()
        for metric_name in self.cfg.judge.metrics:
            metric = metric_by_name(metric_name)
            out_file = self.out / f"verdicts-{metric_name}.jsonl"
            done = {(v["model"], v["id"]) for v in read_jsonl(out_file)}
            todo = [(pid, m) for pid in prompts for m in self.models  # all answers to a question back to back
                    if (m, pid) not in done and pid in answers[m] and "answer" in answers[m][pid]]
            if not todo:
                continue
            backend = self._backend([r.score for r in metric.rubric])
            judge = FlowJudge(metric=metric, model=backend, output_dir=str(self.out / "flow_judge"))
            try:
                from tqdm.auto import tqdm

                inputs = [self._eval_input(metric, prompts[pid], answers[model][pid]) for pid, model in todo]
                for one in inputs:
                    judge._validate_inputs(one)
                prompts_text = [judge._format_prompt(one) for one in inputs]
                started = time.time()
                with tqdm(total=len(todo), desc=f"judging {metric_name}", unit="verdict", disable=None) as bar:
                    # Each verdict is saved as soon as it is written: a kill loses only those being written.
                    for n, (i, raw) in enumerate(backend.verdicts(prompts_text), start=1):
                        pid, model = todo[i]
                        verdict = EvalOutput.parse(raw)
                        append_jsonl(out_file, {"id": pid, "model": model, "score": verdict.score,
                                                "feedback": verdict.feedback, "judge": judge_name})
                        bar.update()
                        if n == 2 and len(todo) > 3:  # an estimate once the judge's speed is known
                            per = (time.time() - started) / 2
                            tqdm.write(f"    judging: about {per * (len(todo) - 2) / 60:.1f} min left for "
                                       f"{len(todo) - 2} verdicts ({per:.1f} s each)")
            finally:
                backend.close()
            verdicts = read_jsonl(out_file)
            failures = sum(v["score"] < 0 for v in verdicts)
            print(f"    {metric_name}: {len(verdicts)} verdicts, {failures} unparsable", flush=True)

    def score(self) -> dict:
        boot = self.cfg.bootstrap
        n, seed = int(boot.n_resamples), int(boot.seed)
        prompts = self.prompts()
        answers = self.answers()
        checked = self.checked(prompts, answers)
        figures = list(getattr(self.checker, "figures", ())) if self.checker else []
        calibration_file = self.out / "calibration.json"
        results: dict = {
            "prompts": len(prompts), "judge": self.judge_name(), "models_order": list(self.models),
            "trained": list(self.trained), "stand_in": bool(self.cfg.judge.stand_in),
            "generation": OmegaConf.to_container(self.cfg.generation, resolve=True),
            "quant": str(self.cfg.quant).upper(), "quant_labels": self.quant_labels, "checks": figures,
            "splits": self.splits(prompts),
            "judge_identity": {m: self.judge_identity(m) for m in self.cfg.judge.metrics},
            "calibration": json.loads(calibration_file.read_text()) if calibration_file.is_file() else None,
            "self_preference": self_preference(self.job_cfg),
            "models": {}, "metrics": {},
        }
        for m in self.models:
            rows = [answers[m].get(p["id"], {}) for p in prompts]
            answered = [r for r in rows if "answer" in r]
            k = max(1, len(answered))
            stats = {
                "answered": len(answered), "skipped": sum("skipped" in r for r in rows),
                "ended_by_eos": sum(r["finish_reason"] == "stop" for r in answered) / k,
                "hit_budget": sum(r["finish_reason"] == "length" for r in answered),
                "mean_tokens": sum(r["completion_tokens"] for r in answered) / k,
                "mean_repeated_3gram_fraction": sum(r["repeated_3gram_fraction"] for r in answered) / k,
            }
            for fig in figures:
                values = [float(c[fig]) for c in checked[m].values()]
                if values:
                    lo, hi = bootstrap_mean_ci(values, n, seed=seed)
                    stats.setdefault("checks", {})[fig] = {"mean": sum(values) / len(values), "ci_low": lo,
                                                           "ci_high": hi, "n": len(values)}
            results["models"][m] = stats
        if checked:
            def figure(m: str, fig: str) -> list[float]:
                return [float(c[fig]) for c in checked[m].values()]

            # Each trained model against the base, on the same prompts.
            results["checks_paired"] = {fig: {m: paired_comparison(figure(m, fig), figure("base", fig), n, seed)
                                              for m in self.trained} for fig in figures}
        judged = self.judged(prompts)
        results["judged_prompts"] = len(judged)
        tokens = {m: [answers[m].get(p["id"], {}).get("completion_tokens") for p in judged] for m in self.models}
        judge_scores: dict[str, dict[str, list]] = {}  # metric -> model -> score per judged prompt
        for metric_name in self.cfg.judge.metrics:
            verdicts = read_jsonl(self.out / f"verdicts-{metric_name}.jsonl")
            score = {(v["model"], v["id"]): (v["score"] if v["score"] >= 0 else None) for v in verdicts}
            per = judge_scores[metric_name] = {m: [score.get((m, p["id"])) for p in judged] for m in self.models}
            entry = {"parse_failures": sum(v["score"] < 0 for v in verdicts), "verdicts": len(verdicts),
                     "paired": {m: paired_comparison(per[m], per["base"], n, seed) for m in self.trained},
                     "length": {m: length_sensitivity(per[m], per["base"], tokens[m], tokens["base"], n, seed)
                                for m in self.trained}}
            for m in self.models:
                vals = [s for s in per[m] if s is not None]
                if vals:
                    lo, hi = bootstrap_mean_ci(vals, n, seed=seed)
                    entry[m] = {"mean": sum(vals) / len(vals), "ci_low": lo, "ci_high": hi, "n": len(vals)}
            results["metrics"][metric_name] = entry
        if len(self.quant_labels) > 1:
            results["quant_costs"] = quant_costs(self.quant_labels, checked, figures, results["metrics"],
                                                 judge_scores, n, seed)
        write_json_atomic(self.out / "results.json", results)
        self._log_results(results)
        return results

    def _log_results(self, results: dict) -> None:
        """Calibration, quantization costs and the judge's identity on this evaluation's MLflow run (if any)."""
        run = self.tracking_run()
        if run is None:
            return
        metrics: dict[str, float] = {}
        for name, c in ((results.get("calibration") or {}).get("metrics") or {}).items():
            for part in ("pairwise", "auc"):
                entry = c.get(part) or {}
                if entry.get("value") is not None:
                    metrics[f"calibration/{name}/{part}"] = entry["value"]
                    metrics[f"calibration/{name}/{part}_ci_low"] = entry["ci_low"]
        for q, row in (results.get("quant_costs") or {}).get("rows", {}).items():
            for key, value in row.items():
                if isinstance(value, int | float):
                    metrics[f"quant/{q}/{key}"] = value
        if metrics:
            run.log_metrics(metrics)
        tags = {}
        for name, ident in results["judge_identity"].items():
            tags.update({f"orpolab.judge.{name}.file": ident["file"], f"orpolab.judge.{name}.sha256": ident["sha256"],
                         f"orpolab.judge.{name}.prompt_template": ident["prompt_template_sha256"]})
        run.set_tags(tags)

    def report(self, report_root: Path) -> Path:
        """Gather what the report shows (MLflow, the stages' files), write it to
        ``<report_root>/<sweep id>/<evaluation id>/``, point ``<report_root>/latest`` at it, list the sweep's
        evaluations in it and in the others' reports, and log it on this evaluation's MLflow run."""
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
        # People's blind ratings (python -m orpolab.evaluate.review), read afresh: new ones need no new judging.
        from orpolab.evaluate.review.fold import gather

        human = gather(self.out, self.models, scores, int(self.cfg.bootstrap.n_resamples), int(self.cfg.bootstrap.seed))
        run = self.tracking_run()
        jobs = sweep_jobs(self.tracking_uri, self.export) if run is not None else []
        c = tracking.client(self.tracking_uri)
        curves = {j["run_id"]: {k: [(m.step, m.value) for m in c.get_metric_history(j["run_id"], k)] for k in CURVES}
                  for j in jobs}
        notes = [f"Evaluation `{self.id}` of this sweep: settings in `{self.out / 'settings.yaml'}`, results beside "
                 "them."]
        if run is None:
            notes.append(f"**MLflow was not updated**: the tracking store `{self.tracking_uri}` has no parent run "
                         f"`{self.export['parent_run_id']}` for this sweep (a copy evaluated elsewhere?); results and "
                         "this report are local only, and the sweep table and training curves, which come from "
                         "MLflow, are empty.")
        report_root = Path(report_root)
        sweep_reports = report_root / self.sweep.name
        listed = evaluations.evaluations(self.sweep)
        inputs = ReportInputs(sweep=self.sweep, parent_run_id=self.export["parent_run_id"], export=self.export,
                              results=results, models=self.models, prompts=prompts, jobs=jobs, curves=curves,
                              answers=answers, scores=scores, checked=checked, evaluation_id=self.id, notes=notes,
                              evaluations=evaluations.section(listed, self.id, sweep_reports), human=human)
        report_dir = sweep_reports / self.id
        out = write_report(inputs, report_dir)
        evaluations.refresh_others(listed, self.id, sweep_reports)
        point_latest(report_root, report_dir)
        if run is not None:
            if human:
                from orpolab.evaluate.human import metrics as human_metrics

                run.log_metrics(human_metrics(human))
            for f in (out, report_dir / "training_curves.png", report_dir / "scores.png", results_file,
                      self.out / "settings.yaml", *sorted(report_dir.glob("search_*.png"))):
                if f.is_file():
                    tracking.with_retry(lambda f=f: run.client.log_artifact(run.run_id, str(f), "report"))
            run.finish()
        return out


def old_job_dir(sweep: Path, export: dict) -> Path | None:
    """The winner's job folder in an export written before it was recorded: from its best checkpoint's path."""
    checkpoint, recorded = export["winner"].get("best_checkpoint"), export.get("sweep_dir")
    if not (checkpoint and recorded):
        return None
    relative = Path(relative_to(checkpoint, recorded))
    return None if relative.is_absolute() else sweep / relative.parent.parent


def self_preference(job_cfg: DictConfig) -> dict:
    """Whether the judge judges its own family (``model.family`` = ``evaluation.judge.family``).

    Judges tend to prefer text of their own lineage; the report says so in its first lines.
    """
    family, judge_family = job_cfg.model.get("family"), job_cfg.evaluation.judge.get("family")
    return {"model_family": family, "judge_family": judge_family,
            "same": bool(family and judge_family and family == judge_family)}


def quant_labels(first: str, main: str, quants: list[str]) -> dict[str, str]:
    """Quantization -> the model label that answers with it: the main quantization is the winner itself."""
    return {q: first if q == main else f"{first}@{q}" for q in quants}


def quant_of(file_name: str) -> str:
    """A GGUF's quantization from its file name (``flow-judge-v0.1-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    import re

    match = re.search(r"(?i)(BF16|F16|F32|IQ\d_\w+?|Q\d_K_[SML]|Q\d_K|Q\d_\d)(?=\.gguf$|[-.])", file_name)
    return match.group(1).upper() if match else "unknown"


def length_sensitivity(scores: list, base_scores: list, tokens: list, base_tokens: list, n: int, seed: int) -> dict:
    """Per prompt, score difference regressed on answer-length difference (tokens): a sensitivity figure."""
    from orpolab.evaluate.stats import length_regression

    rows = [(s - b, t - u) for s, b, t, u in zip(scores, base_scores, tokens, base_tokens, strict=True)
            if None not in (s, b, t, u)]
    return length_regression([d for d, _ in rows], [x for _, x in rows], n, seed)


def quant_costs(labels: dict[str, str], checked: dict, figures: list[str], metrics: dict,
                judge_scores: dict[str, dict[str, list]], n: int, seed: int) -> dict:
    """Per quantization of the winner: checked figures and judge score, each paired against F16.

    ``judge_scores``: metric -> model -> its score on each judged prompt (None: no verdict), as scored.
    """
    reference = "F16" if "F16" in labels else next(iter(labels))
    rows: dict[str, dict] = {}
    for q, label in labels.items():
        row: dict = {"model": label}
        for fig in figures:
            values = [float(c[fig]) for c in checked.get(label, {}).values()]
            if values:
                row[fig] = sum(values) / len(values)
                if q != reference:
                    ref = [float(c[fig]) for c in checked[labels[reference]].values()]
                    row[f"{fig}_vs_{reference}"] = paired_comparison(values, ref, n, seed)
        for name, per in judge_scores.items():
            if metrics[name].get(label):
                row[f"judge_{name}"] = metrics[name][label]["mean"]
            if q != reference:
                row[f"judge_{name}_vs_{reference}"] = paired_comparison(per[label], per[labels[reference]], n, seed)
        rows[q] = row
    return {"reference": reference, "rows": rows}


def calibration_line(result: dict) -> str:
    """One console line for a metric's calibration figures."""
    from orpolab.evaluate.stats import figure_text

    parts = []
    if result.get("pairwise"):
        parts.append(f"P(chosen scored higher) + ½ ties {figure_text(result['pairwise'])} on "
                     f"{result['pairwise'].get('n', 0)} test pairs")
    if result.get("auc"):
        parts.append(f"AUC {figure_text(result['auc'])} on {result['auc'].get('n', 0)} checked answers")
    cached = " (cached)" if result.get("cached") else ""
    return "; ".join(parts) + f": {result.get('verdict', '')}{cached}"


def point_latest(root: Path, target: Path) -> None:
    """``<root>/latest`` -> the newest report folder, replaced in one step (a symlink renamed over the old)."""
    link, tmp = root / "latest", root / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, root), target_is_directory=True)
    os.replace(tmp, link)


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
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra-style overrides of evaluation and eval_prompts, e.g. eval_prompts=finetome "
                             "evaluation.judge.path=/models/flow-judge-v0.1-Q4_K_M.gguf evaluation.quants=[Q8_0]")
    parser.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (repeatable)")
    parser.add_argument("--report-dir", default=None,
                        help="where reports go, one folder per sweep and `latest` (default: report/ in the project)")
    parser.add_argument("--tracking-uri", default=None)
    console.add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    root = Path(os.environ.get("ORPOLAB_ROOT", Path.cwd()))
    uri = args.tracking_uri or tracking.default_uri()
    console.quiet_libraries()
    console.log_to(None)

    def evaluate() -> None:
        ev = Evaluation(args.sweep_dir, uri, args.overrides)
        console.log_to(ev.sweep / "logs" / "evaluation.log")  # libraries' logs; the console keeps orpolab's lines
        llamacpp.route_logs(ev.sweep / "logs" / "llama.cpp.log")
        try:
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
        except BaseException as err:
            # The evaluation's nested MLflow run shows FAILED rather than RUNNING forever; a re-run reopens it.
            if isinstance(ev._run, tracking.JobRun):
                with contextlib.suppress(Exception):
                    ev._run.fail(err)
            raise

    return console.run_cli(evaluate, args.debug)
