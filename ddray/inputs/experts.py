"""``ddray experts``: expert trajectories on the real data, for trajectory matching (MTT).

Cazenavette et al., "Dataset Distillation by Matching Training Trajectories"
(CVPR 2022) distil by matching a few steps of training on the synthetic set to a
stretch of an *expert* trajectory: the parameters of a network trained on the real
data, recorded once per epoch. This module makes those trajectories (MTT's
``buffer.py``) and loads them back.

Notation (expert i of N, E = ``epochs``, B = ``batch_size``)::

    θ₀⁽ⁱ⁾         init_params(model, init_scheme, generator(seed, PURPOSE_EXPERT, i))
    θₑ⁽ⁱ⁾         parameters after e = 1..E epochs of SGD(lr, momentum, weight_decay) with
                  cross-entropy on shuffled minibatches of B real images (x, y),
                  x (B, C, H, W), optionally augmented: x ← augment(x, g) (DSA)
    trajectory    {name: (E + 1, *shape)}: θ₀⁽ⁱ⁾, θ₁⁽ⁱ⁾, …, θ_E⁽ⁱ⁾ stacked on a new first axis

Every random draw is derived from (seed, ``PURPOSE_EXPERT``, i, stream, epoch), so
expert i is the same whether it is trained first, last, or in a resumed run (on
the CPU, bit for bit; CUDA kernels may be nondeterministic).

Layout of the output directory::

    experts.json               {dataset, model, shape [C, H, W], classes, settings,
                                files, test_acc (aligned with files), ddray_version}
    expert-00000.safetensors   one tensor per parameter name, (E + 1, *shape) float32;
    expert-00001.safetensors   safetensors metadata {"expert": "1", "epochs": "E"}
    …

Resumability: each expert file is written to a temporary name in the same
directory and renamed into place, so a file under its final name is always
complete; a run that is killed leaves at most a ``.tmp-*`` file, which is
ignored. Running again with the same settings skips the experts already on disk
and trains the missing ones (asking for more experts extends the set). A
directory made with other settings, data set or model is refused rather than
mixed.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ddray._version import __version__
from ddray.config import INIT_SCHEMES, DataConfig
from ddray.core.augment import parse_strategy
from ddray.core.images import ImageSource
from ddray.core.inits import EXPERT, generator
from ddray.core.models import MODEL_REGISTRY, Params, build_model, init_params
from ddray.data import Dataset
from ddray.store.artifact import write_json_atomic
from ddray.store.storage import write_atomic
from ddray.validation import (each, is_int, is_number, nonneg_int, nonneg_number, one_of, positive_int, positive_number,
                              require)

EXPERTS_META = "experts.json"
PURPOSE_EXPERT = EXPERT  # the seed purpose of expert draws (ddray.core.inits)
# Sub-streams of (seed, PURPOSE_EXPERT, i, stream, epoch). Non-zero on purpose: numpy's
# SeedSequence pads short keys with zeros, so a zero tag could collide with a shorter key.
_SHUFFLE, _AUGMENT = 1, 2
FILE_PATTERN = re.compile(r"^expert-(\d{5,})\.safetensors$")

#: ExpertSettings field → the command-line option its errors name.
OPTIONS = {
    "model": "--model", "width": "--width", "epochs": "--train-epochs", "lr": "--expert-lr",
    "momentum": "--expert-momentum", "weight_decay": "--expert-weight-decay",
    "batch_size": "--expert-batch-size", "init_scheme": "--init-scheme",
    "dsa_strategy": "--dsa-strategy", "seed": "--seed",
}

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class ExpertSettings:
    """How each expert is trained (MTT's ``buffer.py`` defaults, but 20 epochs instead of 50).

    Attributes:
        model: a key of ``MODEL_REGISTRY`` (``convnet`` is MTT's network).
        width: ConvNet's channels per layer (128 in the papers).
        epochs: E, epochs per expert; a trajectory holds E + 1 snapshots.
        lr: SGD learning rate.
        momentum: SGD momentum in [0, 1).
        weight_decay: SGD L2 penalty, >= 0.
        batch_size: real images per minibatch.
        init_scheme: how θ₀ is drawn (see ``init_params``).
        dsa_strategy: the DSA augmentation the ``augment`` callable implements, e.g.
            ``"color_crop_cutout_flip_scale_rotate"``; None for no augmentation.
        seed: run seed; expert i's draws derive from (seed, PURPOSE_EXPERT, i).
    """

    model: str = "convnet"
    width: int = 128
    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    init_scheme: str = "default"
    dsa_strategy: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        opt = OPTIONS.__getitem__  # errors name the command-line options
        one_of(opt("model"), self.model, list(MODEL_REGISTRY))
        one_of(opt("init_scheme"), self.init_scheme, INIT_SCHEMES)
        each(positive_int, self, "width", "epochs", "batch_size", label=opt)
        each(nonneg_int, self, "seed", label=opt)
        each(positive_number, self, "lr", label=opt)
        require(is_number(self.momentum) and 0 <= self.momentum < 1, opt("momentum"), self.momentum,
                "expected a number in [0, 1)")
        each(nonneg_number, self, "weight_decay", label=opt)
        if self.dsa_strategy is not None:
            parse_strategy(self.dsa_strategy)


@dataclass
class Trajectory:
    """One expert's parameters over training.

    Attributes:
        params: name → (epochs + 1, *shape) tensor; row e is θ after e epochs.
    """

    params: dict[str, torch.Tensor]

    @property
    def epochs(self) -> int:
        """E: the number of epochs recorded (the trajectory has E + 1 snapshots)."""
        return int(next(iter(self.params.values())).shape[0]) - 1

    def at(self, epoch: int) -> Params:
        """θ after ``epoch`` epochs (0 = θ₀): name → (*shape) tensor (views, not copies)."""
        if not (is_int(epoch) and 0 <= epoch <= self.epochs):
            raise ValueError(f"Trajectory.at: epoch {epoch!r} is outside 0..{self.epochs}")
        return {k: v[epoch] for k, v in self.params.items()}


def expert_file(index: int) -> str:
    """File name of expert ``index`` (``expert-00000.safetensors``, …)."""
    return f"expert-{index:05d}.safetensors"


def _expert_files(directory: Path) -> list[tuple[int, Path]]:
    """(index, path) of every file named like an expert in ``directory``, by index."""
    return sorted((int(m.group(1)), f) for f in directory.iterdir() if (m := FILE_PATTERN.match(f.name)))


def _file_ok(path: Path, index: int, epochs: int) -> bool:
    """True when ``path`` is a readable expert file for ``index`` with ``epochs`` epochs."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # torn or foreign file: safetensors raises its own error types
        return False
    return meta.get("expert") == str(index) and meta.get("epochs") == str(epochs)


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name in ``path``'s directory, fsync, rename."""
    from safetensors.torch import save

    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


@torch.no_grad()
def _accuracy(model: nn.Module, x: ImageSource, y: torch.Tensor, chunk: int = 2048) -> float:
    """Top-1 accuracy of ``model`` on x (M, C, H, W), y (M,)."""
    if len(x) == 0:
        return float("nan")
    correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum())
                  for i in range(0, len(x), chunk))
    return correct / len(x)


def train_expert(data: Dataset, settings: ExpertSettings, index: int, augment: Augment | None = None,
                 device: str | torch.device = "cpu",
                 on_epoch: Callable[[int, float], None] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Train expert ``index`` and return (trajectory {name: (E + 1, *shape)} on the CPU, test accuracy).

    ``on_epoch(epoch, mean train loss)`` is called after each epoch (progress reporting).
    """
    s = settings
    model = build_model(s.model, data.shape, data.num_classes, s.width)
    theta0 = init_params(model, s.init_scheme, generator(s.seed, PURPOSE_EXPERT, index))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theta0[name])
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    snapshots = [{k: v.detach().clone() for k, v in theta0.items()}]  # θ₀ (CPU)
    n = len(x_train)
    for epoch in range(1, s.epochs + 1):
        perm = torch.randperm(n, generator=generator(s.seed, PURPOSE_EXPERT, index, _SHUFFLE, epoch))
        g_aug = generator(s.seed, PURPOSE_EXPERT, index, _AUGMENT, epoch)
        total = torch.zeros((), device=device)  # summed train loss, kept on the device: no sync per step
        for i in range(0, n, s.batch_size):
            idx = perm[i:i + s.batch_size].to(device)
            x = x_train[idx]
            if augment is not None:
                x = augment(x, g_aug)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        # The epoch's snapshot θₑ (a CPU copy; this is also the once-per-epoch sync point).
        snapshots.append({k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters()})
        if on_epoch is not None:
            on_epoch(epoch, float(total) / n)
    acc = _accuracy(model, data.x_test.to(device), data.y_test.to(device))
    return {k: torch.stack([snap[k] for snap in snapshots]) for k in theta0}, acc


def _meta_key(data: Dataset, settings: ExpertSettings) -> dict[str, Any]:
    """The part of EXPERTS_META that must agree for trajectories to be mixed in one directory."""
    return {"dataset": data.name, "model": settings.model, "shape": list(data.shape),
            "classes": data.num_classes, "zca": None if data.zca is None else data.zca.eps,
            "settings": asdict(settings)}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for k in new:
        if k == "settings":
            o, n = old.get(k) or {}, new[k]
            diffs += [f"{f}={o.get(f)!r} (now {n.get(f)!r})" for f in sorted(set(o) | set(n)) if o.get(f) != n.get(f)]
        elif old.get(k) != new[k]:
            diffs.append(f"{k}={old.get(k)!r} (now {new[k]!r})")
    return list(dict.fromkeys(diffs))  # model is both top-level and a setting: say it once


def train_experts(data: Dataset, settings: ExpertSettings, experts: int, out: str | Path,
                  progress: bool = True, augment: Augment | None = None,
                  device: str | torch.device = "cpu", mapper: Callable[..., list[Any]] | None = None,
                  source: DataConfig | None = None) -> Path:
    """Train experts 0..experts-1 into ``out``, one file per expert; resumable.

    Experts whose file is already complete are skipped (an interrupted run continues
    with the missing experts); ``EXPERTS_META`` is rewritten after every expert.

    Args:
        data: the real data set; training uses ``x_train`` (N, C, H, W) / ``y_train`` (N,),
            the recorded accuracy ``x_test`` / ``y_test``.
        settings: how each expert is trained.
        experts: N, the number of experts wanted in ``out`` (more than exist extends the set).
        out: output directory (created).
        progress: show a tqdm bar over experts (epoch and loss as postfix).
        augment: ``augment(x, g)`` → x', applied to every minibatch x (B, C, H, W) with a
            generator seeded per (expert, epoch); must match ``settings.dsa_strategy``.
        device: where to train (trajectories are stored from the CPU either way).
        mapper: runs the missing experts elsewhere, in parallel, one job per expert
            (:func:`ddray.distributed.pool.call_mapper`: Ray workers); each file is written
            here as its expert arrives. Needs ``source``, which the workers load the data from.
        source: where ``data`` came from (the workers' copy).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: bad ``experts`` count; ``augment`` given without ``dsa_strategy`` or the
            reverse; ``out`` made for another data set, model or settings (naming --experts).
    """
    positive_int("--num-experts", experts)
    if (augment is None) != (settings.dsa_strategy is None):
        raise ValueError(f"--dsa-strategy: {settings.dsa_strategy!r} must be set exactly when an augmentation "
                         f"is applied (augment is {'set' if augment else 'None'}), so the recorded settings "
                         f"describe the trajectories")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--experts {out}: is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / EXPERTS_META
    key = _meta_key(data, settings)
    accs: dict[str, float] = {}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diffs = _differences(old, key)
        if diffs:
            raise ValueError(f"--experts {out}: holds trajectories made with other settings: {'; '.join(diffs)}. "
                             f"Trajectories are never mixed: use another directory, or the same settings to "
                             f"resume")
        accs = dict(zip(old.get("files", []), old.get("test_acc", [])))
    elif _expert_files(out):
        raise ValueError(f"--experts {out}: holds expert files but no {EXPERTS_META}, so it cannot tell how "
                         f"they were made; use another directory")

    def write_meta() -> None:
        done = [f.name for _, f in _expert_files(out) if f.name in accs]
        write_json_atomic(meta_path, {**key, "files": done, "test_acc": [accs[f] for f in done],
                                       "ddray_version": __version__})

    write_meta()
    todo = []
    for i in range(experts):
        path = out / expert_file(i)
        if _file_ok(path, i, settings.epochs):
            if path.name not in accs:  # killed between the file's rename and the meta write
                accs[path.name] = _stored_accuracy(path, data, settings)
                write_meta()
            continue
        if path.exists():
            warnings.warn(f"--experts {out}: {path.name} is unreadable or not expert {i}; retraining it",
                          stacklevel=2)
        todo.append(i)
    bar = tqdm(total=experts, initial=experts - len(todo), desc="experts", unit="expert", disable=not progress)

    def store(i: int, trajectory: dict[str, torch.Tensor], acc: float) -> None:
        _write_atomic(out / expert_file(i), trajectory, {"expert": str(i), "epochs": str(settings.epochs)})
        accs[expert_file(i)] = acc
        write_meta()
        bar.update(1)
        bar.set_postfix(test_acc=f"{acc:.3f}")

    if mapper is not None:
        if source is None:
            raise ValueError("train_experts: mapper needs source, the data set the workers load")
        mapper(expert_job, [(source, settings, i) for i in todo],
               on_result=lambda k, result: store(todo[k], *result))
    for i in todo if mapper is None else []:
        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", loss=f"{loss:.3f}")

        store(i, *train_expert(data, settings, i, augment, device, on_epoch))
    bar.close()
    return out


def expert_job(source: DataConfig, settings: ExpertSettings, index: int) -> tuple[dict[str, torch.Tensor], float]:
    """Expert ``index`` trained where this runs (a Ray worker): loads the data set, augments as
    ``settings.dsa_strategy`` says → (trajectory, test accuracy)."""
    from ddray.core.augment import augment
    from ddray.inputs.sources import load_data

    data = load_data(source)
    strategy = settings.dsa_strategy
    return train_expert(data, settings, index, None if strategy is None else lambda x, g: augment(x, strategy, g))


def _stored_accuracy(path: Path, data: Dataset, settings: ExpertSettings) -> float:
    """Test accuracy of the last snapshot of a stored expert."""
    from safetensors.torch import load_file

    model = build_model(settings.model, data.shape, data.num_classes, settings.width)
    model.load_state_dict({k: v[-1] for k, v in load_file(str(path)).items()})
    return _accuracy(model, data.x_test, data.y_test)


def _zca_words(eps: float | None) -> str:
    return "without ZCA whitening" if eps is None else f"with ZCA whitening (--zca-eps {eps:g})"


def check_zca(path: Path, trained: float | None, run: float | None | bool) -> None:
    """One line when experts trained with one whitening (or none) meet a run with another (DATM's users' trap)."""
    if trained is None and run is None:
        return
    if trained is not None and run is not None and abs(float(trained) - float(run)) <= 1e-12 * max(1.0, float(run)):
        return
    flags = "--no-zca" if run is None else f"--zca --zca-eps {float(run):g}"
    raise ValueError(f"--experts {path}: trained {_zca_words(trained)}, but this run is "
                     f"{_zca_words(None if run is None else float(run))}: experts and the student must see the same "
                     f"images; train them with `ddray experts {flags}`, or match the run to them")


def load_experts(path: str | Path, model: str, shape: tuple[int, int, int], classes: int,
                 dataset: str | None = None, width: int = 128,
                 zca: float | None | bool = False) -> tuple[list[Trajectory], dict[str, Any]]:
    """All complete experts in ``path`` (by index) and its ``EXPERTS_META`` dict.

    Args:
        path: a directory written by :func:`train_experts` (``ddray experts``).
        model, shape, classes: what the caller will run the trajectories with: model name,
            image shape (C, H, W) and class count.
        dataset: if given, the data set the experts must have been trained on.
        width: ConvNet's channels (the run's ``--width``).
        zca: the run's ``--zca-eps`` when it whitens its images, None when it does not; the experts must
            have been trained the same way (False: not checked).

    Raises:
        ValueError (naming --experts): no ``EXPERTS_META``, no complete expert, or made for
            another model / shape / classes / data set.
    """
    p = Path(path)
    hint = "make them with `ddray experts`"
    if not (p / EXPERTS_META).is_file():
        raise ValueError(f"--experts {p}: not an expert directory (no {EXPERTS_META}); {hint}")
    meta: dict[str, Any] = json.loads((p / EXPERTS_META).read_text())
    want: dict[str, Any] = {"model": model, "width": width, "shape": list(shape), "classes": classes}
    if dataset is not None:
        want["dataset"] = dataset
    got = {k: meta.get(k, meta.get("settings", {}).get(k)) for k in want}
    if got != want:
        raise ValueError(f"--experts {p}: made for {got}, but this run needs {want}; {hint}")
    if zca is not False:
        check_zca(p, meta.get("zca"), zca)
    epochs = int(meta["settings"]["epochs"])
    from safetensors.torch import load_file

    expected = {k: (epochs + 1, *v.shape) for k, v in build_model(model, shape, classes, width).named_parameters()}
    trajectories = []
    for i, f in _expert_files(p):
        if not _file_ok(f, i, epochs):
            warnings.warn(f"--experts {p}: skipping {f.name} (unreadable or not expert {i} of {epochs} epochs)",
                          stacklevel=2)
            continue
        params = load_file(str(f))
        if {k: tuple(v.shape) for k, v in params.items()} != expected:
            raise ValueError(f"--experts {p}: {f.name} does not hold {model} parameters of shapes {expected}; "
                             f"{hint}")
        trajectories.append(Trajectory(params))
    if not trajectories:
        raise ValueError(f"--experts {p}: holds no complete experts; {hint}")
    return trajectories, meta
