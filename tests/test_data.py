"""Data preparation: templates and masking per architecture, truncation, bad rows, cache, batches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from orpolab.core.config import DataConfig
from orpolab.core.defaults import default_settings
from orpolab.core.errors import OrpolabError
from orpolab.train.data import PairCollator, prepare, tokenize_pair
from orpolab.train.data import tokenize as data_mod

from .helpers import FAMILIES, ROOT

PROMPT = [{"role": "user", "content": "What is 12 + 7?"}]
ANSWER = "12 + 7 = 19. The answer is 19."
END_OF_TURN = {"llama": "<|eot_id|>", "phi": "<|end|>", "mistral": "</s>"}


def row(chosen: str = ANSWER, rejected: str = "12 + 7 = 18. The answer is 18.", **extra) -> dict:
    return {"chosen": PROMPT + [{"role": "assistant", "content": chosen}],
            "rejected": PROMPT + [{"role": "assistant", "content": rejected}], **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(tmp_path: Path, train: Path, eval_: Path | None = None, **kw) -> DataConfig:
    # Validation and test from files: the rows a test writes are all trained on.
    return default_settings("data", path=str(train), eval_path=str(eval_ or train), test_path=str(eval_ or train),
                            cache_dir=str(tmp_path / "cache"), max_length=kw.pop("max_length", 128),
                            max_prompt_length=kw.pop("max_prompt_length", 48), **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_template_masking_per_architecture(tiny_models, family):
    tok = AutoTokenizer.from_pretrained(tiny_models / f"tiny_{family}")
    ex = tokenize_pair(tok, PROMPT, ANSWER, "wrong", max_length=128, max_prompt_length=48)
    batch = PairCollator(tok.pad_token_id)([ex])
    labels = batch["labels"][0]
    completion_ids = labels[labels != -100].tolist()
    decoded = tok.decode(completion_ids)
    # The label span is exactly the answer followed by the family's end-of-turn marker ...
    assert decoded.strip().startswith(ANSWER)
    assert END_OF_TURN[family] in decoded
    # ... and the prompt tokens (the question itself) are masked.
    prompt_len = len(ex["prompt_ids"])
    assert (batch["labels"][0, :prompt_len] == -100).all()
    assert "What is 12 + 7?" in tok.decode(batch["input_ids"][0, :prompt_len].tolist())
    # Prompt + completion ids equal the template's full rendering tokenized at once.
    full = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    at_once = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ex["prompt_ids"] + ex["chosen_ids"]) == tok.decode(at_once)
    assert ex["chosen_bytes"] == len(ANSWER.encode())


def test_truncation_keeps_part_of_every_completion(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_llama")
    long_prompt = [{"role": "user", "content": "What is 1 + 1? " * 40}]
    ex = tokenize_pair(tok, long_prompt, ANSWER * 5, ANSWER, max_length=64, max_prompt_length=40)
    assert ex["truncated"]
    assert len(ex["prompt_ids"]) == 40
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) <= 64
    assert len(ex["chosen_ids"]) >= 64 - 40 and len(ex["rejected_ids"]) > 0
    # The prompt keeps its end (the text nearest the answer), the completion its start.
    assert tok.decode(ex["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.decode(ex["chosen_ids"]).startswith(ANSWER[:10])


def test_bad_rows_are_skipped_and_counted(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_llama")
    rows = [
        row(),
        row(chosen=ANSWER, rejected=ANSWER),                                  # identical
        {"chosen": PROMPT, "rejected": PROMPT},                               # no assistant turn
        {"chosen": PROMPT + [{"role": "assistant", "content": ""}], "rejected": row()["rejected"]},  # empty
        {"chosen": PROMPT + [{"role": "assistant", "content": 5}], "rejected": row()["rejected"]},   # non-string
        {"chosen": "not a list", "rejected": row()["rejected"]},             # wrong type
        {"rejected": row()["rejected"]},                                      # missing column
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = prepare(cfg_for(tmp_path, train), tok)
    assert out.stats["train_pairs"] == 1
    assert out.stats["train_skipped"] == {
        "identical_chosen_rejected": 1, "no_assistant_turn": 1, "chosen_empty_or_non_string_content": 2,
        "chosen_not_message_list": 1, "missing_column": 1,
    }


def test_nothing_usable_is_an_error(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_llama")
    train = write_jsonl(tmp_path / "train.jsonl", [row(chosen=ANSWER, rejected=ANSWER)] * 3)
    with pytest.raises(OrpolabError, match="no usable train pairs.*identical_chosen_rejected"):
        prepare(cfg_for(tmp_path, train), tok)


def test_file_that_is_not_json_lines(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_llama")
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps(row()) + "\nthis is not json\n")
    with pytest.raises(OrpolabError, match=r"not JSON lines: line 2"):
        prepare(cfg_for(tmp_path, bad), tok)


def test_plain_string_schema_with_custom_columns(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_phi")
    rows = [{"question": "What is 2 + 2?", "good": "4", "bad": "5"}] * 2
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = cfg_for(tmp_path, train, schema="strings", prompt_column="question", chosen_column="good",
                  rejected_column="bad")
    out = prepare(cfg, tok)
    assert out.stats["train_pairs"] == 2
    assert "What is 2 + 2?" in tok.decode(out.train[0]["prompt_ids"])
    assert tok.decode(out.train[0]["chosen_ids"]).startswith("4<|end|>")


def test_fallback_template_only_when_tokenizer_has_none(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_llama")
    tok.chat_template = None
    train = write_jsonl(tmp_path / "train.jsonl", [row()])
    with pytest.raises(OrpolabError, match="no chat template"):
        prepare(cfg_for(tmp_path, train, fallback_chat_template=None), tok)
    # A fallback must end the assistant's turn with the tokenizer's EOS, the token llama.cpp stops at.
    no_eos = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</turn>{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(OrpolabError, match=r"must close the assistant's turn with the tokenizer's end-of-sequence "
                                           r"token \(\{\{ eos_token \}\}, here '<\|eot_id\|>'\)"):
        prepare(cfg_for(tmp_path, train, fallback_chat_template=no_eos), tok)
    assert tok.chat_template is None
    template = no_eos.replace("</turn>", "{{ eos_token }}")
    out = prepare(cfg_for(tmp_path, train, fallback_chat_template=template), tok)
    assert tok.decode(out.train[0]["prompt_ids"]) == "<user>What is 12 + 7?<|eot_id|><assistant>"
    assert out.train[0]["chosen_ids"][-1] == tok.eos_token_id  # the model learns to end its answer with EOS


def test_tokenized_data_is_cached_per_tokenizer(tiny_models, tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_llama")
    train = write_jsonl(tmp_path / "train.jsonl", [row(), row(chosen="12 + 7 = 19.")])
    first = prepare(cfg_for(tmp_path, train), tok)
    calls = []
    monkeypatch.setattr(data_mod, "tokenize_rows", lambda *a, **k: calls.append(1))
    second = prepare(cfg_for(tmp_path, train), tok)
    assert calls == [] and second.train == first.train and second.data_hash == first.data_hash
    # Another tokenizer, or edited data, is a different cache entry.
    monkeypatch.undo()
    other = prepare(cfg_for(tmp_path, train), AutoTokenizer.from_pretrained(tiny_models / "tiny_phi"))
    assert other.data_hash != first.data_hash
    write_jsonl(train, [row()])
    assert prepare(cfg_for(tmp_path, train), tok).data_hash != first.data_hash


def test_split_is_deterministic_and_disjoint(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models / "tiny_llama")
    rows = [row(chosen=f"{i} + 7 = {i + 7}.", rejected=f"{i} + 7 = {i + 8}.") for i in range(50)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = default_settings("data", path=str(train), eval_size=0.2, cache_dir=str(tmp_path / "c1"),
                           max_length=128, max_prompt_length=48)
    a = prepare(cfg, tok)
    b = prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path / "c2")), tok)
    assert len(a.eval) == 10 and len(a.train) == 39 and a.stats["test_rows"] == 1  # 2% test, never tokenized
    assert a.eval == b.eval
    key = lambda e: tuple(e["chosen_ids"])  # noqa: E731
    assert not {key(e) for e in a.eval} & {key(e) for e in a.train}


def test_collator_pads_dynamically_and_stacks_chosen_then_rejected():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6], "chosen_bytes": 3, "rejected_bytes": 1},
        {"prompt_ids": [1], "chosen_ids": [7], "rejected_ids": [8, 9], "chosen_bytes": 1, "rejected_bytes": 2},
    ]
    b = PairCollator(pad_token_id=0)(examples)
    assert b["input_ids"].shape == (4, 5)  # longest sequence, not a fixed max length
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 7, 0, 0, 0], [1, 2, 6, 0, 0], [1, 8, 9, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 3, 4, 5], [-100, 7, -100, -100, -100],
                                    [-100, -100, 6, -100, -100], [-100, 8, 9, -100, -100]]
    assert b["attention_mask"].sum(1).tolist() == [5, 2, 3, 3]
    assert torch.equal(b["answer_bytes"], torch.tensor([3, 1, 1, 2]))


def test_bundled_sample_follows_orpo_dpo_mix_schema_and_is_checkable():
    from orpolab.demo.sample_task import is_correct

    rows = [json.loads(line) for line in (ROOT / "data/sample/train.jsonl").read_text().splitlines()]
    assert len(rows) >= 300
    for r in rows:
        assert {"source", "chosen", "rejected", "prompt", "question"} <= set(r)
        assert r["chosen"][0] == {"role": "user", "content": r["prompt"]}
        assert is_correct(r["chosen"][-1]["content"], r["answer"])
        bad = r["rejected"][-1]["content"]
        assert not is_correct(bad, r["answer"]) or bad.count("The answer is") > 1
    held_out = {json.loads(line)["prompt"] for line in (ROOT / "data/sample/eval.jsonl").read_text().splitlines()}
    prompts = {json.loads(line)["prompt"] for line in (ROOT / "data/sample/prompts.jsonl").read_text().splitlines()}
    train_prompts = {r["prompt"] for r in rows}
    assert not held_out & train_prompts and not prompts & train_prompts and not prompts & held_out


def test_resumable_sampler_orders_groups_and_resumes_mid_epoch():
    from orpolab.train.data import ResumableSampler

    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    s = ResumableSampler(400, seed=5, lengths=lengths, batch_size=8, megabatch=10)
    s.set_epoch(0)
    epoch0 = list(s)
    assert sorted(epoch0) == list(range(400)) and len(s) == 400  # every pair once per epoch
    s.set_epoch(1)
    assert list(s) != epoch0  # a new order every epoch ...
    s.set_epoch(0)
    assert list(s) == epoch0  # ... that depends only on (seed, epoch)
    # Grouped by length: far less padding than a plain shuffle with the same batches' size.
    def padding(order):
        batches = [order[i: i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)
    plain = ResumableSampler(400, seed=5)
    plain.set_epoch(0)
    assert padding(epoch0) < 0.3 * padding(list(plain))
    # Resumed after 13 batches of epoch 0: exactly the rest of that epoch, then full epochs again.
    s.resume_epoch, s.resume_offset = 0, 13 * 8
    s.set_epoch(0)
    assert list(s) == epoch0[13 * 8:]
    s.set_epoch(0)
    assert list(s) == epoch0


def test_resumable_sampler_shards_the_global_order_and_resumes_it_on_two_ranks():
    from orpolab.train.data import ResumableSampler

    def ranks(n: int, offset: int = 0) -> list[list[int]]:
        out = []
        for rank in range(2):
            s = ResumableSampler(n, seed=3, batch_size=4, num_replicas=2, rank=rank)
            s.resume_epoch, s.resume_offset = (0, offset) if offset else (None, 0)
            s.set_epoch(0)
            out.append(list(s))
        return out

    single = ResumableSampler(101, seed=3)
    single.set_epoch(0)
    order = list(single)
    r0, r1 = ranks(101)
    assert len(r0) == len(r1) == 51  # 101 pairs: one padded with the order's first pair
    # Step k of both ranks together is the k-th stretch of 8 pairs of the one-process order.
    for k in range(6):
        assert sorted(r0[4 * k: 4 * k + 4] + r1[4 * k: 4 * k + 4]) == sorted(order[8 * k: 8 * k + 8])
    assert sorted(set(r0) | set(r1)) == list(range(101)) and (r0 + r1).count(order[0]) == 2
    # Resumed after 5 steps of both ranks (40 pairs of the global order): each rank's exact remainder.
    assert ranks(101, offset=5 * 4 * 2) == [r0[20:], r1[20:]]
