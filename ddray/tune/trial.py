"""One trial of a ``ddray tune`` search: a whole distillation, reporting to Tune and checkpointing through it.

Each trial is one whole distillation (trial driver + parameter server + workers), reserved
as a placement group whose first bundle is the trial driver's (:meth:`TuneSpec.placement
<ddray.tune.spec.TuneSpec.placement>`). It reports the outer loss every meta-step and the
held-out accuracy every ``eval_every`` steps and at the end (``ray.tune.report``), and
hands its ddray checkpoint to Tune (``ray.tune.Checkpoint``) so that a stopped, failed or
interrupted trial continues from it. In MLflow it is a child run of the search's parent run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ddray.config import Config
from ddray.tracking.tracker import Tracker, finishing, log_final_checkpoint, make_tracker
from ddray.tune.spec import TuneSpec

if TYPE_CHECKING:
    from ddray.run.lifecycle import DistillResult

TIME_ATTR = "step"  # the scheduler's clock: meta-steps done
TRIAL_FILE = "trial.json"  # in every trial checkpoint: the trial's MLflow run, for resumed trials
FINISHED = "ddray_finished"  # result key of a trial's last report (Tune reserves "done")
STOPPED_EARLY = "ddray.stopped_early"  # tag of a trial run the scheduler stopped before its last meta-step


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

    from ddray.store.checkpoint import list_checkpoints

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
    with finishing(tracker):  # FINISHED, also when Tune stops the trial early (a clean sys.exit); else FAILED
        try:
            r = run_trial_distillation(cfg, tracker, on_step, resume)
            log_final_checkpoint(tracker, cfg, r.out)
            final: dict[str, Any] = {TIME_ATTR: iters, FINISHED: True, "distilled_dir": str(r.out.resolve()),
                                     **state}
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
                tracker.set_tags({STOPPED_EARLY: "true"})
            raise
