"""A stand-in for kubectl, for deploy/preflight.sh's tests: no cluster can run here.

It answers the few commands preflight uses from a cluster state in JSON ($KUBECTL_STAND_IN_STATE):

    {"context": "...",
     "objects": {"<resource>": [objects as `kubectl get <resource> -o json` lists them], ...},
     "pull": {"<image>": {"reason": "ErrImagePull", "message": "..."}}}

``get`` (by name, list, -n/-A, -l with key=value selectors), ``create -f -`` of pods (a probe pod's
container ends as "pull" says for its image, or Completed), ``delete pods -l``, ``config
current-context``, and ``kustomize DIR`` (passed to the real kustomize: $KUBECTL_STAND_IN_KUSTOMIZE, a
JSON list such as ["kustomize", "build"]). Every call (argv, and stdin where -f -) is appended to
$KUBECTL_STAND_IN_LOG as a line of JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ALIASES = {"crd": "customresourcedefinitions", "crds": "customresourcedefinitions",
           "customresourcedefinition": "customresourcedefinitions", "deploy": "deployments",
           "deployment": "deployments", "secret": "secrets", "sc": "storageclasses",
           "storageclass": "storageclasses", "node": "nodes", "cm": "configmaps", "configmap": "configmaps",
           "pod": "pods", "po": "pods", "ns": "namespaces", "namespace": "namespaces"}
CLUSTER_SCOPED = {"customresourcedefinitions", "storageclasses", "nodes", "namespaces"}
VALUED = {"-n": "namespace", "--namespace": "namespace", "-l": "selector", "--selector": "selector",
          "-o": "output", "--output": "output", "-f": "filename", "--filename": "filename"}


def parse(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    words: list[str] = []
    opts: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in VALUED:
            opts[VALUED[a]] = argv[i + 1]
            i += 2
            continue
        if a.startswith("--") and "=" in a and a.split("=", 1)[0] in VALUED:
            opts[VALUED[a.split("=", 1)[0]]] = a.split("=", 1)[1]
        elif a in ("-A", "--all-namespaces"):
            opts["all"] = True
        elif not a.startswith("-"):
            words.append(a)
        i += 1
    return words, opts


def matches(obj: dict[str, Any], resource: str, opts: dict[str, Any]) -> bool:
    meta = obj["metadata"]
    if resource not in CLUSTER_SCOPED and not opts.get("all") and meta.get("namespace") != opts.get("namespace",
                                                                                                   "default"):
        return False
    for term in filter(None, opts.get("selector", "").split(",")):
        key, _, value = term.partition("=")
        if meta.get("labels", {}).get(key) != value:
            return False
    return True


def not_found(resource: str, name: str) -> int:
    print(f'Error from server (NotFound): {resource} "{name}" not found', file=sys.stderr)
    return 1


def probe_status(pod: dict[str, Any], pull: dict[str, Any]) -> dict[str, Any]:
    c = pod["spec"]["containers"][0]
    failure = pull.get(c["image"])
    state = {"waiting": failure} if failure else {"terminated": {"reason": "Completed", "exitCode": 0}}
    return {"phase": "Pending" if failure else "Succeeded",
            "containerStatuses": [{"name": c["name"], "image": c["image"], "state": state}]}


def main(argv: list[str]) -> int:
    state_file = Path(os.environ["KUBECTL_STAND_IN_STATE"])
    state = json.loads(state_file.read_text())
    words, opts = parse(argv)
    verb = words[0] if words else ""
    stdin = sys.stdin.read() if opts.get("filename") == "-" else None
    with open(os.environ["KUBECTL_STAND_IN_LOG"], "a") as log:
        log.write(json.dumps({"argv": argv, "stdin": stdin}) + "\n")
    if words[:2] == ["config", "current-context"]:
        if not state.get("context"):
            print("error: current-context is not set", file=sys.stderr)
            return 1
        print(state["context"])
        return 0
    if verb == "kustomize":
        cmd = json.loads(os.environ["KUBECTL_STAND_IN_KUSTOMIZE"]) + [words[1]]
        return subprocess.run(cmd).returncode
    objects: dict[str, list[dict[str, Any]]] = state["objects"]
    if verb == "get":
        resource = ALIASES.get(words[1], words[1])
        found = [o for o in objects.get(resource, []) if matches(o, resource, opts)]
        if len(words) > 2:
            named = [o for o in found if o["metadata"]["name"] == words[2]]
            if not named:
                return not_found(resource, words[2])
            print(json.dumps(named[0]))
        else:
            print(json.dumps({"apiVersion": "v1", "kind": "List", "items": found}))
        return 0
    if verb == "create" and stdin is not None:
        doc = json.loads(stdin)
        for pod in doc["items"] if doc["kind"] == "List" else [doc]:
            pod["metadata"]["namespace"] = opts.get("namespace", "default")
            pod["status"] = probe_status(pod, state.get("pull", {}))
            objects.setdefault("pods", []).append(pod)
            print(f"pod/{pod['metadata']['name']} created")
    elif verb == "delete" and ALIASES.get(words[1], words[1]) == "pods":
        gone = [o for o in objects.get("pods", []) if matches(o, "pods", opts)]
        objects["pods"] = [o for o in objects.get("pods", []) if o not in gone]
        for o in gone:
            print(f'pod "{o["metadata"]["name"]}" deleted')
    else:
        print(f"kubectl stand-in: unsupported command {argv}", file=sys.stderr)
        return 3
    state_file.write_text(json.dumps(state))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
