"""Networks (LeNet, AlexCifarNet, ConvNet) and their initialisation schemes.

Networks are ordinary ``nn.Module``s used only as *templates*: training runs
them through ``torch.func.functional_call`` over a ``dict[str, Tensor]`` of
parameters, so one module serves any number of parameter sets. None of them
has buffers (ConvNet's instance norm is ``GroupNorm(c, c)``), so the parameter
dict is the whole state.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


class LeNet(nn.Module):
    """LeNet-5 exactly as the original dataset-distillation code.

    conv1 5×5→6 (padding 2 for 28×28 input) → ReLU → max-pool 2 → conv2 5×5→16 →
    ReLU → max-pool 2 → fc1 →120 → ReLU → fc2 →84 → ReLU → fc3 →C.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        pad = 2 if image_size == 28 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"--model lenet: image size {image_size} is too small (needs >= 16 pixels)")
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        """Logits (B, classes), or with ``embed`` the penultimate features (B, 84)."""
        # max-pool commutes with ReLU; pooling first does the ReLU on 4× fewer values.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return x if embed else self.fc3(x)


class AlexCifarNet(nn.Module):
    """The paper's CIFAR-10 network (the cuda-convnet "AlexNet" for 32×32 images)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if image_size != 32:
            raise ValueError(f"--model alexcifarnet: needs 32×32 images, got {image_size}×{image_size}")
        self.conv1 = nn.Conv2d(in_channels, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 8 * 8, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        """Logits (B, classes), or with ``embed`` the penultimate features (B, 192)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, stride=2, padding=1)
        x = F.local_response_norm(x, 4, alpha=0.001 / 9.0, beta=0.75, k=1.0)
        x = F.relu(self.conv2(x))
        x = F.local_response_norm(x, 4, alpha=0.001 / 9.0, beta=0.75, k=1.0)
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return x if embed else self.fc3(x)


class ConvNet(nn.Module):
    """ConvNet-3 of the DC/DM/MTT line: 3 × [conv 3×3 (128) → instance norm → ReLU → avg-pool 2] → linear."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 128,
                 depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, side = in_channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(), nn.AvgPool2d(2)]
            c, side = width, side // 2
        if side < 1:
            raise ValueError(f"--model convnet: image size {image_size} is too small for depth {depth}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        """Logits (B, classes), or with ``embed`` the flattened features (B, width·side²) — DM's embedding."""
        h = self.features(x).flatten(1)
        return h if embed else self.classifier(h)


MODEL_REGISTRY: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet": LeNet,
    "alexcifarnet": AlexCifarNet,
    "convnet": ConvNet,
}


def build_model(name: str, shape: tuple[int, int, int], num_classes: int, width: int = 128) -> nn.Module:
    """Build the template module for images of ``shape`` (C, H, W); ``width``: ConvNet's channels."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"--model: unknown model {name!r}; choose one of {', '.join(MODEL_REGISTRY)}")
    c, h, w = shape
    if h != w:
        raise ValueError(f"--model {name}: needs square images, got {h}×{w}")
    if name == "convnet":
        return ConvNet(c, h, num_classes, width=width)
    return MODEL_REGISTRY[name](c, h, num_classes)


def _is_weight(name: str, p: torch.Tensor) -> bool:
    return name.endswith("weight") and p.dim() > 1


def init_params(model: nn.Module, scheme: str, generator: torch.Generator) -> Params:
    """Draw a fresh θ₀ for ``model`` with the given scheme (deterministic in ``generator``).

    Schemes (weights of conv/linear layers; biases are zeroed, norm layers get
    weight 1 / bias 0 — except ``default``):

    * ``xavier``: Xavier normal, gain 1 (the original's default);
    * ``kaiming``: Kaiming normal for ReLU (fan-in);
    * ``normal``: N(0, 0.02²);
    * ``orthogonal``: orthogonal, gain 1;
    * ``default``: torch's own ``reset_parameters`` (biases not zeroed).
    """
    params: Params = {}
    if scheme == "default":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in model.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        return {k: v.detach().clone() for k, v in model.named_parameters()}
    for name, p in model.named_parameters():
        t = torch.empty_like(p)
        if _is_weight(name, p):
            if scheme == "xavier":
                nn.init.xavier_normal_(t, gain=1.0, generator=generator)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(t, nonlinearity="relu", generator=generator)
            elif scheme == "normal":
                nn.init.normal_(t, 0.0, 0.02, generator=generator)
            elif scheme == "orthogonal":
                nn.init.orthogonal_(t, gain=1.0, generator=generator)
            else:
                raise ValueError(f"--init-scheme: unknown scheme {scheme!r}")
        elif name.endswith("weight"):  # norm-layer scale
            t.fill_(1.0)
        else:
            t.zero_()
        params[name] = t
    return params


def stack_params(params: list[Params]) -> Params:
    """K parameter dicts → one dict of (K, ...) tensors."""
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def unstack_params(params: Params) -> list[Params]:
    """One dict of (K, ...) tensors → K parameter dicts."""
    k = next(iter(params.values())).shape[0]
    return [{n: v[i] for n, v in params.items()} for i in range(k)]
