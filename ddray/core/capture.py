"""DD's meta-step captured whole on CUDA: the unroll, its vector-Jacobian product and the real-batch
gradient replayed as one CUDA graph.

On a GPU a default meta-step (LeNet, T = 30 inner steps on 10 images, one real batch of 1,024) is
a few GFLOP, well under a millisecond of arithmetic, but thousands of kernel launches, each with
its Python and autograd overhead: 100–400× what the card needs. A CUDA graph
(``torch.cuda.graphs``) records those launches once and replays them with one call.

What a graph captures is :func:`static_meta_gradient`: the same unroll, VJP and real-batch gradient
as :func:`ddray.core.unroll.meta_gradient` (eager kernels), written without a host synchronisation
(the outer loss stays a tensor until the replay is done). θ₀ and the real batch are drawn outside
the graph, so the seed streams are the eager ones; the graph reads them from static buffers.

Shapes are static in a graph, so :class:`MetaStepGraphs` keeps one per shape — (K, x̃, z̃ or ỹ,
ρ, the real batch, dtype, memory mode). K moves when workers join or leave and a meta-step's last
chunk can be smaller; a new shape is captured on first sight:

1. warm-up on a side stream (the eager function, twice: cuDNN and the allocator settle);
2. capture into a graph with its own memory pool;
3. one replay on the warm-up's inputs, checked against the warm-up's eager result
   (:data:`RTOL`/:data:`ATOL`): a graph that disagrees is never used.

Where capture is impossible — not a CUDA device, an error while capturing, a replay that
disagrees — the caller runs the eager meta-gradient, and the log says why: a warning the first
time in a process, an info line for each shape after that. On CPU nothing changes. Each graph holds its own buffers (inputs, outputs,
activations), so at most :data:`MAX_GRAPHS` shapes are kept, the least recently used dropped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, cast

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
Inputs = dict[str, Any]  # params0 (a dict), images, labels, raw_lrs, x_real, y_real
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


def shape_key(inputs: Inputs, memory: str) -> tuple:
    """What a graph is specialised to: every input's shape and dtype, the device and the memory mode."""
    parts = [(name, tuple(t.shape), t.dtype) for name, t in sorted(inputs["params0"].items())]
    parts += [(name, tuple(inputs[name].shape), inputs[name].dtype)
              for name in ("images", "labels", "raw_lrs", "x_real", "y_real")]
    return (str(inputs["images"].device), memory, tuple(parts))


def _copy_into(static: Inputs, inputs: Inputs) -> None:
    for name, t in inputs["params0"].items():
        static["params0"][name].copy_(t)
    for name in ("images", "labels", "raw_lrs", "x_real", "y_real"):
        static[name].copy_(inputs[name])


def _clone(inputs: Inputs) -> Inputs:
    out = {name: t.detach().clone() for name, t in inputs.items() if name != "params0"}
    out["params0"] = {name: t.detach().clone() for name, t in inputs["params0"].items()}
    return out


def _agree(got: tuple, expected: tuple) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and torch.allclose(a, b, RTOL, ATOL))
               for a, b in zip(got, expected))


class _Graph:
    """One captured meta-step: its graph, the static inputs it reads and the outputs it writes."""

    def __init__(self, graph: Any, static: Inputs, outputs: tuple) -> None:
        self.graph, self.static, self.outputs = graph, static, outputs

    def __call__(self, inputs: Inputs, nets: int) -> MetaGrad:
        _copy_into(self.static, inputs)
        self.graph.replay()
        g_img, g_raw, g_lab, loss = self.outputs
        return MetaGrad(g_img.clone(), g_raw.clone(), float(loss), nets, None if g_lab is None else g_lab.clone())


class MetaStepGraphs:
    """DD's meta-gradient replayed from CUDA graphs, one per shape (see the module docstring).

    ``graphs(params0, images, labels, raw_lrs, x_real, y_real)`` returns the :class:`MetaGrad`,
    or None where this shape cannot be captured: the caller then runs
    :func:`ddray.core.unroll.meta_gradient` itself.
    """

    def __init__(self, model: nn.Module, memory: str = "full") -> None:
        self.model, self.memory = model, memory
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.refused: dict[tuple, str] = {}  # shape → why it runs eagerly

    def __call__(self, params0: Params, images: torch.Tensor, labels: torch.Tensor, raw_lrs: torch.Tensor,
                 x_real: torch.Tensor, y_real: torch.Tensor) -> MetaGrad | None:
        inputs: Inputs = {"params0": params0, "images": images, "labels": labels, "raw_lrs": raw_lrs,
                          "x_real": x_real, "y_real": y_real}
        key = shape_key(inputs, self.memory)
        if key in self.refused:
            return None
        nets = next(iter(params0.values())).shape[0]
        if key not in self.graphs:
            why = capture_unavailable(images.device)
            graph = None if why else self._capture(key, inputs)
            if graph is None:
                self._refuse(key, why or self.refused.get(key, "capture failed"))
                return None
            self.graphs[key] = graph
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return self.graphs[key](inputs, nets)

    def _refuse(self, key: tuple, why: str) -> None:
        global _warned
        self.refused[key] = why
        say = log.info if _warned else log.warning  # the first refusal of the process is a warning
        _warned = True
        say("CUDA graphs: DD's meta-step runs kernel by kernel for K=%d, images %s (%s)", _nets(key),
            _shape(key, "images"), why)

    def _run(self, static: Inputs) -> tuple:
        return static_meta_gradient(self.model, static["params0"], static["images"], static["labels"],
                                    static["raw_lrs"], static["x_real"], static["y_real"], self.memory)

    def _capture(self, key: tuple, inputs: Inputs) -> _Graph | None:
        static = _clone(inputs)
        try:
            graph, outputs, expected = record(lambda: self._run(static))
        except Exception as e:  # capture raises many types (a host sync, an op that cannot be captured)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            self.refused[key] = f"capture failed: {type(e).__name__}: {first}"
            return None
        if not _agree(outputs, expected):
            self.refused[key] = "a replay disagreed with the eager meta-gradient"
            return None
        log.info("CUDA graphs: captured DD's meta-step for K=%d, images %s", _nets(key), _shape(key, "images"))
        return _Graph(graph, static, outputs)


def record(run: Callable[[], tuple]) -> tuple[Any, tuple, tuple]:
    """``run`` warmed up on a side stream, captured into a CUDA graph (its own memory pool) and replayed once:
    (the graph, the output tensors each replay writes, the last warm-up's eager result)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            expected = tuple(None if t is None else t.clone() for t in run())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    graph.replay()
    torch.cuda.current_stream().synchronize()
    return graph, outputs, expected


def _shape(key: tuple, name: str) -> tuple:
    return next(s for n, s, _ in key[2] if n == name)


def _nets(key: tuple) -> int:
    return key[2][0][1][0]  # the first parameter's leading dimension


def capture_unavailable(device: torch.device | str) -> str | None:
    """Why DD's meta-step cannot be captured on ``device``, or None if it can be tried."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None
