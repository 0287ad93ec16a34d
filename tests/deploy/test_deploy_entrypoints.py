"""The RayJob entrypoints are commands ddray accepts, with files that exist.

KubeRay runs ``ray job submit -- <entrypoint>`` through bash in the submitter
pod, so ``$VARS`` are expanded with the submitter container's environment; the
result is parsed with ddray's own parser, and the files it names are found the
way the pods find them (ConfigMap volumes, the image's tune_configs/).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from deploy_support import (
    IMAGE_TUNE_DIR, K8S, REPO, Doc, PodSpec, by_kind, configmap_data, container_env, mount_for, one, pod_specs,
)

# The sections and fields the k8s distillation configs may use.
CONFIG_KEYS = {
    "data": {"dataset"},
    "distill": {"steps", "epochs", "ipc", "iterations", "nets", "init"},
    "cluster": {"workers"},
    "run": {"seed", "checkpoint_every", "storage"},
}
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# What KubeRay adds to the submitter container (configureSubmitterContainer): the
# job's submission id (a fresh "<rayjob>-<5 chars>" per attempt) and the dashboard.
KUBERAY_SUBMITTER_ENV = {"RAY_JOB_SUBMISSION_ID": "{job}-x7k2p", "RAY_DASHBOARD_ADDRESS": "{job}-head-svc:8265",
                         "PYTHONUNBUFFERED": "1"}


def _pods(docs: list[Doc], job: Doc) -> dict[str, PodSpec]:
    return {p.role: p for p in pod_specs(docs) if p.owner is job and p.role in ("head", "worker", "submitter")}


def argv_of(docs: list[Doc], job: Doc) -> list[str]:
    """The entrypoint as the head runs it, after the submitter's shell expanded it."""
    name = job["metadata"]["name"]
    env = {k: v.format(job=name) for k, v in KUBERAY_SUBMITTER_ENV.items()}
    env.update(container_env(_pods(docs, job)["submitter"].spec["containers"][0], docs))
    entrypoint = job["spec"]["entrypoint"]

    def expand(m: re.Match[str]) -> str:
        var = m.group(1) or m.group(2)
        assert var in env, (f"RayJob/{name}: ${var} is not set in the submitter pod, "
                            "where bash expands the entrypoint")
        return env[var]

    return shlex.split(_VAR.sub(expand, entrypoint))


def _option(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag:
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _jobs(docs: list[Doc], command: str) -> list[Doc]:
    jobs = [j for j in by_kind(docs, "RayJob") if j["spec"]["entrypoint"].split()[:2] == ["ddray", command]]
    assert jobs, f"no RayJob runs `ddray {command}`"
    return jobs


@pytest.mark.parametrize("name", ["ddray-distill", "ddray-tune"])
def test_entrypoint_parses_with_ddrays_cli(docs: list[Doc], name: str) -> None:
    from ddray.cli import build_parser

    argv = argv_of(docs, one(docs, "RayJob", name))
    assert argv[0] == "ddray", argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"RayJob/{name}: `{shlex.join(argv)}` is rejected by ddray.cli.build_parser "
                    f"(exit {e.code}):\n{err.getvalue()}", pytrace=False)


def test_every_rayjob_is_checked(docs: list[Doc]) -> None:
    assert {j["metadata"]["name"] for j in by_kind(docs, "RayJob")} == {"ddray-distill", "ddray-tune"}


def test_distill_config_is_mounted_and_valid(docs: list[Doc], tmp_path: Path) -> None:
    from ddray.config import load_config

    for job in _jobs(docs, "distill"):
        argv = argv_of(docs, job)
        path = _option(argv, "--config")
        assert path, f"RayJob/{job['metadata']['name']}: no --config"
        head = _pods(docs, job)["head"]
        found = mount_for(path, head.spec["containers"][0], head.spec)
        assert found and "configMap" in found[1], f"{path} is not on a ConfigMap volume of the head"
        mount, volume = found
        key = str(Path(path).relative_to(mount["mountPath"]))
        data = configmap_data(docs, volume["configMap"]["name"])
        assert key in data, f"ConfigMap {volume['configMap']['name']} has no key {key}"
        f = tmp_path / key
        f.write_text(data[key])
        load_config(f)  # raises ValueError on invalid content


@pytest.mark.parametrize("command, flags", [
    # --out: the driver (head); --storage: the parameter server (a worker)
    ("distill", {"--out": ("head",), "--storage": ("head", "worker")}),
    # Tune's experiment state (head) and trial checkpoints (trials run on workers)
    ("tune", {"--storage-path": ("head", "worker")}),
])
def test_outputs_land_on_the_shared_volume(docs: list[Doc], command: str, flags: dict[str, tuple[str, ...]]) -> None:
    """The root file system is read-only: everything a job writes goes to the shared
    volume, in a directory of its own (a retry must not mix with an older attempt)."""
    for job in _jobs(docs, command):
        argv, pods = argv_of(docs, job), _pods(docs, job)
        for flag, roles in flags.items():
            path = _option(argv, flag)
            assert path and path.startswith("/"), f"{flag} {path!r}: not an absolute path"
            assert "-x7k2p" in path, f"{flag} {path}: not per attempt ($RAY_JOB_SUBMISSION_ID)"
            for role in roles:
                pod = pods[role]
                found = mount_for(path, pod.spec["containers"][0], pod.spec)
                assert found and "persistentVolumeClaim" in found[1], f"{flag} {path}: not on the {role}'s shared volume"


def test_distill_config_sources_are_valid() -> None:
    from ddray.config import load_config

    files = sorted(K8S.rglob("distill.yaml"))
    assert files
    for f in files:
        load_config(f)
        cfg = yaml.safe_load(f.read_text())
        for section, fields in cfg.items():
            assert section in CONFIG_KEYS and set(fields) <= CONFIG_KEYS[section], f"{f}: {section} {fields}"


def test_tune_configs_exist(docs: list[Doc]) -> None:
    for job in _jobs(docs, "tune"):
        paths = [a for a in argv_of(docs, job) if a.startswith(IMAGE_TUNE_DIR)]
        assert len(paths) == 1, f"RayJob/{job['metadata']['name']}: expected one {IMAGE_TUNE_DIR}<name>.yaml"
        source = REPO / "tune_configs" / paths[0][len(IMAGE_TUNE_DIR):]
        if not source.is_file():
            pytest.skip(f"{source.relative_to(REPO)} is not written yet")
        assert isinstance(yaml.safe_load(source.read_text()), dict), f"{source}: not a YAML mapping"
