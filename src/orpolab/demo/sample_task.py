"""The bundled sample task: questions whose answers a program can check.

Each question names a few variables and their values and asks for one of them ("Let p = 17,
k = 42 and w = 8. What is k?"); the answer restates it ("k = 42. The answer is 42."). A tiny model
can learn this look-up from a few hundred examples, so the offline demo shows real learning, and
``LookupChecker`` checks any answer: the value, and whether it ended.

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
ASKED_RE = re.compile(r"What is ([a-z])\?")
ASSIGN_RE = re.compile(r"\b([a-z]) = (-?\d+)")
# Share of SFT warm-up answers that repeat themselves instead of stopping.
SFT_NO_STOP = 0.4
# How a right answer may be phrased (the calibration set uses each; the checker accepts each).
PHRASINGS = ("{name} = {value}.", "The answer is {value}.", "{value}", "{name} = {value}. The answer is {value}.")


def extract_answer(text: str) -> int | None:
    """The first stated answer in a response, or None when it states none."""
    match = ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def asked_name(question: str) -> str | None:
    """The variable a question asks for ("... What is k?" -> "k")."""
    match = ASKED_RE.search(question)
    return match.group(1) if match else None


def stated_values(text: str, name: str | None) -> list[int]:
    """Every value the answer gives for the asked variable: "k = 42", "k is 42", "The answer is 42",
    or an answer that is only the number. Values it restates for the other variables are not counted."""
    values = [int(v) for v in re.findall(r"[Tt]he answer is (-?\d+)", text)]
    if name:
        values += [int(v) for v in re.findall(rf"(?<![A-Za-z]){re.escape(name)} (?:=|is|equals) (-?\d+)", text)]
    bare = re.fullmatch(r"\s*(-?\d+)\s*\.?\s*", text)
    if bare:
        values.append(int(bare.group(1)))
    return values


def value_right(text: str, expected: int, question: str) -> bool:
    """The answer states the asked value, and no other value for it ("z = 5.", "The answer is 5.", "5")."""
    values = stated_values(text, asked_name(question))
    return bool(values) and set(values) == {expected}


def repeats_itself(text: str) -> bool:
    """Some run of three words occurs twice: the answer starts over instead of stopping."""
    words = text.split()
    grams = [tuple(words[i: i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) < len(grams)


def is_correct(text: str, expected: int) -> bool:
    """The answer states "The answer is N." once, and N is right (the phrasing the task teaches)."""
    return ANSWER_RE.findall(text) == [str(expected)]


class LookupChecker:
    """The sample task's answer checker, named in ``conf/eval_prompts/sample.yaml`` by ``_target_``.

    ``check`` gives two figures per answer: ``value_right`` (the asked value is stated, and no other
    value for it, in any phrasing) and ``exact`` (value right, the answer ended by itself and does not
    repeat itself): the demo's gain in ending answers shows in the second. ``reference`` is what a
    judge metric that needs a reference is shown (the value, not an answer a model gives), and
    ``examples`` builds a right and a wrong answer for the judge's calibration.
    """

    figures = ("value_right", "exact")

    def check(self, answer: str, expected: int | str, question: str, ended: bool) -> dict[str, bool]:
        right = value_right(answer, int(expected), question)
        return {"value_right": right, "exact": right and ended and not repeats_itself(answer)}

    def reference(self, expected: int | str) -> str:
        return f"The correct value is {int(expected)}."

    def examples(self, question: str, expected: int | str, rng: random.Random) -> tuple[str, str]:
        """A right and a wrong answer to ``question`` in the same phrasing (a random one of :data:`PHRASINGS`).

        The wrong value is another variable's value when the question has one, else a near miss.
        """
        value, name = int(expected), asked_name(question) or "x"
        others = [int(v) for n, v in ASSIGN_RE.findall(question) if n != name and int(v) != value]
        wrong = rng.choice(others) if others and rng.random() < 0.5 else value + rng.choice([-2, -1, 1, 2, 10])
        phrasing = rng.choice(PHRASINGS)
        return phrasing.format(name=name, value=value), phrasing.format(name=name, value=wrong)


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
    """Disjoint question sets: train pairs, validation pairs, held-out prompts, SFT warm-up rows, test pairs.

    The test pairs came last (drawn after the others from the same generator), so the earlier files
    stayed byte-identical when they were added.
    """
    sizes = sizes or {"train": 600, "eval": 100, "prompts": 100, "sft": 400, "test": 100}
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
