"""Evaluating sets: held-out networks trained on a distilled (or baseline) set, tested on real data.

The unit of work is a *chunk* of held-out networks (:func:`predict_nets`): its
predictions do not depend on the process that computes it, so an evaluation gives
the same numbers in one process (``--local``, ``ddray evaluate``) and split over Ray
workers (:mod:`ddray.distributed`), which pass their own ``predictor``.

Protocols: ``dd`` trains networks from the run's init mode with the set's own step
sizes (optionally with the S batches in a shuffled order); :class:`ProtocolDC` trains
from scratch as the DC/DSA/DM/MTT papers do.

:func:`run_baselines` builds the real-image baselines of a config's budget, one job
per method, locally or on a pool of Ray workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ddray.artifact import Distilled, save_distilled
from ddray.chunks import net_chunks
from ddray.config import Config
from ddray.core.evaluate import EvalResult, shuffled_order, summarise, train_predict
from ddray.core.protocol import ProtocolDC, predict_protocol_dc
from ddray.methods import METHODS
from ddray.problem import Problem, build_problem

MAX_CHUNK = 20  # held-out networks trained at once (the vmap width of protocol dd)


@dataclass(frozen=True)
class EvalJob:
    """What an evaluation trains: ``nets`` networks by ``protocol`` (``"dd"`` or a :class:`ProtocolDC`);
    ``shuffled``: protocol dd with the S batches in a fresh order every epoch."""

    nets: int
    protocol: str | ProtocolDC = "dd"
    shuffled: bool = False


Predictor = Callable[[EvalJob, list[list[int]]], list[torch.Tensor]]  # chunks of net ids → their predictions


def eval_job(problem: Problem, nets: int, shuffled: bool = False, protocol: ProtocolDC | str | None = None) -> EvalJob:
    """The job for ``nets`` networks: ``protocol`` None means the config's (``dc``: ``--eval-epochs``, DSA
    unless ``--no-dsa``)."""
    c = problem.config
    protocol = c.protocol if protocol is None else protocol
    if protocol == "dc":
        protocol = ProtocolDC(epochs=c.run.eval_epochs, nets=nets,
                              dsa_strategy=None if c.distill.dsa is False else c.distill.dsa_strategy)
    if isinstance(protocol, ProtocolDC):
        return EvalJob(protocol.nets, protocol)
    return EvalJob(nets, "dd", shuffled)


def eval_chunks(job: EvalJob, workers: int) -> list[list[int]]:
    """The job's networks in chunks: one per worker (at most :data:`MAX_CHUNK` networks each)."""
    return net_chunks(job.nets, max(workers, math.ceil(job.nets / MAX_CHUNK)))


def predict_nets(problem: Problem, d: Distilled, job: EvalJob, ids: list[int]) -> torch.Tensor:
    """Predictions (len(ids), M) on the test split of held-out networks ``ids`` trained on ``d``."""
    c, data = problem.config, problem.data
    if isinstance(job.protocol, ProtocolDC):
        method = METHODS.get(str(d.meta.get("method")))
        lr = float(d.lrs[0]) if method and method.one_learned_step_size else None  # MTT's learned step size
        return predict_protocol_dc(problem.model, d.images, d.labels, data.x_test, job.protocol, c.run.seed, ids, lr)
    order = shuffled_order(d.steps, d.epochs, c.run.seed) if job.shuffled else None
    return train_predict(problem.model, problem.sampler(for_eval=True), d.images, d.labels, d.lrs, data.x_test,
                         ids, order)


def evaluate_distilled(problem: Problem, d: Distilled, nets: int, shuffled: bool = False,
                       protocol: ProtocolDC | str | None = None, predictor: Predictor | None = None,
                       workers: int | None = None) -> EvalResult:
    """Held-out evaluation of ``d`` over ``nets`` networks (see :func:`eval_job`).

    The networks are trained in chunks, one per worker (``workers``, default the config's
    MAX ``--workers``). ``predictor`` computes the chunks elsewhere (Ray workers); by
    default they are computed here, in the same chunks, so both give the same result.
    """
    job = eval_job(problem, nets, shuffled, protocol)
    chunks = eval_chunks(job, workers or problem.config.cluster.max_workers)
    preds = predictor(job, chunks) if predictor else [predict_nets(problem, d, job, ids) for ids in chunks]
    return summarise(torch.cat([p.cpu() for p in preds]), problem.data.y_test.cpu(), problem.attack)


_PROBLEMS: dict[tuple[str, str | None, bool], Problem] = {}  # per worker process: data loaded once


def predict_job(d: Distilled, data_root: str | None, job: EvalJob, ids: list[int],
                seed: int | None = None) -> torch.Tensor:
    """:func:`predict_nets` for a set shipped to a Ray worker (its problem is built once per process);
    ``seed``: the evaluation seed, when not the set's own run seed (``ddray compare``)."""
    import dataclasses
    import json

    key = (json.dumps(d.meta.get("config", {}), sort_keys=True, default=str), data_root, d.init_params is not None)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = problem_for(d, data_root)
    problem = _PROBLEMS[key]
    if seed is not None and seed != problem.config.run.seed:
        problem = dataclasses.replace(problem, config=problem.config.override(seed=seed))
    return predict_nets(problem, d, job, ids)


def problem_for(d: Distilled, data_root: str | None = None) -> Problem:
    """The problem a saved set was made for (its config), with its own θ₀ for fixed-init sets."""
    problem = build_problem(Config.from_dict(d.meta.get("config", {})).override(data_root=data_root))
    if d.init_params is not None:
        problem.fixed = d.init_params
    if d.zca is not None:  # the set's own whitening, whatever the data would fit today
        problem.data = problem.data.with_zca(d.zca)
    return problem


# ----------------------------------------------------------------------------- baselines


def default_baselines(config: Config) -> tuple[str, ...]:
    """The baselines of a config: all four under protocol dd; random and k-means real images under dc
    (``optimized`` and ``average`` tune for DD's own schedule)."""
    from ddray.core.baselines import METHODS as BASELINES

    return ("random", "kmeans") if config.protocol == "dc" else BASELINES


def baseline_set(config: Config, method: str, candidates: int = 50) -> tuple[Distilled, EvalResult]:
    """One baseline of ``config``'s budget, tuned and evaluated by the config's protocol (a job for any worker)."""
    from ddray.core.baselines import make_baseline
    from ddray.core.synthetic import SyntheticSet, inverse_softplus
    from ddray.problem import to_distilled

    problem = build_problem(config)
    c, data = config.distill, problem.data
    steps, epochs = c.layout
    bl = make_baseline(method, problem.model, problem.sampler(), problem.sampler(for_eval=True), data.x_train,
                       data.y_train, data.x_test, data.y_test, steps, epochs, c.ipc, data.num_classes,
                       config.run.seed, config.run.eval_nets, candidates, problem.attack)
    raw = torch.full((steps * epochs,), inverse_softplus(bl.lr))
    d = to_distilled(problem, SyntheticSet(bl.images, bl.labels, raw, epochs), 0)
    d.meta["method"] = f"baseline-{method}"
    result = evaluate_distilled(problem, d, config.run.eval_nets) if config.protocol == "dc" else bl.result
    d.meta["eval"] = result.to_dict()
    return d, result


Mapper = Callable[..., list[Any]]  # (fn, [args, …]) → [fn(*args), …], e.g. on Ray workers


def run_baselines(config: Config, out: Path, methods: Sequence[str] | None = None, candidates: int = 50,
                  mapper: Mapper | None = None) -> list[tuple[str, EvalResult]]:
    """Build and evaluate baselines with ``config``'s budget and protocol; each is written to
    ``out/baselines/<method>``. ``mapper`` runs the jobs elsewhere (a Ray worker pool); default: here."""
    jobs = [(config, m, candidates) for m in methods or default_baselines(config)]
    results = mapper(baseline_set, jobs) if mapper else [baseline_set(*j) for j in jobs]
    for (_, m, _), (d, _) in zip(jobs, results):
        save_distilled(out / "baselines" / m, d)
    return [(m, result) for (_, m, _), (_, result) in zip(jobs, results)]
