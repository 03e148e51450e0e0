"""Several completions per llama.cpp decode: one pass over the weights serves several answers or verdicts.

On a CPU, generating a token reads every weight once; a ``llama_batch`` carrying one token of each of
several sequences reads them once for all of them. :class:`BatchedDecoder` keeps up to ``parallel``
sequences in flight (continuous batching: a finished sequence's slot takes the next request at once),
each with its own sampler chain (its own grammar, its own seed), and yields each completion as soon as
it is finished, so callers can save it before the others end.

A new request's prompt starts from the longest prefix it shares with a sequence already in the KV cache
(for the judge: the instructions and the question, shared by every answer to it): those cells are
copied (``llama_memory_seq_cp``), not recomputed. Copying part of a sequence needs a unified KV cache
(``kv_unified``); with a split cache a slot only reuses its own previous prompt.

Sampling and stopping mirror llama-cpp-python's ``create_completion`` (grammar then greedy at
temperature 0; top-k 40, typical 1, top-p 0.95, min-p 0.05, temperature, seeded draw otherwise; stop on
an end-of-generation token, a stop string or the token budget), so one sequence at a time gives the
answers ``create_chat_completion`` gives. Everything goes through llama-cpp-python's low-level bindings.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from orpolab.core.errors import OrpolabError

# llama-cpp-python's create_completion defaults for sampled completions.
TOP_K, TYPICAL_P, TOP_P, MIN_P = 40, 1.0, 0.95, 0.05
MAX_BATCH_TOKENS = 512  # tokens per llama_decode call (llama-cpp-python's default n_batch)
# The loaded model's own llama.cpp context only formats and tokenizes prompts: keep its KV cache small.
TOKENIZER_CTX = 256
MIN_SHARED = 16  # a request waits for a prefix being decoded only if it shares more than this many tokens


@dataclass
class Request:
    """One completion to produce: its prompt's token ids, its budget, its seed and its stop strings."""

    tokens: list[int]
    max_tokens: int
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """A finished completion, as ``create_completion`` would report it."""

    index: int  # the request's position in the input
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of generation or a stop string) or "length" (the budget)
    prompt_tokens: int
    reused_tokens: int  # prompt tokens taken from the KV cache instead of decoded


@dataclass
class _Slot:
    """A sequence in flight."""

    index: int
    request: Request
    sampler: ctypes.c_void_p
    prompt_done: int  # prompt tokens already in the KV cache
    reused: int
    generated: list[int] = field(default_factory=list)
    multibyte_fix: int = 0


def chat_prompt(llm, messages: list[dict]) -> tuple[list[int], tuple[str, ...]]:
    """The prompt tokens and stop strings ``llm.create_chat_completion(messages)`` would use.

    The model's chat handler (from the GGUF's template or a format llama-cpp-python recognised) is
    run against a stand-in that records what it would pass to ``create_completion``, so the prompt is
    formatted exactly as llama-cpp-python does it, whatever the template.
    """
    from llama_cpp import llama_chat_format

    handler = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
               or llama_chat_format.get_chat_completion_handler(llm.chat_format))
    recorder = _PromptRecorder(llm)
    try:
        handler(llama=recorder, messages=messages)
    except _Recorded as done:
        stop = done.stop if done.stop is not None else []
        return list(done.prompt), tuple([stop] if isinstance(stop, str) else stop)
    raise OrpolabError("the model's chat template did not produce a prompt")


class _Recorded(Exception):  # noqa: N818 - a signal, not an error
    def __init__(self, prompt: list[int], stop) -> None:
        super().__init__("recorded")
        self.prompt, self.stop = prompt, stop


class _PromptRecorder:
    """Passes everything to the model except ``create_completion``, whose arguments it records."""

    def __init__(self, llm) -> None:
        self._llm = llm

    def __getattr__(self, name: str):
        return getattr(self._llm, name)

    def create_completion(self, prompt, stop=None, **kwargs):
        raise _Recorded(prompt, stop)


class BatchedDecoder:
    """Up to ``parallel`` sequences decoded together in one llama.cpp context of the model ``llm`` holds.

    ``n_ctx_seq``: the most tokens (prompt and completion) one sequence may hold. The context has room
    for ``parallel`` such sequences, or for as many as fit in free memory (then ``note`` says so).
    ``grammar``: GBNF text constraining every completion (rule ``root``), or None. The context is the
    decoder's own (``llm``'s is left alone), freed by :meth:`close`.
    """

    def __init__(self, llm, parallel: int, n_ctx_seq: int, grammar: str | None = None, temperature: float = 0.0,
                 kv_unified: bool = True) -> None:
        import llama_cpp

        if parallel < 1:
            raise OrpolabError(f"sequences per batch must be at least 1, got {parallel}")
        # Fewer sequences than asked when their KV cache would not fit; `note` tells the caller why.
        fits = check_memory(llm.metadata, parallel, n_ctx_seq)
        self.note = (f"{parallel} sequences per batch do not fit in free memory; decoding {fits} at a time"
                     if fits < parallel else None)
        parallel = fits
        self.llm, self.parallel, self.n_ctx_seq = llm, parallel, n_ctx_seq
        self.grammar = grammar.encode() if grammar else None
        self.temperature, self.kv_unified = float(temperature), kv_unified
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = parallel * n_ctx_seq
        params.n_batch = params.n_ubatch = min(params.n_ctx, MAX_BATCH_TOKENS)
        params.n_seq_max = parallel
        params.kv_unified = kv_unified
        self.n_batch = params.n_batch
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise OrpolabError(f"llama.cpp could not make a context for {parallel} sequences of {n_ctx_seq} tokens "
                               "(out of memory?); lower the sequences per batch (`parallel`) or n_ctx")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llm._model.vocab
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # Tokens whose KV cells each sequence holds, in positions 0..len-1 (kept after it finishes, for reuse).
        self.cached: list[list[int]] = [[] for _ in range(parallel)]

    # ------------------------------------------------------------------ public

    def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Complete every request; yields each completion as soon as it is finished (not in input order)."""
        import llama_cpp

        pending = deque(enumerate(requests))
        for i, req in pending:
            if len(req.tokens) + req.max_tokens > self.n_ctx_seq:
                raise OrpolabError(f"request {i} needs {len(req.tokens)} prompt + {req.max_tokens} completion tokens, "
                                   f"more than the {self.n_ctx_seq} a sequence may hold")
            if not req.tokens:
                raise OrpolabError(f"request {i} has an empty prompt")
        slots: list[_Slot | None] = [None] * self.parallel
        try:
            while pending or any(slots):
                for s in range(self.parallel):
                    if slots[s] is None and (nxt := self._next(pending, slots)) is not None:
                        slots[s] = self._admit(s, *nxt)
                wanted = self._fill_batch(slots)
                rc = llama_cpp.llama_decode(self.ctx, self.batch)
                if rc != 0:
                    why = "the KV cache is full; lower `parallel` or raise n_ctx" if rc == 1 else "see its log"
                    raise OrpolabError(f"llama.cpp could not decode a batch of {self.batch.n_tokens} tokens "
                                       f"(code {rc}): {why}")
                for s, batch_index in wanted:
                    slot = slots[s]
                    token = llama_cpp.llama_sampler_sample(slot.sampler, self.ctx, batch_index)
                    done = self._step(slot, token)
                    if done is not None:
                        llama_cpp.llama_sampler_free(slot.sampler)
                        slots[s] = None
                        yield done
        finally:
            for slot in slots:
                if slot is not None:
                    llama_cpp.llama_sampler_free(slot.sampler)

    def close(self) -> None:
        """Free the context and the batch (the model stays with ``llm``)."""
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> BatchedDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ steps

    def _next(self, pending: deque, slots: list[_Slot | None]) -> tuple[int, Request] | None:
        """The first pending request that does not wait for a prefix another sequence is still decoding.

        Two answers to one question arrive one after the other: the second waits until the first's
        prompt is in the cache (a decode or two), then copies the shared part instead of decoding it.
        """
        for k, (index, req) in enumerate(pending):
            cached = max(_common_prefix(c, req.tokens) for c in self.cached)
            coming = max((_common_prefix(x.request.tokens, req.tokens) for x in slots
                          if x is not None and x.prompt_done < len(x.request.tokens)), default=0)
            if coming <= cached + MIN_SHARED:
                del pending[k]
                return index, req
        return None

    def _admit(self, s: int, index: int, req: Request) -> _Slot:
        """Put a request in slot ``s``, starting from the longest prefix already in the KV cache."""
        import llama_cpp

        limit = len(req.tokens) - 1  # the last prompt token is always decoded: its logits give the first token
        sources = range(self.parallel)
        best, reused = s, 0
        for src in sources:
            n = min(_common_prefix(self.cached[src], req.tokens), limit)
            if n > reused or (n == reused and src == s):
                best, reused = src, n
        if best == s:
            llama_cpp.llama_memory_seq_rm(self.memory, s, reused, -1)
        elif self.kv_unified:  # the prefix's cells get the new sequence's id too: nothing is copied
            llama_cpp.llama_memory_seq_rm(self.memory, s, -1, -1)
            llama_cpp.llama_memory_seq_cp(self.memory, best, s, 0, reused)
        else:  # a split cache copies whole sequences only: copy, then drop what is not shared
            llama_cpp.llama_memory_seq_rm(self.memory, s, -1, -1)
            llama_cpp.llama_memory_seq_cp(self.memory, best, s, -1, -1)
            llama_cpp.llama_memory_seq_rm(self.memory, s, reused, -1)
        self.cached[s] = list(req.tokens[:reused])
        return _Slot(index, req, self._sampler(req.seed), prompt_done=reused, reused=reused)

    def _sampler(self, seed: int):
        """A sampler chain like llama-cpp-python's for ``create_completion`` at this temperature."""
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if self.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(self.vocab, self.grammar, b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise OrpolabError("llama.cpp could not parse the grammar")
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if self.temperature == 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            for sampler in (llama_cpp.llama_sampler_init_top_k(TOP_K),
                            llama_cpp.llama_sampler_init_typical(TYPICAL_P, 1),
                            llama_cpp.llama_sampler_init_top_p(TOP_P, 1), llama_cpp.llama_sampler_init_min_p(MIN_P, 1),
                            llama_cpp.llama_sampler_init_temp(self.temperature),
                            llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)):
                llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    def _fill_batch(self, slots: list[_Slot | None]) -> list[tuple[int, int]]:
        """One decode's tokens: each generating sequence's last token, then prompt chunks in the room left.

        Returns (slot, batch index) for every sequence whose next token is sampled after this decode.
        """
        batch, n, wanted = self.batch, 0, []

        def add(s: int, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, len(self.cached[s]), 1
            batch.seq_id[n][0], batch.logits[n] = s, int(logits)
            self.cached[s].append(token)
            if logits:
                wanted.append((s, n))
            n += 1

        for s, slot in enumerate(slots):
            if slot is not None and slot.prompt_done == len(slot.request.tokens):
                add(s, slot.generated[-1], True)
        for s, slot in enumerate(slots):
            if slot is None or slot.prompt_done == len(slot.request.tokens):
                continue
            take = min(len(slot.request.tokens) - slot.prompt_done, self.n_batch - n)
            for _ in range(take):
                slot.prompt_done += 1
                add(s, slot.request.tokens[slot.prompt_done - 1], slot.prompt_done == len(slot.request.tokens))
            if n == self.n_batch:
                break
        batch.n_tokens = n
        return wanted

    def _step(self, slot: _Slot, token: int) -> Completion | None:
        """Record a sampled token; the completion if the sequence is finished (as create_completion decides)."""
        import llama_cpp

        req = slot.request
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._finish(slot, self._text(slot), "stop")
        slot.generated.append(token)
        text = self._text(slot)
        for k, char in enumerate(text[-3:]):  # an unfinished multi-byte character: wait for its end
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    slot.multibyte_fix = num - k
        if slot.multibyte_fix > 0:
            slot.multibyte_fix -= 1
            # create_completion waits for the character's end past the budget, and forever where tokens
            # with no text follow a lone lead byte; the sequence's KV cells are sized to the budget.
            if len(slot.generated) >= req.max_tokens:
                return self._finish(slot, text, "length")
            return None
        stops = [s.encode() for s in req.stop if s.encode() in text]
        if stops:
            return self._finish(slot, text[: text.index(stops[0])], "stop")
        if len(slot.generated) >= req.max_tokens:
            return self._finish(slot, text, "length")
        return None

    def _text(self, slot: _Slot) -> bytes:
        return self.llm.detokenize(slot.generated, prev_tokens=slot.request.tokens)

    def _finish(self, slot: _Slot, text: bytes, reason: str) -> Completion:
        return Completion(slot.index, text.decode("utf-8", errors="ignore"), list(slot.generated), reason,
                          len(slot.request.tokens), slot.reused)


def kv_bytes_per_token(metadata: dict[str, str]) -> int:
    """Bytes of KV cache one token takes (keys and values of every layer, 16 bits each), from GGUF metadata.

    Models without grouped KV heads (Phi-3.5: 32 KV heads of 96) take several times more than those
    with (Llama-3.2-1B: 8 of 64): 384 KiB against 32 KiB per token.
    """
    arch = metadata.get("general.architecture", "llama")
    layers = int(metadata.get(f"{arch}.block_count", 0))
    heads = int(metadata.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    width = int(metadata.get(f"{arch}.embedding_length", 0))
    head_k = int(metadata.get(f"{arch}.attention.key_length", width // max(1, heads)))
    head_v = int(metadata.get(f"{arch}.attention.value_length", head_k))
    return layers * kv_heads * (head_k + head_v) * 2


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable), or a large number where it cannot tell."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def check_memory(metadata: dict[str, str], parallel: int, n_ctx_seq: int, share: float = 0.8) -> int:
    """How many of ``parallel`` sequences of ``n_ctx_seq`` tokens fit in ``share`` of free memory.

    ``parallel`` is a most, not a must: a default chosen for speed on one machine may not fit another,
    and fewer sequences per batch only cost speed. Refused, with a sentence, when not even one fits.
    """
    per_seq = kv_bytes_per_token(metadata) * n_ctx_seq
    free = available_memory()
    fits = int(share * free // max(1, per_seq))
    if fits < 1:
        raise OrpolabError(f"one sequence of {n_ctx_seq} tokens needs a KV cache of {per_seq / 2**30:.1f} GiB and "
                           f"{free / 2**30:.1f} GiB are free: lower n_ctx")
    return min(parallel, fits)


def context_for(requests: list[Request], limit: int) -> int:
    """Tokens per sequence for these requests: the longest prompt plus its budget, at most ``limit``.

    The KV cache is ``parallel`` times this, so sizing it to the requests rather than to the configured
    window lets many more sequences share a batch (a 100-token prompt with a 128-token answer needs
    228 cells, not 2,048).
    """
    need = max((len(r.tokens) + r.max_tokens for r in requests), default=1)
    return max(1, min(limit, -(-need // 64) * 64))  # whole blocks of 64: fewer differently sized contexts


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
