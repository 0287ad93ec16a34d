"""Ray Tune searches: the search file's validation (no Ray), then tiny real searches on one local Ray.

The Ray tests share one ``ray.init(num_cpus=2)`` for the module and log to a temporary
SQLite MLflow store: a search is one parent run with one nested child run per trial.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from mlflow import MlflowClient

from ddray.artifact import load_distilled
from ddray.cli import main
from ddray.config import load_config
from ddray.tune import CONFIRM_ABOVE, TrialRow, load_tune_spec, parse_tune_spec, run_search
from ddray.tune_report import heatmap_values, write_report

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(tmp: Path, **changes: Any) -> dict[str, Any]:
    """Two trials of 4 meta-steps each, evaluated (2 nets) and checkpointed every 2."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "storage_path": str(tmp / "ray"),
        "fixed": {"distill": {"steps": 2, "epochs": 1, "ipc": 1, "iterations": 4, "nets": 1, "batch_size": 64},
                  "run": {"eval_every": 2, "eval_nets": 2, "checkpoint_every": 2,
                          "tracking_uri": f"sqlite:///{tmp}/mlflow.db"}},
        "search": {"lr": {"loguniform": [0.005, 0.05]}},
        "reference": {"lr": 0.01},
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "scheduler": {"type": "asha", "grace_period": 2},
        "resources": {"driver_cpus": 0.5, "ps_cpus": 0.25, "cpus_per_worker": 0.25},
    }
    spec.update(changes)
    return spec


def write(tmp: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(spec))
    return p


# ----------------------------------------------------------------------------- the search file


@pytest.mark.parametrize("path", sorted((REPO / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_files_validate(path: Path) -> None:
    spec = load_tune_spec(path)
    assert spec.metric == "eval_acc_mean" and spec.mode == "max"
    if "method" in spec.search:  # the methods search: every method × budget under one evaluation
        assert spec.search["method"].kind == "grid" and spec.fixed.model.model == "convnet"
        assert {spec.trial_config({"method": m}).protocol for m in spec.search["method"].args} == {"dc"}
    elif "study" in path.stem:  # the paper's study: a grid, every point run to the same budget (no early stop)
        assert spec.scheduler.type == "fifo" and spec.reference is None and spec.num_samples == 1
        assert all(d.kind == "grid" for d in spec.search.values()) and spec.trial_count() <= CONFIRM_ABOVE
        assert spec.fixed.data.dataset == "mnist5k" and spec.fixed.distill.init == "random"
    else:  # DD searches around the default config
        assert spec.scheduler.type == "asha"
        assert spec.reference and {"epochs", "lr", "init_lr"} <= set(spec.search)
    assert path.read_text().startswith("#")  # documented at the top


def test_the_study_grids_are_steps_by_epochs_and_images_per_class() -> None:
    study = load_tune_spec(REPO / "tune_configs" / "mnist5k_study.yaml")
    assert list(study.search) == ["steps", "epochs"] and study.trial_count() == 15
    ipc = load_tune_spec(REPO / "tune_configs" / "mnist5k_study_ipc.yaml")
    assert list(ipc.search) == ["ipc"] and ipc.trial_count() == 3
    # the same budget and evaluation in both, so the ipc axis meets the grid at S = 10, E = 3
    assert ipc.trial_config({"ipc": 1}) == study.trial_config({"steps": 10, "epochs": 3})


@pytest.mark.parametrize("changes", [
    {"search": {"steps": {"grid": [1, 2, 5]}, "epochs": {"grid": [1, 2]}}, "reference": None, "num_samples": 1},
    {"search": {"steps": {"grid": [1, 2, 5]}, "epochs": {"grid": [1, 2]}}, "reference": None, "num_samples": 3},
    {"search": {"steps": {"grid": [1, 2, 5]}, "epochs": {"grid": [1, 2]}, "lr": {"loguniform": [0.01, 0.1]}},
     "reference": {"steps": 2, "epochs": 1}, "num_samples": 3},
    {"search": {"steps": {"grid": [1, 2, 5]}, "epochs": {"grid": [1, 2]}}, "reference": {"steps": 5},
     "num_samples": 2},
    {"search": {"lr": {"loguniform": [0.005, 0.05]}, "epochs": {"choice": [1, 2]}}, "reference": {"lr": 0.01},
     "num_samples": 4},
])
def test_trial_count_is_what_ray_runs(tmp_path: Path, changes: dict[str, Any]) -> None:
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = parse_tune_spec(tiny_spec(tmp_path, scheduler="fifo", **changes), "s.yaml")
    searcher = BasicVariantGenerator(points_to_evaluate=[dict(spec.reference)] if spec.reference else None)
    searcher.add_configurations([Experiment("count", run=lambda c: None, config=spec.param_space(),
                                            num_samples=spec.num_samples)])
    trials = 0
    while searcher.next_trial() is not None:
        trials += 1
    assert spec.trial_count() == trials == searcher.total_samples


def test_more_than_50_trials_need_yes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tiny_spec(tmp_path, search={"steps": {"grid": [1, 2, 3, 4, 5, 6]}, "epochs": {"grid": list(range(1, 10))}},
                    reference=None, scheduler="fifo", num_samples=1)
    path = write(tmp_path, big)
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"ddray tune: error: {path}: this search would run 54 trials (more than 50); "
                                     "pass --yes to start it anyway") in err
    assert not (tmp_path / "ray").exists()  # refused before anything started
    # with --yes it goes on (and stops at the next check: this experiment directory is taken)
    (tmp_path / "ray" / "tiny").mkdir(parents=True)
    (tmp_path / "ray" / "tiny" / "x").write_text("")
    assert main(["tune", str(path), "--yes"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: starting a search of 54 trials (4 meta-steps each, fifo scheduler)")
    assert "already exists" in err


def test_report_of_a_two_axis_grid(tmp_path: Path) -> None:
    import csv

    spec = parse_tune_spec(tiny_spec(tmp_path, search={"steps": {"grid": [1, 2]}, "epochs": {"grid": [1, 3]}},
                                     reference=None, scheduler="fifo"), "s.yaml")
    rows = [TrialRow("t0", {"steps": 1, "epochs": 1}, "done", 0.50, 4, {2: 0.4, 4: 0.5}, None, None, 4, 0.05),
            TrialRow("t1", {"steps": 1, "epochs": 3}, "done", 0.60, 4, {2: 0.5, 4: 0.6}, None, None, 4, 0.04),
            TrialRow("t2", {"steps": 2, "epochs": 1}, "done", 0.70, 4, {2: 0.6, 4: 0.7}, None, None, 4, 0.03),
            TrialRow("t3", {"steps": 2, "epochs": 3}, "error", None, None, {}, None, None, None, None)]
    files = write_report(rows, spec, tmp_path / "exp")
    plots = tmp_path / "exp" / "plots"
    assert files == [tmp_path / "exp" / "results.csv", plots / "eval_acc_mean_vs_steps.png",
                     plots / "eval_acc_mean_vs_epochs.png", plots / "heatmap_steps_epochs.png",
                     plots / "learning_curves.png"]
    assert all(f.stat().st_size > 0 for f in files)
    with open(files[0]) as f:
        table = list(csv.reader(f))
    assert table[0] == ["trial_id", "steps", "epochs", "eval_acc_mean", "eval_acc_std", "metric_step",
                        "steps_reached", "status"]
    assert table[1] == ["t0", "1", "1", "0.5", "0.05", "4", "4", "done"]
    assert table[4] == ["t3", "2", "3", "", "", "", "", "error"]
    a, b, m = heatmap_values(rows, spec) or ("", "", None)
    assert (a, b) == ("steps", "epochs") and m is not None
    assert m[0].tolist() == [0.5, 0.6] and m[1, 0] == 0.7 and m[1, 1] != m[1, 1]  # NaN: that trial errored
    one_axis = parse_tune_spec(tiny_spec(tmp_path, reference=None), "s.yaml")
    assert heatmap_values(rows, one_axis) is None


def test_shipped_quick_search_compares_with_the_default_config() -> None:
    spec = load_tune_spec(REPO / "tune_configs" / "mnist5k_quick.yaml")
    ref = spec.trial_config(spec.reference or {})
    default = load_config(None)
    for k in ("init", "steps", "epochs", "ipc", "nets", "batch_size", "outer_lr", "init_lr", "init_images"):
        assert getattr(ref.distill, k) == getattr(default.distill, k), k
    assert (ref.data, ref.model) == (default.data, default.model)


@pytest.mark.parametrize("change, key", [
    ({"serach": {}}, "serach: unknown key"),
    ({"search": {"stepz": {"choice": [1]}}}, "search.stepz: unknown config field"),
    ({"search": {"steps": {"normal": [1, 2]}}}, "search.steps: unknown distribution 'normal'"),
    ({"search": {"steps": {"uniform": [1, 5]}}}, "search.steps: steps takes integers"),
    ({"search": {"steps": {"choice": [0, 5]}}}, "search.steps: --steps: invalid value 0"),
    ({"search": {"lr": {"loguniform": [0, 0.1]}}}, "search.lr: loguniform needs 0 < low"),
    ({"search": {"lr": {"uniform": [0.1, 0.01]}}}, "search.lr: uniform needs [low, high] with low < high"),
    ({"search": {"init": {"choice": ["warm"]}}}, "search.init: --init: invalid value 'warm'"),
    ({"search": {"init": {"randint": [1, 3]}}}, "search.init: init is not numeric"),
    ({"search": {"out": {"choice": ["a"]}}}, "search.out: out is run bookkeeping"),
    ({"search": {"steps": 5}}, "search.steps: expected one distribution"),
    ({"reference": {"stepz": 1}}, "reference.stepz: unknown"),
    ({"metric": "accuracy"}, "metric: unknown metric 'accuracy'"),
    ({"mode": "maximum"}, "mode: invalid value 'maximum'"),
    ({"num_samples": 0}, "num_samples: expected a positive integer"),
    ({"scheduler": "hyperband"}, "scheduler.type: unknown scheduler 'hyperband'"),
    ({"scheduler": {"type": "asha", "grace_period": 100}}, "scheduler.grace_period: 100 exceeds"),
    ({"resources": {"gpus": 1}}, "resources.gpus: unknown key"),
    ({"resources": {"driver_cpus": 0}}, "resources.driver_cpus: expected a positive number"),
    ({"fixed": {"distill": {"stepz": 1}}}, "fixed: config: unknown key distill.stepz"),
    ({"fixed": {"run": {"eval_every": 0}}}, "fixed.run.eval_every: ASHA compares trials on eval_acc_mean"),
])
def test_bad_search_file_is_a_one_line_error_naming_the_key(tmp_path: Path, change: dict[str, Any],
                                                            key: str) -> None:
    spec = tiny_spec(tmp_path, **change)
    with pytest.raises(ValueError) as e:
        parse_tune_spec(spec, "spec.yaml")
    msg = str(e.value)
    assert msg.startswith(f"spec.yaml: {key}") and "\n" not in msg, msg


def test_cli_reports_a_bad_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, tiny_spec(tmp_path, search={"epochs": {"grid": [1, -1]}}))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "search.epochs" in err and "-1" in err


def test_trial_config_and_placement_group(tmp_path: Path) -> None:
    spec = parse_tune_spec(tiny_spec(tmp_path, search={"workers": {"choice": [1, 3]}},
                                     reference=None, scheduler="fifo",
                                     resources={"gpus_per_worker": 1, "cpus_per_worker": 2}), "s.yaml")
    cfg = spec.trial_config({"workers": 3}, tmp_path / "t")
    assert cfg.cluster.workers == 3 and cfg.run.out == str(tmp_path / "t") and cfg.run.storage is None
    assert cfg.run.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    pgf = spec.placement({"workers": 3})
    # bundle 0: the trial driver; then the parameter server; then one bundle per worker
    assert pgf.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] + [{"CPU": 2, "GPU": 1}] * 3
    assert pgf.strategy == "SPREAD"


@pytest.mark.parametrize("workers, shards, gpus", [(1, 1, 0), (3, 2, 0), (2, 1, 0.5)])
def test_trial_group_is_the_layout_the_ray_driver_places_its_fleet_in(tmp_path: Path, workers: int, shards: int,
                                                                     gpus: float) -> None:
    from ddray.distributed.placement import WorkerResources, trial_layout

    spec = parse_tune_spec(tiny_spec(tmp_path, resources={"workers": workers, "cpus_per_worker": 1.5,
                                                          "gpus_per_worker": gpus, "ps_cpus": 0.25},
                                     fixed={"cluster": {"shards": shards}, "run": {"eval_every": 2}}), "s.yaml")
    cfg = spec.trial_config({})
    layout = trial_layout(spec.placement({}).bundles, cfg.cluster.max_workers, cfg.cluster.shards)
    assert layout is not None  # the trial's group is used, not slots of the fleet's own
    assert layout.resources == WorkerResources(1.5, gpus) and layout.ps_cpus == 0.25
    assert [layout.ps_bundle(j) for j in range(shards)] == list(range(1, 1 + shards))
    assert layout.first_worker_bundle == 1 + shards and layout.workers == workers
    assert layout.resources.device == ("cuda" if gpus else "cpu")


def test_asha_never_stops_the_reference_early() -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from ddray.tune import ReferenceASHA

    asha = ReferenceASHA({"lr": 0.01}, time_attr="step", metric="eval_acc_mean", mode="max", max_t=10,
                         grace_period=2, reduction_factor=2)
    good, ref, bad = (SimpleNamespace(trial_id=i, config={"lr": lr}) for i, lr in (("g", 0.05), ("r", 0.01),
                                                                                    ("b", 0.02)))
    for t in (good, ref, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"step": 2, "eval_acc_mean": 0.9}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, ref, {"step": 2, "eval_acc_mean": 0.1}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {"step": 2, "eval_acc_mean": 0.1}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, ref, {"step": 10, "eval_acc_mean": 0.2}) == TrialScheduler.STOP  # budget


def test_comparison_with_the_reference_says_by_how_much(tmp_path: Path) -> None:
    from ddray.tune import TrialRow, _compare

    spec = parse_tune_spec(tiny_spec(tmp_path), "s.yaml")

    def row(i: str, v: float, status: str = "done", step: int = 4) -> TrialRow:
        return TrialRow(i, {}, status, v, step, {2: v - 0.1, step: v}, None, None)

    ref, good, worse = row("ref", 0.70), row("good", 0.74), row("worse", 0.60)
    assert "beats it by 4.0 points" in str(_compare(good, ref, spec, [ref, good]))
    assert "did not beat the reference" in str(_compare(ref, ref, spec, [ref, worse]))
    assert "10.0 points short" in str(_compare(ref, ref, spec, [ref, worse]))
    stopped = row("ref", 0.30, "stopped", 2)
    assert "stopped early" in str(_compare(good, stopped, spec, [stopped, good]))


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


def _store(tmp: Path) -> None:
    """The test's MLflow store, with its artifacts in ``tmp`` too (not in ./mlruns, the SQLite store's default)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    client.create_experiment("ddray", artifact_location=str(tmp / "artifacts"))


def _runs(uri: str) -> list[Any]:
    c = MlflowClient(tracking_uri=uri)
    return c.search_runs([c.get_experiment_by_name("ddray").experiment_id])


def test_search_two_trials_one_parent_and_nested_child_runs(ray_session: None, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path)
    path = write(tmp_path, tiny_spec(tmp_path))
    assert main(["tune", str(path)]) == 0
    out = capsys.readouterr().out
    exp = tmp_path / "ray" / "tiny"
    # the table, the comparison with the reference point, the best config and its distilled data
    assert re.search(r"^trial\s+lr\s+eval_acc_mean\s+at step\s+status$", out, re.M)
    # the reference is marked "(ref)", or it is the best trial ("*") and the comparison says nothing beat it
    # (which trial wins these 4-step runs is a near tie decided by ASHA's arrival order at the rung)
    assert "(ref)" in out or re.search(r"^vs reference:\s+the (reference \(|search did not beat the reference)",
                                       out, re.M)
    assert "vs reference:" in out
    best_yaml = Path(re.search(r"^best config:\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    assert best_yaml == exp / "best_config.yaml"
    cfg = load_config(best_yaml)  # ready to run: `ddray distill --config best_config.yaml`
    assert cfg.distill.iterations == 4 and cfg.run.out is None and cfg.run.storage is None
    distilled = Path(re.search(r"^distilled data:\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    d = load_distilled(distilled)
    assert d.meta["iterations"] == 4 and d.meta["config"]["distill"]["lr"] == cfg.distill.lr

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = _runs(uri)
    [parent] = [r for r in runs if r.data.tags["ddray.command"] == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    assert parent.data.params["search.lr"] == "loguniform[0.005, 0.05]" and "best_eval_acc_mean" in parent.data.metrics
    c = MlflowClient(tracking_uri=uri)
    assert {f.path for f in c.list_artifacts(parent.info.run_id)} == {"best_config.yaml", "trials.txt",
                                                                      "results.csv", "plots"}
    assert {f.path for f in c.list_artifacts(parent.info.run_id, "plots")} == {
        "plots/eval_acc_mean_vs_lr.png", "plots/learning_curves.png"}
    results = (exp / "results.csv").read_text().splitlines()
    assert results[0] == "trial_id,lr,eval_acc_mean,eval_acc_std,metric_step,steps_reached,status"
    assert len(results) == 3 and all(line.endswith((",done", ",stopped")) for line in results[1:])
    assert json.loads((exp / "ddray_tune.json").read_text())["parent_run_id"] == parent.info.run_id
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["ddray.command"] == "trial"
        assert child.data.params["distill.iterations"] == "4"
        steps = [m.step for m in c.get_metric_history(child.info.run_id, "outer_loss")]
        assert sorted(steps)[-1] == 4 or child.data.tags.get("ddray.stopped_early") == "true"
    assert any({f.path for f in c.list_artifacts(ch.info.run_id, "distilled")} >=
               {"distilled/data.parquet", "distilled/meta.json"} for ch in children)
    # the image grid of every evaluation (step 2 of 4), as a plain `ddray distill` logs it
    assert any("grids/step-00000002.png" in {f.path for f in c.list_artifacts(ch.info.run_id, "grids")}
               for ch in children)
    # Tune checkpoints every checkpoint_every steps (ray.tune.Checkpoint), each with the ddray checkpoint
    ckpts = sorted(exp.glob("*/checkpoint_*/checkpoints/step-*.pt"))
    assert ckpts and all((c_.parent.parent / "trial.json").is_file() for c_ in ckpts)


def test_resume_restarts_errored_trials(ray_session: None, tmp_path: Path) -> None:
    _store(tmp_path)
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
    [parent] = [r for r in _runs(uri) if r.data.tags["ddray.command"] == "tune"]
    assert parent.info.status == "FAILED"

    from ddray.data import load_dataset
    from ddray.pretrain import pretrain

    pretrain(load_dataset("mnist5k"), "lenet", "xavier", nets=1, epochs=1, out=pool, progress=False)
    summary = run_search(spec, resume=True, verbose=0)
    assert summary.best.status == "done" and summary.best.value is not None
    assert summary.parent_run_id == parent.info.run_id  # the same parent run continues
    runs = _runs(uri)
    assert [r.info.status for r in runs if r.info.run_id == parent.info.run_id] == ["FINISHED"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert "FAILED" in {r.info.status for r in trials} and "FINISHED" in {r.info.status for r in trials}


def test_failed_trial_continues_from_its_tune_checkpoint_on_the_ray_driver(ray_session: None,
                                                                          tmp_path: Path) -> None:
    _store(tmp_path)
    from ray import tune

    def failing_once(params: dict[str, Any], spec: Any, log: Path) -> None:
        """tune_trial whose first attempt dies after meta-step 3 (after the Tune checkpoint of step 2).

        Defined in the test so that Ray pickles it by value.
        """
        import time

        import ddray.tune as dt
        from ddray.distributed.driver import trial_group

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
                    assert newer.is_file()
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
    assert first == {"resume": None, "steps": [1, 2, 3], "in_trial_group": True}
    assert second["in_trial_group"]
    # Tune restarted the trial from its checkpoint of meta-step 2; the Ray driver continued it from there
    assert second["resume"] is not None and second["steps"] == [3, 4]
    [res] = list(results)
    assert res.error is None and res.metrics["ddray_finished"] and res.metrics["step"] == 4
    assert "eval_acc_mean" in res.metrics


def test_the_method_is_a_searchable_option(ray_session: None, tmp_path: Path) -> None:
    _store(tmp_path)
    spec = parse_tune_spec(tiny_spec(
        tmp_path, name="methods", reference=None, scheduler="fifo", num_samples=1,
        fixed={"data": {"dataset": "digits"}, "model": {"model": "convnet", "width": 8},
               "distill": {"method": "dc", "ipc": 1, "iterations": 4, "nets": 1, "real_per_class": 8},
               "run": {"eval_every": 2, "eval_nets": 1, "eval_epochs": 3, "checkpoint_every": 2,
                       "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}},
        search={"method": {"grid": ["dc", "dm"]}}), "m.yaml")
    summary = run_search(spec, verbose=0)
    assert {t.params["method"] for t in summary.rows} == {"dc", "dm"}
    assert all(t.status == "done" and t.value is not None for t in summary.rows)
    for t in summary.rows:
        assert t.distilled_dir is not None
        d = load_distilled(t.distilled_dir)
        assert d.meta["method"] == t.params["method"] and d.meta["eval_protocol"] == "dc"
    runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert sorted(r.data.params["distill.method"] for r in runs if r.data.tags["ddray.command"] == "trial") == [
        "dc", "dm"]
    with pytest.raises(ValueError, match="search.method"):  # checked against the fixed config before Ray starts
        parse_tune_spec(tiny_spec(tmp_path, search={"method": {"grid": ["dd", "dm"]}}), "bad.yaml")
