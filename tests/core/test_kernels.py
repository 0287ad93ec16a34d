"""Compiled kernels (``--compile``): the same meta-gradients as eager, and an eager fallback with one warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from ddray.core import kernels as kernels_mod
from ddray.core.kernels import Kernels, compile_unavailable
from ddray.core.unroll import meta_gradient

from test_unroll import Tiny, _problem

needs_compiler = pytest.mark.skipif(compile_unavailable("cpu") is not None,
                                    reason=f"torch.compile unavailable: {compile_unavailable('cpu')}")


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_compiled_meta_gradient_equals_eager_in_float64(memory: str) -> None:
    for k in (1, 3):
        model, params0, images, labels, raw, x_real, y_real = _problem(k=k)
        compiled = Kernels(model, compile=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback: the compiled kernels ran
            got = meta_gradient(model, params0, images, labels, raw, x_real, y_real, memory, compiled)
        assert compiled.compiled
        want = meta_gradient(model, params0, images, labels, raw, x_real, y_real, memory)
        torch.testing.assert_close(got.images, want.images, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.raw_lrs, want.raw_lrs, rtol=1e-9, atol=1e-12)
        assert got.loss == pytest.approx(want.loss, rel=1e-12) and got.nets == want.nets == k


def test_a_failing_compiled_kernel_warns_once_and_reruns_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels_mod, "_warned", False)
    k = Kernels(Tiny().double())
    k.compiled = True  # as if compiled: the first run fails the way a compiler error would
    calls: list[bool] = []

    def work(kern: Kernels) -> str:
        calls.append(kern.compiled)
        if kern.compiled:
            raise RuntimeError("InductorError: C++ compile error\nmore lines")
        return "eager result"

    with pytest.warns(RuntimeWarning, match=r"--compile: compilation failed \(RuntimeError: InductorError"):
        assert k.run(work) == "eager result"
    assert calls == [True, False] and not k.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert k.run(work) == "eager result"  # eager from now on, and no second warning


def test_without_a_cpp_compiler_compile_warns_once_and_runs_eagerly(tmp_path: "os.PathLike[str]") -> None:
    """On a platform with no C++ compiler for TorchInductor: one warning, and the eager gradients."""
    code = ("import json, warnings, torch\n"
            "import sys; sys.path.insert(0, 'tests/core')\n"
            "from test_unroll import _problem\n"
            "from ddray.core.kernels import Kernels\n"
            "from ddray.core.unroll import meta_gradient\n"
            "model, p0, im, lab, raw, x, y = _problem(k=2)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ks = [Kernels(model, compile=True) for _ in range(2)]\n"
            "    g = meta_gradient(model, p0, im, lab, raw, x, y, 'full', ks[0])\n"
            "e = meta_gradient(model, p0, im, lab, raw, x, y, 'full')\n"
            "print(json.dumps({'warnings': [str(m.message) for m in w], 'compiled': [k.compiled for k in ks],\n"
            "                  'same': torch.equal(g.images, e.images) and torch.equal(g.raw_lrs, e.raw_lrs)}))\n")
    env = {**os.environ, "CXX": str(tmp_path) + "/no-such-compiler"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert len(got["warnings"]) == 1 and got["warnings"][0].startswith("--compile: no C++ compiler")
    assert "running the eager kernels instead" in got["warnings"][0]
    assert got["compiled"] == [False, False] and got["same"]
