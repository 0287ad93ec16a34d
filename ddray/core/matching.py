"""Gradient matching (DC, DSA) and distribution matching (DM): per-class objectives on fresh networks.

Notation and shapes (the synthetic set of these methods is one batch, S = 1):

    x̃        synthetic images, (1, N, C, H, W), N = ipc · classes, class c at columns c·ipc … (c+1)·ipc
    x_c      real images of class c, (real_per_class, C, H, W), drawn per meta-step
    θ        a network's parameters (random for DM; for DC trained on x̃ between outer steps)
    A_ω      a DSA augmentation with parameters ω — the *same* ω for x_c and x̃_c (siamese)

DC (Zhao, Mopuri & Bilen, ICLR 2021) matches, class by class, the gradient of the
loss on the real and on the synthetic images:

    L_DC = Σ_c D(∇θ ℓ(A_ω(x_c), c; θ), ∇θ ℓ(A_ω(x̃_c), c; θ)),
    D(G, G̃) = Σ_layers Σ_out-rows (1 − cos(G_row, G̃_row))          (biases/norm scales: 0)

One meta-step is one outer step of the paper; ``outer_loop`` of them make an
iteration that starts from a fresh network, which is trained for ``inner_loop``
epochs on the current x̃ (SGD, ``net_lr``) before each further outer step. A
worker keeps its networks between meta-steps; one that lacks a network in the
middle of an iteration (a restarted worker, a resumed run) rebuilds it from the
iteration's θ₀ trained ``outer step × inner_loop`` epochs on the current x̃ — the
run continues, no longer bit-identical to an uninterrupted one. DSA (Zhao &
Bilen, ICML 2021) is DC with A_ω on.

DM (Zhao & Bilen, WACV 2023) matches class means of embeddings ψθ (the network
without its last layer) under fresh random networks:

    L_DM = Σ_c ‖ mean ψθ(A_ω(x_c)) − mean ψθ(A_ω(x̃_c)) ‖²

All draws come from (run seed, purpose, meta-step, net, class), so a meta-step's
K networks can be split over workers at will.
"""

from __future__ import annotations

from typing import TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ddray.core.augment import AugParams, apply_aug, apply_aug_select, sample_aug, stack_aug
from ddray.core.batch_chunks import chunked_embed, chunked_grad
from ddray.core.capture import Graphs
from ddray.core.images import ImageSource, subset
from ddray.core.inits import AUGMENT, DISTILL, NET_TRAIN, REAL_BATCH, InitSampler, generator
from ddray.core.models import Params
from ddray.core.unroll import MetaGrad


def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """DC's per-layer distance: Σ over output rows of 1 − cos; 0 for 1-D tensors (biases, norm scales)."""
    if g_real.dim() == 1:
        return g_real.new_zeros(())
    a, b = g_real.flatten(1), g_syn.flatten(1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
    return (1 - cos).sum()


class ClassBatches:
    """Draws ``per_class`` real images of every class for a meta-step (the same on every worker)."""

    def __init__(self, x: ImageSource, y: torch.Tensor, num_classes: int, per_class: int, seed: int) -> None:
        self.pools = [subset(x, y == c) for c in range(num_classes)]  # raw (uint8) where x is Images
        for c, pool in enumerate(self.pools):
            if len(pool) == 0:
                raise ValueError(f"--real-per-class: class {c} has no training images")
        self.per_class, self.seed = per_class, seed

    def draw(self, step: int) -> list[torch.Tensor]:
        out = []
        for c, pool in enumerate(self.pools):
            idx = torch.randperm(len(pool), generator=generator(self.seed, REAL_BATCH, step, c))
            out.append(pool[idx[: self.per_class].to(pool.device)])
        return out

    def to(self, device: torch.device) -> "ClassBatches":
        self.pools = [p.to(device) for p in self.pools]
        return self


PerClassT = TypeVar("PerClassT", bound="_PerClass")


class _PerClass:
    """What DC and DM share: the per-class real batches, siamese augmentation, fresh networks, and a
    network's share of a meta-step replayed from CUDA graphs (:meth:`replay`)."""

    chunk: int | None = None  # real images per forward (no graph is kept for them); None: by the cache
    what = ""  # the captured call, for the log

    def __init__(self, model: nn.Module, sampler: InitSampler, real: ClassBatches, ipc: int, seed: int,
                 strategy: str | None, cuda_graphs: bool = True) -> None:
        self.model, self.sampler, self.real = model, sampler, real
        self.ipc, self.seed, self.strategy = ipc, seed, strategy
        self.cuda_graphs = cuda_graphs
        self.graphs: Graphs | None = None  # made by to(a CUDA device)

    def pair(self, x_real: torch.Tensor, x_syn: torch.Tensor, step: int, net: int,
             c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, synthetic) images of class ``c``, both under one augmentation draw when DSA is on."""
        if self.strategy is None:
            return x_real, x_syn
        omega = self.draw(step, net, c)
        return apply_aug(x_real, omega), apply_aug(x_syn, omega)

    def draw(self, step: int, net: int, c: int) -> AugParams:
        """The siamese augmentation draw of class ``c`` for ``net`` at ``step`` (DSA on)."""
        assert self.strategy is not None
        return sample_aug(self.strategy, 1, generator(self.seed, AUGMENT, step, net, c))

    def fresh(self, key: int, net: int, device: torch.device) -> Params:
        """θ₀ of network ``net`` at ``key`` (DM: the meta-step; DC: the iteration), unbatched."""
        return {n: v[0].to(device) for n, v in self.sampler.sample([(DISTILL, key, net)]).items()}

    def replay(self, theta: Params, x_syn: torch.Tensor, real: list[torch.Tensor], step: int,
               net: int) -> tuple[torch.Tensor, float] | None:
        """(∂L/∂x̃, L) of one network from this shape's CUDA graph, or None (no graphs, or this shape
        refused: the caller computes it eagerly)."""
        if self.graphs is None:
            return None
        sizes = tuple(len(r) for r in real)
        inputs: dict = {"theta": theta, "x_syn": x_syn, "x_real": torch.cat(real)}
        if self.strategy is not None:
            draws = [self.draw(step, net, c) for c in range(len(real))]
            inputs["aug_real"] = stack_aug(draws, list(sizes), self.strategy, x_syn)
            inputs["aug_syn"] = stack_aug(draws, [self.ipc] * len(real), self.strategy, x_syn)
        out = self.graphs(inputs, f"real images {sizes}, synthetic {tuple(x_syn.shape)}", sizes, self.ipc,
                          self.strategy, self.chunk)
        return None if out is None else (out[0], float(out[1]))

    def static(self, inputs: dict, sizes: tuple[int, ...], ipc: int, strategy: str | None,
               chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What a graph captures: (∂L/∂x̃, L) of one network, both tensors (:func:`static_dc`, :func:`static_dm`)."""
        raise NotImplementedError

    def to(self: PerClassT, device: torch.device) -> PerClassT:
        """Keep the real images on ``device``; there, with ``cuda_graphs`` on a CUDA device, replay from graphs."""
        self.real = self.real.to(device)
        self.graphs = Graphs(self.static, self.what) if self.cuda_graphs and device.type == "cuda" else None
        return self


class GradientMatching(_PerClass):
    """DC / DSA meta-gradient ∂L_DC/∂x̃ for a share of a meta-step's networks (see the module docstring).

    Args:
        model: template module; sampler: θ₀ per (DISTILL, iteration, net).
        real: the real images by class; ipc: images per class.
        loops: (outer_loop, inner_loop); net_lr: SGD step of the network between outer steps.
        seed: run seed; strategy: DSA strategy or None.
        cuda_graphs: on a CUDA device (:meth:`to`), each network's matching — augmentation, both
            gradients, the distance and its gradient — is replayed from a CUDA graph captured once
            per shape (:func:`static_dc`, :class:`ddray.core.capture.Graphs`; eager where capture
            fails). The network's training between outer steps stays eager. No effect on CPU.
    """

    what = "DC's matching"

    def __init__(self, model: nn.Module, sampler: InitSampler, real: ClassBatches, ipc: int, seed: int,
                 strategy: str | None, loops: tuple[int, int], net_lr: float, batch_size: int = 256,
                 cuda_graphs: bool = True) -> None:
        super().__init__(model, sampler, real, ipc, seed, strategy, cuda_graphs)
        self.outer, self.inner = loops
        self.net_lr, self.batch_size = net_lr, batch_size
        self.nets: dict[int, tuple[int, int, Params]] = {}  # net → (iteration, outer step, θ ready for it)

    def __call__(self, images: torch.Tensor, raw_lrs: torch.Tensor, step: int, nets: list[int],
                 labels: torch.Tensor | None = None) -> MetaGrad:
        assert labels is None, "matching learns no labels (DistillConfig refuses --labels learned for it)"
        x_syn = images[0].detach()
        real = self.real.draw(step)
        g, loss = torch.zeros_like(images), 0.0
        for k in nets:
            theta = self.network(step, k, x_syn)
            lk, gk = self.match(theta, x_syn, real, step, k)
            g[0] += gk
            loss += lk
        return MetaGrad(g, torch.zeros_like(raw_lrs), loss, len(nets))

    def network(self, step: int, net: int, x_syn: torch.Tensor) -> Params:
        """θ of ``net`` for outer step ``step``: fresh at an iteration's start, else trained on x̃ since."""
        it, ol = divmod(step, self.outer)
        have = self.nets.get(net)
        if have is not None and have[0] == it and have[1] == ol:
            return have[2]
        if ol == 0:
            theta = self.fresh(it, net, x_syn.device)
        elif have is not None and have[0] == it and have[1] == ol - 1:
            theta = self.train(have[2], x_syn, step, net, self.inner)
        else:  # lost (restart, resume): rebuild from the iteration's θ₀ on the current x̃
            theta = self.train(self.fresh(it, net, x_syn.device), x_syn, step, net, ol * self.inner)
        self.nets[net] = (it, ol, theta)
        return theta

    def train(self, theta: Params, x_syn: torch.Tensor, step: int, net: int, epochs: int) -> Params:
        """``epochs`` epochs of SGD(``net_lr``) on the (augmented) synthetic images, shuffled minibatches."""
        labels = torch.arange(len(x_syn) // self.ipc, device=x_syn.device).repeat_interleave(self.ipc)
        p = {n: v.detach().clone() for n, v in theta.items()}
        for e in range(epochs):
            g = generator(self.seed, NET_TRAIN, step, net, e)
            order = torch.randperm(len(x_syn), generator=g).to(x_syn.device)
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo:lo + self.batch_size]
                x = x_syn[idx]
                if self.strategy is not None:
                    x = apply_aug(x, sample_aug(self.strategy, len(x), g))
                p = {n: v.requires_grad_() for n, v in p.items()}
                loss = F.cross_entropy(functional_call(self.model, p, (x,)), labels[idx])
                grads = torch.autograd.grad(loss, list(p.values()))
                p = {n: (v - self.net_lr * gv).detach() for (n, v), gv in zip(p.items(), grads)}
        return p

    def match(self, theta: Params, x_syn: torch.Tensor, real: list[torch.Tensor], step: int,
              net: int) -> tuple[float, torch.Tensor]:
        """(L_DC, ∂L_DC/∂x̃ (N, C, H, W)) of one network."""
        replayed = self.replay(theta, x_syn, real, step, net)
        if replayed is not None:
            return replayed[1], replayed[0]
        p = {n: v.detach().requires_grad_() for n, v in theta.items()}
        x = x_syn.detach().requires_grad_()
        total = x.new_zeros(())
        for c, x_c in enumerate(real):
            xr, xs = self.pair(x_c, x[c * self.ipc:(c + 1) * self.ipc], step, net, c)
            yr = torch.full((len(xr),), c, device=x.device)
            ys = torch.full((len(xs),), c, device=x.device)
            g_real, _ = chunked_grad(self.model, p, xr, yr, self.chunk)  # cache-sized chunks on CPU
            g_syn = torch.autograd.grad(F.cross_entropy(functional_call(self.model, p, (xs,)), ys),
                                        list(p.values()), create_graph=True)
            total = total + sum(layer_distance(a.detach(), b) for a, b in zip(g_real, g_syn))
        (gx,) = torch.autograd.grad(total, [x])
        return float(total.detach()), gx

    def static(self, inputs: dict, sizes: tuple[int, ...], ipc: int, strategy: str | None,
               chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return static_dc(self.model, inputs["theta"], inputs["x_syn"], inputs["x_real"], sizes, ipc, strategy,
                         inputs.get("aug_real"), inputs.get("aug_syn"), chunk)


class DistributionMatching(_PerClass):
    """DM meta-gradient ∂L_DM/∂x̃ for a share of a meta-step's networks (see the module docstring).

    DM's classes are independent, so each network embeds all classes' (augmented) real
    images together, in cache-sized chunks on CPU (:mod:`ddray.core.batch_chunks`; ``chunk``
    images per forward if set), and all synthetic images in one forward.

    ``cuda_graphs``: on a CUDA device (:meth:`to`), each network's share — augmentation,
    embeddings, the loss and its gradient — is replayed from a CUDA graph captured once per
    shape (:func:`static_dm`, :class:`ddray.core.capture.Graphs`; eager where capture fails).
    No effect on CPU.
    """

    what = "DM's iteration"

    def __call__(self, images: torch.Tensor, raw_lrs: torch.Tensor, step: int, nets: list[int],
                 labels: torch.Tensor | None = None) -> MetaGrad:
        assert labels is None, "matching learns no labels (DistillConfig refuses --labels learned for it)"
        x_syn = images[0].detach()
        real = self.real.draw(step)
        g, loss = torch.zeros_like(images), 0.0
        for k in nets:
            theta = self.fresh(step, k, x_syn.device)
            gx, lk = self.replay(theta, x_syn, real, step, k) or self.eager(theta, x_syn, real, step, k)
            g[0] += gx
            loss += lk
        return MetaGrad(g, torch.zeros_like(raw_lrs), loss, len(nets))

    def eager(self, theta: Params, x_syn: torch.Tensor, real: list[torch.Tensor], step: int,
              net: int) -> tuple[torch.Tensor, float]:
        """(∂L_DM/∂x̃ (N, C, H, W), L_DM) of one network, class by class, kernel by kernel."""
        x = x_syn.detach().requires_grad_()
        pairs = [self.pair(x_c, x[c * self.ipc:(c + 1) * self.ipc], step, net, c) for c, x_c in enumerate(real)]
        with torch.no_grad():
            emb = chunked_embed(self.model, theta, torch.cat([r for r, _ in pairs]), self.chunk)
            mean_real = class_means(emb, [len(r) for r, _ in pairs])
        mean_syn = class_means(self.embed(theta, torch.cat([s for _, s in pairs])), [len(s) for _, s in pairs])
        total = ((mean_real - mean_syn) ** 2).sum()
        (gx,) = torch.autograd.grad(total, [x])
        return gx, float(total.detach())

    def static(self, inputs: dict, sizes: tuple[int, ...], ipc: int, strategy: str | None,
               chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return static_dm(self.model, inputs["theta"], inputs["x_syn"], inputs["x_real"], sizes, ipc, strategy,
                         inputs.get("aug_real"), inputs.get("aug_syn"), chunk)

    def embed(self, theta: Params, x: torch.Tensor) -> torch.Tensor:
        """ψθ(x): the network without its last layer, (B, D)."""
        return functional_call(self.model, theta, (x,), {"embed": True})


def class_means(emb: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Means of consecutive row blocks of ``emb`` (B, D) with the given ``sizes`` → (classes, D)."""
    if len(set(sizes)) == 1:
        return emb.view(len(sizes), sizes[0], -1).mean(1)
    return torch.stack([part.mean(0) for part in emb.split(sizes)])


def static_dc(model: nn.Module, theta: Params, x_syn: torch.Tensor, x_real: torch.Tensor, sizes: tuple[int, ...],
              ipc: int, strategy: str | None, aug_real: AugParams | None = None, aug_syn: AugParams | None = None,
              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`GradientMatching.match` as (∂L_DC/∂x̃, L_DC), both tensors, for a CUDA graph to capture.

    θ: the network of this outer step; ``x_real``: the classes' real images one after another
    (``sizes`` of them); ``aug_real`` and ``aug_syn``: the classes' draws per image
    (:func:`ddray.core.augment.stack_aug`), applied by :func:`ddray.core.augment.apply_aug_select`
    (no branch on the draw). Each class's real and synthetic gradients and their distance as in
    the eager form: the same values and gradient. Nothing is read back to the host.
    """
    p = {n: v.detach().requires_grad_() for n, v in theta.items()}
    x = x_syn.detach().requires_grad_()
    with torch.enable_grad():
        xr_all, xs_all = _augmented(x_real, x, strategy, aug_real, aug_syn)
        total = x.new_zeros(())
        for c, (xr, xs) in enumerate(zip(xr_all.split(list(sizes)), xs_all.split(ipc))):
            g_real, _ = chunked_grad(model, p, xr, torch.full((len(xr),), c, device=x.device), chunk)
            loss = F.cross_entropy(functional_call(model, p, (xs,)), torch.full((len(xs),), c, device=x.device))
            g_syn = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            total = total + sum(layer_distance(a.detach(), b) for a, b in zip(g_real, g_syn))
        (gx,) = torch.autograd.grad(total, [x])
    return gx, total.detach()


def static_dm(model: nn.Module, theta: Params, x_syn: torch.Tensor, x_real: torch.Tensor, sizes: tuple[int, ...],
              ipc: int, strategy: str | None, aug_real: AugParams | None = None, aug_syn: AugParams | None = None,
              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`DistributionMatching.eager` as (∂L_DM/∂x̃, L_DM), both tensors, for a CUDA graph to capture.

    Arguments as :func:`static_dc`'s (θ: a fresh network). The same values and gradient as the
    eager form; nothing is read back to the host.
    """
    x = x_syn.detach().requires_grad_()
    with torch.enable_grad():
        xr, xs = _augmented(x_real, x, strategy, aug_real, aug_syn)
        mean_real = class_means(chunked_embed(model, theta, xr, chunk), list(sizes))
        emb = functional_call(model, theta, (xs,), {"embed": True})
        total = ((mean_real - class_means(emb, [ipc] * len(sizes))) ** 2).sum()
        (gx,) = torch.autograd.grad(total, [x])
    return gx, total.detach()


def _augmented(x_real: torch.Tensor, x_syn: torch.Tensor, strategy: str | None, aug_real: AugParams | None,
               aug_syn: AugParams | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, synthetic) images under the classes' draws per image, without a branch (no graph for the real)."""
    if strategy is None:
        return x_real, x_syn
    with torch.no_grad():
        xr = apply_aug_select(x_real, cast(AugParams, aug_real), strategy)
    return xr, apply_aug_select(x_syn, cast(AugParams, aug_syn), strategy)
