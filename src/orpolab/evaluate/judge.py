"""Flow Judge on the CPU, in-process: flow-judge's metrics, prompts and parser, our llama.cpp backend.

``LlamaCppFlowJudge`` is a ``flow_judge`` model backend (a ``BaseFlowJudgeModel``) that runs a GGUF of
Flow-Judge-v0.1 through llama-cpp-python: no llamafile server, no subprocess, no POSIX-only calls.
Its output is constrained by a llama.cpp grammar to flow-judge's own format,
``<feedback>...</feedback>`` then ``<score>N</score>`` with N on the metric's scale and the feedback
bounded in length, so flow-judge's parser always finds a verdict (any failure is still counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flow_judge.models.common import BaseFlowJudgeModel
from tqdm.auto import tqdm

from orpolab.core.errors import OrpolabError
from orpolab.core.llama_runtime import check_gguf, open_gguf
from orpolab.core.validate import judge_metric_names
from orpolab.evaluate.batched import TOKENIZER_CTX

if TYPE_CHECKING:
    from flow_judge import EvalInput, EvalOutput, FlowJudge
    from flow_judge.metrics import Metric

# Upper bound on the tokens of "<feedback>", "</feedback>\n<score>", the score and "</score>".
TAG_TOKENS = 64
# The inputs a metric may name that are filled with the reference (correctness and faithfulness presets).
REFERENCE_INPUTS = ("reference_answer", "context")


def verdict_grammar(scores: list[int], max_feedback_chars: int = 600) -> str:
    """GBNF for flow-judge's verdict format with the metric's scores and a bounded feedback.

    Feedback characters are printable ASCII (and newlines) other than ``<``: one byte each, so
    every token adds at least one character and ``max_feedback_chars`` + the tags always fit in
    ``max_feedback_chars + TAG_TOKENS`` tokens: the verdict can never be cut off unfinished.
    """
    score_rule = " | ".join(f'"{s}"' for s in sorted(scores))
    return (
        'root ::= "<feedback>" feedback "</feedback>\\n<score>" score "</score>"\n'
        f"feedback ::= char{{1,{max_feedback_chars}}}\n"
        'char ::= [ -;=-~] | "\\n"\n'
        f"score ::= {score_rule}\n"
    )


def metric_by_name(name: str):
    """A flow-judge preset metric by name (``RESPONSE_CORRECTNESS_5POINT``, ...), or a clear error."""
    from flow_judge import metrics

    presets = judge_metric_names()
    if name not in presets:
        raise OrpolabError(f"unknown judge metric {name!r}; available: {', '.join(presets)}")
    return getattr(metrics, name)


def metric_inputs(metric: Metric, query: str, reference: str | None) -> dict[str, str]:
    """The metric's inputs: the query, and the reference for the inputs that take one."""
    out: dict[str, str] = {}
    for name in metric.required_inputs or []:
        if name == "query":
            out[name] = query
        elif name in REFERENCE_INPUTS:
            if reference is None:
                raise OrpolabError(f"metric {metric.name} needs a reference ({name}) that this set has none of")
            out[name] = reference
        else:
            raise OrpolabError(f"metric {metric.name} needs the input {name!r}, which orpolab cannot fill")
    return out


def eval_input(metric: Metric, inputs: dict[str, str], answer: str) -> EvalInput:
    """flow-judge's input for one answer: the metric's required inputs in its order, the answer as its output.

    Exactly the metric's inputs: an extra one (a reference offered to the reference-free metric) is a
    caller's mistake and is refused rather than silently dropped.
    """
    from flow_judge import EvalInput

    required = list(metric.required_inputs or [])
    if sorted(inputs) != sorted(required):
        raise OrpolabError(f"metric {metric.name} takes the inputs {required}, got {sorted(inputs)}")
    return EvalInput(inputs=[{k: inputs[k]} for k in required], output={metric.required_output: answer})


def judge_many(judge: FlowJudge, inputs: list[EvalInput]) -> Iterator[tuple[int, EvalOutput]]:
    """(index, parsed verdict) for every input, each as soon as its verdict is written (any order).

    flow-judge checks the inputs and formats the prompts exactly as its ``evaluate`` does; a backend
    with ``verdicts`` (:class:`LlamaCppFlowJudge`: several per llama.cpp batch) then gets them all at
    once, any other backend is asked one at a time. Both the verdict stage and the calibration judge
    through here, so a verdict means the same in both.
    """
    from flow_judge import EvalOutput

    stream = getattr(judge.model, "verdicts", None)
    if stream is None:
        for i, one in enumerate(inputs):
            yield i, judge.evaluate(one)
        return
    for one in inputs:
        judge._validate_inputs(one)  # flow-judge's own check and prompt, not a copy of them
    for i, raw in stream([judge._format_prompt(one) for one in inputs]):
        yield i, EvalOutput.parse(raw)


def resolve_judge_file(path: str | None, repo_id: str | None, filename: str | None) -> Path:
    """A local judge GGUF, or one downloaded from the hub (for users with network)."""
    if path:
        return check_gguf(Path(path), "judge model file (evaluation.judge.path)")
    if not (repo_id and filename):
        raise OrpolabError("set evaluation.judge.path, or evaluation.judge.repo_id and evaluation.judge.filename")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:
        raise OrpolabError(f"could not download the judge {repo_id}/{filename}: {err}. Download it once with "
                           "network, or set evaluation.judge.path to a local GGUF.") from err


class LlamaCppFlowJudge(BaseFlowJudgeModel):
    """Flow-Judge-v0.1 (or any GGUF chat model) through llama-cpp-python, grammar-constrained.

    The model is loaded once and reused for every verdict. Up to ``parallel`` verdicts are decoded
    together (:class:`~orpolab.evaluate.batched.BatchedDecoder`: one pass over the weights per token
    serves all of them), each constrained by the grammar; a verdict's prompt starts from the part it
    shares with a prompt already in the KV cache (flow-judge's prompt puts the instructions and the
    question before the answer, so the answers to one question share them). ``parallel=1`` writes
    the verdicts ``create_chat_completion`` writes.
    """

    def __init__(self, gguf: Path, scores: list[int], max_tokens: int = 400, max_feedback_chars: int = 600,
                 n_ctx: int = 4096, threads: int | None = None, name: str | None = None, parallel: int = 1,
                 kv_unified: bool = False, n_gpu_layers: int = 0):
        # Enough tokens for the longest verdict the grammar allows, so none is cut off.
        max_tokens = max(max_tokens, max_feedback_chars + TAG_TOKENS)
        super().__init__(model_id=name or gguf.name, model_type="llama_cpp",
                         generation_params={"temperature": 0.0, "max_tokens": max_tokens})
        # The model's own context only formats and tokenizes: the verdicts are decoded in the decoder's.
        self.llm = open_gguf(gguf, TOKENIZER_CTX, threads, n_gpu_layers=n_gpu_layers)
        self.grammar = verdict_grammar(scores, max_feedback_chars)
        self.max_tokens, self.n_ctx, self.parallel, self.kv_unified = max_tokens, n_ctx, parallel, kv_unified
        self._decoder = None

    def verdicts(self, prompts: list[str]) -> Iterator[tuple[int, str]]:
        """(index, raw verdict) for every prompt, each as soon as it is written (not in prompt order).

        A prompt too long for the context gets ``""`` (flow-judge's parser turns it into score -1,
        counted as a failure).
        """
        from orpolab.evaluate.batched import BatchedDecoder, Request, chat_prompt, context_for

        requests, indices = [], []
        for i, prompt in enumerate(prompts):
            tokens, stop = chat_prompt(self.llm, [{"role": "user", "content": prompt}])
            if len(tokens) + self.max_tokens + 32 > self.n_ctx:
                yield i, ""
                continue
            requests.append(Request(tokens, self.max_tokens, 0, stop))
            indices.append(i)
        if not requests:
            return
        # The KV cache is sized to the verdicts at hand (at most n_ctx per sequence), and kept for the next
        # call (whose prompts may reuse what it holds) unless that call needs longer sequences.
        need = context_for(requests, self.n_ctx)
        if self._decoder is not None and self._decoder.n_ctx_seq < need:
            self._decoder.close()
            self._decoder = None
        if self._decoder is None:
            self._decoder = BatchedDecoder(self.llm, self.parallel, need, grammar=self.grammar,
                                           kv_unified=self.kv_unified)
            if self._decoder.note:
                tqdm.write(f"    judge: {self._decoder.note}")  # above the stage's progress bar
        for done in self._decoder.run(requests):
            yield indices[done.index], done.text

    def _generate(self, prompt: str) -> str:
        return next(iter(self.verdicts([prompt])))[1]

    def _batch_generate(self, prompts: list[str], use_tqdm: bool = True, **kwargs: Any) -> list[str]:
        out = [""] * len(prompts)
        with tqdm(total=len(prompts), desc="judging", unit="verdict", disable=not use_tqdm) as bar:
            for i, text in self.verdicts(prompts):
                out[i] = text
                bar.update()
        return out

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self.llm.close()
