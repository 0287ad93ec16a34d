"""The end of a search: the best trial, the comparison with the reference, the best config, the table.

:func:`summarize` turns Tune's results into a :class:`SearchSummary` and writes, in the
experiment directory (STORAGE_PATH/NAME; written locally first when that is a URI, then
stored there): ``best_config.yaml`` (ready for ``ddray distill --config``), ``trials.txt``
and the report of :mod:`ddray.tune.report` (``results.csv`` and plots).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ddray.store.storage import is_uri, join, write_bytes
from ddray.tune.report import write_report
from ddray.tune.results import TrialRow, trial_rows
from ddray.tune.spec import TuneSpec


@dataclass
class SearchSummary:
    """What ``ddray tune`` prints and writes at the end."""

    rows: list[TrialRow]
    best: TrialRow
    best_config_path: Path  # a local copy (next to trials.txt)
    reference: TrialRow | None
    comparison: str | None
    parent_run_id: str | None
    best_config_location: Path | str | None = None  # where it is stored: STORAGE_PATH/NAME/best_config.yaml
    report: list[Path] = field(default_factory=list)  # results.csv and the plots

    def table(self, metric: str, keys: list[str]) -> str:
        head = ["trial", *keys, metric, "at step", "status"]
        lines = [head]
        for r in self.rows:
            mark = " *" if r is self.best else (" (ref)" if r is self.reference else "")
            val = "-" if r.value is None else f"{r.value:.4f}"
            lines.append([r.trial_id + mark, *[_fmt(r.params.get(k)) for k in keys], val,
                          "-" if r.value_step is None else str(r.value_step), r.status])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def compare_to_reference(best: TrialRow, ref: TrialRow | None, spec: TuneSpec, rows: list[TrialRow]) -> str | None:
    """What the table says about the reference point: by how much the best trial beats it (or falls short)."""
    if ref is None or ref.value is None or best.value is None:
        return None
    sign = 1 if spec.mode == "max" else -1
    unit, scale = (" points", 100.0) if spec.metric.startswith(("eval_", "attack")) else ("", 1.0)
    if ref is best:
        others = [r for r in rows if r is not ref and r.status == "done" and r.value is not None]
        if not others:
            return f"the reference ({spec.metric} {ref.value:.4f}) is the only finished trial: nothing beat it"
        runner = max(others, key=lambda r: sign * (r.value or 0.0))
        short = sign * (ref.value - (runner.value or 0.0)) * scale
        return (f"the search did not beat the reference ({spec.metric} {ref.value:.4f}): the best other "
                f"finished trial, {runner.trial_id}, reached {runner.value:.4f}, {short:.1f}{unit} short")
    if ref.status == "done":
        diff = sign * (best.value - ref.value) * scale
        verdict = f"beats it by {diff:.1f}{unit}" if diff > 0 else f"does not beat it: {-diff:.1f}{unit} short"
        return (f"best {spec.metric} {best.value:.4f} vs reference {ref.value:.4f} "
                f"(both after {ref.value_step} meta-steps): {verdict}")
    at = ref.value_step
    best_then = best.history.get(at) if at is not None else None
    then = "" if best_then is None else f"; the best trial had {best_then:.4f} at that step"
    return (f"the reference was stopped early ({ref.status}) with {spec.metric} {ref.value:.4f} at step {at}"
            f"{then}; the best trial reached {best.value:.4f} at step {best.value_step}")


def _is_reference(row: TrialRow, ref: Mapping[str, Any] | None) -> bool:
    return bool(ref) and all(row.params.get(k) == v for k, v in (ref or {}).items())


def write_best_config(spec: TuneSpec, best: TrialRow, path: Path) -> Path:
    """The best trial's full config as a ready-to-run ``ddray distill --config`` YAML."""
    cfg = spec.trial_config(best.params)
    header = (f"# Best trial {best.trial_id} of the Ray Tune search {spec.name!r} ({spec.source}):\n"
              f"#   {spec.metric} = {best.value:.4f} after {best.value_step} meta-steps.\n"
              f"# Searched: {', '.join(f'{k}={_fmt(best.params.get(k))}' for k in spec.search)}.\n"
              f"# Run it:   ddray distill --config {path}\n")
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def summarize(results: Any, spec: TuneSpec, parent_run_id: str | None = None) -> SearchSummary:
    """The trial table, results.csv and plots, the best (finished) trial, its config file and the reference
    comparison, in STORAGE_PATH/NAME (written locally first when that is a URI, then stored there). The
    report is written even when no trial finished (then a ValueError follows)."""
    rows = trial_rows(results, spec)
    exp_dir = spec.experiment_dir
    local = Path(tempfile.mkdtemp(prefix="ddray-tune-")) if is_uri(exp_dir) else Path(exp_dir)
    report = write_report(rows, spec, local)
    done = [r for r in rows if r.status == "done" and r.value is not None]
    if not done:
        _store(local, report, exp_dir)
        errors = [str(res.error).splitlines()[0] for res in results if res.error]
        raise ValueError(f"{spec.source}: no trial finished" + (f" (first error: {errors[0]})" if errors else ""))
    pick = max if spec.mode == "max" else min
    best = pick(done, key=lambda r: r.value if r.value is not None else -math.inf)
    ref = next((r for r in rows if _is_reference(r, spec.reference)), None)
    best_path = write_best_config(spec, best, local / "best_config.yaml")
    summary = SearchSummary(rows, best, best_path, ref, compare_to_reference(best, ref, spec, rows), parent_run_id,
                            join(exp_dir, "best_config.yaml"), report)
    (local / "trials.txt").write_text(summary.table(spec.metric, list(spec.search)) + "\n")
    _store(local, [best_path, local / "trials.txt", *report], exp_dir)
    return summary


def _store(local: Path, files: list[Path], exp_dir: Path | str) -> None:
    """The stored copies of files written in ``local``, next to Tune's results (when those are at a URI)."""
    if is_uri(exp_dir):
        for f in files:
            write_bytes(join(exp_dir, str(f.relative_to(local))), f.read_bytes())
