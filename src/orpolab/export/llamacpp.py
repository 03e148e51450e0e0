"""llama.cpp's own tools, as shipped in the llama-cpp-python source distribution.

* ``convert_hf_to_gguf.py`` (with its ``conversion/`` and ``gguf-py/`` folders) turns a Hugging
  Face folder into a GGUF. It is taken from the sdist of the *installed* llama-cpp-python version,
  fetched through the package registry (``pip download``) once and cached, so converter and
  runtime always come from the same llama.cpp.
* ``llama_model_quantize`` (the bindings) quantizes a GGUF.
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

from orpolab.core.config import QUANT_TYPES
from orpolab.core.errors import OrpolabError
from orpolab.core.machine import available_cores

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
# Vocabulary-only GGUFs of real tokenizers from llama.cpp's test models (the benchmarks count real prompt tokens).
VOCAB_FILES = ("models/ggml-vocab-phi-3.gguf", "models/ggml-vocab-llama-bpe.gguf")


def installed_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as err:
        raise OrpolabError("llama-cpp-python is not installed; run `make setup`") from err


def converter_dir(cache_dir: str | Path) -> Path:
    """Folder holding llama.cpp's converter of the installed version, fetched on first use."""
    version = installed_version()
    target = Path(cache_dir) / f"llama.cpp-{version}"
    if all((target / part).exists() for part in CONVERTER_PARTS + VOCAB_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
             f"llama-cpp-python=={version}", "-d", tmp],
            capture_output=True, text=True,
        )
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise OrpolabError(
                f"could not fetch llama-cpp-python=={version}'s source distribution from the package registry "
                f"(it carries llama.cpp's convert_hf_to_gguf.py): {proc.stderr.strip()[-500:]}"
            )
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archives[0]) as tar:
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


def convert(model_dir: Path, out_file: Path, cache_dir: str | Path, outtype: str = "f16",
            name: str | None = None) -> Path:
    """HF folder -> GGUF with llama.cpp's converter, written to a temporary name, then renamed.

    ``name`` becomes the GGUF's ``general.name`` (front ends show it); the converter's default is
    the folder's name.
    """
    script = converter_dir(cache_dir) / "convert_hf_to_gguf.py"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the script then puts its own gguf-py first on sys.path
    args = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    proc = subprocess.run(args + (["--model-name", name] if name else []), capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise OrpolabError(f"llama.cpp's converter failed on {model_dir}:\n{proc.stderr.strip()[-2000:]}")
    os.replace(tmp, out_file)
    return out_file


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
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise OrpolabError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
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


def open_gguf(path: Path, n_ctx: int, threads: int | None = None, what: str = "GGUF file", **kwargs):
    """Load a GGUF with llama-cpp-python (all cores unless told), after checking it is one."""
    from llama_cpp import Llama

    path = check_gguf(path, what)
    threads = threads or available_cores()
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                 **kwargs)



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
    print(converter_dir(sys.argv[1] if len(sys.argv) > 1 else ".cache"))
