"""The labelled image grid: class names, which part of a large set is shown, step-size labels, the layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddray.data import CLASS_NAMES, DATASETS, class_names, register_dataset
from ddray.evaluation.viz import grid_array, grid_figure, grid_title, grid_view, row_label, save_grid, step_sizes
from ddray.store.artifact import Distilled


def make_set(steps: int, epochs: int, ipc: int, classes: int = 10, shape: tuple[int, int, int] = (1, 28, 28),
             dataset: str = "mnist5k", method: str = "dd", lrs: torch.Tensor | None = None) -> Distilled:
    """Image (s, class c, k-th of its class) is filled with the value (s·100 + c·10 + k) / 10000 (mean 0, std 1)."""
    labels = torch.arange(classes).repeat_interleave(ipc)
    images = torch.empty(steps, len(labels), *shape)
    for s in range(steps):
        for i, c in enumerate(labels.tolist()):
            images[s, i] = (s * 100 + c * 10 + i % ipc) / 10000
    meta = {"dataset": dataset, "method": method, "classes": classes, "mean": [0.0] * shape[0],
            "std": [1.0] * shape[0], "iterations": 7, "eval_protocol": "dd" if method == "dd" else "dc"}
    if lrs is None:
        lrs = 0.01 * torch.arange(1, steps * epochs + 1, dtype=torch.float32)
    return Distilled(images, labels, lrs, meta)


@pytest.mark.parametrize("name, first, last", [
    ("mnist5k", "0", "9"), ("digits", "0", "9"), ("mnist", "0", "9"), ("usps", "0", "9"), ("svhn", "0", "9"),
    ("fashion_mnist", "T-shirt/top", "Ankle boot"), ("cifar10", "airplane", "truck"),
])
def test_every_registered_data_set_has_its_class_names(name: str, first: str, last: str) -> None:
    names = class_names(name, 10)
    assert len(names) == 10 and names[0] == first and names[-1] == last
    assert set(DATASETS) <= set(CLASS_NAMES)


def test_custom_data_sets_register_names_or_are_labelled_by_index() -> None:
    try:
        register_dataset("three", DATASETS["digits"], ["cat", "dog", "fox"])
        assert class_names("three", 3) == ["cat", "dog", "fox"]
        assert class_names("three", 4) == ["0", "1", "2", "3"]  # names that do not fit are not used
        assert class_names("never-registered", 2) == ["0", "1"]
    finally:
        DATASETS.pop("three", None)
        CLASS_NAMES.pop("three", None)


def test_a_small_set_is_shown_whole() -> None:
    v = grid_view(steps=10, ipc=1, num_classes=10)
    assert v.steps == tuple(range(10)) and v.per_class == 1 and v.classes == tuple(range(10)) and v.note is None


@pytest.mark.parametrize("steps, ipc, classes, shown, per_class, note", [
    (30, 2, 10, (0, 3, 6, 10, 13, 16, 19, 23, 26, 29), 2, "Large set: showing steps 0, 3, 6, 10, 13, 16, 19, 23, "
                                                          "26, 29 of 30."),
    (1, 50, 10, (0,), 10, "Large set: showing the first 10 of 50 images per class."),
    (10, 50, 10, (0, 9), 10, "Large set: showing steps 0, 9 of 10; the first 10 of 50 images per class."),
    (2, 1, 30, (0, 1), 1, "Large set: showing classes 0–19 of 30."),
])
def test_a_large_set_is_sampled_with_a_note(steps: int, ipc: int, classes: int, shown: tuple[int, ...],
                                            per_class: int, note: str) -> None:
    v = grid_view(steps, ipc, classes)
    assert v.steps == shown and v.per_class == per_class and v.note == note
    assert len(v.steps) * v.per_class <= 20 and len(v.classes) <= 20
    one = grid_view(steps, ipc, classes, max_rows=per_class)  # room for one step only: the first
    assert one.steps == (0,) and ("step 0 of" in str(one.note)) == (steps > 1)


def test_each_step_is_labelled_with_its_step_size_in_every_epoch() -> None:
    # T = S × E = 2 × 3: step s is used at inner steps s, s + 2, s + 4
    d = make_set(steps=2, epochs=3, ipc=1, lrs=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert step_sizes(d, 0) == pytest.approx([0.1, 0.3, 0.5]) and step_sizes(d, 1) == pytest.approx([0.2, 0.4, 0.6])
    assert row_label(d, 1, with_lrs=True) == "step 1\nη̃ 0.2, 0.4, 0.6"
    assert row_label(d, 1, with_lrs=False) == "step 1"
    many = make_set(steps=1, epochs=8, ipc=1, lrs=torch.arange(1, 9, dtype=torch.float32))
    assert row_label(many, 0, with_lrs=True) == "step 0\nη̃ 1, 2, 3, …, 8"


def test_grid_layout_columns_are_classes_and_row_blocks_are_steps() -> None:
    d = make_set(steps=3, epochs=1, ipc=2, classes=4, shape=(1, 5, 5))
    v = grid_view(3, 2, 4)
    pad, gap = 2, 4
    arr = grid_array(d, v, pad, gap)
    # 3 steps × 2 rows each, 4 class columns of 5-pixel images
    assert arr.shape == (6 * 7 + pad + 2 * gap, 4 * 7 + pad, 1)
    for s in range(3):
        for c in range(4):
            for k in range(2):
                y0, x0 = pad + (2 * s + k) * 7 + s * gap, pad + c * 7
                assert arr[y0 + 2, x0 + 2, 0] == pytest.approx((s * 100 + c * 10 + k) / 10000), (s, c, k)
    assert arr[0, 0, 0] == 1.0  # white padding


def test_the_picture_names_the_classes_and_labels_the_steps() -> None:
    import matplotlib.pyplot as plt

    d = make_set(steps=2, epochs=2, ipc=1, dataset="cifar10", shape=(3, 32, 32),
                 lrs=torch.tensor([0.01, 0.02, 0.03, 0.04]))
    fig = grid_figure(d)
    try:
        [ax] = fig.axes
        assert [t.get_text() for t in ax.get_xticklabels()] == class_names("cifar10", 10)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["step 0\nη̃ 0.01, 0.03", "step 1\nη̃ 0.02, 0.04"]
        assert ax.get_title() == ("cifar10 · dd · 2 steps × 2 epochs × 1 image/class · 7 meta-steps\n"
                                  "rows: step s and its learned step size η̃ in each of the 2 epochs")
    finally:
        plt.close(fig)


def test_titles_say_what_the_step_sizes_are() -> None:
    base = make_set(2, 2, 1, method="baseline-random", lrs=torch.full((4,), 0.05))
    base.meta["eval_protocol"] = "dd"
    assert grid_title(base, 1).endswith("\nstep size 0.05 at each of the 4 inner steps")
    dc = make_set(1, 1, 10, method="dc", lrs=torch.full((1,), 0.01))
    assert grid_title(dc, 10) == "mnist5k · dc · 10 images/class · 7 meta-steps"  # DC's sets carry no schedule


def test_a_large_set_makes_a_readable_picture_not_a_giant_one(tmp_path: Path) -> None:
    from PIL import Image

    d = make_set(steps=30, epochs=1, ipc=50, dataset="cifar10", shape=(3, 32, 32))
    png = save_grid(d, tmp_path / "g.png")
    w, h = Image.open(png).size
    # drawn whole: 1500 rows of 64-pixel images (≈ 99,000 pixels tall); shown: 2 steps × 10 rows × 10 classes
    assert 10 * 64 < w < 1000 and 20 * 64 < h < 1600, (w, h)
