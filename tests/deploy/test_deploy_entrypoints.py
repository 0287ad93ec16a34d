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
    IMAGE_TUNE_DIR, K8S, REPO, Doc, PodSpec, by_kind, configmap_data, container_env,
    mount_for, one, pod_specs,
)

# The sections and fields the k8s distillation configs may use.
CONFIG_KEYS = {
    "data": {"dataset"},
    "distill": {"steps", "epochs", "ipc", "iterations", "nets", "init"},
    "cluster": {"workers", "gpus_per_worker", "cpus_per_worker", "placement_timeout"},
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
    # --storage: the parameter server (a worker) writes, the driver (head) reads
    ("distill", ("--storage",)),
    # Tune's experiment state (head) and trial checkpoints (trials run on workers)
    ("tune", ("--storage-path",)),
])
def test_outputs_outlive_the_attempt(docs: list[Doc], command: str, flags: tuple[str, ...]) -> None:
    """Everything a retry needs is under $DDRAY_STORAGE, at a path the same for every attempt of the
    RayJob (its name and $DDRAY_RUN, never the per-attempt submission id), and the job continues
    what it finds there (--resume auto)."""
    for job in _jobs(docs, command):
        name, argv, pods = job["metadata"]["name"], argv_of(docs, job), _pods(docs, job)
        env = container_env(pods["submitter"].spec["containers"][0], docs)
        assert _option(argv, "--resume") == "auto", f"RayJob/{name}: retries must continue the run"
        for flag in flags:
            path = _option(argv, flag)
            assert path == f"{env['DDRAY_STORAGE']}/{name}/{env['DDRAY_RUN']}", f"{flag} {path}"
            assert "x7k2p" not in path, f"{flag} {path}: per attempt"
            if "://" not in path:  # the pvc-storage component: a shared volume in head and workers
                for role in ("head", "worker"):
                    found = mount_for(path, pods[role].spec["containers"][0], pods[role].spec)
                    assert found and "persistentVolumeClaim" in found[1], f"{flag} {path}: not on the {role}"
        out = _option(argv, "--out")
        if out is not None:  # the driver's scratch directory: writable on the head
            found = mount_for(out, pods["head"].spec["containers"][0], pods["head"].spec)
            assert found and "emptyDir" in found[1], f"--out {out}: not on a writable volume of the head"


def _data_roots(docs: list[Doc], job: Doc) -> list[str]:
    """The data_root every data set of the job's runs is read from (None for embedded sets)."""
    from ddray.data import EMBEDDED

    argv = argv_of(docs, job)
    roots = []
    if argv[1] == "tune":
        path = next(a for a in argv if a.startswith(IMAGE_TUNE_DIR))
        spec = yaml.safe_load((REPO / "tune_configs" / path[len(IMAGE_TUNE_DIR):]).read_text())
        data = (spec.get("fixed") or {}).get("data") or {}
    else:
        head = _pods(docs, job)["head"]
        cfg = _option(argv, "--config")
        found = mount_for(cfg, head.spec["containers"][0], head.spec) if cfg else None
        data = {}
        if found:
            key = str(Path(cfg).relative_to(found[0]["mountPath"]))
            data = (yaml.safe_load(configmap_data(docs, found[1]["configMap"]["name"])[key]) or {}).get("data", {})
    root = _option(argv, "--data-root") or data.get("data_root")
    if data.get("dataset", "mnist5k") not in EMBEDDED:
        assert root, f"RayJob/{job['metadata']['name']}: {data.get('dataset')} needs a data_root"
        roots.append(root)
    return roots


def test_data_sets_are_on_the_volume_the_data_job_fills(docs: list[Doc]) -> None:
    """A data set that is not embedded is read from S3, or from a path every Ray pod of the job mounts,
    on the claim that Job/ddray-data-fill writes to (k8s/components/data-rwx; the bug this replaces:
    /data/mnist, mounted nowhere). Without that component no job reads a local path."""
    fills = [j for j in by_kind(docs, "Job") if j["metadata"]["name"] == "ddray-data-fill"]
    roots = [(job, root) for job in by_kind(docs, "RayJob") for root in _data_roots(docs, job)
             if not root.startswith("s3://")]
    if not fills:
        assert not roots, f"local data roots without the data volume: {[r for _, r in roots]}"
        return
    fill = fills[0]["spec"]["template"]["spec"]
    fill_mount = mount_for("/data/x", fill["containers"][0], fill)
    assert fill_mount and "persistentVolumeClaim" in fill_mount[1]
    claim = fill_mount[1]["persistentVolumeClaim"]["claimName"]
    for job, root in roots:
        for role in ("head", "worker"):
            pod = _pods(docs, job)[role]
            found = mount_for(root, pod.spec["containers"][0], pod.spec)
            assert found and found[1].get("persistentVolumeClaim", {}).get("claimName") == claim, \
                f"RayJob/{job['metadata']['name']} {role}: {root} is not on the data volume"
            assert found[0]["mountPath"] == fill_mount[0]["mountPath"], "the Job fills another path"
    # the full-MNIST Tune search (tune-mnist-paper.yaml) reads it: the check has something to check there
    if any("mnist_paper" in j["spec"]["entrypoint"] for j in by_kind(docs, "RayJob")):
        assert roots, "no data_root checked"


def test_distill_config_sources_are_valid() -> None:
    from ddray.config import load_config

    files = sorted(K8S.rglob("distill.yaml"))
    assert files
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        load_config(f)
        cfg = yaml.safe_load(f.read_text())
        for section, fields in cfg.items():
            assert section in CONFIG_KEYS and set(fields) <= CONFIG_KEYS[section], f"{f}: {section} {fields}"


def test_tune_configs_exist(docs: list[Doc]) -> None:
    for job in _jobs(docs, "tune"):
        paths = [a for a in argv_of(docs, job) if a.startswith(IMAGE_TUNE_DIR)]
        assert len(paths) == 1, f"RayJob/{job['metadata']['name']}: expected one {IMAGE_TUNE_DIR}<name>.yaml"
        source = REPO / "tune_configs" / paths[0][len(IMAGE_TUNE_DIR):]
        assert source.is_file(), f"RayJob/{job['metadata']['name']} runs {paths[0]}, but {source} does not exist"
        assert isinstance(yaml.safe_load(source.read_text()), dict), f"{source}: not a YAML mapping"
