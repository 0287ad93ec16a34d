"""The differentiable inner loop of dataset distillation and its meta-gradient.

Notation (Wang et al. 2018) and shapes:

    x̃      synthetic images, (S, N, C, H, W): S distill steps, N = M·classes images each
    ỹ      their labels, the same for every step: hard class indices (N,), or learned label
           logits z̃ (N, classes) whose targets are softmax(z̃) (soft cross-entropy)
    η̃ₜ     step size of inner step t, η̃ = softplus(ρ) with raw ρ of shape (T,)
    θ₀     initial network parameters, a dict of (K, ...) tensors: K networks at once
    T      = S × E inner steps; step t uses batch x̃_(t mod S) and η̃ₜ
    Rₜ     the rows step t trains on, (n,) indices into N: all N unless ``rows`` is given
           (MTT's ``batch_syn``: a seeded sample per step); x̃_b[Rₜ] goes with ỹ[Rₜ]
    Aₜ     the per-step ``transform`` of the selected rows (DSA; identity by default)
    θₜ₊₁   = θₜ − η̃ₜ ∇θ ℓ(Aₜ(x̃_(t mod S)[Rₜ]), ỹ[Rₜ]; θₜ)          (unrolled SGD)
    L      = 1/K Σₖ ℓ(x_real, y_real; θ_T⁽ᵏ⁾)                      (outer loss)

The meta-gradient is (∂L/∂x̃, ∂L/∂ρ), and ∂L/∂z̃ when the labels are learned. It is
computed in two parts, which is the chain rule written out: first the ordinary
first-order gradient gₜ = ∂L/∂θ_T on the real batch (one network at a time: a large
batch, compute-bound), then the vector-Jacobian product of the unroll with gₜ (all K
networks at once through ``torch.func.vmap``: small batches, overhead-bound). Memory modes:

* ``full``: keep the whole unrolled graph; memory grows with T × K × (activations
  of one synthetic batch + parameters).
* ``recompute``: keep only θ₀…θ_{T−1} (T × K × |θ| floats), walk back step by step
  recomputing one step's graph at a time; activations no longer grow with T. Costs
  one extra forward+gradient of each step.

Both give the same gradients (tested in float64 against finite differences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

from ddray.core.kernels import Kernels, StepFn, eager_real_grad, eager_step

Params = dict[str, torch.Tensor]


def sgd_step(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
             lr: torch.Tensor) -> Params:
    """One functional SGD step of a single network: θ − lr · ∇θ ℓ(x, y; θ)."""

    def loss(p: Params) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    g = grad(loss)(params)
    return {k: v - lr * g[k] for k, v in params.items()}


def batched_step(model: nn.Module) -> StepFn:
    """``sgd_step`` for K networks at once: params (K, ...), shared x, y and lr (eager)."""
    return eager_step(model)


def step_schedule(steps: int, epochs: int) -> list[int]:
    """Which synthetic batch each inner step t uses: t mod S (epoch-major)."""
    return [t % steps for t in range(steps * epochs)]


Transform = Callable[[int, torch.Tensor], torch.Tensor]  # (t, x̃_b[Rₜ]) → the batch step t trains on
Rows = Callable[[int], torch.Tensor]  # t → Rₜ, (n,) int64 indices into the N images (and labels)


def targets(labels: torch.Tensor) -> torch.Tensor:
    """What the inner loss trains towards: hard labels as they are, label logits z̃ as softmax(z̃)."""
    return F.softmax(labels, dim=-1) if labels.is_floating_point() else labels


def _pick_rows(rows: Rows | None, t: int, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step t's rows of a batch (N, ...) and of its labels (N,): (x[Rₜ], y[Rₜ], Rₜ); (x, y, None)
    when ``rows`` is None (all N)."""
    if rows is None:
        return x, y, None
    r = rows(t)
    return x[r], y[r], r


def unroll(model: nn.Module, params0: Params, images: torch.Tensor, labels: torch.Tensor,
           lrs: torch.Tensor, order: list[int] | None = None, transform: Transform | None = None,
           step: StepFn | None = None, rows: Rows | None = None) -> Params:
    """θ_T from θ₀ (K-batched) by T = len(lrs) SGD steps on the synthetic batches.

    Differentiable in ``images``, ``lrs`` and label logits whenever they require grad.
    ``order[t]`` picks the batch of step t (default t mod S); ``rows(t)`` picks the
    images of that batch, and their labels, that step t trains on (default all N);
    ``transform(t, x)`` (e.g. a seeded differentiable augmentation) is applied to
    step t's selected images; ``step``: the step function (default
    :func:`batched_step`; e.g. a compiled one).
    """
    step = step or batched_step(model)
    order = order if order is not None else step_schedule(images.shape[0], len(lrs) // images.shape[0])
    p = params0
    y_all = targets(labels)
    for t, b in enumerate(order):
        x, y, _ = _pick_rows(rows, t, images[b], y_all)
        p = step(p, x if transform is None else transform(t, x), y, lrs[t])
    return p


@dataclass
class MetaGrad:
    """Sum over the K networks of a meta-step (divide by K to average)."""

    images: torch.Tensor  # (S, N, C, H, W)
    raw_lrs: torch.Tensor  # (T,)
    loss: float  # Σₖ ℓ(x_real; θ_T⁽ᵏ⁾)
    nets: int  # K
    labels: torch.Tensor | None = None  # ∂/∂z̃ (N, classes) when the labels are learned logits


def real_batch_grad(model: nn.Module, params: Params, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[Params, float]:
    """Σₖ ∇θ ℓ(x, y; θ⁽ᵏ⁾) per network (first order, one net at a time), and Σₖ ℓ."""
    return eager_real_grad(model)(params, x, y)


Outer = Callable[[Params], tuple[Params, float]]  # θ_T (K, ...) → (∂L/∂θ_T per network, Σₖ Lₖ)


def meta_gradient(model: nn.Module, params0: Params, images: torch.Tensor, labels: torch.Tensor,
                  raw_lrs: torch.Tensor, x_real: torch.Tensor, y_real: torch.Tensor,
                  memory: str = "full", kernels: Kernels | None = None) -> MetaGrad:
    """∂/∂(x̃, ρ) of Σₖ ℓ(x_real, y_real; θ_T⁽ᵏ⁾), back-propagated through all T steps.

    Args:
        model: template module (its own parameters are never used or changed).
        params0: θ₀ for K networks, dict of (K, ...) tensors; left untouched.
        images: x̃, (S, N, C, H, W).
        labels: ỹ, (N,) hard, or learned logits z̃ (N, classes) (then the result has ∂/∂z̃ too).
        raw_lrs: ρ, (T,); step sizes are softplus(ρ); T must be a multiple of S.
        x_real, y_real: the real batch (B, C, H, W), (B,). For an attack pass the
            relabelled targets.
        memory: ``"full"`` or ``"recompute"`` (see the module docstring).
        kernels: the step and real-batch gradient (:class:`~ddray.core.kernels.Kernels`;
            compiled ones with ``Kernels(model, compile=True)``); default eager.
    """
    k = kernels or Kernels(model)
    return unroll_vjp(model, params0, images, labels, raw_lrs, lambda p: k.real_grad(p, x_real, y_real), memory,
                      kernels=k)


def unroll_vjp(model: nn.Module, params0: Params, images: torch.Tensor, labels: torch.Tensor,
               raw_lrs: torch.Tensor, outer: Outer, memory: str = "full",
               transform: Transform | None = None, kernels: Kernels | None = None,
               rows: Rows | None = None) -> MetaGrad:
    """∂/∂(x̃, ρ) of an outer loss of θ_T, the unroll's vector-Jacobian product with ``outer(θ_T)``.

    ``outer`` returns the first-order ∂L/∂θ_T of every network and Σₖ Lₖ: the real-batch
    loss for DD (:func:`meta_gradient`), the normalised distance to an expert's
    parameters for MTT. ``transform`` and ``rows``: see :func:`unroll` (both must be
    deterministic in t: ``recompute`` calls them again on the way back); images in no
    step's rows get a zero gradient. ``kernels``: see :func:`meta_gradient`; if compiled
    ones fail, the meta-gradient is computed again eagerly (one warning).
    """
    if memory not in ("full", "recompute"):
        raise ValueError(f"--memory: unknown mode {memory!r}; choose full or recompute")
    kern = kernels or Kernels(model)
    return kern.run(lambda k: _unroll_vjp(model, params0, images, labels, raw_lrs, outer, memory, transform,
                                          k.step, rows))


def _unroll_vjp(model: nn.Module, params0: Params, images: torch.Tensor, labels: torch.Tensor,
                raw_lrs: torch.Tensor, outer: Outer, memory: str, transform: Transform | None,
                step: StepFn, rows: Rows | None = None) -> MetaGrad:
    images = images.detach().requires_grad_()
    raw_lrs = raw_lrs.detach().requires_grad_()
    learned = labels.is_floating_point()
    labels = labels.detach().requires_grad_(learned)
    params0 = {k: v.detach() for k, v in params0.items()}
    k = next(iter(params0.values())).shape[0]
    if memory == "full":
        with torch.enable_grad():
            p_t = unroll(model, params0, images, labels, F.softplus(raw_lrs), transform=transform, step=step,
                         rows=rows)
            g_t, loss = outer(p_t)
            g = torch.autograd.grad(list(p_t.values()), [images, raw_lrs, *([labels] if learned else [])],
                                    grad_outputs=list(g_t.values()))
        return MetaGrad(g[0], g[1], loss, k, g[2] if learned else None)
    return _unroll_vjp_recompute(model, params0, images, labels, raw_lrs, outer, transform, step, rows)


def _unroll_vjp_recompute(model: nn.Module, params0: Params, images: torch.Tensor, labels: torch.Tensor,
                          raw_lrs: torch.Tensor, outer: Outer, transform: Transform | None,
                          step: StepFn, rows: Rows | None = None) -> MetaGrad:
    order = step_schedule(images.shape[0], raw_lrs.shape[0] // images.shape[0])

    def batch(t: int, x: torch.Tensor) -> torch.Tensor:
        return x if transform is None else transform(t, x)

    learned = labels.is_floating_point()
    # Forward: store θ₀…θ_{T−1} only (no graph).
    history = [params0]
    with torch.no_grad():
        lrs = F.softplus(raw_lrs)
        y_all = targets(labels)
        for t, b in enumerate(order):
            x, y, _ = _pick_rows(rows, t, images[b], y_all)
            history.append(step(history[-1], batch(t, x), y, lrs[t]))
    g_theta, loss = outer(history.pop())
    g_img = torch.zeros_like(images)
    g_raw = torch.zeros_like(raw_lrs)
    g_lab = torch.zeros_like(labels) if learned else None
    # Backward: re-run step t with a graph, pull gₜ₊₁ back to θₜ, x̃_b[Rₜ], ρₜ (and z̃).
    for t in reversed(range(len(order))):
        b = order[t]
        with torch.enable_grad():
            p = {n: v.requires_grad_() for n, v in history.pop().items()}
            z = labels.detach().requires_grad_(learned)
            x, y, r_t = _pick_rows(rows, t, images[b].detach(), targets(z))
            x = x.requires_grad_()
            r = raw_lrs[t].detach().requires_grad_()
            out = step(p, batch(t, x), y, F.softplus(r))
            grads = torch.autograd.grad(list(out.values()), [*p.values(), x, r, *([z] if learned else [])],
                                        grad_outputs=list(g_theta.values()))
        if g_lab is not None:
            g_lab += grads[-1]
            grads = grads[:-1]
        g_theta = dict(zip(p, grads[:-2]))
        if r_t is None:
            g_img[b] += grads[-2]
        else:
            g_img[b].index_add_(0, r_t, grads[-2])
        g_raw[t] += grads[-1]
    return MetaGrad(g_img, g_raw, loss, len(next(iter(params0.values()))), g_lab)
