"""The one home of input checks: every message is ``<option>: invalid value <value>; <allowed>`` in one line,
with the option named as the user knows it (a flag, an expert option, a key of a search file)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest

from ddray.validation import (boolean, each, error, flag, is_int, is_number, nonneg_int, nonneg_number, one_of,
                              positive_int, positive_number, reported_as)


@pytest.mark.parametrize("check, good, bad, allowed", [
    (positive_int, [1, 7], [0, -1, 1.0, True, "3", None], "expected a positive integer"),
    (nonneg_int, [0, 3], [-1, 0.0, False], "expected an integer >= 0"),
    (positive_number, [0.5, 2], [0, -0.1, float("nan"), float("inf"), True, "1"], "expected a positive number"),
    (nonneg_number, [0, 0.25], [-1e-9, float("nan"), None], "expected a number >= 0"),
    (boolean, [True, False], [0, 1, "true", None], "expected true or false"),
])
def test_each_check_accepts_what_it_says_and_names_the_option(check: Callable[[str, Any], None], good: list[Any],
                                                              bad: list[Any], allowed: str) -> None:
    for v in good:
        check("--x", v)
    for v in bad:
        with pytest.raises(ValueError) as e:
            check("--x", v)
        assert str(e.value) == f"--x: invalid value {v!r}; {allowed}"


def test_one_of_lists_the_choices() -> None:
    one_of("--mode", "sync", ("sync", "async"))
    with pytest.raises(ValueError, match=r"^--mode: invalid value 'fast'; choose one of sync, async$"):
        one_of("--mode", "fast", ("sync", "async"))


def test_each_names_fields_as_flags_or_by_a_label() -> None:
    @dataclasses.dataclass
    class Settings:
        eval_every: int = 5
        train_epochs: int = 0

    each(positive_int, Settings(), "eval_every")
    with pytest.raises(ValueError, match=r"^--train-epochs: invalid value 0"):
        each(positive_int, Settings(), "eval_every", "train_epochs")
    with pytest.raises(ValueError, match=r"^spec.yaml: resources.train_epochs: invalid value 0"):
        each(positive_int, Settings(), "train_epochs", label=lambda n: f"spec.yaml: resources.{n}")


def test_reported_as_prefixes_another_checks_error() -> None:
    with pytest.raises(ValueError) as e:
        with reported_as("spec.yaml: fixed"):
            positive_int("--steps", 0)
    assert str(e.value) == "spec.yaml: fixed: --steps: invalid value 0; expected a positive integer"
    with pytest.raises(ValueError, match=r"^f: bad type"):
        with reported_as("f"):
            raise TypeError("bad type")


def test_helpers() -> None:
    assert flag("eval_every") == "--eval-every"
    assert str(error("--x", "no")) == "--x: no"
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3.5) and not is_number(float("inf")) and not is_number(False)
