"""Parameter-server shards: which block of classes each owns (torch-free, shared by all actors).

With J shards, shard j owns a contiguous block of classes, i.e. the image columns
``images[:, lo:hi]`` of x̃ (S, N, C, H, W) — ỹ is class-major — and shard 0 also owns
the raw step sizes ρ (T,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Payload = dict[str, Any]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` owns image columns ``lo:hi`` (and ρ when index == 0)."""

    index: int
    count: int
    lo: int
    hi: int

    @property
    def owns_lrs(self) -> bool:
        return self.index == 0


def shard_layout(num_classes: int, ipc: int, shards: int) -> list[Shard]:
    """Contiguous, near-equal blocks of classes, one per shard (ValueError if too many shards)."""
    if shards > num_classes:
        raise ValueError(f"--shards: invalid value {shards}; at most one shard per class ({num_classes} classes)")
    blocks = np.array_split(np.arange(num_classes), shards)
    return [Shard(j, shards, int(b[0]) * ipc, (int(b[-1]) + 1) * ipc) for j, b in enumerate(blocks)]
