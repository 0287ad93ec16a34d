"""The Ray driver: the outer distillation loop with worker actors and parameter servers.

Same stages as :func:`ddray.distill.distill` — sample θ₀s → meta-gradients →
aggregate → apply → checkpoint → log — but the meta-gradients are computed by
worker actors and the apply stage runs on parameter-server actors; the driver only
submits tasks and reads small per-step statistics, never a gradient.

* ``sync`` (default): meta-step s's K networks are split over the W workers, the
  server sums the shares in a fixed order, divides by K and takes one Adam step —
  the single-process result up to float summation order (bitwise for W = 1 on the
  same thread count). Meta-step s+1 is submitted before s finishes (it waits on
  s's published version inside Ray), so the driver never stalls a round.
* ``async``: workers pull the newest version, compute a share and push it; a
  server applies an update once it holds K networks' worth of gradients not more
  than ``--max-staleness`` versions old (older ones are dropped and counted).

Checkpoints have the format of :func:`ddray.distill.distill`'s, so ``--resume``
continues a run made by either path.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, cast

import ray
from ray.exceptions import RayActorError, RayError
from tqdm import tqdm

from ddray.checkpoint import is_uri, list_checkpoints, load_latest
from ddray.config import Config
from ddray.core.synthetic import SyntheticSet, class_labels
from ddray.distill import CKPT_DIR, DistillResult, check_resumable, default_out, evaluate_distilled, finish, \
    to_distilled
from ddray.distributed.fleet import Fleet, Round
from ddray.distributed.param_server import initial_state
from ddray.distributed.shards import shard_layout
from ddray.distributed.placement import Plan, alive_nodes, connect, plan_in_group, plan_resources
from ddray.problem import Problem, build_problem
from ddray.tracking import NullTracker, Tracker, log_eval_grid

log = logging.getLogger("ddray.distributed")
LOOKAHEAD = 2  # meta-steps in flight in sync mode
MAX_RECOVERIES = 20  # consecutive recoveries without progress before giving up
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


def storage_location(config: Config, out: Path) -> str:
    """Where checkpoints go: ``--storage`` (a URI as given, a path made absolute) or OUT/checkpoints."""
    s = config.run.storage
    if s and is_uri(s):
        return s
    return str(Path(s).resolve() if s else (out / CKPT_DIR).resolve())


def start_state(problem: Problem, config: Config, storage: str, resume: bool) -> dict[str, Any]:
    """The checkpoint-format state the run starts from; ValueError before anything is written."""
    iters = config.distill.iterations
    if resume:
        saved = load_latest(storage)
        if saved is None:
            raise ValueError(f"--resume: no valid checkpoint in {storage}")
        check_resumable(saved, config, cast(Path, storage))
        if int(saved["step"]) > iters:
            raise ValueError(f"--iterations: invalid value {iters}; the checkpoint in {storage} already has "
                             f"{saved['step']} meta-steps (--iterations is the run's total)")
        return saved
    if list_checkpoints(storage):
        raise ValueError(f"--storage {storage}: already holds checkpoints of a run; continue it with "
                         f"--resume, or choose a new --out/--storage")
    return initial_state(problem)


class Reporter:
    """Progress bar + tracker + ``on_step`` for each applied meta-step (replays after a rollback are not re-logged)."""

    def __init__(self, fleet: Fleet, problem: Problem, start: int, tracker: Tracker,
                 on_step: Callable[[int, dict[str, float]], None] | None, progress: bool,
                 out: Path | None = None) -> None:
        self.fleet, self.problem, self.tracker, self.on_step = fleet, problem, tracker, on_step
        self.out = out  # where the eval image grids go (OUT/grids/); None: not written
        self.config = problem.config
        self.start = self.logged = start
        self.nets = 0.0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=self.config.distill.iterations, initial=start, desc="distill (ray)", unit="step",
                        disable=not progress, dynamic_ncols=True)

    def __call__(self, stats: dict[str, float]) -> None:
        done = int(stats["step"])
        self.nets += stats["nets"]
        self.bar.update(done - self.bar.n)
        if done <= self.logged:
            return
        keys = ("outer_loss", "lr_min", "lr_mean", "lr_max", "outer_lr", "staleness_mean", "staleness_max", "dropped")
        metrics = {k: stats[k] for k in keys if k in stats}
        metrics.update(nets_per_s=self.nets / (time.perf_counter() - self.t0),
                       workers_alive=float(len(self.fleet.alive)), restarts=float(self.fleet.restarts))
        if "t_receive" in stats:  # sync: the server's time per update (receive + sum + Adam)
            metrics["ps_ms"] = 1e3 * sum(stats[k] for k in ("t_receive", "t_average", "t_adam"))
        c = self.config
        if c.run.eval_every and done % c.run.eval_every == 0 and done < c.distill.iterations:
            snapshot = to_distilled(self.problem, self.syn(), done)
            r = evaluate_distilled(self.problem, snapshot, c.run.eval_nets)
            metrics.update(eval_acc_mean=r.mean, eval_acc_std=r.std)
            if self.out is not None:  # as ddray.distill.distill: the grid of every evaluated snapshot
                log_eval_grid(self.tracker, snapshot, self.out, done)
        self.tracker.log_metrics(metrics, step=done)
        if self.on_step:
            self.on_step(done, metrics)
        self.logged = done
        self.bar.set_postfix(loss=f"{metrics['outer_loss']:.3f}", alive=len(self.fleet.alive),
                             restarts=self.fleet.restarts, refresh=False)

    def syn(self) -> SyntheticSet:
        s = self.fleet.final_state()
        d = self.config.distill
        return SyntheticSet(s["images"], class_labels(self.problem.data.num_classes, d.ipc), s["raw_lrs"], d.layout[1])

    def seconds_per_step(self) -> float:
        self.bar.close()
        return (time.perf_counter() - self.t0) / max(1, self.config.distill.iterations - self.start)


def checkpoint_due(config: Config, done: int) -> bool:
    return done % config.run.checkpoint_every == 0 or done == config.distill.iterations


def run_sync(fleet: Fleet, start: int, config: Config, report: Callable[[dict[str, float]], None]) -> None:
    """Synchronous meta-steps start … iterations, checkpointing every ``--checkpoint-every`` and at the end.

    ``DDRAY_TRANSPORT=compiled`` runs them through a Ray Compiled Graph instead of
    per-step tasks (experimental, see :mod:`ddray.distributed.compiled`).
    """
    rounds = sync_rounds
    if os.environ.get("DDRAY_TRANSPORT", "objects") == "compiled":
        from ddray.distributed.compiled import compiled_rounds as rounds
    rounds(fleet, start, config.distill.iterations, lambda done: checkpoint_due(config, done), report)


def sync_rounds(fleet: Fleet, start: int, stop: int, due: Callable[[int], bool],
                report: Callable[[dict[str, float]], None]) -> None:
    """Meta-steps ``start`` … ``stop``−1 with one step of lookahead; repairs lost actors and redoes lost work.

    ``due(done)`` says whether to checkpoint after ``done`` meta-steps.
    """
    inputs, step = fleet.versions(), start  # the version the next submitted step reads; its index
    pending: deque[Round] = deque()
    recoveries = 0
    while pending or step < stop:
        # submit: step s+1 queues behind s's update inside Ray (pipelining; nothing is fetched)
        while step < stop and len(pending) < LOOKAHEAD:
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
            if recoveries > MAX_RECOVERIES:
                raise RuntimeError(f"meta-step {r.step + 1}: gave up after {MAX_RECOVERIES} recoveries") from e
            pending.clear()
            if fleet.servers_lost():
                step, inputs = fleet.restore()
                continue
            failed = fleet.failed_shares(r, e)
            if not failed:
                raise  # not a lost actor: a real error
            reuse = {k: sh for k, sh in enumerate(r.shares) if k not in failed}
            pending.append(fleet.submit(r.step, r.inputs, due(r.step + 1), reuse))
            inputs, step = pending[-1].outputs, r.step + 1
            continue
        recoveries = 0
        report(stats[0])


def run_async(fleet: Fleet, start: int, config: Config, report: Callable[[dict[str, float]], None]) -> None:
    """Workers pull/compute/push on their own; the driver reads statistics, checkpoints and repairs."""
    iters, every = config.distill.iterations, config.run.checkpoint_every
    loops = {i: fleet.start_loop(i) for i in range(len(fleet.workers))}
    next_ckpt = (start // every + 1) * every
    while True:
        ready, _ = ray.wait(list(loops.values()), num_returns=1, timeout=POLL_S)
        try:
            stats = ray.get(fleet.servers[0].drain.remote())
        except RayActorError:
            stats = []
            if fleet.servers_lost():
                fleet.restore()
        for st in stats:
            report(st)
            if int(st["step"]) >= next_ckpt and int(st["step"]) < iters:
                fleet.checkpoint(None)
                next_ckpt = (int(st["step"]) // every + 1) * every
        for i in [i for i, ref in loops.items() if ref in ready]:
            try:
                ray.get(loops.pop(i))  # the run is complete as far as this worker can tell
            except RayError as e:
                if fleet.servers_lost():
                    fleet.restore()
                elif not (fleet.ensure_worker(i, type(e).__name__) or isinstance(e, RayActorError)):
                    raise
                loops[i] = fleet.start_loop(i)
        if not loops:
            steps = [info["step"] for info in ray.get([s.info.remote() for s in fleet.servers])]
            if min(steps) >= iters:
                break
            loops = {i: fleet.start_loop(i) for i in range(len(fleet.workers))}  # rolled back meanwhile
    for st in ray.get(fleet.servers[0].drain.remote()):
        report(st)
    ray.get(fleet.checkpoint(iters))


LOOPS = {"sync": run_sync, "async": run_async}


def place(config: Config) -> tuple[Plan, Any]:
    """(plan, existing group or None): inside a Ray Tune trial whose reserved group is laid out as
    [driver, PS × shards, worker × workers] the fleet uses it; otherwise it gets a group of its own."""
    from ray.util import get_current_placement_group

    c = config.cluster
    group = get_current_placement_group()
    plan = plan_in_group(group.bundle_specs, c.workers, c.shards) if group is not None else None
    if plan is not None:
        return plan, group
    if group is not None:
        log.warning("running inside a placement group that is not laid out as [driver, %d PS, %d workers]; "
                    "creating a separate group", c.shards, c.workers)
    return plan_resources(alive_nodes(), c.workers, c.shards, c.placement), None


def distill_ray(config: Config, tracker: Tracker | None = None, progress: bool = True,
                resume: str | Path | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> DistillResult:
    """Distil a data set with Ray worker actors and parameter servers (see the module docstring).

    Args and result as :func:`ddray.distill.distill`. Connects to ``--address`` /
    $RAY_ADDRESS, else starts a local Ray (and shuts it down at the end).
    """
    tracker = tracker or NullTracker()
    out = Path(resume) if resume else Path(config.run.out or default_out())
    storage = storage_location(config, out)
    problem = build_problem(config)  # the driver's copy: evaluation at the end
    layout = shard_layout(problem.data.num_classes, config.distill.ipc, config.cluster.shards)
    transport = os.environ.get("DDRAY_TRANSPORT", "objects")
    if transport not in ("objects", "compiled") or (transport == "compiled" and (
            config.cluster.mode != "sync" or config.cluster.shards != 1)):
        raise ValueError(f"DDRAY_TRANSPORT: invalid value {transport!r}; objects, or compiled "
                         f"(with --mode sync --shards 1)")
    state = start_state(problem, config, storage, resume is not None)
    started = connect(config.cluster.address)
    try:
        plan, group = place(config)
        out.mkdir(parents=True, exist_ok=True)
        config.dump(out / "config.yaml")
        tracker.log_params(config.flat())
        fleet = Fleet(config.to_dict(), layout, state, storage, plan, group=group)
        try:
            reporter = Reporter(fleet, problem, int(state["step"]), tracker, on_step, progress, out)
            LOOPS[config.cluster.mode](fleet, int(state["step"]), config, reporter)
            syn, seconds = reporter.syn(), reporter.seconds_per_step()
        finally:
            fleet.shutdown()
    finally:
        if started:
            ray.shutdown()
    return finish(problem, syn, config.distill.iterations, out, tracker, seconds)
