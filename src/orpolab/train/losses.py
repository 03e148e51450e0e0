"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Everything here is plain tensor math with no model, batch layout or logging in it, so each
function can be checked against an independent float64 reference (see ``tests/test_losses.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LN2 = math.log(2.0)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 log-probs are promoted, as TRL does); float64 stays float64 for exact tests."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
    c = _up(chosen_logps)
    r = _up(rejected_logps)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = _up(chosen_nll) - beta * ratio.mean()

    chosen_rewards = beta * c.detach()
    rejected_rewards = beta * r.detach()
    metrics = {
        "nll_loss": _up(chosen_nll.detach()),
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
    bf16 logits, as TRL does, because the odds ratio is sensitive to small probability changes
    (float64 logits stay float64).
    """
    logits = logits[:, :-1].to(_compute_dtype(logits.dtype))
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision logits (as TRL), the input's own precision when it is higher (float64 tests)."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkedSelectedLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[targets]`` with at most one chunk's logits alive at a time.

    Autograd would keep every chunk's (positions x vocabulary) logits until the backward pass:
    4 GB for 8 pairs of 500-token answers at Llama-3's 128,256 tokens. Here the forward pass keeps,
    per position, only the log-sum-exp; what the backward pass needs is obtained in one of two ways:

    * the output layer is frozen (LoRA, the usual case): the gradient of each log-probability with
      respect to its hidden state, ``weight[target] - softmax @ weight``, is computed in the forward
      pass while the chunk's softmax is at hand (as Liger-Kernel's fused losses do) and kept, one
      hidden-sized row per position; backward only scales it. No logits are computed twice.
    * the output layer trains (full fine-tuning, or a bias that trains): backward recomputes each
      chunk's logits from the kept hidden states and the log-sum-exp, then frees them.

    The second output, each position's mean logit (TRL's ``logits/*`` metric), is not differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        dtype = _compute_dtype(hidden.dtype)
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = bias is not None and ctx.needs_input_grad[2]
        recompute = needs_weight or needs_bias
        logps = hidden.new_empty(hidden.shape[0], dtype=dtype)
        mean_logits = hidden.new_empty(hidden.shape[0], dtype=dtype)
        lse_all = hidden.new_empty(hidden.shape[0], dtype=dtype)
        grad_hidden = hidden.new_empty(hidden.shape) if needs_hidden and not recompute else None
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits = F.linear(hidden[start:stop], weight, bias).to(dtype)
            t = targets[start:stop]
            picked = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            mean_logits[start:stop] = logits.mean(-1)
            # log-sum-exp with the chunk's one buffer turned into exp(logits - max) in place: torch.logsumexp
            # would allocate a second chunk-sized temporary.
            top = logits.amax(-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            lse = (total.log() + top).squeeze(-1)
            logps[start:stop] = picked - lse
            lse_all[start:stop] = lse
            if grad_hidden is not None:
                # d logp / d hidden = weight[target] - softmax @ weight.
                probs.div_(total)
                grad_hidden[start:stop] = weight[t].to(dtype) - probs.to(weight.dtype) @ weight
            del logits, probs  # the chunk's buffer, before the next chunk allocates its own
        ctx.chunk_size, ctx.recompute, ctx.has_bias = chunk_size, recompute, bias is not None
        if recompute:
            ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        else:
            ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(mean_logits)
        return logps, mean_logits

    @staticmethod
    def backward(ctx, grad_logps, _grad_mean):
        if not ctx.recompute:
            (grad_hidden,) = ctx.saved_tensors
            if grad_hidden is None:
                return None, None, None, None, None
            return (grad_logps.unsqueeze(-1) * grad_hidden).to(grad_hidden.dtype), None, None, None, None
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = ctx.has_bias and ctx.needs_input_grad[2]
        g_hidden = torch.zeros_like(hidden) if needs_hidden else None
        g_weight = torch.zeros_like(weight, dtype=_compute_dtype(weight.dtype)) if needs_weight else None
        g_bias = torch.zeros_like(bias, dtype=_compute_dtype(bias.dtype)) if needs_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h = hidden[start:stop]
            logits = F.linear(h, weight, bias).to(lse_all.dtype)
            # d logp_i / d logits_i = onehot(target_i) - softmax_i, scaled by the incoming gradient.
            g = logits.sub_(lse_all[start:stop].unsqueeze(-1)).exp_().mul_(-grad_logps[start:stop].unsqueeze(-1))
            g.scatter_add_(-1, targets[start:stop].unsqueeze(-1), grad_logps[start:stop].unsqueeze(-1).to(g.dtype))
            if g_hidden is not None:
                g_hidden[start:stop] = g.to(weight.dtype) @ weight
            if g_weight is not None:
                g_weight += g.T @ h.to(g.dtype)
            if g_bias is not None:
                g_bias += g.sum(0)
            del logits, g  # the same buffer
        return (g_hidden, None if g_weight is None else g_weight.to(weight.dtype),
                None if g_bias is None else g_bias.to(bias.dtype), None, None)


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
    layer (a tied embedding matrix works the same). Equal to ``log_softmax(hidden @ weight.T)[targets]``
    in float32 (float64 for float64 inputs), but never builds the (positions x vocabulary) logits of
    padding or of prompts that no term uses, and never holds more than one chunk's logits: neither
    between the forward and the backward pass nor within either (see :class:`_ChunkedSelectedLogps`).

    Returns the log-probabilities (N,) and, without gradient, each row's mean logit (N,), which
    is TRL's ``logits/*`` metric.
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=_compute_dtype(hidden.dtype))
        return empty, empty
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # Autocast would leave the chunk's matmuls in bf16 but the Function's own arithmetic outside
        # it: cast once here, as autocast would have, and run the Function in plain precision.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _ChunkedSelectedLogps.apply(hidden.to(dtype), weight.to(dtype),
                                               None if bias is None else bias.to(dtype), targets, chunk_size)
    return _ChunkedSelectedLogps.apply(hidden, weight, bias, targets, chunk_size)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over ``mask`` (rows with an empty mask give 0, not NaN)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                        rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics, shared by the DPO-style losses."""
    c, r = _up(chosen_rewards.detach()), _up(rejected_rewards.detach())
    return {
        "rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
        "rewards/accuracies": (c > r).float().mean(), "rewards/margins": (c - r).mean(),
        "logps/chosen": _up(chosen_logps.detach()).mean(), "logps/rejected": _up(rejected_logps.detach()).mean(),
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
    chosen_ratio = _up(chosen_logps) - _up(ref_chosen_logps)
    rejected_ratio = _up(rejected_logps) - _up(ref_rejected_logps)
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
    c, r = _up(chosen_avg_logps), _up(rejected_avg_logps)
    losses = -F.logsigmoid(beta * (c - r) - gamma)
    return losses.mean(), _preference_metrics(beta * c, beta * r, c, r)


def sft_loss(chosen_nll: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on the chosen completions only: the baseline ORPO claims to replace."""
    return _up(chosen_nll), {"nll_loss": _up(chosen_nll.detach())}


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
