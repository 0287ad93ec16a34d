"""torchvision data sets read from a local root in their standard on-disk format.

(Being written: mnist, fashion_mnist, cifar10, svhn, usps.)
"""

from __future__ import annotations

from typing import Callable


def register_all(register: Callable[..., None]) -> None:
    """Register every torchvision data set with ``register(name, loader)``."""
