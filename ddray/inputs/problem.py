"""Everything a run derives from its config: data, model, θ₀ samplers, the objective — and the artifact
its synthetic set becomes (:func:`to_distilled`).

Built the same way in the driver, in every Ray worker (each loads its own copy of
the data) and in evaluation, so all of them agree on what a seed means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ddray._version import __version__
from ddray.config import Config, parse_attack
from ddray.core.dd_objective import DDObjective
from ddray.core.images import ImageSource, subset
from ddray.core.inits import SYN_INIT, InitSampler, fixed_params, generator, make_sampler
from ddray.core.matching import ClassBatches, DistributionMatching, GradientMatching
from ddray.core.models import Params, build_model
from ddray.core.objective import Objective
from ddray.core.synthetic import OuterOptimizer, SyntheticSet, class_labels, label_logits
from ddray.core.trajectory import TrajectoryMatching
from ddray.data import Dataset
from ddray.inputs.experts import Trajectory, load_experts
from ddray.inputs.sources import load_data
from ddray.methods import optimizer_options
from ddray.store.artifact import Distilled

POOL_META = "pool.json"


@dataclass
class Problem:
    """A run's data set, template model and θ₀ sources."""

    config: Config
    data: Dataset
    model: nn.Module
    fixed: Params | None
    pool: list[Params] | None
    experts: list[Trajectory] | None = None  # --method mtt

    @property
    def attack(self) -> tuple[int, int] | None:
        return parse_attack(self.config.distill.attack)

    def sampler(self, for_eval: bool = False) -> InitSampler:
        """θ₀ source for distillation, or (``for_eval``) for held-out evaluation."""
        c = self.config
        return make_sampler(c.distill.init, self.model, c.model.init_scheme, c.run.seed, self.fixed,
                            self.pool, for_eval)

    def objective(self) -> Objective:
        """The meta-gradient of the config's method (:data:`OBJECTIVES`)."""
        return OBJECTIVES[self.config.distill.method](self)

    def initial_synthetic(self) -> SyntheticSet:
        """x̃ from noise or real images (the method's default), ρ at ``init_lr`` (DD) or ``net_lr``; learned
        labels (``--labels learned``) as :meth:`initial_labels` makes them."""
        d, c = self.config.distill, self.config
        real: tuple[ImageSource, torch.Tensor] | None = ((self.data.x_train, self.data.y_train)
                                                          if d.init_images == "real" else None)
        teacher = self.teacher() if d.labels == "learned" and self.experts else None
        if teacher is not None and real is not None:  # DATM: only images the expert gets right
            real = correctly_classified(self.model, teacher, *real)
        steps, epochs = d.layout
        syn = SyntheticSet.initial(steps, epochs, d.ipc, self.data.num_classes, self.data.shape,
                                   d.initial_lr, generator(c.run.seed, SYN_INIT), real)
        if d.labels == "learned":
            syn.labels = (label_logits(syn.labels, self.data.num_classes) if teacher is None
                          else expert_logits(self.model, teacher, syn.images[0]))
        return syn

    def teacher(self) -> Params:
        """MTT with learned labels: the expert whose predictions start the labels (DATM) — expert 0 at epoch
        ``max_start_epoch`` (or its last)."""
        assert self.experts, "Problem.teacher: MTT's experts are loaded"
        expert = self.experts[0]
        return expert.at(min(self.config.distill.max_start_epoch, expert.epochs))

    def outer_optimizer(self, syn: SyntheticSet) -> OuterOptimizer:
        """The method's outer optimiser on ``syn`` (:func:`ddray.methods.optimizer_options`)."""
        d = self.config.distill
        return OuterOptimizer(syn, d.outer_lr, d.lr_decay, d.lr_decay_every, **optimizer_options(d))


@torch.no_grad()
def expert_logits(model: nn.Module, params: Params, x: ImageSource, chunk: int = 1024) -> torch.Tensor:
    """A network's logits (N, classes) on images x (N, C, H, W)."""
    from torch.func import functional_call

    return torch.cat([functional_call(model, params, (x[i:i + chunk],)) for i in range(0, len(x), chunk)])


def correctly_classified(model: nn.Module, params: Params, x: ImageSource,
                         y: torch.Tensor) -> tuple[ImageSource, torch.Tensor]:
    """The images of (x, y) that the network classifies correctly (a class with none keeps all of its own)."""
    right = expert_logits(model, params, x).argmax(1) == y
    for c in y.unique():  # never leave a class without images
        if not right[y == c].any():
            right[y == c] = True
    keep = torch.nonzero(right).flatten()
    return subset(x, keep), y[keep]


def _syn_labels(problem: Problem) -> torch.Tensor:
    return class_labels(problem.data.num_classes, problem.config.distill.ipc)


def _dd(problem: Problem) -> Objective:
    c = problem.config
    return DDObjective(problem.model, problem.sampler(), problem.data.x_train, problem.data.y_train,
                       _syn_labels(problem), c.distill.batch_size, c.run.seed, problem.attack, c.distill.memory,
                       c.run.compile, c.run.cuda_graphs)


def _class_batches(problem: Problem) -> ClassBatches:
    c, data = problem.config, problem.data
    return ClassBatches(data.x_train, data.y_train, data.num_classes, c.distill.real_per_class, c.run.seed)


def _dc(problem: Problem) -> Objective:
    d, seed = problem.config.distill, problem.config.run.seed
    return GradientMatching(problem.model, problem.sampler(), _class_batches(problem), d.ipc, seed, d.augment,
                            d.loops, d.net_lr, cuda_graphs=problem.config.run.cuda_graphs)


def _dm(problem: Problem) -> Objective:
    d, seed = problem.config.distill, problem.config.run.seed
    return DistributionMatching(problem.model, problem.sampler(), _class_batches(problem), d.ipc, seed,
                                d.augment, problem.config.run.cuda_graphs)


def _mtt(problem: Problem) -> Objective:
    d, seed = problem.config.distill, problem.config.run.seed
    assert problem.experts is not None  # loaded by build_problem for --method mtt
    return TrajectoryMatching(problem.model, problem.experts, _syn_labels(problem), d.syn_steps, d.expert_epochs,
                              d.max_start_epoch, seed, d.augment, d.memory, problem.config.run.compile,
                              d.batch_syn, problem.config.run.cuda_graphs)


OBJECTIVES: dict[str, Callable[[Problem], Objective]] = {
    "dd": _dd, "dc": _dc, "dsa": _dc, "dm": _dm, "mtt": _mtt}


def load_pool(path: str | Path) -> tuple[list[Params], dict[str, object]]:
    """A pretrained pool written by ``ddray pretrain``: (networks, pool.json)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / POOL_META).is_file():
        raise ValueError(f"--pretrained: {p} is not a pretrained pool (no {POOL_META}); make one with `ddray pretrain`")
    meta = json.loads((p / POOL_META).read_text())
    nets = [load_file(str(p / f)) for f in meta["files"]]
    if not nets:
        raise ValueError(f"--pretrained: {p} holds no networks")
    return nets, meta


def build_problem(config: Config, data: Dataset | None = None) -> Problem:
    """Load data and model for ``config`` and prepare the θ₀ sources of its init mode.

    Raises ValueError when a pretrained pool does not fit the target (model, image
    shape, classes) or an attack names a class the data set does not have.
    """
    c = config
    data = data or load_data(c.data, c.run.storage)
    model = build_model(c.model.model, data.shape, data.num_classes, c.model.width)
    attack = parse_attack(c.distill.attack)
    if attack and max(attack) >= data.num_classes:
        raise ValueError(f"--attack: {c.distill.attack} names a class outside 0..{data.num_classes - 1}")
    images = c.distill.ipc * data.num_classes
    if c.distill.batch_syn is not None and c.distill.batch_syn > images:
        raise ValueError(f"--batch-syn: invalid value {c.distill.batch_syn}; at most the set's {images} images "
                         f"(--ipc {c.distill.ipc} × {data.num_classes} classes)")
    fixed, pool = None, None
    if c.distill.init == "fixed":
        fixed = fixed_params(model, c.model.init_scheme, c.run.seed)
    elif c.distill.init.endswith("pretrained"):
        assert c.distill.pretrained is not None  # checked by DistillConfig
        pool, meta = load_pool(c.distill.pretrained)
        want = {"model": c.model.model, "shape": list(data.shape), "classes": data.num_classes}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise ValueError(f"--pretrained: pool {c.distill.pretrained} was trained for {got}, "
                             f"but this run needs {want} (use --image-size to match shapes)")
        if c.distill.init == "fixed-pretrained":
            fixed = pool[0]
    experts = None
    if c.distill.spec.needs_experts:
        assert c.distill.experts is not None  # checked by DistillConfig
        experts, _ = load_experts(c.distill.experts, c.model.model, data.shape, data.num_classes, c.data.dataset,
                                  c.model.width, None if data.zca is None else data.zca.eps)
    return Problem(c, data, model, fixed, pool, experts)


def to_distilled(problem: Problem, syn: SyntheticSet, iterations: int) -> Distilled:
    """The synthetic set after ``iterations`` meta-steps as an artifact: with everything needed to train on it
    without ddray (the data set's normalisation, the method, the whole config; θ₀ for fixed-init modes)."""
    c = problem.config
    meta: dict[str, Any] = {
        "dataset": c.data.dataset, "model": c.model.model, "classes": problem.data.num_classes,
        "class_names": list(class_names(problem.data)),
        "zca": None if problem.data.zca is None else {"eps": problem.data.zca.eps},
        "mean": list(problem.data.mean), "std": list(problem.data.std),
        "init": {"mode": c.distill.init, "scheme": c.model.init_scheme},
        "iterations": iterations, "method": c.distill.method, "attack": c.distill.attack,
        "dsa_strategy": c.distill.augment, "eval_protocol": c.protocol,
        "seed": c.run.seed, "ddray_version": __version__, "config": c.to_dict(),
    }
    hard = class_labels(problem.data.num_classes, c.distill.ipc)
    return Distilled(syn.images.detach().clone(), hard, syn.lrs.detach().clone(), meta, problem.fixed,
                     problem.data.zca, syn.labels.detach().clone() if syn.learns_labels else None)


def class_names(data: Dataset) -> tuple[str, ...]:
    """The names of ``data``'s classes in label order: its own (the user's folders), the registry's, or indices."""
    from ddray.data import class_names as registered

    return data.classes or tuple(registered(data.name, data.num_classes))
