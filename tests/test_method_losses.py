"""DPO, SimPO and SFT losses against independent float64 references and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from orpolab.train.losses import dpo_loss, sft_loss, simpo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def ref_dpo(pc, pr, rc, rr, beta, ls):
    vals = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        z = beta * ((a - c) - (b - d))
        vals.append(-(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z))
    return sum(vals) / len(vals)


def ref_simpo(c, r, beta, gamma):
    return sum(-log_sigmoid(beta * (a - b) - gamma) for a, b in zip(c, r, strict=True)) / len(c)


PC, PR = [-12.0, -30.5, -8.25], [-15.0, -29.0, -20.0]
RC, RR = [-13.0, -31.0, -9.0], [-14.0, -28.5, -18.0]


@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.1)])
def test_dpo_matches_float64_reference(beta, ls):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, m = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta, ls)
    assert loss.item() == pytest.approx(ref_dpo(PC, PR, RC, RR, beta, ls), rel=1e-6)
    # chosen log-ratios 1, 0.5, 0.75; rejected -1, -0.5, -2: every pair prefers the chosen answer
    assert m["rewards/chosen"].item() == pytest.approx(beta * (1 + 0.5 + 0.75) / 3, rel=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(beta * (-1 - 0.5 - 2) / 3, rel=1e-6)
    assert m["rewards/accuracies"].item() == 1.0


def test_dpo_hand_computed_case():
    # policy and reference equal: z = 0, loss = ln 2 whatever beta.
    z = torch.tensor([-5.0])
    loss, m = dpo_loss(z, z - 1, z, z - 1, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/margins"].item() == 0.0


def test_dpo_gradients_match_finite_differences():
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(PR, dtype=torch.float64, requires_grad=True)
    ref_c, ref_r = torch.tensor(RC, dtype=torch.float64), torch.tensor(RR, dtype=torch.float64)
    dpo_loss(pc, pr, ref_c, ref_r, 0.2, 0.1)[0].backward()
    h = 1e-6
    for i in range(3):
        up, down = list(PC), list(PC)
        up[i] += h
        down[i] -= h
        fd = (ref_dpo(up, PR, RC, RR, 0.2, 0.1) - ref_dpo(down, PR, RC, RR, 0.2, 0.1)) / (2 * h)
        assert pc.grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (10.0, 1.6), (2.5, 0.0)])
def test_simpo_matches_float64_reference_and_gradients(beta, gamma):
    c_vals, r_vals = [-0.4, -1.2, -0.9], [-0.8, -1.0, -2.2]
    c = torch.tensor(c_vals, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(r_vals, dtype=torch.float64)
    loss, _ = simpo_loss(c, r, beta, gamma)
    assert loss.item() == pytest.approx(ref_simpo(c_vals, r_vals, beta, gamma), rel=1e-6)
    loss.backward()
    h = 1e-6
    for i in range(3):
        up, down = list(c_vals), list(c_vals)
        up[i] += h
        down[i] -= h
        fd = (ref_simpo(up, r_vals, beta, gamma) - ref_simpo(down, r_vals, beta, gamma)) / (2 * h)
        assert c.grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-10)


def test_sft_is_the_chosen_nll_and_bad_parameters_are_refused():
    loss, m = sft_loss(torch.tensor(1.25))
    assert loss.item() == 1.25 and m["nll_loss"].item() == 1.25
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be positive"):
        simpo_loss(torch.zeros(1), torch.zeros(1), beta=-1, gamma=0.5)
