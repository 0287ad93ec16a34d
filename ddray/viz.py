"""Pictures of a distilled set: an image grid and the learned step-size schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddray.artifact import Distilled


def grid_array(d: Distilled, pad: int = 2) -> np.ndarray:
    """(H', W', C) uint8 grid: one row per distill step, one column per image (class-major)."""
    mean = torch.tensor(d.meta.get("mean", [0.0]), dtype=torch.float32).view(1, 1, -1, 1, 1)
    std = torch.tensor(d.meta.get("std", [1.0]), dtype=torch.float32).view(1, 1, -1, 1, 1)
    x = (d.images * std + mean).clamp(0, 1)
    s, n, c, h, w = x.shape
    out = np.ones((s * (h + pad) + pad, n * (w + pad) + pad, c), dtype=np.float32)
    for i in range(s):
        for j in range(n):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            out[y0:y0 + h, x0:x0 + w] = x[i, j].permute(1, 2, 0).numpy()
    return (out * 255).round().astype(np.uint8)


def save_grid(d: Distilled, path: str | Path, scale: int = 3) -> Path:
    """Write the image grid as PNG (rows = steps, columns = classes) and return its path."""
    from PIL import Image

    arr = grid_array(d)
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    p = Path(path)
    img.save(p)
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
