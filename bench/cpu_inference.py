"""CPU inference: exported GGUFs in llama-cpp-python against Hugging Face ``generate``, same prompts and threads.

    python bench/cpu_inference.py                 # Llama-3.2-1B shapes, writes BENCHMARKS.md (about 10 min)

A random-weight model at Llama-3.2-1B's shapes stands in for the merged winner (speed does not
depend on the weights' values): it is saved as the export saves a merged model, converted with
llama.cpp's converter and quantized with ``llama_model_quantize`` (f16, Q8_0, Q4_K_M), and also
loaded by transformers in float32 and bfloat16. Each runs the same prompts with the same thread
count: prompt processing (tokens/s over the prompt) and generation (tokens/s over a fixed number
of greedy tokens). The memory-bandwidth bound for generation is the machine's measured copy
bandwidth over the bytes of weights read per generated token.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import DEFAULT_OUT, cores, fmt, summary, write_section
from models import SHAPES, build_ggufs, build_hf, memory_bandwidth_gbs

PRESETS = {
    "llama1b": {"shape": "llama1b", "prompt_tokens": 128, "new_tokens": 32, "prompts": 3},
    "tiny": {"shape": "tiny_llama", "prompt_tokens": 16, "new_tokens": 4, "prompts": 1},
}


def prompt_ids(tokenizer, n: int, count: int) -> list[list[int]]:
    """``count`` different prompts of exactly ``n`` token ids (BOS first)."""
    import random

    rng = random.Random(0)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    return [[tokenizer.bos_token_id] + [rng.choice(vocab) for _ in range(n - 1)] for _ in range(count)]


def bench_gguf(path: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    from orpolab.core.llama_runtime import open_gguf

    llm = open_gguf(path, max(len(p) for p in prompts) + new_tokens + 8, threads, n_batch=512)
    pp, tg = [], []
    try:
        llm.reset()
        llm.eval(prompts[0][:8])  # warm-up: page the weights in
        for ids in prompts:
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            pp.append(len(ids) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                token = int(llm.scores[llm.n_tokens - 1].argmax())  # greedy
                llm.eval([token])
            tg.append(new_tokens / (time.perf_counter() - t0))
    finally:
        llm.close()
    return {"prompt_tps": summary(pp), "gen_tps": summary(tg), "weight_bytes": path.stat().st_size}


def bench_hf(folder: Path, dtype: str, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    pp, tg = [], []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False)  # warm-up
        for ids in prompts:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            out = model(input_ids=x, use_cache=True)
            prefill = time.perf_counter() - t0
            pp.append(len(ids) / prefill)
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            total = time.perf_counter() - t0
            tg.append(new_tokens / max(1e-9, total - prefill))  # generate() also runs the prefill once
            del out
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prompt_tps": summary(pp), "gen_tps": summary(tg), "weight_bytes": n_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama1b")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="orpolab-bench-") as tmp:
        work = Path(tmp)
        print(f"building a random model at {p['shape']} shapes ...", flush=True)
        hf_dir = build_hf(p["shape"], work / "hf", dtype="bfloat16")
        ggufs = build_ggufs(hf_dir, work / "gguf", ["Q8_0", "Q4_K_M"], f"{p['shape']}-random")
        prompts = prompt_ids(AutoTokenizer.from_pretrained(hf_dir), p["prompt_tokens"], p["prompts"])
        bandwidth = memory_bandwidth_gbs()
        print(f"memory bandwidth (copy, {args.threads} threads): {bandwidth:.1f} GB/s", flush=True)
        rows = {}
        for q, path in ggufs.items():
            rows[f"llama.cpp {q}"] = bench_gguf(path, prompts, p["new_tokens"], args.threads)
            print(f"llama.cpp {q}: {rows[f'llama.cpp {q}']['gen_tps']['median']:.1f} tokens/s generated", flush=True)
        for dtype in ("float32", "bfloat16"):
            rows[f"transformers {dtype}"] = bench_hf(hf_dir, dtype, prompts, p["new_tokens"], args.threads)
            print(f"transformers {dtype}: {rows[f'transformers {dtype}']['gen_tps']['median']:.1f} tokens/s "
                  "generated", flush=True)
    report(args, p, rows, bandwidth)


def report(args, p: dict, rows: dict, bandwidth: float) -> None:
    base = rows["transformers float32"]
    shape = SHAPES[p["shape"]]
    lines = [
        "## CPU inference: GGUF in llama-cpp-python vs Hugging Face transformers", "",
        f"Command: `python bench/cpu_inference.py --preset {args.preset}`. Random weights at {p['shape']} shapes "
        f"(hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocabulary {shape['vocab_size']:,}); "
        f"{p['prompts']} prompts of {p['prompt_tokens']} tokens, {p['new_tokens']} greedy tokens each; "
        f"{args.threads} threads for both; median (min–max) over the prompts. Bound: measured copy bandwidth "
        f"{bandwidth:.1f} GB/s divided by the weight bytes read per generated token.", "",
        "| runtime | weights (GiB) | prompt tokens/s | generated tokens/s | vs transformers fp32 | bandwidth bound "
        "(tokens/s) | share of bound |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        bound = bandwidth * 1e9 / r["weight_bytes"]
        lines.append(f"| {name} | {r['weight_bytes'] / 2**30:.2f} | {fmt(r['prompt_tps'])} | {fmt(r['gen_tps'], 2)} | "
                     f"{r['gen_tps']['median'] / base['gen_tps']['median']:.1f}x | {bound:.1f} | "
                     f"{r['gen_tps']['median'] / bound:.0%} |")
    body = "\n".join(lines)
    write_section(f"inference-{args.preset}", body, args.out, raw={"preset": p, "bandwidth_gbs": bandwidth,
                                                                   "rows": rows, "threads": args.threads})
    print(body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
