"""Initialisation modes p(θ₀) and the seed streams that make runs reproducible.

Every random draw of a run is derived from (run seed, purpose, meta-step, net
index) — never from a global RNG — so a meta-step's result does not depend on
how its K networks are split over workers, and a resumed run continues exactly.
Evaluation draws come from a separate purpose stream, so held-out networks are
never the ones used during distillation.

Modes:

* ``fixed``: one θ₀ (drawn from the run seed), saved with the run;
* ``random``: a fresh θ₀ from the init scheme for every network of every meta-step;
* ``fixed-pretrained``: the first network of a pretrained pool (``ddray pretrain``);
* ``random-pretrained``: a network drawn from the pool's distillation part every time;
  evaluation uses the pool's held-out part.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from ddray.core.models import Params, init_params, stack_params

DISTILL, EVAL, REAL_BATCH, SYN_INIT, FIXED_INIT, BASELINE, PRETRAIN = range(7)
EXPERT, AUGMENT, NET_TRAIN, TRAJECTORY = range(7, 11)  # MTT experts, DSA draws, DC's net updates, MTT starts
SYN_BATCH = 11  # MTT's batch_syn: which synthetic images each student step trains on


def derive_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def generator(*key: int) -> torch.Generator:
    """A CPU torch generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(*key))


class InitSampler(Protocol):
    """Draws θ₀ for a list of (purpose, meta-step, net index) keys."""

    def sample(self, keys: list[tuple[int, ...]]) -> Params: ...


class DeviceSampler:
    """Moves the θ₀ drawn by a CPU sampler (seeded CPU generators) to a device."""

    def __init__(self, inner: InitSampler, device: torch.device) -> None:
        self.inner, self.device = inner, device

    def sample(self, keys: list[tuple[int, ...]]) -> Params:
        return {k: v.to(self.device) for k, v in self.inner.sample(keys).items()}


class RandomInit:
    """A fresh θ₀ per key from ``scheme``."""

    def __init__(self, model: nn.Module, scheme: str, seed: int) -> None:
        self.model, self.scheme, self.seed = model, scheme, seed

    def sample(self, keys: list[tuple[int, ...]]) -> Params:
        return stack_params([init_params(self.model, self.scheme, generator(self.seed, *k)) for k in keys])


class FixedInit:
    """The same θ₀ for every key."""

    def __init__(self, params: Params) -> None:
        self.params = {k: v.detach().clone() for k, v in params.items()}

    def sample(self, keys: list[tuple[int, ...]]) -> Params:
        return {k: v.unsqueeze(0).expand(len(keys), *v.shape).clone() for k, v in self.params.items()}


class PoolInit:
    """θ₀ drawn uniformly from a pool of (pretrained) networks per key."""

    def __init__(self, pool: list[Params], seed: int) -> None:
        if not pool:
            raise ValueError("--pretrained: the pool of pretrained networks is empty")
        self.pool, self.seed = pool, seed

    def sample(self, keys: list[tuple[int, ...]]) -> Params:
        picks = [int(torch.randint(len(self.pool), (1,), generator=generator(self.seed, *k))) for k in keys]
        return stack_params([self.pool[i] for i in picks])


def split_pool(pool: list[Params]) -> tuple[list[Params], list[Params]]:
    """Pretrained pool → (distillation part, held-out evaluation part); ~20 % held out."""
    if len(pool) < 2:
        return pool, pool
    n_eval = max(1, len(pool) // 5)
    return pool[:-n_eval], pool[-n_eval:]


def fixed_params(model: nn.Module, scheme: str, seed: int) -> Params:
    """The single θ₀ of ``fixed`` mode for a run seed."""
    return init_params(model, scheme, generator(seed, FIXED_INIT))


def make_sampler(mode: str, model: nn.Module, scheme: str, seed: int,
                 fixed: Params | None = None, pool: list[Params] | None = None,
                 for_eval: bool = False) -> InitSampler:
    """The sampler for an init mode; ``for_eval`` picks the held-out part of a pool."""
    if mode == "random":
        return RandomInit(model, scheme, seed)
    if mode in ("fixed", "fixed-pretrained"):
        if fixed is None:
            raise ValueError(f"--init {mode}: no fixed θ₀ given")
        return FixedInit(fixed)
    if mode == "random-pretrained":
        if pool is None:
            raise ValueError("--init random-pretrained: needs --pretrained DIR")
        train, held_out = split_pool(pool)
        return PoolInit(held_out if for_eval else train, seed)
    raise ValueError(f"--init: unknown mode {mode!r}")
