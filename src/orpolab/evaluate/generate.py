"""Answers to evaluation prompts from GGUF models, on the CPU, saved as they come (resumable).

Each model answers through its own chat template (llama-cpp-python's chat completion reads it
from the GGUF), greedily or with a recorded seed, within a token budget. For every answer we keep
what judges tend to miss: whether it ended by itself (``finish_reason == "stop"``) or ran into
the budget, its length in tokens, and how much it repeats itself.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from orpolab.core.config import GenerationConfig
from orpolab.core.files import append_jsonl, read_jsonl
from orpolab.export.llamacpp import open_gguf


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of word n-grams that already occurred earlier in the answer (0 = no repetition)."""
    words = text.split()
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)




def answer_prompts(gguf: Path, prompts: list[dict], out_file: Path, cfg: GenerationConfig, label: str) -> list[dict]:
    """Answer every prompt not yet in ``out_file``; returns all answers in prompt order.

    Prompts longer than the context window (minus the token budget) are skipped and recorded
    with ``skipped: "prompt_too_long"`` so they are counted, not silently lost.
    """
    done = {row["id"]: row for row in read_jsonl(out_file)}
    todo = [p for p in prompts if p["id"] not in done]
    if todo:
        llm = open_gguf(gguf, cfg.n_ctx, cfg.threads)
        try:
            started, tokens = time.time(), 0
            bar = tqdm(todo, desc=f"answers: {label}", unit="prompt", disable=None)
            for i, prompt in enumerate(bar):
                messages = [{"role": "user", "content": prompt["prompt"]}]
                n_prompt = len(llm.tokenize(prompt["prompt"].encode(), add_bos=False))
                if n_prompt + cfg.max_tokens + 32 > cfg.n_ctx:
                    row = {"id": prompt["id"], "model": label, "skipped": "prompt_too_long"}
                else:
                    out = llm.create_chat_completion(messages, max_tokens=cfg.max_tokens,
                                                     temperature=cfg.temperature, seed=cfg.seed)
                    text = out["choices"][0]["message"]["content"] or ""
                    row = {"id": prompt["id"], "model": label, "answer": text,
                           "finish_reason": out["choices"][0]["finish_reason"],
                           "completion_tokens": out["usage"]["completion_tokens"],
                           "repeated_3gram_fraction": repeated_ngram_fraction(text)}
                    tokens += row["completion_tokens"] + out["usage"]["prompt_tokens"]
                append_jsonl(out_file, row)
                done[prompt["id"]] = row
                if i == 2 and len(todo) > 3:  # an estimate once the speed is known
                    rate = (time.time() - started) / 3
                    tqdm.write(f"    {label}: about {rate * (len(todo) - 3):.0f} s left for {len(todo) - 3} prompts "
                               f"({tokens / (time.time() - started):.0f} tokens/s)")
        finally:
            llm.close()
    return [done[p["id"]] for p in prompts]
