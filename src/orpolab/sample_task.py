"""The bundled sample task: small arithmetic questions whose answers a program can check.

The data follows ``mlabonne/orpo-dpo-mix-40k``'s schema (``chosen``/``rejected`` are lists of
``{role, content}`` messages including the user turn, plus ``prompt`` and ``question``), so the
offline demo exercises exactly the loading code that the real dataset goes through.

Chosen answers are correct and stop; rejected answers are either wrong (an off-by-a-little sum)
or correct but fail to stop (the sentence repeats), the two failure modes preference alignment
is meant to remove. Regenerate with ``python -m orpolab.sample_task data/sample``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def answer_text(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {op} {b} = {result}. The answer is {result}."


def extract_answer(text: str) -> int | None:
    """The first stated answer in a response, or None when it states none."""
    match = ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def is_correct(text: str, expected: int) -> bool:
    """Exact-answer check used for the objective score: the first stated answer is right."""
    return extract_answer(text) == expected


def _pair(rng: random.Random, a: int, op: str, b: int) -> dict:
    result = OPS[op](a, b)
    q = question(a, op, b)
    good = answer_text(a, op, b, result)
    if rng.random() < 0.5:
        wrong = result + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
        bad = answer_text(a, op, b, wrong)
        kind = "wrong"
    else:
        bad = " ".join([good] * rng.randint(3, 6))
        kind = "no_stop"
    user = {"role": "user", "content": q}
    return {
        "source": f"orpolab-arithmetic/{kind}",
        "prompt": q,
        "question": q,
        "chosen": [user, {"role": "assistant", "content": good}],
        "rejected": [user, {"role": "assistant", "content": bad}],
        "answer": result,
    }


def generate(seed: int = 0, max_operand: int = 30) -> dict[str, list[dict]]:
    """Disjoint question sets: train pairs, held-out pairs, held-out prompts, SFT warm-up rows."""
    rng = random.Random(seed)
    triples = [(a, op, b) for a in range(max_operand) for b in range(max_operand) for op in OPS if op == "+" or a >= b]
    rng.shuffle(triples)
    splits = {"train": triples[:600], "eval": triples[600:700], "prompts": triples[700:800], "sft": triples[800:1200]}
    out: dict[str, list[dict]] = {}
    for name, items in splits.items():
        if name == "prompts":
            out[name] = [{"prompt": question(*t), "answer": OPS[t[1]](t[0], t[2])} for t in items]
        elif name == "sft":
            out[name] = [
                {"messages": [{"role": "user", "content": question(*t)},
                              {"role": "assistant", "content": answer_text(*t, OPS[t[1]](t[0], t[2]))}],
                 "answer": OPS[t[1]](t[0], t[2])}
                for t in items
            ]
        else:
            out[name] = [_pair(rng, *t) for t in items]
    return out


def write(folder: str | Path, seed: int = 0) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in generate(seed).items():
        tmp = folder / f".{name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, folder / f"{name}.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data/sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.folder, args.seed)


if __name__ == "__main__":
    main()
