"""``ddray compare``: several sets scored by one protocol, end to end through the CLI on the embedded data.

The CLI tests share one module fixture (two tiny distillations and a baseline, ~60 s of wall time at
load average 5 on the shared 2-core VM) and are marked slow; the helpers' tests are not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ddray.cli import main
from ddray.evaluation.compare import choose_protocol, labels
from ddray.store.artifact import Distilled

TINY = ["--steps", "2", "--epochs", "2", "--ipc", "1", "--iterations", "3", "--nets", "2", "--batch-size", "64",
        "--eval-nets", "2", "--no-scores"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny distilled digits set, its random-real baseline (tracked in MLflow), and a tiny mnist5k set."""
    root = tmp_path_factory.mktemp("compare")
    digits, mnist = root / "digits", root / "mnist5k"
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").create_experiment(
        "ddray", artifact_location=str(root / "artifacts"))  # not ./mlruns, the SQLite store's default
    small = ["--dataset", "digits", "--image-size", "16", "--out", str(digits), *TINY]  # LeNet needs ≥ 16 pixels
    assert main(["distill", "--local", "--no-progress", *small, "--no-tracking"]) == 0
    assert main(["baseline", "--method", "random", *small, "--tracking-uri", f"sqlite:///{root}/mlflow.db"]) == 0
    assert main(["distill", "--local", "--no-progress", "--out", str(mnist), *TINY, "--no-tracking"]) == 0
    return {"digits": digits, "random": digits / "baselines" / "random", "mnist5k": mnist, "root": root}


@pytest.mark.slow  # the sets fixture: three tiny ddray runs, ~60 s on the shared 2-core VM
def test_one_line_per_set_and_a_bar_chart(sets: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "c.png"
    rc, out, _ = run(capsys, "compare", str(sets["digits"]), str(sets["random"]), "--nets", "3", "--png", str(png),
                     "--no-tracking", "--no-scores")
    assert rc == 0
    assert out.startswith("2 sets of digits, protocol dd, 3 held-out networks each (seed 0)")
    assert re.search(r"^set\s+method\s+images\s+test accuracy %\s+n\s+protocol$", out, re.M)
    for path, method in ((sets["digits"], "dd"), (sets["random"], "baseline-random")):
        assert re.search(rf"^{re.escape(str(path))}\s+{method}\s+20\s+\d+\.\d ± \d+\.\d\s+3\s+dd$", out, re.M), out
    from PIL import Image

    assert Image.open(png).size[0] >= 400 and f"bar chart: {png.resolve()}" in out


@pytest.mark.slow  # the sets fixture: three tiny ddray runs, ~60 s on the shared 2-core VM
def test_every_set_scores_what_ddray_evaluate_gives_it(sets: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "compare", str(sets["digits"]), str(sets["random"]), "--nets", "3", "--json",
                     "--png", str(sets["root"] / "c.png"), "--no-tracking", "--no-scores")
    assert rc == 0
    rows = json.loads(out)
    assert [r["method"] for r in rows] == ["dd", "baseline-random"]
    for row, path in zip(rows, (sets["digits"], sets["random"])):
        rc, out, _ = run(capsys, "evaluate", str(path), "--nets", "3", "--json", "--no-tracking", "--no-scores")
        single = json.loads(out)
        assert (row["mean"], row["std"], row["n"], row["protocol"]) == (single["mean"], single["std"], 3, "dd")


@pytest.mark.slow  # the sets fixture: three tiny ddray runs, ~60 s on the shared 2-core VM
def test_the_table_and_chart_carry_the_scores_evaluate_gives(sets: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    quick = ["--nets", "2", "--protocol", "dc", "--epochs", "2", "--full-epochs", "1", "--no-tracking"]
    png = tmp_path / "c.png"
    rc, out, _ = run(capsys, "compare", str(sets["digits"]), str(sets["random"]), *quick, "--png", str(png))
    assert rc == 0
    assert re.search(r"^set\s+method\s+images\s+test accuracy %\s+n\s+protocol\s+HLR\s+IOR\s+LRS\s+ARS\s+bytes$",
                     out, re.M), out
    rc, out, _ = run(capsys, "compare", str(sets["digits"]), str(sets["random"]), *quick, "--json",
                     "--png", str(png))
    rows = json.loads(out)
    for row, path in zip(rows, (sets["digits"], sets["random"])):
        rc, out, _ = run(capsys, "evaluate", str(path), *quick, "--json")
        assert rc == 0 and row["scores"] == json.loads(out)["scores"]
        assert row["scores"]["set_bytes"] == 20 * 16 * 16 * 4 + 20 * 8  # 2 steps × 10 images, 1×16×16
    from PIL import Image

    assert Image.open(png).size[0] >= 800  # two panels: accuracy, and LRS/ARS


@pytest.mark.slow  # the sets fixture: three tiny ddray runs, ~60 s on the shared 2-core VM
def test_runs_uris_and_the_comparison_is_tracked(sets: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{sets['root']}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ddray")
    [baseline] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["ddray.command"] == "baseline"]
    source = f"runs:/{baseline.info.run_id}"
    rc, out, _ = run(capsys, "compare", str(sets["digits"]), source, "--nets", "2", "--png", str(tmp_path / "c.png"),
                     "--tracking-uri", uri, "--no-scores")
    assert rc == 0 and re.search(rf"^{re.escape(source)}\s+baseline-random\s+20\s", out, re.M), out
    [cmp] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["ddray.command"] == "compare"]
    assert cmp.info.status == "FINISHED"
    assert cmp.data.params["compare.protocol"] == "dd" and cmp.data.params["compare.nets"] == "2"
    assert {"set0_acc_mean", "set1_acc_mean", "set0_acc_std"} <= set(cmp.data.metrics)
    assert {f.path for f in client.list_artifacts(cmp.info.run_id)} == {"compare.json", "c.png"}


@pytest.mark.slow  # the sets fixture: three tiny ddray runs, ~60 s on the shared 2-core VM
def test_sets_of_different_data_sets_are_a_one_line_error(sets: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "compare", str(sets["digits"]), str(sets["mnist5k"]), "--no-tracking")
    assert rc == 2 and err.count("\n") == 1
    assert (f"the sets come from different data sets: {sets['digits']} is digits 1×16×16, {sets['mnist5k']} is "
            "mnist5k 1×28×28") in err


def _set(method: str) -> Distilled:
    return Distilled(torch.zeros(1, 10, 1, 8, 8), torch.arange(10), torch.full((1,), 0.01),
                     {"dataset": "digits", "method": method, "config": {"distill": {"method": method}}})


def test_sets_with_different_default_protocols_need_one_chosen() -> None:
    dd, dm = _set("dd"), _set("dm")
    with pytest.raises(ValueError, match=r"^--protocol: the sets are evaluated differently by default "
                                         r"\(dd: a; dc: b\); pass --protocol dd or --protocol dc"):
        choose_protocol(["a", "b"], [dd, dm], None)
    assert choose_protocol(["a", "b"], [dd, dm], "dc") == "dc"
    assert choose_protocol(["a", "b"], [dm, dm], None) == "dc"


def test_chart_labels_tell_sets_of_one_method_apart() -> None:
    runs = ["runs/a/x/distilled", "runs/b/x/distilled", "runs/a/baselines/kmeans"]
    sets = [_set("dd"), _set("dd"), _set("baseline-kmeans")]
    assert labels(runs, sets) == ["dd\na/x/distilled", "dd\nb/x/distilled", "baseline-kmeans"]
