"""llama.cpp's own tools, as shipped in the llama-cpp-python source distribution.

* ``convert_hf_to_gguf.py`` (with its ``conversion/`` and ``gguf-py/`` folders) turns a Hugging
  Face folder into a GGUF. It is taken from the sdist of the *installed* llama-cpp-python version,
  fetched through the package registry (``pip download``) once and cached, so converter and
  runtime always come from the same llama.cpp.
* ``llama_model_quantize`` (the bindings) quantizes a GGUF.

Both print a line per tensor; with :func:`orpolab.core.llama_runtime.route_logs` those lines, and
llama.cpp's model-loader log, go to a file (``<sweep>/logs/llama.cpp.log``) instead of the console.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from orpolab.core import console
from orpolab.core.choices import QUANT_TYPES
from orpolab.core.errors import OrpolabError
from orpolab.core.llama_runtime import log_file
from orpolab.core.machine import available_cores

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
# Vocabulary-only GGUFs of real tokenizers from llama.cpp's test models (the benchmarks count real prompt tokens).
VOCAB_FILES = ("models/ggml-vocab-phi-3.gguf", "models/ggml-vocab-llama-bpe.gguf")
# Generous limits: converting a 22B model takes tens of minutes on a small machine; the sdist is about 60 MB.
CONVERT_TIMEOUT_S = 4 * 3600
DOWNLOAD_TIMEOUT_S = 900
SETUP_HINT = "run `make setup` (or `python -m orpolab.export.llamacpp {cache}`) once, with network"


def installed_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as err:
        raise OrpolabError("llama-cpp-python is not installed; run `make setup`") from err


def converter_dir(cache_dir: str | Path, fetch: bool = True) -> Path:
    """Folder holding llama.cpp's converter of the installed version.

    Not cached yet: fetched from the package registry with a line saying so, or, with
    ``fetch=False`` (the export), an error naming ``make setup``: an export should not start a
    download nobody asked for.
    """
    version = installed_version()
    target = Path(cache_dir) / f"llama.cpp-{version}"
    if all((target / part).exists() for part in CONVERTER_PARTS + VOCAB_FILES):
        return target
    if not fetch:
        raise OrpolabError(f"llama.cpp's converter for llama-cpp-python {version} is not in {target}; "
                           + SETUP_HINT.format(cache=cache_dir))
    print(f"downloading llama.cpp's converter (source of llama-cpp-python=={version}, about 60 MB) "
          f"into {target} ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = download_sdist(version, Path(tmp))
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and (m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS
                                                         or m.name[len(prefix):] in VOCAB_FILES)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def download_sdist(version: str, folder: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """llama-cpp-python's source distribution, through pip (so the user's index settings apply)."""
    what = f"downloading llama-cpp-python=={version}'s source distribution (it carries llama.cpp's converter)"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
             f"llama-cpp-python=={version}", "-d", str(folder)],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        raise OrpolabError(f"{what} timed out after {timeout:.0f} s; check the network or the package index") from err
    archives = list(folder.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise OrpolabError(f"{what} failed: {proc.stderr.strip()[-500:]}")
    return archives[0]


def convert(model_dir: Path, out_file: Path, cache_dir: str | Path, outtype: str = "f16",
            name: str | None = None, timeout: float = CONVERT_TIMEOUT_S) -> Path:
    """HF folder -> GGUF with llama.cpp's converter, written to a temporary name, then renamed.

    ``name`` becomes the GGUF's ``general.name`` (front ends show it); the converter's default is
    the folder's name. Its output (a line per tensor) goes to the llama.cpp log file when one is
    set (:func:`orpolab.core.llama_runtime.route_logs`); a failure or a run past ``timeout`` seconds names the step.
    """
    script = converter_dir(cache_dir) / "convert_hf_to_gguf.py"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the script then puts its own gguf-py first on sys.path
    args = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    args += ["--model-name", name] if name else []
    step = f"converting {model_dir} to GGUF"
    try:
        run_logged(args, step, timeout, env=env)
    except OrpolabError:
        tmp.unlink(missing_ok=True)
        raise
    if not tmp.exists():
        raise OrpolabError(f"{step} wrote no file" + (f"; see {log_file()}" if log_file() else ""))
    os.replace(tmp, out_file)
    return out_file


def run_logged(args: list[str], step: str, timeout: float, env: dict | None = None) -> None:
    """Run a tool to completion, its output appended to the llama.cpp log; a failure names ``step``.

    The error carries the tool's last lines, so it says why without opening the log.
    """
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        try:
            proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout)
            failure = None if proc.returncode == 0 else f"{step} failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            failure = f"{step} timed out after {timeout:g} s"
        out.seek(0)
        text = out.read()
    target = log_file()
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(f"\n$ {' '.join(args)}\n{text}")
    if console.verbose():
        print(text, end="", file=sys.stderr, flush=True)
    if failure:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise OrpolabError(failure + (f"; its log: {target}" if target else "") + (f"\n{tail}" if tail else ""))


def ftype(name: str) -> int:
    import llama_cpp

    if name.upper() not in QUANT_TYPES:
        raise OrpolabError(f"unsupported quantization type {name!r}; choose from {', '.join(QUANT_TYPES)}")
    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> Path:
    """Quantize a GGUF with llama.cpp's quantizer (``llama_model_quantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(quant)
    params.nthread = threads or available_cores()
    tmp = dst.with_name(f".{dst.name}.partial")
    with console.native_stderr_to(log_file()):  # anything the quantizer prints around the log callback
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        where = f"; see {log_file()}" if log_file() else ""
        raise OrpolabError(f"quantizing {src} to {quant} failed (llama.cpp code {rc}){where}")
    os.replace(tmp, dst)
    return dst


def tensor_types(gguf_file: Path, cache_dir: str | Path) -> dict[str, str]:
    """Tensor name -> GGML type name, read with the converter's own gguf-py."""
    gguf_py = str(converter_dir(cache_dir) / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def write_added_tokens_decoder(folder: Path, tokenizer) -> None:
    """Record the tokenizer's added tokens in ``tokenizer_config.json`` as transformers 4 did.

    llama.cpp's converter types SentencePiece vocabularies' special tokens (CONTROL or
    USER_DEFINED) from ``added_tokens_decoder`` in that file; transformers 5 no longer writes it,
    and without it llama.cpp splits ``<|start_header_id|>`` and friends into bytes.
    """
    import json

    config_file = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config["added_tokens_decoder"] = {
        str(token_id): {"content": tok.content, "special": bool(tok.special), "lstrip": tok.lstrip,
                        "rstrip": tok.rstrip, "normalized": tok.normalized, "single_word": tok.single_word}
        for token_id, tok in sorted(tokenizer.added_tokens_decoder.items())
    }
    tmp = config_file.with_name(f".{config_file.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    os.replace(tmp, config_file)


if __name__ == "__main__":
    # `python -m orpolab.export.llamacpp [cache_dir]`: fetch the converter now (make setup does), not mid-export.
    sys.exit(console.run_cli(lambda: print(converter_dir(sys.argv[1] if len(sys.argv) > 1 else ".cache"))))
