"""The Ray driver: the outer distillation loop over an elastic fleet of workers and parameter servers.

Same stages as :func:`ddray.run.loop.distill` — sample θ₀s → meta-gradients →
aggregate → apply → checkpoint → log — but the meta-gradients are computed by
worker actors and the apply stage runs on parameter-server actors; the driver only
submits tasks, reads small per-step statistics and logs. It computes nothing:
evaluation (every ``--eval-every`` steps and at the end) and the baselines run on
the workers too.

* ``sync`` (default): meta-step s's chunks of networks (:mod:`ddray.core.net_chunks`) are
  handed to the workers alive at that moment; the server sums the chunks in chunk
  order, divides by K and takes one step — bitwise the single-process result,
  whatever joined or left. Meta-step s+1 is submitted before s finishes (it waits on
  s's published version inside Ray), except after a step that is evaluated, which is
  evaluated on exactly its own state first.
* ``async``: workers pull the newest version, compute a share and push it; a
  server applies an update once it holds K networks' worth of gradients not more
  than ``--max-staleness`` versions old (older ones are dropped and counted).

The fleet starts once MIN workers are placed (waiting up to ``--placement-timeout``
for an autoscaler), grows to MAX as nodes join, and shrinks as nodes leave; below MIN
it waits for capacity, then stops with a checkpoint and says how to resume.
Checkpoints have :mod:`ddray.run.state`'s format, so ``--resume`` continues a run made by
either path.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from tqdm import tqdm

from ddray.config import Config
from ddray.data import Dataset
from ddray.run.lifecycle import (DistillResult, begin, checkpoint_location, evaluate_snapshot, finish, publish, run_dir,
                                 start_state, synthetic)
from ddray.distributed.fleet import Fleet, Round, Share
from ddray.distributed.messages import StepStats, Version, synthetic_of
from ddray.distributed.placement import (CapacityError, TrialLayout, alive_nodes, connect, current_group,
                                         trial_layout, worker_resources)
from ddray.distributed.pool import is_loss
from ddray.distributed.recovery import Action
from ddray.distributed.shards import shard_layout
from ddray.evaluation.held_out import run_baselines
from ddray.inputs.problem import Problem, build_problem, to_distilled
from ddray.tracking.tracker import NullTracker, Tracker

log = logging.getLogger("ddray")
LOOKAHEAD = 2  # meta-steps in flight in sync mode
POLL_S = 0.5  # async mode: how often the driver reads the servers' statistics


class _DiscardedWork(logging.Filter):
    """Hides Ray's "Unhandled error" reports for tasks of meta-steps discarded after a failure.

    When an actor dies, the meta-steps queued behind the lost one fail on their own
    (their inputs failed); the driver drops them and redoes the work, so their errors
    are expected. Errors from other code are untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Unhandled error") and ("WorkerActor" in msg or "ParamServerActor" in msg))


logging.getLogger("ray._private.worker").addFilter(_DiscardedWork())


class Reporter:
    """Progress bar + tracker + ``on_step`` for each applied meta-step (replays after a rollback are not
    re-logged); evaluates the steps due (``--eval-every``) on the workers."""

    def __init__(self, fleet: Fleet, problem: Problem, start: int, tracker: Tracker,
                 on_step: Callable[[int, dict[str, float]], None] | None, progress: bool, out: Path) -> None:
        self.fleet, self.problem, self.tracker, self.on_step, self.out = fleet, problem, tracker, on_step, out
        self.config = problem.config
        self.start = self.logged = start
        self.nets = 0.0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=self.config.distill.iterations, initial=start, desc="distill (ray)", unit="step",
                        disable=not progress, dynamic_ncols=True)

    def evaluated(self, done: int) -> bool:
        """Whether meta-step ``done`` (1-based) is evaluated: the loops submit nothing past it until it is."""
        c = self.config
        return bool(c.run.eval_every) and done % c.run.eval_every == 0 and done < c.distill.iterations

    def __call__(self, stats: StepStats, versions: list[Any] | None = None) -> None:
        """Log one applied meta-step; ``versions``: refs of the state right after it (default: the servers')."""
        done = stats.step
        self.nets += stats.nets
        self.bar.update(done - self.bar.n)
        if done <= self.logged:
            return
        metrics = stats.metrics()
        metrics.update(nets_per_s=self.nets / (time.perf_counter() - self.t0),
                       workers_alive=float(len(self.fleet.alive())), restarts=float(self.fleet.restarts))
        if self.evaluated(done):
            metrics.update(self.evaluate(done, versions or self.fleet.versions()))
        self.tracker.log_metrics(metrics, step=done)
        if self.on_step:
            self.on_step(done, metrics)
        self.logged = done
        self.bar.set_postfix(loss=f"{metrics['outer_loss']:.3f}", alive=len(self.fleet.alive()),
                             restarts=self.fleet.restarts, refresh=False)

    def evaluate(self, done: int, refs: list[Any]) -> dict[str, float]:
        """Held-out accuracy of the state in ``refs`` (after ``done`` meta-steps), trained on the workers."""
        versions: list[Version] = ray.get(refs)
        snapshot = to_distilled(self.problem, synthetic_of(versions, self.problem), done)
        return evaluate_snapshot(self.problem, snapshot, self.out, self.tracker, done,
                                 predictor=lambda job, chunks: self.fleet.predict(job, chunks, refs))

    def seconds_per_step(self) -> float:
        self.bar.close()
        return (time.perf_counter() - self.t0) / max(1, self.config.distill.iterations - self.start)


def checkpoint_due(config: Config, done: int) -> bool:
    return done % config.run.checkpoint_every == 0 or done == config.distill.iterations


Report = Callable[..., None]


def run_sync(fleet: Fleet, start: int, config: Config, report: Reporter) -> None:
    """Synchronous meta-steps start … iterations, checkpointing every ``--checkpoint-every`` and at the end.

    ``DDRAY_TRANSPORT=compiled`` runs them through a Ray Compiled Graph instead of
    per-step tasks (experimental, see :mod:`ddray.distributed.compiled`).
    """
    rounds = sync_rounds
    if os.environ.get("DDRAY_TRANSPORT", "objects") == "compiled":
        from ddray.distributed.compiled import compiled_rounds as rounds
    rounds(fleet, start, config.distill.iterations, lambda done: checkpoint_due(config, done), report,
           report.evaluated)


def sync_rounds(fleet: Fleet, start: int, stop: int, due: Callable[[int], bool], report: Report,
                barrier: Callable[[int], bool] = lambda done: False) -> None:
    """Meta-steps ``start`` … ``stop``−1 with one step of lookahead; follows joins and losses, redoes lost work.

    ``due(done)``: checkpoint after ``done`` meta-steps; ``barrier(done)``: submit nothing
    past it until it is reported.
    """
    inputs, step = fleet.versions(), start  # the version the next submitted step reads; its index
    pending: deque[Round] = deque()
    recoveries = 0
    while pending or step < stop:
        fleet.poll_joins()  # joins: from the next submitted step on
        fleet.ensure_capacity()  # below MIN: wait for capacity (CapacityError at the timeout)
        # submit: step s+1 queues behind s's update inside Ray (pipelining; nothing is fetched)
        while step < stop and len(pending) < LOOKAHEAD and not (pending and barrier(pending[-1].step + 1)):
            pending.append(fleet.submit(step, inputs, due(step + 1)))
            inputs, step = pending[-1].outputs, step + 1
        r = pending.popleft()
        try:
            stats = ray.get(r.stats)  # small dicts; this is the driver's only wait
            if r.checkpoint is not None:
                ray.get(r.checkpoint)
        except RayError as e:
            # recovery: everything after r depended on it and will fail on its own
            recoveries += 1
            pending.clear()
            kept: list[Share] = []

            def lose() -> int:  # the shares that finished are kept; the others' workers are lost
                kept.extend(fleet.finished_shares(r))
                return len(r.shares) - len(kept)

            decision = fleet.recover(recoveries, is_loss(e), lose)
            if decision.action is Action.GIVE_UP:
                raise RuntimeError(f"meta-step {r.step + 1}: {decision.why}") from e
            if decision.action is Action.RESTART:
                step, inputs = fleet.restore()
                continue
            if decision.action is Action.RAISE:
                raise  # not a lost actor: a real error
            fleet.ensure_capacity()  # SHRINK goes on at once; WAIT waits for MIN here
            pending.append(fleet.submit(r.step, r.inputs, due(r.step + 1), kept))
            inputs, step = pending[-1].outputs, r.step + 1
            continue
        recoveries = 0
        report(stats[0], r.outputs)


def run_async(fleet: Fleet, start: int, config: Config, report: Reporter) -> None:
    """Workers pull/compute/push on their own; the driver reads statistics, checkpoints, follows joins and losses."""
    iters, every = config.distill.iterations, config.run.checkpoint_every
    fleet.ensure_capacity()
    loops = {i: fleet.start_loop(i) for i in fleet.alive()}
    next_ckpt = (start // every + 1) * every
    while True:
        for i in fleet.poll_joins():
            if i not in loops:
                loops[i] = fleet.start_loop(i)
        ready, _ = ray.wait(list(loops.values()), num_returns=1, timeout=POLL_S) if loops else ([], [])
        try:
            stats = fleet.drain()
        except RayActorError:
            stats = []
            if fleet.recover().action is Action.RESTART:  # a shard is back: roll back with it
                fleet.restore()
        for st in stats:
            report(st)
            if next_ckpt <= st.step < iters:
                fleet.checkpoint(None)
                next_ckpt = (st.step // every + 1) * every
        for i in [i for i, ref in loops.items() if ref in ready]:
            try:
                ray.get(loops.pop(i))  # the run is complete as far as this worker can tell
            except RayError as e:
                def lose() -> int:  # its loop starts again once it is back
                    if not is_loss(e):
                        return 0
                    fleet.lose_worker(i, e)
                    return 1

                decision = fleet.recover(loss=is_loss(e), lose=lose)
                if decision.action is Action.RESTART:
                    fleet.restore()
                elif decision.action is Action.RAISE:
                    raise
        if not loops:
            if min(fleet.server_steps()) >= iters:
                break
            fleet.ensure_capacity()
            loops = {i: fleet.start_loop(i) for i in fleet.alive()}  # rolled back or shrunk meanwhile
    for st in fleet.drain():
        report(st)
    ray.get(fleet.checkpoint(iters))


LOOPS = {"sync": run_sync, "async": run_async}


def trial_group(config: Config) -> tuple[Any, TrialLayout] | None:
    """Inside a Ray Tune trial whose group is laid out [driver, PS × shards, worker × W]: (group, layout)."""
    group = current_group()
    if group is None:
        return None
    layout = trial_layout(group.bundle_specs, config.cluster.max_workers, config.cluster.shards)
    if layout is None:
        log.warning("running inside a placement group that is not laid out as [driver, %d PS, %d workers]; "
                    "the workers get slots of their own", config.cluster.shards, config.cluster.max_workers)
        return None
    return group, layout


def stop_below_minimum(fleet: Fleet, error: CapacityError, out: Path, storage: str) -> CapacityError:
    """The run cannot go on: write what the servers hold as a checkpoint and say how to continue."""
    try:
        path = ray.get(fleet.checkpoint(None), timeout=60)
        where = f"its checkpoint is {path}"
    except (RayError, GetTimeoutError):
        where = f"its last checkpoint is in {storage}"
    return CapacityError(f"{error}; the run stopped, {where}; when the cluster has room again continue it with "
                         f"`ddray distill --resume auto --out {out}` (with the same flags)")


def share_data(problem: Problem) -> tuple[Any, Problem]:
    """Put the real data into the object store once: (its reference for the workers, the driver's problem reading
    the same copy). A set read through a bounded cache (``--data-cache-mb``) is not put: each worker reads its own
    rows from the Parquet copy, and None goes to the workers."""
    if problem.config.data.data_cache_mb is not None:
        return None, problem
    ref = ray.put(problem.data.to_shared())
    return ref, replace(problem, data=Dataset.from_shared(ray.get(ref)))  # the driver's own copy can go


def distill_ray(config: Config, tracker: Tracker | None = None, progress: bool = True,
                resume: str | Path | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                baselines: bool = False) -> DistillResult:
    """Distil a data set with Ray worker actors and parameter servers (see the module docstring).

    Args and result as :func:`ddray.run.loop.distill`. Connects to ``--address`` /
    $RAY_ADDRESS, else starts a local Ray (and shuts it down at the end). Nothing is
    written before MIN workers are placed.
    """
    tracker = tracker or NullTracker()
    out = run_dir(config, resume)
    storage = checkpoint_location(config, out)
    problem = build_problem(config)  # the driver's copy: labels, layout and the artifact's metadata
    layout = shard_layout(problem.data.num_classes, config.distill.ipc, config.cluster.shards)
    transport = os.environ.get("DDRAY_TRANSPORT", "objects")
    if transport not in ("objects", "compiled") or (transport == "compiled" and (
            config.cluster.mode != "sync" or config.cluster.shards != 1)):
        raise ValueError(f"DDRAY_TRANSPORT: invalid value {transport!r}; objects, or compiled "
                         f"(with --mode sync --shards 1)")
    state = start_state(problem, config, storage, resume)
    started = connect(config.cluster.address)
    try:
        trial = trial_group(config)
        resources = trial[1].resources if trial else worker_resources(config.cluster, alive_nodes())
        data, problem = share_data(problem)
        fleet = Fleet(config, layout, state, storage, resources, trial, data=data)
        try:
            begin(config, out, tracker)
            reporter = Reporter(fleet, problem, state.step, tracker, on_step, progress, out)
            try:
                LOOPS[config.cluster.mode](fleet, state.step, config, reporter)
            except CapacityError as e:
                raise stop_below_minimum(fleet, e, out, storage) from None
            seconds = reporter.seconds_per_step()
            syn = synthetic(problem, fleet.state())
            result = finish(problem, syn, config.distill.iterations, out, tracker, seconds,
                            predictor=lambda job, chunks: fleet.predict(job, chunks))
            publish(out, storage)
            if baselines:
                result.baselines = run_baselines(config, out, mapper=fleet.mapper())
        finally:
            fleet.shutdown()
    finally:
        if started:
            ray.shutdown()
    return result
