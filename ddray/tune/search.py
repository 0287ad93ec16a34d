"""``ddray tune``: Ray Tune searches over distillation settings, from ``tune_configs/*.yaml``.

Each trial is one whole distillation (trial driver + parameter server + workers),
reserved as a placement group whose first bundle is the trial driver's
(:meth:`TuneSpec.placement`). It reports the outer loss every meta-step and the
held-out accuracy every ``eval_every`` steps and at the end (``ray.tune.report``),
and hands its ddray checkpoint to Tune (``ray.tune.Checkpoint``) so that stopped,
failed or interrupted trials continue from it (``Tuner.restore``, ``ddray tune FILE
--resume``). In MLflow the search is one parent run with one nested child run per
trial. At the end: a table of the trials, the best config as a ready-to-run
distill YAML, the best trial's distilled-data directory, and ``results.csv`` with
plots of the metric against the searched parameters (:mod:`ddray.tune_report`).

The search file's format and validation live in :mod:`ddray.tune_config`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import yaml
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ddray.config import FIELD_SECTION, Config
from ddray.storage import (filesystem, has_entries, is_uri, join, read_text, without_directory_markers, write_bytes,
                           write_text)
from ddray.tracking import Tracker, log_final_checkpoint, make_tracker
from ddray.tune_config import CONFIRM_ABOVE, TuneSpec, load_tune_spec, parse_tune_spec
from ddray.tune_report import std_column, write_report

if TYPE_CHECKING:
    from ddray.distill import DistillResult

__all__ = ["CONFIRM_ABOVE", "TuneSpec", "load_tune_spec", "parse_tune_spec", "run_search", "run_trial_distillation",
           "SearchSummary"]

TIME_ATTR = "step"  # the scheduler's clock: meta-steps done
STATE_FILE = "ddray_tune.json"  # in the experiment directory: the MLflow parent run, for --resume
TRIAL_FILE = "trial.json"  # in every trial checkpoint: the trial's MLflow run, for resumed trials
FINISHED = "ddray_finished"  # result key of a trial's last report (Tune reserves "done")


# ----------------------------------------------------------------------------- one trial


def run_trial_distillation(config: Config, tracker: Tracker, on_step: Callable[[int, dict[str, float]], None],
                           resume: str | Path | None) -> "DistillResult":
    """One trial's whole distillation, by the Ray driver.

    This function runs in bundle 0 of the trial's placement group (the trial driver);
    :func:`ddray.distributed.driver.distill_ray` finds the group laid out as
    [driver, PS × shards, worker × workers] (:meth:`TuneSpec.placement`) and puts its
    parameter server(s) and workers into bundles 1… instead of creating a group of its own.
    ``resume``: the trial's run directory holding the checkpoints to continue from.
    """
    from ddray.distributed.driver import distill_ray as run

    return run(config, tracker=tracker, progress=False, resume=resume, on_step=on_step)


def _copy_into(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.is_file():
            shutil.copy2(f, dest / f.name)


def _tune_checkpoint(out: Path, state: dict[str, Any], final: bool = False) -> Any:
    """A ray.tune.Checkpoint of the run directory: newest ddray checkpoint (+ distilled data when final)."""
    from ray import tune

    from ddray.checkpoint import list_checkpoints

    tmp = Path(tempfile.mkdtemp(prefix="ddray-ckpt-"))
    found = [p for p in list_checkpoints(out / "checkpoints") if isinstance(p, Path)]
    if found:
        _copy_into([found[-1], Path(str(found[-1]) + ".sha256")], tmp / "checkpoints")
    _copy_into([out / "config.yaml"], tmp)
    if final:
        _copy_into([out / n for n in ("data.parquet", "meta.json", "init_params.safetensors")], tmp / "distilled")
        _copy_into([out / n for n in ("eval.json", "grid.png", "lrs.png")], tmp)
    (tmp / TRIAL_FILE).write_text(json.dumps(state))
    return tune.Checkpoint.from_directory(str(tmp)), tmp


def tune_trial(params: dict[str, Any], spec: TuneSpec, parent_run_id: str | None = None) -> None:
    """The Tune function trainable: one distillation with ``params`` applied to ``spec.fixed``."""
    from ray import tune

    ctx = tune.get_context()
    out = Path(ctx.get_trial_dir()) / "distill"
    cfg = spec.trial_config(params, out)
    resume, run_id = None, None
    # Checkpoints an earlier attempt left in the trial directory are stale: Tune's checkpoint (or none)
    # says where this attempt starts. (An attempt that failed may have written a newer one with its
    # pipelined last meta-step, which would skip steps Tune redoes; a fresh start with checkpoints
    # present is refused by the Ray driver.)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    restored = tune.get_checkpoint()
    if restored is not None:  # a paused, failed or restored trial: continue from its last checkpoint
        with restored.as_directory() as d:
            state = json.loads((Path(d) / TRIAL_FILE).read_text())
            ckpts = sorted((Path(d) / "checkpoints").glob("step-*"))
            if ckpts:
                _copy_into(ckpts, out / "checkpoints")
                resume = out
            run_id = state.get("mlflow_run_id")
    tracker = make_tracker(cfg, "trial", run_name=ctx.get_trial_name(), parent_run_id=parent_run_id,
                           run_id=run_id, tags={"ddray.trial_id": ctx.get_trial_id()})
    run = getattr(tracker, "run_id", None)  # None for a NullTracker
    state = {"mlflow_run_id": run} if run else {}
    every, iters = cfg.run.checkpoint_every, cfg.distill.iterations

    def on_step(step: int, metrics: dict[str, float]) -> None:
        result = {TIME_ATTR: step, **metrics, **state}
        if step % every == 0 and step < iters:
            ckpt, tmp = _tune_checkpoint(out, {**state, "step": step})
            tune.report(result, checkpoint=ckpt)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tune.report(result)

    completed = False
    try:
        r = run_trial_distillation(cfg, tracker, on_step, resume)
        log_final_checkpoint(tracker, cfg, r.out)
        final: dict[str, Any] = {TIME_ATTR: iters, FINISHED: True, "distilled_dir": str(r.out.resolve()), **state}
        if r.result is not None:
            final.update(eval_acc_mean=r.result.mean, eval_acc_std=r.result.std)
            if r.result.attack_rate_mean is not None:
                final["attack_rate_mean"] = r.result.attack_rate_mean
        if r.shuffled is not None:
            final["eval_shuffled_acc_mean"] = r.shuffled.mean
        completed = True
        tracker.finish("FINISHED")  # before the last report: Tune may end this thread inside it
        ckpt, tmp = _tune_checkpoint(r.out, {**state, "step": iters}, final=True)
        tune.report(final, checkpoint=ckpt)
        shutil.rmtree(tmp, ignore_errors=True)
    except SystemExit:  # Tune stopped the trial inside tune.report (ASHA): a normal, early end
        if not completed:
            tracker.set_tags({"ddray.stopped_early": "true"})
        tracker.finish("FINISHED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise


# ----------------------------------------------------------------------------- the search


def _close_trial_runs_callback(tracking_uri: str | None) -> Any:
    """A Tune callback that ends a trial's MLflow run when Tune stops it (ASHA) or it errors."""
    from ray import tune

    class CloseTrialRuns(tune.Callback):
        def _end(self, trial: Any, status: str) -> None:
            run_id = (trial.last_result or {}).get("mlflow_run_id")
            if not run_id or tracking_uri is None:
                return
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    if status == "FINISHED" and not (trial.last_result or {}).get(FINISHED):
                        client.set_tag(run_id, "ddray.stopped_early", "true")
                    client.set_terminated(run_id, status)
            except Exception:  # bookkeeping only: never break the search over it
                pass

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, "FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, "FAILED")

    return CloseTrialRuns()


class ReferenceASHA(ASHAScheduler):
    """ASHA that never stops the reference trial early.

    The reference (the search file's ``reference`` point) runs the whole budget, so
    the best trial is compared with it at equal meta-steps; its rung results still
    set the bar the other trials must clear.
    """

    def __init__(self, reference: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference = dict(reference or {})

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action: str = super().on_trial_result(tune_controller, trial, result)
        if (action == TrialScheduler.STOP and self.reference and result.get(TIME_ATTR, 0) < self._max_t
                and all(trial.config.get(k) == v for k, v in self.reference.items())):
            return TrialScheduler.CONTINUE
        return action


def _make_scheduler(spec: TuneSpec) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    if spec.scheduler.type == "fifo":
        return FIFOScheduler()
    max_t = spec.max_iterations
    grace = spec.scheduler.grace_period or (spec.fixed.run.eval_every or max(1, max_t // 8))
    return ReferenceASHA(spec.reference, time_attr=TIME_ATTR, max_t=max_t, grace_period=grace,
                         reduction_factor=spec.scheduler.reduction_factor)


@dataclass
class TrialRow:
    """One line of the final table."""

    trial_id: str
    params: dict[str, Any]
    status: str  # done | stopped | error
    value: float | None  # last measured value of the metric
    value_step: int | None
    history: dict[int, float]  # step → metric
    distilled_dir: str | None
    run_id: str | None
    steps_reached: int | None = None  # the last meta-step the trial reported
    value_std: float | None = None  # the metric's std over held-out nets at value_step (metrics *_mean)


@dataclass
class SearchSummary:
    """What ``ddray tune`` prints and writes at the end."""

    rows: list[TrialRow]
    best: TrialRow
    best_config_path: Path  # a local copy (next to trials.txt)
    reference: TrialRow | None
    comparison: str | None
    parent_run_id: str | None
    best_config_location: Path | str | None = None  # where it is stored: STORAGE_PATH/NAME/best_config.yaml
    report: list[Path] = field(default_factory=list)  # results.csv and the plots

    def table(self, metric: str, keys: list[str]) -> str:
        head = ["trial", *keys, metric, "at step", "status"]
        lines = [head]
        for r in self.rows:
            mark = " *" if r is self.best else (" (ref)" if r is self.reference else "")
            val = "-" if r.value is None else f"{r.value:.4f}"
            lines.append([r.trial_id + mark, *[_fmt(r.params.get(k)) for k in keys], val,
                          "-" if r.value_step is None else str(r.value_step), r.status])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _history(df: Any, key: str | None) -> dict[int, float]:
    """step → value of result column ``key`` where it was reported."""
    import pandas as pd

    if key is None or key not in df.columns or TIME_ATTR not in df.columns:
        return {}
    return {int(step): float(val) for step, val in zip(df[TIME_ATTR], df[key])
            if val is not None and not pd.isna(val)}


def _rows(results: Any, spec: TuneSpec) -> list[TrialRow]:
    import pandas as pd

    rows = []
    for res in results:
        m = res.metrics or {}
        df = res.metrics_dataframe if res.metrics_dataframe is not None else pd.DataFrame()
        history = _history(df, spec.metric)
        last = max(history) if history else None
        stds = _history(df, std_column(spec.metric))
        reached = [int(s) for s in df[TIME_ATTR] if not pd.isna(s)] if TIME_ATTR in df.columns else []
        distilled = None
        finished = bool(m.get(FINISHED))
        if finished and res.checkpoint is not None and Path(res.checkpoint.path, "distilled").is_dir():
            distilled = str(Path(res.checkpoint.path, "distilled"))
        elif finished:
            distilled = m.get("distilled_dir")
        status = "error" if res.error else ("done" if finished else "stopped")
        params = {k: v for k, v in (res.config or {}).items() if k in FIELD_SECTION}
        rows.append(TrialRow(str(m.get("trial_id", Path(res.path).name)), params, status,
                             history[last] if last is not None else None, last, history, distilled,
                             m.get("mlflow_run_id"), max(reached) if reached else None,
                             stds.get(last) if last is not None else None))
    return rows


def _compare(best: TrialRow, ref: TrialRow | None, spec: TuneSpec, rows: list[TrialRow]) -> str | None:
    if ref is None or ref.value is None or best.value is None:
        return None
    sign = 1 if spec.mode == "max" else -1
    unit, scale = (" points", 100.0) if spec.metric.startswith(("eval_", "attack")) else ("", 1.0)
    if ref is best:
        others = [r for r in rows if r is not ref and r.status == "done" and r.value is not None]
        if not others:
            return f"the reference ({spec.metric} {ref.value:.4f}) is the only finished trial: nothing beat it"
        runner = max(others, key=lambda r: sign * (r.value or 0.0))
        short = sign * (ref.value - (runner.value or 0.0)) * scale
        return (f"the search did not beat the reference ({spec.metric} {ref.value:.4f}): the best other "
                f"finished trial, {runner.trial_id}, reached {runner.value:.4f}, {short:.1f}{unit} short")
    if ref.status == "done":
        diff = sign * (best.value - ref.value) * scale
        verdict = f"beats it by {diff:.1f}{unit}" if diff > 0 else f"does not beat it: {-diff:.1f}{unit} short"
        return (f"best {spec.metric} {best.value:.4f} vs reference {ref.value:.4f} "
                f"(both after {ref.value_step} meta-steps): {verdict}")
    at = ref.value_step
    best_then = best.history.get(at) if at is not None else None
    then = "" if best_then is None else f"; the best trial had {best_then:.4f} at that step"
    return (f"the reference was stopped early ({ref.status}) with {spec.metric} {ref.value:.4f} at step {at}"
            f"{then}; the best trial reached {best.value:.4f} at step {best.value_step}")


def _is_reference(row: TrialRow, ref: Mapping[str, Any] | None) -> bool:
    return bool(ref) and all(row.params.get(k) == v for k, v in (ref or {}).items())


def write_best_config(spec: TuneSpec, best: TrialRow, path: Path) -> Path:
    """The best trial's full config as a ready-to-run ``ddray distill --config`` YAML."""
    cfg = spec.trial_config(best.params)
    header = (f"# Best trial {best.trial_id} of the Ray Tune search {spec.name!r} ({spec.source}):\n"
              f"#   {spec.metric} = {best.value:.4f} after {best.value_step} meta-steps.\n"
              f"# Searched: {', '.join(f'{k}={_fmt(best.params.get(k))}' for k in spec.search)}.\n"
              f"# Run it:   ddray distill --config {path}\n")
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _tune_storage(spec: TuneSpec) -> tuple[Any, str]:
    """(pyarrow filesystem or None, storage path for Tune): a URI goes through ddray's own S3 settings
    (endpoint, path-style addressing, credentials from the environment: :mod:`ddray.storage`)."""
    if is_uri(spec.storage_path):
        fs, path = filesystem(str(spec.storage_path), "--storage-path")
        return (without_directory_markers(fs) if fs.type_name == "s3" else fs), path
    return None, str(spec.storage_path)


def run_search(spec: TuneSpec, resume: bool | str = False, verbose: int = 1) -> SearchSummary:
    """Run (or with ``resume`` continue) the search; Ray must be initialised by the caller or is started locally.

    ``resume``: True continues the experiment in STORAGE_PATH/NAME (an error if there is none);
    ``"auto"`` continues it if there is one and starts it otherwise (a retried RayJob).
    Writes STORAGE_PATH/NAME/{best_config.yaml, trials.txt, results.csv, plots/} and logs them to the
    MLflow parent run.
    """
    import logging
    import os

    import ray
    from ray import tune

    exp_dir = spec.experiment_dir
    state_path = join(exp_dir, STATE_FILE)
    fs, storage = _tune_storage(spec)
    exp_path = f"{storage}/{spec.name}"
    if resume == "auto":
        resume = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
        if resume:
            print(f"--resume auto: continuing the Tune experiment in {exp_dir}", flush=True)
    if resume:
        if not tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
            raise ValueError(f"--resume: no Tune experiment to continue in {exp_dir}")
        text = read_text(state_path)
        state = json.loads(text) if text else {}
    else:
        if has_entries(exp_dir):
            raise ValueError(f"{spec.source}: name: experiment directory {exp_dir} already exists; continue it "
                             "with --resume, or change name / storage_path")
        state = {}
    if not ray.is_initialized():  # --address / $RAY_ADDRESS, else Ray's own discovery or a new local Ray
        from ddray.tracking import tracking_runtime_env

        address = spec.fixed.cluster.address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, runtime_env=tracking_runtime_env(spec.fixed) or None,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            raise ValueError(f"--address {address or '(local)'}: could not connect to Ray "
                             f"({str(e).splitlines()[0]})") from None

    parent = make_tracker(spec.fixed, "tune", run_name=spec.name, run_id=state.get("parent_run_id"))
    parent_id = getattr(parent, "run_id", None)
    try:
        if parent_id and not state.get("parent_run_id"):
            parent.log_params(spec.params())
        write_text(state_path, json.dumps({"parent_run_id": parent_id, "source": spec.source}))
        # Results carry the metric only when it was measured (eval_every, the end); ASHA
        # skips the others, and Tune's strict check would reject them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # The reference point may set keys that are fixed for the other trials; Tune warns about that.
        logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
        trainable = tune.with_resources(tune.with_parameters(tune_trial, spec=spec, parent_run_id=parent_id),
                                        resources=spec.placement)
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True,
                                       storage_filesystem=fs)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            searcher = BasicVariantGenerator(points_to_evaluate=[dict(spec.reference)] if spec.reference else None,
                                             random_state=spec.fixed.run.seed)  # the same file → the same trials
            tuner = tune.Tuner(
                trainable,
                param_space=spec.param_space(),
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                            scheduler=_make_scheduler(spec), search_alg=searcher,
                                            max_concurrent_trials=spec.max_concurrent_trials),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=storage, storage_filesystem=fs, verbose=verbose,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=1),
                    callbacks=[_close_trial_runs_callback(spec.fixed.run.tracking_uri
                                                          if parent_id else None)]))
        results = tuner.fit()
        summary = summarize(results, spec, parent_id)
        for name, value in (("best_" + spec.metric, summary.best.value),):
            if value is not None:
                parent.log_metrics({name: value}, step=summary.best.value_step or 0)
        parent.set_tags({"ddray.best_trial": summary.best.trial_id,
                         **({"ddray.best_run_id": summary.best.run_id} if summary.best.run_id else {})})
        parent.log_artifact(summary.best_config_path)
        parent.log_artifact(summary.best_config_path.parent / "trials.txt")
        for f in summary.report:
            parent.log_artifact(f, None if f.parent == summary.best_config_path.parent else f.parent.name)
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED")
    return summary


def summarize(results: Any, spec: TuneSpec, parent_run_id: str | None = None) -> SearchSummary:
    """The trial table, results.csv and plots, the best (finished) trial, its config file and the reference
    comparison, in STORAGE_PATH/NAME (written locally first when that is a URI, then stored there). The
    report is written even when no trial finished (then a ValueError follows)."""
    rows = _rows(results, spec)
    exp_dir = spec.experiment_dir
    local = Path(tempfile.mkdtemp(prefix="ddray-tune-")) if is_uri(exp_dir) else Path(exp_dir)
    report = write_report(rows, spec, local)
    done = [r for r in rows if r.status == "done" and r.value is not None]
    if not done:
        _store(local, report, exp_dir)
        errors = [str(res.error).splitlines()[0] for res in results if res.error]
        raise ValueError(f"{spec.source}: no trial finished" + (f" (first error: {errors[0]})" if errors else ""))
    pick = max if spec.mode == "max" else min
    best = pick(done, key=lambda r: r.value if r.value is not None else -math.inf)
    ref = next((r for r in rows if _is_reference(r, spec.reference)), None)
    best_path = write_best_config(spec, best, local / "best_config.yaml")
    summary = SearchSummary(rows, best, best_path, ref, _compare(best, ref, spec, rows), parent_run_id,
                            join(exp_dir, "best_config.yaml"), report)
    (local / "trials.txt").write_text(summary.table(spec.metric, list(spec.search)) + "\n")
    _store(local, [best_path, local / "trials.txt", *report], exp_dir)
    return summary


def _store(local: Path, files: list[Path], exp_dir: Path | str) -> None:
    """The stored copies of files written in ``local``, next to Tune's results (when those are at a URI)."""
    if is_uri(exp_dir):
        for f in files:
            write_bytes(join(exp_dir, str(f.relative_to(local))), f.read_bytes())
