"""The outer distillation loop in this process: sample θ₀s → meta-gradients → average → apply → checkpoint → log.

:func:`distill` runs it here; the Ray driver (:mod:`ddray.distributed.driver`) swaps the
meta-gradient stage for worker actors and the apply stage for parameter servers, around the
same objective, chunks (:mod:`ddray.core.net_chunks`) and optimiser, so both give the same synthetic set
bit for bit. What both share — where a run's files go, which state it starts from, how it ends —
is :mod:`ddray.run.lifecycle`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ddray.config import Config
from ddray.core.net_chunks import net_chunks, step_gradient
from ddray.evaluation.held_out import run_baselines
from ddray.run.lifecycle import (DistillResult, begin, checkpoint_location, evaluate_snapshot, finish, publish, run_dir,
                                 start_state, synthetic)
from ddray.inputs.problem import build_problem, to_distilled
from ddray.run.state import RunState, save_state
from ddray.tracking.tracker import NullTracker, Tracker


def threads_as_worker(config: Config) -> None:
    """``--cpus-per-worker``: this process computes as one worker would, with as many torch threads."""
    if config.cluster.cpus_per_worker is not None:
        torch.set_num_threads(max(1, round(config.cluster.cpus_per_worker)))


# ----------------------------------------------------------------------------- the loop


def distill(config: Config, tracker: Tracker | None = None, progress: bool = True,
            resume: str | Path | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            baselines: bool = False) -> DistillResult:
    """Distil a data set in this process.

    Args:
        config: the run configuration.
        tracker: receives params, per-step metrics and artifacts (default: none).
        progress: show a progress bar.
        resume: a run directory to continue from its newest checkpoint, or ``"auto"``
            (continue ``--out``'s run if it has a checkpoint of this config, else start fresh).
        on_step: called with (step, metrics) after each meta-step (e.g. Ray Tune reporting).
        baselines: also build and evaluate the real-image baselines of the same budget
            (:func:`ddray.evaluation.held_out.run_baselines`; written to OUT/baselines/).
    """
    tracker = tracker or NullTracker()
    out = run_dir(config, resume)
    storage = checkpoint_location(config, out)
    problem = build_problem(config)
    state = start_state(problem, config, storage, resume)
    threads_as_worker(config)
    begin(config, out, tracker)
    syn = synthetic(problem, state)
    opt = problem.outer_optimizer(syn)
    opt.load_state_dict(state.optimizer)
    objective = problem.objective()
    start, iters, seed = state.step, config.distill.iterations, config.run.seed
    chunks = net_chunks(config.distill.nets, config.cluster.max_workers)
    bar = tqdm(range(start, iters), initial=start, total=iters, desc="distill", disable=not progress,
               unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        # meta-gradients of all K networks, chunk by chunk, summed in chunk order (as the parameter server does)
        g = step_gradient(objective, syn.images, syn.raw_lrs, step, chunks, seed,
                          syn.labels if syn.learns_labels else None)
        # one outer-optimiser step on x̃ and ρ (and learned labels) with the average over the K networks
        opt.apply(g.images / g.nets, g.raw_lrs / g.nets, None if g.labels is None else g.labels / g.nets)
        done = step + 1
        if done % config.run.checkpoint_every == 0 or done == iters:
            save_state(storage, RunState(done, syn.images, syn.raw_lrs, opt.state_dict(), config,
                                         syn.labels if syn.learns_labels else None))
        lrs = syn.lrs
        metrics = {"outer_loss": g.loss / g.nets, "lr_min": float(lrs.min()), "lr_mean": float(lrs.mean()),
                   "lr_max": float(lrs.max()), "outer_lr": opt.lr,
                   "nets_per_s": g.nets * (done - start) / (time.perf_counter() - t0)}
        if config.run.eval_every and done % config.run.eval_every == 0 and done < iters:
            metrics.update(evaluate_snapshot(problem, to_distilled(problem, syn, done), out, tracker, done))
        tracker.log_metrics(metrics, step=done)
        if on_step:
            on_step(done, metrics)
        bar.set_postfix(loss=f"{metrics['outer_loss']:.3f}", refresh=False)
    bar.close()
    sec = (time.perf_counter() - t0) / max(1, iters - start)
    result = finish(problem, syn, iters, out, tracker, sec)
    publish(out, storage)
    if baselines:
        result.baselines = run_baselines(config, out)
    return result
