"""Config: validation messages name the option, the value and what is allowed; YAML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ddray.config import Config, load_config


@pytest.mark.parametrize("override,message", [
    ({"ipc": 0}, "--ipc: invalid value 0; expected a positive integer"),
    ({"steps": -1}, "--steps: invalid value -1; expected a positive integer"),
    ({"dataset": "imagenet"}, "--dataset: invalid value 'imagenet'; choose one of"),
    ({"model": "vgg"}, "--model: invalid value 'vgg'; choose one of lenet, alexcifarnet, convnet"),
    ({"init": "zeros"}, "--init: invalid value 'zeros'; choose one of fixed, random"),
    ({"init_scheme": "he"}, "--init-scheme: invalid value 'he'"),
    ({"lr": -0.1}, "--lr: invalid value -0.1; expected a positive number"),
    ({"attack": "3"}, "--attack: invalid value '3'; expected SOURCE:TARGET"),
    ({"attack": "2:2"}, "source and target class must differ"),
    ({"init": "fixed-pretrained"}, "--init fixed-pretrained needs --pretrained DIR"),
    ({"memory": "none"}, "--memory: invalid value 'none'"),
    ({"workers": 0}, "--workers: invalid value 0; expected a positive integer"),
    ({"max_staleness": -1}, "--max-staleness: invalid value -1; expected an integer >= 0"),
    ({"compile": "yes"}, "--compile: invalid value 'yes'; expected true or false"),
])
def test_invalid_values_name_option_value_and_allowed(override: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        Config().override(**override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_roundtrip_and_flat_keys(tmp_path: Path) -> None:
    cfg = Config().override(steps=5, ipc=2, seed=3, dataset="digits")
    cfg.dump(tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg
    assert back.flat()["distill.steps"] == 5
    flat = load_config(None, steps=7, workers=2)
    assert flat.distill.steps == 7 and flat.cluster.workers == 2


def test_unknown_keys_and_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("distill:\n  stepz: 3\n")
    with pytest.raises(ValueError, match="unknown key distill.stepz"):
        load_config(f)
    f.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        load_config(f)
    with pytest.raises(ValueError, match="--config: file not found"):
        load_config(tmp_path / "missing.yaml")
    f.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(f)


def test_configs_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.distill.steps = 3  # type: ignore[misc]
    assert cfg.distill.total_steps == 30


@pytest.mark.parametrize("method, extra, layout, protocol, initial_lr", [
    ("dd", {"steps": 4, "epochs": 2, "init_lr": 0.05}, (4, 2), "dd", 0.05),
    ("dc", {"net_lr": 0.03}, (1, 1), "dc", 0.03),
    ("dm", {}, (1, 1), "dc", 0.01),
    ("mtt", {"experts": "experts/", "net_lr": 0.02}, (1, 1), "dc", 0.02),
])
def test_the_method_decides_layout_protocol_and_first_step_size(method: str, extra: dict, layout: tuple[int, int],
                                                                protocol: str, initial_lr: float) -> None:
    cfg = Config.from_dict({"method": method, **extra})
    assert cfg.distill.layout == layout and cfg.distill.total_steps == layout[0] * layout[1]
    assert cfg.protocol == protocol and cfg.override(eval_protocol="dd").protocol == "dd"
    assert cfg.distill.initial_lr == pytest.approx(initial_lr)


def test_mtt_needs_its_experts() -> None:
    with pytest.raises(ValueError, match=r"^--method mtt needs --experts DIR"):
        Config.from_dict({"method": "mtt"})


def test_compile_flags_set_the_run_section() -> None:
    from ddray.cli import _config_from, build_parser

    p = build_parser()
    assert _config_from(p.parse_args(["distill", "--compile"])).run.compile is True
    assert _config_from(p.parse_args(["distill", "--no-compile"])).run.compile is False
    assert _config_from(p.parse_args(["distill"])).run.compile is False
