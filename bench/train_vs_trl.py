"""Training throughput: orpolab's ORPO step against TRL's ORPOTrainer, same model, data and settings.

    python bench/train_vs_trl.py                  # CPU preset, writes BENCHMARKS.md (about 25 min on 2 cores)
    python bench/train_vs_trl.py --bf16           # the same, plus each side in bf16 autocast (CPUs with AVX512-BF16)
    python bench/train_vs_trl.py --preset long_prompts   # multi-turn-like prompts (median 400 tokens)
    python bench/train_vs_trl.py --preset llama1b_cpu --repeats 1   # Llama-3.2-1B's width and vocabulary, 2 layers
    python bench/train_vs_trl.py --loss-memory    # only the loss step's peak memory at 8/16 x 1,024 x 128,256
    python bench/train_vs_trl.py --preset llama1b --device cuda --dtype bfloat16   # Llama-3.2-1B shapes, a GPU

Both sides train the same randomly initialised Llama (Llama-3.2's 128,256-token vocabulary, so the
full-vocabulary logits weigh what they weigh in the real model), LoRA r16 on every linear layer of
the decoder, the same batch size, precision, learning rate and beta, on the same synthetic pairs
whose prompt and answer lengths spread like real chat data. TRL runs at its best settings: length-
grouped sampling (``train_sampling_strategy="group_by_length"``), no gradient checkpointing.
Each side runs in its own process (peak memory is per process); repeats alternate the sides.
orpolab runs twice: one row per sequence (``data.packing=false``) and packed rows with shared
prompts (``data.packing=true``, the default).

Reported: non-padding tokens per second (prompt + chosen and prompt + rejected tokens, counted as
the one-row-per-sequence layout has them, so every side is credited the same work for the same
pairs), padding fraction of the positions each side computes, peak memory, both losses on identical
first batches (the same token ids and LoRA weights through the code paths; they must agree), and
the peak tensor memory of the loss step alone (output layer, log-softmax, ORPO loss, backward) for
the full-logits path, orpolab's earlier chunked path, and the chunked path that recomputes nothing it
need not keep, counted op by op on the ``meta`` device (bench/tensor_memory.py).
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
from tensor_memory import PeakTensorBytes


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
    # Llama-3.2-1B's hidden size, heads and vocabulary with 2 layers, so that it runs on 2 cores.
    "llama1b_cpu": Preset(shape="llama1b_2layers", batch_size=4, pairs=120, warmup_steps=1, steps=4, repeats=1),
    # Prompts of multi-turn chat data (several turns before the answer): the shared prefix weighs more.
    "long_prompts": Preset(max_length=1024, max_prompt_length=768, prompt_median=400, answer_median=110,
                           pairs=200, steps=6, repeats=2),
}
SIDES = ("orpolab", "packed", "trl")
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


def run_orpolab(preset: Preset, work: Path, dtype: str, device: str, packing: bool = False,
                mixed: bool = False) -> dict:
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
    precision = "bf16-mixed" if mixed or (dtype == "bfloat16" and device != "cpu") else "32-true"
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, precision=precision,
                        max_steps=preset.warmup_steps + preset.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=PreferenceDataModule(data, data_cfg, tokenizer.pad_token_id, SEED,
                                                        packing=packing))
    return timer.result()


class StepTimer(L.Callback):
    """Wall time and token counts of every step after the warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.tokens, self.positions, self.real, self.i = warmup, [], 0, 0, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.i >= self.warmup:
            self.times.append(time.perf_counter() - self.t0)
            # Packed rows hold each prompt once: credit the tokens the one-row-per-sequence layout counts.
            self.tokens += int(batch["sequence_tokens"].sum() if "sequence_tokens" in batch
                               else batch["attention_mask"].sum())
            self.positions += batch["input_ids"].numel()
            self.real += int(batch["attention_mask"].sum())
        self.i += 1

    def result(self) -> dict:
        return {"seconds": sum(self.times), "tokens": self.tokens, "positions": self.positions,
                "real_positions": self.real, "steps": len(self.times)}


def trl_trainer(preset: Preset, work: Path, model, dtype: str, device: str, steps: int, mixed: bool = False):
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
                      report_to=[], use_cpu=device == "cpu", bf16=dtype == "bfloat16" or mixed, disable_dropout=True,
                      remove_unused_columns=False, dataloader_num_workers=0, seed=SEED, data_seed=SEED,
                      gradient_checkpointing=False, max_grad_norm=1.0)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    # TRL's ORPO rows have no `input_ids`, so Transformers' length-grouped sampler needs a length
    # column to group by (without it group_by_length raises): the longer of chosen and rejected.
    trainer.train_dataset = trainer.train_dataset.map(
        lambda r: {"length": max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))})
    return trainer


def run_trl(preset: Preset, work: Path, dtype: str, device: str, mixed: bool = False) -> dict:
    from transformers import TrainerCallback

    trainer = trl_trainer(preset, work, lora(load(work / "model", dtype, device)), dtype, device,
                          preset.warmup_steps + preset.steps, mixed)
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
            "positions": sum(counts[i][1] for i in timed), "real_positions": sum(counts[i][0] for i in timed),
            "steps": len(timed)}


def compare_losses(preset: Preset, work: Path, dtype: str, device: str) -> dict:
    """Both losses on the same first batches: our tokenized pairs, one LoRA model, both code paths."""
    from orpolab.core.defaults import default_settings
    from orpolab.train.data import PackedPairCollator, PairCollator
    from orpolab.train.model import load_tokenizer
    from orpolab.train.module import PreferenceModule

    tokenizer = load_tokenizer(default_settings("model", name_or_path=str(work / "model")))
    _, data = orpolab_data(preset, work, tokenizer)
    packed_collate = PackedPairCollator(tokenizer.pad_token_id, preset.max_length)
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
        packed = {k: v.to(device) for k, v in packed_collate(pairs).items()}
        with torch.no_grad():
            loss, metrics, _ = ours._loss(batch, "train")
            packed_loss = ours._loss(packed, "train")[0]
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):  # bf16-mixed's drift on this batch
                bf16_loss = ours._loss(packed, "train")[0]
            trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch(pairs, tokenizer, device))
        rows.append({"orpolab": float(loss), "packed": float(packed_loss), "trl": float(trl_loss),
                     "packed_bf16": float(bf16_loss),
                     "orpolab_nll": float(metrics["nll_loss"]), "trl_nll": trl_metrics["nll_loss"],
                     "orpolab_log_odds_ratio": float(metrics["log_odds_ratio"]),
                     "trl_log_odds_ratio": trl_metrics["log_odds_ratio"]})
    diffs = [abs(r[side] - r["trl"]) for r in rows for side in ("orpolab", "packed")]
    drift = [abs(r["packed_bf16"] - r["packed"]) / abs(r["packed"]) for r in rows]
    return {"batches": rows, "max_abs_diff": max(diffs), "bf16_max_rel_drift": max(drift)}


# ---------------------------------------------------------------- the loss step's memory


def kept_chunks_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024):
    """orpolab's output layer before the chunked autograd Function: chunks in the forward pass, but
    autograd keeps every chunk's float32 logits for the backward pass (the comparison's "before")."""
    import torch.nn.functional as F

    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = F.linear(hidden[start: start + chunk_size], weight).float()
        t = targets[start: start + chunk_size]
        out.append(logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(out)


def full_logits_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """The usual path (TRL's): every position's logits, in float32, then a log-softmax."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def loss_step_peak(path: str, sequences: int, tokens: int, vocab: int, width: int, dtype: torch.dtype,
                   device: str = "meta") -> int:
    """Peak bytes of tensors created by one ORPO loss step (output layer to hidden-state gradient).

    ``sequences`` rows (chosen first, then rejected) of ``tokens`` positions, every one a target (as in
    Liger-Kernel's benchmark); the hidden states and a frozen output layer (LoRA) are inputs, not counted.
    Counted on the meta device: nothing is allocated.
    """
    from orpolab.train.losses import orpo_loss, selected_token_logps

    hidden = torch.randn(sequences * tokens, width, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (sequences * tokens,), device=device)
    with PeakTensorBytes() as meter:
        if path == "full logits":
            logps = full_logits_logps(hidden, weight, targets)
        elif path == "chunks kept":
            logps = kept_chunks_logps(hidden, weight, targets)
        else:
            logps = selected_token_logps(hidden, weight, targets)[0]
        per_seq = logps.view(sequences, tokens).mean(-1)
        n = sequences // 2
        loss, _ = orpo_loss(per_seq[:n], per_seq[n:], -logps.view(sequences, tokens)[:n].mean(), 0.1)
        loss.backward()
    return meter.peak


LOSS_PATHS = ("full logits", "chunks kept", "chunked, nothing kept")


def loss_memory() -> list[dict]:
    """The loss step at Llama-3.2-1B's width (batch 8 and 16) and at Liger-Kernel's benchmark shape (H 4,096)."""
    rows = []
    for sequences, width, dtype in ((8, 2048, torch.float32), (16, 2048, torch.float32), (16, 4096, torch.float32),
                                    (16, 4096, torch.bfloat16)):
        row = {"sequences": sequences, "tokens": 1024, "vocab": 128256, "width": width, "dtype": str(dtype)[6:]}
        for path in LOSS_PATHS:
            row[path] = loss_step_peak(path, sequences, 1024, 128256, width, dtype) / 2**30
        rows.append(row)
    return rows


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
    if args.only == "losses":
        result = compare_losses(preset, work, args.dtype, args.device)
    elif args.only == "trl":
        result = run_trl(preset, work, args.dtype, args.device, mixed=args.mixed)
    else:
        result = run_orpolab(preset, work, args.dtype, args.device, packing=args.only == "packed", mixed=args.mixed)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, only: str, work: Path, mixed: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--only", only, "--work", str(work), "--preset", args.preset,
           "--dtype", args.dtype, "--device", args.device] + (["--mixed"] if mixed else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{only} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 autocast on a CPU is emulated and usually slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--bf16", action="store_true",
                        help="also each side with float32 weights in bf16 autocast (CPU: needs AVX512-BF16 or AMX)")
    parser.add_argument("--bf16-sides", default=None, help="the sides also run in bf16 (default: all of --sides)")
    parser.add_argument("--loss-memory", action="store_true", help="only the loss step's memory (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", choices=["orpolab", "packed", "trl", "losses"], help=argparse.SUPPRESS)
    parser.add_argument("--mixed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return child(args)
    memory = loss_memory()
    print(memory_table(memory), flush=True)
    if args.loss_memory:
        write_section("train-loss-memory", memory_body(memory), args.out, raw={"rows": memory})
        return

    preset = PRESETS[args.preset]
    repeats = args.repeats or preset.repeats
    sides = [s for s in args.sides.split(",") if s]
    if unknown := set(sides) - set(SIDES):
        raise SystemExit(f"unknown sides {sorted(unknown)}; choose from {', '.join(SIDES)}")
    mixed = [False]
    if args.bf16:
        if args.device == "cpu" and not cpu_has_bf16():
            print("this CPU has no bf16 instructions (avx512_bf16, amx_bf16): bf16 rows skipped", flush=True)
        else:
            mixed.append(True)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="orpolab-bench-") as tmp:
        work = Path(tmp)
        shape = SHAPES[preset.shape]
        print(f"building a random Llama ({shape['vocab_size']} vocab, {shape['hidden_size']} wide, "
              f"{shape['num_hidden_layers']} layers) and {preset.pairs} pairs ...", flush=True)
        build_model(preset, work / "model")
        from transformers import AutoTokenizer

        pairs = make_pairs(preset, AutoTokenizer.from_pretrained(work / "model"))
        (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        lengths = pair_lengths(preset, work)
        losses = spawn(args, "losses", work)
        print(f"losses on identical batches: max |orpolab - TRL| = {losses['max_abs_diff']:.2e}", flush=True)
        bf16_sides = [s for s in (args.bf16_sides or args.sides).split(",") if s in sides]
        for r in range(repeats):
            for m in mixed:
                for side in (sides[::-1] if r % 2 else sides):
                    if m and side not in bf16_sides:
                        continue
                    res = spawn(args, side, work, m)
                    res["tokens_per_s"] = res["tokens"] / res["seconds"]
                    key = f"{side} bf16" if m else side
                    runs.setdefault(key, []).append(res)
                    print(f"repeat {r + 1}/{repeats} {key:12s}: {res['tokens_per_s']:.0f} non-padding tokens/s, "
                          f"padding {1 - res['real_positions'] / res['positions']:.1%}, "
                          f"peak {res['peak_rss_mib']:.0f} MiB", flush=True)
            # Written after every round of repeats: an interrupted run leaves its finished rounds.
            report(args, preset, runs, losses, lengths, memory)


def pair_lengths(preset: Preset, work: Path) -> dict:
    """Token counts of the prompts and answers as orpolab tokenizes them (after truncation)."""
    from orpolab.core.defaults import default_settings
    from orpolab.train.model import load_tokenizer

    _, data = orpolab_data(preset, work, load_tokenizer(default_settings("model", name_or_path=str(work / "model"))))
    prompts = sorted(len(p["prompt_ids"]) for p in data.train)
    answers = sorted(len(p[k]) for p in data.train for k in ("chosen_ids", "rejected_ids"))
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return {name: {"p10": q(xs, 0.1), "median": q(xs, 0.5), "p90": q(xs, 0.9), "max": xs[-1]}
            for name, xs in (("prompt", prompts), ("answer", answers))}


def memory_table(rows: list[dict]) -> str:
    lines = ["| sequences x tokens x vocabulary, hidden, dtype | " + " | ".join(LOSS_PATHS) + " | chunked / kept |",
             "|---|" + "---|" * (len(LOSS_PATHS) + 1)]
    for r in rows:
        cells = " | ".join(f"{r[p]:.2f} GiB" for p in LOSS_PATHS)
        lines.append(f"| {r['sequences']} x {r['tokens']:,} x {r['vocab']:,}, {r['width']}, {r['dtype']} | {cells} | "
                     f"{r[LOSS_PATHS[2]] / r[LOSS_PATHS[1]]:.3f} |")
    return "\n".join(lines)


def memory_body(rows: list[dict]) -> str:
    first = rows[0]
    return "\n".join([
        "## Loss-step memory: the output layer at a 128,256-token vocabulary", "",
        "Command: `python bench/train_vs_trl.py --loss-memory`. Peak bytes of the tensors one ORPO loss step "
        "creates (output layer, log-probabilities, loss, backward to the hidden states; hidden states and a frozen "
        "output layer are inputs, not counted), every position a target as in Liger-Kernel's benchmark, counted "
        "op by op on PyTorch's meta device (bench/tensor_memory.py; nothing allocated, the same on any device). "
        "Paths: the full float32 logits and their log-softmax (TRL's way); orpolab's earlier chunks, whose logits "
        "autograd keeps for the backward pass; the chunked autograd Function (gradient taken in the forward pass, "
        "one chunk of 1,024 positions alive at a time).", "",
        memory_table(rows), "",
        f"At batch {first['sequences']} x 1,024 x 128,256: {first[LOSS_PATHS[2]]:.2f} GiB against "
        f"{first[LOSS_PATHS[1]]:.2f} GiB for the earlier path ({first[LOSS_PATHS[2]] / first[LOSS_PATHS[1]]:.1%}; "
        "target at most 25%). Liger-Kernel's published A100 figures at 16 x 1,024 x 128,256, hidden 4,096: "
        "8.5 GB fused against 33.4 GB for the usual path (whole-process peaks, model included).",
    ])


def report(args, preset: Preset, runs: dict, losses: dict, lengths: dict, memory: list[dict]) -> None:
    shape = SHAPES[preset.shape]
    tps = {s: summary([r["tokens_per_s"] for r in runs[s]]) for s in runs}
    pad = {s: summary([1 - r["real_positions"] / r["positions"] for r in runs[s]]) for s in runs}
    mem = {s: summary([r["peak_rss_mib"] for r in runs[s]]) for s in runs}
    names = {"orpolab": "orpolab, one row per sequence", "packed": "orpolab, packed with shared prompts",
             "trl": "TRL ORPOTrainer"}
    label = lambda key: names[key.split()[0]] + (" (bf16 autocast)" if key.endswith("bf16") else "")  # noqa: E731
    ratios = {}
    for key in runs:
        trl = "trl bf16" if key.endswith("bf16") else "trl"
        if not key.startswith("trl") and trl in runs:
            ratios[key] = summary([o["tokens_per_s"] / t["tokens_per_s"]
                                   for o, t in zip(runs[key], runs[trl], strict=True)])
    bf16_vs_fp32 = {key: summary([b["tokens_per_s"] / f["tokens_per_s"] for b, f in zip(runs[key], runs[key[:-5]],
                                                                                          strict=True)])
                    for key in runs if key.endswith("bf16") and key[:-5] in runs}
    cmd = f"python bench/train_vs_trl.py --preset {args.preset}" + (" --bf16" if args.bf16 else "") + (
        f" --sides {args.sides}" if args.sides != ",".join(SIDES) else "") + (
        f" --bf16-sides {args.bf16_sides}" if args.bf16 and args.bf16_sides else "") + (
        f" --repeats {args.repeats}" if args.repeats else "") + (
        f" --device {args.device} --dtype {args.dtype}" if args.device != "cpu" else "")
    dist = "; ".join(f"{name}s {v['p10']}/{v['median']}/{v['p90']}/{v['max']}" for name, v in lengths.items())
    body = [
        f"## Training throughput: orpolab vs TRL's ORPOTrainer ({args.preset} preset)", "",
        f"Command: `{cmd}`. Model: random Llama, vocabulary {shape['vocab_size']:,}, hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, LoRA r16 on all decoder linear layers; batch {preset.batch_size} pairs, "
        f"{args.dtype} weights, lr {LR}, beta {BETA}, max length {preset.max_length}; {preset.pairs} synthetic pairs, "
        f"prompt and answer lengths lognormal (medians {preset.prompt_median} and {preset.answer_median} tokens; "
        f"as tokenized, 10th percentile/median/90th percentile/max: {dist}). "
        f"TRL with `train_sampling_strategy=\"group_by_length\"`; orpolab with length-grouped batches and "
        f"log-probs only at the positions a loss uses, with one row per sequence and packed (each pair once as "
        f"prompt, chosen, rejected, rows of up to {preset.max_length} tokens, a block attention mask). "
        f"Non-padding tokens count prompt + answer of every sequence on all sides (a packed row computes each "
        f"prompt once but is credited twice: the same pairs, the same work done). {preset.steps} timed steps after "
        f"{preset.warmup_steps} warm-up steps, {len(next(iter(runs.values())))} repeats, each side in its own "
        "process; median (min–max).", "",
        "| | non-padding tokens/s | padding fraction | peak memory (MiB) | / TRL at equal precision |",
        "|---|---|---|---|---|",
    ]
    for key in runs:
        ratio = f"{ratios[key]['median']:.2f}x ({ratios[key]['min']:.2f}–{ratios[key]['max']:.2f})" \
            if key in ratios else ""
        body.append(f"| {label(key)} | {fmt(tps[key])} | {fmt(pad[key], 3)} | {fmt(mem[key], 0)} | {ratio} |")
    body.append("")
    for key, r in ratios.items():
        body.append(f"- **{label(key)} / TRL: {r['median']:.2f}x** (per repeat {r['min']:.2f}–{r['max']:.2f}); "
                    "target at least 3x.")
    for key, r in bf16_vs_fp32.items():
        body.append(f"- {label(key)} / the same in float32: {r['median']:.2f}x.")
    body += ["", "Losses on the same three first batches (same token ids, same LoRA weights): max |orpolab - TRL| = "
             f"{losses['max_abs_diff']:.2e} over both layouts (orpolab / packed / TRL: " + ", ".join(
                 f"{b['orpolab']:.5f} / {b['packed']:.5f} / {b['trl']:.5f}" for b in losses["batches"]) + "). "
             f"The same batches in bf16 autocast: loss at most {losses['bf16_max_rel_drift']:.2e} relative "
             "from float32.",
             "", "Loss step alone (output layer to hidden-state gradient), peak tensor memory counted on the meta "
             "device (`--loss-memory`):", "", memory_table(memory)]
    body = "\n".join(body)
    write_section(f"train-{args.preset}", body, args.out,
                  raw={"preset": asdict(preset), "runs": runs, "losses": losses, "ratios": ratios,
                       "lengths": lengths, "loss_memory": memory})
    print(body)


if __name__ == "__main__":
    main()
