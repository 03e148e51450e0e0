"""Answers and verdicts kept by what decides them, shared by every evaluation of every sweep.

On a CPU the evaluation is the slow stage, and much of it repeats: the base model answers the same
prompts with the same settings in every sweep of it, the winner at two quantizations often gives the
same answer, a second evaluation of a sweep judges what the first judged. An entry's key is the
sha256 of everything that decides its content:

* an answer: the GGUF's sha256 (the weights, the tokenizer and the chat template), the prompt's
  token ids after the chat template (so an edited prompt, or a template that writes today's date,
  is a new key), the stop strings and every generation setting that changes the output (budget,
  temperature, and for sampled answers the answer's seed, GPU offload);
* a verdict: the judge's sha256, the grammar, the sampling settings and the exact prompt flow-judge
  builds (criteria, rubric, template, question, reference and the answer under judgement).

Greedy and seeded answers are deterministic per key, so an answer taken from the store is the
answer that would have been generated (up to the near ties a batch may break either way, as for
any batched answer). Work keyed by position (model label, prompt number) could pair a new winner
with the old winner's answers or an edited prompt with the old answer; work keyed by content cannot.

Each entry is a small JSON file written whole under a temporary name, then renamed, under
``<root>/<kind>/<first two hex digits>/<key>.json``: a kill leaves either the entry or nothing, and an
entry that does not read back (a torn copy, a disk error) is ignored and made again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orpolab.core.files import write_json_atomic

KINDS = ("answers", "verdicts")


def content_key(*parts: Any) -> str:
    """sha256 of the parts as canonical JSON: the same content, the same key, on any machine."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Reuse:
    """What one stage took from the store, what it made anew, and the seconds the taken part had cost."""

    reused: int = 0
    made: int = 0
    seconds_saved: float = 0.0
    unreadable: int = 0  # entries found damaged and made again

    def as_dict(self) -> dict:
        return {"reused": self.reused, "made": self.made, "seconds_saved": round(self.seconds_saved, 1),
                "unreadable": self.unreadable}


@dataclass
class Store:
    """One kind of entry (``answers`` or ``verdicts``) under ``root``; ``enabled=False`` reads and writes nothing."""

    root: Path
    kind: str
    enabled: bool = True
    reuse: Reuse = field(default_factory=Reuse)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown store kind {self.kind!r}")
        self.root = Path(self.root)

    def path(self, key: str) -> Path:
        return self.root / self.kind / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The entry, or None when there is none, reuse is off, or it does not read back whole."""
        if not self.enabled:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.reuse.unreadable += 1
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            self.reuse.unreadable += 1
            return None
        return entry

    def put(self, key: str, value: dict) -> None:
        """Save an entry whole (temporary name, then rename); nothing when reuse is off."""
        if self.enabled:
            write_json_atomic(self.path(key), {**value, "key": key}, indent=None)

    def took(self, entry: dict) -> None:
        """Count an entry taken from the store, with the seconds it cost when it was made."""
        self.reuse.reused += 1
        self.reuse.seconds_saved += float(entry.get("seconds") or 0.0)


def clear(root: Path, kinds: tuple[str, ...] = KINDS) -> int:
    """Delete the stores' entries (every kind by default); returns how many there were."""
    n = 0
    for kind in kinds:
        folder = Path(root) / kind
        if folder.is_dir():
            n += sum(1 for _ in folder.rglob("*.json"))
            shutil.rmtree(folder)
    return n


def main(argv: list[str] | None = None) -> int:
    """``python -m orpolab.evaluate.store clear [--dir DIR] [--kind answers|verdicts]``."""
    import argparse

    from orpolab.core import console

    parser = argparse.ArgumentParser(description="The evaluation's stores of answers and verdicts.")
    parser.add_argument("action", choices=["clear", "size"])
    parser.add_argument("--dir", default=".cache/eval-store", help="the stores' folder (evaluation.store_dir)")
    parser.add_argument("--kind", choices=KINDS, action="append", help="only this kind (repeatable)")
    args = parser.parse_args(argv)
    kinds = tuple(args.kind or KINDS)

    def act() -> None:
        if args.action == "clear":
            print(f"removed {clear(Path(args.dir), kinds)} entries from {args.dir}")
        else:
            for kind in kinds:
                folder = Path(args.dir) / kind
                files = list(folder.rglob("*.json")) if folder.is_dir() else []
                print(f"{kind}: {len(files)} entries, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB")

    return console.run_cli(act, False)


if __name__ == "__main__":
    import sys

    sys.exit(main())
