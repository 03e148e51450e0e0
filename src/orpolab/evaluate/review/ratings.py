"""A reviewer's ratings file: one JSON line per rating, appended and synced the moment it is given.

``<sweep>/evaluation/<id>/review/<reviewer>.jsonl``. Nothing is rewritten, so a closed tab, a reload
or a killed server loses nothing already answered; a kill in the middle of a write can leave a torn
last line, which the reader leaves out and the next write cuts off. What the page sends is checked
here (known prompt and pair, known choice and tags, a bounded note) before anything is written; the
server, not the page, decides which model was shown as A.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

from orpolab.core.errors import OrpolabError
from orpolab.evaluate.review.source import ReviewSet

CHOICES = ("A", "tie", "B", "skip")
# The usual faults of a small fine-tuned model's answer, as quick tags (id -> what the page shows).
TAGS = {"no_stop": "does not stop", "repeats": "repeats itself", "wrong": "wrong answer",
        "off_topic": "off topic", "refuses": "refuses"}
MAX_NOTE = 500
REVIEWER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


class RatingError(OrpolabError):
    """What the page sent is not a rating of this review (the sentence says why)."""


def check_reviewer(name: str) -> str:
    """A reviewer's name is their file's name: letters, digits, ``_ . -``, starting with a letter or digit."""
    if not isinstance(name, str) or not REVIEWER.fullmatch(name) or name.endswith(".jsonl"):
        raise OrpolabError(f"reviewer name {name!r} is not a plain file name: use 1-40 letters, digits, '_', '.' or "
                           "'-', starting with a letter or digit")
    return name


def ratings_file(folder: Path, reviewer: str) -> Path:
    return Path(folder) / "review" / f"{check_reviewer(reviewer)}.jsonl"


def read_ratings(path: Path) -> list[dict]:
    """Every complete rating in the file, in the order given; a torn last line (a kill mid-write) is left out.

    A bad line anywhere else means the file was edited or damaged: that is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if n == len(lines):  # the last line, without its newline: a write that was cut short
                break
            raise OrpolabError(f"{path}, line {n}, is not a rating ({err}); fix or remove that line") from err
    return out


def latest(ratings: list[dict]) -> dict[tuple[int, str], dict]:
    """(prompt, pair) -> the rating given last for it."""
    return {(r["prompt"], r["pair"]): r for r in ratings}


def read_all(folder: Path) -> dict[str, list[dict]]:
    """Reviewer -> their ratings (the last per item), for every ratings file of an evaluation."""
    review = Path(folder) / "review"
    files = sorted(review.glob("*.jsonl")) if review.is_dir() else []
    return {f.stem: list(latest(read_ratings(f)).values()) for f in files if REVIEWER.fullmatch(f.stem)}


def validate(payload: object, review: ReviewSet, reviewer: str) -> dict:
    """The rating to write for what the page sent, or a :class:`RatingError` saying what is wrong.

    The page names a pair by its code (``p1``); the rating records the pair id (``base~winner``) and
    which model was shown as A, as the server drew it.
    """
    if not isinstance(payload, dict):
        raise RatingError("a rating is a JSON object")
    unknown = set(payload) - {"prompt", "pair", "choice", "tags", "note"}
    if unknown:
        raise RatingError(f"unknown fields {sorted(unknown)}")
    prompt, pair = payload.get("prompt"), review.pair_from_code(payload.get("pair"))
    if isinstance(prompt, bool) or not isinstance(prompt, int) or (prompt, pair) not in set(review.items):
        raise RatingError(f"prompt {prompt!r} with pair {payload.get('pair')!r} is not an item of this review")
    choice = payload.get("choice")
    if choice not in CHOICES:
        raise RatingError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    tags = payload.get("tags") or {}
    if not isinstance(tags, dict) or set(tags) - {"A", "B"}:
        raise RatingError('tags are {"A": [...], "B": [...]}')
    clean = {}
    for side in ("A", "B"):
        given = tags.get(side) or []
        if not isinstance(given, list) or any(t not in TAGS for t in given):
            raise RatingError(f"tags of {side} must be among {', '.join(TAGS)}, got {given!r}")
        clean[side] = sorted(set(given))
    note = payload.get("note") or ""
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise RatingError(f"the note must be text of at most {MAX_NOTE} characters")
    a, b, seed = review.order(reviewer, prompt, pair)
    return {"prompt": prompt, "pair": pair, "a": a, "b": b, "order_seed": seed, "choice": choice, "tags": clean,
            "note": note.strip(), "reviewer": reviewer, "evaluation": review.evaluation,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class RatingLog:
    """One reviewer's ratings file, opened for appending by one server (writes serialised by a lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cut_torn_tail()
        self.given = latest(read_ratings(self.path))

    def _cut_torn_tail(self) -> None:
        """Drop an unfinished last line, so the next rating starts on a line of its own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())

    def add(self, rating: dict) -> None:
        """Append one rating and sync it to disk before answering; an item already rated is refused."""
        key = (rating["prompt"], rating["pair"])
        with self._lock:
            if key in self.given:
                raise RatingError(f"prompt {key[0]} with pair {key[1]} is already rated")
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rating, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.given[key] = rating
