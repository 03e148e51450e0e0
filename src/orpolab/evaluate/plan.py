"""What one evaluation of a sweep works on: its folder, its settings, the models, the prompts, the judge.

:class:`EvaluationPlan` is built once, before any stage runs, and checks everything a stage would
otherwise trip over late (the export, every GGUF the settings ask for, the judge file). Each stage
(:mod:`~orpolab.evaluate.answers`, :mod:`~orpolab.evaluate.calibrate`, :mod:`~orpolab.evaluate.verdicts`,
:mod:`~orpolab.evaluate.scores`, :mod:`~orpolab.evaluate.reporting`) receives the plan and reads or
writes only the files it names.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from orpolab.core import records, sweep_layout, tracking
from orpolab.core.config import EvalPromptsConfig, EvaluationConfig, settings
from orpolab.core.errors import OrpolabError
from orpolab.core.files import inside, read_jsonl, write_json_atomic
from orpolab.core.llama_runtime import check_gpu_offload
from orpolab.core.stage_config import compose_stage
from orpolab.evaluate import evaluations
from orpolab.evaluate.prompts import load_prompts, make_checker
from orpolab.evaluate.store import Reuse, Store


class EvaluationPlan:
    """Paths and settings of one evaluation: the export, the winner's recorded config and the command's
    overrides of ``evaluation`` and ``eval_prompts`` (:mod:`orpolab.core.stage_config`)."""

    def __init__(self, sweep_dir: str | Path, tracking_uri: str, overrides: tuple[str, ...] | list[str] = ()):
        self.sweep = Path(sweep_dir).resolve()
        export_file = self.sweep / "export" / "export.json"
        if not export_file.is_file():
            raise OrpolabError(f"{self.sweep} has no export (export/export.json); run `python -m orpolab.export "
                               f"{self.sweep}` first")
        self.export: dict = json.loads(export_file.read_text())
        self.tracking_uri = tracking_uri
        winner = self.export["winner"]
        sweep_layout.check_sweep(self.sweep, retry="train it again as a new sweep")
        sweep_layout.check_export(self.sweep, self.export)
        self.job_cfg = compose_stage(self.sweep, self.path(winner["job_dir"]), overrides,
                                     ("evaluation", "eval_prompts"), "python -m orpolab.evaluate")
        self.settings = settings(EvaluationConfig, self.job_cfg.evaluation, "evaluation")
        self.prompt_settings = settings(EvalPromptsConfig, self.job_cfg.eval_prompts, "eval_prompts")
        self.checker = make_checker(self.prompt_settings)
        self.id = evaluations.evaluation_id(self.job_cfg)
        self.out = self.sweep / "evaluation" / self.id
        self._run: tracking.EvaluationRun | None | bool = False  # False: not looked up yet
        # "base" first, then the exported models: "winner", or one per method in a mixed-method sweep;
        # then the winner at the other quantizations of evaluation.quants ("winner@F16").
        self.trained: tuple[str, ...] = tuple(self.export.get("winners", {"winner": None}))
        self.quant_labels = quant_labels(self.trained[0], self.quant, [str(q).upper() for q in self.settings.quants])
        extra = tuple(label for label in self.quant_labels.values() if label not in self.trained)
        self.models: tuple[str, ...] = ("base", *self.trained, *extra)
        for model in self.models:
            self.gguf(model)  # every GGUF the settings ask for is in the export, or say so now
        judge_path = self.settings.judge.path
        if judge_path and not Path(str(judge_path)).expanduser().is_file():
            raise OrpolabError(f"evaluation.judge.path: judge file {judge_path} does not exist")
        for key, layers in (("evaluation.generation.n_gpu_layers", self.settings.generation.n_gpu_layers),
                            ("evaluation.judge.n_gpu_layers", self.settings.judge.n_gpu_layers)):
            check_gpu_offload(layers, key)
        evaluations.write_settings(self.out, self.job_cfg, self.id)

    @property
    def quant(self) -> str:
        """The quantization base and winner answer at (``evaluation.quant``)."""
        return str(self.settings.quant).upper()

    def path(self, recorded: str) -> Path:
        """A path export.json names, on this machine: relative to the sweep folder."""
        return inside(self.sweep, recorded, self.export.get("sweep_dir"))

    def gguf(self, model: str) -> Path:
        """The GGUF a model label answers with: ``winner`` at ``evaluation.quant``, ``winner@F16`` at F16."""
        name, _, quant = model.partition("@")
        quant = quant or self.quant
        files = self.export["gguf"][name]
        if quant not in files:
            raise OrpolabError(f"no {quant} GGUF of the {name} model in the export (have {sorted(files)}); "
                               "set evaluation.quant / evaluation.quants, or export.quant_types")
        return self.path(files[quant])

    # ------------------------------------------------------------------ prompts and answers

    @cached_property
    def prompts(self) -> list[dict]:
        """The evaluation prompts (read once per command)."""
        return load_prompts(self.prompt_settings, self.job_cfg, self.checker)

    @property
    def judged(self) -> list[dict]:
        """The prompts the judge scores: the first ``evaluation.judge.max_prompts`` (all when null).

        Judging is the slow part on a CPU (a verdict reads several hundred prompt tokens); the checked
        figures still use every prompt.
        """
        limit = self.settings.judge.max_prompts
        return self.prompts[:limit] if limit else self.prompts

    def answers_file(self, model: str) -> Path:
        return self.out / f"answers-{model}.jsonl"

    def verdicts_file(self, metric: str) -> Path:
        return self.out / f"verdicts-{metric}.jsonl"

    def answers(self) -> dict[str, dict[int, dict]]:
        """Every model's saved answers by prompt id (empty for a model whose answers are not generated yet)."""
        return {m: {a["id"]: a for a in read_jsonl(self.answers_file(m))} for m in self.models}

    def checked(self, answers: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
        """Per model and checkable prompt, the checker's figures (``{"value_right": True, "exact": False}``).

        A prompt without an answer (skipped, or not generated yet) counts as wrong. Empty without a checker.
        """
        if self.checker is None:
            return {}

        def check(a: dict, p: dict) -> dict[str, bool]:
            if "answer" not in a:
                return dict.fromkeys(self.checker.figures, False)
            return self.checker.check(a["answer"], p["expected"], p["prompt"], a.get("finish_reason") == "stop")

        return {m: {p["id"]: check(answers[m].get(p["id"], {}), p) for p in self.prompts
                    if p.get("expected") is not None} for m in self.models}

    # ------------------------------------------------------------------ stored work

    def store(self, kind: str) -> Store:
        """The content-addressed store of ``answers`` or ``verdicts`` (:mod:`orpolab.evaluate.store`)."""
        return Store(Path(str(self.settings.store_dir)), kind, enabled=self.settings.reuse)

    def file_sha256(self, path: Path) -> str:
        """A GGUF's sha256, computed once per file version on this machine (a judge of GBs is read once)."""
        from orpolab.core.files import file_sha256

        return file_sha256(path, Path(str(self.settings.judge.calibration_cache)) / "file-hashes.json")

    def record_reuse(self, stage: str, reuse: Reuse) -> None:
        """What a stage took from the store and made anew (its latest run), in ``reuse.json`` and on the console."""
        file = self.out / "reuse.json"
        recorded = json.loads(file.read_text()) if file.is_file() else {}
        recorded[stage] = reuse.as_dict()
        write_json_atomic(file, recorded)
        if reuse.reused or reuse.unreadable:
            damaged = f"; {reuse.unreadable} damaged entries made again" if reuse.unreadable else ""
            print(f"    {stage}: {reuse.reused} taken from the store, {reuse.made} made anew (about "
                  f"{reuse.seconds_saved / 60:.1f} min saved){damaged}", flush=True)

    # ------------------------------------------------------------------ the judge

    def judge_name(self) -> str:
        """How the report names the judge; from the config, without loading or downloading it."""
        j = self.settings.judge
        name = Path(j.path).name if j.path else (self.gguf("base").name if j.stand_in else f"{j.repo_id}/{j.filename}")
        if j.stand_in:
            return f"STAND-IN judge: {name} (a small local model, not Flow Judge)"
        return f"Flow Judge ({name})"

    def judge_file(self) -> Path:
        """The judge's GGUF on this machine (downloaded from the hub once when no path is set)."""
        j = self.settings.judge
        if j.stand_in and not j.path:
            return self.gguf("base")
        from orpolab.evaluate.judge import resolve_judge_file

        return resolve_judge_file(j.path, j.repo_id, j.filename)

    def judge_identity(self, metric_name: str) -> dict:
        """What makes two judges' verdicts comparable: the file (name, sha256), its quantization, the
        grammar, the sampling and the prompt template. Recorded in results, report and MLflow."""
        from orpolab.evaluate.calibration import judge_identity, template_sha256
        from orpolab.evaluate.judge import metric_by_name, verdict_grammar

        j = self.settings.judge
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

    def judge_backend(self, scores: list[int]) -> Any:
        """The judge model on llama.cpp, scoring on ``scores`` (the metric's rubric)."""
        from orpolab.evaluate.judge import LlamaCppFlowJudge

        j = self.settings.judge
        return LlamaCppFlowJudge(self.judge_file(), scores, j.max_tokens, j.max_feedback_chars, j.n_ctx,
                                 name=self.judge_name(), parallel=j.parallel, kv_unified=j.kv_unified,
                                 n_gpu_layers=j.n_gpu_layers)

    # ------------------------------------------------------------------ MLflow

    def tracking_run(self) -> tracking.EvaluationRun | None:
        """This evaluation's nested run under the sweep's parent run; None when the tracking store lacks the
        parent (a copied sweep evaluated on another machine): results and report are then local only."""
        if self._run is False:
            self._run = tracking.evaluation_run(self.tracking_uri, self.export["parent_run_id"], self.id, {
                records.JUDGE: self.judge_name(), records.EVAL_PROMPTS: str(self.prompt_settings.kind),
                records.EVALUATION_DIR: str(self.out), records.JUDGE_PATH: str(self.settings.judge.path or "")})
        return self._run or None

    def fail(self, err: BaseException) -> None:
        """Mark this evaluation's MLflow run FAILED (if one was opened) so it does not show RUNNING forever."""
        if isinstance(self._run, tracking.EvaluationRun):
            self._run.fail(err)


def quant_labels(first: str, main: str, quants: list[str]) -> dict[str, str]:
    """Quantization -> the model label that answers with it: the main quantization is the winner itself."""
    return {q: first if q == main else f"{first}@{q}" for q in quants}


def quant_of(file_name: str) -> str:
    """A GGUF's quantization from its file name (``flow-judge-v0.1-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    match = re.search(r"(?i)(BF16|F16|F32|IQ\d_\w+?|Q\d_K_[SML]|Q\d_K|Q\d_\d)(?=\.gguf$|[-.])", file_name)
    return match.group(1).upper() if match else "unknown"
