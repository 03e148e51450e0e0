"""The method group: config composition, DPO's adapter-disabled reference and its cache, each method training."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from orpolab.core.defaults import default_settings
from orpolab.train.data import PairCollator, PreferenceDataModule
from orpolab.train.job import run
from orpolab.train.module import PreferenceModule

from .helpers import EVAL_SMALL, RANDOM_TINY, compose, evaluation_dir, new_store, run_train, runs, tiny_dpo_module

FAST = ["experiment=demo", RANDOM_TINY, "trainer.enable_progress_bar=false"]


def test_method_group_sets_each_methods_defaults(tmp_path):
    cfg = compose(["orpo.beta=0.2"], tmp_path)
    assert cfg.method.name == "orpo" and cfg.method.beta == 0.2 and cfg.optim.lr == 8e-5  # orpo.* still rules ORPO
    dpo = compose(["method=dpo"], tmp_path)
    assert dpo.method.name == "dpo" and dpo.method.beta == 0.1 and dpo.optim.lr == 5e-6  # far below SFT's
    assert compose(["method=dpo", "optim.lr=2e-5"], tmp_path).optim.lr == 2e-5  # the command line wins
    simpo = compose(["method=simpo"], tmp_path)
    assert (simpo.method.beta, simpo.method.gamma) == (2.0, 1.0)
    assert compose(["method=sft"], tmp_path).method.name == "sft"


def _independent_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs, written out in float64 from the raw logits (not through orpolab.losses)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def test_dpo_reference_is_the_base_model_exactly(tiny_models):
    from transformers import AutoModelForCausalLM

    module, model_cfg, data, _, tokenizer = tiny_dpo_module()
    batch = PairCollator(tokenizer.pad_token_id)(data.train[:4])
    ref = module.reference_logps(batch)
    base = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch.float32).eval()
    with torch.no_grad():
        sft = PreferenceModule(base, default_settings("method", "method=sft"), default_settings("optim"))
        base_sum = sft._forward(batch)["sum_logps"]
        adapted = module._forward(batch)["sum_logps"]
    # Bit for bit: the disabled adapter runs exactly the base layers.
    assert torch.equal(ref, base_sum)
    # And the same numbers as an independent float64 computation, within float32 rounding.
    torch.testing.assert_close(ref.double(), _independent_logps(base, batch), rtol=1e-5, atol=1e-4)
    assert (adapted - ref).abs().max() > 1.0  # the adapter is live, and disabled for the reference only
    assert module.model.training  # switched back to training mode afterwards


def test_cached_reference_equals_freshly_computed(tiny_models):
    module, _, data, data_cfg, tokenizer = tiny_dpo_module(seed=1)
    dm = PreferenceDataModule(data, data_cfg, tokenizer.pad_token_id, seed=3)
    cache = module.compute_reference_cache(dm.reference_dataloader("train"))
    assert cache.shape == (len(data.train), 2) and torch.isfinite(cache).all()
    # Fresh, in the shuffled training batches (other companions, other padding lengths).
    for batch in dm.train_dataloader():
        fresh = module.reference_logps(batch)
        n = fresh.shape[0] // 2
        idx = batch["index"]
        # Equal up to float32 rounding (a few ulps of sums in the hundreds): padding changes summation order.
        torch.testing.assert_close(cache[idx, 0], fresh[:n], rtol=1e-6, atol=0)
        torch.testing.assert_close(cache[idx, 1], fresh[n:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method,metrics", [
    ("dpo", ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")),
    ("simpo", ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected")),
    ("sft", ("nll_loss", "logps/chosen", "logps/rejected")),
])
def test_each_method_trains_and_logs_its_metrics(tiny_models, tracking_uri, tmp_path, method, metrics):
    best = run(compose(FAST + [f"method={method}", "optim.lr=2e-3", "trainer.max_steps=12",
                               "trainer.val_check_interval=6"], tmp_path / "job"))
    r = runs(tracking_uri)[0]
    assert r.info.status == "FINISHED" and math.isfinite(best)
    assert r.data.tags["orpolab.method"] == method and r.data.params["method.name"] == method
    c = MlflowClient(tracking_uri)
    for key in metrics:
        values = [m.value for m in c.get_metric_history(r.info.run_id, f"train/{key}")]
        assert values and all(math.isfinite(v) for v in values), key
    if method == "sft":
        bpb = [m.value for m in c.get_metric_history(r.info.run_id, "val/chosen_bpb")]
        assert bpb[-1] < 0.9 * bpb[0], bpb  # exactly what SFT minimises
    else:
        # Preference methods widen the held-out reward margin (DPO may lower the chosen likelihood
        # while doing so, a known trait of DPO, so bits per byte is not asserted for them).
        margins = [m.value for m in c.get_metric_history(r.info.run_id, "val/rewards/margins")]
        assert margins[-1] > margins[0] + 0.01, margins
    if method == "dpo":
        # Before the first step the policy is the reference (LoRA's B is zero): DPO's loss is exactly ln 2.
        val = c.get_metric_history(r.info.run_id, "val/loss")
        assert val[0].step == 0 and val[0].value == pytest.approx(math.log(2), abs=1e-6)


METHOD_PROMPTS = 3


@pytest.fixture(scope="module")
def method_sweep(warm_llama, empty_store, tmp_path_factory):
    """ORPO, DPO, SimPO and SFT in one sweep from the warmed-up tiny_llama, exported and evaluated by its hook."""
    tmp = tmp_path_factory.mktemp("methods")
    uri = new_store(empty_store, tmp)
    # What this sweep shows is one winner per method carried through export, evaluation and report, not how
    # well each learns (the tests above train each method; the demo sweep's tests check verification and
    # calibration): a few steps validated on 10 held-out pairs, 8 verification texts, METHOD_PROMPTS prompts,
    # no calibration.
    changed = {"eval_prompts.max_prompts": str(METHOD_PROMPTS), "evaluation.judge.calibration_size": "0"}
    small = [o for o in EVAL_SMALL if o.split("=")[0] not in changed] + [f"{k}={v}" for k, v in changed.items()]
    proc = run_train(["-m", "experiment=demo", "method=orpo,dpo,simpo,sft", "trainer.max_steps=10",
                      "trainer.val_check_interval=5", "eval_before_training=false", "data.max_eval_rows=10",
                      "trainer.enable_progress_bar=false",
                      "export.verify.num_texts=8", f"evaluation.judge.calibration_cache={tmp / 'calibration'}",
                      f"evaluation.store_dir={tmp / 'store'}",
                      f"hydra.sweep.dir={tmp / 'sweep'}", f"paths.report_dir={tmp / 'report'}", *small],
                     env_extra={"MLFLOW_TRACKING_URI": uri}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return {"dir": tmp / "sweep", "uri": uri, "stdout": proc.stdout,
            "report": (tmp / "report" / "latest" / "report.md").resolve()}


def test_mixed_method_sweep_exports_each_methods_best_and_reports_them_against_base(method_sweep):
    import json

    from orpolab.core import llama_runtime

    sweep_dir = method_sweep["dir"]
    export = json.loads((sweep_dir / "export" / "export.json").read_text())
    methods = ["orpo", "dpo", "simpo", "sft"]
    assert export["passed"] and list(export["winners"]) == methods
    assert len({w["run_id"] for w in export["winners"].values()}) == 4
    for label in methods:
        w = export["winners"][label]
        assert w["method"] == label and w["metric"] == "val/chosen_bpb"
        gguf = sweep_dir / "export" / "gguf" / f"{label}-Q4_K_M.gguf"
        assert gguf.is_file() and f"orpolab {label} winner" in llama_runtime.gguf_metadata(gguf)["general.name"]
    assert {c["model"] for c in export["verification"]} == set(methods)
    assert (sweep_dir / "export" / "gguf" / "base-Q4_K_M.gguf").is_file()

    # Every model answered and was judged; each trained model is compared with the base.
    out = evaluation_dir(sweep_dir)
    results = json.loads((out / "results.json").read_text())
    assert results["models_order"] == ["base", *methods]
    for label in ["base", *methods]:
        assert len((out / f"answers-{label}.jsonl").read_text().splitlines()) == METHOD_PROMPTS
        assert results["models"][label]["checks"]["exact"]["n"] == METHOD_PROMPTS
    verdicts = (out / "verdicts-RESPONSE_CORRECTNESS_5POINT.jsonl").read_text().splitlines()
    assert len(verdicts) == 5 * METHOD_PROMPTS
    assert set(results["metrics"]["RESPONSE_CORRECTNESS_5POINT"]["paired"]) == set(methods)
    assert set(results["checks_paired"]["exact"]) == set(methods)

    text = method_sweep["report"].read_text()
    assert "## Method comparison" in text and str(sweep_dir.name) in text
    for label in methods:
        assert f"| {label} | {label} |" in text  # its row in the method comparison
    assert "| prompt | base | orpo | dpo | simpo | sft | best |" in text
