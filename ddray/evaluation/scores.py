"""DD-Ranking's scores: how much a set beats random real images, and how far it is from the real data.

A bare accuracy flatters sets that bring their own evaluation tricks (soft labels,
heavy augmentation): random real images given the same tricks often score nearly as
high. DD-Ranking (Li et al. 2025, arXiv:2505.13300; NUS-HPC-AI-Lab/DD-Ranking) scores a
set against a random real subset of the same size, trained the same way. With test
accuracies as fractions (ddray reports every score ×100, in points):

    HLR  = Acc(real, hard) − Acc(syn, hard)                  hard-label recovery (lower is better)
    IOR  = Acc(syn, any) − Acc(random, any)                  improvement over random (higher is better)
    LRS  = (e^α − e^−1) / (e − e^−1),  α = w·IOR − (1 − w)·HLR          label-robust score, in [0, 1]
    ARS  = (e^β − e^−1) / (e − e^−1),  β = γ·(Acc(syn, aug) − Acc(random, aug))
                                         + (1 − γ)·(Acc(syn, no aug) − Acc(random, no aug))
                                                                         augmentation-robust score

"any" is the set's own evaluation (its labels, its learned step size for MTT), "hard" the
same images with their hard labels, w = γ = ½ as on DD-Ranking's leaderboard. Note:
DD-Ranking's code (``ddranking/metrics/*.py``, 0.2.0) applies the exponential to
differences of accuracies in percent, which its paper and README define on fractions;
ddray follows the paper, so LRS and ARS stay in [0, 1].

Every accuracy comes from the DC line's protocol (:class:`ddray.core.protocol_dc.ProtocolDC`:
the run's ``--eval-epochs`` and ``--eval-nets``, DSA on for "aug", off for "no aug"),
whatever the set's own protocol, so sets of every method are scored alike. The set,
the random subset and the full training split train the same held-out networks (net i
draws its θ₀ from (seed, i)), so the scores are formed net by net and reported as
mean ± std. Each is trained at every learning rate of ``--score-lrs`` and the best
mean test accuracy is kept, as DD-Ranking selects its learning rate (on the test
split; a set with its own learned step size, MTT's, trains with it instead). The full
training split trains for ``--full-epochs`` epochs, and its accuracies are cached per
(data set, model, protocol, seed) (:class:`FullDataCache`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

WEIGHT = 0.5  # w of LRS and γ of ARS, DD-Ranking's leaderboard setting
SCORE_NAMES = ("hlr", "ior", "lrs", "ars")


def _normalised(x: np.ndarray) -> np.ndarray:
    """(e^x − e^−1) / (e − e^−1): [−1, 1] → [0, 1], and 0 → 0.269."""
    return (np.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def label_robust_score(hlr: np.ndarray, ior: np.ndarray, weight: float = WEIGHT) -> np.ndarray:
    """LRS from HLR and IOR (fractions)."""
    return _normalised(weight * np.asarray(ior) - (1 - weight) * np.asarray(hlr))


def augmentation_robust_score(gap_aug: np.ndarray, gap_no_aug: np.ndarray, weight: float = WEIGHT) -> np.ndarray:
    """ARS from the set's lead over random real images with and without augmentation (fractions)."""
    return _normalised(weight * np.asarray(gap_aug) + (1 - weight) * np.asarray(gap_no_aug))


@dataclass(frozen=True)
class Accuracies:
    """Per-network test accuracies (fractions) that the scores are made of, net i of each on the same θ₀."""

    full: Sequence[float]  # the full training split, hard labels
    syn_hard: Sequence[float]  # the set's images with hard labels
    syn: Sequence[float]  # the set as it is meant to be used (its labels)
    random: Sequence[float]  # a random real subset of the same size, the same labels budget
    syn_no_aug: Sequence[float]
    random_no_aug: Sequence[float]


def compute_scores(acc: Accuracies, weight: float = WEIGHT) -> dict[str, np.ndarray]:
    """HLR, IOR, LRS and ARS net by net (fractions), from :class:`Accuracies` of equal length."""
    a = {k: np.asarray(v, dtype=np.float64) for k, v in asdict(acc).items()}
    if len({v.shape for v in a.values()}) != 1:
        raise ValueError(f"compute_scores: accuracies of different lengths {({k: len(v) for k, v in a.items()})}")
    hlr = a["full"] - a["syn_hard"]
    ior = a["syn"] - a["random"]
    return {"hlr": hlr, "ior": ior, "lrs": label_robust_score(hlr, ior, weight),
            "ars": augmentation_robust_score(ior, a["syn_no_aug"] - a["random_no_aug"], weight)}


@dataclass(frozen=True)
class Scores:
    """A set's DD-Ranking scores (fractions; mean and std over the held-out networks) and what they rest on.

    Attributes:
        mean, std: HLR, IOR, LRS, ARS.
        accuracy: mean test accuracy of each :class:`Accuracies` field.
        lr: the learning rate each accuracy was trained with (the best of ``--score-lrs``).
        nets: held-out networks per accuracy.
        set_bytes: the set's size as stored: images (float32) and labels together.
        label_bytes: the labels' part of it (hard: one int64 per image).
    """

    mean: dict[str, float]
    std: dict[str, float]
    accuracy: dict[str, float]
    lr: dict[str, float]
    nets: int
    set_bytes: int
    label_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``score_hlr`` … (points), ``score_acc_full`` …, ``set_bytes``."""
        out = {f"score_{k}": 100 * v for k, v in self.mean.items()}
        out.update({f"score_{k}_std": 100 * v for k, v in self.std.items()})
        out.update({f"score_acc_{k}": v for k, v in self.accuracy.items()})
        out.update(set_bytes=float(self.set_bytes), label_bytes=float(self.label_bytes))
        return out

    def __str__(self) -> str:
        parts = [f"{k.upper()} {100 * self.mean[k]:.1f} ± {100 * self.std[k]:.1f}" for k in SCORE_NAMES]
        return ", ".join(parts) + f" (points; set {self.set_bytes:,} bytes)"


def summarise_scores(acc: Accuracies, lr: dict[str, float], set_bytes: int, label_bytes: int,
                     weight: float = WEIGHT) -> Scores:
    """:class:`Scores` from the per-network accuracies."""
    s = compute_scores(acc, weight)
    return Scores({k: float(v.mean()) for k, v in s.items()}, {k: float(v.std()) for k, v in s.items()},
                  {k: float(np.mean(v)) for k, v in asdict(acc).items()}, lr, len(acc.full), set_bytes, label_bytes)


# ----------------------------------------------------------------------------- learning-rate selection


Trainer = Callable[[float | None], Sequence[float]]  # lr (None: the set's own) → per-network accuracies


def best_lr(train: Trainer, lrs: Sequence[float]) -> tuple[float, list[float]]:
    """The learning rate of ``lrs`` whose networks have the best mean accuracy, and their accuracies
    (the first of equals)."""
    best: tuple[float, list[float]] | None = None
    for lr in lrs:
        acc = list(train(lr))
        if best is None or np.mean(acc) > np.mean(best[1]):
            best = (lr, acc)
    assert best is not None, "best_lr: no learning rates"
    return best


# ----------------------------------------------------------------------------- the full-data cache


@dataclass
class FullDataCache:
    """Accuracies of networks trained on a whole training split, one JSON file per key.

    ``location``: a directory, or a URI (``--storage``'s, so that every node of a cluster
    and every run on it share one entry). A file that cannot be read or written costs a
    retraining, not the run.
    """

    location: str | Path
    hits: int = field(default=0, init=False)

    def path(self, key: dict[str, Any]) -> str | Path:
        from ddray.store.storage import join

        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return join(self.location, f"{digest}.json")

    def get(self, key: dict[str, Any]) -> tuple[float, list[float]] | None:
        """(lr, accuracies) stored for ``key``, or None."""
        from ddray.store.storage import read_text

        try:
            text = read_text(self.path(key), "--storage")
            entry = json.loads(text) if text is not None else None
        except (OSError, ValueError):  # unreadable or half-written: train again
            return None
        if entry is None or entry.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        self.hits += 1
        return float(entry["lr"]), [float(a) for a in entry["accuracies"]]

    def put(self, key: dict[str, Any], lr: float, accuracies: Sequence[float]) -> None:
        from ddray.store.storage import write_text

        entry = {"key": key, "lr": lr, "accuracies": list(accuracies)}
        try:
            write_text(self.path(key), json.dumps(entry, indent=1, default=str), "--storage")
        except (OSError, ValueError) as e:
            import logging

            logging.getLogger("ddray").warning("full-data accuracy not cached at %s: %s", self.location, e)
