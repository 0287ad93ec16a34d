"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, "Dataset Condensation with
Differentiable Siamese Augmentation", ICML 2021).

Every transform is a differentiable function of the images, so a loss on augmented
synthetic images back-propagates into the pixels. The constants are those of the
paper's released code (``ParamDiffAug``): brightness 1.0, saturation 2.0, contrast
0.5, crop padding 0.125, cutout 0.5, flip probability 0.5, scale 1.2, rotation 15°.

*Siamese*: during distillation the same random draw is applied to a real batch and a
synthetic batch, so that matching their gradients (or features) compares like with
like. Here that is one parameter set drawn for n = 1 image and broadcast over both
batches: ``p = sample_aug(s, 1, g); apply_aug(x_real, p); apply_aug(x_syn, p)``.
Evaluation draws per-image parameters instead (n = batch size).

*'S' mode* (the released code's default): each call picks ONE op of the strategy
uniformly at random and applies only that op (``color`` applies brightness, then
saturation, then contrast, each with its own draw).

*Without a branch* (:func:`stack_aug`, :func:`apply_aug_select`): a batch whose blocks carry
different draws, every op computed and each image's own kept with ``torch.where``. The same
values and gradients, and no Python branch on the draw, so that one CUDA graph replays every
draw (the captured DC, DM and MTT meta-steps, :mod:`ddray.core.capture`).

Parameters (:data:`AugParams`) are a plain dict of CPU tensors, cheap to pickle:
``op`` — 0-dim int64 index into :data:`OPS` — plus the chosen op's draws, each with
leading dim n. Crop and cutout store uniforms u ∈ [0, 1) and turn them into whole
pixels only when applied, so one draw fits images of any size. All randomness comes
from the given CPU ``torch.Generator``, never the global RNG.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5
RATIO_CROP_PAD, RATIO_CUTOUT, PROB_FLIP = 0.125, 0.5, 0.5
RATIO_SCALE, RATIO_ROTATE = 1.2, 15.0

AugParams = dict[str, torch.Tensor]


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """``'color_crop_...'`` → ``('color', 'crop', ...)``; an op listed twice is picked twice as often."""
    ops = tuple(strategy.split("_")) if isinstance(strategy, str) else ()
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"--dsa-strategy: invalid value {strategy!r}; ops joined by '_' from "
                         f"{', '.join(OPS)}")
    return ops


def sample_aug(strategy: str, n: int, generator: torch.Generator) -> AugParams:
    """Draw the parameters of one augmentation call for n images.

    n = 1 gives one parameter set shared by a whole batch (the siamese use: the same
    draw applied to a real and a synthetic batch); n = B gives one per image.

    Returns:
        ``{"op": () int64, <op's draws>: (n,) or (n, 2) float32}``.
    """
    ops = parse_strategy(strategy)
    if n < 1:
        raise ValueError(f"sample_aug: n must be >= 1, got {n}")
    op = ops[int(torch.randint(len(ops), (1,), generator=generator))]

    def u(*shape: int) -> torch.Tensor:
        return torch.rand((n, *shape), generator=generator)

    params: AugParams = {"op": torch.tensor(OPS.index(op))}
    if op == "color":
        params.update(brightness=u(), saturation=u(), contrast=u())
    elif op == "crop":
        params["crop"] = u(2)  # (row, column) shift, as uniforms
    elif op == "cutout":
        params["cutout"] = u(2)  # (row, column) centre, as uniforms
    elif op == "flip":
        params["flip"] = (u() < PROB_FLIP).float()
    elif op == "scale":
        params["scale"] = u(2) * (RATIO_SCALE - 1.0 / RATIO_SCALE) + 1.0 / RATIO_SCALE  # (sx, sy)
    else:  # rotate
        params["rotate"] = (u() - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi  # radians
    return params


def _per_image(v: torch.Tensor) -> torch.Tensor:
    """(n,) → (n, 1, 1, 1), to broadcast over (B, C, H, W)."""
    return v.reshape(-1, 1, 1, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x (B, C, H, W) through affine maps theta (n, 2, 3), n ∈ {1, B}; zeros outside."""
    theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _color(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    x = x + (_per_image(p["brightness"]) - 0.5) * BRIGHTNESS
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_per_image(p["saturation"]) * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_image(p["contrast"]) + CONTRAST) + mean


def _shift(u: torch.Tensor, s: int) -> torch.Tensor:
    """Uniforms u ∈ [0, 1) → whole shifts in [−s, s] (Python constants only: no host-to-device copy)."""
    return torch.floor(u * (2 * s + 1)).clamp(max=2 * s) - s


def _crop(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    """Translate by whole pixels, uniform in [−s, s] with s = round(0.125 · size) (pad-and-crop)."""
    h, w = x.shape[2:]
    t = torch.stack([_shift(p["crop"][:, 0], int(h * RATIO_CROP_PAD + 0.5)),
                     _shift(p["crop"][:, 1], int(w * RATIO_CROP_PAD + 0.5))], 1)  # (n, 2) whole pixels
    # output pixel (i, j) reads input (i + t_row, j + t_col); affine_grid's x is the column
    one, zero = torch.ones_like(t[:, 0]), torch.zeros_like(t[:, 0])
    tx, ty = 2 * t[:, 1] / max(w - 1, 1), 2 * t[:, 0] / max(h - 1, 1)
    theta = torch.stack([torch.stack([one, zero, tx], 1), torch.stack([zero, one, ty], 1)], 1)
    return _affine(x, theta)


def _cutout(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    """Zero a square of side round(0.5 · size) at a random centre (clipped at the border)."""
    h, w = x.shape[2:]
    sh, sw = int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)
    kh, kw = h + 1 - sh % 2, w + 1 - sw % 2  # number of possible centres, as the released code
    centre_h = torch.floor(p["cutout"][:, :1] * kh).clamp(max=kh - 1)  # (n, 1)
    centre_w = torch.floor(p["cutout"][:, 1:] * kw).clamp(max=kw - 1)
    rows = torch.arange(h, device=x.device, dtype=x.dtype) - (centre_h - sh // 2)  # (n, h)
    cols = torch.arange(w, device=x.device, dtype=x.dtype) - (centre_w - sw // 2)
    inside = ((rows >= 0) & (rows < sh)).unsqueeze(2) & ((cols >= 0) & (cols < sw)).unsqueeze(1)
    return x * (~inside).to(x.dtype).unsqueeze(1)  # mask (n, 1, h, w)


def _flip(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    return torch.where(_per_image(p["flip"]) > 0.5, x.flip(3), x)


def _scale(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    s = p["scale"]
    zero = torch.zeros_like(s[:, 0])
    theta = torch.stack([torch.stack([s[:, 0], zero, zero], 1), torch.stack([zero, s[:, 1], zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    a = p["rotate"]
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_APPLY: dict[str, Callable[[torch.Tensor, AugParams], torch.Tensor]] = {
    "color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate,
}


def apply_aug(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """Apply a drawn augmentation to x (B, C, H, W) → (B, C, H, W), differentiable in x.

    Parameters with leading dim 1 are shared by the whole batch; otherwise it must be B.
    They are moved to x's device and float dtype (float64 included).
    """
    if x.dim() != 4:
        raise ValueError(f"apply_aug: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if "op" not in params or not 0 <= int(params["op"]) < len(OPS):
        raise ValueError(f"apply_aug: params['op'] must index one of {', '.join(OPS)}, "
                         f"got {params.get('op')}")
    op = OPS[int(params["op"])]
    p: AugParams = {}
    for k, v in params.items():
        if k == "op":
            continue
        if v.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"apply_aug: params[{k!r}] are drawn for {v.shape[0]} images; "
                             f"allowed: 1 (shared by the batch) or the batch size {x.shape[0]}")
        p[k] = v.to(device=x.device, dtype=x.dtype)
    return _APPLY[op](x, p)


#: each op's parameters, their shape per image, and a value for images that picked another op
#: (:func:`stack_aug`; any finite value would do, since :func:`apply_aug_select` discards that result)
FIELDS: dict[str, tuple[tuple[str, tuple[int, ...], float], ...]] = {
    "color": (("brightness", (), 0.5), ("saturation", (), 0.5), ("contrast", (), 0.5)),
    "crop": (("crop", (2,), 0.5),), "cutout": (("cutout", (2,), 0.5),), "flip": (("flip", (), 0.0),),
    "scale": (("scale", (2,), 1.0),), "rotate": (("rotate", (), 0.0),),
}


def stack_aug(draws: list[AugParams], sizes: list[int], strategy: str, like: torch.Tensor) -> AugParams:
    """Draws for consecutive blocks of a batch (DM: one siamese draw per class; MTT: one draw of
    per-image parameters per student step) as per-image parameters for :func:`apply_aug_select`,
    on ``like``'s device and float dtype.

    Block i has ``sizes[i]`` images; its draw is for 1 image (shared by the block) or for all of
    them. Returns ``{"op": (B,) int64, <every field of every op in the strategy>: (B, ...)}``,
    B = Σ sizes; fields of an op a block did not pick hold the filler of :data:`FIELDS`. The same
    shapes for every draw, so a CUDA graph can read them from static buffers.
    """
    if len(draws) != len(sizes):
        raise ValueError(f"stack_aug: {len(draws)} draws for {len(sizes)} blocks")
    for d, size in zip(draws, sizes):
        drawn_for = {v.shape[0] for k, v in d.items() if k != "op"}
        if not drawn_for <= {1, size}:
            raise ValueError(f"stack_aug: a draw for {sorted(drawn_for)} images in a block of {size}; "
                             f"allowed: 1 (shared by the block) or {size}")
    out: AugParams = {"op": torch.cat([d["op"].expand(size) for d, size in zip(draws, sizes)]).to(like.device)}
    for op in dict.fromkeys(parse_strategy(strategy)):
        for name, shape, filler in FIELDS[op]:
            rows = [(d[name] if name in d else torch.full((1, *shape), filler)).expand(size, *shape)
                    for d, size in zip(draws, sizes)]
            out[name] = torch.cat(rows).to(device=like.device, dtype=like.dtype)
    return out


def apply_aug_select(x: torch.Tensor, params: AugParams, strategy: str) -> torch.Tensor:
    """:func:`apply_aug` with per-image ops, without a branch on the draw: every op of the strategy
    transforms the whole batch and each image keeps the result of its own ``op``.

    ``params`` from :func:`stack_aug`, already on x's device and dtype. The same values and
    gradients as applying each block's draw with :func:`apply_aug` (the picked op's arithmetic,
    per image; the other ops' results are dropped by ``torch.where``), at the cost of computing
    every op: what lets a CUDA graph capture an augmentation whose op changes every draw.
    """
    out: torch.Tensor | None = None
    for op in dict.fromkeys(parse_strategy(strategy)):
        y = _APPLY[op](x, params)
        out = y if out is None else torch.where(_per_image(params["op"] == OPS.index(op)), y, out)
    assert out is not None  # a strategy names at least one op
    return out


def augment(x: torch.Tensor, strategy: str, generator: torch.Generator,
            siamese: bool = False) -> torch.Tensor:
    """Draw (one shared set if ``siamese``, else one per image) and apply: x (B, C, H, W) → same shape."""
    return apply_aug(x, sample_aug(strategy, 1 if siamese else len(x), generator))
