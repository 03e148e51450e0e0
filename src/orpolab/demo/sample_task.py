"""The bundled sample task: questions whose answers a program can check.

Each question names a few variables and their values and asks for one of them ("Let p = 17,
k = 42 and w = 8. What is k?"); the answer restates it ("k = 42. The answer is 42."). A tiny model
can learn this look-up from a few hundred examples, so the offline demo shows real learning, and
``extract_answer``/``is_correct`` check any answer exactly.

The data follows ``mlabonne/orpo-dpo-mix-40k``'s schema (``chosen``/``rejected`` are lists of
``{role, content}`` messages including the user turn, plus ``prompt`` and ``question``), so the
offline demo exercises exactly the loading code that the real dataset goes through.

The SFT warm-up slice is imperfect on purpose, as real SFT data is: 40% of its answers repeat
themselves, so the warmed-up base model learns that habit and preference alignment has something
to remove. Chosen answers are correct and stop; rejected answers are either wrong (another variable's value,
or a near miss) or correct but fail to stop (the sentence repeats), the two failure modes
preference alignment is meant to remove. Regenerate with ``python -m orpolab.demo.sample_task data/sample``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
from pathlib import Path

ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")
# Share of SFT warm-up answers that repeat themselves instead of stopping.
SFT_NO_STOP = 0.4


def extract_answer(text: str) -> int | None:
    """The first stated answer in a response, or None when it states none."""
    match = ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def is_correct(text: str, expected: int) -> bool:
    """Exact-answer check for the objective score: the answer is stated once, and it is right.

    An answer that repeats itself instead of stopping is not exact, even if its first statement is.
    """
    return ANSWER_RE.findall(text) == [str(expected)]


class LookupChecker:
    """The sample task's answer checker, named in ``conf/eval_prompts/sample.yaml`` by ``_target_``.

    ``is_correct`` checks an answer against the expected value; ``reference`` is the reference answer
    a judge metric that needs one is shown.
    """

    def is_correct(self, answer: str, expected: int | str) -> bool:
        return is_correct(answer, int(expected))

    def reference(self, expected: int | str) -> str:
        return f"The answer is {int(expected)}."


def make_question(rng: random.Random) -> tuple[str, str, int, list[int]]:
    """(question, asked variable, its value, the other values) with 1 to 3 variables."""
    names = rng.sample(string.ascii_lowercase, rng.choices([1, 2, 3], weights=[5, 3, 2])[0])
    values = [rng.randint(0, 99) for _ in names]
    listed = ", ".join(f"{n} = {v}" for n, v in zip(names[:-1], values[:-1], strict=True))
    last = f"{names[-1]} = {values[-1]}"
    asked = rng.randrange(len(names))
    question = f"Let {listed} and {last}. What is {names[asked]}?" if listed else f"Let {last}. What is {names[asked]}?"
    return question, names[asked], values[asked], [v for i, v in enumerate(values) if i != asked]


def answer_text(name: str, value: int) -> str:
    return f"{name} = {value}. The answer is {value}."


def _pair(rng: random.Random, question: str, name: str, value: int, others: list[int]) -> dict:
    good = answer_text(name, value)
    if rng.random() < 0.5:
        wrong = rng.choice([v for v in others if v != value] or [value + 1])
        if wrong == value or rng.random() < 0.3:
            wrong = value + rng.choice([-2, -1, 1, 2, 10])
        bad, kind = answer_text(name, wrong), "wrong"
    else:
        bad, kind = " ".join([good] * rng.randint(3, 6)), "no_stop"
    user = {"role": "user", "content": question}
    return {
        "source": f"orpolab-lookup/{kind}", "prompt": question, "question": question,
        "chosen": [user, {"role": "assistant", "content": good}],
        "rejected": [user, {"role": "assistant", "content": bad}],
        "answer": value,
    }


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Disjoint question sets: train pairs, held-out pairs, held-out prompts, SFT warm-up rows."""
    sizes = sizes or {"train": 600, "eval": 100, "prompts": 100, "sft": 400}
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rows = []
        while len(rows) < size:
            question, name, value, others = make_question(rng)
            if question in seen:
                continue
            seen.add(question)
            if split == "prompts":
                rows.append({"prompt": question, "answer": value})
            elif split == "sft":
                # Like real SFT data, the warm-up slice is imperfect: some answers ramble on.
                answer = answer_text(name, value)
                if rng.random() < SFT_NO_STOP:
                    answer = " ".join([answer] * rng.randint(2, 5))
                rows.append({"messages": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}],
                             "answer": value})
            else:
                rows.append(_pair(rng, question, name, value, others))
        out[split] = rows
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
    parser = argparse.ArgumentParser(description="Write the bundled sample task's JSONL files.")
    parser.add_argument("folder", nargs="?", default="data/sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.folder, args.seed)


if __name__ == "__main__":
    main()
