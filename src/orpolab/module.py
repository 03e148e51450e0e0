"""The LightningModule: ORPO over a LoRA-wrapped causal LM, chosen and rejected in one forward.

Read top to bottom: ``_forward`` turns a ``[2B, L]`` batch into per-sequence log-probabilities,
``training_step`` feeds them to :func:`orpolab.losses.orpo_loss`, ``validation_step`` also
accumulates the sweep-fair selection metrics (chosen bits per byte, preference accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from torchmetrics.aggregation import SumMetric

from orpolab.errors import OrpolabError
from orpolab.losses import masked_mean, orpo_loss, token_logps


@dataclass
class OptimConfig:
    """``conf/optim/``: AdamW with warmup and a cosine or linear decay, stepped per optimizer step."""

    lr: float = 8e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant


class ORPOModule(L.LightningModule):
    """Trains only the adapter; checkpoints hold adapter and optimizer state, not the base weights."""

    def __init__(self, model: torch.nn.Module, beta: float, optim: OptimConfig, nll_on: str = "full",
                 disable_dropout: bool = True):
        super().__init__()
        if beta <= 0:
            raise OrpolabError(f"orpo.beta must be positive, got {beta}")
        if optim.lr <= 0:
            raise OrpolabError(f"optim.lr must be positive, got {optim.lr}")
        if nll_on not in ("full", "completion"):
            raise OrpolabError(f"orpo.nll_on must be 'full' or 'completion', got {nll_on!r}")
        self.model, self.beta, self.optim, self.nll_on = model, beta, optim, nll_on
        # from_pretrained returns a model in eval mode; train it explicitly. TRL's ORPO turns every
        # dropout off by default (disable_dropout=True), which keeps chosen/rejected log-probs comparable.
        self.model.train()
        if disable_dropout:
            for sub in self.model.modules():
                if isinstance(sub, torch.nn.Dropout):
                    sub.p = 0.0
        # Frozen base weights are left out of checkpoints, so loading must not demand them.
        self.strict_loading = False
        self.val_nats = SumMetric()
        self.val_bytes = SumMetric()
        self.val_correct = SumMetric()
        self.val_pairs = SumMetric()

    # ------------------------------------------------------------ forward

    def _forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n = input_ids.shape[0] // 2
        logits = self.model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        # Next-token log-probs of every real token; the completion mask then selects answers.
        targets = torch.where(attention.bool(), input_ids, torch.full_like(input_ids, -100))
        logps = token_logps(logits, targets)
        completion = labels[:, 1:] != -100
        seq_mean = masked_mean(logps, completion)
        nll_mask = (targets[:n, 1:] != -100) if self.nll_on == "full" else completion[:n]
        chosen_nll = -(logps[:n] * nll_mask).sum() / nll_mask.sum().clamp(min=1)
        with torch.no_grad():
            vocab_mean = logits.detach().float().mean(-1)[:, 1:]
            mean_logits = masked_mean(vocab_mean, completion)
        return {
            "chosen_logps": seq_mean[:n], "rejected_logps": seq_mean[n:], "chosen_nll": chosen_nll,
            "chosen_sum_nats": -(logps[:n] * completion[:n]).sum(-1).detach(),
            "logits/chosen": mean_logits[:n].mean(), "logits/rejected": mean_logits[n:].mean(),
        }

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        out = self._forward(batch)
        loss, metrics = orpo_loss(out["chosen_logps"], out["rejected_logps"], out["chosen_nll"], self.beta)
        metrics["logits/chosen"], metrics["logits/rejected"] = out["logits/chosen"], out["logits/rejected"]
        return loss, metrics, out

    # ------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics, _ = self._loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the ORPO loss became {loss.item()} at step {self.global_step}; lower optim.lr or check the data"
            )
        n = batch["input_ids"].shape[0] // 2
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_nats, self.val_bytes, self.val_correct, self.val_pairs):
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics, out = self._loss(batch)
        n = batch["input_ids"].shape[0] // 2
        self.log("val/loss", loss, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=n)
        self.val_nats.update(out["chosen_sum_nats"].sum())
        self.val_bytes.update(batch["answer_bytes"][:n].sum().to(torch.float64))
        self.val_correct.update((out["chosen_logps"] > out["rejected_logps"]).sum().to(torch.float64))
        self.val_pairs.update(torch.tensor(float(n), dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        # Tokenizer-independent: total NLL of the chosen answers in bits over their UTF-8 bytes.
        bpb = self.val_nats.compute() / math.log(2.0) / self.val_bytes.compute()
        accuracy = self.val_correct.compute() / self.val_pairs.compute()
        self.log("val/chosen_bpb", bpb.float(), prog_bar=True)
        self.log("val/pref_accuracy", accuracy.float(), prog_bar=True)

    # ------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps,
                                      weight_decay=self.optim.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.optim.warmup_steps or int(self.optim.warmup_ratio * total)
        schedules = {
            "cosine": lambda: get_cosine_schedule_with_warmup(optimizer, warmup, total),
            "linear": lambda: get_linear_schedule_with_warmup(optimizer, warmup, total),
            "constant": lambda: get_constant_schedule_with_warmup(optimizer, warmup),
        }
        if self.optim.schedule not in schedules:
            raise OrpolabError(f"optim.schedule must be one of {sorted(schedules)}, got {self.optim.schedule!r}")
        scheduler = schedules[self.optim.schedule]()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}
