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

Each stage is a module of :mod:`orpolab.evaluate.stages` that receives the evaluation's
:class:`~orpolab.evaluate.plan.EvaluationPlan`. The settings are the winner's recorded ones composed with the
command's overrides of ``evaluation`` and ``eval_prompts`` (:mod:`orpolab.core.stage_config`); each set of
settings is its own evaluation, in ``<sweep>/evaluation/<id>/`` (:mod:`orpolab.evaluate.evaluations`), a
nested MLflow run of the sweep's parent run when the tracking store has it, else only local files. Only the
export's GGUFs, ``export/export.json`` and the jobs' recorded configs are read from the sweep folder: a copy
of those on another machine evaluates there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from orpolab.core import console, llama_runtime, tracking
from orpolab.evaluate.plan import EvaluationPlan
from orpolab.evaluate.report_results import headline
from orpolab.evaluate.stages import answers, calibration, report, scores, verdicts

# Command-line stage name -> its module (each has TITLE and run(plan)), in the order they run.
STAGES = {"generate": answers, "calibrate": calibration, "judge": verdicts, "score": scores, "report": report}


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
        plan = EvaluationPlan(args.sweep_dir, uri, args.overrides)
        console.log_to(plan.sweep / "logs" / "evaluation.log")  # libraries' logs; the console keeps orpolab's lines
        llama_runtime.route_logs(plan.sweep / "logs" / "llama.cpp.log")
        try:
            for stage in args.stage or STAGES:
                print(f"  {stage}: {STAGES[stage].TITLE} ...", flush=True)
                if stage == "report":
                    path = report.run(plan, Path(args.report_dir) if args.report_dir else root / "report")
                    results = json.loads((plan.out / "results.json").read_text())
                    print("\n".join(headline(results, plan.export)), flush=True)
                    print(f"report: {path}", flush=True)
                else:
                    STAGES[stage].run(plan)
        except BaseException as err:
            # The evaluation's nested MLflow run shows FAILED rather than RUNNING forever; a re-run reopens it.
            with contextlib.suppress(Exception):
                plan.fail(err)
            raise

    return console.run_cli(evaluate, args.debug)
