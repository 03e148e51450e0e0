"""Answer throughput: the evaluation's answers at Llama-3.2-1B's shapes on the CPU, 1 to 32 per llama.cpp batch.

    python bench/answer_throughput.py              # Llama-3.2-1B shapes, Q4_K_M; about 15 min on 2 cores
    python bench/answer_throughput.py --gguf F     # the same with a GGUF built before (skips the build)

A random-weight Llama-3.2-1B is built, converted and quantized to Q4_K_M (the winner's GGUF in the
evaluation). The same prompts, in the model's chat template, are answered as the generate stage
answers them (``orpolab.evaluate.batched.BatchedDecoder``, greedy, the stage's default budget of 128
tokens, the KV cache sized to the prompts) with 1, 2, 4, 8, 16 and 32 sequences per batch (split KV
cache, the default) and with one unified cache at 16. Reported: answer tokens per second, the bound
from the same run (prompts at the measured prompt rate; each generation step the slower of one pass
over the weights and caches at the measured bandwidth and its tokens at the measured rate of
generated tokens), the most any batch size could reach, and how many answers differ, token for
token, from those decoded one at a time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from batched_decode import ANSWER_PARALLEL, bound_seconds, divergence, file_bytes, gen_rate, prompt_rate, run_setting
from common import DEFAULT_OUT, cores, write_section
from models import memory_bandwidth_gbs, random_gguf

PRESETS = {
    # 32 prompts x 128 tokens (evaluation.generation.max_tokens): enough to fill 32 sequences per batch.
    "llama1b": {"shape": "llama1b", "prompts": 32, "max_tokens": 128},
    "tiny": {"shape": "tiny_llama", "prompts": 8, "max_tokens": 16},
}
PROMPTS = [
    "Explain why the sky appears blue during the day but red and orange at sunset.",
    "A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 30 cookies? Show the reasoning.",
    "What is the difference between a process and a thread in an operating system?",
    "Summarise the main causes of the French Revolution in three sentences.",
    "Write a short, polite email declining a meeting invitation for next Tuesday.",
    "List three ways to reduce the memory used by a Python program that reads a large CSV file.",
    "Translate 'the weather is lovely today' into French and German.",
    "Give two arguments for and two against a four-day working week.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama1b")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gguf", type=Path, help="a random-weight GGUF of the preset's shape built before")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    from orpolab.core.llama_runtime import open_gguf
    from orpolab.evaluate.batched import Request, chat_prompt, context_for, kv_bytes_per_token

    with tempfile.TemporaryDirectory(prefix="orpolab-bench-") as tmp:
        work = Path(tmp)
        gguf = args.gguf or random_gguf(p["shape"], work, args.quant)
        llm = open_gguf(gguf, 256)
        try:
            # Numbered, so that the prompts differ beyond the shared chat template as real ones do.
            texts = [f"({i + 1}) {PROMPTS[i % len(PROMPTS)]}" for i in range(p["prompts"])]
            requests = [Request(chat_prompt(llm, [{"role": "user", "content": t}])[0], p["max_tokens"]) for t in texts]
            n_ctx_seq = context_for(requests, 2048)  # as the generate stage sizes it
            kv_per_token = kv_bytes_per_token(llm.metadata)
            bandwidth = memory_bandwidth_gbs() * 1e9
            pp_tps = prompt_rate(llm, 1024)
            gen_tps = prompt_rate(llm, 1024, all_logits=True)
            print(f"prompt rate {pp_tps:.1f} tokens/s, generated-token compute rate {gen_tps:.1f} tokens/s, "
                  f"bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
            runs = []
            # No more sequences per batch than prompts: a larger setting would decode the same batches.
            settings = [(n, False) for n in ANSWER_PARALLEL if n <= len(requests)] + [(min(16, len(requests)), True)]
            for parallel, unified in settings:
                runs.append(run_setting(llm, requests, parallel, n_ctx_seq, kv_unified=unified))
                print({k: v for k, v in runs[-1].items() if k != "tokens"}, flush=True)
            weight_bytes = file_bytes(gguf)
        finally:
            llm.close()
    report(args, p, runs, [len(r.tokens) for r in requests], pp_tps, gen_tps, bandwidth, weight_bytes, kv_per_token)


def report(args, p: dict, runs: list[dict], lengths: list[int], pp_tps: float, gen_tps: float, bandwidth: float,
           weight_bytes: int, kv_per_token: int) -> None:
    """Answer tokens per second measured and bound per setting, against one answer at a time."""
    n = len(lengths)
    rows = []
    for run in runs:
        measured = run["gen_tokens"] / run["seconds"]
        mean_ctx = sum(lengths) / n + run["gen_tokens"] / n / 2
        bound = run["gen_tokens"] / bound_seconds(run, pp_tps, weight_bytes, kv_per_token, bandwidth, mean_ctx, gen_tps)
        rows.append((run, measured, bound, gen_rate(run, pp_tps), divergence(run, runs[0])))
    base = rows[0][1]
    best = max(rows, key=lambda r: r[1])
    ref = runs[0]
    ceiling = ref["gen_tokens"] / (ref["prompt_tokens"] / pp_tps + ref["gen_tokens"] / gen_tps)
    table = [f"| {r['parallel']} | {'unified' if r['kv_unified'] else 'split'} | {m:.1f} | {b:.1f} | {m / b:.0%} | "
             f"{g:.1f} | {m / base:.2f}x | {d:.0%} |" for r, m, b, g, d in rows]
    body = "\n".join([
        "## Answer throughput, batched: answers per llama.cpp batch at Llama-3.2-1B's shapes", "",
        f"Command: `python bench/answer_throughput.py --preset {args.preset}`. Random-weight {p['shape']} in "
        f"{args.quant}, decoded by orpolab's `BatchedDecoder` as the generate stage does (greedy, {cores()} "
        f"threads); {n} prompts in the model's chat template ({min(lengths)}–{max(lengths)} tokens), "
        f"{p['max_tokens']} answer tokens each, the same for every setting. Measured in this run: prompt "
        f"{pp_tps:.1f} tokens/s (one 512-token batch), generated tokens at most {gen_tps:.1f} tokens/s (the same "
        f"batch with every token's logits), memory bandwidth {bandwidth / 1e9:.1f} GB/s; weights "
        f"{weight_bytes / 2**30:.2f} GiB, KV cache {kv_per_token / 1024:.0f} KiB per token. Answer tokens/s count "
        "the whole run (prompts included); the bound is prompts at the measured prompt rate plus, per generation "
        "step, the slower of one pass over the weights and the caches at the measured bandwidth and the step's "
        "tokens at the generated-token rate.", "",
        "| sequences per batch | KV cache | answer tokens/s | bound | of bound | generation alone, tokens/s | "
        "vs 1 per batch | answers differing from 1 per batch |", "|---|---|---|---|---|---|---|---|",
        *table, "",
        f"Best: {best[0]['parallel']} per batch ({'unified' if best[0]['kv_unified'] else 'split'} cache), "
        f"{best[1]:.1f} answer tokens/s, {best[1] / base:.2f}x one answer at a time (what the generate stage did "
        f"before batching) and {best[1] / best[2]:.0%} of its bound. No number of sequences per batch can pass "
        f"{ceiling:.1f} answer tokens/s here ({ceiling / base:.2f}x one at a time): the prompts at the prompt rate "
        "and every answer token at the generated-token rate, the compute 2 cores have.",
    ])
    raw = {"preset": p, "prompt_tps": pp_tps, "gen_compute_tps": gen_tps, "bandwidth": bandwidth,
           "weight_bytes": weight_bytes, "kv_per_token": kv_per_token, "prompt_tokens": lengths, "ceiling": ceiling,
           "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
           "rows": [{"measured": m, "bound": b, "generation": g, "divergence": d} for _, m, b, g, d in rows]}
    write_section(f"answers-batched-{args.preset}", body, args.out, raw=raw)
    print(body)


if __name__ == "__main__":
    main()
