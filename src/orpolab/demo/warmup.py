"""Supervised warm-up of a tiny model, so the demo's base model is itself a trained model.

The demo compares the ORPO winner with its base. Against random weights any training wins; after a
short full fine-tune on a separate slice of the sample task (``data/sample/sft.jsonl``, disjoint
from the preference pairs and the held-out prompts), the comparison shows what preference
alignment adds. The result is cached beside the tiny models (``tiny_<family>_sft``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from orpolab.core.files import atomic_dir
from orpolab.demo.tiny import FAMILIES, is_current
from orpolab.train.data import render

WARMUP_VERSION = "1"


class CausalLMTuner(L.LightningModule):
    """Full fine-tuning on answer tokens (prompt masked), the loss transformers computes."""

    def __init__(self, model, lr: float, total_steps: int):
        super().__init__()
        self.model, self.lr, self.total_steps = model, lr, total_steps

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("sft/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        sched = get_cosine_schedule_with_warmup(opt, max(1, self.total_steps // 20), self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def sft_examples(tokenizer, rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
        prompt_text, completion = render(tokenizer, prompt, answer)
        p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt_text + completion, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": full, "prompt_len": len(p)})
    return out


def collate(pad_id: int):
    def fn(batch: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), pad_id)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), -100)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            mask[i, :n] = 1
            labels[i, b["prompt_len"]: n] = ids[i, b["prompt_len"]: n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return fn


def warm_up(src: Path, out: Path, data_file: Path, steps: int = 150, lr: float = 2e-3, batch_size: int = 16,
            seed: int = 0) -> Path:
    """Fine-tune ``src`` on ``data_file`` and save the result to ``out`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    L.seed_everything(seed, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    loader = DataLoader(sft_examples(tokenizer, rows), batch_size=batch_size, shuffle=True,
                        collate_fn=collate(tokenizer.pad_token_id), generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=10, gradient_clip_val=1.0)
    trainer.fit(CausalLMTuner(model, lr, steps), loader)
    with atomic_dir(out) as tmp:
        for f in src.iterdir():  # tokenizer files (tokenizer.model included), configs
            if f.is_file() and not f.name.startswith("model"):
                shutil.copy(f, tmp / f.name)
        model.save_pretrained(tmp)
        (tmp / ".orpolab-warmup").write_text(json.dumps({"version": WARMUP_VERSION, "steps": steps, "lr": lr,
                                                         "data": str(data_file), "source": str(src)}))
    return out


def is_warm(folder: Path, src: Path) -> bool:
    stamp = folder / ".orpolab-warmup"
    return is_current(src) and stamp.is_file() and json.loads(stamp.read_text())["version"] == WARMUP_VERSION \
        and is_current(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description="Supervised warm-up of the tiny models (cached).")
    parser.add_argument("--models", default=".cache/tiny_models")
    parser.add_argument("--data", default="data/sample/sft.jsonl")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    for family in args.families:
        src, out = Path(args.models) / f"tiny_{family}", Path(args.models) / f"tiny_{family}_sft"
        if is_warm(out, src):
            print(f"{out} is up to date")
            continue
        warm_up(src, out, Path(args.data), steps=args.steps)
        print(f"warmed up {out}")


if __name__ == "__main__":
    main()
