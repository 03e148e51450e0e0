"""Training throughput: orpolab's ORPO step against TRL's ORPOTrainer, same model, data and settings.

    python bench/train_vs_trl.py                  # CPU preset, writes BENCHMARKS.md (about 15 min on 2 cores)
    python bench/train_vs_trl.py --preset llama1b --device cuda --dtype bfloat16   # Llama-3.2-1B shapes, a GPU

Both sides train the same randomly initialised Llama (Llama-3.2's 128,256-token vocabulary, so the
full-vocabulary logits weigh what they weigh in the real model), LoRA r16 on every linear layer of
the decoder, the same batch size, precision, learning rate and beta, on the same synthetic pairs
whose prompt and answer lengths spread like real chat data. TRL runs at its best settings: length-
grouped sampling (``train_sampling_strategy="group_by_length"``), no gradient checkpointing.
Each side runs in its own process (peak memory is per process); repeats alternate the two.

Reported: non-padding tokens per second (prompt + chosen + rejected tokens that are not padding,
over the timed steps), padding fraction of the positions each side computes, peak memory, and
both losses on identical first batches (the same token ids and LoRA weights through both code
paths; they must agree).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from common import DEFAULT_OUT, fmt, peak_rss_mib, summary, write_section
from models import SHAPES, build_hf


@dataclass
class Preset:
    shape: str = "llama_cpu"      # a model shape of bench/models.py
    batch_size: int = 4
    max_length: int = 512
    max_prompt_length: int = 256
    prompt_median: int = 60       # tokens; lognormal spread like chat prompts
    answer_median: int = 110
    spread: float = 0.8
    pairs: int = 400
    warmup_steps: int = 2
    steps: int = 8
    repeats: int = 3


PRESETS = {
    "cpu": Preset(),
    # For the test suite: the script end to end in seconds, figures meaningless.
    "tiny": Preset(shape="tiny_llama", batch_size=2, max_length=96, max_prompt_length=48, prompt_median=12,
                   answer_median=16, pairs=24, warmup_steps=1, steps=2, repeats=1),
    # Llama-3.2-1B's shapes, for users with a GPU (random weights: speed does not depend on their values).
    "llama1b": Preset(shape="llama1b", batch_size=8, max_length=1024, max_prompt_length=512, prompt_median=120,
                      answer_median=250, pairs=800, warmup_steps=3, steps=20, repeats=3),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA, LR, SEED = 0.1, 8e-5, 0


# ---------------------------------------------------------------- model and data


def build_model(preset: Preset, out: Path) -> Path:
    """A random Llama with the preset's shape and the tiny Llama's tokenizer (ids are what matter)."""
    return build_hf(preset.shape, out, dtype="float32")


def make_pairs(preset: Preset, tokenizer) -> list[dict]:
    """Synthetic preference pairs; each word is one token of the tokenizer, lengths lognormal."""
    words = sorted({t for t in tokenizer.get_vocab() if t.startswith("▁") and len(t) > 2 and t[1:].isalpha()})
    words = [w[1:] for w in words]
    rng = random.Random(SEED)

    def text(median: int, low: int, high: int) -> str:
        n = int(min(high, max(low, round(rng.lognormvariate(math.log(median), preset.spread)))))
        return " ".join(rng.choice(words) for _ in range(n))

    pairs = []
    for _ in range(preset.pairs):
        prompt = text(preset.prompt_median, 8, preset.max_prompt_length - 16)
        chosen = text(preset.answer_median, 4, preset.max_length - preset.max_prompt_length)
        rejected = text(preset.answer_median, 4, preset.max_length - preset.max_prompt_length)
        pairs.append({"prompt": prompt, "chosen": [{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}]})
    return pairs


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def load(model_dir: Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)


# ---------------------------------------------------------------- the two sides


def orpolab_data(preset: Preset, work: Path, tokenizer):
    from orpolab.core.defaults import default_settings
    from orpolab.train.data import prepare

    cfg = default_settings("data", path=str(work / "pairs.jsonl"), eval_size=2, split_seed=SEED,
                           max_length=preset.max_length, max_prompt_length=preset.max_prompt_length,
                           batch_size=preset.batch_size, eval_batch_size=preset.batch_size,
                           cache_dir=str(work / "tokenized"), group_by_length=True)
    return cfg, prepare(cfg, tokenizer)


def run_orpolab(preset: Preset, work: Path, dtype: str, device: str) -> dict:
    from orpolab.core.defaults import default_settings
    from orpolab.train.data import PreferenceDataModule
    from orpolab.train.model import load_tokenizer
    from orpolab.train.module import PreferenceModule

    tokenizer = load_tokenizer(default_settings("model", name_or_path=str(work / "model")))
    data_cfg, data = orpolab_data(preset, work, tokenizer)
    model = lora(load(work / "model", dtype, "cpu"))
    module = PreferenceModule(model, default_settings("method", "method=orpo", beta=BETA, nll_on="full"),
                              default_settings("optim", lr=LR, warmup_ratio=0.0, schedule="constant"))
    timer = StepTimer(preset.warmup_steps)
    precision = "bf16-mixed" if dtype == "bfloat16" and device != "cpu" else "32-true"
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, precision=precision,
                        max_steps=preset.warmup_steps + preset.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=PreferenceDataModule(data, data_cfg, tokenizer.pad_token_id, SEED))
    return timer.result()


class StepTimer(L.Callback):
    """Wall time and token counts of every step after the warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.tokens, self.positions, self.i = warmup, [], 0, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.i >= self.warmup:
            self.times.append(time.perf_counter() - self.t0)
            self.tokens += int(batch["attention_mask"].sum())
            self.positions += batch["attention_mask"].numel()
        self.i += 1

    def result(self) -> dict:
        return {"seconds": sum(self.times), "tokens": self.tokens, "positions": self.positions,
                "steps": len(self.times)}


def trl_trainer(preset: Preset, work: Path, model, dtype: str, device: str, steps: int):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": [r["chosen"][0]], "chosen": [r["chosen"][1]], "rejected": [r["rejected"][1]]}
                            for r in rows])
    args = ORPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=preset.batch_size,
                      max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                      beta=BETA, max_length=preset.max_length,
                      train_sampling_strategy="group_by_length", logging_steps=10**6, save_strategy="no",
                      report_to=[], use_cpu=device == "cpu", bf16=dtype == "bfloat16", disable_dropout=True,
                      remove_unused_columns=False, dataloader_num_workers=0, seed=SEED, data_seed=SEED,
                      gradient_checkpointing=False, max_grad_norm=1.0)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    # TRL's ORPO rows have no `input_ids`, so Transformers' length-grouped sampler needs a length
    # column to group by (without it group_by_length raises): the longer of chosen and rejected.
    trainer.train_dataset = trainer.train_dataset.map(
        lambda r: {"length": max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))})
    return trainer


def run_trl(preset: Preset, work: Path, dtype: str, device: str) -> dict:
    from transformers import TrainerCallback

    trainer = trl_trainer(preset, work, lora(load(work / "model", dtype, device)), dtype, device,
                          preset.warmup_steps + preset.steps)
    counts: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        counts.append((tokens, 2 * batch["chosen_input_ids"].shape[0] * width))  # padded to one width, stacked
        return batch

    trainer.data_collator = counting
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    trainer.train()
    timed = range(preset.warmup_steps, len(times))
    return {"seconds": sum(times[i] for i in timed), "tokens": sum(counts[i][0] for i in timed),
            "positions": sum(counts[i][1] for i in timed), "steps": len(timed)}


def compare_losses(preset: Preset, work: Path, dtype: str, device: str) -> dict:
    """Both losses on the same first batches: our tokenized pairs, one LoRA model, both code paths."""
    from orpolab.core.defaults import default_settings
    from orpolab.train.data import PairCollator
    from orpolab.train.model import load_tokenizer
    from orpolab.train.module import PreferenceModule

    tokenizer = load_tokenizer(default_settings("model", name_or_path=str(work / "model")))
    _, data = orpolab_data(preset, work, tokenizer)
    model = lora(load(work / "model", dtype, device))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter in effect (B = 0 would make it the base model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    trainer = trl_trainer(preset, work, model, dtype, device, 1)
    ours = PreferenceModule(model, default_settings("method", "method=orpo", beta=BETA, nll_on="full"),
                            default_settings("optim"))
    collate = PairCollator(tokenizer.pad_token_id)
    rows = []
    for start in range(0, 3 * preset.batch_size, preset.batch_size):
        pairs = data.train[start: start + preset.batch_size]
        batch = {k: v.to(device) for k, v in collate(pairs).items()}
        with torch.no_grad():
            loss, metrics, _ = ours._loss(batch, "train")
            trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch(pairs, tokenizer, device))
        rows.append({"orpolab": float(loss), "trl": float(trl_loss),
                     "orpolab_nll": float(metrics["nll_loss"]), "trl_nll": trl_metrics["nll_loss"],
                     "orpolab_log_odds_ratio": float(metrics["log_odds_ratio"]),
                     "trl_log_odds_ratio": trl_metrics["log_odds_ratio"]})
    return {"batches": rows, "max_abs_diff": max(abs(r["orpolab"] - r["trl"]) for r in rows)}


def trl_batch(pairs: list[dict], tokenizer, device: str) -> dict:
    """TRL's batch layout (chosen_*/rejected_* padded separately) built from the very same token ids."""
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [(p["prompt_ids"], p[f"{side}_ids"]) for p in pairs]
        width = max(len(a) + len(b) for a, b in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (a, b) in enumerate(seqs):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            mask[i, : len(a) + len(b)] = 1
            labels[i, len(a): len(a) + len(b)] = torch.tensor(b)
        out.update({f"{side}_input_ids": ids.to(device), f"{side}_attention_mask": mask.to(device),
                    f"{side}_labels": labels.to(device)})
    return out


# ---------------------------------------------------------------- driver


def child(args) -> None:
    preset = PRESETS[args.preset]
    work = Path(args.work)
    fn = {"orpolab": run_orpolab, "trl": run_trl, "losses": compare_losses}[args.only]
    result = fn(preset, work, args.dtype, args.device)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, only: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--only", only, "--work", str(work), "--preset", args.preset,
           "--dtype", args.dtype, "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{only} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", choices=["orpolab", "trl", "losses"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return child(args)

    preset = PRESETS[args.preset]
    repeats = args.repeats or preset.repeats
    with tempfile.TemporaryDirectory(prefix="orpolab-bench-") as tmp:
        work = Path(tmp)
        shape = SHAPES[preset.shape]
        print(f"building a random Llama ({shape['vocab_size']} vocab, {shape['hidden_size']} wide, "
              f"{shape['num_hidden_layers']} layers) and {preset.pairs} pairs ...", flush=True)
        build_model(preset, work / "model")
        from transformers import AutoTokenizer

        pairs = make_pairs(preset, AutoTokenizer.from_pretrained(work / "model"))
        (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        losses = spawn(args, "losses", work)
        print(f"losses on identical batches: max |orpolab - TRL| = {losses['max_abs_diff']:.2e}", flush=True)
        runs: dict[str, list[dict]] = {"orpolab": [], "trl": []}
        for r in range(repeats):
            for side in (("trl", "orpolab") if r % 2 else ("orpolab", "trl")):
                res = spawn(args, side, work)
                res["tokens_per_s"] = res["tokens"] / res["seconds"]
                runs[side].append(res)
                print(f"repeat {r + 1}/{repeats} {side:8s}: {res['tokens_per_s']:.0f} non-padding tokens/s, "
                      f"padding {1 - res['tokens'] / res['positions']:.1%}, peak {res['peak_rss_mib']:.0f} MiB",
                      flush=True)
    report(args, preset, runs, losses)


def report(args, preset: Preset, runs: dict, losses: dict) -> None:
    shape = SHAPES[preset.shape]
    tps = {s: summary([r["tokens_per_s"] for r in runs[s]]) for s in runs}
    pad = {s: summary([1 - r["tokens"] / r["positions"] for r in runs[s]]) for s in runs}
    mem = {s: summary([r["peak_rss_mib"] for r in runs[s]]) for s in runs}
    ratios = summary([o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(runs["orpolab"], runs["trl"],
                                                                             strict=True)])
    cmd = f"python bench/train_vs_trl.py --preset {args.preset}" + (
        f" --device {args.device} --dtype {args.dtype}" if args.device != "cpu" else "")
    body = "\n".join([
        "## Training throughput: orpolab vs TRL's ORPOTrainer", "",
        f"Command: `{cmd}`. Model: random Llama, vocabulary {shape['vocab_size']:,}, hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, LoRA r16 on all decoder linear layers; batch {preset.batch_size} pairs, "
        f"{args.dtype}, lr {LR}, beta {BETA}, max length {preset.max_length}; {preset.pairs} synthetic pairs, "
        f"prompt and answer lengths lognormal (medians {preset.prompt_median} and {preset.answer_median} tokens). "
        f"TRL with `train_sampling_strategy=\"group_by_length\"`; orpolab with its defaults (length-grouped "
        f"batches, log-probs only at the positions a loss uses). {preset.steps} timed steps after "
        f"{preset.warmup_steps} warm-up steps, {len(runs['trl'])} repeats, each side in its own process; "
        "median (min–max).", "",
        "| | non-padding tokens/s | padding fraction | peak memory (MiB) |", "|---|---|---|---|",
        f"| orpolab | {fmt(tps['orpolab'])} | {fmt(pad['orpolab'], 3)} | {fmt(mem['orpolab'], 0)} |",
        f"| TRL ORPOTrainer | {fmt(tps['trl'])} | {fmt(pad['trl'], 3)} | {fmt(mem['trl'], 0)} |", "",
        f"**orpolab / TRL: {ratios['median']:.2f}x** (per repeat {ratios['min']:.2f}–{ratios['max']:.2f}); "
        "target at least 1.3x.", "",
        f"Losses on the same three first batches (same token ids, same LoRA weights): max |orpolab - TRL| = "
        f"{losses['max_abs_diff']:.2e} (losses " + ", ".join(f"{b['orpolab']:.5f} vs {b['trl']:.5f}"
                                                           for b in losses["batches"]) + ").",
    ])
    write_section(f"train-{args.preset}", body, args.out,
                  raw={"preset": asdict(preset), "runs": runs, "losses": losses, "ratio": ratios})
    print(body)


if __name__ == "__main__":
    main()
