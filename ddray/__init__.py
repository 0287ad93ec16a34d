"""ddray: dataset distillation (Wang et al. 2018) scaled out on Ray, tracked in MLflow.

Public API::

    from ddray import load_config, distill, load_distilled, evaluate
    cfg = load_config(None, init="random", iterations=300)
    result = distill(cfg)                    # in-process reference loop
    d = load_distilled(result.out)           # or "runs:/<mlflow run id>"
    print(evaluate(d, nets=20))
"""

from __future__ import annotations

__version__ = "0.1.0"

from ddray.threads import passive_wait as _passive_wait  # noqa: E402

_passive_wait()  # before torch loads OpenMP: idle threads sleep instead of spinning (see ddray/threads.py)

from typing import TYPE_CHECKING, Any

__all__ = [
    "__version__", "Config", "load_config", "load_dataset", "distill", "evaluate", "load_distilled",
    "save_distilled", "Distilled", "meta_gradient", "unroll", "build_model", "ProtocolDC", "ExpertSettings",
    "train_experts",
]

if TYPE_CHECKING:
    from ddray.artifact import Distilled
    from ddray.core.evaluate import EvalResult
    from ddray.core.protocol import ProtocolDC

_LAZY = {
    "Config": "ddray.config", "load_config": "ddray.config", "load_dataset": "ddray.data",
    "distill": "ddray.distill", "load_distilled": "ddray.artifact", "save_distilled": "ddray.artifact",
    "Distilled": "ddray.artifact", "meta_gradient": "ddray.core.unroll", "unroll": "ddray.core.unroll",
    "build_model": "ddray.core.models", "ProtocolDC": "ddray.core.protocol", "ExpertSettings": "ddray.experts",
    "train_experts": "ddray.experts",
}


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import ddray` (and `ddray --help`) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddray' has no attribute {name!r}")


def evaluate(distilled: "Distilled | str", nets: int = 20, shuffled: bool = False,
             data_root: str | None = None, protocol: "str | ProtocolDC | None" = None) -> "EvalResult":
    """Train ``nets`` held-out networks on a distilled set (object, directory or ``runs:/`` URI) and test them.

    ``protocol``: ``"dd"`` (the set's own schedule), ``"dc"`` or a :class:`ProtocolDC` (the
    DC/DSA/DM/MTT papers' training from scratch); default: the one of the set's method.
    """
    from ddray.artifact import load_distilled
    from ddray.distill import evaluate_distilled, problem_for

    d = distilled if not isinstance(distilled, str) else load_distilled(distilled)
    return evaluate_distilled(problem_for(d, data_root), d, nets, shuffled, protocol)
