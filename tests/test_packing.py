"""Packed rows with shared prompts give the plain layout's log-probs, losses and LoRA gradients (float64)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from orpolab.core.config import MethodConfig
from orpolab.core.defaults import default_settings
from orpolab.demo.tiny import TinyShape, model_config
from orpolab.train.data import PackedPairCollator, PairCollator
from orpolab.train.data.packing import first_fit
from orpolab.train.logps import block_attention_mask, packing_blocker
from orpolab.train.losses import method_loss
from orpolab.train.module import PreferenceModule

from .batch_record import RecordBatches, recorded

PAD = 0


def test_layout_positions_and_mask_by_hand():
    # Pair 0: prompt [5, 6], chosen [7], rejected [8, 9]; pair 1: prompt [3], chosen [4], rejected [2].
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9], "chosen_bytes": 1, "rejected_bytes": 2},
             {"prompt_ids": [3], "chosen_ids": [4], "rejected_ids": [2], "chosen_bytes": 3, "rejected_bytes": 4}]
    b = PackedPairCollator(PAD, max_length=9)(pairs)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 1]]  # each answer restarts after its prompt
    mask = block_attention_mask(b["pair_of"], b["part"], None)[0, 0].int().tolist()
    assert mask == [
        # 5  6  7  8  9  3  4  2
        [1, 0, 0, 0, 0, 0, 0, 0],  # 5
        [1, 1, 0, 0, 0, 0, 0, 0],  # 6
        [1, 1, 1, 0, 0, 0, 0, 0],  # 7 (chosen): its prompt and itself
        [1, 1, 0, 1, 0, 0, 0, 0],  # 8 (rejected): its prompt, not the chosen answer
        [1, 1, 0, 1, 1, 0, 0, 0],  # 9
        [0, 0, 0, 0, 0, 1, 0, 0],  # 3: nothing of the first pair
        [0, 0, 0, 0, 0, 1, 1, 0],  # 4
        [0, 0, 0, 0, 0, 1, 0, 1],  # 2
    ]
    additive = block_attention_mask(b["pair_of"], b["part"], torch.float32)[0, 0]
    assert torch.equal(additive == 0, torch.tensor(mask, dtype=torch.bool))
    assert (additive[additive != 0] == torch.finfo(torch.float32).min).all()
    # Predictions (hidden position -> target, sequence): both answers' first tokens from the prompt's end.
    preds = list(zip(b["pred_pos"].tolist(), b["pred_target"].tolist(), b["pred_seq"].tolist(),
                     b["pred_prompt"].tolist(), strict=True))
    assert preds == [(0, 6, 0, True), (1, 7, 0, False), (1, 8, 2, False), (3, 9, 2, False),
                     (5, 4, 1, False), (5, 2, 3, False)]
    assert b["sequence_tokens"].tolist() == [3, 2, 4, 2] and b["answer_bytes"].tolist() == [1, 3, 2, 4]
    # Rows of 5 tokens: one pair each, the shorter row padded; padding sees earlier padding only.
    two = PackedPairCollator(PAD, max_length=5)(pairs)
    assert two["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 2, PAD, PAD]]
    assert two["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert block_attention_mask(two["pair_of"], two["part"], None)[1, 0, 3:].int().tolist() == [[0, 0, 0, 1, 0],
                                                                                               [0, 0, 0, 1, 1]]


def test_first_fit_fills_rows_longest_first():
    rows = first_fit([12, 17, 13, 23, 12], capacity=30)
    assert rows == [[3], [1, 2], [0, 4]]
    assert first_fit([40, 5], capacity=30) == [[0], [1]]  # a pair longer than a row gets its own


class _Vocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, PAD

    def __len__(self) -> int:
        return 97


def _tiny_lora_model(family: str, attn: str):
    """The family's architecture and rope settings (orpolab.demo.tiny), toy width, float64, a live LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = model_config(family, _Vocab(), TinyShape(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                      num_key_value_heads=2))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "v_proj", "o_proj", "qkv_proj", "down_proj"]))
    model.to(torch.float64)
    for module in model.modules():  # transformers' RMSNorm computes in float32 even for float64 weights
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _float64_rms_norm(module)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 would make the adapter a no-op (and DPO's reference the same model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def _float64_rms_norm(module):
    """The same RMSNorm in the input's precision, so that the whole model runs in float64 and the two
    layouts can be compared at float64 rounding (float32 steps would round their 1e-16 differences
    in summation order to 1e-8 and hide a real discrepancy of that size)."""
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden * torch.rsqrt(variance + module.variance_epsilon))
    return forward


def _pairs() -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    lengths = [(3, 4, 5), (9, 2, 6), (5, 7, 1), (12, 3, 8), (4, 6, 2)]  # prompt, chosen, rejected
    ids = lambda k: torch.randint(3, 97, (k,), generator=gen).tolist()  # noqa: E731
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "chosen_bytes": 3 * c,
             "rejected_bytes": 3 * r} for p, c, r in lengths]


def _run(model, method: MethodConfig, batch: dict, chunk: int):
    model.zero_grad()
    module = PreferenceModule(model, method, default_settings("optim"), logps_chunk_size=chunk)
    out = module._forward(batch)
    ref = module.reference_logps(batch) if method.name == "dpo" else None
    loss, _ = method_loss(method, out, ref)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, ref, grads


@pytest.mark.parametrize("family,attn,method,chunk", [
    ("llama", "sdpa", "orpo", 7), ("llama", "sdpa", "dpo", 7), ("llama", "eager", "orpo", 0),
    ("phi", "sdpa", "orpo", 7), ("phi", "eager", "dpo", 7),
    ("mistral", "sdpa", "orpo", 7), ("mistral", "sdpa", "dpo", 0),
])
def test_packed_rows_equal_the_plain_layout(family, attn, method, chunk):
    model = _tiny_lora_model(family, attn)
    pairs = _pairs()
    packed = PackedPairCollator(PAD, max_length=30)(pairs)
    assert packed["input_ids"].shape[0] < len(pairs) and packed["pair_of"].max(1).values.ne(
        packed["pair_of"].masked_fill(packed["pair_of"] < 0, 99).min(1).values).any()  # some row holds two pairs
    plain = PairCollator(PAD)(pairs)
    assert packing_blocker(model, 30) is None
    cfg = default_settings("method", f"method={method}", nll_on="full")
    out_plain, ref_plain, g_plain = _run(model, cfg, plain, chunk)
    out_packed, ref_packed, g_packed = _run(model, cfg, packed, chunk)
    for key in out_plain:
        torch.testing.assert_close(out_packed[key], out_plain[key], rtol=1e-6, atol=1e-10, msg=key)
    if ref_plain is not None:  # DPO's reference (adapter disabled) through the same packed path
        torch.testing.assert_close(ref_packed, ref_plain, rtol=1e-6, atol=1e-10)
    # Every method's loss and TRL's metrics from the same per-sequence numbers.
    for name in ("orpo", "dpo", "simpo", "sft"):
        m = default_settings("method", f"method={name}", nll_on="full")
        ref = torch.zeros(2 * len(pairs), dtype=torch.float64) if name == "dpo" else None
        loss_a, metrics_a = method_loss(m, out_plain, ref)
        loss_b, metrics_b = method_loss(m, out_packed, ref)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-10)
        for key in metrics_a:
            torch.testing.assert_close(metrics_b[key], metrics_a[key], rtol=1e-6, atol=1e-10, msg=f"{name} {key}")
    assert g_plain.keys() == g_packed.keys() and g_plain and all("lora_" in k for k in g_plain)
    # SDPA runs in float64 throughout: float64 rounding. transformers' eager attention takes its softmax in
    # float32, whose rounding depends on where a score sits in its row: 1e-6 of each gradient's scale.
    scale = 1e-6 if attn == "eager" else 1e-12
    for key in g_plain:
        torch.testing.assert_close(g_packed[key], g_plain[key], rtol=1e-6, atol=scale * g_plain[key].abs().max().item(),
                                   msg=key)


def test_packing_falls_back_where_the_mask_would_not_be_exact():
    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config), get_decoder=lambda: None)

    assert packing_blocker(model(_attn_implementation="sdpa", sliding_window=None), 1024) is None
    assert packing_blocker(model(_attn_implementation="eager", sliding_window=4096), 1024) is None
    assert "flash_attention_2" in packing_blocker(model(_attn_implementation="flash_attention_2"), 1024)
    assert "sliding attention window (512 tokens)" in packing_blocker(
        model(_attn_implementation="sdpa", sliding_window=512), 1024)
    # Qwen2-style configs carry a window that is switched off.
    assert packing_blocker(model(_attn_implementation="sdpa", sliding_window=512, use_sliding_window=False),
                           1024) is None


class RecordLayout(RecordBatches):
    """:class:`tests.batch_record.RecordBatches`, and whether each batch came packed."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        with open(self.folder / "packed.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "packed": "pair_of" in batch,
                                 "rows": batch["input_ids"].shape[0]}) + "\n")


def test_job_resumed_mid_epoch_with_packing_sees_the_same_pairs(tiny_models, tracking_uri, tmp_path):
    """40 pairs in batches of 8 (5 steps an epoch), packed by default: a job resumed from its step-3
    checkpoint trains on the pairs, and to the losses, of the uninterrupted one, across the epoch's end."""
    from mlflow.tracking import MlflowClient

    from orpolab.train.job import run

    from .helpers import RANDOM_TINY, compose

    def job(name: str, *extra: str) -> dict[int, float]:
        run(compose(["experiment=demo", RANDOM_TINY, "trainer.enable_progress_bar=false", "data.max_train_rows=40",
                     "data.max_eval_rows=8", "trainer.max_steps=8", "trainer.val_check_interval=8",
                     "trainer.log_every_n_steps=1", "eval_before_training=false", "threads=1",
                     "+callbacks.record._target_=tests.test_packing.RecordLayout",
                     f"+callbacks.record.folder={tmp_path / name / 'batches'}", *extra], tmp_path / name))
        r = next(r for r in MlflowClient(tracking_uri).search_runs(["1"])
                 if r.data.tags["orpolab.output_dir"] == str((tmp_path / name).resolve()))
        return {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(r.info.run_id, "train/loss")}

    reference = job("reference", "+callbacks.every_3._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                    "+callbacks.every_3.every_n_train_steps=3", "+callbacks.every_3.save_top_k=-1",
                    "+callbacks.every_3.filename='mid-{step}'")
    mid = tmp_path / "reference" / "checkpoints" / "mid-step=3.ckpt"
    resumed = job("resumed", f"resume_from='{mid}'")
    before, after = recorded(tmp_path / "reference" / "batches", 0), recorded(tmp_path / "resumed" / "batches", 0)
    assert sorted(after) == list(range(3, 8)) and all(after[s] == before[s] for s in after)
    assert sorted(i for s in range(5) for i in before[s]) == list(range(40))  # an epoch: every pair once
    lines = (tmp_path / "resumed" / "batches" / "packed.jsonl").read_text().splitlines()
    layout = [json.loads(line) for line in lines]
    assert all(x["packed"] and x["rows"] < 16 for x in layout)  # packed rows, fewer than one per sequence
    assert sorted(resumed) == list(range(3, 8))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_bf16_autocast_on_cpu_keeps_log_probs_and_losses_in_float32():
    """``trainer.precision=bf16-mixed`` on a CPU: the model runs in bf16, log-probs and the loss stay float32."""
    model = _tiny_lora_model("llama", "sdpa").float()
    packed = PackedPairCollator(PAD, max_length=30)(_pairs())
    module = PreferenceModule(model, default_settings("method", "method=orpo", nll_on="full"),
                              default_settings("optim"), logps_chunk_size=7)
    full = module._loss(packed, "train")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module._forward(packed)
        loss = module._loss(packed, "train")[0]
    assert out["sum_logps"].dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert loss.item() == pytest.approx(full.item(), rel=2e-2)  # bf16's 8 mantissa bits, not a broken path
    assert loss.item() != full.item()  # and bf16 really ran
