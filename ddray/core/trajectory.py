"""Trajectory matching (MTT, Cazenavette et al., CVPR 2022): the student should land where an expert did.

Notation and shapes:

    x̃          synthetic images, (1, N, C, H, W), with labels ỹ, (N,)
    B_n         the rows student step n trains on: all N, or with ``batch_syn`` the next batch of
                a seeded permutation of the N cut into batches of batch_syn (MTT's way)
    ρ          raw step size, (1,); the student's step size is η̃ = softplus(ρ) (learned, shared by all steps)
    θ*_t        an expert's parameters after t epochs on real data (``ddray experts``)
    t           a random start epoch, 0 ≤ t < max_start_epoch; M = ``expert_epochs``
    θ̂_0 = θ*_t, θ̂_{n+1} = θ̂_n − η̃ ∇θ ℓ(A(x̃[B_n]), ỹ[B_n]; θ̂_n) for n < ``syn_steps``  (A: DSA if on)

    L = ‖θ̂_{syn_steps} − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²

The unroll is :func:`ddray.core.unroll.unroll_vjp` with this ``outer``, so
``memory="recompute"`` keeps memory flat in ``syn_steps`` exactly as for DD. K
networks per meta-step are K independent (expert, start epoch) draws, keyed by
(run seed, meta-step, net); the batch B_n and the augmentation of student step n are
keyed by (run seed, meta-step, n) and shared by the K students of a meta-step, so
``recompute`` rebuilds step n on exactly the same images, and any worker, or a resumed
run, draws the same ones. Images in no B_n of a meta-step get a zero gradient from it.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, cast

import torch
import torch.nn as nn

from ddray.core.augment import AugParams, apply_aug, apply_aug_select, sample_aug, stack_aug
from ddray.core.capture import Graphs
from ddray.core.inits import AUGMENT, SYN_BATCH, TRAJECTORY, generator
from ddray.core.kernels import Kernels
from ddray.core.models import Params, stack_params
from ddray.core.unroll import MetaGrad, Outer, Rows, Transform, unroll_vjp


class Expert(Protocol):
    """An expert trajectory: its parameters after ``epoch`` epochs (``ddray.inputs.experts.Trajectory``)."""

    @property
    def epochs(self) -> int: ...

    def at(self, epoch: int) -> Params: ...


class TrajectoryMatching:
    """MTT meta-gradient ∂L/∂(x̃, ρ) summed over a share of a meta-step's students.

    Args:
        model: template module (the experts' architecture).
        experts: the expert trajectories; each needs ≥ max_start_epoch − 1 + expert_epochs epochs.
        labels: ỹ, (N,).
        syn_steps, expert_epochs, max_start_epoch: see the module docstring.
        seed: run seed; strategy: DSA strategy or None; memory: ``full`` or ``recompute``.
        compile: compile the student's step (:mod:`ddray.core.kernels`).
        batch_syn: images per student step, 1 ≤ batch_syn ≤ N (MTT's ``--batch_syn``); None:
            all N every step.
        cuda_graphs: on a CUDA device (:meth:`to`), replay each meta-step — the students' unroll,
            its VJP and the distance gradient — from a CUDA graph captured once per shape
            (:func:`static_mtt`, :class:`ddray.core.capture.Graphs`; eager where capture fails, and
            ``compile`` applies only there). No effect on CPU.
    """

    def __init__(self, model: nn.Module, experts: Sequence[Expert], labels: torch.Tensor, syn_steps: int,
                 expert_epochs: int, max_start_epoch: int, seed: int, strategy: str | None,
                 memory: str = "full", compile: bool = False, batch_syn: int | None = None,
                 cuda_graphs: bool = True) -> None:
        if batch_syn is not None and not 1 <= batch_syn <= len(labels):
            raise ValueError(f"--batch-syn {batch_syn}: must be between 1 and {len(labels)} "
                             "(the number of synthetic images)")
        need = max_start_epoch - 1 + expert_epochs
        short = [i for i, e in enumerate(experts) if e.epochs < need]
        if short:
            raise ValueError(f"--max-start-epoch {max_start_epoch} + --expert-epochs {expert_epochs}: expert "
                             f"{short[0]} has only {experts[short[0]].epochs} epochs (needs {need})")
        self.model, self.experts, self.labels = model, experts, labels
        self.syn_steps, self.expert_epochs, self.max_start = syn_steps, expert_epochs, max_start_epoch
        self.seed, self.strategy, self.memory, self.batch_syn = seed, strategy, memory, batch_syn
        self.kernels = Kernels(model, compile)
        self.cuda_graphs = cuda_graphs
        self.graphs: Graphs | None = None  # made by to(a CUDA device)

    def segment(self, step: int, net: int) -> tuple[Params, Params]:
        """(θ*_t, θ*_{t+M}) of the (expert, t) drawn for ``net`` at meta-step ``step``."""
        g = generator(self.seed, TRAJECTORY, step, net)
        e = int(torch.randint(len(self.experts), (1,), generator=g))
        t = int(torch.randint(self.max_start, (1,), generator=g))
        expert = self.experts[e]
        return expert.at(t), expert.at(t + self.expert_epochs)

    def __call__(self, images: torch.Tensor, raw_lrs: torch.Tensor, step: int, nets: list[int],
                 labels: torch.Tensor | None = None) -> MetaGrad:
        """Σ over ``nets`` of ∂L/∂(x̃, ρ) — and ∂/∂z̃ when ``labels`` are learned label logits z̃
        (N, classes); None: the fixed hard labels."""
        starts, targets = zip(*(self.segment(step, k) for k in nets))
        theta0 = {n: v.to(images.device) for n, v in stack_params(list(starts)).items()}
        target = {n: v.to(images.device) for n, v in stack_params(list(targets)).items()}
        scale = torch.stack([((theta0[n] - target[n]) ** 2).flatten(1).sum(1) for n in theta0]).sum(0)  # (K,)
        y = (self.labels if labels is None else labels).to(images.device)
        raw = raw_lrs.repeat(self.syn_steps)
        replayed = self.replay(step, theta0, target, scale, images, y, raw)
        if replayed is not None:
            g_img, g_raw, g_lab, loss = replayed
            return MetaGrad(g_img, g_raw.sum().reshape(1), float(loss), len(nets), g_lab)
        distance = distance_to(target, scale)

        def outer(theta: Params) -> tuple[Params, float]:
            grads, loss = distance(theta)
            return grads, float(loss)

        g = unroll_vjp(self.model, theta0, images, y, raw, outer, self.memory, self.transform(step), self.kernels,
                       self.rows(step, images.device))
        return MetaGrad(g.images, g.raw_lrs.sum().reshape(1), g.loss, len(nets), g.labels)

    def replay(self, step: int, theta0: Params, target: Params, scale: torch.Tensor, images: torch.Tensor,
               labels: torch.Tensor, raw: torch.Tensor) -> tuple | None:
        """(∂/∂x̃, ∂/∂ρ per step, ∂/∂z̃ or None, Σ L) from this shape's CUDA graph, or None (no graphs, or
        this shape refused: the caller runs eagerly)."""
        if self.graphs is None:
            return None
        inputs: dict = {"theta0": theta0, "target": target, "scale": scale, "images": images, "labels": labels,
                        "raw_lrs": raw}
        batches = self.batches(step)
        if batches is not None:
            inputs["rows"] = [b.to(images.device) for b in batches]
        if self.strategy is not None:  # every step's draw in one block each: one copy per field, not per step
            sizes = [len(labels)] * self.syn_steps if batches is None else [len(b) for b in batches]
            inputs["augs"] = stack_aug([self.draw(step, n, size) for n, size in enumerate(sizes)], sizes,
                                       self.strategy, images)
        return self.graphs(inputs, f"K={len(scale)}, images {tuple(images.shape)}", self.memory, self.strategy)

    def static(self, inputs: dict, memory: str, strategy: str | None) -> tuple:
        """What a graph captures (:func:`static_mtt`)."""
        return static_mtt(self.model, inputs["theta0"], inputs["target"], inputs["scale"], inputs["images"],
                          inputs["labels"], inputs["raw_lrs"], memory, strategy, inputs.get("augs"),
                          inputs.get("rows"))

    def batches(self, step: int) -> list[torch.Tensor] | None:
        """B_0 … B_{syn_steps−1} of meta-step ``step``, sorted indices into the N images; None when every
        step trains on all of them.

        As MTT does: a seeded permutation of the N images is cut into batches of ``batch_syn`` (the
        last one smaller when ``batch_syn`` does not divide N), taken in turn, and a fresh permutation
        follows when they run out — each image once per pass over the set.
        """
        if self.batch_syn is None:
            return None
        out: list[torch.Tensor] = []
        sweep = 0
        while len(out) < self.syn_steps:
            perm = torch.randperm(len(self.labels), generator=generator(self.seed, SYN_BATCH, step, sweep))
            out += [b.sort().values for b in perm.split(self.batch_syn)]
            sweep += 1
        return out[:self.syn_steps]

    def rows(self, step: int, device: torch.device) -> Rows | None:
        """Student step n → B_n on ``device`` (for :func:`~ddray.core.unroll.unroll_vjp`), or None."""
        batches = self.batches(step)
        if batches is None:
            return None
        on_device = [b.to(device) for b in batches]
        return lambda n: on_device[n]

    def transform(self, step: int) -> Transform | None:
        """DSA on student step n's batch, the same draw whenever step n is (re)computed."""
        strategy = self.strategy
        if strategy is None:
            return None

        def aug(n: int, x: torch.Tensor) -> torch.Tensor:
            return apply_aug(x, self.draw(step, n, len(x)))

        return aug

    def draw(self, step: int, n: int, images: int) -> AugParams:
        """The augmentation of student step ``n`` of meta-step ``step``, per image (DSA on)."""
        return sample_aug(cast(str, self.strategy), images, generator(self.seed, AUGMENT, step, n))

    def to(self, device: torch.device) -> "TrajectoryMatching":
        """The experts stay on the CPU and each call moves its two snapshots per student; the kernels
        are rebuilt for ``device``; there, with ``cuda_graphs`` on a CUDA device, meta-steps replay from graphs."""
        self.kernels = Kernels(self.model, self.kernels.compiled, device)
        self.graphs = Graphs(self.static, "MTT's meta-step") if self.cuda_graphs and device.type == "cuda" else None
        return self


def distance_to(target: Params, scale: torch.Tensor) -> Callable[[Params], tuple[Params, torch.Tensor]]:
    """MTT's outer loss: θ̂ (K, ...) → (∂L/∂θ̂ per student, Σₖ Lₖ as a tensor), L = ‖θ̂ − θ*‖² / scale."""

    def distance(theta: Params) -> tuple[Params, torch.Tensor]:
        diff = {n: theta[n].detach() - target[n] for n in theta}
        loss = torch.stack([(d ** 2).flatten(1).sum(1) for d in diff.values()]).sum(0) / scale
        grads = {n: 2 * d / scale.view(-1, *[1] * (d.dim() - 1)) for n, d in diff.items()}
        return grads, loss.sum()

    return distance


def static_mtt(model: nn.Module, theta0: Params, target: Params, scale: torch.Tensor, images: torch.Tensor,
               labels: torch.Tensor, raw_lrs: torch.Tensor, memory: str, strategy: str | None,
               augs: AugParams | None = None,
               rows: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                torch.Tensor]:
    """:class:`TrajectoryMatching`'s meta-gradient with eager kernels, as (∂/∂x̃, ∂/∂ρ per student step,
    ∂/∂z̃ or None, Σ L): every result a tensor, nothing read back to the host, for a CUDA graph to capture.

    ``augs``: the student steps' draws per image, one block per step in order
    (:func:`ddray.core.augment.stack_aug`), applied by :func:`ddray.core.augment.apply_aug_select`;
    ``rows[n]``: B_n on the device. The same values and gradients as the eager form.
    """
    transform: Transform | None = None
    if strategy is not None:
        sizes = [len(labels)] * len(raw_lrs) if rows is None else [len(r) for r in rows]  # each step's images
        fields = {name: v.split(sizes) for name, v in cast(AugParams, augs).items()}
        steps = [{name: parts[n] for name, parts in fields.items()} for n in range(len(sizes))]

        def transform(n: int, x: torch.Tensor) -> torch.Tensor:
            return apply_aug_select(x, steps[n], strategy)

    outer = cast(Outer, distance_to(target, scale))  # Σ L stays a tensor
    g = unroll_vjp(model, theta0, images, labels, raw_lrs, outer, memory, transform, Kernels(model),
                   None if rows is None else rows.__getitem__)
    return g.images, g.raw_lrs, g.labels, g.loss  # type: ignore[return-value]  # the loss is a tensor here
