"""Per-sequence log-probabilities of a ``[2B, L]`` preference batch (chosen rows first), in one forward.

Two paths give the same numbers: the model's own forward (full-vocabulary logits at every position,
as TRL does), or the decoder's hidden states sent through the output layer only at the positions a
loss term uses, in chunks (:func:`orpolab.train.losses.selected_token_logps`). The second is most
of orpolab's speed over TRL on small models, whose output layer dominates the cost.
"""

from __future__ import annotations

import torch

from orpolab.train.data.packing import PROMPT
from orpolab.train.losses import masked_mean, selected_token_logps, token_logps

# Attention implementations that take an arbitrary 4D mask (flash-attention kernels take none).
MASKABLE_ATTENTION = ("sdpa", "eager")


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


def pairs_in(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a batch of either layout (a packed batch has fewer rows than sequences)."""
    return batch["answer_bytes"].shape[0] // 2


def packing_blocker(model: torch.nn.Module, max_length: int) -> str | None:
    """Why packed rows with a block mask would not give the plain layout's numbers here, or None.

    The mask goes to every layer as it is: attention kernels that cannot take an arbitrary mask
    (flash-attention) would ignore it, and a sliding window shorter than a sequence would no longer
    be applied (transformers uses a custom 4D mask as given).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in MASKABLE_ATTENTION:
        return f"attention implementation {impl!r} takes no custom attention mask (sdpa and eager do)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and window < max_length:
        return (f"the model's sliding attention window ({window} tokens) is shorter than data.max_length "
                f"({max_length})")
    if not hasattr(base, "get_decoder") and not hasattr(base, "model"):
        return "the model exposes no decoder to pass position ids and a 4D mask to"
    return None


def block_attention_mask(pair_of: torch.Tensor, part: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The packed rows' (R, 1, L, L) mask: a position sees earlier positions of its own pair's prompt and
    of its own block (prompt, chosen or rejected answer), nothing of other pairs or of the other answer.

    Boolean (True: attend) for SDPA; additive (0 or the dtype's minimum) when ``dtype`` is given, as
    eager attention adds the mask to its scores. Padding positions see earlier padding only.
    """
    length = pair_of.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=pair_of.device).tril()
    same_pair = pair_of[:, :, None] == pair_of[:, None, :]
    visible = (part[:, None, :] == PROMPT) | (part[:, None, :] == part[:, :, None])
    allowed = (same_pair & visible & causal).unsqueeze(1)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)


def packed_sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], nll_on: str = "completion",
                          chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """:func:`sequence_logps` for packed rows (:class:`orpolab.train.data.packing.PackedPairCollator`).

    The same outputs, sequence for sequence in the plain layout's order: each prediction's
    log-prob is summed into its sequence, so sums and means are those of the plain layout.
    """
    n = pairs_in(batch)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    mask_dtype = None if impl == "sdpa" else base.get_input_embeddings().weight.dtype
    if mask_dtype is not None and not mask_dtype.is_floating_point:
        mask_dtype = torch.float32
    mask = block_attention_mask(batch["pair_of"], batch["part"], mask_dtype)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"],
              "use_cache": False}
    seq, prompt = batch["pred_seq"], batch["pred_prompt"]
    # A full NLL uses the chosen prompts' tokens too; otherwise predictions of prompt tokens are skipped.
    keep = ~prompt if nll_on != "full" else torch.ones_like(prompt)
    rows, pos, targets = batch["pred_row"][keep], batch["pred_pos"][keep], batch["pred_target"][keep]
    seq, prompt = seq[keep], prompt[keep]
    parts = backbone_and_head(model, chunk_size)
    if parts is None:
        logits = model(**inputs).logits[rows, pos]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        vocab_mean = logits.detach().mean(-1)
    else:
        backbone, head = parts
        hidden = backbone(**inputs).last_hidden_state
        logps, vocab_mean = selected_token_logps(hidden[rows, pos], head.weight, targets, head.bias, chunk_size)
    answer = ~prompt
    sums = logps.new_zeros(2 * n).index_add(0, seq[answer], logps[answer])
    counts = torch.bincount(seq[answer], minlength=2 * n).to(logps.dtype)
    seq_mean = sums / counts.clamp(min=1.0)
    in_nll = seq < n  # chosen sequences: their answer tokens, and their prompt tokens when kept
    chosen_nll = -logps[in_nll].sum() / in_nll.sum().clamp(min=1)
    with torch.no_grad():
        mean_logits = vocab_mean.new_zeros(2 * n).index_add(0, seq[answer], vocab_mean[answer].detach())
        mean_logits = mean_logits / counts.clamp(min=1.0).to(mean_logits.dtype)
    return {
        "mean_logps": seq_mean, "sum_logps": sums, "chosen_nll": chosen_nll,
        "chosen_logps": seq_mean[:n], "rejected_logps": seq_mean[n:],
        "chosen_sum_nats": -sums[:n].detach(),
        "logits/chosen": mean_logits[:n].mean(), "logits/rejected": mean_logits[n:].mean(),
    }


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], nll_on: str = "completion",
                   chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Mean and summed completion log-probs per sequence, the chosen NLL and TRL's mean-logit metrics.

    ``nll_on``: the chosen NLL over the completion only, or over prompt and completion (``"full"``).
    A packed batch (it has ``pair_of``) goes through :func:`packed_sequence_logps`.
    """
    if "pair_of" in batch:
        return packed_sequence_logps(model, batch, nll_on, chunk_size)
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
            vocab_mean = logits.detach().to(logps.dtype).mean(-1)[:, :-1]
    else:
        # Only the positions some term uses: completions, plus the chosen prompts for a full NLL.
        # Padding and the rejected prompts never reach the (vocabulary-sized) output layer.
        backbone, head = parts
        need = completion.clone()
        need[:n] |= nll_mask
        hidden = backbone(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        selected, selected_mean = selected_token_logps(hidden[:, :-1][need], head.weight, targets[:, 1:][need],
                                                       head.bias, chunk_size)
        zeros = torch.zeros(need.shape, dtype=selected.dtype, device=hidden.device)
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
