"""The log-prob path that skips unused positions equals full-vocabulary logits, values and gradients."""

from __future__ import annotations

import pytest
import torch

from orpolab.core.defaults import default_settings
from orpolab.train.data import PairCollator
from orpolab.train.logps import backbone_and_head
from orpolab.train.losses import selected_token_logps
from orpolab.train.module import PreferenceModule

from .helpers import tiny_dpo_module


def _reference_logps(hidden, weight, bias, targets):
    """The plain path, written out: full float64 logits, log-softmax, the targets' entries."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1), logits


@pytest.mark.parametrize("layer", ["frozen", "trained", "tied"])
def test_chunked_output_layer_matches_log_softmax_in_float64(layer):
    """Values and gradients of every input within 1e-6 of a plain float64 ``log_softmax``.

    frozen: the LoRA case (gradient computed in the forward pass); trained: weight and bias learn
    (logits recomputed in the backward pass); tied: the output layer is the input embedding, used twice.
    """
    gen = torch.Generator().manual_seed(0)
    vocab, width, n = 300, 16, 37
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64, requires_grad=layer != "frozen")
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=layer == "trained") \
        if layer != "tied" else None
    ids = torch.randint(0, vocab, (n,), generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    mix = torch.randn(width, width, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)  # an arbitrary loss's gradient

    def run(fn):
        base = weight[ids] if layer == "tied" else torch.randn(n, width, generator=torch.Generator().manual_seed(1),
                                                               dtype=torch.float64)
        hidden = torch.tanh(base @ mix)
        logps, mean_logits = fn(hidden)
        leaves = [t for t in (mix, weight, bias) if t is not None and t.requires_grad]
        return logps, mean_logits, torch.autograd.grad((logps * upstream).sum(), leaves)

    fast = run(lambda h: selected_token_logps(h, weight, targets, bias, chunk_size=8))  # 5 chunks
    ref = run(lambda h: (lambda lp, lg: (lp, lg.mean(-1)))(*_reference_logps(h, weight, bias, targets)))
    assert fast[0].dtype == torch.float64
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(fast[1], ref[1].detach(), rtol=1e-6, atol=1e-12)
    assert len(fast[2]) == {"frozen": 1, "trained": 3, "tied": 2}[layer]
    for g, g_ref in zip(fast[2], ref[2], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-12)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass, other than the inputs themselves (held anyway)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = fn()
    return sum(b for ptr, b in saved.items() if ptr not in {t.untyped_storage().data_ptr() for t in inputs})


@pytest.mark.parametrize("trained", [False, True])
def test_chunked_output_layer_keeps_no_logits_for_backward(trained):
    """At a 32k vocabulary the plain path keeps every position's logits; the chunked one under one chunk's."""
    gen = torch.Generator().manual_seed(0)
    vocab, width, n, chunk = 32768, 8, 64, 8
    hidden = torch.randn(n, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=trained)
    targets = torch.randint(0, vocab, (n,), generator=gen)

    def chunked():
        selected_token_logps(hidden, weight, targets, None, chunk_size=chunk)[0].sum().backward()
        return hidden, weight

    def plain():
        _reference_logps(hidden, weight, None, targets)[0].sum().backward()
        return hidden, weight

    one_chunk = chunk * vocab * 4
    assert _saved_bytes(plain) >= n * vocab * 4  # all logits (and their log-softmax)
    assert _saved_bytes(chunked) < one_chunk / 8  # a few numbers per position: hidden-sized rows, log-sum-exps


@pytest.mark.parametrize("method,nll_on", [("orpo", "full"), ("orpo", "completion"), ("dpo", "full")])
def test_module_forward_equals_the_full_logits_path(tiny_models, method, nll_on):
    module, _, data, _, tokenizer = tiny_dpo_module(seed=2)
    batch = PairCollator(tokenizer.pad_token_id)(data.train[:6])
    outs, grads = [], []
    for chunk in (0, 7):  # 0: the model's own full logits (TRL's way); 7: selected positions, in chunks
        m = PreferenceModule(module.model, default_settings("method", f"method={method}", nll_on=nll_on),
                             default_settings("optim"),
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
