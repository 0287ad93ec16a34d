"""Meta-steps captured whole on CUDA: DD's unroll, its vector-Jacobian product and the real-batch
gradient (and MTT's meta-step, DC's and DM's matching) replayed as CUDA graphs.

On a GPU a default meta-step (LeNet, T = 30 inner steps on 10 images, one real batch of 1,024) is
a few GFLOP, well under a millisecond of arithmetic, but thousands of kernel launches, each with
its Python and autograd overhead: 100–400× what the card needs. A CUDA graph
(``torch.cuda.graphs``) records those launches once and replays them with one call.

:class:`Graphs` does that for any function of tensors that reads nothing back to the host: one
graph per :func:`tree_key` (every input's shape and dtype, the device, and the Python constants
the function is specialised to). What DD's graphs capture is :func:`static_meta_gradient`: the
same unroll, VJP and real-batch gradient as :func:`ddray.core.unroll.meta_gradient` (eager
kernels), written without a host synchronisation (the outer loss stays a tensor until the replay
is done); :class:`MetaStepGraphs` wraps it. MTT's, DC's and DM's are
:func:`ddray.core.trajectory.static_mtt`, :func:`ddray.core.matching.static_dc` and
:func:`ddray.core.matching.static_dm`, with the augmentation draws in static buffers and applied
without a branch
(:func:`ddray.core.augment.apply_aug_select`). Everything random — θ₀, the real batch, the
augmentation draws, MTT's expert segments and batches — is drawn outside the graph, so the seed streams are the eager ones; the
graph reads them from static buffers.

Shapes are static in a graph, so a graph is kept per shape — for DD (K, x̃, z̃ or ỹ, ρ, the real
batch, dtype, memory mode). K moves when workers join or leave and a meta-step's last chunk can
be smaller; a new shape is captured on first sight:

1. warm-up on a side stream (the eager function, twice: cuDNN and the allocator settle);
2. capture into a graph, in the memory pool that every graph of the same :class:`Graphs` shares;
3. one replay on the warm-up's inputs, checked against the warm-up's eager result
   (:data:`RTOL`/:data:`ATOL`): a graph that disagrees is never used.

Where capture is impossible — not a CUDA device, an error while capturing, a replay that
disagrees — the caller runs eagerly, and the log says why: a warning the first time in a
process, an info line for each shape after that. On CPU nothing changes.

Memory: each graph keeps its static inputs and outputs; its activations live in the memory pool
that the graphs of one :class:`Graphs` share, so the pool holds about the largest graph's
activations rather than the sum (DM's share at CIFAR-10's sizes embeds 2,560 real images: a few
GB). Sharing is safe because a :class:`Graphs` replays one graph at a time, on one stream, and
copies its outputs out before the next replay: what a later capture reuses of an earlier graph's
memory is only ever scratch to both. At most :data:`MAX_GRAPHS` shapes are kept per
:class:`Graphs`, the least recently used dropped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Iterator, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ddray.core.kernels import Kernels
from ddray.core.unroll import MetaGrad, Outer, Params, unroll_vjp

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-4, 1e-6  # a replay against the eager warm-up: the same kernels, so float noise only
MAX_GRAPHS = 8  # shapes kept captured (a fleet's K, and the smaller last chunk, take a few)
WARMUP = 2  # eager calls on the side stream before capture
Tree = Any  # a tensor, or nested dicts, lists and tuples of them
Inputs = dict[str, Any]  # DD's: params0 (a dict), images, labels, raw_lrs, x_real, y_real
_warned = False


def static_real_grad(model: nn.Module, params: Params, x: torch.Tensor,
                     y: torch.Tensor) -> tuple[Params, torch.Tensor]:
    """Σₖ ∇θ ℓ(x, y; θ⁽ᵏ⁾) per network and Σₖ ℓ as a tensor: no host synchronisation (on a GPU the whole
    batch in one pass, as :func:`ddray.core.kernels.eager_real_grad` does there)."""
    k = next(iter(params.values())).shape[0]
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    total: torch.Tensor | None = None
    for i in range(k):
        with torch.enable_grad():
            p = {n: v[i].detach().requires_grad_() for n, v in params.items()}
            loss = F.cross_entropy(functional_call(model, p, (x,)), y)
            g = torch.autograd.grad(loss, list(p.values()))
        for n, gn in zip(p, g):
            grads[n].append(gn)
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    return {n: torch.stack(g) for n, g in grads.items()}, total


def static_meta_gradient(model: nn.Module, params0: Params, images: torch.Tensor, labels: torch.Tensor,
                         raw_lrs: torch.Tensor, x_real: torch.Tensor, y_real: torch.Tensor,
                         memory: str = "full") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`ddray.core.unroll.meta_gradient` with eager kernels, as (∂/∂x̃, ∂/∂ρ, ∂/∂z̃ or None, Σₖ ℓ):
    every result a tensor, nothing read back to the host, so a CUDA graph can capture it."""
    outer = cast(Outer, lambda p: static_real_grad(model, p, x_real, y_real))  # Σₖ ℓ stays a tensor
    g = unroll_vjp(model, params0, images, labels, raw_lrs, outer, memory, kernels=Kernels(model))
    return g.images, g.raw_lrs, g.labels, g.loss  # type: ignore[return-value]  # the loss is a tensor here


def tree_key(inputs: Tree, *extra: Any) -> tuple:
    """What a graph is specialised to: the device, ``extra`` and every input's place, shape and dtype."""
    leaves = list(_leaves(inputs))
    return (str(leaves[0][1].device), *extra, tuple((path, tuple(t.shape), t.dtype) for path, t in leaves))


def shape_key(inputs: Inputs, memory: str) -> tuple:
    """DD's graph key: every input's shape and dtype, the device and the memory mode."""
    return tree_key(inputs, memory)


def _leaves(tree: Tree, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """(path, tensor) of every tensor in nested dicts (sorted keys), lists and tuples, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for name in sorted(tree):
            yield from _leaves(tree[name], (*path, name))
    else:
        for i, item in enumerate(tree):
            yield from _leaves(item, (*path, i))


def _clone(tree: Tree) -> Tree:
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {name: _clone(item) for name, item in tree.items()}
    return type(tree)(_clone(item) for item in tree)


def _copy_into(static: Tree, inputs: Tree) -> None:
    for (_, s), (_, t) in zip(_leaves(static), _leaves(inputs)):
        s.copy_(t)


def _agree(got: tuple, expected: tuple) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and torch.allclose(a, b, RTOL, ATOL))
               for a, b in zip(got, expected))


class _Graph:
    """One captured call: its graph, the static inputs it reads and the outputs it writes."""

    def __init__(self, graph: Any, static: Tree, outputs: tuple) -> None:
        self.graph, self.static, self.outputs = graph, static, outputs

    def __call__(self, inputs: Tree) -> tuple:
        _copy_into(self.static, inputs)
        self.graph.replay()
        return tuple(None if t is None else t.clone() for t in self.outputs)


class Graphs:
    """``run(inputs)`` replayed from CUDA graphs, one per :func:`tree_key` (see the module docstring).

    ``run(inputs, *consts)`` takes nested dicts/lists/tuples of tensors and Python constants,
    and returns a tuple of tensors (or None), reading nothing back to the host.
    ``graphs(inputs, shape, *consts)`` returns copies of those outputs, or None where this key
    (:func:`tree_key` of the inputs and the constants) cannot be captured: the caller then runs
    eagerly. ``what`` and ``shape`` name the call and its shape in the log.
    """

    def __init__(self, run: Callable[..., tuple], what: str) -> None:
        self.run, self.what = run, what
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.refused: dict[tuple, str] = {}  # key → why it runs eagerly
        self.pool: Any = None  # the memory pool every graph here captures into (the first graph's)

    def __call__(self, inputs: Tree, shape: str, *consts: Any) -> tuple | None:
        key = tree_key(inputs, *consts)
        if key in self.refused:
            return None
        if key not in self.graphs:
            why = capture_unavailable(next(_leaves(inputs))[1].device)
            graph = None if why else self._capture(key, inputs, shape, consts)
            if graph is None:
                self._refuse(key, why or self.refused.get(key, "capture failed"), shape)
                return None
            self.graphs[key] = graph
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return self.graphs[key](inputs)

    def _refuse(self, key: tuple, why: str, shape: str) -> None:
        global _warned
        self.refused[key] = why
        say = log.info if _warned else log.warning  # the first refusal of the process is a warning
        _warned = True
        say("CUDA graphs: %s runs kernel by kernel for %s (%s)", self.what, shape, why)

    def _capture(self, key: tuple, inputs: Tree, shape: str, consts: tuple) -> _Graph | None:
        static = _clone(inputs)
        try:
            graph, outputs, expected = record(lambda: self.run(static, *consts), self.pool)
        except Exception as e:  # capture raises many types (a host sync, an op that cannot be captured)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            self.refused[key] = f"capture failed: {type(e).__name__}: {first}"
            return None
        if not _agree(outputs, expected):
            self.refused[key] = "a replay disagreed with the eager run"
            return None
        log.info("CUDA graphs: captured %s for %s", self.what, shape)
        if self.pool is None:
            self.pool = graph.pool()
        return _Graph(graph, static, outputs)


class MetaStepGraphs:
    """DD's meta-gradient replayed from CUDA graphs, one per shape (see the module docstring).

    ``graphs(params0, images, labels, raw_lrs, x_real, y_real)`` returns the :class:`MetaGrad`,
    or None where this shape cannot be captured: the caller then runs
    :func:`ddray.core.unroll.meta_gradient` itself.
    """

    def __init__(self, model: nn.Module, memory: str = "full") -> None:
        self.model, self.memory = model, memory
        self.calls = Graphs(self._run, "DD's meta-step")

    @property
    def graphs(self) -> OrderedDict[tuple, _Graph]:
        return self.calls.graphs

    @property
    def refused(self) -> dict[tuple, str]:
        return self.calls.refused

    def __call__(self, params0: Params, images: torch.Tensor, labels: torch.Tensor, raw_lrs: torch.Tensor,
                 x_real: torch.Tensor, y_real: torch.Tensor) -> MetaGrad | None:
        inputs: Inputs = {"params0": params0, "images": images, "labels": labels, "raw_lrs": raw_lrs,
                          "x_real": x_real, "y_real": y_real}
        nets = next(iter(params0.values())).shape[0]
        out = self.calls(inputs, f"K={nets}, images {tuple(images.shape)}", self.memory)  # key: shape_key
        if out is None:
            return None
        g_img, g_raw, g_lab, loss = out
        return MetaGrad(g_img, g_raw, float(loss), nets, g_lab)

    def _run(self, static: Inputs, memory: str) -> tuple:
        return static_meta_gradient(self.model, static["params0"], static["images"], static["labels"],
                                    static["raw_lrs"], static["x_real"], static["y_real"], memory)


def record(run: Callable[[], tuple], pool: Any = None) -> tuple[Any, tuple, tuple]:
    """``run`` warmed up on a side stream, captured into a CUDA graph and replayed once: (the graph, the
    output tensors each replay writes, the last warm-up's eager result). ``pool``: another graph's memory
    pool to capture into (``CUDAGraph.pool()``), or None for a pool of its own."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            expected = tuple(None if t is None else t.clone() for t in run())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    graph.replay()
    torch.cuda.current_stream().synchronize()
    return graph, outputs, expected


def capture_unavailable(device: torch.device | str) -> str | None:
    """Why DD's meta-step cannot be captured on ``device``, or None if it can be tried."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None
