"""Pictures of a distilled set: a labelled image grid and the learned step-size schedule.

The grid has one column per class, headed by the class's name (``ddray.data.class_names``),
and one block of rows per distill step s, labelled with s and the learned step size it is
trained with in each epoch: step s is used at inner steps s, s + S, …, s + (E − 1)·S, so its
labels are η̃ₛ, η̃ₛ₊ₛ, … (T = S × E step sizes in all). A step with M images per class is a
block of M rows. Large sets are not drawn whole: at most :data:`MAX_ROWS` image rows (a
sample of steps, evenly spaced, first and last included) and :data:`MAX_COLUMNS` classes,
with a note in the picture saying what is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ddray.store.artifact import Distilled

MAX_ROWS = 20  # image rows in one picture
MAX_PER_CLASS = 10  # images of one class shown per step
MAX_COLUMNS = 20  # classes shown
TARGET_PIXELS = 48  # images are scaled up by an integer factor to about this many pixels
MAX_EPOCH_LABELS = 5  # step sizes listed per row; more epochs are elided in the middle


@dataclass(frozen=True)
class GridView:
    """Which part of a set a grid picture shows.

    Attributes:
        steps: the distill steps shown (row blocks), ascending.
        per_class: images of each class shown per step (the first ones).
        classes: the classes shown (columns), ascending.
        note: what was left out, for the picture's footer; None when it shows the whole set.
    """

    steps: tuple[int, ...]
    per_class: int
    classes: tuple[int, ...]
    note: str | None


def grid_view(steps: int, ipc: int, num_classes: int, max_rows: int = MAX_ROWS,
              max_per_class: int = MAX_PER_CLASS, max_columns: int = MAX_COLUMNS) -> GridView:
    """The part of an (S steps × M images per class × C classes) set one picture shows."""
    per_class = min(ipc, max_per_class)
    n_steps = max(1, min(steps, max_rows // per_class))
    shown = tuple(sorted({int(round(v)) for v in np.linspace(0, steps - 1, n_steps)}))
    classes = tuple(range(min(num_classes, max_columns)))
    parts = []
    if len(shown) < steps:
        which = "step 0" if shown == (0,) else "steps " + ", ".join(str(s) for s in shown)
        parts.append(f"{which} of {steps}")
    if per_class < ipc:
        parts.append(f"the first {per_class} of {ipc} images per class")
    if len(classes) < num_classes:
        parts.append(f"classes 0–{len(classes) - 1} of {num_classes}")
    note = f"Large set: showing {'; '.join(parts)}." if parts else None
    return GridView(shown, per_class, classes, note)


def _pixels(d: Distilled) -> torch.Tensor:
    """(S, N, C, H, W) images in [0, 1] (un-whitened with the set's ZCA, if any; un-normalised with its mean/std)."""
    mean = torch.tensor(d.meta.get("mean", [0.0]), dtype=torch.float32).view(1, 1, -1, 1, 1)
    std = torch.tensor(d.meta.get("std", [1.0]), dtype=torch.float32).view(1, 1, -1, 1, 1)
    x = d.images.detach().float()
    if d.zca is not None:
        x = d.zca.invert(x)
    return (x * std + mean).clamp(0, 1)


def images_per_class(d: Distilled) -> int:
    """M: the largest number of images any one class has in a step."""
    counts = torch.bincount(d.labels)
    return int(counts.max()) if counts.numel() else 0


def grid_array(d: Distilled, view: GridView, pad: int = 2, gap: int = 4) -> np.ndarray:
    """(H', W', C) float grid in [0, 1] of ``view``: one column per class, ``per_class`` rows per step.

    ``pad`` pixels of white between images, ``gap`` more between the row blocks of two steps.
    A class with fewer images than ``per_class`` in a step leaves its cells white.
    """
    x = _pixels(d)
    _, _, c, h, w = x.shape
    rows = len(view.steps) * view.per_class
    height = rows * (h + pad) + pad + gap * (len(view.steps) - 1)
    out = np.ones((height, len(view.classes) * (w + pad) + pad, c), dtype=np.float32)
    for b, s in enumerate(view.steps):
        for j, cls in enumerate(view.classes):
            idx = torch.nonzero(d.labels == cls).flatten()[:view.per_class]
            for k, i in enumerate(idx.tolist()):
                y0 = pad + (b * view.per_class + k) * (h + pad) + b * gap
                x0 = pad + j * (w + pad)
                out[y0:y0 + h, x0:x0 + w] = x[s, i].permute(1, 2, 0).numpy()
    return out


def shows_step_sizes(meta: dict[str, Any]) -> bool:
    """Whether the set's own step sizes train on it: DD and MTT sets, and baselines under protocol dd."""
    from ddray.methods import METHODS

    method = str(meta.get("method", "dd"))
    if method in METHODS:
        return METHODS[method].learns_lrs
    return str(meta.get("eval_protocol", "dd")) == "dd"


def step_sizes(d: Distilled, step: int) -> list[float]:
    """The step sizes distill step ``step`` is trained with, one per epoch: η̃[step + e·S], e = 0‥E−1."""
    lrs = d.lrs.tolist()
    return [float(v) for v in lrs[step::d.steps]]


def _fmt_lrs(values: list[float]) -> str:
    shown = [f"{v:.3g}" for v in values]
    if len(shown) > MAX_EPOCH_LABELS:
        shown = shown[:MAX_EPOCH_LABELS - 2] + ["…", shown[-1]]
    return ", ".join(shown)


def row_label(d: Distilled, step: int, with_lrs: bool) -> str:
    """``step s`` and, when the step sizes vary, ``η̃ a, b, c`` (one per epoch)."""
    label = f"step {step}"
    if with_lrs:
        label += f"\nη̃ {_fmt_lrs(step_sizes(d, step))}"
    return label


def _uniform(lrs: torch.Tensor) -> bool:
    return lrs.numel() > 0 and bool(torch.allclose(lrs, lrs[0].expand_as(lrs), rtol=1e-6, atol=0.0))


def grid_title(d: Distilled, ipc: int) -> str:
    """What the set is: data set, method, S × E × M, meta-steps, and how its step sizes are labelled."""
    m = d.meta
    s, e, t = d.steps, d.epochs, len(d.lrs)
    layout = f"{s} step{'s' * (s != 1)} × {e} epoch{'s' * (e != 1)} × " if t > 1 else ""
    steps_done = int(m.get("iterations") or 0)
    head = (f"{m.get('dataset', '?')} · {m.get('method', 'dd')} · {layout}{ipc} image{'s' * (ipc != 1)}/class"
            + (f" · {steps_done} meta-steps" if steps_done else ""))
    if not shows_step_sizes(m):
        return head
    if _uniform(d.lrs):
        return head + f"\nstep size {float(d.lrs[0]):.3g}" + (f" at each of the {t} inner steps" if t > 1 else "")
    return head + f"\nrows: step s and its learned step size η̃ in each of the {e} epoch{'s' * (e != 1)}"


def _column_labels(names: list[str], cell_points: float, largest: float = 9.0) -> tuple[list[str], float]:
    """Class names wrapped at spaces, and a font size at which the longest line fits a column."""
    wrapped = [n.replace(" ", "\n") if len(n) * 0.6 * largest > cell_points else n for n in names]
    longest = max((len(line) for n in wrapped for line in n.split("\n")), default=1)
    return wrapped, max(5.0, min(largest, cell_points / (0.6 * longest)))


def grid_figure(d: Distilled, view: GridView | None = None, dpi: int = 100) -> Any:
    """The labelled image grid as a matplotlib Figure (close it after use); ``view`` defaults to :func:`grid_view`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddray.data import class_names

    ipc = images_per_class(d)
    num_classes = int(d.meta.get("classes", int(d.labels.max()) + 1 if d.labels.numel() else 0))
    view = view or grid_view(d.steps, ipc, num_classes)
    pad, gap = 2, 4
    arr = grid_array(d, view, pad, gap)
    _, _, _, h, w = d.images.shape
    scale = max(1, math.ceil(TARGET_PIXELS / max(h, w)))
    fig = plt.figure(figsize=(arr.shape[1] * scale / dpi, arr.shape[0] * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray", vmin=0.0, vmax=1.0,
              interpolation="nearest")
    names = [str(n) for n in d.meta.get("class_names") or class_names(str(d.meta.get("dataset", "")), num_classes)]
    labels, size = _column_labels([names[c] for c in view.classes], (w + pad) * scale * 72 / dpi)
    ax.set_xticks([pad + j * (w + pad) + (w - 1) / 2 for j in range(len(view.classes))], labels, fontsize=size)
    ax.xaxis.tick_top()
    with_lrs = shows_step_sizes(d.meta) and not _uniform(d.lrs)
    block = view.per_class * (h + pad)
    ax.set_yticks([pad + b * (block + gap) + (block - pad - 1) / 2 for b in range(len(view.steps))],
                  [row_label(d, s, with_lrs) for s in view.steps], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(grid_title(d, ipc), fontsize=9, pad=16)
    if view.note:
        ax.text(0.0, -0.02, view.note, transform=ax.transAxes, fontsize=8, va="top", ha="left", style="italic")
    return fig


def save_grid(d: Distilled, path: str | Path, view: GridView | None = None, dpi: int = 100) -> Path:
    """Write the labelled image grid as PNG and return its path.

    Columns are classes (headed by their names), row blocks are distill steps (labelled with
    the step and its learned step size per epoch); ``view`` defaults to :func:`grid_view`.
    """
    import matplotlib.pyplot as plt

    fig = grid_figure(d, view, dpi)
    p = Path(path)
    fig.savefig(p, dpi=dpi, bbox_inches="tight", pad_inches=0.1, facecolor="white")
    plt.close(fig)
    return p


def save_lr_plot(d: Distilled, path: str | Path) -> Path:
    """Plot the learned step sizes η̃ₜ against inner step t (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    lrs = d.lrs.numpy()
    ax.plot(np.arange(len(lrs)), lrs, marker="o", ms=3)
    for e in range(1, d.epochs):
        ax.axvline(e * d.steps - 0.5, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("inner step t (dashed: epoch boundary)")
    ax.set_ylabel("learned step size")
    ax.set_title("learned step-size schedule")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def save_comparison_chart(labels: list[str], means: list[float], stds: list[float], path: str | Path,
                          title: str, scores: Sequence[Any] | None = None) -> Path:
    """Bar chart of test accuracy (%), mean with ± std error bars, one bar per set (PNG); with ``scores``
    (:class:`ddray.evaluation.scores.Scores` per set), a second panel of their LRS and ARS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    panels = 2 if scores else 1
    fig, axes = plt.subplots(1, panels, figsize=(panels * max(5.0, 1.2 * n + 1.5), 4.0), squeeze=False)
    ax = axes[0][0]
    x = np.arange(n)
    m, s = 100 * np.asarray(means), 100 * np.asarray(stds)
    bars = ax.bar(x, m, yerr=s, capsize=4, color="#4c72b0", ecolor="black", alpha=0.9)
    for bar, v, e in zip(bars, m, s):
        ax.text(bar.get_x() + bar.get_width() / 2, v + e + 1.0, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, min(108.0, float(np.max(m + s)) + 12.0) if n else 100.0)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if scores:
        ax2 = axes[0][1]
        for i, (name, colour) in enumerate((("lrs", "#55a868"), ("ars", "#c44e52"))):
            v = [100 * sc.mean[name] for sc in scores]
            e = [100 * sc.std[name] for sc in scores]
            ax2.bar(x + (i - 0.5) * 0.4, v, 0.4, yerr=e, capsize=3, color=colour, label=name.upper())
        ax2.set_xticks(x, labels, fontsize=8)
        ax2.set_ylabel("score (points)")
        ax2.set_ylim(0, 100)
        ax2.set_title("DD-Ranking: label- and augmentation-robust scores", fontsize=9)
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
        ax2.set_axisbelow(True)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
