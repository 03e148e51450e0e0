"""Check that a GGUF is the model that was trained, before anyone chats with it or judges it.

1. Tokenization: llama.cpp and the Hugging Face tokenizer must give identical token ids for the
   same chat-formatted texts (a wrong vocabulary shows up here first).
2. Predictions: on held-out chat-formatted text, the PyTorch model and the GGUF each give a
   perplexity and their top-1 next-token predictions; the GGUF's perplexity may exceed the
   PyTorch one by at most a configured ratio and the top-1 agreement must reach a configured
   floor (per quantization type). A wrong tensor layout collapses both.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from orpolab.core.config import VerifyConfig
from orpolab.core.llama_runtime import open_gguf


def hf_token_stats(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of each next token and the argmax prediction, from the PyTorch model."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1)
    target = torch.tensor(ids[1:])
    return logps.gather(-1, target[:, None])[:, 0].numpy(), logits.argmax(-1).numpy()


def gguf_token_stats(llm, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The same from llama.cpp (``logits_all=True``), through llama-cpp-python's ``eval``."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logps = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logps[np.arange(len(ids) - 1), ids[1:]], logits.argmax(-1)


def verify_gguf(hf_model, tokenizer, gguf_file: Path, texts: list[str], quant: str, cfg: VerifyConfig,
                threads: int | None = None, prompt_texts: list[str] | None = None) -> dict:
    """Compare one GGUF with the PyTorch model on ``texts``; returns figures and ``passed``.

    With ``prompt_texts`` (each a prefix of its text), perplexity and agreement are measured on the
    answer tokens only, the part the model was trained to predict; token ids are compared on
    the whole text either way.
    """
    hf_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    starts = [max(0, len(tokenizer(p, add_special_tokens=False)["input_ids"]) - 1) for p in prompt_texts] \
        if prompt_texts else [0] * len(texts)
    n_ctx = max(len(i) for i in hf_ids) + 8
    llm = open_gguf(gguf_file, n_ctx, threads, logits_all=True, n_batch=n_ctx)
    try:
        mismatched = []
        for text, ids in zip(texts, hf_ids, strict=True):
            cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if cpp_ids != ids:
                mismatched.append({"text": text[:200], "hf": ids[:40], "llama_cpp": cpp_ids[:40]})
        hf_lp, cpp_lp, agree, total = [], [], 0, 0
        for ids, start in tqdm(list(zip(hf_ids, starts, strict=True)), desc=f"verify {gguf_file.name}", unit="text",
                               disable=None):
            lp_h, top_h = (a[start:] for a in hf_token_stats(hf_model, ids))
            lp_c, top_c = (a[start:] for a in gguf_token_stats(llm, ids))
            hf_lp.append(lp_h)
            cpp_lp.append(lp_c)
            agree += int((top_h == top_c).sum())
            total += len(top_h)
    finally:
        llm.close()
    ppl_hf = math.exp(-float(np.concatenate(hf_lp).mean()))
    ppl_gguf = math.exp(-float(np.concatenate(cpp_lp).mean()))
    max_ratio = cfg.max_ppl_ratio.get(quant.upper(), cfg.default_max_ppl_ratio)
    min_agree = cfg.min_top1_agreement.get(quant.upper(), cfg.default_min_top1_agreement)
    result = {
        "gguf": str(gguf_file), "quant": quant.upper(), "texts": len(texts), "tokens": total,
        "token_id_mismatches": len(mismatched), "mismatch_examples": mismatched[:3],
        "ppl_pytorch": ppl_hf, "ppl_gguf": ppl_gguf, "ppl_ratio": ppl_gguf / ppl_hf,
        "top1_agreement": agree / total, "max_ppl_ratio": max_ratio, "min_top1_agreement": min_agree,
    }
    result["passed"] = (not mismatched and result["ppl_ratio"] <= max_ratio and result["top1_agreement"] >= min_agree)
    return result
