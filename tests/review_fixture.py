"""A small evaluated sweep written straight to disk, as the stages write it, for the review tests.

The winner's job folder holds its recorded config and overrides (``.hydra/``), the export names it, the evaluation
folder holds ``settings.yaml`` and one ``answers-<model>.jsonl`` per model: what the review reads. No
training, export or judging runs, so the review tests take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from omegaconf import OmegaConf

from orpolab.core.files import append_jsonl
from orpolab.core.stage_config import compose_stage
from orpolab.evaluate import evaluations

from .helpers import ROOT, compose

N_PROMPTS = 6


@functools.cache
def sample_prompts() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / "sample" / "prompts.jsonl").read_text().splitlines()]


def answer_text(model: str, prompt_id: int) -> str:
    """Every answer different, so a test can tell from the page which model a side shows (without its name):
    the winner answers the sample task's question right, the base wrongly and without stopping."""
    value = sample_prompts()[prompt_id]["answer"]
    if model == "winner":
        return f"The answer is {value}."
    if model == "base":
        return f"Let me think. The value is {value + 1}. " * 3 + "The value is"
    return f"Answer {hashlib.sha256(model.encode()).hexdigest()[:6]}: {value}."


def make_evaluation(root: Path, models: tuple[str, ...] = ("base", "winner")) -> tuple[Path, Path]:
    """(sweep folder, evaluation folder): the sample task's first prompts answered by ``models``.

    The last prompt's base answer was skipped (too long), as the generate stage records it, so that
    prompt is no item of the review.
    """
    sweep = root / "sweep"
    job = sweep / "0"
    (job / ".hydra").mkdir(parents=True)
    overrides = ["eval_prompts=sample", f"eval_prompts.max_prompts={N_PROMPTS}"]
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    recorded = OmegaConf.to_container(compose(overrides, job), resolve=False)  # what Hydra saves for a job
    recorded.pop("hydra")
    OmegaConf.save(OmegaConf.create(recorded), job / ".hydra" / "config.yaml")
    (sweep / "export").mkdir()
    (sweep / "export" / "export.json").write_text(json.dumps(
        {"winner": {"job_dir": "0", "job": 0}, "parent_run_id": "none", "sweep_dir": str(sweep)}))
    cfg = compose_stage(sweep, job, (), ("evaluation", "eval_prompts"), "test")
    eid = evaluations.evaluation_id(cfg)
    folder = sweep / "evaluation" / eid
    evaluations.write_settings(folder, cfg, eid)
    for model in models:
        for pid in range(N_PROMPTS):
            if model == "base" and pid == N_PROMPTS - 1:
                row = {"id": pid, "model": model, "skipped": "prompt_too_long"}
            else:
                row = {"id": pid, "model": model, "answer": answer_text(model, pid), "finish_reason": "stop",
                       "completion_tokens": 12, "repeated_3gram_fraction": 0.0}
            append_jsonl(folder / f"answers-{model}.jsonl", row)
    return sweep, folder


class ReviewServer:
    """``python -m orpolab.evaluate.review`` in its own process (its own session, so a kill reaches only it)."""

    def __init__(self, sweep: Path, reviewer: str, *extra: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "orpolab.evaluate.review", str(sweep), "--reviewer",
                                      reviewer, "--port", "0", *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        deadline = time.time() + 90
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"open (http://\S+)/", line)
            if found:
                self.url = found.group(1)
                return
        self.kill()
        raise AssertionError("the review server did not start:\n" + "".join(self.lines))

    def call(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def kill(self) -> None:
        """SIGKILL: no handler, no flush, no clean shutdown."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
