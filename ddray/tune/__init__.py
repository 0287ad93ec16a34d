"""``ddray tune``: Ray Tune searches over distillation settings, from ``tune_configs/*.yaml``.

* :mod:`ddray.tune.spec` — the search file → a validated :class:`TuneSpec` (no Ray needed);
* :mod:`ddray.tune.trial` — one trial: a whole distillation reporting to Tune;
* :mod:`ddray.tune.search` — :func:`run_search`: the Tuner, its scheduler and callbacks;
* :mod:`ddray.tune.results` — Tune's results as one :class:`TrialRow` per trial;
* :mod:`ddray.tune.summary` — the best trial, the reference comparison, the best config;
* :mod:`ddray.tune.report` — ``results.csv`` and the plots.

Names are imported lazily, so ``from ddray.tune.spec import …`` (``ddray --help``, search-file
validation) does not load Ray Tune.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CONFIRM_ABOVE", "TuneSpec", "load_tune_spec", "parse_tune_spec", "run_search", "run_trial_distillation",
           "SearchSummary", "TrialRow", "ReferenceASHA", "summarize", "tune_trial"]

_LAZY = {
    "CONFIRM_ABOVE": "ddray.tune.spec", "TuneSpec": "ddray.tune.spec", "load_tune_spec": "ddray.tune.spec",
    "parse_tune_spec": "ddray.tune.spec", "run_search": "ddray.tune.search", "ReferenceASHA": "ddray.tune.search",
    "run_trial_distillation": "ddray.tune.trial", "tune_trial": "ddray.tune.trial",
    "SearchSummary": "ddray.tune.summary", "summarize": "ddray.tune.summary", "TrialRow": "ddray.tune.results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddray.tune' has no attribute {name!r}")
