"""ddray: dataset distillation (Wang et al. 2018) scaled out on Ray, tracked in MLflow.

Public API::

    from ddray import load_config, distill, load_distilled, evaluate
    cfg = load_config(None, init="random", iterations=300)
    result = distill(cfg)                    # in-process reference loop
    d = load_distilled(result.out)           # or "runs:/<mlflow run id>"
    print(evaluate(d, nets=20))
"""

from __future__ import annotations

from ddray._version import __version__

from ddray.threads import set_wait_policy as _set_wait_policy  # noqa: E402

_set_wait_policy()  # before torch loads OpenMP: a bounded spin, or sleep where the cores are taken (ddray/threads.py)

from typing import TYPE_CHECKING, Any

__all__ = [
    "__version__", "Config", "load_config", "load_dataset", "distill", "evaluate", "load_distilled",
    "save_distilled", "Distilled", "meta_gradient", "unroll", "build_model", "ProtocolDC", "ExpertSettings",
    "train_experts",
]

if TYPE_CHECKING:
    from pathlib import Path

    from ddray.core.protocol_dc import ProtocolDC
    from ddray.core.protocol_dd import EvalResult
    from ddray.store.artifact import Distilled

_LAZY = {
    "Config": "ddray.config", "load_config": "ddray.config", "load_dataset": "ddray.data",
    "distill": "ddray.run.loop", "save_distilled": "ddray.store.artifact",
    "Distilled": "ddray.store.artifact", "meta_gradient": "ddray.core.unroll", "unroll": "ddray.core.unroll",
    "build_model": "ddray.core.models", "ProtocolDC": "ddray.core.protocol_dc",
    "ExpertSettings": "ddray.inputs.experts",
    "train_experts": "ddray.inputs.experts",
}


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import ddray` (and `ddray --help`) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddray' has no attribute {name!r}")


def load_distilled(path: "str | Path", tracking_uri: str | None = None) -> "Distilled":
    """Read a distilled set from a directory, or from an MLflow run: ``runs:/<run id>[/<artifact path>]``.

    A ``runs:/`` URI is resolved here, where it enters, and downloaded from the tracking store
    (``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``);
    :func:`ddray.store.artifact.read_distilled` itself reads directories only.
    """
    from ddray.store.artifact import read_distilled as read

    src = str(path)
    if src.startswith(("runs:/", "models:/")):
        from ddray.tracking.tracker import download_distilled

        return read(download_distilled(src, tracking_uri))
    return read(path)


def evaluate(distilled: "Distilled | str", nets: int = 20, shuffled: bool = False,
             data_root: str | None = None, protocol: "str | ProtocolDC | None" = None) -> "EvalResult":
    """Train ``nets`` held-out networks on a distilled set (object, directory or ``runs:/`` URI) and test them.

    ``protocol``: ``"dd"`` (the set's own schedule), ``"dc"`` or a :class:`ProtocolDC` (the
    DC/DSA/DM/MTT papers' training from scratch); default: the one of the set's method.
    """
    from ddray.evaluation.held_out import evaluate_distilled, problem_for

    d = distilled if not isinstance(distilled, str) else load_distilled(distilled)
    return evaluate_distilled(problem_for(d, data_root), d, nets, shuffled, protocol)
