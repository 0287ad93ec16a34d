"""What a search leaves: the trial rows' report (results.csv, plots), the comparison with the reference,
and the scheduler that never stops the reference early — from hand-made rows, no Ray cluster started."""

from __future__ import annotations

from pathlib import Path

from tune_support import tiny_spec

from ddray.tune.report import heatmap_values, write_report
from ddray.tune.results import TrialRow
from ddray.tune.spec import parse_tune_spec
from ddray.tune.summary import compare_to_reference


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


def test_asha_never_stops_the_reference_early() -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from ddray.tune.search import ReferenceASHA

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
    spec = parse_tune_spec(tiny_spec(tmp_path), "s.yaml")

    def row(i: str, v: float, status: str = "done", step: int = 4) -> TrialRow:
        return TrialRow(i, {}, status, v, step, {2: v - 0.1, step: v}, None, None)

    ref, good, worse = row("ref", 0.70), row("good", 0.74), row("worse", 0.60)
    assert "beats it by 4.0 points" in str(compare_to_reference(good, ref, spec, [ref, good]))
    assert "did not beat the reference" in str(compare_to_reference(ref, ref, spec, [ref, worse]))
    assert "10.0 points short" in str(compare_to_reference(ref, ref, spec, [ref, worse]))
    stopped = row("ref", 0.30, "stopped", 2)
    assert "stopped early" in str(compare_to_reference(good, stopped, spec, [stopped, good]))
