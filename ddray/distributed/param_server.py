"""The parameter server: x̃, ρ, the outer Adam state and the step counter of a run.

:class:`ParamServer` is plain Python (unit-tested without Ray); :class:`ParamServerActor`
at the bottom is the Ray shell that publishes every version once to the object
store, checkpoints, and reloads the last checkpoint when Ray restarts it.

Sharding: with J shards, shard j owns a contiguous block of classes, i.e. the
image columns ``images[:, lo:hi]`` of x̃ (S, N, C, H, W) — ỹ is class-major — and the
matching Adam moments; shard 0 also owns the raw step sizes ρ (T,). Adam is
elementwise, so J shards update exactly what one server would.

Payloads travelling through the object store are plain dicts of numpy arrays:

* a *version* ``{"step": s, "images": (S, hi-lo, C, H, W), "raw_lrs": (T,) | None}``;
* a *gradient* ``{"images": …, "raw_lrs": … | None, "loss": Σ loss, "nets": k, "version": s}``
  — sums over the k networks of a share (divide by the total K to average).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from ddray.core.synthetic import OuterOptimizer, SyntheticSet
from ddray.distributed.shards import Payload, Shard

def _moments(opt_state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return opt_state["opt"]["state"]  # type: ignore[no-any-return]


def slice_state(full: dict[str, Any], shard: Shard) -> dict[str, Any]:
    """A checkpoint-format state (images, raw_lrs, optimizer, step) → the part ``shard`` owns."""
    images = full["images"]
    opt = {"opt": {"state": {}, "param_groups": full["optimizer"]["opt"]["param_groups"]},
           "sched": full["optimizer"]["sched"]}
    for pid, st in _moments(full["optimizer"]).items():
        if pid == 0:
            opt["opt"]["state"][0] = {k: (v[:, shard.lo:shard.hi].clone()
                                          if torch.is_tensor(v) and v.dim() == images.dim() else v)
                                      for k, v in st.items()}
        elif shard.owns_lrs:
            opt["opt"]["state"][pid] = st
    return {"images": images[:, shard.lo:shard.hi].clone(),
            "raw_lrs": full["raw_lrs"].clone() if shard.owns_lrs else None,
            "optimizer": opt, "step": int(full.get("step", 0))}


def merge_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`slice_state`: shard states in shard order → one checkpoint-format state."""
    first = parts[0]
    opt = {"opt": {"state": {}, "param_groups": first["optimizer"]["opt"]["param_groups"]},
           "sched": first["optimizer"]["sched"]}
    state0 = [_moments(p["optimizer"]).get(0, {}) for p in parts]
    if state0[0]:
        opt["opt"]["state"][0] = {k: (torch.cat([s[k] for s in state0], dim=1)
                                      if torch.is_tensor(v) and v.dim() == first["images"].dim() else v)
                                  for k, v in state0[0].items()}
    for pid, st in _moments(first["optimizer"]).items():
        if pid != 0:
            opt["opt"]["state"][pid] = st
    return {"images": torch.cat([p["images"] for p in parts], dim=1), "raw_lrs": first["raw_lrs"],
            "optimizer": opt, "step": first["step"]}


class ParamServer:
    """Owns one shard of (x̃, ρ), its outer-optimizer state and the step counter.

    Args:
        state: this shard's part of a checkpoint-format state (see :func:`slice_state`).
        shard: which block of classes it owns.
        lr, lr_decay, lr_decay_every, epochs, kind, momentum, lr_lrs: the outer optimiser
            (DistillConfig and :func:`ddray.methods.optimizer_options`).
        nets: K, networks averaged per update.
        iterations: total meta-steps of the run; no update is applied beyond it.
        max_staleness: async mode — gradients computed on a version more than this
            many updates old are dropped (and counted).
    """

    def __init__(self, state: dict[str, Any], shard: Shard, lr: float, lr_decay: float, lr_decay_every: int,
                 epochs: int, nets: int, iterations: int, max_staleness: int = 0, kind: str = "adam",
                 momentum: float = 0.0, lr_lrs: float | None = None) -> None:
        self.shard, self.nets, self.iterations, self.max_staleness = shard, nets, iterations, max_staleness
        raw = state["raw_lrs"] if shard.owns_lrs else torch.zeros(0)
        self.syn = SyntheticSet(state["images"].clone(), torch.empty(0, dtype=torch.long), raw.clone(), epochs)
        self.opt = OuterOptimizer(self.syn, lr, lr_decay, lr_decay_every, kind=kind, momentum=momentum,
                                  lr_lrs=lr_lrs)
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.dropped = 0
        self._pending: list[Payload] = []
        self._stats: list[dict[str, float]] = []

    # -- publishing and checkpoint state ---------------------------------------------------

    def version(self) -> Payload:
        """The current (x̃ slice, ρ) as numpy arrays (ray.put copies them into the object store)."""
        return {"step": self.step, "images": self.syn.images.numpy(),
                "raw_lrs": self.syn.raw_lrs.numpy() if self.shard.owns_lrs else None}

    def state(self) -> dict[str, Any]:
        """This shard's checkpoint-format state (tensors are copies)."""
        return {"images": self.syn.images.clone(),
                "raw_lrs": self.syn.raw_lrs.clone() if self.shard.owns_lrs else None,
                "optimizer": self.opt.state_dict(), "step": self.step}

    # -- sync: one update from the gradients of all shares of a meta-step ------------------

    def apply(self, grads: list[Payload]) -> dict[str, float]:
        """Σ the shares' gradients (in share order), divide by Σ nets, one Adam step; returns stats."""
        if self.step >= self.iterations:
            raise RuntimeError(f"ParamServer.apply: the run already has its {self.iterations} meta-steps")
        t0 = time.perf_counter()
        img = np.array(grads[0]["images"], dtype=np.float32, copy=True)
        for g in grads[1:]:
            np.add(img, g["images"], out=img)
        raw = None
        if self.shard.owns_lrs:
            raw = np.array(grads[0]["raw_lrs"], dtype=np.float32, copy=True)
            for g in grads[1:]:
                np.add(raw, g["raw_lrs"], out=raw)
        nets = sum(int(g["nets"]) for g in grads)
        t1 = time.perf_counter()
        stats = self._update(img, raw, nets, sum(float(g["loss"]) for g in grads))
        stats.update(t_average=t1 - t0, t_adam=time.perf_counter() - t1)
        return stats

    def _update(self, img: np.ndarray, raw: np.ndarray | None, nets: int, loss: float) -> dict[str, float]:
        g_raw = torch.from_numpy(raw) / nets if raw is not None else torch.zeros(0)
        self.opt.apply(torch.from_numpy(img) / nets, g_raw)
        self.step += 1
        stats = {"step": float(self.step), "outer_loss": loss / nets, "outer_lr": self.opt.lr, "nets": float(nets)}
        if self.shard.owns_lrs:
            lrs = self.syn.lrs
            stats.update(lr_min=float(lrs.min()), lr_mean=float(lrs.mean()), lr_max=float(lrs.max()))
        return stats

    # -- async: accumulate pushed gradients, update once K networks are in -----------------

    @property
    def done(self) -> bool:
        return self.step >= self.iterations

    def push(self, grad: Payload) -> bool:
        """Take one share's gradient; apply an update once ≥ K networks are pending. Returns ``done``.

        A gradient from a version more than ``max_staleness`` updates old (or from a
        version this server does not have, e.g. after a rollback) is dropped.
        """
        if self.done:
            return True
        staleness = self.step - int(grad["version"])
        if not 0 <= staleness <= self.max_staleness:
            self.dropped += 1
            return False
        self._pending.append({**grad, "staleness": staleness})
        if sum(int(g["nets"]) for g in self._pending) >= self.nets:
            pending, self._pending = self._pending, []
            stats = self.apply(pending)
            st = [g["staleness"] for g in pending]
            stats.update(staleness_mean=float(np.mean(st)), staleness_max=float(max(st)),
                         dropped=float(self.dropped))
            if self.shard.owns_lrs:  # the driver reads shard 0's statistics
                self._stats.append(stats)
        return self.done

    def drain(self) -> list[dict[str, float]]:
        """Stats of the async updates applied since the last call."""
        out, self._stats = self._stats, []
        return out


# -- the Ray shell -----------------------------------------------------------------------------

def initial_state(problem: Any) -> dict[str, Any]:
    """The checkpoint-format state of a fresh run (``problem``: :class:`ddray.problem.Problem`)."""
    syn = problem.initial_synthetic()
    opt = problem.outer_optimizer(syn)
    return {"images": syn.images, "raw_lrs": syn.raw_lrs, "optimizer": opt.state_dict(), "step": 0}


def restart_state(storage: str, config: dict[str, Any], start: int) -> dict[str, Any]:
    """What a restarted server continues from: the newest valid checkpoint in ``storage``, or — if
    the run has none yet — its initial state (a function of the config)."""
    from ddray.checkpoint import load_latest

    saved = load_latest(storage)
    if saved is not None:
        return saved
    if start > 0:
        raise RuntimeError(f"parameter server: no checkpoint visible in {storage} from this node; "
                           "use storage all nodes share (a shared path or a URI)")
    from ddray.config import Config
    from ddray.problem import build_problem

    return initial_state(build_problem(Config.from_dict(config)))


def checkpoint_payload(parts: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """All shards' states (shard order) → the checkpoint written, in :func:`ddray.distill.distill`'s format."""
    full = merge_states(parts)
    return {"images": full["images"], "raw_lrs": full["raw_lrs"], "optimizer": full["optimizer"],
            "step": full["step"], "config": config,
            "rng": {"seed": int(config["run"]["seed"]),
                    "rule": "every draw is ddray.core.inits.derive_seed(seed, purpose, step, net)"}}


class ParamServerActor:
    """Ray actor around :class:`ParamServer` (wrapped with ``ray.remote`` in :mod:`.fleet`).

    Publishing: in sync mode each new version is the return value of :meth:`apply`,
    which Ray writes to the object store once and every worker of the next meta-step
    reads (no per-worker copies, and the driver can pass it on before it exists); in
    async mode :meth:`pull` hands out one ``ray.put`` per version. The driver gives the
    server its state with :meth:`load`; after a restart by Ray it takes its part of the
    newest valid checkpoint instead (before the first one: the run's initial state,
    a function of the config).
    """

    def __init__(self, shard: Shard, settings: dict[str, Any], storage: str, config: dict[str, Any],
                 start: int) -> None:
        from ddray.distributed.placement import reconstructed

        self.shard, self.settings, self.storage, self.config, self.start = shard, settings, storage, config, start
        self.ps: ParamServer | None = None
        self.ref: Any = None
        self.published = -1
        if reconstructed():
            self.restore()

    @property
    def server(self) -> ParamServer:
        assert self.ps is not None, "ParamServerActor: load() or restore() first"
        return self.ps

    def load(self, state: dict[str, Any]) -> int:
        """Take this shard's part of a checkpoint-format state → its step."""
        self.ps, self.published = ParamServer(slice_state(state, self.shard), self.shard, **self.settings), -1
        return self.ps.step

    def restore(self) -> tuple[Payload, int]:
        """Roll back to the newest valid checkpoint (or the initial state) → (version, step)."""
        step = self.load(restart_state(self.storage, self.config, self.start))
        return self.server.version(), step

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "step": self.ps.step if self.ps else None, "shard": self.shard.index}

    def latest(self) -> Payload:
        """The current version, by value (the caller passes the ref of this return on)."""
        return self.server.version()

    def apply(self, grad_refs: list[Any]) -> tuple[Payload, dict[str, float]]:
        """Sync update from the shares' gradient ObjectRefs → (the new version, stats)."""
        import ray

        t0 = time.perf_counter()
        ray.wait(grad_refs, num_returns=len(grad_refs), fetch_local=True)  # the shares finish
        t1 = time.perf_counter()
        grads = ray.get(grad_refs)  # receive: zero-copy numpy views of the object store
        t2 = time.perf_counter()
        stats = self.server.apply(grads)
        stats.update(t_wait=t1 - t0, t_receive=t2 - t1)
        return self.server.version(), stats

    def dag_version(self, job: tuple[int, bool]) -> Payload:
        """Compiled-graph transport: the version meta-step ``job[0]`` reads."""
        if job[0] != self.server.step:
            raise RuntimeError(f"parameter server is at meta-step {self.server.step}, asked for {job[0]}")
        return self.server.version()

    def dag_apply(self, job: tuple[int, bool], *grads: Payload) -> dict[str, float]:
        """Compiled-graph transport: the update of meta-step ``job[0]`` (+ a checkpoint if ``job[1]``)."""
        stats = self.server.apply(list(grads))  # received by the graph's channels before this call
        stats.update(t_wait=0.0, t_receive=0.0)
        if job[1]:
            self.checkpoint(job[0] + 1)
        return stats

    def pull(self) -> tuple[Any, bool]:
        """Async: (ObjectRef of the current version, run complete); one ``ray.put`` per version."""
        import ray

        if self.published != self.server.step:
            self.ref, self.published = ray.put(self.server.version()), self.server.step
        return self.ref, self.server.done

    def push(self, grad: Payload) -> bool:
        """Async: one share's gradient (applied once K networks are in). Returns ``done``."""
        return self.server.push(grad)

    def drain(self) -> list[dict[str, float]]:
        return self.server.drain()

    def state(self) -> dict[str, Any]:
        return self.server.state()

    def checkpoint(self, expected_step: int | None, *peer_states: dict[str, Any]) -> str | None:
        """Shard 0: write all shards' states (``peer_states`` = shards 1…J−1) as one checkpoint.

        Skipped (None) when a shard is not at ``expected_step`` — its update failed and
        will be redone. ``expected_step=None`` (async) takes the shards as they are and
        records shard 0's step.
        """
        from ddray.checkpoint import save_checkpoint

        parts = [self.server.state(), *peer_states]
        if expected_step is not None and {int(p["step"]) for p in parts} != {expected_step}:
            return None
        state = checkpoint_payload(parts, self.config)
        return str(save_checkpoint(self.storage, state.pop("step"), state))
