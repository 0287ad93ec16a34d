"""The distillation methods ddray runs (``--method``), their paper defaults and the options each owns.

==========  ==========================================================================  ===================
method      what is learned / matched                                                   outer optimiser
==========  ==========================================================================  ===================
``dd``      images + step sizes; loss of nets trained on them (Wang et al. 2018)        Adam 0.01 (0.5, 0.999)
``dc``      images; per-class gradients on real vs synthetic (Zhao et al., ICLR 2021)   SGD 0.1, momentum 0.5
``dsa``     DC with differentiable siamese augmentation (Zhao & Bilen, ICML 2021)       SGD 0.1, momentum 0.5
``dm``      images; class-mean embeddings of random nets (Zhao & Bilen, WACV 2023)      SGD 1.0, momentum 0.5
``mtt``     images + one step size; expert trajectories (Cazenavette et al., CVPR 2022)  SGD 1000 / lr 1e-5, m 0.5
==========  ==========================================================================  ===================

Every method shares ``--ipc``, ``--iterations``, ``--nets`` (networks per meta-step),
``--lr`` (default: the method's), ``--lr-decay*``, ``--syn-init`` (default: noise for
DD, real images for the others) and the whole cluster/run configuration. The other
options belong to some methods only (:data:`OWNERS`); setting one to a non-default
value under a method that does not use it is an error naming both options.
DD and MTT can learn soft labels beside the images (``--labels learned``, ``--lr-labels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

METHOD_NAMES = ("dd", "dc", "dsa", "dm", "mtt")


@dataclass(frozen=True)
class Method:
    """A method's defaults (its paper's)."""

    name: str
    paper: str
    optimizer: str  # outer optimiser: "adam" (betas 0.5, 0.999) or "sgd"
    lr: float  # outer learning rate on the images
    momentum: float  # SGD momentum (unused by Adam)
    dsa: bool  # DSA augmentation by default
    syn_init: str  # "noise" or "real"
    learns_lrs: bool  # whether step sizes are learned
    steps_and_epochs: bool = False  # learns S batches trained for E epochs (--steps, --epochs); else 1 batch, 1 step
    step_size_option: str = "net_lr"  # the option the step size starts at: DD's --init-lr, the others' --net-lr
    eval_protocol: str = "dc"  # the evaluation by default: "dd" (the set's own schedule) or "dc" (the DC papers')
    needs_experts: bool = False  # matches expert trajectories (--experts, made by `ddray experts`)
    lr_labels: float | None = None  # learning rate of learned labels (--labels learned); None: cannot learn them

    @property
    def one_learned_step_size(self) -> bool:
        """Learns one step size for its one batch (MTT): the DC protocol then trains its set with it."""
        return self.learns_lrs and not self.steps_and_epochs


METHODS: dict[str, Method] = {
    "dd": Method("dd", "Wang et al., Dataset Distillation, arXiv:1811.10959", "adam", 0.01, 0.0, False,
                 "noise", True, steps_and_epochs=True, step_size_option="init_lr", eval_protocol="dd",
                 lr_labels=0.01),
    "dc": Method("dc", "Zhao, Mopuri, Bilen, Dataset Condensation with Gradient Matching, ICLR 2021",
                 "sgd", 0.1, 0.5, False, "real", False),
    "dsa": Method("dsa", "Zhao & Bilen, Dataset Condensation with Differentiable Siamese Augmentation, "
                  "ICML 2021", "sgd", 0.1, 0.5, True, "real", False),
    "dm": Method("dm", "Zhao & Bilen, Dataset Condensation with Distribution Matching, WACV 2023",
                 "sgd", 1.0, 0.5, True, "real", False),
    "mtt": Method("mtt", "Cazenavette et al., Dataset Distillation by Matching Training Trajectories, "
                  "CVPR 2022", "sgd", 1000.0, 0.5, True, "real", True, needs_experts=True, lr_labels=2.0),
}

# option → the methods that use it (options not listed are shared by all)
OWNERS: dict[str, tuple[str, ...]] = {
    "steps": ("dd",), "epochs": ("dd",), "init_lr": ("dd",), "batch_size": ("dd",), "attack": ("dd",),
    "pretrained": ("dd",), "init": ("dd",),
    "memory": ("dd", "mtt"),
    "dsa": ("dc", "dsa", "dm", "mtt"), "dsa_strategy": ("dc", "dsa", "dm", "mtt"),
    "real_per_class": ("dc", "dsa", "dm"),
    "outer_loop": ("dc", "dsa"), "inner_loop": ("dc", "dsa"),
    "net_lr": ("dc", "dsa", "mtt"),
    "experts": ("mtt",), "syn_steps": ("mtt",), "expert_epochs": ("mtt",), "max_start_epoch": ("mtt",),
    "lr_lr": ("mtt",), "batch_syn": ("mtt",),
    "labels": ("dd", "mtt"), "lr_labels": ("dd", "mtt"),
}

# DC's outer/inner loop counts by images per class (the paper's code); other ipc take the nearest
DC_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
                                        50: (50, 10)}


def dc_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) of DC for ``ipc`` images per class."""
    nearest = min(DC_LOOPS, key=lambda k: (abs(k - ipc), k))
    return DC_LOOPS[nearest]


def _flag(option: str, value: Any) -> str:
    name = "--" + option.replace("_", "-")
    if isinstance(value, bool):
        return name if value else "--no-" + name[2:]
    return f"{name} {value}"


def check_method_options(distill: Any) -> None:
    """ValueError for an option the chosen method does not use (non-default) or a missing one.

    ``distill``: a :class:`ddray.config.DistillConfig` (its dataclass defaults tell
    what "not set" means).
    """
    from dataclasses import fields

    m = distill.method
    defaults = {f.name: f.default for f in fields(distill)}
    for option, users in OWNERS.items():
        value = getattr(distill, option)
        if m not in users and value != defaults[option]:
            raise ValueError(f"{_flag(option, value)}: not available with --method {m} "
                             f"(an option of --method {', '.join(users)})")
    if m == "dsa" and distill.dsa is False:
        raise ValueError("--no-dsa: not available with --method dsa (DSA is DC with augmentation; "
                         "use --method dc)")
    if METHODS[m].needs_experts and not distill.experts:
        raise ValueError(f"--method {m} needs --experts DIR (expert trajectories made by `ddray experts`)")


def optimizer_options(distill: Any) -> dict[str, Any]:
    """Keyword arguments of :class:`ddray.core.synthetic.OuterOptimizer` beyond lr/decay for a config's method.

    MTT learns its step size η directly with learning rate ``lr_lr``; ddray learns ρ with
    η = softplus(ρ), so dη/dρ = σ(ρ) = 1 − e^(−η). ρ gets ``lr_lr`` / (1 − e^(−η₀))², η₀ =
    ``net_lr``: then the step size's first updates are the paper's. Learned labels get
    ``lr_labels`` (the method's default: DD 0.01 with Adam, as its images; MTT 2.0 with SGD, DATM's).
    """
    spec = METHODS[distill.method]
    lr_lrs = None
    if distill.method in OWNERS["lr_lr"]:  # the step size has a learning rate of its own
        lr_lrs = distill.lr_lr / (1 - math.exp(-distill.net_lr)) ** 2
    return {"kind": spec.optimizer, "momentum": spec.momentum, "lr_lrs": lr_lrs, "lr_labels": distill.labels_lr}
