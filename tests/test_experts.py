"""Expert trajectories for MTT: training, the file format, resumability, loading and its errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ddray.inputs import experts as ex
from ddray.core.inits import generator
from ddray.core.models import build_model, init_params
from ddray.data import Dataset, load_dataset
from ddray.inputs.experts import (EXPERTS_META, PURPOSE_EXPERT, ExpertSettings, Trajectory, load_experts,
                                  train_experts)

# Cheap settings for format/resume tests; real learning is checked once, on all of digits.
FAST = ExpertSettings(epochs=2, lr=0.01, momentum=0.9, batch_size=64, seed=3)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small(digits: Dataset) -> Dataset:
    """256 train / 64 test images of digits (the splits are class-sorted, so subsample at random)."""
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(digits.x_train), generator=g)[:256]
    te = torch.randperm(len(digits.x_test), generator=g)[:64]
    return Dataset("digits", digits.x_train[tr], digits.y_train[tr], digits.x_test[te], digits.y_test[te],
                   digits.num_classes, digits.mean, digits.std)


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the index of every expert that is actually trained."""
    calls: list[int] = []
    real = ex.train_expert

    def counting(data: Dataset, settings: ExpertSettings, index: int, *args: Any, **kw: Any) -> Any:
        calls.append(index)
        return real(data, settings, index, *args, **kw)

    monkeypatch.setattr(ex, "train_expert", counting)
    return calls


def _tensor_bytes(file: bytes) -> bytes:
    """The data section of a safetensors file (after the 8-byte length and the JSON header)."""
    return file[8 + int.from_bytes(file[:8], "little"):]


def _snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.glob("expert-*.safetensors")}


POSITIVE_INT, POSITIVE = "expected a positive integer", "expected a positive number"
OPS = "ops joined by '_' from color, crop, cutout, flip, scale, rotate"


@pytest.mark.parametrize("field, value, option, allowed", [
    ("epochs", 0, "--train-epochs", POSITIVE_INT), ("epochs", 2.5, "--train-epochs", POSITIVE_INT),
    ("lr", 0.0, "--expert-lr", POSITIVE), ("lr", float("nan"), "--expert-lr", POSITIVE),
    ("momentum", 1.0, "--expert-momentum", "expected a number in [0, 1)"),
    ("weight_decay", -1e-4, "--expert-weight-decay", "expected a number >= 0"),
    ("batch_size", 0, "--expert-batch-size", POSITIVE_INT),
    ("model", "resnet", "--model", "choose one of lenet, alexcifarnet, convnet"),
    ("init_scheme", "zeros", "--init-scheme", "choose one of xavier, kaiming, normal, orthogonal, default"),
    ("dsa_strategy", "color_blur", "--dsa-strategy", OPS), ("dsa_strategy", "", "--dsa-strategy", OPS),
    ("seed", -1, "--seed", "expected an integer >= 0"),
])
def test_settings_are_validated(field: str, value: Any, option: str, allowed: str) -> None:
    with pytest.raises(ValueError) as e:
        ExpertSettings(**{field: value})
    assert str(e.value) == f"{option}: invalid value {value!r}; {allowed}"


def test_files_meta_and_trajectory_layout(small: Dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = train_experts(small, FAST, 2, tmp_path / "exp", progress=True)
    assert "experts" in capsys.readouterr().err  # the tqdm bar
    assert sorted(p.name for p in out.iterdir()) == sorted([EXPERTS_META, "expert-00000.safetensors",
                                                              "expert-00001.safetensors"])
    meta = json.loads((out / EXPERTS_META).read_text())
    assert meta["dataset"] == "digits" and meta["model"] == "convnet"
    assert meta["shape"] == [1, 8, 8] and meta["classes"] == 10
    assert meta["settings"]["epochs"] == 2 and meta["settings"]["seed"] == 3
    assert meta["files"] == ["expert-00000.safetensors", "expert-00001.safetensors"]

    from safetensors import safe_open
    with safe_open(str(out / "expert-00001.safetensors"), framework="pt") as f:
        assert f.metadata() == {"expert": "1", "epochs": "2"}

    trajs, meta2 = load_experts(out, "convnet", (1, 8, 8), 10, dataset="digits")
    assert meta2 == meta and len(trajs) == 2
    model = build_model("convnet", (1, 8, 8), 10)
    for i, t in enumerate(trajs):
        assert t.epochs == 2
        assert {k: v.shape for k, v in t.params.items()} == {k: (3, *p.shape) for k, p in model.named_parameters()}
        theta0 = init_params(model, "default", generator(3, PURPOSE_EXPERT, i))
        for k in theta0:  # epoch 0 is exactly the seeded θ₀ draw
            assert torch.equal(t.at(0)[k], theta0[k])
        # Training moved every tensor but the conv biases, whose gradient the instance norm after them cancels.
        moved = {k for k in theta0 if not torch.equal(t.at(2)[k], theta0[k])}
        conv_biases = {f"{n}.bias" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert moved >= set(theta0) - conv_biases
        with torch.no_grad():  # the recorded accuracy: the final snapshot's on the test split
            pred = functional_call(model, t.at(2), (small.x_test[:],)).argmax(1)
        assert meta["test_acc"][i] == int((pred == small.y_test).sum()) / len(small.y_test)
    assert not torch.equal(trajs[0].at(0)["classifier.weight"], trajs[1].at(0)["classifier.weight"])
    with pytest.raises(ValueError, match="outside 0..2"):
        trajs[0].at(3)


def test_expert_learns(digits: Dataset, tmp_path: Path) -> None:
    # Measured: seeds 0..4 reach 75-84 % test accuracy (chance 10 %); the training loss drops 2.30 → ~2.05.
    s = ExpertSettings(epochs=4, lr=0.01, momentum=0.9, batch_size=64)
    out = train_experts(digits, s, 1, tmp_path, progress=False)
    (traj,), meta = load_experts(out, "convnet", digits.shape, 10)
    model = build_model("convnet", digits.shape, 10)
    with torch.no_grad():
        losses = [float(F.cross_entropy(functional_call(model, traj.at(e), (digits.x_train.all(),)), digits.y_train))
                  for e in range(traj.epochs + 1)]
        acc = float((functional_call(model, traj.at(4), (digits.x_test.all(),)).argmax(1) == digits.y_test).float().mean())
    assert losses[-1] < losses[0] - 0.1, losses
    assert acc > 0.5
    assert meta["test_acc"] == [pytest.approx(acc)]  # the recorded accuracy is the final snapshot's


def test_resume_skips_complete_extends_and_is_deterministic(small: Dataset, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    train_experts(small, FAST, 2, tmp_path, progress=False)
    first = _snapshot(tmp_path)
    (tmp_path / "expert-00001.safetensors").unlink()
    (tmp_path / ".tmp-x1y2z3.safetensors").write_bytes(b"half a file from a killed run")

    train_experts(small, FAST, 3, tmp_path, progress=False)
    assert calls == [0, 1, 1, 2]
    second = _snapshot(tmp_path)
    assert second["expert-00000.safetensors"] == first["expert-00000.safetensors"]  # untouched: mtime and bytes
    # Retrained bit for bit: the tensor bytes match (safetensors orders the header's metadata at random).
    assert _tensor_bytes(second["expert-00001.safetensors"][1]) == _tensor_bytes(first["expert-00001.safetensors"][1])
    meta = json.loads((tmp_path / EXPERTS_META).read_text())
    assert meta["files"] == [f"expert-{i:05d}.safetensors" for i in range(3)] and len(meta["test_acc"]) == 3
    trajs, _ = load_experts(tmp_path, "convnet", (1, 8, 8), 10)
    assert len(trajs) == 3  # the temp file is not an expert

    train_experts(small, FAST, 1, tmp_path, progress=False)  # fewer than on disk: nothing to do, nothing lost
    assert calls == [0, 1, 1, 2]
    assert json.loads((tmp_path / EXPERTS_META).read_text())["files"] == meta["files"]


def test_interrupted_run_continues(small: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ex.train_expert

    def dies_at_1(data: Dataset, settings: ExpertSettings, index: int, *args: Any, **kw: Any) -> Any:
        if index == 1:
            raise KeyboardInterrupt
        return real(data, settings, index, *args, **kw)

    monkeypatch.setattr(ex, "train_expert", dies_at_1)
    with pytest.raises(KeyboardInterrupt):
        train_experts(small, FAST, 3, tmp_path, progress=False)
    assert json.loads((tmp_path / EXPERTS_META).read_text())["files"] == ["expert-00000.safetensors"]
    monkeypatch.setattr(ex, "train_expert", real)
    calls = _count_calls(monkeypatch)
    train_experts(small, FAST, 3, tmp_path, progress=False)
    assert calls == [1, 2]

    # Killed between an expert's rename and the meta write: the file is kept, its accuracy recomputed.
    meta = json.loads((tmp_path / EXPERTS_META).read_text())
    acc2 = meta["test_acc"][2]
    (tmp_path / EXPERTS_META).write_text(json.dumps({**meta, "files": meta["files"][:2],
                                                     "test_acc": meta["test_acc"][:2]}))
    train_experts(small, FAST, 3, tmp_path, progress=False)
    assert calls == [1, 2]
    meta = json.loads((tmp_path / EXPERTS_META).read_text())
    assert len(meta["files"]) == 3 and meta["test_acc"][2] == pytest.approx(acc2)


def test_a_failed_write_leaves_no_file(small: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddray.store.storage

    real = ddray.store.storage.os.replace  # the one atomic write (ddray.store.storage.write_atomic) renames with it

    def no_rename(src: str, dst: str | Path) -> None:
        if str(dst).endswith(".safetensors"):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(ddray.store.storage.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        train_experts(small, replace(FAST, epochs=1), 1, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [EXPERTS_META]  # neither the expert nor its temp file
    assert json.loads((tmp_path / EXPERTS_META).read_text())["files"] == []


def test_other_settings_or_data_are_refused(small: Dataset, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    train_experts(small, replace(FAST, epochs=1), 1, tmp_path, progress=False)
    calls = _count_calls(monkeypatch)
    with pytest.raises(ValueError, match=r"--experts .*lr=0\.01 \(now 0\.05\)"):
        train_experts(small, replace(FAST, epochs=1, lr=0.05), 2, tmp_path, progress=False)
    other = Dataset("mnist5k", small.x_train, small.y_train, small.x_test, small.y_test, 10, small.mean, small.std)
    with pytest.raises(ValueError, match=r"--experts .*dataset='digits' \(now 'mnist5k'\)"):
        train_experts(other, replace(FAST, epochs=1), 2, tmp_path, progress=False)
    assert calls == []

    stray = tmp_path / "stray"
    stray.mkdir()
    (tmp_path / "expert-00000.safetensors").rename(stray / "expert-00000.safetensors")
    with pytest.raises(ValueError, match=f"--experts .*no {EXPERTS_META}"):
        train_experts(small, replace(FAST, epochs=1), 1, stray, progress=False)
    with pytest.raises(ValueError, match="--num-experts: invalid value 0"):
        train_experts(small, FAST, 0, tmp_path / "new", progress=False)


def test_augmentation_is_applied_and_recorded(small: Dataset, tmp_path: Path) -> None:
    seen: list[int] = []

    def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        seen.append(len(x))
        return torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)

    with pytest.raises(ValueError, match="--dsa-strategy"):
        train_experts(small, FAST, 1, tmp_path / "a", progress=False, augment=flip)
    with pytest.raises(ValueError, match="--dsa-strategy"):
        train_experts(small, replace(FAST, dsa_strategy="flip"), 1, tmp_path / "a", progress=False)
    s = replace(FAST, epochs=1, dsa_strategy="flip")
    train_experts(small, s, 1, tmp_path / "aug", progress=False, augment=flip)
    assert seen == [64, 64, 64, 64]  # every minibatch of the one epoch
    train_experts(small, replace(s, dsa_strategy=None), 1, tmp_path / "plain", progress=False)
    (aug,), meta = load_experts(tmp_path / "aug", "convnet", (1, 8, 8), 10)
    (plain,), _ = load_experts(tmp_path / "plain", "convnet", (1, 8, 8), 10)
    assert meta["settings"]["dsa_strategy"] == "flip"
    assert torch.equal(aug.at(0)["classifier.weight"], plain.at(0)["classifier.weight"])
    assert not torch.equal(aug.at(1)["classifier.weight"], plain.at(1)["classifier.weight"])


def test_load_experts_errors(small: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"--experts .*no {EXPERTS_META}.*ddray experts"):
        load_experts(tmp_path, "convnet", (1, 8, 8), 10)
    out = train_experts(small, replace(FAST, epochs=1), 1, tmp_path / "exp", progress=False)
    for args, what in [(("lenet", (1, 8, 8), 10), "lenet"), (("convnet", (1, 16, 16), 10), "16"),
                       (("convnet", (1, 8, 8), 5), "5"), (("convnet", (1, 8, 8), 10, "mnist5k"), "mnist5k")]:
        with pytest.raises(ValueError, match=r"--experts .*made for .*'convnet'.*needs .*ddray experts") as e:
            load_experts(out, *args)  # type: ignore[arg-type]
        assert what in str(e.value).split("needs")[1]
    (out / "expert-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="--experts .*no complete experts.*ddray experts"):
        load_experts(out, "convnet", (1, 8, 8), 10)


def test_trajectory_at() -> None:
    t = Trajectory({"w": torch.arange(6.0).reshape(3, 2)})
    assert t.epochs == 2 and torch.equal(t.at(1)["w"], torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="epoch -1"):
        t.at(-1)


@pytest.mark.cuda
def test_training_on_cuda_stores_cpu_trajectories(small: Dataset, tmp_path: Path) -> None:
    train_experts(small, replace(FAST, epochs=1), 1, tmp_path, progress=False, device="cuda")
    (traj,), meta = load_experts(tmp_path, "convnet", (1, 8, 8), 10)
    theta0 = init_params(build_model("convnet", (1, 8, 8), 10), "default", generator(3, PURPOSE_EXPERT, 0))
    assert all(v.device.type == "cpu" for v in traj.params.values())
    assert torch.equal(traj.at(0)["classifier.weight"], theta0["classifier.weight"])
    model = build_model("convnet", (1, 8, 8), 10).to("cuda")
    with torch.no_grad():  # the recorded accuracy: the final snapshot's on the test split, on the GPU
        pred = functional_call(model, {k: v.to("cuda") for k, v in traj.at(1).items()},
                               (small.x_test[:].to("cuda"),)).argmax(1).cpu()
    assert meta["test_acc"][0] == int((pred == small.y_test).sum()) / len(small.y_test)
