"""End to end on a real pretrained model offline: SmolLM2-135M-Instruct trains a few steps, exports with
llama.cpp's BPE token ids identical to transformers', and is evaluated against its base, judged by the
SmolLM2 stand-in (which the report says judges its own family)."""

from __future__ import annotations

import json

import pytest

from .helpers import evaluation_dir, new_store, run_train

pytestmark = pytest.mark.subprocess


def test_smollm2_trains_exports_with_identical_bpe_ids_and_is_evaluated(smollm2, empty_store, tmp_path):
    uri = new_store(empty_store, tmp_path)
    proc = run_train(["-m", "experiment=demo_real", "orpo.beta=0.1", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "data.batch_size=2", "data.max_eval_rows=4",
                      "eval_before_training=false", "trainer.enable_progress_bar=false",
                      "export.verify.num_texts=8", "eval_prompts.max_prompts=3",
                      "evaluation.generation.max_tokens=12", "evaluation.judge.calibration_size=2",
                      "evaluation.judge.max_tokens=24", "evaluation.judge.max_feedback_chars=24",
                      f"evaluation.judge.calibration_cache={tmp_path / 'calibration'}",
                      f"evaluation.store_dir={tmp_path / 'store'}",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.report_dir={tmp_path / 'report'}"],
                     env_extra={"MLFLOW_TRACKING_URI": uri}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    sweep = tmp_path / "sweep"
    export = json.loads((sweep / "export" / "export.json").read_text())
    assert export["passed"]
    # Byte-level BPE with split digits: llama.cpp's token ids equal transformers' on every verification
    # text, at F16 and Q4_K_M (the validation conversations are full of numbers).
    checks = {c["quant"]: c for c in export["verification"]}
    assert set(checks) == {"F16", "Q4_K_M"}
    assert all(c["token_id_mismatches"] == 0 and c["texts"] == 8 for c in checks.values())
    assert checks["F16"]["ppl_ratio"] < 1.02 and checks["F16"]["top1_agreement"] > 0.97
    results = json.loads((evaluation_dir(sweep) / "results.json").read_text())
    assert results["models_order"] == ["base", "winner", "winner@F16"]
    assert all(results["models"][m]["answered"] == 3 for m in results["models_order"])
    assert results["self_preference"]["same"] and "SmolLM2" in results["judge"]
    cal = results["calibration"]["metrics"]["RESPONSE_CORRECTNESS_5POINT"]
    assert (cal["counts"]["pairs"], cal["counts"]["checkable"], cal["counts"]["verdicts"]) == (2, 2, 8)
    report = (tmp_path / "report" / "latest" / "report.md").read_text()
    assert "Self-preference warning" in report and "## What quantization costs" in report
