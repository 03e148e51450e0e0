"""The LightningModule: a preference loss over a LoRA-wrapped causal LM, chosen and rejected in one forward.

Read top to bottom: ``_forward`` turns a ``[2B, L]`` batch into per-sequence log-probabilities
(:func:`orpolab.train.logps.sequence_logps`), ``_loss`` hands them to the configured method's pure
loss (:func:`orpolab.train.losses.method_loss`: ORPO, DPO, SimPO or SFT; nothing else forks per
method), ``validation_step`` also accumulates the method-independent selection metrics (chosen
bits per byte, preference accuracy).

DPO's reference model is the same base with the LoRA adapter disabled, so no second copy of the
weights is held; its log-probabilities are computed once per split and cached (they never change).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torchmetrics.aggregation import SumMetric

from orpolab.core.config import MethodConfig, OptimConfig
from orpolab.core.errors import OrpolabError
from orpolab.train.logps import pairs_in, sequence_logps
from orpolab.train.losses import method_loss


class PreferenceModule(L.LightningModule):
    """Trains only the adapter; checkpoints hold adapter and optimizer state, not the base weights."""

    def __init__(self, model: torch.nn.Module, method: MethodConfig, optim: OptimConfig, logps_chunk_size: int = 1024):
        super().__init__()
        self.logps_chunk_size = logps_chunk_size
        self.model, self.method, self.optim = model, method, optim
        if method.name == "dpo" and not hasattr(model, "disable_adapter"):
            raise OrpolabError("DPO's reference is the base with the LoRA adapter disabled: the model needs an adapter")
        # from_pretrained returns a model in eval mode; train it explicitly. TRL turns every dropout
        # off by default (disable_dropout=True), which keeps chosen/rejected log-probs comparable and
        # makes DPO's adapter-disabled reference deterministic.
        self.model.train()
        if method.disable_dropout:
            for sub in self.model.modules():
                if isinstance(sub, torch.nn.Dropout):
                    sub.p = 0.0
        # Frozen base weights are left out of checkpoints, so loading must not demand them.
        self.strict_loading = False
        self.val_nats = SumMetric()
        self.val_bytes = SumMetric()
        self.val_correct = SumMetric()
        self.val_pairs = SumMetric()
        # DPO: reference log-probs per pair (chosen, rejected), per split, filled once on first use.
        self.ref_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ forward

    def _forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nll_on = self.method.nll_on if self.method.name == "orpo" else "completion"
        return sequence_logps(self.model, batch, nll_on, self.logps_chunk_size)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed completion log-probs of the base model (adapter disabled), shape (2B,).

        Evaluated in eval mode so that the reference is deterministic even with dropout left on.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self._forward(batch)["sum_logps"].detach()
        finally:
            self.model.train(was_training)

    def _cached_reference(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        if not self.method.precompute_ref_logps or "index" not in batch:
            return self.reference_logps(batch)
        if split not in self.ref_cache:
            self.ref_cache[split] = self.compute_reference_cache(self.trainer.datamodule.reference_dataloader(split),
                                                                 split)
        table = self.ref_cache[split].to(batch["input_ids"].device)
        idx = batch["index"]
        return torch.cat([table[idx, 0], table[idx, 1]])

    def compute_reference_cache(self, loader, split: str = "") -> torch.Tensor:
        """Reference log-probs of every pair a loader serves, once: shape (pairs, 2), chosen and rejected."""
        from tqdm.auto import tqdm

        table = torch.full((len(loader.dataset), 2), float("nan"), dtype=torch.float32)
        for batch in tqdm(loader, desc=f"DPO reference log-probs ({split})", unit="batch", disable=None,
                          leave=False):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            ref = self.reference_logps(batch).float().cpu()
            n = ref.shape[0] // 2
            table[batch["index"].cpu(), 0], table[batch["index"].cpu(), 1] = ref[:n], ref[n:]
        return table

    def _loss(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        out = self._forward(batch)
        ref = self._cached_reference(batch, split) if self.method.name == "dpo" else None
        loss, metrics = method_loss(self.method, out, ref)
        return loss, metrics, out

    # ------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics, _ = self._loss(batch, "train")
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the {self.method.name.upper()} loss became {loss.item()} at step {self.global_step}; "
                "lower optim.lr or check the data"
            )
        n = pairs_in(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_nats, self.val_bytes, self.val_correct, self.val_pairs):
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics, out = self._loss(batch, "val")
        n = pairs_in(batch)
        # sync_dist: averaged over the ranks of a multi-device job (a no-op on one device).
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=n, sync_dist=True)
        self.val_nats.update(out["chosen_sum_nats"].sum())
        self.val_bytes.update(batch["answer_bytes"][:n].sum().to(torch.float64))
        self.val_correct.update((out["chosen_logps"] > out["rejected_logps"]).sum().to(torch.float64))
        self.val_pairs.update(torch.tensor(float(n), dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        # Tokenizer-independent: total NLL of the chosen answers in bits over their UTF-8 bytes.
        bpb = self.val_nats.compute() / math.log(2.0) / self.val_bytes.compute()
        accuracy = self.val_correct.compute() / self.val_pairs.compute()
        # The sums are already totals over all ranks (torchmetrics syncs them in compute()).
        self.log("val/chosen_bpb", bpb.float(), prog_bar=True, sync_dist=True)
        self.log("val/pref_accuracy", accuracy.float(), prog_bar=True, sync_dist=True)

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
        scheduler = schedules[self.optim.schedule]()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}
