"""What every ``ddray tune`` search leaves beside its table: ``results.csv`` and plots.

Written to the experiment directory (STORAGE_PATH/NAME) and logged to the search's
MLflow parent run:

* ``results.csv`` — one row per trial: trial id, the searched parameters, the metric (its
  last measured value, and its std over held-out networks where the metric is a mean),
  the meta-step it was measured at, the meta-steps the trial reached, and its status
  (done | stopped | error).
* ``plots/<metric>_vs_<param>.png`` — the metric of the finished trials against each
  searched parameter; one line per value of the other grid axes where there are a few.
* ``plots/heatmap_<a>_<b>.png`` — when the search has two grid axes or more: the metric
  over the first two (averaged over any others and over repeated samples).
* ``plots/learning_curves.png`` — each trial's metric against the meta-step, from the
  results it reported to Tune.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ddray.tune.results import TrialRow, std_column
from ddray.tune.spec import TuneSpec

RESULTS_FILE = "results.csv"
PLOTS_DIR = "plots"
MAX_LINES = 8  # more groups than this in a metric-vs-parameter plot: points instead of lines
MAX_LEGEND = 16  # more trials than this in the learning curves: no legend


def write_results_csv(rows: Sequence[TrialRow], spec: TuneSpec, path: Path) -> Path:
    """One row per trial (see the module docstring); empty cells where a value is missing."""
    keys = list(spec.search)
    std = std_column(spec.metric)
    head = ["trial_id", *keys, spec.metric, *([std] if std else []), "metric_step", "steps_reached", "status"]

    def cell(v: Any) -> Any:
        return "" if v is None else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            w.writerow([r.trial_id, *[cell(r.params.get(k)) for k in keys], cell(r.value),
                        *([cell(r.value_std)] if std else []), cell(r.value_step), cell(r.steps_reached), r.status])
    return path


# ----------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale(metric: str) -> tuple[float, str]:
    """Accuracies and rates are plotted in percent."""
    if metric.startswith(("eval_acc", "eval_shuffled", "attack_rate")):
        return 100.0, f"{metric} (%)"
    return 1.0, metric


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _log_axis(spec: TuneSpec, key: str, values: Sequence[Any]) -> bool:
    if spec.search[key].kind == "loguniform":
        return True
    return _numeric(values) and min(values) > 0 and max(values) >= 10 * min(values)


def _grid_keys(spec: TuneSpec) -> list[str]:
    return [k for k, d in spec.search.items() if d.kind == "grid"]


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _finished(rows: Sequence[TrialRow]) -> list[TrialRow]:
    return [r for r in rows if r.status == "done" and r.value is not None]


def plot_metric_vs_param(rows: Sequence[TrialRow], spec: TuneSpec, key: str, path: Path) -> Path:
    """The finished trials' metric against parameter ``key`` (± std where the metric has one).

    With other grid axes of few combinations, one line per combination (sorted by ``key``);
    otherwise one point per trial.
    """
    plt = _plt()
    scale, ylabel = _scale(spec.metric)
    done = _finished(rows)
    others = [k for k in _grid_keys(spec) if k != key]
    groups: dict[tuple[Any, ...], list[TrialRow]] = defaultdict(list)
    for r in done:
        groups[tuple(r.params.get(k) for k in others)].append(r)
    values: list[Any] = sorted({r.params.get(key) for r in done}, key=lambda v: (str(type(v)), v))
    numeric = _numeric(values)
    pos: dict[Any, float] = {v: (float(v) if numeric else float(i)) for i, v in enumerate(values)}
    lines = 1 <= len(groups) <= MAX_LINES and spec.search[key].kind in ("grid", "choice")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for g, members in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        members = sorted(members, key=lambda r: pos[r.params.get(key)])
        x = [pos[r.params.get(key)] for r in members]
        y = [scale * (r.value or 0.0) for r in members]
        e = [scale * r.value_std if r.value_std is not None else 0.0 for r in members]
        label = ", ".join(f"{k}={_fmt(v)}" for k, v in zip(others, g)) or None
        if lines:
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, label=label)
        else:
            ax.scatter(x, y, s=18, label=label if len(groups) <= MAX_LINES else None)
    if _log_axis(spec, key, values) and numeric:
        ax.set_xscale("log")
    if numeric and spec.search[key].kind in ("grid", "choice"):
        ax.set_xticks([pos[v] for v in values], [_fmt(v) for v in values])
        ax.minorticks_off()
    elif not numeric:
        ax.set_xticks([pos[v] for v in values], [_fmt(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{spec.name}: {spec.metric} against {key} ({len(done)} finished trials)", fontsize=10)
    ax.grid(alpha=0.3)
    if any(label for label in ax.get_legend_handles_labels()[1]):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heatmap_values(rows: Sequence[TrialRow], spec: TuneSpec) -> tuple[str, str, np.ndarray] | None:
    """(a, b, M): the first two grid axes and M[i, j], the finished trials' mean metric at a = aᵢ, b = bⱼ.

    NaN where no trial finished; None when the search has fewer than two grid axes.
    """
    keys = _grid_keys(spec)
    if len(keys) < 2:
        return None
    a, b = keys[0], keys[1]
    av, bv = list(spec.search[a].args), list(spec.search[b].args)
    cells: dict[tuple[Any, Any], list[float]] = defaultdict(list)
    for r in _finished(rows):
        cells[(r.params.get(a), r.params.get(b))].append(float(r.value or 0.0))
    grid = np.full((len(av), len(bv)), np.nan)
    for i, x in enumerate(av):
        for j, y in enumerate(bv):
            if cells.get((x, y)):
                grid[i, j] = float(np.mean(cells[(x, y)]))
    return a, b, grid


def plot_heatmap(rows: Sequence[TrialRow], spec: TuneSpec, path: Path) -> Path | None:
    """The metric over the first two grid axes (rows: the first, columns: the second); None without two."""
    found = heatmap_values(rows, spec)
    if found is None:
        return None
    a, b, values = found
    av, bv = list(spec.search[a].args), list(spec.search[b].args)
    scale, label = _scale(spec.metric)
    grid = scale * values
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * len(bv) + 2.5, 0.7 * len(av) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    finite = grid[np.isfinite(grid)]
    mid = float(np.mean([finite.min(), finite.max()])) if finite.size else 0.0
    for i in range(len(av)):
        for j in range(len(bv)):
            v = grid[i, j]
            ax.text(j, i, "–" if math.isnan(v) else f"{v:.1f}" if scale != 1.0 else f"{v:.3g}", ha="center",
                    va="center", fontsize=9, color="black" if not math.isnan(v) and v > mid else "white")
    ax.set_xticks(range(len(bv)), [_fmt(v) for v in bv])
    ax.set_yticks(range(len(av)), [_fmt(v) for v in av])
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    rest = [k for k in spec.search if k not in (a, b)]
    note = f"mean over {', '.join(rest)}" if rest else ("mean over samples" if spec.num_samples > 1 else "")
    ax.set_title(f"{spec.name}: {label}" + (f"\n({note})" if note else ""), fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curves(rows: Sequence[TrialRow], spec: TuneSpec, path: Path) -> Path:
    """Each trial's metric against the meta-step (every measurement it reported to Tune)."""
    plt = _plt()
    scale, ylabel = _scale(spec.metric)
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    shown = [r for r in rows if r.history]
    cmap = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20" if len(shown) <= 20 else "viridis")
    for i, r in enumerate(shown):
        steps = sorted(r.history)
        label = ", ".join(f"{k}={_fmt(r.params.get(k))}" for k in spec.search) + ("" if r.status == "done"
                                                                                     else f" ({r.status})")
        ax.plot(steps, [scale * r.history[s] for s in steps], marker="o", ms=3, lw=1.2,
                color=cmap(i if len(shown) <= 20 else i / (len(shown) - 1)), ls="-" if r.status == "done" else "--",
                label=label)
    ax.set_xlabel("meta-step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{spec.name}: learning curves ({len(shown)} trials)", fontsize=10)
    ax.grid(alpha=0.3)
    if 0 < len(shown) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(rows: Sequence[TrialRow], spec: TuneSpec, exp_dir: Path) -> list[Path]:
    """results.csv and every plot of the search, in ``exp_dir``; returns the files written."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    files = [write_results_csv(rows, spec, exp_dir / RESULTS_FILE)]
    plots = exp_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    if _finished(rows):
        files += [plot_metric_vs_param(rows, spec, k, plots / f"{spec.metric}_vs_{k}.png") for k in spec.search]
        heat = plot_heatmap(rows, spec, plots / f"heatmap_{'_'.join(_grid_keys(spec)[:2])}.png")
        files += [heat] if heat else []
    if any(r.history for r in rows):
        files.append(plot_learning_curves(rows, spec, plots / "learning_curves.png"))
    return files
