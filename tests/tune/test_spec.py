"""The search file of ``ddray tune`` (:mod:`ddray.tune.spec`): validation, trial counts, trial configs and
placement groups — no Ray cluster started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tune_support import REPO, tiny_spec, write

from ddray.cli import main
from ddray.config import load_config
from ddray.tune.spec import CONFIRM_ABOVE, load_tune_spec, parse_tune_spec


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
    ({"num_samples": 0}, "num_samples: invalid value 0; expected a positive integer"),
    ({"scheduler": "hyperband"}, "scheduler.type: unknown scheduler 'hyperband'"),
    ({"scheduler": {"type": "asha", "grace_period": 100}}, "scheduler.grace_period: 100 exceeds"),
    ({"resources": {"gpus": 1}}, "resources.gpus: unknown key"),
    ({"resources": {"driver_cpus": 0}}, "resources.driver_cpus: invalid value 0; expected a positive number"),
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


def test_a_searched_method_is_checked_against_the_fixed_config(tmp_path: Path) -> None:
    """dm does not take DD's options the fixed config sets: refused before Ray starts, naming the key."""
    with pytest.raises(ValueError, match=r"^bad.yaml: search.method: --steps 2: not available with --method dm"):
        parse_tune_spec(tiny_spec(tmp_path, search={"method": {"grid": ["dd", "dm"]}}), "bad.yaml")
