"""After the sweep: selection, merge, GGUF conversion and quantization, verification, chat."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpolab.core import llama_runtime
from orpolab.core.config import LoraSettings, ModelConfig
from orpolab.core.defaults import default_settings
from orpolab.core.errors import OrpolabError
from orpolab.core.records import JobRecord
from orpolab.export import llamacpp
from orpolab.export import merge as merge_mod
from orpolab.export.merge import build_adapted, check_memory, load_adapter_state, merge
from orpolab.export.verify import verify_gguf
from orpolab.export.winners import rank, select_winners, sweep_parent

from .helpers import RANDOM_TINY, ROOT, TINY_DIR, compose, run_train, runs

CACHE = str(ROOT / ".cache")


def export_cli(args: list[str], uri: str) -> subprocess.CompletedProcess:
    """``python -m orpolab.export ...`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "orpolab.export", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})


# ------------------------------------------------------------------ a real sweep, exported by its hook


def test_hook_exports_the_winner_with_verified_ggufs(sweep):
    out = sweep["dir"] / "export"
    summary = json.loads((out / "export.json").read_text())
    assert summary["passed"], summary["verification"]
    for name in ("winner-f16.gguf", "winner-Q4_K_M.gguf", "base-f16.gguf", "base-Q4_K_M.gguf"):
        assert (out / "gguf" / name).is_file(), name
    assert (out / "merged" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    for check in summary["verification"]:
        assert check["token_id_mismatches"] == 0
        assert check["ppl_ratio"] <= check["max_ppl_ratio"] and check["top1_agreement"] >= check["min_top1_agreement"]
        # A trained model, not near-uniform logits: perplexity far below the vocabulary size.
        assert check["ppl_pytorch"] < 0.1 * len(AutoTokenizer.from_pretrained(out / "merged"))
    # Named after the winner, so front ends show what they serve.
    assert "orpolab winner" in llama_runtime.gguf_metadata(out / "gguf" / "winner-Q4_K_M.gguf")["general.name"]
    # K-quants really applied to the 256-wide tensors.
    types = llamacpp.tensor_types(out / "gguf" / "winner-Q4_K_M.gguf", CACHE)
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    # Recorded on the sweep's MLflow parent run.
    parent = MlflowClient(sweep["uri"]).get_run(sweep_parent(sweep["uri"], "orpolab", str(sweep["dir"])).run_id)
    assert parent.data.tags["orpolab.export_passed"] == "True"
    assert parent.data.tags["orpolab.winner_run_id"] == summary["winner"]["run_id"]
    assert parent.data.metrics["export/Q4_K_M/token_id_mismatches"] == 0
    # The winner's value is logged under the metric the jobs were ranked by.
    assert parent.data.metrics["winner/val/chosen_bpb"] == pytest.approx(summary["winner"]["value"])
    artifacts = {a.path for a in MlflowClient(sweep["uri"]).list_artifacts(parent.info.run_id, "export")}
    assert "export/export.json" in artifacts and "export/gguf" in artifacts
    ranking = MlflowClient(sweep["uri"]).download_artifacts(parent.info.run_id, "selection/ranking.json")
    assert len(json.loads(Path(ranking).read_text())["ranking"]) == 2


@pytest.mark.subprocess
def test_export_by_hand_on_an_existing_sweep(own_sweep):
    sweep = own_sweep
    shutil.rmtree(sweep["dir"] / "export" / "gguf")
    proc = export_cli([str(sweep["dir"]), "--quant", "Q8_0", "--no-base"], sweep["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep["dir"] / "export" / "export.json").read_text())
    assert set(summary["gguf"]["winner"]) == {"F16", "Q8_0"} and summary["gguf"]["base"] == {}
    assert summary["passed"] and (sweep["dir"] / "export" / "gguf" / "winner-Q8_0.gguf").is_file()
    # By parent run id as well, and the winner is the same job.
    parent_id = summary["parent_run_id"]
    proc = export_cli(["--run-id", parent_id, "--quant", "Q8_0", "--no-base"], sweep["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((sweep["dir"] / "export" / "export.json").read_text())["winner"]["run_id"] == \
        summary["winner"]["run_id"]


def test_merged_model_logits_equal_base_plus_adapter(sweep):
    summary = json.loads((sweep["dir"] / "export" / "export.json").read_text())
    cfg = summary["winner"]["config"]
    model_cfg, lora_cfg = ModelConfig(**cfg["model"]), LoraSettings(**cfg["lora"])
    # Paths in export.json are relative to the sweep folder.
    best = str(sweep["dir"] / summary["winner"]["best_checkpoint"])
    adapted = build_adapted(model_cfg, lora_cfg, best, torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(sweep["dir"] / summary["merged_model"], dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 3, 50, 60, 70, 4, 17, 17, 80, 90]])
    with torch.no_grad():
        a, m, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-4)
    assert (m - b).abs().max() > 1e-2  # the adapter really changed the model


@pytest.mark.subprocess
def test_verification_fails_a_deliberately_broken_conversion(sweep, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    merged_dir = sweep["dir"] / "export" / "merged"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    hf = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Let k = {a} and x = 7. What is k?"},
                                      {"role": "assistant", "content": f"k = {a}. The answer is {a}."}],
                                     tokenize=False) for a in range(10, 18)]
    cfg = default_settings("export.verify")
    good = llamacpp.convert(merged_dir, tmp_path / "good.gguf", CACHE)
    assert verify_gguf(hf, tok, good, texts, "F16", cfg)["passed"]

    # Wrong tensor layout: attention projections with their rows permuted (what a missed rope permute does).
    layout = tmp_path / "layout"
    shutil.copytree(merged_dir, layout)
    broken = AutoModelForCausalLM.from_pretrained(layout, dtype=torch.float32)
    for layer in broken.model.layers:
        w = layer.self_attn.q_proj.weight.data
        layer.self_attn.q_proj.weight.data = w.view(-1, 2, w.shape[1]).flip(1).reshape_as(w).clone()
        w = layer.self_attn.k_proj.weight.data
        layer.self_attn.k_proj.weight.data = w.view(-1, 2, w.shape[1]).flip(1).reshape_as(w).clone()
    broken.save_pretrained(layout)
    result = verify_gguf(hf, tok, llamacpp.convert(layout, tmp_path / "layout.gguf", CACHE), texts, "F16", cfg)
    assert not result["passed"]
    assert result["ppl_ratio"] > cfg.max_ppl_ratio["F16"] or result["top1_agreement"] < cfg.min_top1_agreement["F16"]

    # Wrong vocabulary: two pieces of the SentencePiece model swapped.
    vocab = tmp_path / "vocab"
    shutil.copytree(merged_dir, vocab)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((vocab / "tokenizer.model").read_bytes())
    ids = [tok.convert_tokens_to_ids(t) for t in ("▁=", ".")]  # two frequent ordinary pieces
    assert tok.unk_token_id not in ids
    a, b = proto.pieces[ids[0]], proto.pieces[ids[1]]
    a.piece, b.piece = b.piece, a.piece
    (vocab / "tokenizer.model").write_bytes(proto.SerializeToString())
    result = verify_gguf(hf, tok, llamacpp.convert(vocab, tmp_path / "vocab.gguf", CACHE), texts, "F16", cfg)
    assert not result["passed"] and result["token_id_mismatches"] > 0


# ------------------------------------------------------------------ conversion per architecture


@pytest.mark.parametrize("family,eot", [("llama", "<|eot_id|>"), ("phi", "<|end|>"), ("mistral", "</s>")])
@pytest.mark.subprocess
def test_each_tiny_architecture_converts_quantizes_and_loads(tiny_models, tmp_path, family, eot):
    from llama_cpp import Llama

    src = TINY_DIR / f"tiny_{family}"
    f16 = llamacpp.convert(src, tmp_path / "f16.gguf", CACHE)
    q = llamacpp.quantize(f16, tmp_path / "q4km.gguf", "Q4_K_M")
    assert "Q4_K" in set(llamacpp.tensor_types(q, CACHE).values())
    tok = AutoTokenizer.from_pretrained(src)
    llm = Llama(model_path=str(q), n_ctx=256, verbose=False)
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                       add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)[
            "input_ids"]
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        assert llm.token_eos() == tok.convert_tokens_to_ids(tok.eos_token)
        assert llm.detokenize([tok.convert_tokens_to_ids(eot)], special=True).decode() == eot
        out = llm.create_chat_completion([{"role": "user", "content": "What is 3 + 4?"}], max_tokens=5)
        assert out["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        llm.close()


@pytest.mark.subprocess
def test_a_base_model_without_a_chat_template_learns_to_stop_at_the_fallbacks_eos_in_its_gguf(tiny_models,
                                                                                              tracking_uri, tmp_path):
    from orpolab.evaluate.generate import answer_prompts

    base = tmp_path / "base"  # the random tiny_llama, its chat template removed: a base model
    shutil.copytree(TINY_DIR / "tiny_llama", base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(base).chat_template
    sweep = tmp_path / "sweep"
    # Measured: SFT at the demo's rate does not stop after 10 steps, stops after 15 (with only "." before
    # the end), and after 60 gives the task's answer form (" = 9. The answer is 9.", values not yet right)
    # closed by the end-of-turn token, in 30 of 30 answers (ORPO alike).
    # One thread, here and for the answers: on a busy machine two threads that wait on each other take
    # several times as long for a model this small (measured: 20 answers 0.4 s with one, 45 s with two).
    proc = run_train(["-m", "experiment=demo", RANDOM_TINY, f"model.name_or_path={base}", "method=sft",
                      "trainer.max_steps=60", "trainer.val_check_interval=60", "data.max_eval_rows=10",
                      "eval_before_training=false", "trainer.enable_progress_bar=false", "threads=1",
                      "export.quant_types=[]", "export.verify.num_texts=8", "evaluation.enabled=false",
                      f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    fallback = OmegaConf.load(sweep / "0" / ".hydra" / "config.yaml").data.fallback_chat_template
    # The merged model's tokenizer and both GGUFs (trained and base, answers compared like with like)
    # carry the template training used, whose turns end with the tokenizer's EOS: llama.cpp's end of generation.
    merged = AutoTokenizer.from_pretrained(sweep / "export" / "merged")
    assert merged.chat_template == fallback
    turn = merged.apply_chat_template([{"role": "user", "content": "What is k?"},
                                       {"role": "assistant", "content": "k = 3."}], tokenize=False)
    assert turn.endswith("k = 3." + merged.eos_token)
    gguf = sweep / "export" / "gguf"
    for name in ("winner-f16.gguf", "base-f16.gguf"):
        meta = llama_runtime.gguf_metadata(gguf / name)
        assert meta["tokenizer.chat_template"] == fallback, name
        assert int(meta["tokenizer.ggml.eos_token_id"]) == merged.eos_token_id, name
    summary = json.loads((sweep / "export" / "export.json").read_text())
    assert summary["passed"] and summary["verification"][0]["token_id_mismatches"] == 0
    # The evaluation's answers, through llama-cpp-python's chat completion and so the GGUF's template:
    # the trained model's end by themselves after an answer; the untrained base's run on.
    prompts = [{"id": i, "prompt": json.loads(line)["prompt"]}
               for i, line in enumerate((ROOT / "data" / "sample" / "prompts.jsonl").read_text().splitlines()[:20])]
    cfg = default_settings("evaluation.generation", max_tokens=32, n_ctx=256, threads=1)
    trained = answer_prompts(gguf / "winner-f16.gguf", prompts, tmp_path / "winner.jsonl", cfg, "winner")
    untrained = answer_prompts(gguf / "base-f16.gguf", prompts, tmp_path / "base.jsonl", cfg, "base")
    assert sum(a["finish_reason"] == "stop" and "The answer is" in a["answer"] for a in trained) >= 16, trained
    assert sum(a["finish_reason"] == "stop" for a in untrained) <= 4, untrained


# ------------------------------------------------------------------ selection


def cand(job: int, value: float | None, status: str = "FINISHED", start: int = 0) -> JobRecord:
    return JobRecord(run_id=f"r{job}", job_num=job, status=status, value=value, best_checkpoint=None,
                     output_dir=None, overrides="", start_time=start)


def test_rank_ignores_failed_runs_and_breaks_ties_by_job_number():
    cands = [cand(3, 1.5), cand(1, 1.5), cand(2, 0.5, "FAILED"), cand(0, 2.0), cand(4, None), cand(5, float("nan"))]
    assert [c.job_num for c in rank(cands, "min")] == [1, 3, 0]
    assert [c.job_num for c in rank(cands, "max")] == [0, 1, 3]
    # Values equal but for float noise are a tie too.
    assert [c.job_num for c in rank([cand(2, 1.0), cand(1, 1.0 + 1e-15)], "min")] == [1, 2]


def _fake_sweep(uri: str, tmp_path: Path, jobs: list[tuple]) -> str:
    """Fake child runs ``(job, status, value[, method])`` under a sweep's parent run."""
    from orpolab.core import tracking

    sweep_dir = str(tmp_path / "sweep")
    parent = tracking.ensure_sweep_run(uri, "orpolab", sweep_dir)
    exp = tracking.experiment_id(uri, "orpolab")
    c = MlflowClient(uri)
    for num, status, value, *method in jobs:
        ckpt = tmp_path / f"job{num}.ckpt"
        ckpt.write_bytes(b"x")
        tags = {"mlflow.parentRunId": parent, "orpolab.job_num": str(num), "orpolab.output_dir": str(tmp_path),
                "orpolab.selection_metric": "val/chosen_bpb", "orpolab.best_checkpoint": str(ckpt),
                "orpolab.method": method[0] if method else "orpo"}
        run = c.create_run(exp, tags=tags)
        if value is not None:
            c.log_metric(run.info.run_id, "best/val/chosen_bpb", value)
        c.set_terminated(run.info.run_id, status)
    return sweep_dir


def test_select_winner_logs_ranking_on_the_parent_run(tracking_uri, tmp_path):
    sweep_dir = _fake_sweep(tracking_uri, tmp_path, [(0, "FINISHED", 2.0), (1, "FINISHED", 1.2),
                                                     (2, "FINISHED", 1.2), (3, "FAILED", 0.1)])
    parent = sweep_parent(tracking_uri, "orpolab", sweep_dir)
    winners = select_winners(tracking_uri, parent, "val/chosen_bpb", "min")
    assert list(winners) == ["winner"] and winners["winner"].job_num == 1  # one method: one winner
    parent = MlflowClient(tracking_uri).get_run(parent.run_id)
    assert parent.data.tags["orpolab.winner_job"] == "1"
    path = MlflowClient(tracking_uri).download_artifacts(parent.info.run_id, "selection/ranking.json")
    table = json.loads(Path(path).read_text())
    assert [r["job_num"] for r in table["ranking"]] == [1, 2, 0]
    assert [r["job_num"] for r in table["ignored"]] == [3]


def test_a_mixed_method_sweep_has_one_winner_per_method(tracking_uri, tmp_path):
    sweep_dir = _fake_sweep(tracking_uri, tmp_path, [
        (0, "FINISHED", 2.0, "orpo"), (1, "FINISHED", 1.5, "dpo"), (2, "FINISHED", 0.9, "sft"),
        (3, "FINISHED", 1.8, "orpo"), (4, "FINISHED", 1.7, "dpo"), (5, "FAILED", None, "simpo")])
    parent = sweep_parent(tracking_uri, "orpolab", sweep_dir)
    winners = select_winners(tracking_uri, parent)
    # SFT has the best value overall, but each method keeps its own best job; SimPO had none finish.
    assert {label: w.job_num for label, w in winners.items()} == {"orpo": 3, "dpo": 1, "sft": 2}
    parent = MlflowClient(tracking_uri).get_run(parent.run_id)
    assert parent.data.tags["orpolab.winner.dpo_job"] == "1"
    assert parent.data.metrics["winner/orpo/val/chosen_bpb"] == pytest.approx(1.8)
    path = MlflowClient(tracking_uri).download_artifacts(parent.info.run_id, "selection/ranking.json")
    assert json.loads(Path(path).read_text())["per_method"] == {"orpo": [3, 0], "dpo": [1, 4], "sft": [2], "simpo": []}


@pytest.mark.subprocess
def test_a_sweep_where_every_job_failed_exports_nothing(tracking_uri, tmp_path):
    sweep_dir = _fake_sweep(tracking_uri, tmp_path, [(0, "FAILED", None), (1, "FAILED", None)])
    proc = export_cli([sweep_dir], tracking_uri)
    assert proc.returncode == 1
    assert "no finished job to export" in proc.stderr and "2 failed" in proc.stderr
    assert not (Path(sweep_dir) / "export").exists()


def test_exported_adapter_is_the_best_checkpoint_not_the_last(tiny_models, tracking_uri, tmp_path):
    from orpolab.train.job import run

    # Ranking by the *highest* bits per byte makes the first evaluation the best one, so best != last.
    run(compose(["experiment=demo", RANDOM_TINY, "trainer.max_steps=20", "trainer.val_check_interval=10",
                 "trainer.enable_progress_bar=false", "selection.mode=max"], tmp_path / "job"))
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    best_file, last_file = (str(tmp_path / "job" / result[k]) for k in ("best_checkpoint", "last_checkpoint"))
    assert Path(best_file).name == "best-step10.ckpt"
    parent = runs(tracking_uri)[0]
    assert Path(parent.data.tags["orpolab.best_checkpoint"]).resolve() == Path(best_file).resolve()
    best, last = load_adapter_state(best_file), load_adapter_state(last_file)
    model = build_adapted(default_settings("model", "model=tiny_llama", name_or_path=str(TINY_DIR / "tiny_llama")),
                          default_settings("lora", r=16, alpha=32), best_file, torch.float32)
    key = max(best, key=lambda k: (best[k] - last[k]).abs().max().item())
    assert (best[key] - last[key]).abs().max() > 0
    loaded = dict(model.named_parameters())[key]
    assert torch.equal(loaded, best[key]) and not torch.equal(loaded, last[key])


# ------------------------------------------------------------------ bad input


@pytest.mark.subprocess
def test_missing_sweep_folder_and_run_id(tracking_uri):
    for args, message in ((["/nonexistent/sweep"], "sweep folder /nonexistent/sweep does not exist"),
                          (["--run-id", "0123456789abcdef"], "MLflow run 0123456789abcdef does not exist"),
                          (["/nonexistent/sweep", "--quant", "Q3_XYZ"],
                           "export.quant_types: unknown quantization type(s) Q3_XYZ")):
        proc = export_cli(args, tracking_uri)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_missing_or_corrupt_adapter(tmp_path):
    with pytest.raises(OrpolabError, match="does not exist"):
        load_adapter_state(tmp_path / "none.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(OrpolabError, match="corrupt"):
        load_adapter_state(bad)
    torch.save({"state_dict": {"model.x.weight": torch.zeros(1)}}, tmp_path / "nolora.ckpt")
    with pytest.raises(OrpolabError, match="no LoRA weights"):
        load_adapter_state(tmp_path / "nolora.ckpt")


def test_memory_check_stops_a_model_that_does_not_fit(monkeypatch):
    from transformers import MistralConfig

    # Mistral-Small-Instruct-2409's shapes: about 22B parameters, 44 GB in bf16.
    config = MistralConfig(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
                           num_key_value_heads=8, vocab_size=32768, head_dim=128)
    n = merge_mod.parameter_count(config)
    assert 21e9 < n < 23e9
    monkeypatch.setattr(merge_mod, "available_memory", lambda: 24 * 2**30)
    with pytest.raises(OrpolabError, match=r"needs about 4\d\.\d GiB .* only 24\.0 GiB is available"):
        check_memory("mistralai/Mistral-Small-Instruct-2409", n, torch.bfloat16, headroom=1.0)


def test_merge_refuses_when_memory_or_disk_is_short(tiny_models, tmp_path, monkeypatch):
    model_cfg = default_settings("model", "model=tiny_llama", name_or_path=str(TINY_DIR / "tiny_llama"),
                                 lora_target_modules="all-linear")
    monkeypatch.setattr(merge_mod, "available_memory", lambda: 1000)
    with pytest.raises(OrpolabError, match="of memory"):
        merge(model_cfg, default_settings("lora"), tmp_path / "x.ckpt", tmp_path / "merged")
    monkeypatch.setattr(merge_mod, "available_memory", lambda: 2**40)
    monkeypatch.setattr(merge_mod, "free_disk", lambda path: 10)
    with pytest.raises(OrpolabError, match="of disk"):
        merge(model_cfg, default_settings("lora"), tmp_path / "x.ckpt", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------ chat


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    out, deadline = b"", time.time() + timeout
    while marker not in out and time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


@pytest.mark.subprocess
def test_chat_command_in_a_pseudo_terminal(sweep):
    gguf = sweep["dir"] / "export" / "gguf" / "winner-f16.gguf"
    pid, fd = pty.fork()
    if pid == 0:  # child: the chat command on the pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-m", "orpolab.evaluate.chat", str(gguf), "--max-tokens", "24"])
    try:
        banner = _read_until(fd, b"you> ", 60)
        assert b"Chatting with" in banner and b"you> " in banner
        os.write(fd, b"What is 3 + 4?\n")
        reply = _read_until(fd, b"you> ", 60)
        assert b"model> " in reply and reply.rstrip().endswith(b"you>")
        answer = reply.split(b"model> ", 1)[1].rsplit(b"you>", 1)[0].strip()
        assert answer, reply  # the trained model says something and stops or hits the budget
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)
