"""A finished (or interrupted) search's results as one :class:`TrialRow` per trial.

Read from what each trial reported to Tune (:mod:`ddray.tune.trial`): the metric's history
over meta-steps, its std where the metric is a mean, how far the trial got, whether it
finished, and where its distilled data and MLflow run are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddray.config import FIELD_SECTION
from ddray.tune.spec import TuneSpec
from ddray.tune.trial import FINISHED, TIME_ATTR


@dataclass
class TrialRow:
    """One line of the final table."""

    trial_id: str
    params: dict[str, Any]
    status: str  # done | stopped | error
    value: float | None  # last measured value of the metric
    value_step: int | None
    history: dict[int, float]  # step → metric
    distilled_dir: str | None
    run_id: str | None
    steps_reached: int | None = None  # the last meta-step the trial reported
    value_std: float | None = None  # the metric's std over held-out nets at value_step (metrics *_mean)


def std_column(metric: str) -> str | None:
    """The result key holding the metric's spread (``eval_acc_mean`` → ``eval_acc_std``), if any."""
    return metric[:-len("_mean")] + "_std" if metric.endswith("_mean") else None


def _history(df: Any, key: str | None) -> dict[int, float]:
    """step → value of result column ``key`` where it was reported."""
    import pandas as pd

    if key is None or key not in df.columns or TIME_ATTR not in df.columns:
        return {}
    return {int(step): float(val) for step, val in zip(df[TIME_ATTR], df[key])
            if val is not None and not pd.isna(val)}


def trial_rows(results: Any, spec: TuneSpec) -> list[TrialRow]:
    """One row per trial of a Tune ``ResultGrid``, in its order."""
    import pandas as pd

    rows = []
    for res in results:
        m = res.metrics or {}
        df = res.metrics_dataframe if res.metrics_dataframe is not None else pd.DataFrame()
        history = _history(df, spec.metric)
        last = max(history) if history else None
        stds = _history(df, std_column(spec.metric))
        reached = [int(s) for s in df[TIME_ATTR] if not pd.isna(s)] if TIME_ATTR in df.columns else []
        distilled = None
        finished = bool(m.get(FINISHED))
        if finished and res.checkpoint is not None and Path(res.checkpoint.path, "distilled").is_dir():
            distilled = str(Path(res.checkpoint.path, "distilled"))
        elif finished:
            distilled = m.get("distilled_dir")
        status = "error" if res.error else ("done" if finished else "stopped")
        params = {k: v for k, v in (res.config or {}).items() if k in FIELD_SECTION}
        rows.append(TrialRow(str(m.get("trial_id", Path(res.path).name)), params, status,
                             history[last] if last is not None else None, last, history, distilled,
                             m.get("mlflow_run_id"), max(reached) if reached else None,
                             stds.get(last) if last is not None else None))
    return rows
