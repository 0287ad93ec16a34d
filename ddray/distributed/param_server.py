"""The parameter server: x̃, ρ, the outer optimiser's state and the step counter of a run.

:class:`ParamServer` is plain Python (unit-tested without Ray); :class:`ParamServerActor`
at the bottom is the Ray shell that publishes every version once to the object
store, checkpoints, and reloads the last checkpoint when Ray restarts it.

Sharding (:mod:`.messages`): shard j owns the image columns of a block of classes and
their optimiser moments; shard 0 also owns ρ. The optimiser is elementwise, so J
shards update exactly what one server would.

Sync mode sums the :class:`~.messages.GradShare` of every chunk of a meta-step in
chunk order — whichever workers computed them — divides by K and takes one step:
exactly what :func:`ddray.core.net_chunks.step_gradient` does in one process.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddray.core.synthetic import OuterOptimizer, SyntheticSet
from ddray.distributed.messages import (GradShare, ServerInfo, ShardState, StepStats, Version, merge_states,
                                        slice_state)
from ddray.distributed.shards import Shard
from ddray.run.state import RunState, load_state, save_state

if TYPE_CHECKING:
    from ddray.config import Config


class ParamServer:
    """Owns one shard of (x̃, ρ), its outer-optimizer state and the step counter.

    Args:
        state: this shard's part of the run state (:func:`.messages.slice_state`).
        shard: which block of classes it owns.
        config: the run config (the outer optimiser: :meth:`ddray.inputs.problem.Problem.outer_optimizer`'s
            settings; K = ``nets``; ``iterations``; async ``max_staleness``).
    """

    def __init__(self, state: ShardState, shard: Shard, config: "Config") -> None:
        from ddray.methods import optimizer_options

        d = config.distill
        self.shard, self.nets, self.iterations = shard, d.nets, d.iterations
        self.max_staleness = config.cluster.max_staleness
        raw = state.raw_lrs if state.raw_lrs is not None else torch.zeros(0)
        # learned labels: shard 0 owns z̃, the others hold an empty stand-in (as for ρ) in the same optimiser layout
        empty = torch.zeros(0) if d.labels == "learned" else torch.empty(0, dtype=torch.long)
        labels = state.labels if state.labels is not None else empty
        self.syn = SyntheticSet(state.images.clone(), labels.clone(), raw.clone(), d.layout[1])
        self.owns_labels = self.shard.owns_lrs and self.syn.learns_labels
        self.opt = OuterOptimizer(self.syn, d.outer_lr, d.lr_decay, d.lr_decay_every, **optimizer_options(d))
        self.opt.load_state_dict(state.optimizer)
        self.step = state.step
        self.dropped = 0
        self._pending: list[tuple[GradShare, int]] = []  # async: (gradient, its staleness)
        self._stats: list[StepStats] = []

    # -- publishing and checkpoint state ---------------------------------------------------

    def version(self) -> Version:
        """The current (x̃ slice, ρ) as numpy arrays (ray.put copies them into the object store)."""
        return Version(self.step, self.syn.images.numpy(), self.syn.raw_lrs.numpy() if self.shard.owns_lrs else None,
                       self.syn.labels.numpy() if self.owns_labels else None)

    def state(self) -> ShardState:
        """This shard's part of the run state (tensors are copies)."""
        return ShardState(self.step, self.syn.images.clone(),
                          self.syn.raw_lrs.clone() if self.shard.owns_lrs else None, self.opt.state_dict(),
                          self.syn.labels.clone() if self.owns_labels else None)

    # -- sync: one update from the gradients of all chunks of a meta-step ------------------

    def apply(self, grads: list[GradShare]) -> StepStats:
        """Σ the chunks' gradients in chunk order, divide by Σ nets, one optimiser step; returns stats."""
        if self.step >= self.iterations:
            raise RuntimeError(f"ParamServer.apply: the run already has its {self.iterations} meta-steps")
        t0 = time.perf_counter()
        grads = sorted(grads, key=lambda g: g.chunk)
        if [g.chunk for g in grads] != list(range(len(grads))) or any(g.step != self.step for g in grads):
            raise RuntimeError(f"ParamServer.apply: meta-step {self.step} got chunks "
                               f"{[(g.chunk, g.step) for g in grads]} (each chunk once, at this step)")
        img = _sum([g.images for g in grads])
        raw = _sum([g.raw_lrs for g in grads]) if self.shard.owns_lrs else None
        labels = _sum([g.labels for g in grads]) if self.owns_labels else None
        nets, loss = 0, 0.0
        for g in grads:
            nets, loss = nets + g.nets, loss + g.loss
        t1 = time.perf_counter()
        stats = self._update(img, raw, labels, nets, loss)
        return dataclasses.replace(stats, t_average=t1 - t0, t_adam=time.perf_counter() - t1)

    def _update(self, img: np.ndarray, raw: np.ndarray | None, labels: np.ndarray | None, nets: int,
                loss: float) -> StepStats:
        g_raw = torch.from_numpy(raw) / nets if raw is not None else torch.zeros(0)
        g_labels = torch.from_numpy(labels) / nets if labels is not None else None
        if g_labels is None and self.syn.learns_labels:  # another shard owns z̃
            g_labels = torch.zeros(0)
        self.opt.apply(torch.from_numpy(img) / nets, g_raw, g_labels)
        self.step += 1
        stats = StepStats(self.step, loss / nets, self.opt.lr, nets)
        if self.shard.owns_lrs:
            lrs = self.syn.lrs
            stats = dataclasses.replace(stats, lr_min=float(lrs.min()), lr_mean=float(lrs.mean()),
                                        lr_max=float(lrs.max()))
        return stats

    # -- async: accumulate pushed gradients, update once K networks are in -----------------

    @property
    def done(self) -> bool:
        return self.step >= self.iterations

    def push(self, grad: GradShare) -> bool:
        """Take one share's gradient; apply an update once ≥ K networks are pending. Returns ``done``.

        A gradient from a version more than ``max_staleness`` updates old (or from a
        version this server does not have, e.g. after a rollback) is dropped.
        """
        if self.done:
            return True
        staleness = self.step - grad.step
        if not 0 <= staleness <= self.max_staleness:
            self.dropped += 1
            return False
        self._pending.append((grad, staleness))
        if sum(g.nets for g, _ in self._pending) >= self.nets:
            pending, self._pending = self._pending, []
            # renumber: the pushes of one update are its chunks, in arrival order
            chunks = [dataclasses.replace(g, step=self.step, chunk=c) for c, (g, _) in enumerate(pending)]
            st = [s for _, s in pending]
            stats = dataclasses.replace(self.apply(chunks), staleness_mean=float(np.mean(st)),
                                        staleness_max=float(max(st)), dropped=float(self.dropped))
            if self.shard.owns_lrs:  # the driver reads shard 0's statistics
                self._stats.append(stats)
        return self.done

    def drain(self) -> list[StepStats]:
        """Stats of the async updates applied since the last call."""
        out, self._stats = self._stats, []
        return out


def _sum(parts: list[np.ndarray | None]) -> np.ndarray:
    """Σ of the chunks' arrays in chunk order (float32, as one process adds them)."""
    arrays = [p for p in parts if p is not None]
    assert len(arrays) == len(parts), "ParamServer.apply: every chunk carries this shard's parts (shard 0: ρ, z̃)"
    total = np.array(arrays[0], dtype=np.float32, copy=True)
    for p in arrays[1:]:
        np.add(total, p, out=total)
    return total


# -- the Ray shell -----------------------------------------------------------------------------

def restart_state(storage: str, config: "Config", start: int) -> RunState:
    """What a restarted server continues from: the newest valid checkpoint in ``storage``, or — if
    the run has none yet — its initial state (a function of the config)."""
    saved = load_state(storage)
    if saved is not None:
        return saved
    if start > 0:
        raise RuntimeError(f"parameter server: no checkpoint visible in {storage} from this node; "
                           "use storage all nodes share (a shared path or a URI)")
    from ddray.inputs.problem import build_problem

    return RunState.initial(build_problem(config))


class ParamServerActor:
    """Ray actor around :class:`ParamServer` (wrapped with ``ray.remote`` in :mod:`.fleet`).

    Publishing: in sync mode each new version is the return value of :meth:`apply`,
    which Ray writes to the object store once and every worker of the next meta-step
    reads (no per-worker copies, and the driver can pass it on before it exists); in
    async mode :meth:`pull` hands out one ``ray.put`` per version. The driver gives the
    server its state with :meth:`load`; after a restart by Ray — or when the driver
    replaces it on another node — it takes its part of the newest valid checkpoint
    instead (before the first one: the run's initial state, a function of the config).
    """

    def __init__(self, shard: Shard, storage: str, config: "Config", start: int, restore: bool = False) -> None:
        from ddray.distributed.placement import reconstructed

        self.shard, self.storage, self.config, self.start = shard, storage, config, start
        self.ps: ParamServer | None = None
        self.ref: Any = None
        self.published = -1
        if restore or reconstructed():
            self.restore()

    @property
    def server(self) -> ParamServer:
        assert self.ps is not None, "ParamServerActor: load() or restore() first"
        return self.ps

    def load(self, state: RunState) -> int:
        """Take this shard's part of the run state → its step."""
        self.ps, self.published = ParamServer(slice_state(state, self.shard), self.shard, self.config), -1
        return self.ps.step

    def restore(self) -> tuple[Version, int]:
        """Roll back to the newest valid checkpoint (or the initial state) → (version, step)."""
        step = self.load(restart_state(self.storage, self.config, self.start))
        return self.server.version(), step

    def info(self) -> ServerInfo:
        import ray

        return ServerInfo(os.getpid(), self.ps.step if self.ps else None, self.shard.index,
                          ray.get_runtime_context().get_node_id())

    def latest(self) -> Version:
        """The current version, by value (the caller passes the ref of this return on)."""
        return self.server.version()

    def apply(self, share_refs: list[Any]) -> tuple[Version, StepStats]:
        """Sync update from the refs of the workers' shares (each a list of GradShare) → (the new version, stats)."""
        import ray

        t0 = time.perf_counter()
        ray.wait(share_refs, num_returns=len(share_refs), fetch_local=True)  # the shares finish
        t1 = time.perf_counter()
        shares = ray.get(share_refs)  # receive: zero-copy numpy views of the object store
        t2 = time.perf_counter()
        stats = self.server.apply([g for share in shares for g in share])
        return self.server.version(), dataclasses.replace(stats, t_wait=t1 - t0, t_receive=t2 - t1)

    def dag_version(self, job: tuple[int, bool]) -> Version:
        """Compiled-graph transport: the version meta-step ``job[0]`` reads."""
        if job[0] != self.server.step:
            raise RuntimeError(f"parameter server is at meta-step {self.server.step}, asked for {job[0]}")
        return self.server.version()

    def dag_apply(self, job: tuple[int, bool], *shares: list[GradShare]) -> StepStats:
        """Compiled-graph transport: the update of meta-step ``job[0]`` (+ a checkpoint if ``job[1]``)."""
        stats = self.server.apply([g for share in shares for g in share])  # received by the graph's channels
        stats = dataclasses.replace(stats, t_wait=0.0, t_receive=0.0)
        if job[1]:
            self.checkpoint(job[0] + 1)
        return stats

    def pull(self) -> tuple[Any, bool]:
        """Async: (ObjectRef of the current version, run complete); one ``ray.put`` per version."""
        import ray

        if self.published != self.server.step:
            self.ref, self.published = ray.put(self.server.version()), self.server.step
        return self.ref, self.server.done

    def push(self, grads: list[GradShare]) -> bool:
        """Async: one share's gradient (applied once K networks are in). Returns ``done``."""
        done = False
        for g in grads:
            done = self.server.push(g)
        return done

    def drain(self) -> list[StepStats]:
        return self.server.drain()

    def state(self) -> ShardState:
        return self.server.state()

    def checkpoint(self, expected_step: int | None, *peer_states: ShardState) -> str | None:
        """Shard 0: write all shards' states (``peer_states`` = shards 1…J−1) as one checkpoint.

        Skipped (None) when a shard is not at ``expected_step`` — its update failed and
        will be redone. ``expected_step=None`` (async) takes the shards as they are and
        records shard 0's step.
        """
        parts = [self.server.state(), *peer_states]
        if expected_step is not None and {p.step for p in parts} != {expected_step}:
            return None
        if expected_step is None:
            parts = [dataclasses.replace(p, step=parts[0].step) for p in parts]
        return str(save_state(self.storage, merge_states(parts, self.config)))
