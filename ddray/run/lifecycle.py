"""A run's lifecycle, shared by the single-process loop (:mod:`ddray.run.loop`) and the Ray driver
(:mod:`ddray.distributed.driver`): where its files go (run directory, checkpoint location), which state it
starts from (fresh, ``--resume DIR``, ``--resume auto``), and how it ends (artifact, evaluation and scores,
tracking, publishing to a URI ``--storage``). Neither loop imports the other's helpers; both import these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ddray.config import Config
from ddray.core.protocol_dd import EvalResult
from ddray.core.synthetic import SyntheticSet, class_labels
from ddray.evaluation.held_out import Predictor, evaluate_distilled, score_distilled
from ddray.evaluation.scores import Scores
from ddray.inputs.problem import Problem, to_distilled
from ddray.run.state import RunState, load_state, resume_differences
from ddray.store.artifact import Distilled, save_distilled
from ddray.store.checkpoint import is_uri, list_checkpoints
from ddray.tracking.tracker import Tracker

CKPT_DIR = "checkpoints"
AUTO = "auto"  # --resume auto: continue OUT's run if it has one, else start fresh
log = logging.getLogger("ddray")


def default_out() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def synthetic(problem: Problem, state: RunState) -> SyntheticSet:
    """The synthetic set of ``state`` (copies of its tensors) with the run's labels: its learned ones, or the
    hard class labels."""
    d = problem.config.distill
    labels = state.labels.clone() if state.labels is not None else class_labels(problem.data.num_classes, d.ipc)
    return SyntheticSet(state.images.clone(), labels, state.raw_lrs.clone(), d.layout[1])


@dataclass
class DistillResult:
    """Where the artifact went, the learned set and its evaluation."""

    out: Path
    distilled: Distilled
    result: EvalResult | None
    shuffled: EvalResult | None
    seconds_per_step: float
    baselines: list[tuple[str, EvalResult]] | None = None  # with ``baselines=True``: (method, result)
    scores: Scores | None = None  # DD-Ranking's, unless --no-scores


# ----------------------------------------------------------------------------- where a run lives


def run_dir(config: Config, resume: str | Path | None) -> Path:
    """OUT: ``--resume DIR``'s directory, else ``--out`` (required by ``--resume auto``), else runs/<time>."""
    if resume is not None and str(resume) != AUTO:
        return Path(resume)
    if resume is not None and not config.run.out:
        raise ValueError("--resume auto: needs --out DIR, a path that stays the same when the run is retried")
    return Path(config.run.out or default_out())


def checkpoint_location(config: Config, out: Path) -> str:
    """Where checkpoints go: ``--storage`` (a URI as given, a path made absolute) or OUT/checkpoints."""
    s = config.run.storage
    if s and is_uri(s):
        return s
    return str(Path(s).resolve() if s else (out / CKPT_DIR).resolve())


def start_state(problem: Problem, config: Config, storage: str, resume: str | Path | None) -> RunState:
    """The state the run starts from; ValueError (one line) before anything is written.

    ``resume`` None: a fresh run (refused if ``storage`` already holds one); a directory:
    continue its newest checkpoint; ``auto``: continue if ``storage`` holds a checkpoint of
    the same config, start fresh if it holds none, refuse a different config.
    """
    iters = config.distill.iterations
    if resume is None:
        if list_checkpoints(storage):
            raise ValueError(f"--storage {storage}: already holds checkpoints of a run; continue it with "
                             f"--resume (or --resume auto), or choose a new --out/--storage")
        return RunState.initial(problem)
    saved = load_state(storage)
    auto = str(resume) == AUTO
    if saved is None:
        if not auto:
            raise ValueError(f"--resume: no valid checkpoint in {storage}")
        log.info("--resume auto: no checkpoint in %s; starting a fresh run", storage)
        return RunState.initial(problem)
    diff = resume_differences(saved.config, config)
    if diff and auto:
        key = diff[0]
        old, new = saved.config.flat()[key], config.flat()[key]
        raise ValueError(f"--resume auto: {storage} holds a run of a different config (first difference: {key} "
                         f"= {old!r} there, {new!r} now); choose another --out/--storage to start a new run")
    if diff:
        raise ValueError(f"--resume: checkpoint in {storage} comes from an incompatible config "
                         f"(differs in {', '.join(diff)})")
    if saved.step > iters:
        raise ValueError(f"--iterations: invalid value {iters}; the checkpoint in {storage} already has "
                         f"{saved.step} meta-steps (--iterations is the run's total)")
    log.info("continuing the run in %s from its checkpoint at meta-step %d of %d", storage, saved.step, iters)
    return dataclasses.replace(saved, config=config)


RUN_FILES = ("data.parquet", "meta.json", "init_params.safetensors", "eval.json", "grid.png", "lrs.png",
             "config.yaml")  # what a finished run leaves in OUT (and, for a URI --storage, in STORAGE/run/)


def begin(config: Config, out: Path, tracker: Tracker) -> None:
    """Write the run's config into OUT and the tracker (once the run is sure to start)."""
    out.mkdir(parents=True, exist_ok=True)
    config.dump(out / "config.yaml")
    tracker.log_params(config.flat())


def publish(out: Path, storage: str) -> None:
    """With ``--storage`` a URI (e.g. S3) OUT may be a pod's scratch disk: copy the finished run's files
    (artifact, evaluation, plots, config) to STORAGE/run/, beside the checkpoints, where every retry and
    every user finds them."""
    if not is_uri(storage):
        return
    from ddray.store.storage import join, write_bytes

    for name in RUN_FILES:
        if (out / name).is_file():
            write_bytes(join(join(storage, "run"), name), (out / name).read_bytes(), "--storage")


def evaluate_snapshot(problem: Problem, snapshot: Distilled, out: Path, tracker: Tracker, step: int,
                      predictor: Predictor | None = None) -> dict[str, float]:
    """``--eval-every``: held-out accuracy of the set after ``step`` meta-steps (and its image grid)."""
    r = evaluate_distilled(problem, snapshot, problem.config.run.eval_nets, predictor=predictor)
    log_eval_grid(tracker, snapshot, out, step)
    return {"eval_acc_mean": r.mean, "eval_acc_std": r.std}


def log_eval_grid(tracker: Tracker, distilled: Distilled, out: str | Path, step: int) -> Path:
    """Write the image grid at meta-step ``step`` to OUT/grids/ and log it under ``grids/``."""
    from ddray.evaluation.viz import save_grid

    d = Path(out) / "grids"
    d.mkdir(parents=True, exist_ok=True)
    png = save_grid(distilled, d / f"step-{step:08d}.png")
    tracker.log_artifact(png, "grids")
    return png


def finish(problem: Problem, syn: SyntheticSet, iterations: int, out: Path, tracker: Tracker,
           seconds_per_step: float, predictor: Predictor | None = None) -> DistillResult:
    """Write the artifact, evaluate it (schedule order and shuffled) and score it (:mod:`ddray.evaluation.scores`),
    log everything.

    ``predictor``: where the held-out networks are trained (Ray workers); default here.
    """
    d = to_distilled(problem, syn, iterations)
    save_distilled(out, d)
    nets = problem.config.run.eval_nets
    result = evaluate_distilled(problem, d, nets, predictor=predictor)
    # the order of the S batches matters to DD's own schedule only
    shuffled = (evaluate_distilled(problem, d, nets, shuffled=True, predictor=predictor)
                if problem.config.protocol == "dd" else None)
    scores = score_distilled(problem, d, predictor) if problem.config.run.scores else None
    report = {"test": result.to_dict(), "shuffled_order": shuffled and shuffled.to_dict(),
              "protocol": problem.config.protocol, "iterations": iterations, "seconds_per_step": seconds_per_step,
              "scores": scores and scores.to_dict()}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    from ddray.evaluation.viz import save_grid, save_lr_plot

    grid, plot = save_grid(d, out / "grid.png"), save_lr_plot(d, out / "lrs.png")
    metrics = {"eval_acc_mean": result.mean, "eval_acc_std": result.std}
    if shuffled is not None:
        metrics["eval_shuffled_acc_mean"] = shuffled.mean
    if result.attack_rate_mean is not None:
        metrics["attack_rate_mean"] = result.attack_rate_mean
    if scores is not None:
        metrics.update(scores.metrics())
    tracker.log_metrics(metrics, step=iterations)
    for name in ("data.parquet", "meta.json", "init_params.safetensors"):
        if (out / name).is_file():
            tracker.log_artifact(out / name, "distilled")
    for path in (grid, plot, out / "eval.json", out / "config.yaml"):
        tracker.log_artifact(path)
    return DistillResult(out, d, result, shuffled, seconds_per_step, scores=scores)
