"""Answers to evaluation prompts from GGUF models, on the CPU, saved as they come (resumable).

Each model answers through its own chat template (llama-cpp-python's chat completion reads it
from the GGUF), greedily or with a recorded seed per (model, prompt), within a token budget,
several answers per llama.cpp batch (``evaluation.generation.parallel``). For every answer we keep
what judges tend to miss: whether it ended by itself (``finish_reason == "stop"``) or ran into
the budget, its length in tokens, and how much it repeats itself.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from tqdm.auto import tqdm

from orpolab.core.config import GenerationConfig
from orpolab.core.files import append_jsonl, read_jsonl
from orpolab.evaluate.batched import TOKENIZER_CTX
from orpolab.export.llamacpp import open_gguf


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of word n-grams that already occurred earlier in the answer (0 = no repetition)."""
    words = text.split()
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)




def answer_seed(seed: int, label: str, prompt_id) -> int:
    """The sampling seed of one answer: fixed by (run seed, model, prompt id), so a sampled answer does
    not depend on which answers were decoded beside it or on where a resumed run started."""
    digest = hashlib.sha256(f"{seed}\0{label}\0{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def answer_prompts(gguf: Path, prompts: list[dict], out_file: Path, cfg: GenerationConfig, label: str) -> list[dict]:
    """Answer every prompt not yet in ``out_file``; returns all answers in prompt order.

    Up to ``cfg.parallel`` answers are decoded together; each is appended (and synced) as soon as it
    is finished, so a kill loses only the answers still being written. Prompts longer than the
    context window (minus the token budget) are skipped and recorded with ``skipped:
    "prompt_too_long"`` so they are counted, not silently lost.
    """
    from orpolab.evaluate.batched import BatchedDecoder, Request, chat_prompt, context_for

    done = {row["id"]: row for row in read_jsonl(out_file)}
    todo = [p for p in prompts if p["id"] not in done]
    if todo:
        # The model's own context only formats and tokenizes; the answers are decoded in the decoder's.
        llm = open_gguf(gguf, TOKENIZER_CTX, cfg.threads)
        try:
            requests, asked = [], []
            for prompt in todo:
                tokens, stop = chat_prompt(llm, [{"role": "user", "content": prompt["prompt"]}])
                n_prompt = len(llm.tokenize(prompt["prompt"].encode(), add_bos=False))
                if max(n_prompt + 32, len(tokens)) + cfg.max_tokens > cfg.n_ctx:
                    row = {"id": prompt["id"], "model": label, "skipped": "prompt_too_long"}
                    append_jsonl(out_file, row)
                    done[prompt["id"]] = row
                    continue
                requests.append(Request(tokens, cfg.max_tokens, answer_seed(cfg.seed, label, prompt["id"]), stop))
                asked.append(prompt)
            started, tokens_seen = time.time(), 0
            bar = tqdm(total=len(requests), desc=f"answers: {label}", unit="prompt", disable=None)
            # Each sequence gets the room these prompts need (at most n_ctx), so more fit in memory.
            with bar, BatchedDecoder(llm, cfg.parallel, context_for(requests, cfg.n_ctx), temperature=cfg.temperature,
                                     kv_unified=cfg.kv_unified) as decoder:
                if decoder.note:
                    tqdm.write(f"    {label}: {decoder.note}")
                for n, out in enumerate(decoder.run(requests), start=1):
                    prompt = asked[out.index]
                    row = {"id": prompt["id"], "model": label, "answer": out.text, "finish_reason": out.finish_reason,
                           "completion_tokens": len(out.tokens),
                           "repeated_3gram_fraction": repeated_ngram_fraction(out.text)}
                    if cfg.temperature > 0:
                        row["seed"] = requests[out.index].seed
                    append_jsonl(out_file, row)
                    done[prompt["id"]] = row
                    tokens_seen += len(out.tokens) + out.prompt_tokens
                    bar.update()
                    if n == 3 and len(requests) > 3:  # an estimate once the speed is known
                        rate, left = (time.time() - started) / 3, len(requests) - 3
                        tqdm.write(f"    {label}: about {rate * left:.0f} s left for {left} prompts "
                                   f"({tokens_seen / (time.time() - started):.0f} tokens/s)")
        finally:
            llm.close()
    return [done[p["id"]] for p in prompts]
