"""The stores of answers and verdicts: the same work is never done twice, and never paired with other work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orpolab.core.defaults import default_settings
from orpolab.core.files import read_jsonl
from orpolab.evaluate.generate import answer_prompts
from orpolab.evaluate.store import Store, clear

from .helpers import evaluation_dir, private_copy

QUESTIONS = ["What is 2 + 2?", "Name three colours.", "Write one sentence about the sea.", "Say hi."]


def prompts(texts: list[str] = QUESTIONS) -> list[dict]:
    return [{"id": i, "prompt": q} for i, q in enumerate(texts)]


def config(temperature: float = 0.0):
    return default_settings("evaluation.generation", max_tokens=16, n_ctx=256, threads=2, parallel=4,
                            temperature=temperature, seed=3)


@pytest.fixture(scope="module")
def gguf(smollm2) -> Path:
    return smollm2["gguf"]


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_an_answer_from_the_store_is_the_answer_generation_gives(gguf, tmp_path, temperature):
    cfg = config(temperature)
    first = Store(tmp_path / "store", "answers")
    made = answer_prompts(gguf, prompts(), tmp_path / "a.jsonl", cfg, "base", store=first)
    assert (first.reuse.made, first.reuse.reused) == (4, 0)
    again = Store(tmp_path / "store", "answers")  # another evaluation, another process: the same folder
    reused = answer_prompts(gguf, prompts(), tmp_path / "b.jsonl", cfg, "base", store=again)
    assert (again.reuse.made, again.reuse.reused) == (0, 4) and again.reuse.seconds_saved > 0
    fresh = answer_prompts(gguf, prompts(), tmp_path / "c.jsonl", cfg, "base",
                           store=Store(tmp_path / "elsewhere", "answers"))
    assert [r["answer"] for r in reused] == [r["answer"] for r in fresh] == [r["answer"] for r in made]
    if temperature:
        assert all(r["seed"] == f["seed"] for r, f in zip(reused, fresh, strict=True))


def test_a_truncated_entry_is_made_again_and_reuse_off_makes_everything(gguf, tmp_path):
    cfg = config()
    store = Store(tmp_path / "store", "answers")
    rows = answer_prompts(gguf, prompts(), tmp_path / "a.jsonl", cfg, "base", store=store)
    torn = store.path(rows[1]["key"])
    torn.write_text(torn.read_text()[:20])  # a copy cut short: it must not be trusted
    again = Store(tmp_path / "store", "answers")
    answer_prompts(gguf, prompts(), tmp_path / "b.jsonl", cfg, "base", store=again)
    assert (again.reuse.reused, again.reuse.made, again.reuse.unreadable) == (3, 1, 1)
    assert json.loads(torn.read_text())["key"] == rows[1]["key"]  # written whole again
    off = Store(tmp_path / "store", "answers", enabled=False)
    answer_prompts(gguf, prompts(), tmp_path / "c.jsonl", cfg, "base", store=off)
    assert (off.reuse.reused, off.reuse.made) == (0, 4)
    assert clear(tmp_path / "store") == 4 and not (tmp_path / "store" / "answers").exists()


def test_an_edited_prompt_or_a_new_model_at_the_same_path_is_answered_afresh(sweep, tmp_path):
    """Resuming by position would pair prompt 1 with its old answer, and the new model with the old one's."""
    gguf_dir = sweep["dir"] / "export" / "gguf"
    model, out_file, cfg = tmp_path / "model.gguf", tmp_path / "answers.jsonl", config()
    shutil.copy(gguf_dir / "base-Q4_K_M.gguf", model)
    store = Store(tmp_path / "store", "answers")
    before = answer_prompts(model, prompts(), out_file, cfg, "winner", store=store)
    edited = [QUESTIONS[0], "Name four colours.", *QUESTIONS[2:]]
    store = Store(tmp_path / "store", "answers")
    after = answer_prompts(model, prompts(edited), out_file, cfg, "winner", store=store)
    assert (store.reuse.made, store.reuse.reused) == (1, 0)  # the other three come from the answers file
    assert after[1]["key"] != before[1]["key"] and [r["key"] for r in after[::2]] == [r["key"] for r in before[::2]]
    os.replace(shutil.copy(gguf_dir / "winner-Q4_K_M.gguf", tmp_path / "new.gguf"), model)  # a new winner
    store = Store(tmp_path / "store", "answers")
    new = answer_prompts(model, prompts(edited), out_file, cfg, "winner", store=store)
    assert (store.reuse.made, store.reuse.reused) == (4, 0)
    assert not {r["key"] for r in new} & {r["key"] for r in after}
    assert [r["key"] for r in read_jsonl(out_file)] == [r["key"] for r in new]  # no old answer left in the file


def evaluate(copy: dict, store: Path, report: Path) -> dict:
    # Greedy: the demo samples with a seed per (model, prompt), so the same GGUF under another label would
    # rightly give other answers; greedy, it gives the same ones.
    proc = subprocess.run([sys.executable, "-m", "orpolab.evaluate", str(copy["dir"]), "evaluation.quants=[]",
                           "evaluation.generation.temperature=0", f"evaluation.store_dir={store}", "--report-dir",
                           str(report)], capture_output=True,
                          text=True, env={**os.environ, "MLFLOW_TRACKING_URI": copy["uri"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = evaluation_dir(copy["dir"])
    return {"folder": folder, "stdout": proc.stdout, "reuse": json.loads((folder / "reuse.json").read_text()),
            "results": json.loads((folder / "results.json").read_text())}


@pytest.mark.subprocess
def test_a_second_sweep_of_the_same_base_answers_and_judges_no_base_answer_again(sweep, tmp_path):
    store, report = tmp_path / "store", tmp_path / "report"
    # A sweep whose winner gives the base's answers (its GGUF is the base's): identical answers, one verdict each.
    same = private_copy(sweep, tmp_path, "same")
    gguf_dir = same["dir"] / "export" / "gguf"
    shutil.copy(gguf_dir / "base-Q4_K_M.gguf", gguf_dir / "winner-Q4_K_M.gguf")
    shutil.rmtree(same["dir"] / "evaluation")
    first = evaluate(same, store, report)
    n = first["results"]["prompts"]
    assert first["reuse"]["answers"] == {**first["reuse"]["answers"], "made": n, "reused": n}
    assert first["reuse"]["verdicts"]["made"] == n  # 2 n answers, n distinct prompts for the judge
    (metric,) = first["results"]["metrics"]
    verdicts = read_jsonl(first["folder"] / f"verdicts-{metric}.jsonl")
    assert len(verdicts) == 2 * n and len({v["key"] for v in verdicts}) == n
    stored = {p.stem for p in (store / "verdicts").rglob("*.json")}

    # Another sweep of the same base with other hyperparameters: its base is neither answered nor judged again.
    other = private_copy(sweep, tmp_path, "other")
    shutil.rmtree(other["dir"] / "evaluation")
    second = evaluate(other, store, report)
    assert second["reuse"]["answers"]["reused"] == n and second["reuse"]["answers"]["made"] == n  # the winner's
    base_rows = [v for v in read_jsonl(second["folder"] / f"verdicts-{metric}.jsonl") if v["model"] == "base"]
    assert len(base_rows) == n and {v["key"] for v in base_rows} <= stored
    winner_keys = {v["key"] for v in read_jsonl(second["folder"] / f"verdicts-{metric}.jsonl")} - stored
    assert second["reuse"]["verdicts"]["made"] == len(winner_keys)
    assert "taken from the store" in second["stdout"]
    # The report's base figures are the first's.
    assert second["results"]["models"]["base"] == first["results"]["models"]["base"]
    assert second["results"]["metrics"][metric]["base"] == first["results"]["metrics"][metric]["base"]
    text = (report / "latest" / "report.md").read_text()
    assert f"answers: {n} taken from the store, {n} made anew" in text
