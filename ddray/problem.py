"""Everything a run derives from its config: data, model, θ₀ samplers, the objective.

Built the same way in the driver, in every Ray worker (each loads its own copy of
the data) and in evaluation, so all of them agree on what a seed means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ddray.config import Config, parse_attack
from ddray.core.inits import SYN_INIT, InitSampler, fixed_params, generator, make_sampler
from ddray.core.models import Params, build_model
from ddray.core.objective import DDObjective
from ddray.core.synthetic import SyntheticSet
from ddray.data import Dataset, load_dataset

POOL_META = "pool.json"


@dataclass
class Problem:
    """A run's data set, template model and θ₀ sources."""

    config: Config
    data: Dataset
    model: nn.Module
    fixed: Params | None
    pool: list[Params] | None

    @property
    def attack(self) -> tuple[int, int] | None:
        return parse_attack(self.config.distill.attack)

    def sampler(self, for_eval: bool = False) -> InitSampler:
        """θ₀ source for distillation, or (``for_eval``) for held-out evaluation."""
        c = self.config
        return make_sampler(c.distill.init, self.model, c.model.init_scheme, c.run.seed, self.fixed,
                            self.pool, for_eval)

    def objective(self) -> DDObjective:
        c = self.config
        syn_labels = torch.arange(self.data.num_classes).repeat_interleave(c.distill.ipc)
        return DDObjective(self.model, self.sampler(), self.data.x_train, self.data.y_train, syn_labels,
                           c.distill.batch_size, c.run.seed, self.attack, c.distill.memory)

    def initial_synthetic(self) -> SyntheticSet:
        d, c = self.config.distill, self.config
        real = (self.data.x_train, self.data.y_train) if d.syn_init == "real" else None
        return SyntheticSet.initial(d.steps, d.epochs, d.ipc, self.data.num_classes, self.data.shape,
                                    d.init_lr, generator(c.run.seed, SYN_INIT), real)


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
    data = data or load_dataset(c.data.dataset, c.data.data_root, c.data.download, c.data.image_size)
    model = build_model(c.model.model, data.shape, data.num_classes)
    attack = parse_attack(c.distill.attack)
    if attack and max(attack) >= data.num_classes:
        raise ValueError(f"--attack: {c.distill.attack} names a class outside 0..{data.num_classes - 1}")
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
    return Problem(c, data, model, fixed, pool)
