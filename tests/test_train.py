"""Training jobs in-process: learning on the sample task, resuming, checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from orpolab.core.errors import OrpolabError
from orpolab.train.job import run

from .helpers import RANDOM_TINY, compose, run_train, runs

FAST = ["experiment=demo", RANDOM_TINY, "trainer.enable_progress_bar=false"]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def only_run(uri: str):
    found = runs(uri)
    assert len(found) == 1, found
    return found[0]


def test_fit_improves_held_out_preference_and_bits_per_byte(tiny_models, tracking_uri, tmp_path):
    cfg = compose(FAST + ["trainer.max_steps=60", "trainer.val_check_interval=30"], tmp_path / "job")
    best = run(cfg)
    r = only_run(tracking_uri)
    assert r.info.status == "FINISHED"
    bpb = history(tracking_uri, r.info.run_id, "val/chosen_bpb")
    acc = history(tracking_uri, r.info.run_id, "val/pref_accuracy")
    assert [s for s, _ in bpb] == [0, 29, 59]
    (_, bpb0), (_, bpb_end) = bpb[0], bpb[-1]
    (_, acc0), (_, acc_end) = acc[0], acc[-1]
    assert bpb_end < 0.75 * bpb0, bpb
    assert acc_end >= acc0 + 0.2, acc
    # The job's return value is its best selection value, also logged and written to result.json.
    assert best == pytest.approx(min(v for s, v in bpb if s > 0), rel=1e-6)
    assert r.data.metrics["best/val/chosen_bpb"] == pytest.approx(best, rel=1e-6)
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    # Relative to the job's folder, so a sweep folder can move.
    assert result["best_value"] == pytest.approx(best) and (tmp_path / "job" / result["best_checkpoint"]).is_file()
    # Every ORPO metric TRL logs is recorded per step.
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert len(history(tracking_uri, r.info.run_id, f"train/{key}")) >= 10, key
    # Reproducibility: seed, versions, commit and data hash.
    assert r.data.params["seed"] == "42" and r.data.params["orpo.beta"] == "0.1"
    for tag in ("versions.torch", "versions.transformers", "orpolab.git_commit", "orpolab.data_hash"):
        assert r.data.tags.get(tag), tag


def test_checkpoint_holds_adapter_and_optimizer_not_base_weights(tiny_models, tracking_uri, tmp_path):
    run(compose(FAST + ["trainer.max_steps=10", "trainer.val_check_interval=10"], tmp_path / "job"))
    ckpt = torch.load(tmp_path / "job" / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert ckpt["optimizer_states"][0]["state"], "optimizer state is saved for resuming"
    assert ckpt["global_step"] == 10


def test_resume_from_last_checkpoint_continues(tiny_models, tracking_uri, tmp_path):
    common = FAST + ["trainer.val_check_interval=10", "eval_before_training=true"]
    run(compose(common + ["trainer.max_steps=20"], tmp_path / "job"))
    first = runs(tracking_uri)[0]
    val0 = history(tracking_uri, first.info.run_id, "val/loss")[0][1]
    run(compose(common + ["trainer.max_steps=30", "resume_from=last"], tmp_path / "job"))
    second = [r for r in runs(tracking_uri) if r.info.run_id != first.info.run_id][0]
    steps = [s for s, _ in history(tracking_uri, second.info.run_id, "train/loss")]
    assert min(steps) >= 20 and max(steps) == 29, steps  # step counter continues, no step-0 restart
    # The restored adapter starts where the first run stopped, far below the untrained loss.
    first_losses = [v for _, v in history(tracking_uri, second.info.run_id, "train/loss")]
    assert first_losses[0] < val0 - 0.5
    assert json.loads((tmp_path / "job" / "result.json").read_text())["global_step"] == 30


def test_resume_without_checkpoint_is_a_clear_error(tiny_models, tracking_uri, tmp_path):
    with pytest.raises(OrpolabError, match="cannot resume: checkpoint .*last.ckpt does not exist"):
        run(compose(FAST + ["resume_from=last"], tmp_path / "job"))


def test_bad_input_is_a_clear_error_and_a_failed_run(tiny_models, tracking_uri, tmp_path):
    """Input that only the job can find wrong (settings are checked before: tests/test_config.py)."""
    message = "data path /nonexistent/train.jsonl does not exist"
    with pytest.raises(OrpolabError, match=message):
        run(compose(FAST + ["data.path=/nonexistent/train.jsonl"], tmp_path / "job"))
    r = only_run(tracking_uri)
    assert r.info.status == "FAILED" and message in r.data.tags["orpolab.error"]


@pytest.mark.subprocess  # the job asks git for the commit before it loads the model
def test_gated_model_without_token_says_how_to_log_in(tracking_uri, tmp_path, monkeypatch):
    import transformers

    def gated(*args, **kwargs):
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
                      "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct.\n401 Client Error.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(OrpolabError, match=r"gated model.*hf auth login"):
        run(compose(["model=llama1b", "data=sample"], tmp_path / "job"))


@pytest.mark.subprocess
def test_single_run_error_is_one_sentence_not_a_traceback(tiny_models, tracking_uri):
    proc = run_train(FAST + ["orpo.beta=0"])
    assert proc.returncode == 1
    assert "error: orpo.beta must be positive, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_qlora_loads_4bit_base_and_trains_only_the_adapter(tiny_models, tracking_uri, tmp_path):
    import bitsandbytes as bnb

    cfg = compose(FAST + ["lora=qlora", "trainer.max_steps=4", "trainer.val_check_interval=4"], tmp_path / "job")
    assert run(cfg) is not None
    from orpolab.core.defaults import default_settings
    from orpolab.train.model import apply_lora, load_model

    model_cfg = default_settings("model", "model=tiny_llama", name_or_path=str(tiny_models / "tiny_llama"),
                                 lora_target_modules=["q_proj", "v_proj"])
    lora = default_settings("lora", r=4, alpha=8, load_in_4bit=True)
    model = apply_lora(load_model(model_cfg, lora), model_cfg, lora)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_supervised_warm_up_learns_the_task_and_saves_a_loadable_model(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpolab.demo.warmup import collate, is_warm, sft_examples, warm_up

    src = tiny_models / "tiny_llama"
    data = Path(__file__).resolve().parents[1] / "data" / "sample" / "sft.jsonl"
    out = warm_up(src, tmp_path / "tiny_llama_sft", data, steps=40, lr=2e-3)
    assert is_warm(out, src)
    tok = AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in data.read_text().splitlines()[:32]]
    batch = collate(tok.pad_token_id)(sft_examples(tok, rows))
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(src)(**batch).loss.item()
        after = AutoModelForCausalLM.from_pretrained(out)(**batch).loss.item()
    assert after < 0.6 * before, (before, after)
    assert (out / "tokenizer.model").is_file() and tok.chat_template


def test_best_val_metrics_describe_the_best_checkpoint_also_after_resuming(tiny_models, tracking_uri, tmp_path):
    # selection.mode=max on a metric that training lowers: the best checkpoint is the first one, not the last.
    common = FAST + ["selection.mode=max", "trainer.val_check_interval=2", "data.max_eval_rows=10",
                     "eval_before_training=false", "threads=1"]
    run(compose(common + ["trainer.max_steps=4"], tmp_path / "job"))
    r = only_run(tracking_uri)
    bpb = dict(history(tracking_uri, r.info.run_id, "val/chosen_bpb"))
    assert len(bpb) == 2 and bpb[1] > bpb[3], bpb  # evaluations after steps 2 and 4, logged at steps 1 and 3
    best = {k: v for k, v in r.data.metrics.items() if k.startswith("best/val/")}
    assert {"best/val/chosen_bpb", "best/val/pref_accuracy", "best/val/loss", "best/val/nll_loss"} <= set(best)
    # Every best/val/* is the value of the evaluation after step 2 (the best checkpoint's), logged with it ...
    assert r.data.metrics["best/step"] == 2
    assert json.loads((tmp_path / "job" / "result.json").read_text())["best_checkpoint"].endswith("best-step2.ckpt")
    for key, value in best.items():
        values = dict(history(tracking_uri, r.info.run_id, key.removeprefix("best/")))
        assert value == pytest.approx(values[1], rel=1e-6), key
        assert [s for s, _ in history(tracking_uri, r.info.run_id, key)][0] == 1, key
    # ... and differs from the last evaluation's, where the two differ at all.
    assert best["best/val/chosen_bpb"] != pytest.approx(r.data.metrics["val/chosen_bpb"])
    assert best["best/val/loss"] != pytest.approx(r.data.metrics["val/loss"])

    # Resumed, the job still knows its best: the evaluation after step 6 (lower again) is no new best.
    run(compose(common + ["trainer.max_steps=6", "resume_from=last"], tmp_path / "job"))
    second = next(x for x in runs(tracking_uri) if x.info.run_id != r.info.run_id)
    assert dict(history(tracking_uri, second.info.run_id, "val/chosen_bpb"))[5] < bpb[1]
    assert history(tracking_uri, second.info.run_id, "best/step") == []
    assert second.data.metrics["best/val/chosen_bpb"] == pytest.approx(bpb[1], rel=1e-6)  # job.py's, at the end
