"""The unit of work of a meta-step: fixed chunks of its K networks, summed in chunk order.

A meta-step's K networks are cut into ``min(K, MAX)`` contiguous chunks, MAX being the
most workers the run may have (``--workers N`` or ``MIN:MAX``). Each chunk's
meta-gradient is one call of the method's objective (one batched unroll for DD);
the step's gradient is the sum of the chunk gradients in chunk order. The chunks
depend on the config only — never on which workers are alive — so a meta-step gives
the same bits whether one worker computes every chunk (``--local``), each worker
one, or a worker that joined or replaced a lost one picks some up. (Bits also
depend on torch's thread count: workers use ``round(cpus_per_worker)`` threads, and
``--local`` does the same when ``--cpus-per-worker`` is given.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ddray.core.inits import derive_seed

if TYPE_CHECKING:
    from ddray.core.unroll import MetaGrad

CHUNK_STREAM = 100  # seed purpose of torch's global generator during a chunk (core/inits.py uses 0…10)


def net_chunks(nets: int, max_workers: int) -> list[list[int]]:
    """The K = ``nets`` net indices of a meta-step as ``min(K, max_workers)`` contiguous chunks."""
    return [[int(i) for i in part] for part in np.array_split(np.arange(nets), min(nets, max_workers))]


def assign(chunks: int, workers: Sequence[int]) -> dict[int, list[int]]:
    """Chunk indices 0…chunks−1 in contiguous runs over ``workers`` (in the given order; extra workers idle)."""
    parts = np.array_split(np.arange(chunks), max(1, min(chunks, len(workers))))
    return {w: [int(c) for c in part] for w, part in zip(workers, parts) if len(part)}


def chunk_gradient(objective: Callable[..., "MetaGrad"], images: torch.Tensor, raw_lrs: torch.Tensor,
                   step: int, chunk: int, nets: list[int], seed: int,
                   labels: torch.Tensor | None = None) -> "MetaGrad":
    """The objective's Σ over one chunk's networks; torch's global generator is seeded from
    (seed, step, chunk) first, so any unkeyed draw is independent of who computes the chunk.
    ``labels``: learned label logits (their gradient comes back too), None: hard labels."""
    torch.manual_seed(derive_seed(seed, CHUNK_STREAM, step, chunk))
    if labels is None:
        return objective(images, raw_lrs, step, nets)
    return objective(images, raw_lrs, step, nets, labels=labels)


def step_gradient(objective: Callable[..., "MetaGrad"], images: torch.Tensor, raw_lrs: torch.Tensor,
                  step: int, chunks: list[list[int]], seed: int, labels: torch.Tensor | None = None) -> "MetaGrad":
    """Σ over all chunks, added in chunk order — bitwise what the parameter server computes."""
    from ddray.core.unroll import MetaGrad

    total: MetaGrad | None = None
    for c, nets in enumerate(chunks):
        g = chunk_gradient(objective, images, raw_lrs, step, c, nets, seed, labels)
        total = g if total is None else MetaGrad(
            total.images + g.images, total.raw_lrs + g.raw_lrs, total.loss + g.loss, total.nets + g.nets,
            None if g.labels is None or total.labels is None else total.labels + g.labels)
    assert total is not None, "step_gradient: no chunks"
    return total
