"""Random-weight models at real shapes, as Hugging Face folders and GGUFs (speed does not depend on weights).

The tokenizer is the tiny model's of the same family (SentencePiece, built locally): llama.cpp's
converter pads the vocabulary to the model's size, so the output layer has its real width.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import ROOT

SHAPES = {
    # Llama-3.2-1B: 1.24B parameters, tied embeddings.
    "llama1b": dict(family="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True),
    # The training benchmark's CPU model: Llama-3.2's vocabulary, small enough for 2 cores.
    "llama_cpu": dict(family="llama", vocab_size=128256, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=1536, tie_word_embeddings=True),
    # Llama-3.2-1B's width, heads and vocabulary with 2 of its 16 layers: the training benchmark on a CPU.
    "llama1b_2layers": dict(family="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=2,
                            num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                            tie_word_embeddings=True),
    # Phi-3.5-mini (Flow-Judge-v0.1's base): 3.8B parameters.
    "phi35mini": dict(family="phi", vocab_size=32064, hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=8192, tie_word_embeddings=False),
    # For the test suite.
    "tiny_llama": dict(family="llama", vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True),
    "tiny_phi": dict(family="phi", vocab_size=32064, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=False),
}


def build_hf(shape: str | dict, out: Path, dtype: str = "bfloat16") -> Path:
    """A random model with the shape's config (a name in SHAPES or its fields), saved with the family's
    tiny tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    from orpolab.demo import tiny

    spec = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    family = spec.pop("family")
    src = ROOT / ".cache" / "tiny_models" / f"tiny_{family}"
    if not tiny.is_current(src):
        tiny.build(family, src, ROOT / "data" / "sample")
    tok = AutoTokenizer.from_pretrained(src)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        config = LlamaConfig(**spec, **special, max_position_embeddings=8192, rope_theta=500000.0)
        cls = LlamaForCausalLM
    else:
        config = Phi3Config(**spec, **special, max_position_embeddings=4096, original_max_position_embeddings=4096)
        cls = Phi3ForCausalLM
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build in 16 bits: a 3.8B model in float32 needs 15 GiB
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = dtype
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if (src / "tokenizer.model").is_file():  # the converter's SentencePiece path reads it
        (out / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    from orpolab.export.llamacpp import write_added_tokens_decoder

    write_added_tokens_decoder(out, tok)
    return out


def build_ggufs(hf_dir: Path, out_dir: Path, quants: list[str], name: str) -> dict[str, Path]:
    """f16 GGUF through llama.cpp's converter, then each quantization; returns {type: path} with timings printed."""
    from orpolab.export import llamacpp

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = {"F16": llamacpp.convert(hf_dir, out_dir / f"{name}-f16.gguf", str(ROOT / ".cache"), "f16", name=name)}
    print(f"converted to f16 GGUF in {time.perf_counter() - t0:.0f} s", flush=True)
    for q in quants:
        t0 = time.perf_counter()
        files[q] = llamacpp.quantize(files["F16"], out_dir / f"{name}-{q}.gguf", q)
        print(f"quantized to {q} in {time.perf_counter() - t0:.0f} s", flush=True)
    return files


def memory_bandwidth_gbs(size_mib: int = 1024, repeats: int = 5) -> float:
    """Read+write bandwidth of a large copy on all threads (GB/s, best of ``repeats``).

    Generating one token reads every weight once, so weight bytes / this bandwidth bounds the
    generation speed from below in time (above in tokens per second).
    """
    import torch

    a = torch.ones(size_mib * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def random_gguf(shape: str, work: Path, quant: str) -> Path:
    """A random-weight model at ``shape``'s sizes as one GGUF in ``quant`` (the f16 step is deleted: only
    the quantization the benchmark times is kept, a 3.8B f16 file is 7 GB)."""
    print(f"building a random model at {shape} shapes ...", flush=True)
    hf_dir = build_hf(shape, work / "hf", dtype="bfloat16")
    gguf = build_ggufs(hf_dir, work / "gguf", [quant], f"{shape}-random")[quant]
    for f in (work / "gguf").glob("*-f16.gguf"):
        f.unlink()
    return gguf
