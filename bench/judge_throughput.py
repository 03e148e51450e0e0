"""Judge throughput: Flow Judge verdicts per minute at Flow-Judge-v0.1's shapes on the CPU.

    python bench/judge_throughput.py               # Phi-3.5-mini shapes (3.8B), Q4_K_M; about 20 min on 2 cores

A random-weight Phi-3.5-mini (Flow-Judge-v0.1's base) is built, converted and quantized to Q4_K_M
(Flow Judge's own GGUF). The judge is orpolab's evaluation backend (``LlamaCppFlowJudge``: one
model load, grammar-constrained verdicts, threads from the machine) with flow-judge's own prompt
(RESPONSE_CORRECTNESS_5POINT: query, reference answer, response, rubric) on realistic questions
and answers. Two orders are timed:

- **shared prefix reused**: both answers to a question judged back to back, as the evaluation
  stage does; llama-cpp-python keeps the previous prompt's KV cache and evaluates only the part
  after the longest common prefix (flow-judge's prompt has the question before the answer);
- **no reuse**: the KV cache cleared before every verdict.

Random weights write random (but grammatical) verdicts, so the feedback length is bounded and
fixed by ``--feedback-chars`` to keep generation time comparable between the two orders.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import DEFAULT_OUT, ROOT, cores, fmt, summary, write_section
from models import build_ggufs, build_hf

PRESETS = {
    "phi35mini": {"shape": "phi35mini", "questions": 3, "feedback_chars": 120},
    "tiny": {"shape": "tiny_phi", "questions": 2, "feedback_chars": 20},
}
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
    args = parser.parse_args()
    p = PRESETS[args.preset]
    import llama_cpp
    from flow_judge import EvalInput, FlowJudge

    from orpolab.evaluate.judge import LlamaCppFlowJudge, metric_by_name

    metric = metric_by_name("RESPONSE_CORRECTNESS_5POINT")
    with tempfile.TemporaryDirectory(prefix="orpolab-bench-") as tmp:
        work = Path(tmp)
        print(f"building a random model at {p['shape']} shapes ...", flush=True)
        hf_dir = build_hf(p["shape"], work / "hf", dtype="bfloat16")
        gguf = build_ggufs(hf_dir, work / "gguf", [args.quant], f"{p['shape']}-random")[args.quant]
        for f in (work / "gguf").glob("*-f16.gguf"):
            f.unlink()  # only the judge's quantization is needed from here on
        backend = LlamaCppFlowJudge(gguf, [r.score for r in metric.rubric], max_tokens=0,
                                    max_feedback_chars=p["feedback_chars"], n_ctx=4096, name="random judge")
        judge = FlowJudge(metric=metric, model=backend, output_dir=str(work / "fj"))
        items = [(q, ref, a) for q, ref in QUESTIONS[: p["questions"]] for a in answers(ref)]
        prompts = [judge._format_prompt(EvalInput(inputs=[{"query": q}, {"reference_answer": ref}],
                                                  output={"response": a})) for q, ref, a in items]
        llm = backend.llm
        # The prompts as Flow Judge's real (Phi-3) tokenizer sees them, chat template included: the
        # random model's own tokenizer is a tiny one built here and would make them 3x longer.
        ids = [real_tokens(pr) for pr in prompts]
        lengths = [len(x) for x in ids]
        shared = [shared_prefix(ids[i], ids[i + 1]) for i in range(0, len(ids), 2)]
        verdict(llm, backend, ids[0][:32])  # warm-up: page the weights in
        timings: dict[str, list[float]] = {"no reuse": [], "shared prefix reused": []}
        perf: dict[str, list[dict]] = {"no reuse": [], "shared prefix reused": []}
        parsed = 0
        try:
            for mode in ("no reuse", "shared prefix reused"):
                for i, tokens in enumerate(ids):
                    if mode == "no reuse" or i == 0:  # the first question starts cold in both modes
                        llm.reset()
                    llama_cpp.llama_perf_context_reset(llm.ctx)
                    t0 = time.perf_counter()
                    raw = verdict(llm, backend, tokens)
                    timings[mode].append(time.perf_counter() - t0)
                    d = llama_cpp.llama_perf_context(llm.ctx)
                    # Prompt tokens go through batched decodes (p_eval), generated ones one at a time (eval).
                    perf[mode].append({"prompt_tokens": d.n_p_eval, "prompt_s": d.t_p_eval_ms / 1e3,
                                       "gen_tokens": d.n_eval, "gen_s": d.t_eval_ms / 1e3})
                    parsed += "<score>" in raw
                    print(f"{mode}: verdict in {timings[mode][-1]:.1f} s ({perf[mode][-1]})", flush=True)
        finally:
            backend.close()
    report(args, p, timings, perf, lengths, shared, parsed, len(prompts) * 2)


def real_tokens(prompt: str) -> list[int]:
    """Phi-3.5's chat template and tokenizer (llama.cpp's vocabulary-only Phi-3 GGUF, from the sdist)."""
    from llama_cpp import Llama

    from orpolab.export.llamacpp import converter_dir

    global _VOCAB
    if "_VOCAB" not in globals():
        path = converter_dir(ROOT / ".cache") / "models" / "ggml-vocab-phi-3.gguf"
        _VOCAB = Llama(model_path=str(path), vocab_only=True, verbose=False)
    text = f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
    return _VOCAB.tokenize(text.encode(), add_bos=True, special=True)


def verdict(llm, backend, tokens: list[int]) -> str:
    """One grammar-constrained verdict from token ids (llama-cpp-python reuses the cached common prefix)."""
    out = llm.create_completion(tokens, max_tokens=backend.max_tokens, temperature=0.0, grammar=backend.grammar)
    return out["choices"][0]["text"]


def shared_prefix(ta: list[int], tb: list[int]) -> int:
    n = 0
    for x, y in zip(ta, tb, strict=False):
        if x != y:
            break
        n += 1
    return n


def report(args, p: dict, timings: dict, perf: dict, lengths: list[int], shared: list[int], parsed: int,
           total: int, verdict_tokens: int = 150) -> None:
    """Measured verdicts per minute, and the same for a typical verdict length from the measured speeds.

    A random-weight judge writes feedback of random length, so the raw verdict rate mixes the
    prompt cost with however long it rambled; the estimate uses a fixed 150-token verdict (a few
    sentences of feedback and the score, Flow Judge's usual size).
    """
    all_perf = perf["no reuse"] + perf["shared prefix reused"]
    pp_tps = sum(x["prompt_tokens"] for x in all_perf) / sum(x["prompt_s"] for x in all_perf)
    tg_tps = sum(x["gen_tokens"] for x in all_perf) / max(1e-9, sum(x["gen_s"] for x in all_perf))
    rows = []
    for mode in timings:
        raw_rate = 60 * len(timings[mode]) / sum(timings[mode])
        prompt_tokens = summary([x["prompt_tokens"] for x in perf[mode]])
        prompt_s = sum(x["prompt_tokens"] for x in perf[mode]) / len(perf[mode]) / pp_tps
        estimate = 60 / (prompt_s + verdict_tokens / tg_tps)
        rows.append((mode, raw_rate, prompt_tokens, prompt_s, estimate))
    (_, _, _, cold_s, cold_rate), (_, _, _, warm_s, warm_rate) = rows
    body = "\n".join([
        "## Judge throughput: Flow Judge at Flow-Judge-v0.1's shapes on the CPU", "",
        f"Command: `python bench/judge_throughput.py --preset {args.preset}`. Random-weight {p['shape']} in "
        f"{args.quant} through orpolab's `LlamaCppFlowJudge` ({cores()} threads, one model load), flow-judge's "
        f"RESPONSE_CORRECTNESS_5POINT prompt in Phi-3.5's chat template, counted with Phi-3's tokenizer; "
        f"{p['questions']} questions x 2 answers; prompts "
        f"{min(lengths)}–{max(lengths)} tokens, of which the two answers to a question share the first "
        f"{min(shared)}–{max(shared)} (instructions and question; the rubric comes after the answer, so it cannot "
        f"be shared); feedback bounded to {p['feedback_chars']} characters by the grammar; {parsed}/{total} "
        f"verdicts parsed. Measured speeds: prompt {pp_tps:.1f} tokens/s, generation {tg_tps:.2f} tokens/s.", "",
        "| order | verdicts/min measured | prompt tokens evaluated per verdict | prompt seconds per verdict | "
        f"verdicts/min for a {verdict_tokens}-token verdict |", "|---|---|---|---|---|",
        *[f"| {m} | {r:.2f} | {fmt(pt, 0)} | {ps:.1f} | {e:.2f} |" for m, r, pt, ps, e in rows], "",
        f"Judging both answers to a question back to back (as the evaluation stage does) reuses the question's KV "
        f"cache: {1 - warm_s / cold_s:.0%} less prompt time per verdict, {warm_rate / cold_rate:.2f}x verdicts per "
        f"minute at a typical verdict length. A cold verdict spends {cold_s:.1f} s on its prompt and "
        f"{verdict_tokens / tg_tps:.1f} s writing {verdict_tokens} tokens, so "
        + ("the bounded feedback length (`evaluation.judge.max_feedback_chars`) is the main lever."
           if verdict_tokens / tg_tps > cold_s else "the prompt is the main cost."),
    ])
    write_section(f"judge-{args.preset}", body, args.out,
                  raw={"preset": p, "timings": timings, "perf": perf, "prompt_tokens": lengths,
                       "shared_prefix": shared, "prompt_tps": pp_tps, "gen_tps": tg_tps})
    print(body)


if __name__ == "__main__":
    main()
