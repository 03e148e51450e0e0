"""Batches for Lightning: chosen and rejected stacked in one tensor, a sampler that resumes mid-epoch."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from orpolab.core.config import DataConfig
from orpolab.core.errors import OrpolabError
from orpolab.train.data.packing import PackedPairCollator
from orpolab.train.data.tokenize import PreparedData


class PairCollator:
    """Stacks chosen and rejected sequences into one ``[2B, L]`` batch, padded to the longest.

    Rows ``0..B-1`` are chosen, ``B..2B-1`` rejected, so one forward pass serves both.
    ``labels`` hold the completion tokens only (prompt and padding are -100).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [(e["prompt_ids"], e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
        length = max(len(p) + len(c) for p, c in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), length), dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            ids = torch.tensor(p + c, dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            attention[i, : len(ids)] = 1
            labels[i, len(p): len(ids)] = ids[len(p):]
        answer_bytes = torch.tensor([e[k] for k in ("chosen_bytes", "rejected_bytes") for e in examples])
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "answer_bytes": answer_bytes}
        if all("index" in e for e in examples):
            batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        return batch


class IndexedPairs(torch.utils.data.Dataset):
    """Prepared pairs that also carry their position, so per-pair caches (DPO's reference) can be looked up."""

    def __init__(self, pairs: list[dict]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], "index": i}


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), and that can start mid-epoch.

    Lightning's plain DataLoader restarts an interrupted epoch from its first batch; a job resumed
    from a mid-epoch checkpoint would then see other data than an uninterrupted one. Here the
    checkpoint stores how many samples of the epoch were trained on, and the resumed epoch skips
    exactly those. ``len`` stays the full epoch, because Lightning counts the batches already done.

    With several processes (DDP) it also shards: the epoch's global order is padded to a multiple
    of ``num_replicas`` (as torch's ``DistributedSampler`` does) and rank ``r`` takes every
    ``num_replicas``-th sample from position ``r``, so one step of all ranks consumes one contiguous
    stretch of the global order. The resume offset counts samples of that global order; sharding
    here instead of in Lightning's wrapper (the trainer runs with ``use_distributed_sampler=False``)
    keeps the skip and the shard consistent.
    """

    def __init__(self, num_samples: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 megabatch: int = 50, num_replicas: int = 1, rank: int = 0):
        self.num_samples, self.seed = num_samples, seed
        self.lengths, self.batch_size, self.megabatch = lengths, batch_size, megabatch
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.resume_epoch: int | None = None
        self.resume_offset = 0  # samples of the global order already trained on

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at the start of every epoch
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The epoch's order; with lengths, shuffled groups of ``megabatch`` batches sorted longest first."""
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        if not self.lengths:
            return order
        size = self.batch_size * self.megabatch * self.num_replicas
        groups = [sorted(order[i: i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(order), size)]
        return [j for group in groups for j in group]

    def global_order(self, epoch: int) -> list[int]:
        """The epoch's order over all ranks, padded with its first samples to a multiple of ``num_replicas``."""
        order = self.order(epoch)
        pad = -len(order) % self.num_replicas
        return order + (order * (pad // max(1, len(order)) + 1))[:pad]

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)  # this rank's share of the full epoch

    def __iter__(self):
        start = self.resume_offset if self.resume_epoch == self.epoch else 0
        self.resume_epoch, self.resume_offset = None, 0
        yield from self.global_order(self.epoch)[start:][self.rank::self.num_replicas]


class PreferenceDataModule(L.LightningDataModule):
    """Serves prepared pairs; tokenization happens once in ``prepare`` before the trainer starts.

    Its ``state_dict`` (saved in every checkpoint) records the position in the training data, so a
    resumed job continues with the very batches an uninterrupted one would have seen.
    """

    def __init__(self, data: PreparedData, cfg: DataConfig, pad_token_id: int, seed: int,
                 packing: bool | None = None):
        super().__init__()
        self.data, self.cfg, self.seed = data, cfg, seed
        # ``packing``: the caller's decision for this model (see orpolab.train.logps.packing_blocker),
        # else the config's. A batch holds the same pairs either way; only their layout differs.
        self.packing = cfg.packing if packing is None else packing
        self.collate = PackedPairCollator(pad_token_id, cfg.max_length) if self.packing else PairCollator(pad_token_id)
        lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in data.train]
        self.sampler = ResumableSampler(len(data.train), seed, lengths if cfg.group_by_length else None,
                                        cfg.batch_size)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None:  # this process's shard (one rank: the whole order)
            self.sampler.num_replicas, self.sampler.rank = trainer.world_size, trainer.global_rank
        return DataLoader(IndexedPairs(self.data.train), batch_size=self.cfg.batch_size, sampler=self.sampler,
                          collate_fn=self.collate, num_workers=self.cfg.num_workers, drop_last=False)

    def state_dict(self) -> dict:
        """The position in the epoch, in samples of the global order (every rank's batches counted)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        # Batches trained on: "processed" also counts the batch of a save in on_train_batch_end (a
        # checkpoint every n steps), which Lightning marks completed only after that hook.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "samples_done": done * self.cfg.batch_size * trainer.world_size,
                "world_size": trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        saved, now = state.get("world_size", 1), self.trainer.world_size if self.trainer is not None else 1
        if saved != now and 0 < state["samples_done"] < self.sampler.num_samples:
            # Lightning resumes the epoch at its per-rank batch count, which another world size changes.
            raise OrpolabError(f"cannot resume mid-epoch on {now} device(s) from a checkpoint written by {saved}; "
                               f"resume with trainer.devices={saved}")
        self.sampler.resume_epoch, self.sampler.resume_offset = state["epoch"], state["samples_done"]

    def val_dataloader(self) -> DataLoader:
        """The held-out pairs; with several ranks each evaluates its share (metrics are reduced across ranks)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return self.reference_dataloader("val")
        sampler = torch.utils.data.DistributedSampler(IndexedPairs(self.data.eval), num_replicas=trainer.world_size,
                                                      rank=trainer.global_rank, shuffle=False)
        return DataLoader(IndexedPairs(self.data.eval), batch_size=self.cfg.eval_batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.cfg.num_workers)

    def reference_dataloader(self, split: str) -> DataLoader:
        """A split in its stored order, for one pass that fills a per-pair cache."""
        pairs = {"train": self.data.train, "val": self.data.eval}[split]
        return DataLoader(IndexedPairs(pairs), batch_size=self.cfg.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.cfg.num_workers)
