"""ORPO loss against an independent float64 reference, TRL's formula, and finite differences."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from orpolab.train.losses import log1mexp, masked_mean, orpo_loss, token_logps


def reference_orpo(c: list[float], r: list[float], nll: float, beta: float) -> float:
    """Straight from the paper, in Python floats (float64): odds = p / (1 - p)."""
    ratios = []
    for lc, lr in zip(c, r, strict=True):
        pc, pr = math.exp(lc), math.exp(lr)
        log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        ratios.append(-math.log1p(math.exp(-log_odds)))  # log sigmoid
    return nll - beta * sum(ratios) / len(ratios)


def trl_orpo(c: torch.Tensor, r: torch.Tensor, nll: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's ORPOTrainer.odds_ratio_loss as written there (the peer we must agree with)."""

    def trl_log1mexp(x):
        return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (c - r) - (trl_log1mexp(c) - trl_log1mexp(r))
    return nll - beta * F.logsigmoid(log_odds).mean()


def test_log1mexp_matches_high_precision_on_both_branches():
    mpmath.mp.dps = 50
    x = torch.tensor([-50.0, -5.0, -1.0, -0.7, -0.69, -0.3, -1e-3, -1e-6, -1e-12], dtype=torch.float64)
    expected = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.25, 1.0])
def test_loss_matches_float64_reference(beta):
    c = [-0.2, -1.3, -0.05, -2.5]
    r = [-0.9, -0.4, -3.0, -2.4]
    loss, _ = orpo_loss(torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64),
                        torch.tensor(1.7, dtype=torch.float64), beta)
    assert loss.item() == pytest.approx(reference_orpo(c, r, 1.7, beta), rel=1e-6)


def test_hand_computed_case():
    # p_c = 0.5, p_r = 0.25: odds 1 and 1/3, log odds ratio = ln 3, ratio term = ln(3/4).
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    loss, metrics = orpo_loss(c, r, torch.tensor(2.0), beta=0.1)
    assert metrics["log_odds_chosen"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert metrics["log_odds_ratio"].item() == pytest.approx(math.log(0.75), rel=1e-6)
    assert loss.item() == pytest.approx(2.0 - 0.1 * math.log(0.75), rel=1e-6)


def test_gradients_match_finite_differences_in_float64():
    c = torch.tensor([-0.3, -1.1, -0.02], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-0.8, -0.5, -2.0], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor(1.0, dtype=torch.float64)
    orpo_loss(c, r, nll, 0.2)[0].backward()
    h = 1e-6
    for tensor, grad, name in ((c, c.grad, "c"), (r, r.grad, "r")):
        for i in range(3):
            plus, minus = tensor.detach().clone().tolist(), tensor.detach().clone().tolist()
            plus[i] += h
            minus[i] -= h
            if name == "c":
                hi, lo = reference_orpo(plus, r.tolist(), 1.0, 0.2), reference_orpo(minus, r.tolist(), 1.0, 0.2)
            else:
                hi, lo = reference_orpo(c.tolist(), plus, 1.0, 0.2), reference_orpo(c.tolist(), minus, 1.0, 0.2)
            fd = (hi - lo) / (2 * h)
            assert grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def _float32_loss_and_grads(fn, c_vals, r_vals):
    c = torch.tensor(c_vals, dtype=torch.float32, requires_grad=True)
    r = torch.tensor(r_vals, dtype=torch.float32, requires_grad=True)
    nll = torch.tensor(1.5, requires_grad=True)
    loss = fn(c, r, nll)
    loss.backward()
    return loss.detach(), c.grad, r.grad


@pytest.mark.parametrize("c_vals,r_vals", [
    ([-0.5, -1.5, -3.0], [-0.7, -1.0, -6.0]),
    ([-1e-3, -2e-5, -0.6931], [-0.01, -0.6932, -1e-4]),
    ([-30.0, -80.0, -0.1], [-25.0, -90.0, -0.2]),
])
def test_equals_trl_loss_and_gradients_where_trl_is_finite(c_vals, r_vals):
    ours = _float32_loss_and_grads(lambda c, r, n: orpo_loss(c, r, n, 0.1)[0], c_vals, r_vals)
    trl = _float32_loss_and_grads(lambda c, r, n: trl_orpo(c, r, n, 0.1), c_vals, r_vals)
    assert all(torch.isfinite(t).all() for t in trl), "case must be one where TRL is finite"
    for a, b in zip(ours, trl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("c_vals,r_vals", [
    ([0.0, -0.5], [-0.3, -0.6]),           # chosen predicted with probability exactly 1
    ([-1e-8, -5e-8], [-0.2, -1e-7]),       # within 1e-7 of zero: float32 exp rounds to 1
    ([-0.4, -0.5], [0.0, -3e-8]),          # rejected at probability 1
    ([-1e4, -5e3], [-2e4, -1e4]),          # very negative
    ([-1e-30, -0.3], [-2e-38, -0.2]),      # tiny magnitudes
    ([-1e-42, -0.3], [-0.1, -1e-44]),      # subnormal magnitudes: TRL's gradients overflow
])
def test_finite_where_trl_is_not(c_vals, r_vals):
    trl = _float32_loss_and_grads(lambda c, r, n: trl_orpo(c, r, n, 0.1), c_vals, r_vals)
    ours = _float32_loss_and_grads(lambda c, r, n: orpo_loss(c, r, n, 0.1)[0], c_vals, r_vals)
    for tensor in ours:
        assert torch.isfinite(tensor).all(), ours
    # The cases are chosen so that TRL's own float32 math breaks in at least one place.
    if not all(torch.isfinite(t).all() for t in trl):
        assert torch.isfinite(ours[0])
    # Where TRL's loss value is finite, the loss values agree (subnormal inputs, below float32's
    # smallest normal 1.2e-38, are read as -1.2e-38 and may differ in the last digits).
    normal = all(v == 0 or abs(v) >= torch.finfo(torch.float32).tiny for v in c_vals + r_vals)
    if torch.isfinite(trl[0]) and normal:
        torch.testing.assert_close(ours[0], trl[0], rtol=1e-5, atol=1e-6)


def test_trl_really_fails_near_zero():
    """Guards the premise of the edge-case tests: TRL's gradient is NaN just below zero."""
    _, grad_c, _ = _float32_loss_and_grads(lambda c, r, n: trl_orpo(c, r, n, 0.1), [-1e-8], [-0.5])
    assert torch.isnan(grad_c).any()


def test_near_zero_gradient_matches_float64_limit():
    # At c = -1e-5 (still representable), our float32 gradient equals the float64 analytic one:
    # d ratio / dc = sigmoid(-log_odds) / (1 - p_c).
    c_val, r_val, beta = -1e-5, -0.5, 0.1
    _, grad_c, _ = _float32_loss_and_grads(lambda c, r, n: orpo_loss(c, r, n, beta)[0], [c_val], [r_val])
    pc, pr = math.exp(c_val), math.exp(r_val)
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    expected = -beta * (1 / (1 + math.exp(log_odds))) / (1 - pc)
    assert grad_c.item() == pytest.approx(expected, rel=1e-3)


def test_metrics_are_named_as_trl_names_them_and_correct():
    c = torch.tensor([-0.5, -2.0])
    r = torch.tensor([-1.0, -1.5])
    _, m = orpo_loss(c, r, torch.tensor(0.9), beta=0.1)
    assert set(m) == {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
                      "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * -1.25)
    assert m["rewards/rejected"].item() == pytest.approx(0.1 * -1.25)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["logps/chosen"].item() == pytest.approx(-1.25)
    assert m["nll_loss"].item() == pytest.approx(0.9)


def test_non_positive_beta_is_refused():
    with pytest.raises(ValueError, match="beta must be positive"):
        orpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor(1.0), beta=0.0)


def test_token_logps_and_masked_mean_against_hand_computation():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0], [0.0, 0.0]]])  # (1, 3, 2)
    labels = torch.tensor([[-100, 1, 0]])
    lp = token_logps(logits, labels)
    # position 0 predicts label 1 with p = 3/4; position 1 predicts label 0 with p = 2/3
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.75), math.log(2 / 3)]]))
    mask = labels[:, 1:] != -100
    assert masked_mean(lp, mask).item() == pytest.approx((math.log(0.75) + math.log(2 / 3)) / 2, rel=1e-6)
    assert token_logps(logits, torch.tensor([[-100, -100, 0]]))[0, 0].item() == 0.0
