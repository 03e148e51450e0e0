"""Chat with an exported GGUF in the terminal, on the CPU, through its own chat template.

    python -m orpolab.evaluate.chat multirun/demo/<date>/export/gguf/winner-Q4_K_M.gguf

llama-cpp-python formats the conversation with the template stored in the GGUF and streams the
answer token by token. ``/reset`` clears the conversation; ``/exit`` or Ctrl-D leaves. A turn that
no longer fits the context window is refused with a sentence (``/reset``, or a larger ``--ctx``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orpolab.core import console
from orpolab.core.llama_runtime import open_gguf
from orpolab.core.machine import available_cores


def conversation_tokens(llm, messages: list[dict]) -> int:
    """Tokens of the conversation as the model reads it: formatted by the GGUF's own chat template."""
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", errors="ignore") if token >= 0 else ""

        prompt = Jinja2ChatFormatter(template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))(
            messages=messages).prompt
    else:  # no template: a lower bound, the contents alone
        prompt = "\n".join(m["content"] for m in messages)
    return len(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))


def check_turn(llm, messages: list[dict], n_ctx: int, max_tokens: int) -> tuple[str | None, str | None]:
    """(refusal, note) for the next turn: a refusal when the conversation leaves no room for an answer,
    a note when the answer will be cut shorter than ``max_tokens``.

    llama.cpp would raise "Requested tokens exceed context window" for the first case; the user
    needs to know what to do instead.
    """
    n = conversation_tokens(llm, messages)
    if n >= n_ctx:
        return (f"this turn does not fit: the conversation is now {n} tokens and the context holds {n_ctx}. "
                "Type /reset to start a new conversation, or restart with a larger --ctx."), None
    if n + max_tokens > n_ctx:
        return None, f"(only {n_ctx - n} tokens of context left for the answer; /reset soon)"
    return None, None


def chat(llm, name: str, args: argparse.Namespace) -> None:
    """The read-answer loop until /exit, Ctrl-D or Ctrl-C."""
    print(f"Chatting with {name} ({Path(args.gguf).name}). /reset clears, /exit or Ctrl-D leaves.", flush=True)
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(base)
            continue
        refusal, note = check_turn(llm, [*messages, {"role": "user", "content": text}], args.ctx, args.max_tokens)
        if refusal:
            print(refusal, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        if note:
            print(note, flush=True)
        print("model> ", end="", flush=True)
        answer = []
        stream = llm.create_chat_completion(messages, max_tokens=args.max_tokens, stream=True,
                                            temperature=args.temperature, seed=args.seed)
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                answer.append(piece)
                print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(answer)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a GGUF model on the CPU.")
    parser.add_argument("gguf", help="path to a .gguf file")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=available_cores())
    console.add_debug_flag(parser)
    args = parser.parse_args(argv)

    def run() -> None:
        llm = open_gguf(Path(args.gguf), args.ctx, args.threads)
        try:
            chat(llm, llm.metadata.get("general.name", Path(args.gguf).stem), args)
        except KeyboardInterrupt:
            print()
        finally:
            llm.close()

    return console.run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
