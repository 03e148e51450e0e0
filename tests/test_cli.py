"""Errors as sentences, subprocess limits, checkpoint safety, and what reaches the console."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orpolab.core import console, llama_runtime, tracking
from orpolab.core.errors import OrpolabError
from orpolab.export import llamacpp

from .helpers import ROOT, SWEEP_STEPS

VOCAB_GGUF = ROOT / ".cache" / f"llama.cpp-{metadata.version('llama-cpp-python')}" / "models" / \
    "ggml-vocab-llama-bpe.gguf"
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def module_cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------ errors as sentences


@pytest.mark.parametrize("module,args,message", [
    ("orpolab.evaluate", ["/nonexistent/sweep"], "has no export"),
    ("orpolab.evaluate.chat", ["/nonexistent/model.gguf"], "GGUF file /nonexistent/model.gguf does not exist"),
])
@pytest.mark.subprocess
def test_stage_commands_answer_a_mistake_with_one_sentence(tmp_path, module, args, message):
    proc = module_cli(module, *args, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_an_unexpected_error_names_its_type_and_the_debug_switch(capsys, monkeypatch):
    monkeypatch.delenv(console.DEBUG_ENV, raising=False)

    def broken() -> None:
        raise KeyError("tokenizer.chat_template")

    assert console.run_cli(broken) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: KeyError: 'tokenizer.chat_template'") and "ORPOLAB_DEBUG=1" in err
    with pytest.raises(KeyError):  # --debug: the traceback as it is
        console.run_cli(broken, debug_switch=True)
    monkeypatch.setenv(console.DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        console.run_cli(broken)


def test_a_single_run_ends_with_a_sentence_even_on_an_unexpected_error(monkeypatch, capsys):
    from orpolab.train import job

    monkeypatch.delenv(console.DEBUG_ENV, raising=False)
    monkeypatch.setattr(job, "run", lambda cfg: 1 / 0)
    with pytest.raises(SystemExit) as exit_:
        job.main(None)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("error: ZeroDivisionError: division by zero")
    monkeypatch.setenv(console.DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        job.main(None)


# ------------------------------------------------------------------ llama.cpp's tools: limits, caching


def fake_converter(cache: Path, script: str) -> Path:
    """A converter cache whose convert_hf_to_gguf.py is ``script``."""
    folder = cache / f"llama.cpp-{llamacpp.installed_version()}"
    for part in ("conversion", "gguf-py", "models"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    for vocab in llamacpp.VOCAB_FILES:
        (folder / vocab).write_bytes(b"")
    (folder / "convert_hf_to_gguf.py").write_text(script)
    return folder


@pytest.mark.subprocess
def test_a_converter_that_hangs_or_fails_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_runtime, "_log_file", tmp_path / "logs" / "llama.cpp.log")
    (tmp_path / "logs").mkdir()
    out = tmp_path / "gguf" / "model-f16.gguf"
    fake_converter(tmp_path / "hang", "import time\nprint('converting', flush=True)\ntime.sleep(30)\n")
    with pytest.raises(OrpolabError, match=r"converting .*merged to GGUF timed out after 0\.5 s"):
        llamacpp.convert(tmp_path / "merged", out, tmp_path / "hang", timeout=0.5)
    fake_converter(tmp_path / "fail", "import sys\nprint('KeyError: rope_scaling', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(OrpolabError, match=r"(?s)converting .*merged to GGUF failed \(exit 3\).*rope_scaling"):
        llamacpp.convert(tmp_path / "merged", out, tmp_path / "fail")
    assert not out.exists() and not list(out.parent.glob(".*partial"))
    # The tool's own output is kept in the llama.cpp log, not on the console.
    assert "rope_scaling" in (tmp_path / "logs" / "llama.cpp.log").read_text()


def test_the_export_does_not_download_the_converter_unasked(tmp_path):
    with pytest.raises(OrpolabError, match=r"not in .*; run `make setup`"):
        llamacpp.converter_dir(tmp_path / "empty-cache", fetch=False)
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.subprocess
def test_setup_fetch_command_keeps_working_on_a_cached_converter():
    proc = module_cli("orpolab.export.llamacpp", str(ROOT / ".cache"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith(f"llama.cpp-{llamacpp.installed_version()}")


# ------------------------------------------------------------------ checkpoints load weights only


class NotATensor:
    """Stands for an arbitrary object in a checkpoint: unpickling it could run code."""


def test_checkpoints_load_weights_only(tmp_path):
    from orpolab.export.merge import load_adapter_state

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.q.lora_A.weight": torch.ones(2)}, "loops": {"step": 3}}, good)
    assert list(load_adapter_state(good)) == ["q.lora_A.weight"]
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"model.q.lora_A.weight": torch.ones(2)}, "extra": NotATensor()}, unsafe)
    with pytest.raises(OrpolabError, match=r"holds an object of type .*NotATensor.*could run code"):
        load_adapter_state(unsafe)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(OrpolabError, match="is corrupt or not a Lightning checkpoint"):
        load_adapter_state(cut)


# ------------------------------------------------------------------ chat turns that do not fit


def test_a_chat_turn_longer_than_the_context_is_refused():
    from llama_cpp import Llama

    from orpolab.evaluate.chat import check_turn, conversation_tokens

    llm = Llama(model_path=str(VOCAB_GGUF), vocab_only=True, verbose=False)  # a real Llama-3 tokenizer
    llm.metadata["tokenizer.chat_template"] = LLAMA3_TEMPLATE
    turn = [{"role": "user", "content": "What is 3 + 4?"}]
    # The templated conversation: <|begin_of_text|>, the header (4 tokens), 8 of text, <|eot_id|>, the answer's header.
    assert conversation_tokens(llm, turn) == 1 + 4 + 8 + 1 + 4
    assert check_turn(llm, turn, n_ctx=512, max_tokens=64) == (None, None)
    refusal, _ = check_turn(llm, [{"role": "user", "content": "word " * 300}], n_ctx=256, max_tokens=64)
    assert refusal.startswith("this turn does not fit") and "/reset" in refusal and "--ctx" in refusal
    _, note = check_turn(llm, turn, n_ctx=40, max_tokens=64)
    assert "22 tokens of context left" in note


# ------------------------------------------------------------------ the console


def record(name: str, level: int, **extra) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    rec.__dict__.update(extra)
    return rec


def test_console_keeps_stage_lines_warnings_and_errors_and_files_the_rest(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    shown = console.ConsoleFilter().filter
    assert shown(record("orpolab.train.progress", logging.INFO, console=True))
    assert shown(record("hydra.core.utils", logging.INFO))  # the launcher's "#0 : ..." lines
    assert shown(record("orpolab.train.data.tokenize", logging.WARNING))
    assert shown(record("transformers.modeling_utils", logging.ERROR))
    assert not shown(record("orpolab.train.job", logging.INFO))  # details: the job's log file
    assert not shown(record("lightning.pytorch.utilities.rank_zero", logging.INFO))  # "GPU available: False"
    assert not shown(record("bitsandbytes.backends.cpu.ops", logging.WARNING))  # missing `kernels`
    assert not shown(record("orpolab.train.job", logging.ERROR, console=False))  # printed as a sentence instead
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert shown(record("lightning.pytorch.utilities.rank_zero", logging.INFO))


def test_step_progress_bar_counts_steps_and_ends_with_one_line(caplog):
    from orpolab.train.progress import StepProgressBar

    bar = StepProgressBar(metrics=["train/loss", "val/chosen_bpb", "val/chosen_bpb"])
    trainer = SimpleNamespace(global_step=0, max_steps=150, is_global_zero=True, callback_metrics={})
    bar.on_train_start(trainer, None)
    for step in range(1, 151):
        trainer.global_step = step
        trainer.callback_metrics = {"train/loss": torch.tensor(1.0 / step), "val/chosen_bpb": torch.tensor(0.25)}
        bar.on_train_batch_end(trainer, None, None, None, step - 1)
    with caplog.at_level(logging.INFO, logger="orpolab.train.progress"):
        bar.on_train_end(trainer, None)
    (line,) = [r for r in caplog.records if r.name == "orpolab.train.progress"]
    assert line.console and line.getMessage().startswith("  trained 150 steps in 0m")
    assert line.getMessage().endswith("train/loss 0.007, val/chosen_bpb 0.250")


def test_experiments_open_on_the_runs_table(tracking_uri):
    c = tracking.client(tracking_uri)
    exp = c.get_experiment(tracking.experiment_id(tracking_uri, "orpolab"))
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND == "custom_model_development"
    # An experiment made before the tag existed gets it; a kind someone chose stays.
    old = c.create_experiment("older")
    tracking.experiment_id(tracking_uri, "older")
    assert c.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = c.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.experiment_id(tracking_uri, "chosen")
    assert c.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


PER_TENSOR = re.compile(r"^\[\s*\d+/\s*\d+\] |llama_model_quantize|llama_model_loader|^INFO:hf-to-gguf", re.M)


def test_the_sweep_console_is_short_and_ends_with_the_headline(sweep):
    out, err = sweep["stdout"], sweep["stderr"]
    lines = out.splitlines()
    assert len(lines) <= 60, out
    # llama.cpp's per-tensor and loader lines, and the libraries' notices, are in the log files only.
    assert not PER_TENSOR.search(out + err)
    assert PER_TENSOR.search((sweep["dir"] / "logs" / "llama.cpp.log").read_text())
    for noise in ("GPU available", "Tip: For seamless cloud logging", "Loading weights", "kernels-community",
                  "is deprecated", "Traceback"):
        assert noise not in out + err, noise
    # Every stage's result is there: each job, the export's figures, the evaluation.
    assert "Sweep finished: 2 job(s) finished, 0 failed." in out
    assert sum(line.startswith(f"  trained {SWEEP_STEPS} steps in ") for line in lines) == 2
    assert re.search(r"winner-Q4_K_M\.gguf +token ids identical .* ok$", out, re.M)
    assert re.search(r"^    winner: 6 answers, \d+% ended by themselves$", out, re.M)
    # The headline, then the report's path, last.
    assert lines[-1] == f"report: {sweep['report']}"
    start = max(i for i, line in enumerate(lines) if line.startswith("Result: winner = job "))
    headline = lines[start:-1]
    assert all(line.startswith("  ") for line in headline[1:]) and len(headline) == 5
    assert re.match(r"  value right +base [01]\.\d+ \[.*\]  winner .* paired difference [+-]", headline[1])
    assert re.match(r"  exact +base [01]\.\d+ \[.*\]  winner .* paired difference [+-]", headline[2])
    assert "judge (correctness, 5point)" in headline[3] and "stand-in" in headline[3]


@pytest.mark.subprocess
def test_what_c_code_prints_to_stderr_goes_to_the_log_file_for_a_while(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    log = tmp_path / "logs" / "llama.cpp.log"
    probe = ("import os, sys; sys.path.insert(0, sys.argv[2]); from orpolab.core import console\n"
             "with console.native_stderr_to(sys.argv[1]):\n    os.write(2, b'[  1/ 22] blk.0.attn_k.weight\\n')\n"
             "os.write(2, b'after\\n')\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(log), str(ROOT / "src")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "after\n"
    assert log.read_text() == "[  1/ 22] blk.0.attn_k.weight\n"
