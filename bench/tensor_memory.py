"""Peak bytes of live tensors during a computation, counted op by op (any device, ``meta`` included).

CPU allocators keep no statistics like ``torch.cuda.max_memory_allocated``, and a process's peak
RSS mixes in the allocator's caching and everything loaded before. Here every tensor storage an
operation creates (forward and backward) is counted while it is alive, so the figure is what an
exact allocator would need. On the ``meta`` device nothing is allocated at all: shapes the machine
could not hold (the loss step at batch 16 x 1,024 tokens x 128,256 vocabulary) are counted for free.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes() as m: ...``; then ``m.peak``: the most bytes alive at once, created inside."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Drop the freed first: a new storage may reuse a freed one's address (its key).
        self.live = {ref: size for ref, size in self.live.items() if not ref.expired()}
        # Views and in-place results share an argument's storage: counted when it was made, or never
        # (the inputs, created before).
        given = {StorageWeakRef(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                 if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.live and ref not in given:
                    self.live[ref] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return out
