"""``--method``, ``ddray experts`` and ``evaluate --protocol dc`` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddray.cli import main
from ddray.config import Config, load_config
from ddray.store.artifact import read_distilled

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "digits", "--model", "convnet", "--width", "8", "--no-tracking", "--no-progress", "--no-scores"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flags,message", [
    (["--method", "dm", "--init", "fixed"], "--init fixed: not available with --method dm (an option of --method dd)"),
    (["--method", "dc", "--steps", "5"], "--steps 5: not available with --method dc (an option of --method dd)"),
    (["--method", "dd", "--dsa"], "--dsa: not available with --method dd"),
    (["--method", "dsa", "--no-dsa"], "--no-dsa: not available with --method dsa"),
    (["--method", "dm", "--experts", "x"], "--experts x: not available with --method dm (an option of --method mtt)"),
    (["--method", "mtt"], "--method mtt needs --experts DIR"),
    (["--method", "mtt", "--experts", "/nonexistent"], "--experts /nonexistent: not an expert directory"),
    (["--method", "gan"], "--method: invalid value 'gan'; choose one of dd, dc, dsa, dm, mtt"),
    (["--method", "dc", "--dsa-strategy", "color_blur"], "--dsa-strategy: invalid value 'color_blur'"),
    (["--model", "lenet", "--width", "16"], "--width 16: not available with --model lenet"),
    (["--method", "dm", "--batch-syn", "2"], "--batch-syn 2: not available with --method dm (an option of --method mtt)"),
    (["--method", "mtt", "--experts", "x", "--batch-syn", "0"], "--batch-syn: invalid value 0"),
    (["--method", "mtt", "--experts", "x", "--batch-syn", "11"],
     "--batch-syn: invalid value 11; at most the set's 10 images (--ipc 1 × 10 classes)"),
    (["--method", "dm", "--labels", "learned"],
     "--labels learned: not available with --method dm (an option of --method dd, mtt)"),
    (["--labels", "soft"], "--labels: invalid value 'soft'; choose one of hard, learned"),
    (["--labels", "learned", "--lr-labels", "0"], "--lr-labels: invalid value 0.0"),
    (["--labels", "learned", "--lr-labels", "-1"], "--lr-labels: invalid value -1.0"),
    (["--label-loss", "mse"], "--label-loss: invalid value 'mse'"),
])
def test_method_incompatible_options_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         flags: list[str], message: str) -> None:
    rc, _, err = run(capsys, "distill", "--local", "--no-tracking", "--out", str(tmp_path / "run"), *flags)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("ddray distill: error: ") and message in line, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_experts_then_mtt_then_both_protocols(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    experts = tmp_path / "experts"
    rc, out, err = run(capsys, "experts", *SMALL[:6], "--num-experts", "2", "--train-epochs", "3",
                       "--expert-lr", "0.05", "--out", str(experts), "--no-progress", "--no-tracking")
    assert rc == 0, err
    assert "2 convnet experts on digits" in out and len(list(experts.glob("expert-*.safetensors"))) == 2
    rc, _, err = run(capsys, "experts", *SMALL[:6], "--num-experts", "2", "--train-epochs", "4",
                     "--out", str(experts), "--no-progress", "--no-tracking")
    assert rc == 2 and "--experts" in err  # other settings never mix into the same directory

    out_dir = tmp_path / "mtt"
    rc, out, err = run(capsys, "distill", "--local", *SMALL, "--method", "mtt", "--experts", str(experts),
                       "--max-start-epoch", "2", "--syn-steps", "3", "--iterations", "3", "--nets", "2",
                       "--ipc", "2", "--eval-nets", "1", "--eval-epochs", "3", "--memory", "recompute",
                       "--out", str(out_dir))
    assert rc == 0, err
    assert "distilled (mtt)" in out and "protocol dc" in out and "shuffled" not in out
    d = read_distilled(out_dir)
    assert d.meta["method"] == "mtt" and d.images.shape == (1, 20, 1, 8, 8) and d.lrs.shape == (1,)
    assert d.meta["dsa_strategy"] == "color_crop_cutout_flip_scale_rotate"

    # --batch-syn: a resumed run draws the same batches (keyed by seed, meta-step, pass) and ends bit for bit equal
    mtt = [*SMALL, "--method", "mtt", "--experts", str(experts), "--max-start-epoch", "2", "--syn-steps", "3",
           "--nets", "1", "--ipc", "2", "--batch-syn", "8", "--checkpoint-every", "1", "--eval-nets", "1",
           "--eval-epochs", "1"]
    assert run(capsys, "distill", "--local", *mtt, "--iterations", "3", "--out", str(tmp_path / "straight"))[0] == 0
    assert run(capsys, "distill", "--local", *mtt, "--iterations", "2", "--out", str(tmp_path / "cut"))[0] == 0
    assert run(capsys, "distill", "--local", *mtt, "--iterations", "3", "--resume", str(tmp_path / "cut"))[0] == 0
    straight, resumed = read_distilled(tmp_path / "straight"), read_distilled(tmp_path / "cut")
    assert torch.equal(straight.images, resumed.images) and torch.equal(straight.lrs, resumed.lrs)
    assert not torch.equal(straight.images, d.images)

    # --labels learned: MTT starts its labels from an expert's logits on images that expert gets right (DATM)
    from ddray.core.synthetic import class_labels
    from ddray.inputs.problem import build_problem, expert_logits

    cfg = load_config(None, dataset="digits", model="convnet", width=8, method="mtt", experts=str(experts),
                      max_start_epoch=2, syn_steps=3, ipc=2, labels="learned")
    problem = build_problem(cfg)
    syn = problem.initial_synthetic()
    z = expert_logits(problem.model, problem.teacher(), syn.images[0])
    assert syn.learns_labels and torch.equal(syn.labels, z)
    hard = class_labels(10, 2)
    on_train = expert_logits(problem.model, problem.teacher(), problem.data.x_train[:]).argmax(1)
    for c in range(10):  # each class's images are ones the expert gets right, where it gets any right
        if (on_train[problem.data.y_train == c] == c).any():
            assert (z[hard == c].argmax(1) == c).all(), c
    assert (z.argmax(1) == hard).any()
    for name, value in problem.teacher().items():  # expert 0 at epoch --max-start-epoch
        assert torch.equal(value, problem.experts[0].at(2)[name])
    out_soft = tmp_path / "mtt-soft"
    rc, out, err = run(capsys, "distill", "--local", *mtt, "--iterations", "2", "--labels", "learned",
                       "--lr-labels", "5", "--out", str(out_soft))
    assert rc == 0, err
    soft = read_distilled(out_soft)
    assert soft.label_kind == "learned" and soft.label_logits.shape == (20, 10)
    assert not torch.equal(soft.label_logits, z)  # learned from there
    rc, out, _ = run(capsys, "show", str(out_soft), "--png", str(tmp_path / "g.png"))
    lines = out.strip().splitlines()
    assert rc == 0 and lines[1].split() == ["image", "class", "top", "label", "p"] and len(lines) == 22
    assert all(0 < float(line.split()[-1]) <= 1 for line in lines[2:])

    rc, out, _ = run(capsys, "evaluate", str(out_dir), "--epochs", "3", "--nets", "2", "--json", "--no-tracking",
                     "--no-scores")
    assert rc == 0 and json.loads(out)["protocol"] == "dc" and json.loads(out)["n"] == 2
    rc, out, _ = run(capsys, "evaluate", str(out_dir), "--protocol", "dd", "--nets", "2", "--json", "--no-tracking",
                     "--no-scores")
    assert rc == 0 and json.loads(out)["protocol"] == "dd"


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "cifar10").glob("*.yaml")), ids=lambda p: p.stem)
def test_cifar10_paper_configs_load(path: Path) -> None:
    cfg = load_config(path)
    method, ipc = path.stem.split("_ipc")
    assert cfg.distill.method == method and cfg.distill.ipc == int(ipc) and cfg.data.dataset == "cifar10"
    assert cfg.model.model == "convnet" and cfg.model.width == 128 and cfg.protocol == "dc"
    assert cfg.run.eval_epochs == 1000 and cfg.run.eval_nets == 20
    if method in ("dc", "dsa"):  # one meta-step per outer step: the paper's 1000 iterations × outer_loop
        assert cfg.distill.iterations == 1000 * cfg.distill.loops[0]
    assert path.read_text().startswith("# CIFAR-10")


def test_model_is_both_a_section_and_a_flat_key() -> None:
    assert Config.from_dict({"model": "convnet", "width": 16}).model.width == 16
    assert Config.from_dict({"model": {"model": "convnet"}}).model.model == "convnet"


def test_public_api_resolves() -> None:
    import ddray

    for name in ddray.__all__:
        assert getattr(ddray, name) is not None, name
    assert ddray.ProtocolDC().epochs == 300 and ddray.ExpertSettings().model == "convnet"
