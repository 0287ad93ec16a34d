"""The evaluation protocol of the DC / DSA / DM / MTT line of work.

A distilled (or baseline) set is judged by training fresh networks on it from
scratch, as ordinary supervised training, and testing them on real data. The
papers — DC (Zhao, Mopuri & Bilen, ICLR 2021), DSA (Zhao & Bilen, ICML 2021),
DM (Zhao & Bilen, WACV 2023) and MTT (Cazenavette et al., CVPR 2022) — all use:

    ConvNet-3 (instance norm), torch's default initialisation,
    SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr × 0.1 at half of training,
    minibatches of 256, 1000 epochs, DSA augmentation, mean ± std over 20 networks;
    MTT trains with its learned step size instead of 0.01.

:class:`ProtocolDC` holds these settings with CPU-friendly defaults: 300 epochs
and 5 networks (papers: 1000 and 20). Pass ``epochs=1000, nets=20`` to reproduce
the papers' numbers; the CPU defaults give somewhat lower, noisier accuracies.

Small differences from the released code (``evaluate_synset``), for a cleaner
schedule: it trains Epoch + 1 epochs and rebuilds the optimiser (dropping the
momentum) after epoch Epoch // 2 + 1; here training runs exactly ``epochs`` epochs,
the lr is 0.1× from (0-based) epoch ``epochs // 2`` on, and momentum is kept.

Every random draw — θ₀ of net i, its minibatch order and its augmentations — comes
from the EVAL seed stream of :mod:`ddray.core.inits` keyed by (seed, net index),
never from the global RNG, so results are reproducible and independent of
``nets``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ddray.core.augment import DEFAULT_STRATEGY, augment, parse_strategy
from ddray.core.images import ImageSource
from ddray.core.inits import EVAL, generator
from ddray.core.models import init_params
from ddray.core.protocol_dd import EvalResult, summarise

INIT_KEY, SHUFFLE_KEY, AUG_KEY = 2_000_000, 3_000_000, 4_000_000  # + net index, in the EVAL stream


@dataclass(frozen=True)
class ProtocolDC:
    """Training settings of the DC/DSA/DM/MTT evaluation (defaults: CPU-sized; papers in brackets).

    Attributes:
        epochs: training epochs per network [1000]; lr decays × 0.1 at ``epochs // 2``.
        nets: networks trained from scratch, accuracy reported as mean ± std [20].
        lr: SGD learning rate [0.01] (MTT overrides it with its learned step size).
        momentum: SGD momentum [0.9].
        weight_decay: SGD weight decay [5e-4].
        batch_size: minibatch size [256]; a set smaller than this is one batch per epoch.
        dsa_strategy: DSA ops applied per image in training (see :mod:`ddray.core.augment`);
            None trains without augmentation.
        label_loss: the loss on learned (soft) labels, ``ce`` or ``kl`` (:func:`soft_label_loss`).
    """

    epochs: int = 300
    nets: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa_strategy: str | None = DEFAULT_STRATEGY
    label_loss: str = "ce"

    def __post_init__(self) -> None:
        for option, value in (("--eval-epochs", self.epochs), ("--eval-nets", self.nets),
                              ("--eval-batch-size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option}: invalid value {value!r}; must be an integer >= 1")
        _check_lr("--eval-lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"ProtocolDC.momentum: invalid value {self.momentum!r}; must be in [0, 1)")
        if not self.weight_decay >= 0:
            raise ValueError(f"ProtocolDC.weight_decay: invalid value {self.weight_decay!r}; must be >= 0")
        if self.dsa_strategy is not None:
            parse_strategy(self.dsa_strategy)
        if self.label_loss not in ("ce", "kl"):
            raise ValueError(f"--label-loss: invalid value {self.label_loss!r}; choose ce or kl")


def _check_lr(option: str, lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{option}: invalid value {lr!r}; must be a finite number > 0")


def lr_at(epoch: int, protocol: ProtocolDC, lr: float | None = None) -> float:
    """The learning rate of (0-based) ``epoch``: ``lr`` (default ``protocol.lr``), × 0.1 from ``epochs // 2``."""
    base = protocol.lr if lr is None else lr
    return base * 0.1 if epoch >= protocol.epochs // 2 else base


def soft_label_loss(output: torch.Tensor, labels: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """The training loss of a batch: cross-entropy for hard labels (B,); for label logits z̃ (B, classes),
    the soft cross-entropy −Σ softmax(z̃)·log softmax(output) (``ce``) or KL(softmax(z̃) ‖ softmax(output))
    (``kl``), both averaged over the batch. The two differ by the labels' entropy, a constant, so they
    train alike; ``kl`` is the loss DD-Ranking and SRe2L/RDED report."""
    if not labels.is_floating_point():
        return F.cross_entropy(output, labels)
    target = F.softmax(labels, dim=-1)
    if kind == "kl":
        return F.kl_div(F.log_softmax(output, dim=-1), target, reduction="batchmean")
    if kind != "ce":
        raise ValueError(f"--label-loss: invalid value {kind!r}; choose ce or kl")
    return F.cross_entropy(output, target)


def _flatten_steps(images: ImageSource, labels: torch.Tensor) -> tuple[ImageSource, torch.Tensor]:
    """(N, C, H, W) or (S, N, C, H, W) with labels — hard (N,) or (S·N,), or label logits (N, classes) or
    (S·N, classes) — → (S·N, C, H, W) and one label row per image.

    A real training split (:class:`~ddray.core.images.Images`, (N, C, H, W)) passes as it is."""
    if isinstance(images, torch.Tensor) and images.dim() == 5:
        s, n = images.shape[:2]
        images = images.flatten(0, 1)
        if labels.shape[0] == n:
            labels = labels.repeat(s, *[1] * (labels.dim() - 1))
    if len(images.shape) != 4 or labels.shape[:1] != (len(images),) or labels.dim() > 2:
        raise ValueError(f"evaluate_protocol_dc: images must be (N, C, H, W) or (S, N, C, H, W) with labels "
                         f"(N,) or (N, classes); got images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    return images, labels if labels.is_floating_point() else labels.long()


def train_one(model: nn.Module, images: ImageSource, labels: torch.Tensor, protocol: ProtocolDC,
              seed: int, index: int, lr: float | None = None) -> nn.Module:
    """Train net ``index`` of the protocol from its seeded θ₀ on (images (N, C, H, W), labels (N,))."""
    # θ₀ is drawn on the CPU (torch's default init, seeded), so it does not depend on the device;
    # init_params("default") resets this copy in place, and loading θ₀ again keeps that explicit.
    net = copy.deepcopy(model).cpu()  # the template is never touched
    theta0 = init_params(net, "default", generator(seed, EVAL, INIT_KEY + index))
    net.load_state_dict(theta0, strict=False)  # strict=False: θ₀ holds parameters, not buffers
    net = net.to(images.device)
    opt = torch.optim.SGD(net.parameters(), lr=lr_at(0, protocol, lr), momentum=protocol.momentum,
                          weight_decay=protocol.weight_decay)
    g_shuffle = generator(seed, EVAL, SHUFFLE_KEY + index)
    g_aug = generator(seed, EVAL, AUG_KEY + index)
    net.train()
    for epoch in range(protocol.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, protocol, lr)
        order = torch.randperm(len(images), generator=g_shuffle).to(images.device)
        for idx in order.split(protocol.batch_size):
            x, y = images[idx], labels[idx]
            if protocol.dsa_strategy is not None:
                x = augment(x, protocol.dsa_strategy, g_aug, siamese=False)
            loss = soft_label_loss(net(x), y, protocol.label_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net


@torch.no_grad()
def _predict(net: nn.Module, x_test: ImageSource, device: torch.device, chunk: int = 1024) -> torch.Tensor:
    """Class predictions (M,) of one trained module on x_test (M, C, H, W)."""
    net.eval()
    return torch.cat([net(x_test[j:j + chunk].to(device)).argmax(1).cpu() for j in range(0, len(x_test), chunk)])


def predict_protocol_dc(model: nn.Module, images: ImageSource, labels: torch.Tensor, x_test: ImageSource,
                        protocol: ProtocolDC, seed: int, ids: list[int], lr: float | None = None) -> torch.Tensor:
    """Networks ``ids`` of the protocol trained on the set → their predictions on x_test, (len(ids), M).

    The unit of evaluation work: net i's draws are keyed by (seed, i) only, so any split
    of the networks over workers gives the same predictions. Arguments as
    :func:`evaluate_protocol_dc`.
    """
    if lr is not None:
        lr = float(lr)
        _check_lr("evaluate_protocol_dc: lr", lr)
    images, labels = _flatten_steps(images, labels)
    labels = labels.to(images.device)
    return torch.stack([_predict(train_one(model, images, labels, protocol, seed, i, lr), x_test, images.device)
                        for i in ids])


def evaluate_protocol_dc(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         x_test: ImageSource, y_test: torch.Tensor, protocol: ProtocolDC,
                         seed: int, lr: float | None = None, progress: bool = False) -> EvalResult:
    """Train ``protocol.nets`` fresh networks on a set and test them on real data.

    Args:
        model: template module (e.g. ConvNet); deep-copied per network, never modified.
        images: (N, C, H, W), or (S, N, C, H, W) synthetic batches whose S steps are pooled.
        labels: (N,) int64 — per image of one step, repeated over S — or (S·N,); or learned label
            logits (N, classes) / (S·N, classes), trained on by ``protocol.label_loss``.
        x_test: (M, C, H, W) real test images; y_test: (M,) their labels.
        protocol: the training settings.
        seed: run seed; net i draws from the EVAL stream keyed (seed, i).
        lr: overrides ``protocol.lr`` (MTT's learned step size); decays the same way.
        progress: show a tqdm bar over networks.

    Returns:
        Test accuracy mean ± std over the ``protocol.nets`` networks.
    """
    preds = [predict_protocol_dc(model, images, labels, x_test, protocol, seed, [i], lr)
             for i in tqdm(range(protocol.nets), desc="eval nets", disable=not progress)]
    return summarise(torch.cat(preds), y_test.cpu())
