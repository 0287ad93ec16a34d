"""DD-Ranking's scores (ddray/evaluation/scores.py): the formulas by hand, learning-rate selection, the full-data cache,
and the scores of a real set end to end (local; through Ray in tests/distributed/test_ray_driver.py).

The ``ddranking`` package (0.2.0) is not run here: it pins numpy<2 and scipy<1.16 against this project's
numpy 2, needs timm and kornia, and has no cached full-data accuracy for CIFAR-10 — it would train ConvNet-3
on all 50,000 images for 300 epochs per evaluation on this 2-core CPU. Its training loop also differs
from ddray's (its own ConvNet, DataLoader order and seeds), so only its formulas can be compared: the
numbers below are worked by hand from the definitions in its README and ``metrics/*.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddray.config import load_config
from ddray.core.protocol_dc import ProtocolDC
from ddray.evaluation.held_out import (EvalJob, evaluate_distilled, full_data_cache, predict_nets, random_subset,
                                       score_distilled, set_bytes)
from ddray.inputs.problem import build_problem, to_distilled
from ddray.evaluation.scores import (Accuracies, FullDataCache, augmentation_robust_score, best_lr, compute_scores,
                                     label_robust_score)
from ddray.validation import parse_lrs

E, E_1 = math.e, math.exp(-1)


def test_the_scores_of_hand_computed_accuracies() -> None:
    # full 90 %, the set 50 % (hard = its own labels), random 30 %; without DSA 45 % against 35 %
    s = compute_scores(Accuracies(full=[0.9], syn_hard=[0.5], syn=[0.5], random=[0.3], syn_no_aug=[0.45],
                                  random_no_aug=[0.35]))
    assert s["hlr"][0] == pytest.approx(0.4) and s["ior"][0] == pytest.approx(0.2)
    # α = ½·0.2 − ½·0.4 = −0.1: (e^−0.1 − e^−1)/(e − e^−1) = (0.904837 − 0.367879)/2.350402
    assert s["lrs"][0] == pytest.approx(0.228454, abs=1e-6)
    # β = ½·0.2 + ½·0.1 = 0.15: (1.161834 − 0.367879)/2.350402
    assert s["ars"][0] == pytest.approx(0.337795, abs=1e-6)


def test_a_set_worse_than_random_scores_below_an_even_one() -> None:
    s = compute_scores(Accuracies(full=[0.9], syn_hard=[0.2], syn=[0.2], random=[0.3], syn_no_aug=[0.1],
                                  random_no_aug=[0.3]))
    assert s["ior"][0] == pytest.approx(-0.1)
    assert s["lrs"][0] == pytest.approx(0.128676, abs=1e-6)  # α = −0.05 − 0.35 = −0.4
    assert s["ars"][0] == pytest.approx(0.209678, abs=1e-6)  # β = −0.05 − 0.10 = −0.15
    even = (1 - E_1) / (E - E_1)  # α = 0: as good as random and as the full data
    assert float(label_robust_score(np.array(0.0), np.array(0.0))) == pytest.approx(even)
    assert s["lrs"][0] < even and s["ars"][0] < even


def test_the_scores_span_zero_to_one_and_pair_networks() -> None:
    assert float(label_robust_score(np.array(-1.0), np.array(1.0))) == pytest.approx(1.0)  # α = 1
    assert float(label_robust_score(np.array(1.0), np.array(-1.0))) == pytest.approx(0.0)  # α = −1
    assert float(augmentation_robust_score(np.array(-1.0), np.array(-1.0))) == pytest.approx(0.0)
    # net i of each evaluation is paired with net i of the others
    s = compute_scores(Accuracies(full=[0.9, 0.8], syn_hard=[0.5, 0.6], syn=[0.5, 0.6], random=[0.3, 0.5],
                                  syn_no_aug=[0.5, 0.6], random_no_aug=[0.3, 0.5]))
    np.testing.assert_allclose(s["hlr"], [0.4, 0.2])
    np.testing.assert_allclose(s["ior"], [0.2, 0.1])
    with pytest.raises(ValueError, match="different lengths"):
        compute_scores(Accuracies([0.9], [0.5], [0.5, 0.1], [0.3], [0.5], [0.3]))


def test_the_best_learning_rate_is_kept_and_bad_grids_are_refused() -> None:
    accs = {0.001: [0.2, 0.4], 0.01: [0.5, 0.5], 0.1: [0.5, 0.5]}
    assert best_lr(lambda lr: accs[lr], (0.001, 0.01, 0.1)) == (0.01, [0.5, 0.5])  # the first of equals
    assert parse_lrs("0.001, 0.01") == (0.001, 0.01)
    for bad in ("", "0.01,x", "0", "-0.1", "nan"):
        with pytest.raises(ValueError, match=r"--score-lrs: invalid value"):
            parse_lrs(bad)
    with pytest.raises(ValueError, match="--score-lrs"):
        load_config(None, score_lrs="0.1,-1")
    with pytest.raises(ValueError, match="--full-epochs"):
        load_config(None, full_epochs=0)


# ----------------------------------------------------------------------------- on a real (tiny) set

SMALL = dict(dataset="digits", model="convnet", width=4, method="dm", ipc=2, iterations=1, nets=1,
             eval_nets=2, eval_epochs=3, full_epochs=1, seed=3)


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scores")
    problem = build_problem(load_config(None, cache_dir=str(root / "cache"), **SMALL))
    state_set = to_distilled(problem, problem.initial_synthetic(), 0)
    return {"problem": problem, "set": state_set, "root": root}


class Counting:
    """A predictor that computes here, as the default does, and counts the jobs by what they train on."""

    def __init__(self, problem: Any, d: Any) -> None:
        self.problem, self.d, self.jobs = problem, d, {"set": 0, "random": 0, "full": 0}

    def __call__(self, job: EvalJob, chunks: list[list[int]]) -> list[torch.Tensor]:
        self.jobs[job.train_on] += 1
        return [predict_nets(self.problem, self.d, job, ids) for ids in chunks]


def test_the_full_data_accuracy_is_cached_per_protocol(scored: dict[str, Any]) -> None:
    problem, d, root = scored["problem"], scored["set"], scored["root"]
    cache = FullDataCache(root / "full")
    first = Counting(problem, d)
    a = score_distilled(problem, d, first, cache=cache)
    assert first.jobs["full"] == 1 and cache.hits == 0
    again = Counting(problem, d)
    b = score_distilled(problem, d, again, cache=cache)
    assert again.jobs == {"set": 2, "random": 2, "full": 0} and cache.hits == 1  # a hit: nothing retrained
    assert a == b
    # another protocol for the full split (epochs) is a miss, and so is another DSA strategy
    for change in ({"full_epochs": 2}, {"dsa_strategy": "color_crop"}):
        other = Counting(problem, d)
        p = type(problem)(problem.config.override(**change), problem.data, problem.model, problem.fixed, problem.pool)
        score_distilled(p, d, other, cache=cache)
        assert other.jobs["full"] == 1, change
    assert len(list((root / "full").glob("*.json"))) == 3
    # the default location: the data cache directory (no URI --storage)
    assert full_data_cache(problem.config).location == root / "cache" / "full-data"


def test_the_scores_rest_on_the_evaluations_they_name(scored: dict[str, Any]) -> None:
    problem, d = scored["problem"], scored["set"]
    s = score_distilled(problem, d, cache=FullDataCache(scored["root"] / "full2"))
    c = problem.config

    def acc(train_on: str, strategy: str | None, epochs: int) -> float:
        protocol = ProtocolDC(epochs=epochs, nets=2, dsa_strategy=strategy)
        return evaluate_distilled(problem, d, 2, protocol=protocol, train_on=train_on).mean

    assert s.accuracy["syn"] == pytest.approx(acc("set", c.distill.dsa_strategy, 3), abs=1e-6)
    assert s.accuracy["syn_no_aug"] == pytest.approx(acc("set", None, 3), abs=1e-6)
    assert s.accuracy["random_no_aug"] == pytest.approx(acc("random", None, 3), abs=1e-6)
    assert s.accuracy["full"] == pytest.approx(acc("full", c.distill.dsa_strategy, 1), abs=1e-6)
    assert s.mean["hlr"] == pytest.approx(s.accuracy["full"] - s.accuracy["syn_hard"], abs=1e-6)
    assert s.lr == {k: 0.01 for k in s.lr} and s.nets == 2
    # the random subset: real training images, as many of each class as the set, the same for every set
    r = random_subset(problem, d)
    assert r.images.shape == d.images.shape
    x = problem.data.x_train[:]
    for img in r.images.flatten(0, 1)[:5]:
        assert (x - img).flatten(1).abs().amax(1).min() == 0
    assert torch.equal(random_subset(problem, to_distilled(problem, problem.initial_synthetic(), 0)).images, r.images)
    # bytes: 20 float32 images of 1×8×8 and 20 int64 labels
    assert set_bytes(d) == (20 * 64 * 4 + 20 * 8, 20 * 8) == (s.set_bytes, s.label_bytes)


def test_evaluate_reports_the_scores(scored: dict[str, Any], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ddray.cli import main
    from ddray.store.artifact import save_distilled

    save_distilled(tmp_path / "set", scored["set"])
    argv = ["evaluate", str(tmp_path / "set"), "--nets", "2", "--epochs", "3", "--full-epochs", "1", "--no-progress",
            "--json", "--no-tracking"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["scores"]["mean"]) == {"hlr", "ior", "lrs", "ars"} and out["scores"]["nets"] == 2
    assert out["scores"]["set_bytes"] == 20 * 64 * 4 + 20 * 8
    assert main([*argv, "--no-scores"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scores"] is None


def test_a_learned_label_set_is_scored_on_its_hard_labels_too_and_pays_for_its_labels(
        scored: dict[str, Any], tmp_path: Path) -> None:
    from ddray.core.synthetic import label_logits
    from ddray.store.artifact import read_distilled, save_distilled

    problem, hard = scored["problem"], scored["set"]
    z = label_logits(hard.labels, 10) + torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    soft = to_distilled(problem, problem.initial_synthetic(), 0)
    soft.label_logits = z
    save_distilled(tmp_path / "soft", soft)
    back = read_distilled(tmp_path / "soft")  # the artifact keeps them
    assert back.label_kind == "learned" and torch.equal(back.label_logits, z) and torch.equal(back.labels, hard.labels)
    jobs = Counting(problem, soft)
    s = score_distilled(problem, soft, jobs, cache=FullDataCache(scored["root"] / "full"))
    assert jobs.jobs["set"] == 3  # with, without DSA, and once more on the hard labels
    syn_hard = evaluate_distilled(problem, soft, 2, protocol=ProtocolDC(epochs=3, nets=2), hard_labels=True).mean
    assert s.accuracy["syn_hard"] == pytest.approx(syn_hard, abs=1e-6)
    assert s.label_bytes == 20 * 10 * 4 and s.set_bytes == 20 * 64 * 4 + 20 * 10 * 4
    # the random subset gets the same labels budget: the set's own learned labels
    assert torch.equal(random_subset(problem, soft).label_logits, z)


def test_compare_refuses_mixed_labels_unless_allowed(scored: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ddray.cli import main
    from ddray.core.synthetic import label_logits
    from ddray.store.artifact import save_distilled

    soft = to_distilled(scored["problem"], scored["problem"].initial_synthetic(), 0)
    soft.label_logits = label_logits(soft.labels, 10)
    save_distilled(tmp_path / "soft", soft)
    save_distilled(tmp_path / "hard", scored["set"])
    argv = ["compare", str(tmp_path / "soft"), str(tmp_path / "hard"), "--protocol", "dc", "--nets", "1",
            "--epochs", "1", "--no-scores", "--no-tracking", "--png", str(tmp_path / "c.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "soft" in err[-1] and "unfair" in err[-1] and "--allow-mixed-labels" in err[-1]
    assert main([*argv, "--allow-mixed-labels"]) == 0
