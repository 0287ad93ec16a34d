"""Checking user input, and saying what is wrong in one line: ``<option>: invalid value <value>; <allowed>``.

The one home of ddray's input checks, used by the run config (:mod:`ddray.config`, options
named as flags: ``--steps``), the expert settings (:mod:`ddray.inputs.experts`: ``--train-epochs``)
and the search file (:mod:`ddray.tune.spec`: ``FILE: resources.workers``). Every check takes
the option's name as the user knows it, so the message points at what to fix::

    positive_int("--steps", 0)       # ValueError: --steps: invalid value 0; expected a positive integer
    each(positive_int, cfg, "steps", "epochs")          # the fields of a config, named as flags
    with reported_as("spec.yaml: fixed"): Config.from_dict(raw)   # another check's error, prefixed
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml


def flag(name: str) -> str:
    """The command-line flag of config field ``name`` (``eval_every`` → ``--eval-every``)."""
    return "--" + name.replace("_", "-")


def is_int(v: Any) -> bool:
    """An integer (bools excluded)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (bools excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def error(option: str, message: str) -> ValueError:
    """``<option>: <message>`` as a ValueError (the CLI prints it as one line)."""
    return ValueError(f"{option}: {message}")


def invalid(option: str, value: Any, allowed: str) -> ValueError:
    """``<option>: invalid value <value>; <allowed>`` as a ValueError."""
    return error(option, f"invalid value {value!r}; {allowed}")


def read_yaml(path: str | Path, option: str) -> Any:
    """The YAML document in file ``path``; a missing file or invalid YAML is an :func:`error` of ``option``."""
    p = Path(path)
    if not p.is_file():
        raise error(option, f"file not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise error(option, f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None


def require(ok: bool, option: str, value: Any, allowed: str) -> None:
    """Raise :func:`invalid` unless ``ok``."""
    if not ok:
        raise invalid(option, value, allowed)


def positive_int(option: str, value: Any) -> None:
    require(is_int(value) and value > 0, option, value, "expected a positive integer")


def nonneg_int(option: str, value: Any) -> None:
    require(is_int(value) and value >= 0, option, value, "expected an integer >= 0")


def positive_number(option: str, value: Any) -> None:
    require(is_number(value) and value > 0, option, value, "expected a positive number")


def nonneg_number(option: str, value: Any) -> None:
    require(is_number(value) and value >= 0, option, value, "expected a number >= 0")


def boolean(option: str, value: Any) -> None:
    require(isinstance(value, bool), option, value, "expected true or false")


def one_of(option: str, value: Any, allowed: Sequence[str]) -> None:
    require(value in allowed, option, value, f"choose one of {', '.join(allowed)}")


def each(check: Callable[[str, Any], None], obj: Any, *names: str,
         label: Callable[[str], str] = flag) -> None:
    """``check(label(name), obj.<name>)`` for every name: the fields of a dataclass, named as the user knows them."""
    for name in names:
        check(label(name), getattr(obj, name))


@contextmanager
def reported_as(option: str) -> Iterator[None]:
    """Re-raise a ValueError/TypeError of the block as :func:`error` of ``option`` (one line, the cause's text)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise error(option, str(e)) from None


def parse_lrs(text: str | Sequence[float], option: str = "--score-lrs") -> tuple[float, ...]:
    """``"0.001,0.01"`` (or a sequence) → (0.001, 0.01); ValueError naming ``option`` otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        lrs = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        lrs = ()
    if not lrs or not all(math.isfinite(x) and x > 0 for x in lrs):
        raise ValueError(f"{option}: invalid value {text!r}; expected comma-separated learning rates > 0, "
                         "e.g. 0.001,0.005,0.01,0.05,0.1 (DD-Ranking's search)")
    return lrs
