"""Train / validation / test: disjoint, deterministic, and each read only by the stage it is for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import OmegaConf

from orpolab.core.defaults import default_settings
from orpolab.evaluate.prompts import load_prompts
from orpolab.export.pipeline import held_out_texts
from orpolab.train.data import overlap, split_rows, three_splits

from .helpers import ROOT


def pair(i: int) -> dict:
    q = f"Let x = {i}. What is x?"
    user = {"role": "user", "content": q}
    return {"prompt": q, "answer": i, "chosen": [user, {"role": "assistant", "content": f"x = {i}."}],
            "rejected": [user, {"role": "assistant", "content": f"x = {i + 1}."}]}


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prompts(rows: list[dict]) -> set[str]:
    return {r["prompt"] for r in rows}


def test_carved_splits_are_disjoint_deterministic_and_keep_the_old_validation(tmp_path):
    rows = [pair(i) for i in range(200)]
    cfg = default_settings("data", path=write(tmp_path / "all.jsonl", rows), eval_size=0.1, test_size=30,
                           split_seed=7)
    a, b = three_splits(cfg), three_splits(cfg)
    assert (len(a.train), len(a.validation), len(a.test)) == (150, 20, 30)
    assert a.train == b.train and a.validation == b.validation and a.test == b.test  # the same for every job
    t, v, s = prompts(a.train), prompts(a.validation), prompts(a.test)
    assert not t & v and not t & s and not v & s and len(t | v | s) == 200
    # Adding the test split kept the validation rows a sweep selected on before it existed.
    assert a.validation == split_rows(rows, 0.1, 7)[1]
    # Another seed, other rows.
    assert three_splits(dataclasses.replace(cfg, split_seed=8)).test != a.test


def job_with(data: dict):
    """A job's recorded config as the stages read it: its data group complete, these keys changed."""
    return OmegaConf.create({"data": OmegaConf.to_container(OmegaConf.structured(default_settings("data", **data)))})


def test_heldout_prompts_come_from_test_never_validation(tmp_path):
    rows = [pair(i) for i in range(100)]
    data = {"path": write(tmp_path / "all.jsonl", rows), "eval_size": 0.2, "test_size": 0.2, "split_seed": 3}
    splits = three_splits(default_settings("data", **data))
    job_cfg = job_with(data)
    heldout = default_settings("eval_prompts", "eval_prompts=heldout", max_prompts=None, reference_field=None)
    got = {p["prompt"] for p in load_prompts(heldout, job_cfg)}
    assert got == prompts(splits.test)
    assert not got & prompts(splits.validation) and not got & prompts(splits.train)


class ChatText:
    """A tokenizer stand-in: the chat template renders the turns' contents, one per line."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "\n".join(m["content"] for m in messages) + ("\n" if add_generation_prompt else "")


def test_export_verification_never_reads_training_rows(tmp_path):
    rows = [pair(i) for i in range(60)]
    for data in ({"path": write(tmp_path / "all.jsonl", rows), "eval_size": 5, "test_size": 5},  # carved
                 {"path": write(tmp_path / "train.jsonl", rows[:40]), "eval_path": write(tmp_path / "val.jsonl",
                  rows[40:45]), "test_path": write(tmp_path / "test.jsonl", rows[45:])}):  # files of their own
        splits = three_splits(default_settings("data", **data))
        texts, _ = held_out_texts(job_with(data), ChatText(), 8)
        used = {t.split("\n")[0] for t in texts}
        assert len(texts) == 8 and used <= prompts(splits.validation) | prompts(splits.test)
        assert not used & prompts(splits.train)


def test_overlap_of_a_prompt_file_with_training_is_counted(tmp_path):
    rows = [pair(i) for i in range(20)]
    cfg = default_settings("data", path=write(tmp_path / "t.jsonl", rows))
    assert overlap(["Let x = 3.   What is x?", "Let x = 99. What is x?", "Let x = 5. What is x?"], rows, cfg) == 2


def test_bundled_sample_files_are_disjoint():
    files = {name: [json.loads(x) for x in (ROOT / f"data/sample/{name}.jsonl").read_text().splitlines()]
             for name in ("train", "eval", "test", "prompts", "sft")}
    seen: dict[str, str] = {}
    for name, rows in files.items():
        for r in rows:
            q = r.get("prompt") or r["messages"][0]["content"]
            assert q not in seen, f"{q!r} is in both {seen.get(q)} and {name}"
            seen[q] = name
    assert len(files["test"]) == 100
