"""Real ``ddray tune`` searches on one local Ray (``ray.init(num_cpus=2)`` shared by the module).

The searches log to a temporary SQLite MLflow store: a search is one parent run with one
nested child run per trial. The CLI search of :func:`cli_search` runs once for the module
and the tests below it each check one part of what it leaves.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from mlflow import MlflowClient
from tune_support import make_store, runs, tiny_spec, write

from ddray.cli import main
from ddray.config import load_config
from ddray.store.artifact import read_distilled
from ddray.tune.search import run_search
from ddray.tune.spec import parse_tune_spec


def test_fresh_search_refuses_an_existing_experiment(tmp_path: Path) -> None:
    spec = parse_tune_spec(tiny_spec(tmp_path), "s.yaml")
    spec.experiment_dir.mkdir(parents=True)
    (spec.experiment_dir / "x").write_text("")
    with pytest.raises(ValueError, match="already exists; continue it with --resume"):
        run_search(spec)


# ----------------------------------------------------------------------------- real searches


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@dataclass(frozen=True)
class Search:
    """What ``ddray tune tiny.yaml`` left: its exit code and stdout, its experiment directory and MLflow store."""

    rc: int
    out: str
    exp: Path
    uri: str

    def line(self, label: str) -> str:
        """The value printed after ``label:`` (e.g. "best config")."""
        m = re.search(rf"^{label}:\s+(.+)$", self.out, re.M)
        assert m is not None, self.out
        return m.group(1)

    def results(self) -> list[dict[str, str]]:
        """results.csv, one dict per trial."""
        with open(self.exp / "results.csv") as f:
            return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cli_search(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Search:
    """The tiny search (ASHA, 2 trials of 4 meta-steps, the reference lr = 0.01 first) through the CLI, once."""
    tmp = tmp_path_factory.mktemp("cli-search")
    uri = make_store(tmp)
    path = write(tmp, tiny_spec(tmp))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["tune", str(path)])
    return Search(rc, out.getvalue(), tmp / "ray" / "tiny", uri)


def test_the_cli_prints_the_table_and_a_ready_to_run_best_config(cli_search: Search) -> None:
    assert cli_search.rc == 0
    assert re.search(r"^trial\s+lr\s+eval_acc_mean\s+at step\s+status$", cli_search.out, re.M)
    best_yaml = Path(cli_search.line("best config").split()[0])
    assert best_yaml == cli_search.exp / "best_config.yaml"
    cfg = load_config(best_yaml)  # ready to run: `ddray distill --config best_config.yaml`
    assert cfg.distill.iterations == 4 and cfg.run.out is None and cfg.run.storage is None
    d = read_distilled(cli_search.line("distilled data"))
    assert d.meta["iterations"] == 4 and d.meta["config"]["distill"]["lr"] == cfg.distill.lr


def test_the_reference_runs_the_whole_budget_and_is_compared_with_the_best(cli_search: Search) -> None:
    rows = cli_search.results()
    [ref] = [r for r in rows if float(r["lr"]) == 0.01]
    assert ref["status"] == "done" and ref["steps_reached"] == "4"  # ReferenceASHA never stops it early
    done = [r for r in rows if r["status"] == "done"]
    best = max(done, key=lambda r: float(r["eval_acc_mean"]))  # the first of equals, as the search picks
    value = {r["trial_id"]: float(r["eval_acc_mean"]) for r in done}
    # Which of these 4-step trials wins is a near tie; the table and the comparison must say which one did.
    ref_line = next(line for line in cli_search.out.splitlines() if line.startswith(ref["trial_id"] + " "))
    comparison = cli_search.line("vs reference")
    if best is ref:
        assert ref_line.startswith(ref["trial_id"] + " *")
        others = [r for r in done if r is not ref]
        expected = (f"the search did not beat the reference (eval_acc_mean {value[ref['trial_id']]:.4f})" if others
                    else f"the reference (eval_acc_mean {value[ref['trial_id']]:.4f}) is the only finished trial")
    else:
        assert ref_line.startswith(ref["trial_id"] + " (ref)")
        expected = (f"best eval_acc_mean {value[best['trial_id']]:.4f} vs reference "
                    f"{value[ref['trial_id']]:.4f} (both after 4 meta-steps)")
    assert comparison.startswith(expected), comparison


def test_one_parent_run_with_a_nested_child_run_per_trial(cli_search: Search) -> None:
    all_runs = runs(cli_search.uri)
    [parent] = [r for r in all_runs if r.data.tags["ddray.command"] == "tune"]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(all_runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    assert parent.data.params["search.lr"] == "loguniform[0.005, 0.05]" and "best_eval_acc_mean" in parent.data.metrics
    assert json.loads((cli_search.exp / "ddray_tune.json").read_text())["parent_run_id"] == parent.info.run_id
    status = {r["trial_id"]: r["status"] for r in cli_search.results()}
    c = MlflowClient(tracking_uri=cli_search.uri)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["ddray.command"] == "trial"
        assert child.data.params["distill.iterations"] == "4"
        last = max(m.step for m in c.get_metric_history(child.info.run_id, "outer_loss"))
        if status[child.data.tags["ddray.trial_id"]] == "done":
            assert last == 4 and "ddray.stopped_early" not in child.data.tags
            assert {f.path for f in c.list_artifacts(child.info.run_id, "distilled")} >= {
                "distilled/data.parquet", "distilled/meta.json"}
        else:  # ASHA stopped it at a rung: the callback closed its run
            assert status[child.data.tags["ddray.trial_id"]] == "stopped"
            assert last < 4 and child.data.tags["ddray.stopped_early"] == "true"
        # the image grid of every evaluation (step 2 of 4), as a plain `ddray distill` logs it
        assert "grids/step-00000002.png" in {f.path for f in c.list_artifacts(child.info.run_id, "grids")}


def test_the_report_is_written_and_logged_to_the_parent_run(cli_search: Search) -> None:
    results = (cli_search.exp / "results.csv").read_text().splitlines()
    assert results[0] == "trial_id,lr,eval_acc_mean,eval_acc_std,metric_step,steps_reached,status"
    assert len(results) == 3
    [parent] = [r for r in runs(cli_search.uri) if r.data.tags["ddray.command"] == "tune"]
    c = MlflowClient(tracking_uri=cli_search.uri)
    assert {f.path for f in c.list_artifacts(parent.info.run_id)} == {"best_config.yaml", "trials.txt",
                                                                      "results.csv", "plots"}
    assert {f.path for f in c.list_artifacts(parent.info.run_id, "plots")} == {
        "plots/eval_acc_mean_vs_lr.png", "plots/learning_curves.png"}
    assert cli_search.line("results").startswith(str(cli_search.exp / "results.csv"))


def test_trials_checkpoint_through_tune(cli_search: Search) -> None:
    # Tune checkpoints every checkpoint_every steps (ray.tune.Checkpoint), each with the ddray checkpoint
    ckpts = sorted(cli_search.exp.glob("*/checkpoint_*/checkpoints/step-*.pt"))
    assert ckpts and all((c.parent.parent / "trial.json").is_file() for c in ckpts)


@pytest.mark.slow  # a search of its own (~1-4 min on 2 busy cores)
def test_resume_restarts_errored_trials(ray_session: None, tmp_path: Path) -> None:
    make_store(tmp_path)
    # The trials need a pretrained pool that does not exist yet: they fail, the search ends with
    # no finished trial; then the pool appears and --resume restarts the errored trial.
    pool = tmp_path / "pool"
    raw = tiny_spec(tmp_path, name="resumable", reference=None, num_samples=1, scheduler="fifo",
                    search={"init_lr": {"choice": [0.02]}})
    raw["fixed"]["distill"].update(init="fixed-pretrained", pretrained=str(pool))
    spec = parse_tune_spec(raw, "r.yaml")
    with pytest.raises(ValueError, match="no trial finished"):
        run_search(spec, verbose=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    [parent] = [r for r in runs(uri) if r.data.tags["ddray.command"] == "tune"]
    assert parent.info.status == "FAILED"

    from ddray.data import load_dataset
    from ddray.inputs.pretrain import pretrain

    pretrain(load_dataset("mnist5k"), "lenet", "xavier", nets=1, epochs=1, out=pool, progress=False)
    summary = run_search(spec, resume=True, verbose=0)
    assert summary.best.status == "done" and summary.best.value is not None
    assert summary.parent_run_id == parent.info.run_id  # the same parent run continues
    after = runs(uri)
    assert [r.info.status for r in after if r.info.run_id == parent.info.run_id] == ["FINISHED"]
    trials = [r for r in after if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert "FAILED" in {r.info.status for r in trials} and "FINISHED" in {r.info.status for r in trials}


@pytest.mark.slow  # a search of its own (~1-4 min on 2 busy cores)
def test_failed_trial_continues_from_its_tune_checkpoint_on_the_ray_driver(ray_session: None,
                                                                          tmp_path: Path) -> None:
    make_store(tmp_path)
    from ray import tune

    def failing_once(params: dict[str, Any], spec: Any, log: Path) -> None:
        """tune_trial whose first attempt dies after meta-step 3 (after the Tune checkpoint of step 2).

        Defined in the test so that Ray pickles it by value.
        """
        import time

        from ddray.distributed.driver import trial_group
        import ddray.tune.trial as dt

        orig = dt.__dict__.setdefault("_orig_run_trial_distillation", dt.run_trial_distillation)

        def run(cfg: Any, tracker: Any, on_step: Any, resume: Any) -> Any:
            attempts = json.loads(log.read_text()) if log.is_file() else []
            attempts.append({"resume": None if resume is None else str(resume), "steps": [],
                             "in_trial_group": trial_group(cfg) is not None})  # the fleet's bundles: the trial's
            log.write_text(json.dumps(attempts))

            def step(s: int, metrics: dict[str, float]) -> None:
                attempts[-1]["steps"].append(s)
                log.write_text(json.dumps(attempts))
                on_step(s, metrics)
                if len(attempts) == 1 and s == 3:
                    # the pipelined last meta-step has written its checkpoint: the retry must ignore it
                    newer = Path(cfg.run.out) / "checkpoints" / "step-00000004.pt"
                    deadline = time.monotonic() + 60
                    while not newer.is_file() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    # checked by the test, not here: an assert failing in a trial is only a failure Tune retries
                    attempts[-1]["newer_checkpoint"] = newer.is_file()
                    log.write_text(json.dumps(attempts))
                    raise RuntimeError("injected trial failure")

            return orig(cfg, tracker, step, resume)

        dt.run_trial_distillation = run
        dt.tune_trial(params, spec)

    spec = parse_tune_spec(tiny_spec(tmp_path, name="retry", reference=None, num_samples=1, scheduler="fifo",
                                     search={"lr": {"choice": [0.01]}}), "r.yaml")
    log = tmp_path / "attempts.json"
    trainable = tune.with_resources(tune.with_parameters(failing_once, spec=spec, log=log),
                                    resources=spec.placement)
    results = tune.Tuner(trainable, param_space=spec.param_space(), run_config=tune.RunConfig(
        name=spec.name, storage_path=str(spec.storage_path), verbose=0,
        failure_config=tune.FailureConfig(max_failures=1))).fit()
    first, second = json.loads(log.read_text())
    assert first == {"resume": None, "steps": [1, 2, 3], "in_trial_group": True, "newer_checkpoint": True}
    assert second["in_trial_group"]
    # Tune restarted the trial from its checkpoint of meta-step 2; the Ray driver continued it from there
    assert second["resume"] is not None and second["steps"] == [3, 4]
    [res] = list(results)
    assert res.error is None and res.metrics["ddray_finished"] and res.metrics["step"] == 4
    assert "eval_acc_mean" in res.metrics


@pytest.mark.slow  # a search of its own (~1-4 min on 2 busy cores)
def test_the_method_is_a_searchable_option(ray_session: None, tmp_path: Path) -> None:
    make_store(tmp_path)
    spec = parse_tune_spec(tiny_spec(
        tmp_path, name="methods", reference=None, scheduler="fifo", num_samples=1,
        fixed={"data": {"dataset": "digits"}, "model": {"model": "convnet", "width": 8},
               "distill": {"method": "dc", "ipc": 1, "iterations": 4, "nets": 1, "real_per_class": 8},
               "run": {"eval_every": 2, "eval_nets": 1, "eval_epochs": 3, "checkpoint_every": 2, "scores": False,
                       "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}},
        search={"method": {"grid": ["dc", "dm"]}}), "m.yaml")
    summary = run_search(spec, verbose=0)
    assert {t.params["method"] for t in summary.rows} == {"dc", "dm"}
    assert all(t.status == "done" and t.value is not None for t in summary.rows)
    for t in summary.rows:
        assert t.distilled_dir is not None
        d = read_distilled(t.distilled_dir)
        assert d.meta["method"] == t.params["method"] and d.meta["eval_protocol"] == "dc"
    trials = [r for r in runs(f"sqlite:///{tmp_path}/mlflow.db") if r.data.tags["ddray.command"] == "trial"]
    assert sorted(r.data.params["distill.method"] for r in trials) == ["dc", "dm"]
