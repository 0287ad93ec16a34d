"""The outer distillation loop: sample θ₀s → meta-gradients → average → apply → checkpoint → log.

:func:`distill` runs it in this process; the Ray drivers in ``ddray/distributed``
swap the meta-gradient stage for worker actors and the apply stage for a
parameter server, around the same objective and optimiser.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ddray import __version__
from ddray.artifact import Distilled, save_distilled
from ddray.checkpoint import load_latest, save_checkpoint
from ddray.config import Config
from ddray.core.evaluate import EvalResult, evaluate_set, shuffled_order
from ddray.core.protocol import ProtocolDC, evaluate_protocol_dc
from ddray.core.synthetic import SyntheticSet
from ddray.problem import Problem, build_problem
from ddray.tracking import NullTracker, Tracker, log_eval_grid

CKPT_DIR = "checkpoints"


def default_out() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def to_distilled(problem: Problem, syn: SyntheticSet, iterations: int) -> Distilled:
    """The synthetic set with everything needed to train on it without ddray."""
    c = problem.config
    meta: dict[str, Any] = {
        "dataset": c.data.dataset, "model": c.model.model, "classes": problem.data.num_classes,
        "mean": list(problem.data.mean), "std": list(problem.data.std),
        "init": {"mode": c.distill.init, "scheme": c.model.init_scheme},
        "iterations": iterations, "method": c.distill.method, "attack": c.distill.attack,
        "dsa_strategy": c.distill.augment, "eval_protocol": c.protocol,
        "seed": c.run.seed, "ddray_version": __version__, "config": c.to_dict(),
    }
    return Distilled(syn.images.detach().clone(), syn.labels.clone(), syn.lrs.detach().clone(), meta,
                     problem.fixed)


def evaluate_distilled(problem: Problem, d: Distilled, nets: int, shuffled: bool = False,
                       protocol: ProtocolDC | str | None = None) -> EvalResult:
    """Held-out evaluation of ``d`` over ``nets`` networks.

    ``protocol``: ``"dd"`` — networks from ``problem``'s init mode trained with the set's
    own schedule (optionally in shuffled batch order); a :class:`ProtocolDC` — the DC
    line's training from scratch; None — the config's protocol (``dc``: ``eval_epochs``
    epochs, DSA unless ``--no-dsa``).
    """
    c = problem.config
    if protocol is None:
        protocol = c.protocol
    if protocol == "dc":
        protocol = ProtocolDC(epochs=c.run.eval_epochs, nets=nets,
                              dsa_strategy=None if c.distill.dsa is False else c.distill.dsa_strategy)
    if isinstance(protocol, ProtocolDC):
        lr = float(d.lrs[0]) if d.meta.get("method") == "mtt" else None  # MTT's learned step size
        return evaluate_protocol_dc(problem.model, d.images, d.labels, problem.data.x_test, problem.data.y_test,
                                    protocol, c.run.seed, lr)
    order = shuffled_order(d.steps, d.epochs, c.run.seed) if shuffled else None
    return evaluate_set(problem.model, problem.sampler(for_eval=True), d.images, d.labels, d.lrs,
                        problem.data.x_test, problem.data.y_test, nets, problem.attack, order)


def problem_for(d: Distilled, data_root: str | None = None) -> Problem:
    """The problem a saved set was made for (its config), with its own θ₀ for fixed-init sets."""
    problem = build_problem(Config.from_dict(d.meta.get("config", {})).override(data_root=data_root))
    if d.init_params is not None:
        problem.fixed = d.init_params
    return problem


@dataclass
class DistillResult:
    """Where the artifact went, the learned set and its evaluation."""

    out: Path
    distilled: Distilled
    result: EvalResult | None
    shuffled: EvalResult | None
    seconds_per_step: float


def check_resumable(saved: dict[str, Any], config: Config, where: Path) -> None:
    """A checkpoint may only continue a run with the same method settings (iterations may grow)."""
    old = Config.from_dict(saved["config"])
    keep = ("data", "model")
    diff = [s for s in keep if getattr(old, s) != getattr(config, s)]
    od, nd = old.distill, config.distill
    diff += [f"distill.{f.name}" for f in fields(od)
             if f.name != "iterations" and getattr(od, f.name) != getattr(nd, f.name)]
    if old.run.seed != config.run.seed:
        diff.append("run.seed")
    if diff:
        raise ValueError(f"--resume: checkpoint in {where} comes from an incompatible config "
                         f"(differs in {', '.join(diff)})")


def distill(config: Config, tracker: Tracker | None = None, progress: bool = True,
            resume: str | Path | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> DistillResult:
    """Distil a data set in this process.

    Args:
        config: the run configuration.
        tracker: receives params, per-step metrics and artifacts (default: none).
        progress: show a progress bar.
        resume: a run directory to continue from its newest valid checkpoint.
        on_step: called with (step, metrics) after each meta-step (e.g. Ray Tune reporting).
    """
    tracker = tracker or NullTracker()
    out = Path(resume) if resume else Path(config.run.out or default_out())
    ckpt_dir = Path(config.run.storage) if config.run.storage else out / CKPT_DIR
    problem = build_problem(config)
    syn = problem.initial_synthetic()
    opt = problem.outer_optimizer(syn)
    start = 0
    if resume:
        saved = load_latest(ckpt_dir)
        if saved is None:
            raise ValueError(f"--resume: no valid checkpoint in {ckpt_dir}")
        check_resumable(saved, config, ckpt_dir)
        syn.images.copy_(saved["images"])
        syn.raw_lrs.copy_(saved["raw_lrs"])
        opt.load_state_dict(saved["optimizer"])
        start = int(saved["step"])
    out.mkdir(parents=True, exist_ok=True)
    config.dump(out / "config.yaml")
    tracker.log_params(config.flat())
    objective = problem.objective()
    nets, iters = config.distill.nets, config.distill.iterations

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_dir, step, {"images": syn.images, "raw_lrs": syn.raw_lrs,
                                         "optimizer": opt.state_dict(), "config": config.to_dict()})

    bar = tqdm(range(start, iters), initial=start, total=iters, desc="distill", disable=not progress,
               unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        # meta-gradients of all K networks, averaged (a worker computes a share of them)
        g = objective(syn.images, syn.raw_lrs, step, list(range(nets)))
        # one Adam step on x̃ and ρ
        opt.apply(g.images / g.nets, g.raw_lrs / g.nets)
        done = step + 1
        if done % config.run.checkpoint_every == 0 or done == iters:
            checkpoint(done)
        lrs = syn.lrs
        metrics = {"outer_loss": g.loss / g.nets, "lr_min": float(lrs.min()), "lr_mean": float(lrs.mean()),
                   "lr_max": float(lrs.max()), "outer_lr": opt.lr,
                   "nets_per_s": nets * (done - start) / (time.perf_counter() - t0)}
        if config.run.eval_every and done % config.run.eval_every == 0 and done < iters:
            snapshot = to_distilled(problem, syn, done)
            r = evaluate_distilled(problem, snapshot, config.run.eval_nets)
            metrics.update(eval_acc_mean=r.mean, eval_acc_std=r.std)
            log_eval_grid(tracker, snapshot, out, done)
        tracker.log_metrics(metrics, step=done)
        if on_step:
            on_step(done, metrics)
        bar.set_postfix(loss=f"{metrics['outer_loss']:.3f}", refresh=False)
    bar.close()
    sec = (time.perf_counter() - t0) / max(1, iters - start)
    return finish(problem, syn, iters, out, tracker, sec)


def finish(problem: Problem, syn: SyntheticSet, iterations: int, out: Path, tracker: Tracker,
           seconds_per_step: float) -> DistillResult:
    """Write the artifact, evaluate it (schedule order and shuffled), log everything."""
    d = to_distilled(problem, syn, iterations)
    save_distilled(out, d)
    nets = problem.config.run.eval_nets
    result = evaluate_distilled(problem, d, nets)
    # the order of the S batches matters to DD's own schedule only
    shuffled = evaluate_distilled(problem, d, nets, shuffled=True) if problem.config.protocol == "dd" else None
    report = {"test": result.to_dict(), "shuffled_order": shuffled and shuffled.to_dict(),
              "protocol": problem.config.protocol, "iterations": iterations, "seconds_per_step": seconds_per_step}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    from ddray.viz import save_grid, save_lr_plot

    grid, plot = save_grid(d, out / "grid.png"), save_lr_plot(d, out / "lrs.png")
    metrics = {"eval_acc_mean": result.mean, "eval_acc_std": result.std}
    if shuffled is not None:
        metrics["eval_shuffled_acc_mean"] = shuffled.mean
    if result.attack_rate_mean is not None:
        metrics["attack_rate_mean"] = result.attack_rate_mean
    tracker.log_metrics(metrics, step=iterations)
    for name in ("data.parquet", "meta.json", "init_params.safetensors"):
        if (out / name).is_file():
            tracker.log_artifact(out / name, "distilled")
    for path in (grid, plot, out / "eval.json", out / "config.yaml"):
        tracker.log_artifact(path)
    return DistillResult(out, d, result, shuffled, seconds_per_step)
