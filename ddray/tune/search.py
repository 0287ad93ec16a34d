"""``ddray tune``: a Ray Tune search over distillation settings, from ``tune_configs/*.yaml``.

:func:`run_search` runs one trial (:mod:`ddray.tune.trial`) per point of the search file's
space (:mod:`ddray.tune.spec`) under ASHA (which never stops the reference point early,
:class:`ReferenceASHA`) or FIFO, and continues an interrupted search (``Tuner.restore``,
``ddray tune FILE --resume``). In MLflow the search is one parent run with one nested
child run per trial. At the end: a table of the trials, the best config as a ready-to-run
distill YAML, the best trial's distilled-data directory, and ``results.csv`` with plots of
the metric against the searched parameters (:mod:`ddray.tune.summary`, :mod:`ddray.tune.report`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ddray.store.storage import filesystem, has_entries, is_uri, join, read_text, without_directory_markers, write_text
from ddray.tracking.tracker import end_run, finishing, make_tracker
from ddray.tune.spec import TuneSpec
from ddray.tune.summary import SearchSummary, summarize
from ddray.tune.trial import FINISHED, STOPPED_EARLY, TIME_ATTR, tune_trial

STATE_FILE = "ddray_tune.json"  # in the experiment directory: the MLflow parent run, for --resume


def _close_trial_runs_callback(tracking_uri: str | None) -> Any:
    """A Tune callback that ends a trial's MLflow run when Tune stops it (ASHA) or it errors
    (:func:`ddray.tracking.tracker.end_run`: the trial's own process could not)."""
    from ray import tune

    class CloseTrialRuns(tune.Callback):
        def _end(self, trial: Any, status: str) -> None:
            last = trial.last_result or {}
            run_id = last.get("mlflow_run_id")
            if not run_id or tracking_uri is None:
                return
            stopped = status == "FINISHED" and not last.get(FINISHED)
            try:
                end_run(tracking_uri, run_id, status, {STOPPED_EARLY: "true"} if stopped else None)
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


def _tune_storage(spec: TuneSpec) -> tuple[Any, str]:
    """(pyarrow filesystem or None, storage path for Tune): a URI goes through ddray's own S3 settings
    (endpoint, path-style addressing, credentials from the environment: :mod:`ddray.store.storage`)."""
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
        from ddray.tracking.tracker import tracking_runtime_env

        address = spec.fixed.cluster.address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, runtime_env=tracking_runtime_env(spec.fixed) or None,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            raise ValueError(f"--address {address or '(local)'}: could not connect to Ray "
                             f"({str(e).splitlines()[0]})") from None

    parent = make_tracker(spec.fixed, "tune", run_name=spec.name, run_id=state.get("parent_run_id"))
    parent_id = getattr(parent, "run_id", None)
    with finishing(parent):
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
            tuner = _new_tuner(spec, trainable, storage, fs, verbose, parent_id is not None)
        summary = summarize(tuner.fit(), spec, parent_id)
        if summary.best.value is not None:
            parent.log_metrics({"best_" + spec.metric: summary.best.value}, step=summary.best.value_step or 0)
        parent.set_tags({"ddray.best_trial": summary.best.trial_id,
                         **({"ddray.best_run_id": summary.best.run_id} if summary.best.run_id else {})})
        parent.log_artifact(summary.best_config_path)
        parent.log_artifact(summary.best_config_path.parent / "trials.txt")
        for f in summary.report:
            parent.log_artifact(f, None if f.parent == summary.best_config_path.parent else f.parent.name)
    return summary


def _new_tuner(spec: TuneSpec, trainable: Any, storage: str, fs: Any, verbose: int, tracked: bool) -> Any:
    """A fresh Tuner: the reference point first, the same trials for the same file (the run seed), and the
    callback that closes trial runs in MLflow when ``tracked``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    searcher = BasicVariantGenerator(points_to_evaluate=[dict(spec.reference)] if spec.reference else None,
                                     random_state=spec.fixed.run.seed)
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=_make_scheduler(spec), search_alg=searcher,
                                    max_concurrent_trials=spec.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage, storage_filesystem=fs, verbose=verbose,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[_close_trial_runs_callback(spec.fixed.run.tracking_uri if tracked else None)]))
