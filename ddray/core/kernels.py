"""The two hot functions of a meta-step, eager or compiled: the inner SGD step and the real-batch gradient.

Shapes as in :mod:`ddray.core.unroll`: parameters are dicts of (K, ...) tensors (K networks).

* ``step(θ, x, y, η) → θ − η ∇θ ℓ(x, y; θ)`` for K networks at once — called T times per
  meta-step on tiny batches (10 images), so its cost is per-op overhead;
* ``real_grad(θ, x, y) → (∇θ ℓ(x_real, y_real; θ⁽ᵏ⁾) per network, Σₖ ℓ)`` — one large batch
  per network, first order.

:class:`Kernels` holds both. With ``compile=True`` they go through ``torch.compile``
(TorchInductor: fused C++/OpenMP loops on CPU, Triton kernels on GPU): a step's forward,
its inner gradient and the parameter update become a few fused kernels, and autograd
through the unroll runs each step's compiled backward (the second-order terms included),
so the meta-gradient is unchanged. Eager and compiled kernels compute the same
function; their results differ by float rounding only (tests/core/test_kernels.py checks
float64). Compilation happens on first use per shape (K, batch) and grad mode; PyTorch
caches the generated code on disk, so later processes on the same machine start faster.

Where compilation is unavailable — TorchDynamo does not support this Python or
platform, no C++ compiler for CPU kernels, or the first compiled call fails — one
warning is issued per process and the eager kernels run.
"""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from ddray.core.batch_chunks import chunk_size, chunked_grad

Params = dict[str, torch.Tensor]
StepFn = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], Params]
GradFn = Callable[[Params, torch.Tensor, torch.Tensor], tuple[Params, float]]
T = TypeVar("T")

_warned = False


def compile_unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None if it can (as far as can be told
    without compiling)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"TorchDynamo does not support this platform (Python {'.'.join(map(str, __import__('sys').version_info[:2]))})"
    if torch.device(device).type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # InvalidCxxCompiler, or an older torch without the helper
            return f"no C++ compiler for TorchInductor's CPU kernels ({type(e).__name__}; set $CXX)"
    elif torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (TorchInductor's GPU kernels need it)"
    return None


def warn_eager(reason: str) -> None:
    """The one warning per process that ``--compile`` runs eagerly."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"--compile: {reason}; running the eager kernels instead", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- eager


def _single_net_step(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                     lr: torch.Tensor) -> Params:
    """The step for K = 1 with plain autograd: vmap's per-call overhead is not worth it for one net."""
    graph = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or lr.requires_grad
                                         or any(v.requires_grad for v in params.values()))
    with torch.enable_grad():
        # θ₀ (no grad) becomes a fresh leaf; a θₜ inside the graph is used as it is.
        p = {k: v[0] if v.requires_grad else v[0].detach().requires_grad_() for k, v in params.items()}
        loss = F.cross_entropy(functional_call(model, p, (x,)), y)
        g = torch.autograd.grad(loss, list(p.values()), create_graph=graph)
    out = {k: (v - lr * gk).unsqueeze(0) for (k, v), gk in zip(p.items(), g)}
    return out if graph else {k: v.detach() for k, v in out.items()}


def functional_step(model: nn.Module) -> StepFn:
    """θ − η ∇θ ℓ for K networks through ``torch.func`` (vmap over the networks of ``grad``)."""

    def one(p: Params, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor) -> Params:
        g = grad(lambda q: F.cross_entropy(functional_call(model, q, (x,)), y))(p)
        return {k: v - lr * g[k] for k, v in p.items()}

    return vmap(one, in_dims=(0, None, None, None))


def eager_step(model: nn.Module) -> StepFn:
    """The eager step: plain autograd for K = 1, :func:`functional_step` for K > 1."""
    vmapped = functional_step(model)

    def step(params: Params, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor) -> Params:
        if next(iter(params.values())).shape[0] == 1:
            return _single_net_step(model, params, x, y, lr)
        return vmapped(params, x, y, lr)

    return step


def eager_real_grad(model: nn.Module, chunk: int | None = None) -> GradFn:
    """Σₖ ∇θ ℓ(x, y; θ⁽ᵏ⁾) per network (first order, one network at a time, the batch in cache-sized
    chunks: :mod:`ddray.core.batch_chunks`) and Σₖ ℓ. ``chunk``: images per pass (default: by the cache)."""

    def real_grad(params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[Params, float]:
        k = next(iter(params.values())).shape[0]
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
        total = 0.0
        for i in range(k):
            with torch.enable_grad():
                p = {n: v[i].detach().requires_grad_() for n, v in params.items()}
                g, loss = chunked_grad(model, p, x, y, chunk)
            for n, gn in zip(p, g):
                grads[n].append(gn)
            total += float(loss)
        return {n: torch.stack(g) for n, g in grads.items()}, total

    return real_grad


# ----------------------------------------------------------------------------- compiled


def compiled_real_grad(model: nn.Module, chunk: int | None = None) -> GradFn:
    """:func:`eager_real_grad` with each chunk's forward + backward compiled."""

    def one(p: Params, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[Params, torch.Tensor]:
        return grad_and_value(lambda q: F.cross_entropy(functional_call(model, q, (x,)), y, reduction="sum")
                              / batch)(p)

    fused = torch.compile(one, dynamic=False, fullgraph=True)

    def real_grad(params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[Params, float]:
        k = next(iter(params.values())).shape[0]
        n = chunk or chunk_size(model, x)
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
        total = 0.0
        for i in range(k):
            p = {name: v[i].detach() for name, v in params.items()}
            parts = [fused(p, xc, yc, len(x)) for xc, yc in zip(x.split(n), y.split(n))]
            for name in params:
                grads[name].append(torch.stack([g[name] for g, _ in parts]).sum(0))
            total += float(sum(float(loss) for _, loss in parts))
        return {name: torch.stack(g) for name, g in grads.items()}, total

    return real_grad


class Kernels:
    """The step and real-batch gradient of ``model``, compiled when asked and possible.

    Args:
        model: the template module.
        compile: use ``torch.compile`` (see the module docstring); falls back to eager
            with one warning where that is unavailable.
        device: where the kernels will run (decides which compiler is needed).
        chunk: images per pass of the real-batch gradient (default: cache-sized on CPU, the whole
            batch on a GPU; :mod:`ddray.core.batch_chunks`).
    """

    def __init__(self, model: nn.Module, compile: bool = False, device: torch.device | str = "cpu",
                 chunk: int | None = None) -> None:
        self.model = model
        self.eager_step, self.eager_real_grad = eager_step(model), eager_real_grad(model, chunk)
        reason = compile_unavailable(device) if compile else None
        if reason:
            warn_eager(reason)
        self.compiled = compile and reason is None
        if self.compiled:
            self._step: StepFn = torch.compile(functional_step(model), dynamic=False, fullgraph=True)
            self._real_grad: GradFn = compiled_real_grad(model, chunk)

    @property
    def step(self) -> StepFn:
        return self._step if self.compiled else self.eager_step

    @property
    def real_grad(self) -> GradFn:
        return self._real_grad if self.compiled else self.eager_real_grad

    def run(self, fn: Callable[["Kernels"], T]) -> T:
        """``fn(self)``; if the compiled kernels fail there, warn once, switch to eager and run it again."""
        if not self.compiled:
            return fn(self)
        try:
            return fn(self)
        except Exception as e:  # dynamo/inductor raise many types; eager re-raises a genuine error
            self.compiled = False
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warn_eager(f"compilation failed ({type(e).__name__}: {first[:200]})")
            return fn(self)
