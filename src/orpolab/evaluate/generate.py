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
from orpolab.core.files import append_jsonl, file_sha256, read_jsonl, write_jsonl_atomic
from orpolab.core.llama_runtime import open_gguf
from orpolab.evaluate.batched import TOKENIZER_CTX
from orpolab.evaluate.store import Store, content_key


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


def answer_key(gguf_sha256: str, request, cfg: GenerationConfig) -> str:
    """What decides an answer (see :mod:`orpolab.evaluate.store`): the model file, the formatted prompt's
    token ids and stop strings, the budget, the temperature, the seed of a sampled answer, GPU offload."""
    sampled = cfg.temperature > 0
    return content_key("answer", gguf_sha256, request.tokens, list(request.stop), cfg.max_tokens,
                       float(cfg.temperature), request.seed if sampled else None, cfg.n_gpu_layers != 0)


def answer_prompts(gguf: Path, prompts: list[dict], out_file: Path, cfg: GenerationConfig, label: str,
                   store: Store | None = None, gguf_sha256: str | None = None) -> list[dict]:
    """Every prompt's answer, in prompt order: from ``out_file`` (a resumed run), the store, or generated.

    A saved answer is kept only when its key is the one this prompt, this GGUF and these settings make
    now (``gguf_sha256``: the file's hash, computed when not given): a new model at the same path or an
    edited prompt is answered afresh. Up to ``cfg.parallel`` answers are decoded together; each is
    appended (and synced) as soon as it is finished, so a kill loses only the answers still being
    written, and saved to the store. Prompts longer than the context window (minus the token budget)
    are skipped and recorded with ``skipped: "prompt_too_long"`` so they are counted, not silently lost.
    The answers file is rewritten at the end with exactly the current answers.
    """
    from orpolab.evaluate.batched import Request, chat_prompt

    store = store or Store(out_file.parent, "answers", enabled=False)
    gguf_sha256 = gguf_sha256 or file_sha256(gguf)
    saved = {row["id"]: row for row in read_jsonl(out_file)}
    done: dict = {}
    # The model's own context only formats and tokenizes; the answers are decoded in the decoder's.
    llm = open_gguf(gguf, TOKENIZER_CTX, cfg.threads, n_gpu_layers=cfg.n_gpu_layers)
    try:
        requests, asked = [], []
        for prompt in prompts:
            tokens, stop = chat_prompt(llm, [{"role": "user", "content": prompt["prompt"]}])
            n_prompt = len(llm.tokenize(prompt["prompt"].encode(), add_bos=False))
            if max(n_prompt + 32, len(tokens)) + cfg.max_tokens > cfg.n_ctx:
                done[prompt["id"]] = {"id": prompt["id"], "model": label, "skipped": "prompt_too_long"}
                continue
            request = Request(tokens, cfg.max_tokens, answer_seed(cfg.seed, label, prompt["id"]), stop)
            key = answer_key(gguf_sha256, request, cfg)
            row = saved.get(prompt["id"])
            if row is not None and row.get("key") == key:
                done[prompt["id"]] = row
                continue
            entry = store.get(key)
            if entry is not None:
                store.took(entry)
                done[prompt["id"]] = {"id": prompt["id"], "model": label, **entry["answer"], "key": key}
                append_jsonl(out_file, done[prompt["id"]])
                continue
            requests.append(request)
            asked.append((prompt, key))
        if requests:
            generate(llm, requests, asked, cfg, label, out_file, store, done)
    finally:
        llm.close()
    rows = [done[p["id"]] for p in prompts]
    write_jsonl_atomic(out_file, rows)  # exactly the current answers: none of an older model or prompt
    return rows


def generate(llm, requests: list, asked: list[tuple[dict, str]], cfg: GenerationConfig, label: str,
             out_file: Path, store: Store, done: dict) -> None:
    """Decode ``requests`` in batches; each answer appended to ``out_file`` and saved to the store as it ends."""
    from orpolab.evaluate.batched import BatchedDecoder, context_for

    started, tokens_seen = time.time(), 0
    bar = tqdm(total=len(requests), desc=f"answers: {label}", unit="prompt", disable=None)
    # Each sequence gets the room these prompts need (at most n_ctx), so more fit in memory.
    with bar, BatchedDecoder(llm, cfg.parallel, context_for(requests, cfg.n_ctx), temperature=cfg.temperature,
                             kv_unified=cfg.kv_unified) as decoder:
        if decoder.note:
            tqdm.write(f"    {label}: {decoder.note}")
        for n, out in enumerate(decoder.run(requests), start=1):
            prompt, key = asked[out.index]
            answer = {"answer": out.text, "finish_reason": out.finish_reason, "completion_tokens": len(out.tokens),
                      "repeated_3gram_fraction": repeated_ngram_fraction(out.text)}
            if cfg.temperature > 0:
                answer["seed"] = requests[out.index].seed
            row = {"id": prompt["id"], "model": label, **answer, "key": key}
            append_jsonl(out_file, row)
            done[prompt["id"]] = row
            # The seconds this answer cost, at this run's rate: what reusing it saves later.
            store.put(key, {"answer": answer, "seconds": (time.time() - started) / n})
            store.reuse.made += 1
            tokens_seen += len(out.tokens) + out.prompt_tokens
            bar.update()
            if n == 3 and len(requests) > 3:  # an estimate once the speed is known
                rate, left = (time.time() - started) / 3, len(requests) - 3
                tqdm.write(f"    {label}: about {rate * left:.0f} s left for {left} prompts "
                           f"({tokens_seen / (time.time() - started):.0f} tokens/s)")
