"""ddray's import graph, read from the source with ``ast``, and the rules it must keep.

One definition for three readers: ``tests/test_architecture.py`` asserts the rules,
``docs/architecture.py`` draws the floors in docs/architecture.svg, and
``docs/architecture.md`` says them in prose. An edge A → B means a module A holds an
``import`` of B anywhere (top level, inside a function or under ``TYPE_CHECKING``: a lazy
import is still a dependency), plus the names a package's ``_LAZY`` table hands out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = ("ray", "mlflow")  # the heavy frameworks whose reach the rules limit

#: The floors, top to bottom. A module may import its own floor and the floors below it, never
#: one above (the package ``ddray`` itself, the public API, sits on top of everything). Every floor
#: but ``cli`` and ``config`` is one package: a room of the house.
FLOORS: dict[str, tuple[str, ...]] = {
    "cli": ("ddray.cli",),
    "tune": ("ddray.tune",),
    "distributed": ("ddray.distributed",),
    "run": ("ddray.run",),
    "evaluation": ("ddray.evaluation",),
    "inputs": ("ddray.inputs",),
    "tracking": ("ddray.tracking",),
    "store": ("ddray.store",),
    "config": ("ddray.config", "ddray.methods", "ddray.validation", "ddray.threads", "ddray._version"),
    "data": ("ddray.data",),
    "core": ("ddray.core",),
}
#: Inside a package, its modules' order, top to bottom: a module imports those of its own rank and those
#: below, never one above (the package's ``__init__``, its public face, stands above them all).
ROOMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ddray.tune": (("search",), ("summary",), ("report",), ("results",), ("trial",), ("spec",)),
    "ddray.distributed": (("driver",), ("compiled",), ("fleet",), ("supervision",), ("pool", "param_server"),
                          ("worker",), ("messages", "slots"), ("placement", "shards", "recovery")),
    "ddray.run": (("loop",), ("lifecycle",), ("state",)),
    "ddray.evaluation": (("compare",), ("held_out", "viz"), ("scores",)),
    "ddray.inputs": (("pretrain",), ("problem",), ("experts",), ("sources",)),
    "ddray.tracking": (("tracker",), ("batch_writer",)),
    "ddray.store": (("artifact", "checkpoint"), ("storage",)),
    "ddray.data": (("registry",), ("parquet",), ("folder",), ("cache", "embedded", "rows", "vision"), ("base",)),
    "ddray.core": (("baselines", "protocol_dc"),  # evaluation protocols and baselines
                   ("protocol_dd", "matching", "trajectory", "dd_objective", "objective", "net_chunks",
                    "synthetic"),  # the methods' objectives, the synthetic set
                   ("capture",),  # meta-steps as CUDA graphs
                   ("unroll", "inits", "augment"),  # the differentiable unroll, θ₀s, DSA
                   ("kernels", "models", "images"),  # the hot kernels, networks, images
                   ("batch_chunks",)),
}
#: Folders that import nothing of ddray outside themselves and the folders named with them
#: (``ddray.data`` builds its sets from the core's :class:`~ddray.core.images.Images`).
SELF_CONTAINED: dict[str, tuple[str, ...]] = {"ddray.core": (), "ddray.data": ("ddray.core",)}
#: framework → the only modules (or folders) that may import it.
ALLOWED_EXTERNAL = {
    "mlflow": ("ddray.tracking.tracker",),
    "ray": ("ddray.distributed", "ddray.tune", "ddray.tracking.tracker"),  # tracking: the address of a connected Ray
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    return {module_name(p, root): p for p in sorted((root / "ddray").rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """What module ``name`` imports: ddray modules (resolved to the module, not the package, where a name is
    a submodule) and the top-level names of everything else."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            found.update(subs or {base})
            if len(subs) < len(node.names):
                found.add(base)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            if isinstance(node.value, ast.Dict):  # name → module tables of lazy packages
                found.update(v.value for v in node.value.values if isinstance(v, ast.Constant))
    out = set()
    for f in found:
        if f.split(".")[0] == "ddray":
            while f not in known and "." in f:  # ddray.data.Dataset → ddray.data
                f = f.rpartition(".")[0]
            out.add(f)
        else:
            out.add(f.split(".")[0])
    out.discard(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module → the modules it imports (ddray modules by full name, others by their top-level package)."""
    mods = modules(root)
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def inside(module: str, prefix: str) -> bool:
    """Whether ``module`` is ``prefix`` or lives under it."""
    return module == prefix or module.startswith(prefix + ".")


def floor(module: str) -> str | None:
    """The floor of a ddray module (None for the package ``ddray``, the public API on top)."""
    for name, members in FLOORS.items():
        if any(inside(module, m) for m in members):
            return name
    return None


def room(module: str) -> tuple[str, int] | None:
    """(package, rank from the top) of a module of a package with rooms; None for the rest and a package's
    ``__init__``."""
    package, _, short = module.rpartition(".")
    if package not in ROOMS:
        return None
    for rank, names in enumerate(ROOMS[package]):
        if short in names:
            return package, rank
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each (empty: the house is in order)."""
    order = list(FLOORS)
    out = [f"import cycle: {' ↔ '.join(c)}" for c in cycles(graph)]
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if dep == "ddray":
                out.append(f"{mod} imports the package ddray (read the version from ddray._version)")
            elif dep.startswith("ddray."):
                a, b = floor(mod), floor(dep)
                if a is not None and b is not None and order.index(b) < order.index(a):
                    out.append(f"{mod} ({a}) imports {dep} ({b}), a floor above")
                ra, rb = room(mod), room(dep)
                if ra is not None and rb is not None and ra[0] == rb[0] and rb[1] < ra[1]:
                    out.append(f"{mod} imports {dep}, a room above it in {ra[0]}")
                for folder, also in SELF_CONTAINED.items():
                    if inside(mod, folder) and not any(inside(dep, f) for f in (folder, *also)):
                        out.append(f"{mod} imports {dep}, outside {folder}")
            elif dep in ALLOWED_EXTERNAL and not any(inside(mod, m) for m in ALLOWED_EXTERNAL[dep]):
                out.append(f"{mod} imports {dep} (only {', '.join(ALLOWED_EXTERNAL[dep])} may)")
    return out
