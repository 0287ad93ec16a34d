"""The command line end to end on the embedded data, in-process (the Ray path has its own tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ddray.cli import build_parser, main
from ddray.store.artifact import read_distilled

TINY = ["--steps", "2", "--epochs", "2", "--ipc", "1", "--iterations", "3", "--nets", "2", "--batch-size", "64",
        "--eval-nets", "2", "--no-tracking", "--no-scores"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["distill", "--local", "--no-progress", "--init", "fixed", "--out", str(out), *TINY]) == 0
    return out


def test_distill_writes_artifact_grid_eval_and_checkpoint(distilled: Path) -> None:
    for f in ("data.parquet", "meta.json", "init_params.safetensors", "grid.png", "lrs.png", "eval.json",
              "config.yaml"):
        assert (distilled / f).is_file(), f
    assert list((distilled / "checkpoints").glob("step-00000003.pt"))
    meta = json.loads((distilled / "meta.json").read_text())
    assert meta["iterations"] == 3 and meta["init"] == {"mode": "fixed", "scheme": "xavier"}
    assert meta["config"]["distill"]["steps"] == 2
    report = json.loads((distilled / "eval.json").read_text())
    assert report["test"]["n"] == 2
    from ddray.evaluation.held_out import evaluate_distilled, problem_for

    d = read_distilled(distilled)  # the same two held-out networks, trained again from the artifact
    again = evaluate_distilled(problem_for(d), d, 2)
    assert (report["test"]["mean"], report["test"]["std"]) == (again.mean, again.std)
    assert "shuffled_order" in report


def test_evaluate_json_uses_the_saved_theta0(distilled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "evaluate", str(distilled), "--nets", "3", "--json", "--no-scores")
    assert rc == 0
    r = json.loads(out)
    assert set(r) == {"mean", "std", "n", "protocol", "scores"} and r["scores"] is None
    assert r["n"] == 3 and r["protocol"] == "dd"
    assert r["std"] == 0.0  # fixed init: every network starts from the same saved θ₀


def test_show_prints_png_path(distilled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "show", str(distilled), "--png", str(tmp_path / "g.png"))
    assert rc == 0 and out.strip() == str((tmp_path / "g.png").resolve())
    from PIL import Image

    w, h = Image.open(tmp_path / "g.png").size
    # 2 rows (steps) × 10 columns (classes) of 28-pixel images at ×2, plus the labels around them
    assert 10 * 56 < w < 10 * 56 + 300 and 2 * 56 < h < 2 * 56 + 200, (w, h)


@pytest.mark.parametrize("method", ["random", "optimized", "kmeans", "average"])
def test_baselines_write_the_same_format(method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "baseline", "--method", method, "--candidates", "5", "--out", str(tmp_path), *TINY)
    assert rc == 0, out
    d = read_distilled(tmp_path / "baselines" / method)
    assert d.images.shape == (2, 10, 1, 28, 28) and d.lrs.shape == (4,)
    assert torch.all(d.lrs == d.lrs[0]), "baselines use one fixed step size"
    assert d.meta["method"] == f"baseline-{method}"
    if method == "average":
        assert torch.allclose(d.images[0], d.images[1])


def test_pretrain_then_adapt_with_both_pretrained_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "pool"
    rc, out, _ = run(capsys, "pretrain", "--dataset", "digits", "--image-size", "28", "--nets", "3", "--epochs", "1",
                     "--out", str(pool), "--no-progress")
    assert rc == 0 and (pool / "pool.json").is_file() and len(list(pool.glob("net-*.safetensors"))) == 3
    for mode in ("fixed-pretrained", "random-pretrained"):
        rc, out, err = run(capsys, "distill", "--local", "--no-progress", "--init", mode, "--pretrained", str(pool),
                           "--out", str(tmp_path / mode), *TINY)
        assert rc == 0, err
        assert "distilled (dd)" in out
    # a pool for another image size does not fit MNIST-5k's 28×28
    small = tmp_path / "small"
    assert main(["pretrain", "--dataset", "digits", "--model", "convnet", "--nets", "1", "--epochs", "1",
                 "--out", str(small), "--no-progress"]) == 0
    capsys.readouterr()
    rc, _, err = run(capsys, "distill", "--local", "--init", "random-pretrained", "--pretrained", str(small),
                     "--model", "convnet", *TINY)
    assert rc == 2 and "--pretrained: pool" in err and "--image-size" in err


def test_attack_reports_the_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "distill", "--local", "--no-progress", "--attack", "0:1", "--out", str(tmp_path), *TINY)
    assert rc == 0, err
    assert "attack success" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["test"]["attack_rate_mean"] is not None


@pytest.mark.parametrize("argv,message", [
    (["distill", "--ipc", "0"], "--ipc: invalid value 0; expected a positive integer"),
    (["distill", "--steps", "-1"], "--steps: invalid value -1"),
    (["distill", "--dataset", "imagenet"], "--dataset: invalid value 'imagenet'"),
    (["distill", "--model", "vgg"], "--model: invalid value 'vgg'"),
    (["distill", "--init", "zeros"], "--init: invalid value 'zeros'"),
    (["distill", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent/cifar-10-batches-py"),
    (["distill", "--attack", "0:12"], "--attack: 0:12 names a class outside 0..9"),
    (["evaluate", "/nonexistent"], "not a distilled-data directory"),
    (["baseline", "--method", "best"], "--method: invalid value 'best'"),
    (["distill", "--dataset", "imagefolder", "--data-root", "/nonexistent"], "--data-root: /nonexistent does not exist"),
    (["distill", "--dataset", "imagefolder"], "--data-root: missing; --dataset imagefolder reads a folder"),
    (["distill", "--data-cache-mb", "0"], "--data-cache-mb: invalid value 0; expected a positive integer"),
    (["distill", "--test-fraction", "1"], "--test-fraction: invalid value 1.0; expected a number between 0 and 1"),
    (["distill", "--zca-eps", "-1"], "--zca-eps: invalid value -1.0; expected a positive number"),
    (["distill", "--data-root", "s3://bucket/x"], "--data-root s3://bucket/x: a URI is read by --dataset parquet only"),
])
def test_bad_input_is_one_line_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--local"] if argv[0] == "distill" else []
    rc, out, err = run(capsys, *argv, *extra)
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_help_lists_subcommands() -> None:
    text = build_parser().format_help()
    for cmd in ("distill", "evaluate", "compare", "baseline", "pretrain", "show", "tune"):
        assert cmd in text


def test_help_reads_the_defaults_from_the_config() -> None:
    """The flags' defaults come from the config dataclasses and ddray.methods, not from text in cli.py."""
    from ddray.cli import OVERRIDES, _help
    from ddray.config import FIELD_DEFAULTS, DistillConfig, RunConfig
    from ddray.methods import METHODS

    restated = [n for n, (_, text) in OVERRIDES.items()
                if FIELD_DEFAULTS[n] is not None and re.search(r"default:? -?[0-9]", text)]
    assert restated == []
    assert _help("steps").endswith(f"(default {DistillConfig.steps})")
    assert _help("experiment").endswith(f"(default {RunConfig.experiment})")
    assert _help("placement_timeout").endswith("(default 600)")  # a float default as the user types it
    assert "(default 128, the papers')" in _help("width") and "(default 300; the papers: 1000)" in _help("eval_epochs")
    assert f"mtt {METHODS['mtt'].lr:g} (sgd)" in _help("lr") and "dd noise" in _help("syn_init")
    assert "(default" not in _help("data_root")  # None: no default to show
    for name in OVERRIDES:
        default = FIELD_DEFAULTS[name]
        if default is not None and not isinstance(default, bool):
            shown = format(default, "g") if isinstance(default, float) else str(default)
            assert f"default {shown}" in _help(name), name


def test_distill_an_image_folder_archive_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user's 3-class tree, packed as .tar.gz: distilled, evaluated and drawn with its class names; nothing
    but the run directory and the decode cache is written."""
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tree = tmp_path / "shapes"
    for split, n in (("train", 10), ("test", 4)):
        for c, name in enumerate(("circle", "square", "triangle")):
            (tree / split / name).mkdir(parents=True)
            for i in range(n):
                px = np.clip(rng.normal(50 + 80 * c, 25, (12, 12)), 0, 255).astype(np.uint8)  # greyscale
                Image.fromarray(px).save(tree / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    archive = tmp_path / "shapes.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="shapes")
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["distill", "--local", "--no-progress", "--dataset", "imagefolder", "--data-root", str(archive),
            "--cache-dir", str(cache), "--model", "convnet", "--width", "8", "--out", str(out), *TINY,
            "--batch-size", "16"]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dataset"] == "imagefolder" and meta["classes"] == 3
    assert meta["class_names"] == ["circle", "square", "triangle"] and meta["shape"] == [1, 12, 12]
    d = read_distilled(out)
    assert d.images.shape == (2, 3, 1, 12, 12)
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) != []  # decoded once, cached
    rc, stdout, _ = run(capsys, "evaluate", str(out), "--json", "--nets", "2", "--no-scores")
    assert rc == 0 and json.loads(stdout)["n"] == 2
    rc, stdout, _ = run(capsys, "show", str(out), "--png", str(tmp_path / "g.png"))
    assert rc == 0 and (tmp_path / "g.png").is_file()
