"""Cache-sized chunks for the large real batches on CPU.

A forward or backward pass over a whole real batch (1,024 MNIST images for DD, 256 per
class for DC/DM) writes activations of tens to hundreds of MB, so every elementwise op
after a convolution (ReLU, pooling, instance norm) streams them through main memory.
Cut into chunks whose largest activation fits in the CPU's cache, the same ops run
from cache: on this project's 2-core machine LeNet's real-batch gradient took
100–107 ms in chunks of 256 against 138–142 ms in one piece, and DM's real embeddings
(ConvNet width 32) 524 ms in chunks of 64 against 1,123 ms for all classes at once and
934 ms class by class (bench/RESULTS.md). Gradients and means are sums over the
chunks, equal to the whole-batch ones up to float rounding. On a GPU the batch stays in
one piece (small kernels would waste it).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

Params = dict[str, torch.Tensor]

#: Bytes the largest activation of a chunk may take; tuned on a 2-core AMD EPYC VM.
CACHE_BYTES = 6 * 2 ** 20

_probed: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]]" = weakref.WeakKeyDictionary()


def largest_activation_bytes(model: nn.Module, shape: tuple[int, ...], embed: bool = False) -> int:
    """Bytes per image of ``model``'s largest intermediate output for inputs of ``shape`` (C, H, W)."""
    key = (*shape, int(embed))
    seen = _probed.setdefault(model, {})
    if key not in seen:
        sizes: list[int] = []
        leaves = [m for m in model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
                 for m in leaves]
        try:
            p = next(model.parameters())
            with torch.no_grad():
                out = model(torch.zeros(1, *shape, dtype=p.dtype, device=p.device), **({"embed": True} if embed else {}))
            sizes.append(out.numel() * out.element_size())
        finally:
            for h in hooks:
                h.remove()
        seen[key] = max(sizes)
    return seen[key]


def chunk_size(model: nn.Module, x: torch.Tensor, embed: bool = False) -> int:
    """Images per chunk for the batch ``x`` (B, C, H, W): all of them off the CPU, else the power of
    two nearest to :data:`CACHE_BYTES` / (largest activation per image), at most B."""
    if x.device.type != "cpu" or len(x) == 0:
        return max(1, len(x))
    per_image = largest_activation_bytes(model, tuple(x.shape[1:]), embed)
    n = 2 ** round(math.log2(max(1.0, CACHE_BYTES / per_image)))
    return int(min(len(x), n))


def chunked_grad(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                 chunk: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(∇θ of the mean cross-entropy over the batch, in ``params`` order; that loss), in chunks.

    ``params`` must require grad; ``chunk`` images per pass (default :func:`chunk_size`).
    """
    n = chunk or chunk_size(model, x)
    leaves = list(params.values())
    grads: list[torch.Tensor] | None = None
    total = x.new_zeros(())
    for xc, yc in zip(x.split(n), y.split(n)):
        loss = F.cross_entropy(functional_call(model, params, (xc,)), yc, reduction="sum") / len(x)
        g = torch.autograd.grad(loss, leaves)
        grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
        total = total + loss.detach()
    assert grads is not None  # x is not empty
    return grads, total


def chunked_embed(model: nn.Module, params: Params, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """ψθ(x) (B, D) without a graph, in chunks of ``chunk`` images (default :func:`chunk_size`)."""
    n = chunk or chunk_size(model, x, embed=True)
    with torch.no_grad():
        return torch.cat([functional_call(model, params, (part,), {"embed": True}) for part in x.split(n)])
