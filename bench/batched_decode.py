"""Shared by the judge and answer benchmarks: batched decoding timed at 1 to 32 sequences per batch.

Each setting decodes the same requests with :class:`orpolab.evaluate.batched.BatchedDecoder` (the
code the evaluation runs). Beside the measured rate, a bound from the same run (a roofline): prompt
tokens at the measured prompt rate (one 512-token decode, compute bound) plus, per generation step,
the slower of one pass over the weights and the sequences' KV caches at the measured memory
bandwidth and the step's tokens at the measured compute rate of generated tokens (a 512-token
decode with logits for every token: each generated token also pays the output layer). On few cores
the compute term is the one that binds from a few sequences per batch on.
"""

from __future__ import annotations

import time
from pathlib import Path

PARALLEL = (1, 2, 4, 8)
# llama.cpp's CPU kernels for K-quants are efficient from 16 rows on (tiles of 16): answers go further.
ANSWER_PARALLEL = (1, 2, 4, 8, 16, 32)


def prompt_rate(llm, n_ctx: int, n_tokens: int = 512, all_logits: bool = False) -> float:
    """Tokens per second of one full batch (the compute-bound rate).

    ``all_logits``: every token's logits, as for generated tokens (a prompt needs only its last one's):
    the rate at which a batch of generated tokens can go at best.
    """
    import llama_cpp

    from orpolab.evaluate.batched import BatchedDecoder, Request

    vocab = llm.n_vocab()
    tokens = [1] + [2 + (i * 37) % (vocab - 2) for i in range(n_tokens - 1)]
    with BatchedDecoder(llm, 1, max(n_ctx, n_tokens)) as decoder:
        list(decoder.run([Request(tokens[:32], 1)]))  # warm-up: page the weights in
        llama_cpp.llama_memory_seq_rm(decoder.memory, 0, -1, -1)
        batch = decoder.batch
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = token, i, 1, 0
            batch.logits[i] = int(all_logits or i == n_tokens - 1)
        batch.n_tokens = n_tokens
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(decoder.ctx, batch) != 0:
            raise RuntimeError("llama.cpp could not decode the timing batch")
        return n_tokens / (time.perf_counter() - t0)


def run_setting(llm, requests: list, parallel: int, n_ctx_seq: int, grammar: str | None = None,
                kv_unified: bool = False) -> dict:
    """One setting: wall time, prompt tokens decoded (reused ones excluded), generated tokens, each completion."""
    from orpolab.evaluate.batched import BatchedDecoder

    with BatchedDecoder(llm, parallel, n_ctx_seq, grammar=grammar, kv_unified=kv_unified) as decoder:
        t0 = time.perf_counter()
        done = {c.index: c for c in decoder.run(requests)}
        seconds = time.perf_counter() - t0
    ordered = [done[i] for i in range(len(requests))]
    return {"parallel": parallel, "kv_unified": kv_unified, "seconds": seconds,
            "prompt_tokens": sum(c.prompt_tokens - c.reused_tokens for c in ordered),
            "reused_tokens": sum(c.reused_tokens for c in ordered),
            "gen_tokens": sum(len(c.tokens) for c in ordered), "tokens": [c.tokens for c in ordered]}


def bound_seconds(run: dict, pp_tps: float, weight_bytes: int, kv_per_token: int, bandwidth: float,
                  mean_context: float, gen_tps: float) -> float:
    """Prompt at the measured prompt rate + each generation step at the slower of reading the weights and
    the caches once and computing its tokens at the measured generated-token rate ``gen_tps``."""
    steps = run["gen_tokens"] / run["parallel"]  # full batches: every step serves `parallel` sequences
    read_s = (weight_bytes + run["parallel"] * mean_context * kv_per_token) / bandwidth
    return run["prompt_tokens"] / pp_tps + steps * max(read_s, run["parallel"] / gen_tps)


def divergence(run: dict, reference: dict) -> float:
    """Share of completions not identical, token for token, to those decoded one at a time."""
    pairs = list(zip(run["tokens"], reference["tokens"], strict=True))
    return sum(a != b for a, b in pairs) / len(pairs)


def gen_rate(run: dict, pp_tps: float) -> float:
    """Generated tokens per second once the prompt time (at the measured prompt rate) is taken out.

    At least the rate of the whole run (when prompts went faster than the measured rate, as they do
    when they overlap generation steps).
    """
    gen_s = run["seconds"] - run["prompt_tokens"] / pp_tps
    overall = run["gen_tokens"] / run["seconds"]
    return max(overall, run["gen_tokens"] / gen_s) if gen_s > 0 else overall


def file_bytes(path: Path) -> int:
    return Path(path).stat().st_size
