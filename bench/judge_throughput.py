"""Judge throughput: Flow Judge verdicts per minute at Flow-Judge-v0.1's shapes on the CPU, 1 to 8 per batch.

    python bench/judge_throughput.py               # Phi-3.5-mini shapes (3.8B), Q4_K_M; about 30 min on 2 cores
    python bench/judge_throughput.py --gguf F      # the same with a GGUF built before (skips the 7 min build)

A random-weight Phi-3.5-mini (Flow-Judge-v0.1's base) is built, converted and quantized to Q4_K_M
(Flow Judge's own GGUF). Verdicts are decoded as the evaluation decodes them
(``orpolab.evaluate.batched.BatchedDecoder`` with orpolab's verdict grammar, the KV cache sized to
the prompts) on flow-judge's own prompt (RESPONSE_CORRECTNESS_5POINT: query, reference answer,
response, rubric) for realistic questions and answers, two answers per question judged back to back
(the second copies the question's KV cache), tokenized by Phi-3's real tokenizer. The same verdicts
are decoded with 1, 2, 4 and 8 sequences per batch (split KV cache, the default), and with one
unified cache at 4.

Every verdict is 150 tokens, a typical Flow Judge verdict: random weights keep writing grammatical
feedback until the budget (the feedback may be 600 characters long), so the budget is the length.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from batched_decode import PARALLEL, bound_seconds, divergence, file_bytes, gen_rate, prompt_rate, run_setting
from common import DEFAULT_OUT, ROOT, cores, write_section
from models import memory_bandwidth_gbs, random_gguf

PRESETS = {
    # 8 verdicts: every setting pays their prompts (about 5,700 tokens at 41 tokens/s on 2 idle cores).
    "phi35mini": {"shape": "phi35mini", "questions": 4, "verdict_tokens": 150},
    "tiny": {"shape": "tiny_phi", "questions": 2, "verdict_tokens": 20},
}
FEEDBACK_CHARS = 600  # evaluation.judge.max_feedback_chars
# Before batched decoding (BENCHMARKS.md, judge-phi35mini, another day): verdicts/min for a 150-token
# verdict, the question's cache reused.
BEFORE_RATE = 1.90

QUESTIONS = [
    ("Explain why the sky appears blue during the day but red and orange at sunset.",
     "Sunlight is scattered by air molecules, and shorter (blue) wavelengths scatter much more (Rayleigh "
     "scattering), so blue light reaches us from all directions. At sunset light crosses far more air, most blue is "
     "scattered away before it arrives, and the remaining reds and oranges dominate."),
    ("A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 30 cookies? Show the reasoning.",
     "30 cookies is 2.5 times 12 cookies, so 3 x 2.5 = 7.5 eggs; in practice use 7 or 8 eggs."),
    ("What is the difference between a process and a thread in an operating system?",
     "A process has its own address space and resources; threads are units of execution inside a process that "
     "share its memory and resources, so they are cheaper to create and switch but need synchronisation."),
    ("Summarise the main causes of the French Revolution in three sentences.",
     "Fiscal crisis from war debts and an unfair tax system burdened the Third Estate. Enlightenment ideas "
     "challenged absolute monarchy and privilege. Bad harvests and high bread prices turned discontent into revolt."),
]


def answers(reference: str) -> list[str]:
    """Two answers per question, a better and a worse one, of realistic length."""
    return [reference + " In short, the explanation above covers the key points and the reasoning behind them.",
            "I think it is mostly about " + reference.split(",")[0].lower() + ", but I am not completely sure "
            "about the details, and there may be other factors that also matter here."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="phi35mini")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gguf", type=Path, help="a random-weight GGUF of the preset's shape built before")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    from flow_judge import EvalInput, FlowJudge

    from orpolab.core.llama_runtime import open_gguf
    from orpolab.evaluate.batched import Request, context_for, kv_bytes_per_token
    from orpolab.evaluate.judge import metric_by_name, verdict_grammar

    metric = metric_by_name("RESPONSE_CORRECTNESS_5POINT")
    with tempfile.TemporaryDirectory(prefix="orpolab-bench-") as tmp:
        work = Path(tmp)
        gguf = args.gguf or random_gguf(p["shape"], work, args.quant)
        judge = FlowJudge(metric=metric, model=formatter(), output_dir=str(work / "fj"))
        items = [(q, ref, a) for q, ref in QUESTIONS[: p["questions"]] for a in answers(ref)]
        prompts = [judge._format_prompt(EvalInput(inputs=[{"query": q}, {"reference_answer": ref}],
                                                  output={"response": a})) for q, ref, a in items]
        # The prompts as Flow Judge's real (Phi-3) tokenizer sees them, chat template included: the
        # random model's own tokenizer is a tiny one built here and would make them 3x longer.
        ids = real_tokens(prompts)
        requests = [Request(x, p["verdict_tokens"]) for x in ids]
        n_ctx_seq = context_for(requests, 4096)  # as the judge sizes it
        grammar = verdict_grammar([r.score for r in metric.rubric], FEEDBACK_CHARS)
        llm = open_gguf(gguf, 256)
        try:
            kv_per_token = kv_bytes_per_token(llm.metadata)
            bandwidth = memory_bandwidth_gbs() * 1e9
            pp_tps = prompt_rate(llm, n_ctx_seq)
            gen_tps = prompt_rate(llm, n_ctx_seq, all_logits=True)
            print(f"prompt rate {pp_tps:.1f} tokens/s, generated-token compute rate {gen_tps:.1f} tokens/s, "
                  f"bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
            runs = []
            # No more sequences per batch than verdicts: a larger setting would decode the same batches.
            settings = [(n, False) for n in PARALLEL if n <= len(requests)] + [(min(4, len(requests)), True)]
            for parallel, unified in settings:
                runs.append(run_setting(llm, requests, parallel, n_ctx_seq, grammar, kv_unified=unified))
                print({k: v for k, v in runs[-1].items() if k != "tokens"}, flush=True)
            weight_bytes = file_bytes(gguf)
        finally:
            llm.close()
    report(args, p, runs, ids, pp_tps, gen_tps, bandwidth, weight_bytes, kv_per_token)


def formatter():
    """A flow-judge model that writes nothing: flow-judge only formats prompts here (the decoder writes)."""
    from flow_judge.models.common import BaseFlowJudgeModel

    class Formatter(BaseFlowJudgeModel):
        def _generate(self, prompt: str) -> str:
            raise NotImplementedError

        def _batch_generate(self, prompts, use_tqdm=True, **kwargs):
            raise NotImplementedError

    return Formatter(model_id="formatter", model_type="none", generation_params={})


def real_tokens(prompts: list[str]) -> list[list[int]]:
    """Phi-3.5's chat template and tokenizer (llama.cpp's vocabulary-only Phi-3 GGUF, from the sdist)."""
    from orpolab.core.llama_runtime import open_gguf
    from orpolab.export.llamacpp import converter_dir

    path = converter_dir(ROOT / ".cache") / "models" / "ggml-vocab-phi-3.gguf"
    vocab = open_gguf(path, 64, vocab_only=True)
    try:
        return [vocab.tokenize(f"<|user|>\n{p}<|end|>\n<|assistant|>\n".encode(), add_bos=True, special=True)
                for p in prompts]
    finally:
        vocab.close()  # now: at interpreter exit llama-cpp-python can no longer free it


def report(args, p: dict, runs: list[dict], ids: list[list[int]], pp_tps: float, gen_tps: float, bandwidth: float,
           weight_bytes: int, kv_per_token: int) -> None:
    """Verdicts per minute measured and bound per setting, against one verdict at a time."""
    n = len(ids)
    lengths = [len(x) for x in ids]
    reference = runs[0]
    rows = []
    for run in runs:
        measured = 60 * n / run["seconds"]
        mean_ctx = sum(lengths) / n + run["gen_tokens"] / n / 2
        bound = 60 * n / bound_seconds(run, pp_tps, weight_bytes, kv_per_token, bandwidth, mean_ctx, gen_tps)
        rows.append((run, measured, bound, gen_rate(run, pp_tps), divergence(run, reference)))
    base = rows[0][1]
    best = max(rows, key=lambda r: r[1])
    ceiling = 60 * n / (reference["prompt_tokens"] / pp_tps + reference["gen_tokens"] / gen_tps)
    table = [f"| {r['parallel']} | {'unified' if r['kv_unified'] else 'split'} | {m:.2f} | {b:.2f} | {m / b:.0%} | "
             f"{m / base:.2f}x | {g:.1f} | {r['prompt_tokens'] / n:.0f} | {r['gen_tokens'] / n:.0f} | {d:.0%} |"
             for r, m, b, g, d in rows]
    body = "\n".join([
        "## Judge throughput, batched: verdicts per llama.cpp batch at Flow-Judge-v0.1's shapes", "",
        f"Command: `python bench/judge_throughput.py --preset {args.preset}`. Random-weight {p['shape']} in "
        f"{args.quant}, decoded by orpolab's `BatchedDecoder` with the verdict grammar ({cores()} threads), "
        f"flow-judge's RESPONSE_CORRECTNESS_5POINT prompt in Phi-3.5's chat template, counted with Phi-3's "
        f"tokenizer; {p['questions']} questions x 2 answers = {n} verdicts per setting (the same for every "
        f"setting), prompts {min(lengths)}–{max(lengths)} tokens, {p['verdict_tokens']}-token verdicts. "
        f"Measured in this run: prompt {pp_tps:.1f} tokens/s (one 512-token batch), generated tokens at most "
        f"{gen_tps:.1f} tokens/s (the same batch with every token's logits), memory bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 2**30:.2f} GiB, KV cache "
        f"{kv_per_token / 1024:.0f} KiB per token. Bound: prompt tokens at the measured prompt rate plus, per "
        "generation step, the slower of one pass over the weights and the sequences' caches at the measured "
        "bandwidth and the step's tokens at the generated-token rate.", "",
        "| sequences per batch | KV cache | verdicts/min | bound | of bound | vs 1 per batch | "
        "generation alone, tokens/s | prompt tokens decoded per verdict | tokens per verdict | "
        "differ from 1 per batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *table, "",
        f"Best: {best[0]['parallel']} per batch ({'unified' if best[0]['kv_unified'] else 'split'} cache), "
        f"{best[1]:.2f} verdicts/min: {best[1] / base:.2f}x one verdict at a time in this run, "
        f"{best[1] / BEFORE_RATE:.2f}x the {BEFORE_RATE:.2f} measured before batching (the section below, another "
        f"day) and {best[1] / best[2]:.0%} of its bound. A verdict differs from the one-at-a-time verdict only "
        "where a batch's other summation order breaks a near tie (random weights make ties common; see "
        f"tests/test_batched.py). No number of verdicts per batch can pass {ceiling:.2f} verdicts/min here "
        f"({ceiling / base:.2f}x one at a time): the prompts at the prompt rate and every verdict token at the "
        "generated-token rate, the compute 2 cores have.",
    ])
    raw = {"preset": p, "prompt_tps": pp_tps, "gen_compute_tps": gen_tps, "bandwidth": bandwidth,
           "weight_bytes": weight_bytes, "kv_per_token": kv_per_token, "prompt_tokens": lengths, "ceiling": ceiling,
           "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
           "rows": [{"measured": m, "bound": b, "generation": g, "divergence": d} for _, m, b, g, d in rows]}
    write_section(f"judge-batched-{args.preset}", body, args.out, raw=raw)
    print(body)


if __name__ == "__main__":
    main()
