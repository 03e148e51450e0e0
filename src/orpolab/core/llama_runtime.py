"""The llama.cpp runtime every stage shares: open a GGUF, read its metadata, route llama.cpp's log.

The export converts, quantizes and verifies GGUFs, the evaluation answers and judges with them, the
chat command talks to one and the benchmarks time them: all of them open GGUFs the same way, and
all of llama.cpp's per-tensor chatter goes to one log file (``<sweep>/logs/llama.cpp.log``) instead
of the console.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from orpolab.core import console
from orpolab.core.errors import OrpolabError
from orpolab.core.machine import available_cores

_log_file: Path | None = None
_log_callback = None  # the ctypes callback must outlive every llama.cpp call that may log through it


def route_logs(log_file: Path | None) -> None:
    """Send llama.cpp's own log (model loader, quantizer, per tensor) to ``log_file``, appended.

    llama.cpp logs through one process-wide callback; llama-cpp-python's default prints to
    stderr (``None`` puts it back). The converter subprocess and whatever C code writes straight to
    stderr during a quantization go to the same file. With ``ORPOLAB_VERBOSE=1`` all of it is also
    shown on stderr.
    """
    global _log_file, _log_callback
    import llama_cpp
    from llama_cpp import _logger

    if log_file is None:
        _log_file = None
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        _log_callback = None
        return
    _log_file = Path(log_file)
    _log_file.parent.mkdir(parents=True, exist_ok=True)
    sink = open(_log_file, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - lives as long as the callback
    echo = console.verbose()

    @llama_cpp.llama_log_callback
    def to_file(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        sink.write(line)
        sink.flush()
        if echo:
            sys.stderr.write(line)
            sys.stderr.flush()

    _log_callback = to_file
    llama_cpp.llama_log_set(to_file, ctypes.c_void_p(0))


def log_file() -> Path | None:
    """Where llama.cpp's log goes now (None: the console)."""
    return _log_file


def gguf_metadata(gguf_file: Path) -> dict[str, str]:
    """String metadata of a GGUF as llama-cpp-python reads it (chat template, names, token ids)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=64, verbose=False, vocab_only=True)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def check_gguf(path: Path, what: str = "GGUF file") -> Path:
    """``path`` if it is an existing GGUF file (by its magic bytes), else a clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OrpolabError(f"{what} {path} does not exist")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise OrpolabError(f"{what} {path} is not a GGUF file")
    return path


GPU_BUILD_HINT = ("rebuild llama-cpp-python with GPU support: CMAKE_ARGS=\"-DGGML_CUDA=on\" (NVIDIA) or "
                  "CMAKE_ARGS=\"-DGGML_METAL=on\" (Apple silicon, the default there) pip install --force-reinstall "
                  "--no-cache-dir llama-cpp-python")


def check_gpu_offload(n_gpu_layers: int, key: str = "n_gpu_layers") -> None:
    """Refuse GPU offload on a llama-cpp-python build without a GPU backend: llama.cpp would quietly run on
    the CPU instead, and the user would wait for hours believing the GPU was working."""
    if not n_gpu_layers:
        return
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        raise OrpolabError(f"{key}={n_gpu_layers} asks for the GPU, but this llama-cpp-python build has no GPU "
                           f"backend; {GPU_BUILD_HINT}, or set {key}=0")


def open_gguf(path: Path, n_ctx: int, threads: int | None = None, what: str = "GGUF file", n_gpu_layers: int = 0,
              **kwargs):
    """Load a GGUF with llama-cpp-python (all cores unless told; ``n_gpu_layers`` on the GPU), after checking
    it is one."""
    from llama_cpp import Llama

    check_gpu_offload(n_gpu_layers)
    path = check_gguf(path, what)
    threads = threads or available_cores()
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                 n_gpu_layers=n_gpu_layers, **kwargs)
