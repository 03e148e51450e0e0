"""The log-prob path that skips unused positions equals full-vocabulary logits, values and gradients."""

from __future__ import annotations

import pytest
import torch

from orpolab.core.config import MethodConfig, OptimConfig
from orpolab.train.data import PairCollator
from orpolab.train.logps import backbone_and_head
from orpolab.train.losses import selected_token_logps
from orpolab.train.module import PreferenceModule

from .helpers import tiny_dpo_module


def test_selected_token_logps_matches_float64_log_softmax():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight, bias = torch.randn(300, 16, generator=gen), torch.randn(300, generator=gen)
    targets = torch.randint(0, 300, (37,), generator=gen)
    logps, mean_logits = selected_token_logps(hidden, weight, targets, bias, chunk_size=8)  # 5 chunks
    ref_logits = hidden.double() @ weight.double().T + bias.double()
    ref = torch.log_softmax(ref_logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_logits.double(), ref_logits.mean(-1).detach(), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(logps.sum(), hidden)
    (g_ref,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,nll_on", [("orpo", "full"), ("orpo", "completion"), ("dpo", "full")])
def test_module_forward_equals_the_full_logits_path(tiny_models, method, nll_on):
    module, _, data, _, tokenizer = tiny_dpo_module(seed=2)
    batch = PairCollator(tokenizer.pad_token_id)(data.train[:6])
    outs, grads = [], []
    for chunk in (0, 7):  # 0: the model's own full logits (TRL's way); 7: selected positions, in chunks
        m = PreferenceModule(module.model, MethodConfig(name=method, nll_on=nll_on), OptimConfig(),
                             logps_chunk_size=chunk)
        assert (backbone_and_head(m.model, chunk) is None) == (chunk == 0)
        module.model.zero_grad()
        out = m._forward(batch)
        loss = out["chosen_nll"] + out["mean_logps"].sum() + out["sum_logps"].sum() * 0.01
        loss.backward()
        outs.append(out)
        grads.append({k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None})
    full, fast = outs
    for key in ("mean_logps", "sum_logps", "chosen_nll", "chosen_sum_nats", "logits/chosen", "logits/rejected"):
        torch.testing.assert_close(fast[key], full[key], rtol=1e-5, atol=1e-4, msg=key)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5, msg=k)
