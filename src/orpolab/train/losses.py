"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Everything here is plain tensor math with no model, batch layout or logging in it, so each
function can be checked against an independent float64 reference (see ``tests/test_losses.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, finite in value and gradient for every such ``x``.

    TRL evaluates ``torch.where(x < -ln2, log1p(-exp(x)), log(-expm1(x)))``. Both branches are
    computed for every element, and the unused one poisons the gradient: for ``-6e-8 < x < 0``
    float32 ``exp(x)`` rounds to 1, ``log1p(-1)`` is ``-inf`` and its zero-weighted gradient
    becomes ``0 * inf = NaN``; at ``x == 0`` even the chosen branch is ``log(0)``. Here each branch
    only ever sees inputs on which it is finite, and ``x`` is capped just below zero at the
    smallest normal float (1.2e-38 in float32), so values and gradients equal TRL's wherever
    TRL's are finite for normal floats; subnormal magnitudes, where TRL's gradients overflow,
    are read as that smallest normal.
    """
    tiny = torch.finfo(x.dtype).tiny
    x = x.clamp(max=-tiny)
    far = x < -_LN2
    # Each branch gets a harmless stand-in (-1.0) where the other branch is used.
    far_x = torch.where(far, x, torch.full_like(x, -1.0))
    near_x = torch.where(far, torch.full_like(x, -1.0), x)
    return torch.where(far, torch.log1p(-torch.exp(far_x)), torch.log(-torch.expm1(near_x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO's loss: ``nll - beta * mean(logsigmoid(log odds(chosen) - log odds(rejected)))``.

    Args:
        chosen_logps: per-example **mean** log-probability of the chosen completion tokens, shape (B,).
        rejected_logps: the same for the rejected completions, shape (B,).
        chosen_nll: the supervised term (a scalar), e.g. the token-mean NLL of the chosen sequences.
        beta: weight of the odds-ratio term (the paper's lambda); must be positive.

    Returns:
        The scalar loss and detached metrics named as TRL's ``ORPOTrainer`` names them, so runs are
        comparable with TRL's in an MLflow or W&B dashboard.

    The log-probabilities are promoted to float32 (as TRL does) so bf16 training keeps the
    odds-ratio precision; ``log1mexp`` keeps loss and gradients finite when a mean
    log-probability is (numerically) zero.
    """
    if beta <= 0:
        raise ValueError(f"orpo beta must be positive, got {beta}")
    c = chosen_logps.float()
    r = rejected_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll.float() - beta * ratio.mean()

    chosen_rewards = beta * c.detach()
    rejected_rewards = beta * r.detach()
    metrics = {
        "nll_loss": chosen_nll.detach().float(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": c.detach().mean(),
        "logps/rejected": r.detach().mean(),
    }
    return loss, metrics


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each next token, shape (N, T-1); zero where the label is ignored.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``. The log-softmax is taken in float32 even for
    bf16 logits, as TRL does, because the odds ratio is sensitive to small probability changes.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask


def selected_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` from hidden states, through the output layer, in chunks.

    ``hidden`` (N, H) holds only the positions whose next-token log-probability is needed
    (completion tokens, and prompt tokens for a full-sequence NLL); ``weight`` (V, H) is the output
    layer. Equal to ``log_softmax(hidden @ weight.T)[targets]`` in float32, but never builds the
    (positions x vocabulary) logits of padding or of prompts that no term uses, and keeps one
    float32 copy of the selected logits instead of logits + float copy + log-softmax: with
    Llama-3's 128k vocabulary that output layer is most of a small model's cost.

    Returns the log-probabilities (N,) and, without gradient, each row's mean logit (N,), which
    is TRL's ``logits/*`` metric.
    """
    logps, mean_logits = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start: start + chunk_size]
        logits = F.linear(h, weight, bias).float()
        t = targets[start: start + chunk_size]
        logps.append(logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1))
        mean_logits.append(logits.detach().mean(-1))
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(mean_logits)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over ``mask`` (rows with an empty mask give 0, not NaN)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                        rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics, shared by the DPO-style losses."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
        "rewards/accuracies": (c > r).float().mean(), "rewards/margins": (c - r).mean(),
        "logps/chosen": chosen_logps.detach().float().mean(), "logps/rejected": rejected_logps.detach().float().mean(),
    }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's sigmoid loss (TRL's ``loss_type="sigmoid"``), with optional label smoothing (cDPO).

    ``*_logps`` are per-example **summed** log-probabilities of the completion tokens, as DPO
    defines them; ``ref_*`` come from the reference model (the base, adapter disabled).
    """
    if beta <= 0:
        raise ValueError(f"dpo beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    metrics = _preference_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)
    return losses.mean(), metrics


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO: ``-logsigmoid(beta * (mean logp chosen - mean logp rejected) - gamma)``, no reference.

    The rewards are length-normalised (mean log-probability per completion token) and ``gamma`` is
    the target reward margin.
    """
    if beta <= 0:
        raise ValueError(f"simpo beta must be positive, got {beta}")
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    losses = -F.logsigmoid(beta * (c - r) - gamma)
    return losses.mean(), _preference_metrics(beta * c, beta * r, c, r)


def sft_loss(chosen_nll: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on the chosen completions only: the baseline ORPO claims to replace."""
    return chosen_nll.float(), {"nll_loss": chosen_nll.detach().float()}


def method_loss(method, out: dict[str, torch.Tensor], ref_logps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured method's loss and TRL's metrics for it, from :func:`orpolab.train.logps.sequence_logps`.

    ``method``: ``name`` (orpo, dpo, simpo, sft) and its parameters (``beta``, ``label_smoothing``,
    ``gamma``); ``ref_logps``: DPO's reference summed log-probs, chosen rows first.
    """
    n = out["chosen_logps"].shape[0]
    if method.name == "orpo":
        loss, metrics = orpo_loss(out["chosen_logps"], out["rejected_logps"], out["chosen_nll"], method.beta)
    elif method.name == "dpo":
        if ref_logps is None:
            raise ValueError("DPO needs the reference model's log-probabilities")
        loss, metrics = dpo_loss(out["sum_logps"][:n], out["sum_logps"][n:], ref_logps[:n], ref_logps[n:],
                                 method.beta, method.label_smoothing)
    elif method.name == "simpo":
        loss, metrics = simpo_loss(out["chosen_logps"], out["rejected_logps"], method.beta, method.gamma)
    elif method.name == "sft":
        loss, metrics = sft_loss(out["chosen_nll"])
        metrics["logps/chosen"] = out["chosen_logps"].detach().mean()
        metrics["logps/rejected"] = out["rejected_logps"].detach().mean()
    else:
        raise ValueError(f"unknown method {method.name!r}")
    metrics["logits/chosen"], metrics["logits/rejected"] = out["logits/chosen"], out["logits/rejected"]
    return loss, metrics
