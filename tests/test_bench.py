"""The benchmark scripts run end to end on tiny settings and write well-formed sections (speed is not tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.subprocess


def bench(script: str, out, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--preset", "tiny", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def section(text: str, name: str) -> str:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, name
    return text[text.index(start): text.index(end)]


def table_rows(body: str) -> list[list[str]]:
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def test_training_benchmark_compares_with_trl_on_identical_batches(tiny_models, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept as it is\n")
    bench("train_vs_trl.py", out)
    text = out.read_text()
    assert "kept as it is" in text  # only its own section is replaced
    body = section(text, "train-tiny")
    rows = table_rows(body)
    throughput = rows[1:4]  # the first table; the loss step's memory follows
    assert [r[0] for r in throughput] == ["orpolab, one row per sequence", "orpolab, packed with shared prompts",
                                          "TRL ORPOTrainer"] and len(rows[0]) == 5
    for r in throughput:
        assert float(r[1].split()[0]) > 0 and 0 <= float(r[2].split()[0]) < 1 and float(r[3].split()[0]) > 0
    raw = json.loads((tmp_path / "results" / "train-tiny.json").read_text())
    # Configured alike, the two implementations give the same ORPO loss on the same batches.
    assert raw["losses"]["max_abs_diff"] < 1e-4 and len(raw["losses"]["batches"]) == 3  # both layouts
    assert raw["ratios"]["packed"]["median"] > 0 and "packed with shared prompts / TRL" in body
    # The loss step's memory: the chunked output layer keeps far less than the earlier chunks.
    memory = raw["loss_memory"][0]
    assert memory["sequences"] == 8 and memory["chunked, nothing kept"] < memory["chunks kept"] / 4
    # Writing the section again (what a re-run ends with) replaces it instead of appending another.
    sys.path.insert(0, str(ROOT / "bench"))
    from common import write_section

    write_section("train-tiny", "re-run", out)
    text = out.read_text()
    assert text.count("<!-- bench:train-tiny -->") == 1 and "re-run" in text and "kept as it is" in text
    assert "packed with shared prompts / TRL" not in text


@pytest.mark.parametrize("script,name,first_col", [
    ("cpu_inference.py", "inference-tiny", ["llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_K_M",
                                            "transformers float32", "transformers bfloat16"]),
    ("judge_throughput.py", "judge-batched-tiny", ["1", "2", "4", "4"]),
    ("answer_throughput.py", "answers-batched-tiny", ["1", "2", "4", "8", "8"]),
])
def test_inference_and_judge_benchmarks_write_their_tables(tiny_models, tmp_path, script, name, first_col):
    out = tmp_path / "BENCHMARKS.md"
    bench(script, out)
    body = section(out.read_text(), name)
    rows = table_rows(body)
    assert [r[0] for r in rows[1:]] == first_col
    for r in rows[1:]:
        assert all(cell not in ("", "nan", "inf") for cell in r)
    assert json.loads((tmp_path / "results" / f"{name}.json").read_text())
