"""Chat with an exported GGUF in the terminal, on the CPU, through its own chat template.

    python -m orpolab.evaluate.chat multirun/demo/<date>/export/gguf/winner-Q4_K_M.gguf

llama-cpp-python formats the conversation with the template stored in the GGUF and streams the
answer token by token. ``/reset`` clears the conversation; ``/exit`` or Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orpolab.core.errors import OrpolabError
from orpolab.core.machine import available_cores
from orpolab.export.llamacpp import open_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a GGUF model on the CPU.")
    parser.add_argument("gguf", help="path to a .gguf file")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=available_cores())
    args = parser.parse_args(argv)
    try:
        llm = open_gguf(Path(args.gguf), args.ctx, args.threads)
    except OrpolabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    name = llm.metadata.get("general.name", Path(args.gguf).stem)
    print(f"Chatting with {name} ({Path(args.gguf).name}). /reset clears, /exit or Ctrl-D leaves.", flush=True)
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                messages = list(base)
                continue
            messages.append({"role": "user", "content": text})
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
    except KeyboardInterrupt:
        print()
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
