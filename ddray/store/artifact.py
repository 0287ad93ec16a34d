"""The open distilled-data format: ``data.parquet`` + ``meta.json`` (+ ``init_params.safetensors``).

A distilled set is a directory:

* ``data.parquet`` — one row per image: ``image`` list<float32> (C·H·W, row-major,
  normalised with ``mean``/``std``), ``label`` int64, ``step`` int32 (which of the S
  batches, 0‥S−1); with learned labels also ``label_logits`` list<float32> (one per class:
  the image's soft label is their softmax). Rows are ordered by step, then by position
  within the step.
* ``meta.json`` — ``shape`` [C, H, W], ``lrs`` (T step sizes in order of application,
  epoch-major: step t uses batch t mod S), ``steps``, ``epochs``, ``mean``, ``std``,
  ``dataset``, ``model``, ``classes``, ``init`` {``mode``, ``scheme``}, ``iterations``
  (meta-steps completed), ``method``, ``ddray_version``, ``config`` (the full run config),
  ``labels`` (``hard``, or ``learned`` when ``label_logits`` is there).
* ``init_params.safetensors`` — for fixed-init modes only: θ₀ keyed by the model's
  parameter names (``conv1.weight``, …).
* ``zca.safetensors`` — for ``--zca`` sets only: the whitening the images live in
  (``zca.mean`` μ (D,), ``zca.matrix`` W, ``zca.inverse`` W⁻¹ (D, D), ``zca.eps``); real
  images x (normalised, flattened) enter as (x − μ)·W, and the set is drawn as x̃·W⁻¹ + μ.
  ``meta.json`` then has ``zca`` {``eps``}; ``class_names`` lists the classes in label order.

Training on it without ddray: for t in 0‥T−1, take the rows with ``step == t % S``,
reshape ``image`` to ``shape``, and do one SGD step with step size ``lrs[t]`` (with learned
labels, towards ``softmax(label_logits)`` — a soft cross-entropy — instead of ``label``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddray._version import __version__
from ddray.core.images import Zca

DATA_FILE, META_FILE, INIT_FILE, ZCA_FILE = "data.parquet", "meta.json", "init_params.safetensors", "zca.safetensors"


@dataclass
class Distilled:
    """A distilled (or baseline) set in memory.

    Attributes:
        images: (S, N, C, H, W) float32, normalised.
        labels: (N,) int64 hard labels (each image's class), the same for every step.
        lrs: (T,) step sizes in order of application.
        meta: the rest of ``meta.json``.
        init_params: θ₀ for fixed-init modes, else None.
        zca: the whitening the images live in (``--zca``), else None.
        label_logits: learned labels z̃ (N, classes) float32 — the networks train towards softmax(z̃) —
            else None (hard labels).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lrs: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    init_params: dict[str, torch.Tensor] | None = None
    zca: Zca | None = None
    label_logits: torch.Tensor | None = None

    @property
    def train_labels(self) -> torch.Tensor:
        """What the networks train towards: the learned label logits, else the hard labels."""
        return self.label_logits if self.label_logits is not None else self.labels

    @property
    def label_kind(self) -> str:
        """``learned`` (soft labels) or ``hard``."""
        return "hard" if self.label_logits is None else "learned"

    @property
    def steps(self) -> int:
        return int(self.images.shape[0])

    @property
    def epochs(self) -> int:
        return len(self.lrs) // self.steps

    @property
    def step_index(self) -> torch.Tensor:
        """(S·N,) batch index of each image in row order."""
        return torch.arange(self.steps).repeat_interleave(self.images.shape[1])


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` whole or not at all (:func:`ddray.store.storage.write_atomic`)."""
    from ddray.store.storage import write_atomic

    write_atomic(path, json.dumps(obj, indent=2).encode())


def _float_lists(rows: np.ndarray) -> pa.Array:
    """(R, D) float32 → a list<float32> column of R rows."""
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1]).cast(pa.list_(pa.float32()))


def save_distilled(path: str | Path, d: Distilled) -> Path:
    """Write ``d`` in the open format to directory ``path`` (created); returns the path."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    s, n = d.images.shape[:2]
    flat = d.images.detach().to(torch.float32).reshape(s * n, -1).numpy()
    columns = {
        "image": _float_lists(flat),
        "label": pa.array(d.labels.repeat(s).numpy().astype(np.int64)),
        "step": pa.array(d.step_index.numpy().astype(np.int32)),
    }
    if d.label_logits is not None:
        columns["label_logits"] = _float_lists(d.label_logits.detach().to(torch.float32).repeat(s, 1).numpy())
    pq.write_table(pa.table(columns), out / DATA_FILE)
    meta = dict(d.meta)
    meta.update(shape=list(d.images.shape[2:]), lrs=[float(v) for v in d.lrs], steps=s,
                epochs=len(d.lrs) // s, labels=d.label_kind)
    meta.setdefault("ddray_version", __version__)
    if d.init_params is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in d.init_params.items()}, str(out / INIT_FILE))
    if d.zca is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in d.zca.tensors().items()}, str(out / ZCA_FILE))
    write_json_atomic(out / META_FILE, meta)
    return out


def read_distilled(path: str | Path) -> Distilled:
    """Read a distilled-data directory.

    Returns images (S, N, C, H, W), labels (N,), step sizes (T,), meta, θ₀ and learned labels if saved.
    MLflow ``runs:/<id>`` URIs are resolved where they enter (:func:`ddray.load_distilled`,
    the CLI), not here: this module knows files only.
    """
    if str(path).startswith(("runs:/", "models:/")):
        raise ValueError(f"{path}: an MLflow URI, not a directory; read it with ddray.load_distilled, "
                         "which downloads it first")
    p = Path(path)
    if not (p / META_FILE).is_file() or not (p / DATA_FILE).is_file():
        raise ValueError(f"{p}: not a distilled-data directory (expected {META_FILE} and {DATA_FILE})")
    meta = json.loads((p / META_FILE).read_text())
    table = pq.read_table(p / DATA_FILE)
    steps = int(meta["steps"])
    shape = tuple(int(v) for v in meta["shape"])
    step = table.column("step").to_numpy()
    order = np.argsort(step, kind="stable")
    flat = np.stack(table.column("image").to_numpy(zero_copy_only=False))[order].astype(np.float32)
    labels_all = table.column("label").to_numpy()[order]
    n = len(flat) // steps
    images = torch.from_numpy(flat).view(steps, n, *shape)
    labels = torch.from_numpy(labels_all[:n].astype(np.int64))
    logits = None
    if "label_logits" in table.column_names:
        rows = np.stack(table.column("label_logits").to_numpy(zero_copy_only=False))[order].astype(np.float32)
        logits = torch.from_numpy(rows[:n].copy())
    init = None
    if (p / INIT_FILE).is_file():
        from safetensors.torch import load_file

        init = load_file(str(p / INIT_FILE))
    zca = None
    if (p / ZCA_FILE).is_file():
        from safetensors.torch import load_file

        zca = Zca.from_tensors(load_file(str(p / ZCA_FILE)))
    elif meta.get("zca"):
        raise ValueError(f"{p}: a --zca set without its {ZCA_FILE} (the whitening its images live in)")
    return Distilled(images, labels, torch.tensor(meta["lrs"], dtype=torch.float32), meta, init, zca, logits)
