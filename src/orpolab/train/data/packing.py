"""Packed rows with a shared prefix: each pair laid out once as prompt, chosen, rejected; several pairs per row.

The plain layout (:class:`orpolab.train.data.PairCollator`) computes every prompt twice (once in the
chosen row, once in the rejected row) and pads every row to the batch's longest sequence. Here a
pair takes ``len(prompt) + len(chosen) + len(rejected)`` positions: the rejected answer's position
ids restart right after the prompt, and a block attention mask (built on the model's device by
:func:`orpolab.train.logps.block_attention_mask` from the ``pair_of``/``part`` tensors) lets each
answer see its own prompt and its own earlier tokens only, so every hidden state equals the one the
plain layout computes (prefix sharing, Wang and Hegde 2024). Pairs of one batch are packed first-fit,
longest first, into rows of ``max_length`` positions (longer when one pair alone needs more), so a
batch is still the same ``B`` pairs: steps, the resumable sampler and per-pair caches are unchanged.

Log-probabilities are read through an explicit list of predictions (row, position of the hidden
state, target token, sequence): the first token of either answer is predicted from the prompt's last
position, which both answers share.
"""

from __future__ import annotations

import torch

# ``part`` values: which block of its pair a position belongs to.
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``capacity`` tokens (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


class PackedPairCollator:
    """``B`` pairs into packed rows, with what the log-probs need to map predictions back to sequences.

    Keys: ``input_ids``, ``position_ids``, ``attention_mask`` (1 on real tokens: a count, not the
    model's mask), ``pair_of`` (the pair's slot in the batch, -1 on padding), ``part`` (prompt,
    chosen, rejected); predictions ``pred_row``, ``pred_pos``, ``pred_target``, ``pred_seq`` (0..B-1
    chosen, B..2B-1 rejected, the plain layout's row order), ``pred_prompt`` (a prompt token, used
    only by a full-sequence NLL); ``sequence_tokens`` (2B: prompt + answer, the plain layout's
    non-padding tokens), ``answer_bytes`` and ``index`` as the plain collator has them.
    """

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = len(examples)
        sizes = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
        rows = first_fit(sizes, max(self.max_length, max(sizes)))
        width = max(sum(sizes[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        pair_of = torch.full((len(rows), width), -1, dtype=torch.long)
        part = torch.full((len(rows), width), PROMPT, dtype=torch.long)
        preds: list[tuple[int, int, int, int, bool]] = []  # row, position, target, sequence, prompt token
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                p, c, j = examples[i]["prompt_ids"], examples[i]["chosen_ids"], examples[i]["rejected_ids"]
                last_prompt = at + len(p) - 1
                # Prompt tokens 1.. predicted from the previous prompt position (a full NLL uses them).
                preds += [(r, at + k - 1, p[k], i, True) for k in range(1, len(p))]
                for answer, which, seq in ((c, CHOSEN, i), (j, REJECTED, n + i)):
                    start = at + len(p) if which == CHOSEN else at + len(p) + len(c)
                    # The answer's first token is predicted from the shared prompt's last position.
                    preds += [(r, last_prompt if k == 0 else start + k - 1, answer[k], seq, False)
                              for k in range(len(answer))]
                    span = slice(start, start + len(answer))
                    input_ids[r, span] = torch.tensor(answer, dtype=torch.long)
                    position_ids[r, span] = torch.arange(len(p), len(p) + len(answer))
                    part[r, span] = which
                input_ids[r, at: at + len(p)] = torch.tensor(p, dtype=torch.long)
                position_ids[r, at: at + len(p)] = torch.arange(len(p))
                pair_of[r, at: at + sizes[i]] = i
                at += sizes[i]
        pred = torch.tensor(preds, dtype=torch.long).reshape(-1, 5)
        batch = {
            "input_ids": input_ids, "position_ids": position_ids, "attention_mask": (pair_of >= 0).long(),
            "pair_of": pair_of, "part": part,
            "pred_row": pred[:, 0], "pred_pos": pred[:, 1], "pred_target": pred[:, 2], "pred_seq": pred[:, 3],
            "pred_prompt": pred[:, 4].bool(),
            "sequence_tokens": torch.tensor([len(e["prompt_ids"]) + len(e[k]) for k in ("chosen_ids", "rejected_ids")
                                             for e in examples]),
            "answer_bytes": torch.tensor([e[k] for k in ("chosen_bytes", "rejected_bytes") for e in examples]),
        }
        if all("index" in e for e in examples):
            batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        return batch
