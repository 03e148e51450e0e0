"""Batched llama.cpp decoding: several answers and verdicts per batch give what one at a time gives, resumably.

All on SmolLM2-135M-Instruct (a real chat model: real end-of-turn tokens, real chat template).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orpolab.core.defaults import default_settings
from orpolab.core.errors import OrpolabError
from orpolab.core.files import read_jsonl
from orpolab.core.llama_runtime import open_gguf
from orpolab.evaluate import batched
from orpolab.evaluate.batched import BatchedDecoder, Request, chat_prompt, check_memory, context_for, kv_bytes_per_token

QUESTIONS = ["What is 2 + 2?", "Name three colours.", "Write one sentence about the sea.", "Say hi."]
MAX_TOKENS = 24
# Logits this close are a tie that the order of a sum may break either way: the same prefix through two
# contexts (other sizes, other batches) gives logits up to about 0.16 apart on this 4-bit model.
NEAR_TIE = 0.25


@pytest.fixture(scope="module")
def gguf(smollm2) -> Path:
    return smollm2["gguf"]


@pytest.fixture(scope="module")
def llm(gguf):
    model = open_gguf(gguf, 512, 2)
    yield model
    model.close()


@pytest.fixture(scope="module")
def today(llm) -> list[tuple[str, str, int]]:
    """The answers llama-cpp-python's own chat completion gives, one prompt at a time (greedy)."""
    outs = [llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=MAX_TOKENS, temperature=0.0)
            for q in QUESTIONS]
    return [(o["choices"][0]["message"]["content"], o["choices"][0]["finish_reason"], o["usage"]["completion_tokens"])
            for o in outs]


def requests_for(llm, max_tokens: list[int] | None = None) -> list[Request]:
    out = []
    for i, q in enumerate(QUESTIONS):
        tokens, stop = chat_prompt(llm, [{"role": "user", "content": q}])
        out.append(Request(tokens, (max_tokens or [MAX_TOKENS] * len(QUESTIONS))[i], 0, stop))
    return out


def decode(llm, requests: list[Request], parallel: int, **kwargs) -> list:
    with BatchedDecoder(llm, parallel, 256, **kwargs) as decoder:
        return list(decoder.run(requests))


@pytest.fixture(scope="module")
def one_at_a_time(llm) -> dict:
    return {c.index: c for c in decode(llm, requests_for(llm), 1)}


def assert_same_up_to_near_ties(llm, request: Request, alone: list[int], batched: list[int]) -> None:
    """Token for token equal, or first different where one at a time had a near tie (top two logits
    within ``NEAR_TIE``): a batch sums in another order, which may flip a tie, never a clear choice."""
    import llama_cpp
    import numpy as np

    if batched == alone:
        return
    k = next(i for i in range(min(len(alone), len(batched)) + 1) if i == len(alone) or alone[i] != batched[i])
    assert k < len(alone) and k < len(batched), "one completion is a prefix of the other: a wrong stop"
    llm.reset()
    llm.eval(request.tokens + alone[:k])
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    gap = float(logits[alone[k]] - logits[batched[k]])
    assert abs(gap) < NEAR_TIE, f"token {k} differs where one at a time chose clearly (logit gap {gap:.3f})"


def test_batched_greedy_answers_equal_one_at_a_time_token_for_token(llm, today, one_at_a_time):
    one = one_at_a_time
    # One sequence at a time through the decoder is llama-cpp-python's chat completion.
    assert [(one[i].text, one[i].finish_reason, len(one[i].tokens)) for i in range(len(QUESTIONS))] == today
    assert {c.finish_reason for c in one.values()} == {"stop", "length"}  # both endings are covered
    requests = requests_for(llm)
    for kv_unified in (False, True):
        batched = {c.index: c for c in decode(llm, requests, 3, kv_unified=kv_unified)}
        for i, request in enumerate(requests):
            assert_same_up_to_near_ties(llm, request, one[i].tokens, batched[i].tokens)


def test_a_sequence_finishing_early_neither_stops_nor_corrupts_the_others(llm, one_at_a_time):
    budgets = [MAX_TOKENS, 2, MAX_TOKENS, MAX_TOKENS]  # the second stops after 2 tokens, mid-batch
    requests = requests_for(llm, budgets)
    order = decode(llm, requests, 4)
    got = {c.index: c for c in order}
    assert order[0].index == 1 and got[1].finish_reason == "length" and got[1].tokens == one_at_a_time[1].tokens[:2]
    for i in (0, 2, 3):
        assert got[i].finish_reason == one_at_a_time[i].finish_reason or got[i].tokens != one_at_a_time[i].tokens
        assert_same_up_to_near_ties(llm, requests[i], one_at_a_time[i].tokens, got[i].tokens)


def test_a_lone_lead_byte_followed_by_tokens_without_text_stops_at_the_budget(llm):
    import llama_cpp

    vocab = llm._model.vocab
    lead = next(t for t in range(llm.n_vocab()) if llm.detokenize([t]) == b"\xe3")  # starts a 3-byte character
    blank = next(t for t in range(llm.n_vocab())
                 if llm.detokenize([t]) == b"" and not llama_cpp.llama_vocab_is_eog(vocab, t))
    text = llm.tokenize(b"ok", add_bos=False)  # the check for an unfinished character looks at 3 bytes
    budget = len(text) + 4
    with BatchedDecoder(llm, 1, 64) as decoder:
        slot = batched._Slot(0, Request(llm.tokenize(b"hi"), budget), None, prompt_done=2, reused=0)
        steps = [decoder._step(slot, token) for token in text + [lead] + [blank] * 20]
    done = [s for s in steps if s is not None]
    # Without the cap the character never completes and the sequence grows until its KV cells run out.
    assert done, "the completion never stopped"
    assert steps.index(done[0]) == budget - 1 and done[0].finish_reason == "length" and len(done[0].tokens) == budget
    assert done[0].text == "ok"  # the unfinished character is dropped


def test_shared_prefix_is_copied_not_decoded_again(llm):
    question = "Explain in one sentence why the sky is blue. " * 4
    prompts = [question + "Answer briefly.", question + "Answer in detail."]
    requests = [Request(chat_prompt(llm, [{"role": "user", "content": p}])[0], 4) for p in prompts]
    for kv_unified in (False, True):
        out = {c.index: c for c in decode(llm, requests, 2, kv_unified=kv_unified)}
        assert out[0].reused_tokens == 0 and out[1].reused_tokens > 40  # the second waits for the first's prefix


def test_verdicts_batched_equal_sequential_and_all_parse(gguf, tmp_path):
    from flow_judge import EvalInput, EvalOutput, FlowJudge

    from orpolab.evaluate.judge import LlamaCppFlowJudge, metric_by_name

    metric = metric_by_name("RESPONSE_CORRECTNESS_5POINT")
    scores = [r.score for r in metric.rubric]
    items = [("What is 12 + 30?", "42", "12 + 30 = 42."), ("What is 12 + 30?", "42", "It is 32, I think."),
             ("Name a primary colour.", "Red.", "Red is one."), ("Name a primary colour.", "Red.", "Green.")]
    backend = LlamaCppFlowJudge(gguf, scores, max_tokens=0, max_feedback_chars=60, n_ctx=1024, parallel=2)
    try:
        judge = FlowJudge(metric=metric, model=backend, output_dir=str(tmp_path / "fj"))
        prompts = [judge._format_prompt(EvalInput(inputs=[{"query": q}, {"reference_answer": r}],
                                                  output={"response": a})) for q, r, a in items]
        raw = dict(backend.verdicts(prompts))
        # The same verdicts one at a time, token for token (the backend's decoding, its grammar, no batch).
        requests = [Request(chat_prompt(backend.llm, [{"role": "user", "content": p}])[0], backend.max_tokens)
                    for p in prompts]
        with BatchedDecoder(backend.llm, 2, 1024, grammar=backend.grammar) as decoder:
            batched = {c.index: c.tokens for c in decoder.run(requests)}
        with BatchedDecoder(backend.llm, 1, 1024, grammar=backend.grammar) as decoder:
            alone = {c.index: c for c in decoder.run(requests)}
        judged = open_gguf(gguf, 1024, 2)
        try:
            for i, request in enumerate(requests):
                assert_same_up_to_near_ties(judged, request, alone[i].tokens, batched[i])
        finally:
            judged.close()
    finally:
        backend.close()
    parsed = [EvalOutput.parse(raw[i]) for i in range(len(items))]
    assert all(p.score in scores for p in parsed)  # the grammar held in every sequence: no parse failure (-1)
    assert all(alone[i].text.startswith("<feedback>") and alone[i].text.endswith("</score>") for i in alone)


def test_the_judge_sizes_its_kv_cache_to_the_verdicts_and_grows_it_only_when_needed(gguf):
    from orpolab.evaluate.judge import LlamaCppFlowJudge

    backend = LlamaCppFlowJudge(gguf, [1, 2, 3, 4, 5], max_tokens=0, max_feedback_chars=8, n_ctx=4096, parallel=2)
    try:
        def need(prompt: str) -> int:
            return len(chat_prompt(backend.llm, [{"role": "user", "content": prompt}])[0]) + backend.max_tokens

        short, long = "Rate: hi.", "Rate this. " + "word " * 300
        assert len(dict(backend.verdicts([short]))) == 1
        first = backend._decoder
        assert need(short) <= first.n_ctx_seq < need(short) + 64  # not the 4,096-token window
        assert len(dict(backend.verdicts([long]))) == 1
        second = backend._decoder
        assert second is not first and need(long) <= second.n_ctx_seq < need(long) + 64
        list(backend.verdicts([short]))
        assert backend._decoder is second  # a shorter call keeps the larger cache and what it holds
    finally:
        backend.close()


class Interrupted(Exception):
    """Stands for a kill: the stage stops between two saved results."""


def test_a_kill_mid_batch_then_a_rerun_answers_only_the_missing_prompts(gguf, tmp_path, monkeypatch):
    from orpolab.evaluate import generate

    prompts = [{"id": f"p{i}", "prompt": q} for i, q in enumerate(QUESTIONS)]
    cfg = default_settings("evaluation.generation", max_tokens=MAX_TOKENS, n_ctx=256, threads=2, parallel=4)
    out_file = tmp_path / "answers.jsonl"
    saved, asked = generate.append_jsonl, []

    def killed_after_two(path, row):
        if len(read_jsonl(path)) == 2:
            raise Interrupted
        saved(path, row)

    monkeypatch.setattr(generate, "append_jsonl", killed_after_two)
    with pytest.raises(Interrupted):
        generate.answer_prompts(gguf, prompts, out_file, cfg, "base")
    first = [r["id"] for r in read_jsonl(out_file)]
    assert len(first) == 2  # the finished answers were saved before the kill, the others lost

    run = BatchedDecoder.run
    monkeypatch.setattr(generate, "append_jsonl", saved)
    monkeypatch.setattr(BatchedDecoder, "run", lambda self, requests: (asked.extend(requests), run(self, requests))[1])
    rows = generate.answer_prompts(gguf, prompts, out_file, cfg, "base")
    assert len(asked) == 2  # only the two missing prompts were answered again
    assert sorted(r["id"] for r in read_jsonl(out_file)) == sorted(p["id"] for p in prompts)
    assert [r["id"] for r in rows] == [p["id"] for p in prompts] and all("answer" in r for r in rows)


def test_a_kill_mid_batch_then_a_rerun_judges_only_the_missing_answers(gguf, tmp_path):
    from types import SimpleNamespace

    from orpolab.evaluate.judge import LlamaCppFlowJudge
    from orpolab.evaluate.stages import verdicts
    from orpolab.evaluate.store import Store

    prompts = [{"id": f"p{i}", "prompt": q, "reference": "a short answer"} for i, q in enumerate(QUESTIONS[:3])]
    answers = {m: {p["id"]: {"answer": f"{m} says: {p['prompt'][:10]}"} for p in prompts} for m in ("base", "winner")}
    asked: list[str] = []

    class Judge(LlamaCppFlowJudge):
        kill_after: int | None = None

        def verdicts(self, texts):
            asked.extend(texts)
            for n, item in enumerate(super().verdicts(texts)):
                if n == self.kill_after:
                    raise Interrupted
                yield item

    # The verdict stage reads only these of its plan (the store off: this is about the verdicts file).
    plan = SimpleNamespace(
        out=tmp_path, models=("base", "winner"), judged=prompts, answers=lambda: answers,
        judge_name=lambda: "small judge", verdicts_file=lambda metric: tmp_path / f"verdicts-{metric}.jsonl",
        settings=SimpleNamespace(judge=SimpleNamespace(metrics=["RESPONSE_CORRECTNESS_3POINT"])),
        judge_backend=lambda scores: Judge(gguf, scores, max_tokens=0, max_feedback_chars=20, n_ctx=1024,
                                           parallel=4),
        store=lambda kind: Store(tmp_path / "store", kind, enabled=False), judge_file=lambda: gguf,
        file_sha256=lambda path: "0" * 64, judge_identity=lambda metric: {"grammar_sha256": "g", "sampling": {}},
        record_reuse=lambda stage, reuse: None)
    Judge.kill_after = 3
    with pytest.raises(Interrupted):
        verdicts.run(plan)
    out_file = tmp_path / "verdicts-RESPONSE_CORRECTNESS_3POINT.jsonl"
    assert len(read_jsonl(out_file)) == 3 and len(asked) == 6
    asked.clear()
    Judge.kill_after = None
    verdicts.run(plan)
    verdicts = read_jsonl(out_file)
    assert len(asked) == 3  # only the three verdicts lost to the kill were asked for again
    assert sorted((v["model"], v["id"]) for v in verdicts) == sorted((m, p["id"]) for m in answers for p in prompts)
    assert all(v["score"] in (1, 2, 3) for v in verdicts)


def test_sampled_answers_do_not_depend_on_order_or_resumption(llm):
    from orpolab.evaluate.generate import answer_seed

    requests = requests_for(llm)
    for i, r in enumerate(requests):
        r.seed = answer_seed(0, "winner", f"p{i}")
    assert len({r.seed for r in requests}) == len(requests) and answer_seed(0, "winner", "p0") == requests[0].seed
    forward = {c.index: c.tokens for c in decode(llm, requests, 1, temperature=0.9)}
    backward = {len(requests) - 1 - c.index: c.tokens for c in decode(llm, requests[::-1], 1, temperature=0.9)}
    assert backward == forward  # each answer's draws come from its own seed, not from what ran before it


def test_kv_cache_estimate_clamps_parallel_to_free_memory(monkeypatch):
    phi35 = {"general.architecture": "phi3", "phi3.block_count": "32", "phi3.attention.head_count": "32",
             "phi3.embedding_length": "3072"}
    per_token = 32 * 32 * 2 * 96 * 2
    assert kv_bytes_per_token(phi35) == per_token  # 384 KiB per token: no grouped KV heads
    monkeypatch.setattr(batched, "available_memory", lambda: 10 * 2**30)
    # 0.8 x 10 GiB holds int(8 GiB / (1,300 x 384 KiB)) = 16 sequences of 1,300 tokens: 16 of 64 asked.
    assert check_memory(phi35, 64, 1300) == int(0.8 * 10 * 2**30 // (1300 * per_token)) == 16
    assert check_memory(phi35, 4, 1300) == 4
    with pytest.raises(OrpolabError, match="lower n_ctx"):
        check_memory(phi35, 1, 10**6)


def test_the_decoder_takes_fewer_sequences_when_they_do_not_fit_and_says_so(llm, monkeypatch):
    per_seq = kv_bytes_per_token(llm.metadata) * 256
    monkeypatch.setattr(batched, "available_memory", lambda: int(3.5 * per_seq / 0.8))
    with BatchedDecoder(llm, 8, 256) as decoder:
        assert decoder.parallel == 3 and "decoding 3 at a time" in decoder.note
        out = list(decoder.run([Request(llm.tokenize(b"hello there"), 4) for _ in range(5)]))
    assert len(out) == 5


def test_context_is_sized_to_the_requests_within_the_limit():
    requests = [Request([1] * 100, 128), Request([1] * 40, 128)]
    assert context_for(requests, 2048) == 256  # 228 cells, in whole blocks of 64
    assert context_for(requests, 200) == 200
