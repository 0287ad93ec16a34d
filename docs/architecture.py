"""Draw docs/architecture.svg: how a run flows (left) and the package's floors, read from the source (right).

    python docs/architecture.py [OUT.svg]        # default: docs/architecture.svg next to this file

The left half is the runtime path — CLI → config → driver → parameter server(s) ⇄ workers →
artifact and MLflow — inside Ray Tune (``ddray tune``: one whole run per trial) inside a KubeRay
RayCluster/RayJob. The right half is computed by :mod:`architecture_rules` (tests/) from the modules on disk:
every floor with its modules, and how many imports go from each floor to each one below, so
a new module or a new dependency shows up the next time this runs (tests/test_architecture.py
fails while the committed picture misses a module).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the rules live with their test
from architecture_rules import FLOORS, ROOMS, floor, import_graph, room  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.svg"
BLUE, GREEN, ORANGE, GREY, PURPLE = "#dbe8f6", "#def2de", "#fbe5cc", "#eeeeee", "#ece0f5"


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, title: str, body: str = "", color: str = GREY,
        dashed: bool = False, title_at_top: bool = False) -> None:
    """A rounded box with a bold title (centred, or at the top for a container) and a smaller body."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01,rounding_size=0.015", fc=color,
                                ec="#555555", lw=1.0, ls="--" if dashed else "-"))
    if title_at_top:
        ax.text(x + 0.012, y + h - 0.012, title, ha="left", va="top", fontsize=8.5, weight="bold")
        return
    ax.text(x + w / 2, y + h / 2 + (0.012 if body else 0), title, ha="center", va="center", fontsize=8.5,
            weight="bold")
    if body:
        ax.text(x + w / 2, y + h / 2 - 0.018, body, ha="center", va="center", fontsize=6.5, color="#333333")


def arrow(ax: plt.Axes, a: tuple[float, float], b: tuple[float, float], label: str = "", both: bool = False,
          rad: float = 0.0) -> None:
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="<|-|>" if both else "-|>", mutation_scale=9, lw=1.0,
                                 color="#333333", connectionstyle=f"arc3,rad={rad}"))
    if label:
        ax.text((a[0] + b[0]) / 2 + 0.01, (a[1] + b[1]) / 2, label, fontsize=6.5, color="#333333", va="center")


def flow(ax: plt.Axes) -> None:
    """The runtime path of one run, and what wraps it."""
    ax.set_title("A run: who calls whom", fontsize=10, weight="bold")
    box(ax, 0.01, 0.01, 0.98, 0.95, "KubeRay: RayCluster (head + worker pods), RayJob runs the CLI — k8s/",
        color=PURPLE, dashed=True, title_at_top=True)
    box(ax, 0.03, 0.03, 0.94, 0.87, "Ray Tune (ddray tune): one whole run per trial — ddray/tune/",
        color="#f7f2fb", dashed=True, title_at_top=True)
    ax.text(0.045, 0.845, "ddray/core/ (pure torch) is the math every green box runs", fontsize=6.5, style="italic",
            color="#555555", va="top")
    box(ax, 0.33, 0.72, 0.34, 0.08, "CLI", "ddray/cli.py · ddray/__init__.py (API)", BLUE)
    box(ax, 0.33, 0.59, 0.34, 0.08, "config", "ddray/config.py · YAML + flags → frozen Config", BLUE)
    box(ax, 0.25, 0.43, 0.50, 0.10, "driver: the outer loop",
        "distributed/driver.py (Ray) · run/loop.py (--local)\nsample θ₀ → meta-gradients → apply → checkpoint → log",
        GREEN)
    box(ax, 0.06, 0.24, 0.34, 0.10, "parameter server(s)", "distributed/param_server.py\nx̃, η̃ + outer optimiser",
        GREEN)
    box(ax, 0.52, 0.24, 0.34, 0.10, "workers", "distributed/worker.py, fleet.py\nmeta-gradients of K nets", GREEN)
    box(ax, 0.06, 0.06, 0.34, 0.10, "artifact + checkpoints",
        "store/: artifact (data.parquet + meta.json)\ncheckpoint, storage (S3)", ORANGE)
    box(ax, 0.52, 0.06, 0.40, 0.10, "MLflow", "tracking/tracker.py (the only mlflow import)\nparams, metrics, grids",
        ORANGE)
    arrow(ax, (0.5, 0.72), (0.5, 0.67))
    arrow(ax, (0.5, 0.59), (0.5, 0.53))
    arrow(ax, (0.33, 0.43), (0.23, 0.34))
    ax.text(0.16, 0.385, "start, checkpoint", fontsize=6.5, color="#333333")
    arrow(ax, (0.62, 0.43), (0.69, 0.34))
    ax.text(0.665, 0.385, "chunks of nets", fontsize=6.5, color="#333333")
    arrow(ax, (0.40, 0.29), (0.52, 0.29), both=True)
    ax.text(0.46, 0.305, "x̃, η̃ ⇄ ∇", ha="center", fontsize=6.5)
    arrow(ax, (0.23, 0.24), (0.23, 0.16))
    ax.text(0.24, 0.20, "state", fontsize=6.5, color="#333333")
    ax.add_patch(FancyArrowPatch((0.75, 0.48), (0.89, 0.16), arrowstyle="-|>", mutation_scale=9, lw=1.0,
                                 color="#333333", connectionstyle="angle,angleA=0,angleB=90,rad=0"))
    ax.text(0.895, 0.40, "metrics,\nartifact", fontsize=6.5, color="#333333")


def members_of(f: str, mods: list[str]) -> str:
    """A floor's modules: a package's rooms top to bottom (``a, b > c``), or the flat modules' names."""
    package = FLOORS[f][0]
    if package not in ROOMS:
        return ", ".join(m.removeprefix("ddray.") for m in mods)
    ranks: dict[int, list[str]] = {}
    for m in mods:
        r = room(m)
        ranks.setdefault(r[1] if r else -1, []).append(m.removeprefix(package + "."))
    return " > ".join(", ".join(ranks[r]) for r in sorted(ranks))


def floors(ax: plt.Axes, graph: dict[str, set[str]]) -> None:
    """The floors with their modules (read from disk, a package's in its rooms' order) and the number of
    imports from each floor to each below."""
    ax.set_title("The package: floors and rooms, read from the source", fontsize=10, weight="bold")
    names = list(FLOORS)
    members: dict[str, list[str]] = {f: [] for f in names}
    for mod in sorted(graph):
        f = floor(mod)
        folder = f is not None and len(FLOORS[f]) == 1 and f != "cli"
        if f is None or (folder and mod == FLOORS[f][0]):
            continue  # the package itself, and a folder's __init__
        members[f].append(mod)
    counts = Counter((floor(m), floor(d)) for m, deps in graph.items() for d in deps
                     if d.startswith("ddray.") and floor(m) and floor(d) and floor(m) != floor(d))
    colors = {"cli": BLUE, "tune": PURPLE, "distributed": GREEN, "run": ORANGE, "evaluation": ORANGE,
              "inputs": ORANGE, "tracking": BLUE, "store": BLUE, "config": BLUE, "data": GREY, "core": GREY}
    gap, top_y = 0.02, 0.955
    height = (top_y - 0.03) / len(names) - gap
    ys = {}
    for i, f in enumerate(names):
        y = top_y - (i + 1) * height - i * gap
        ys[f] = y
        lines, line = [], ""
        for word in members_of(f, members[f]).split(" "):
            if len(line) + len(word) + 1 > 92:
                lines.append(line)
                line = ""
            line += (" " if line else "") + word
        lines.append(line)
        box(ax, 0.02, y, 0.72, height, "", color=colors[f])
        where = {"cli": "ddray/cli.py", "config": "ddray/*.py"}.get(f, f"ddray/{FLOORS[f][0].removeprefix('ddray.')}/")
        ax.text(0.03, y + height - 0.006, f"{f} — {where}", fontsize=7, weight="bold", va="top")
        ax.text(0.03, y + height - 0.026, "\n".join(lines), fontsize=5.3, va="top", family="monospace")
    for i, a in enumerate(names):  # one column per importing floor, an arrowhead on every floor it imports
        x = 0.765 + 0.021 * i
        for b in names[i + 1:]:
            n = counts.get((a, b), 0)
            if n:
                ax.add_patch(FancyArrowPatch((x, ys[a] + 0.005), (x, ys[b] + height), arrowstyle="-|>",
                                             mutation_scale=6, lw=0.7, color="#444444"))
                ax.text(x + 0.002, ys[b] + height + 0.004, str(n), fontsize=4.5, color="#444444")
    ax.text(0.02, 0.003, "a > b: room a may import room b, not the reverse. Arrows: imports from a floor (its column) "
            "down to a lower one, counted; none point up, no cycles (tests/test_architecture.py)", fontsize=5.8,
            style="italic", color="#555555")


def draw(out: Path = OUT) -> Path:
    """Write the picture to ``out`` (SVG, text kept as text, reproducible ids)."""
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "ddray-architecture"})
    fig, (left, right) = plt.subplots(1, 2, figsize=(13.5, 6.4))
    for ax in (left, right):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
    flow(left)
    floors(right, import_graph())
    fig.tight_layout()
    fig.savefig(out, metadata={"Date": None})
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
