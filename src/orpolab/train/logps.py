"""Per-sequence log-probabilities of a ``[2B, L]`` preference batch (chosen rows first), in one forward.

Two paths give the same numbers: the model's own forward (full-vocabulary logits at every position,
as TRL does), or the decoder's hidden states sent through the output layer only at the positions a
loss term uses, in chunks (:func:`orpolab.train.losses.selected_token_logps`). The second is most
of orpolab's speed over TRL on small models, whose output layer dominates the cost.
"""

from __future__ import annotations

import torch

from orpolab.train.losses import masked_mean, selected_token_logps, token_logps


def backbone_and_head(model: torch.nn.Module, chunk_size: int) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The decoder and a plain linear output layer, when the fast log-prob path applies.

    Not for output layers that are adapted, quantized, or followed by a logit scale or
    soft-capping (Gemma-2, Cohere): those keep the model's own forward.
    """
    if not chunk_size:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if (type(head) is not torch.nn.Linear or not hasattr(base, "get_decoder")
            or getattr(config, "final_logit_softcapping", None)
            or getattr(config, "logit_scale", None) not in (None, 1, 1.0)):
        return None
    return base.get_decoder(), head


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], nll_on: str = "completion",
                   chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Mean and summed completion log-probs per sequence, the chosen NLL and TRL's mean-logit metrics.

    ``nll_on``: the chosen NLL over the completion only, or over prompt and completion (``"full"``).
    """
    input_ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n = input_ids.shape[0] // 2
    # Next-token log-probs of every real token; the completion mask then selects answers.
    targets = torch.where(attention.bool(), input_ids, torch.full_like(input_ids, -100))
    completion = labels[:, 1:] != -100
    nll_mask = (targets[:n, 1:] != -100) if nll_on == "full" else completion[:n]
    parts = backbone_and_head(model, chunk_size)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        logps = token_logps(logits, targets)
        with torch.no_grad():
            # Logits at position t predict token t+1: align them with the completion mask.
            vocab_mean = logits.detach().float().mean(-1)[:, :-1]
    else:
        # Only the positions some term uses: completions, plus the chosen prompts for a full NLL.
        # Padding and the rejected prompts never reach the (vocabulary-sized) output layer.
        backbone, head = parts
        need = completion.clone()
        need[:n] |= nll_mask
        hidden = backbone(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        selected, selected_mean = selected_token_logps(hidden[:, :-1][need], head.weight, targets[:, 1:][need],
                                                       head.bias, chunk_size)
        zeros = torch.zeros(need.shape, dtype=torch.float32, device=hidden.device)
        logps = zeros.masked_scatter(need, selected)
        vocab_mean = zeros.masked_scatter(need, selected_mean)
    seq_mean = masked_mean(logps, completion)
    chosen_nll = -(logps[:n] * nll_mask).sum() / nll_mask.sum().clamp(min=1)
    with torch.no_grad():
        mean_logits = masked_mean(vocab_mean, completion)
    return {
        "mean_logps": seq_mean, "sum_logps": (logps * completion).sum(-1), "chosen_nll": chosen_nll,
        "chosen_logps": seq_mean[:n], "rejected_logps": seq_mean[n:],
        "chosen_sum_nats": -(logps[:n] * completion[:n]).sum(-1).detach(),
        "logits/chosen": mean_logits[:n].mean(), "logits/rejected": mean_logits[n:].mean(),
    }
