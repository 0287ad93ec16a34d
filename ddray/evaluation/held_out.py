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

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ddray.config import Config
from ddray.core.net_chunks import net_chunks
from ddray.core.protocol_dc import ProtocolDC, predict_protocol_dc
from ddray.core.protocol_dd import EvalResult, shuffled_order, summarise, train_predict
from ddray.evaluation.scores import Accuracies, FullDataCache, Scores, best_lr, summarise_scores
from ddray.inputs.problem import Problem, build_problem
from ddray.methods import METHODS
from ddray.store.artifact import Distilled, save_distilled
from ddray.validation import parse_lrs

MAX_CHUNK = 20  # held-out networks trained at once (the vmap width of protocol dd)


TRAIN_ON = ("set", "random", "full")
RANDOM_SUBSET_KEY = 5_000_000  # the random real subset of a score, in the EVAL stream (core/protocol.py: 2…4 M)


@dataclass(frozen=True)
class EvalJob:
    """What an evaluation trains: ``nets`` networks by ``protocol`` (``"dd"`` or a :class:`ProtocolDC`);
    ``shuffled``: protocol dd with the S batches in a fresh order every epoch; ``train_on``: the set,
    a random real subset of its size (``random``) or the whole training split (``full``; protocol dc);
    ``hard_labels``: train on the images' hard labels even where the set has learned ones."""

    nets: int
    protocol: str | ProtocolDC = "dd"
    shuffled: bool = False
    train_on: str = "set"
    hard_labels: bool = False


Predictor = Callable[[EvalJob, list[list[int]]], list[torch.Tensor]]  # chunks of net ids → their predictions


def eval_job(problem: Problem, nets: int, shuffled: bool = False, protocol: ProtocolDC | str | None = None) -> EvalJob:
    """The job for ``nets`` networks: ``protocol`` None means the config's (``dc``: ``--eval-epochs``, DSA
    unless ``--no-dsa``)."""
    c = problem.config
    protocol = c.protocol if protocol is None else protocol
    if protocol == "dc":
        protocol = ProtocolDC(epochs=c.run.eval_epochs, nets=nets,
                              dsa_strategy=None if c.distill.dsa is False else c.distill.dsa_strategy,
                              label_loss=c.run.label_loss)
    if isinstance(protocol, ProtocolDC):
        return EvalJob(protocol.nets, protocol)
    return EvalJob(nets, "dd", shuffled)


def eval_chunks(job: EvalJob, workers: int) -> list[list[int]]:
    """The job's networks in chunks: one per worker (at most :data:`MAX_CHUNK` networks each)."""
    return net_chunks(job.nets, max(workers, math.ceil(job.nets / MAX_CHUNK)))


def random_subset(problem: Problem, d: Distilled) -> Distilled:
    """Random real training images in ``d``'s layout (as many of each class) with ``d``'s labels — hard ones,
    or the same learned labels (the same labels budget); seeded by the evaluation seed alone, so every set
    of a budget meets the same subset."""
    from ddray.core.baselines import random_real
    from ddray.core.inits import EVAL, generator

    c, data = problem.config, problem.data
    steps, n = d.images.shape[:2]
    g = generator(c.run.seed, EVAL, RANDOM_SUBSET_KEY)
    images = random_real(data.x_train, data.y_train, steps, n // data.num_classes, data.num_classes, g)
    meta = {**d.meta, "method": "random-real"}
    return Distilled(images, d.labels, d.lrs, meta, d.init_params, d.zca, d.label_logits)


def predict_nets(problem: Problem, d: Distilled, job: EvalJob, ids: list[int]) -> torch.Tensor:
    """Predictions (len(ids), M) on the test split of held-out networks ``ids`` trained on ``d``
    (or, by ``job.train_on``, on a random subset of its size or the whole training split)."""
    c, data = problem.config, problem.data
    if job.train_on not in TRAIN_ON:
        raise ValueError(f"EvalJob.train_on: {job.train_on!r}; one of {', '.join(TRAIN_ON)}")
    if job.train_on == "full":
        if not isinstance(job.protocol, ProtocolDC):
            raise ValueError("EvalJob: the full training split trains by protocol dc only")
        return predict_protocol_dc(problem.model, data.x_train, data.y_train, data.x_test, job.protocol, c.run.seed,
                                   ids)
    if job.train_on == "random":
        d = random_subset(problem, d)
    labels = d.labels if job.hard_labels else d.train_labels
    if isinstance(job.protocol, ProtocolDC):
        method = METHODS.get(str(d.meta.get("method")))
        lr = float(d.lrs[0]) if method and method.one_learned_step_size else None  # MTT's learned step size
        return predict_protocol_dc(problem.model, d.images, labels, data.x_test, job.protocol, c.run.seed, ids, lr)
    order = shuffled_order(d.steps, d.epochs, c.run.seed) if job.shuffled else None
    return train_predict(problem.model, problem.sampler(for_eval=True), d.images, labels, d.lrs, data.x_test,
                         ids, order)


def evaluate_distilled(problem: Problem, d: Distilled, nets: int, shuffled: bool = False,
                       protocol: ProtocolDC | str | None = None, predictor: Predictor | None = None,
                       workers: int | None = None, train_on: str = "set", hard_labels: bool = False) -> EvalResult:
    """Held-out evaluation of ``d`` over ``nets`` networks (see :func:`eval_job`).

    The networks are trained in chunks, one per worker (``workers``, default the config's
    MAX ``--workers``). ``predictor`` computes the chunks elsewhere (Ray workers); by
    default they are computed here, in the same chunks, so both give the same result.
    ``train_on``, ``hard_labels``: see :class:`EvalJob`.
    """
    job = dataclasses.replace(eval_job(problem, nets, shuffled, protocol), train_on=train_on,
                              hard_labels=hard_labels)
    chunks = eval_chunks(job, workers or problem.config.cluster.max_workers)
    preds = predictor(job, chunks) if predictor else [predict_nets(problem, d, job, ids) for ids in chunks]
    return summarise(torch.cat([p.cpu() for p in preds]), problem.data.y_test.cpu(), problem.attack)


def set_bytes(d: Distilled) -> tuple[int, int]:
    """(the set's size as stored, images and labels together; the labels' part): float32 images, a label per
    image (hard: one int64; learned: a float32 per class)."""
    images = d.images.numel() * d.images.element_size()
    z = d.label_logits
    per_image = d.labels.element_size() if z is None else z.shape[1] * z.element_size()
    labels = d.images.shape[0] * d.images.shape[1] * per_image
    return images + labels, labels


def score_distilled(problem: Problem, d: Distilled, predictor: Predictor | None = None, workers: int | None = None,
                    cache: FullDataCache | None = None) -> Scores:
    """DD-Ranking's scores of ``d`` (:mod:`ddray.evaluation.scores`): the set, a random real subset of its size and the
    full training split, each by protocol dc with and without DSA over the config's held-out networks.

    ``predictor``/``workers``: where the networks train (:func:`evaluate_distilled`); ``cache``: where the
    full split's accuracies are kept (default :func:`full_data_cache`).
    """
    c = problem.config
    nets, lrs = c.run.eval_nets, parse_lrs(c.run.score_lrs)
    method = METHODS.get(str(d.meta.get("method")))
    own_lr = method is not None and method.one_learned_step_size  # MTT trains with its learned step size

    def accuracies(train_on: str, augment: bool, epochs: int | None = None,
                   hard: bool = False) -> tuple[float, list[float]]:
        def train(lr: float | None) -> list[float]:
            protocol = ProtocolDC(epochs=epochs or c.run.eval_epochs, nets=nets, lr=lr or ProtocolDC.lr,
                                  dsa_strategy=c.distill.dsa_strategy if augment else None,
                                  label_loss=c.run.label_loss)
            return evaluate_distilled(problem, d, nets, protocol=protocol, predictor=predictor, workers=workers,
                                      train_on=train_on, hard_labels=hard).accuracies
        if train_on == "set" and own_lr and not hard:
            return float(d.lrs[0]), train(None)
        return best_lr(train, lrs)

    cache = cache or full_data_cache(c)
    key = full_data_key(problem, lrs)
    full = cache.get(key)
    if full is None:
        full = accuracies("full", True, c.run.full_epochs)
        cache.put(key, *full)
    runs = {"syn": accuracies("set", True), "random": accuracies("random", True),
            "syn_no_aug": accuracies("set", False), "random_no_aug": accuracies("random", False)}
    # hard-label recovery: the images with their hard labels (the same run as "syn" for a hard-label set)
    runs["syn_hard"] = accuracies("set", True, hard=True) if d.label_logits is not None else runs["syn"]
    acc = Accuracies(full=full[1], **{k: v[1] for k, v in runs.items()})
    lr = {"full": full[0], **{k: v[0] for k, v in runs.items()}}
    return summarise_scores(acc, lr, *set_bytes(d))


def full_data_key(problem: Problem, lrs: tuple[float, ...]) -> dict[str, Any]:
    """What the full split's accuracies depend on: the data, the model, the protocol, the networks, the seed."""
    c, data = problem.config, problem.data
    return {"data": dataclasses.asdict(c.data) | {"cache_dir": None, "data_cache_mb": None},
            "train_images": len(data.x_train), "shape": list(data.shape), "model": dataclasses.asdict(c.model),
            "protocol": dataclasses.asdict(ProtocolDC(epochs=c.run.full_epochs, nets=c.run.eval_nets,
                                                      dsa_strategy=c.distill.dsa_strategy)),
            "lrs": list(lrs), "seed": c.run.seed}


def full_data_cache(config: Config) -> FullDataCache:
    """``--storage``/full-data when it is a URI (shared by the nodes of a cluster), else the data cache
    directory's full-data/ (``--cache-dir``)."""
    from ddray.data.cache import default_cache_dir
    from ddray.store.storage import is_uri, join

    s = config.run.storage
    if s and is_uri(s):
        return FullDataCache(join(s, "full-data"))
    return FullDataCache(Path(config.data.cache_dir or default_cache_dir()) / "full-data")


_PROBLEMS: dict[tuple[str, str | None, bool], Problem] = {}  # per worker process: data loaded once


def predict_job(d: Distilled, data_root: str | None, job: EvalJob, ids: list[int],
                seed: int | None = None) -> torch.Tensor:
    """:func:`predict_nets` for a set shipped to a Ray worker (its problem is built once per process);
    ``seed``: the evaluation seed, when not the set's own run seed (``ddray compare``)."""
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
    from ddray.inputs.problem import to_distilled

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
