"""The house rules of docs/architecture.md, checked on the import graph of the source (ast, nothing imported).

No import cycles; every module on its floor (cli > tune > distributed > run > evaluation > inputs >
tracking > store > config > data > core) imports only its own floor and those below, and inside a
package only its own room and those below; ``ddray.core`` imports nothing of ddray outside itself
and ``ddray.data`` nothing but ``ddray.core``, and ``ddray.core`` neither Ray nor MLflow; only
``ddray/tracking/tracker.py`` imports MLflow. The rules live beside this test, in tests/architecture_rules.py,
which docs/architecture.py also draws.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from architecture_rules import FLOORS, ROOMS, cycles, floor, import_graph, inside, modules, room, violations


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_package_keeps_its_house_rules(graph: dict[str, set[str]]) -> None:
    assert violations(graph) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_core_imports_torch_and_itself_only(graph: dict[str, set[str]]) -> None:
    core = {m: deps for m, deps in graph.items() if inside(m, "ddray.core")}
    assert len(core) >= 10
    for mod, deps in core.items():
        assert not deps & {"ray", "mlflow"}, mod
        assert all(inside(d, "ddray.core") for d in deps if d.startswith("ddray")), (mod, deps)


def test_data_imports_itself_and_the_core_only(graph: dict[str, set[str]]) -> None:
    data = {m: deps for m, deps in graph.items() if inside(m, "ddray.data")}
    assert "ddray.core.images" in data["ddray.data.base"]
    for mod, deps in data.items():
        assert not deps & {"ray", "mlflow"}, mod
        assert all(inside(d, "ddray.data") or inside(d, "ddray.core") for d in deps if d.startswith("ddray")), mod


def test_only_tracking_imports_mlflow(graph: dict[str, set[str]]) -> None:
    assert {m for m, deps in graph.items() if "mlflow" in deps} == {"ddray.tracking.tracker"}


def test_every_module_has_a_floor() -> None:
    unplaced = [m for m in modules() if m != "ddray" and floor(m) is None]
    assert unplaced == [], f"add them to FLOORS in tests/architecture_rules.py: {unplaced}"
    assert list(FLOORS) == ["cli", "tune", "distributed", "run", "evaluation", "inputs", "tracking", "store",
                            "config", "data", "core"]


def test_the_flat_floor_is_small_and_every_module_of_a_package_has_a_room() -> None:
    flat = [m for m in modules() if m.count(".") == 1 and modules()[m].name != "__init__.py"]
    assert len(flat) <= 8, f"ddray/ holds {len(flat)} flat modules; give them a package: {flat}"
    roomless = [m for m in modules() if m.rpartition(".")[0] in ROOMS and room(m) is None]
    assert roomless == [], f"add them to ROOMS in tests/architecture_rules.py: {roomless}"
    assert set(ROOMS) == {FLOORS[f][0] for f in FLOORS if f not in ("cli", "config")}


def test_the_graph_sees_the_imports_that_break_the_rules(tmp_path: Path) -> None:
    """The checker itself: a cycle, an upward import, mlflow outside tracking and a lazy import are all caught."""
    pkg = tmp_path / "ddray"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text('_LAZY = {"distill": "ddray.run.loop"}\n')
    (pkg / "_version.py").write_text('__version__ = "0"\n')
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "unroll.py").write_text("import mlflow\nfrom ddray.config import Config\n")
    (pkg / "config.py").write_text("def f():\n    from ddray.run.loop import run\n")
    (pkg / "run").mkdir()
    (pkg / "run" / "__init__.py").write_text("")
    (pkg / "run" / "loop.py").write_text("from ddray import config\nfrom ddray.distributed.driver import go\n")
    (pkg / "run" / "state.py").write_text("from ddray.run.lifecycle import start\n")
    (pkg / "run" / "lifecycle.py").write_text("from ddray.run.state import RunState\n")
    (pkg / "distributed").mkdir()
    (pkg / "distributed" / "__init__.py").write_text("")
    (pkg / "distributed" / "driver.py").write_text("from ddray._version import __version__\n")
    g = import_graph(tmp_path)
    assert g["ddray"] == {"ddray.run.loop"} and g["ddray.run.loop"] == {"ddray.config", "ddray.distributed.driver"}
    found = violations(g)
    assert "import cycle: ddray.config ↔ ddray.run.loop" in found
    assert "ddray.core.unroll imports mlflow (only ddray.tracking.tracker may)" in found
    assert "ddray.core.unroll imports ddray.config, outside ddray.core" in found
    assert "ddray.core.unroll (core) imports ddray.config (config), a floor above" in found
    assert "ddray.run.loop (run) imports ddray.distributed.driver (distributed), a floor above" in found
    assert "ddray.run.state imports ddray.run.lifecycle, a room above it in ddray.run" in found
    assert not [v for v in found if v.startswith("ddray.run.lifecycle imports")]  # a room below is allowed
    assert not [v for v in found if v.startswith("ddray.distributed.driver")]  # _version is not the package


def test_the_committed_picture_shows_every_module() -> None:
    """docs/architecture.svg is drawn from the source by docs/architecture.py; run it again when this fails."""
    svg = (Path(__file__).resolve().parents[1] / "docs" / "architecture.svg").read_text()
    listed = set(re.findall(r"[\w.]+", " ".join(re.findall(r">([^<>]*)</text>", svg))))
    missing = []
    for mod in modules():
        f = floor(mod)
        folder = f is not None and len(FLOORS[f]) == 1 and f != "cli"
        if f is None or (folder and mod == FLOORS[f][0]):
            continue  # the package, and a folder's __init__
        short = mod.removeprefix(FLOORS[f][0] + ".") if folder else mod.removeprefix("ddray.")
        if short not in listed:
            missing.append(mod)
    assert missing == [], f"docs/architecture.svg misses {missing}: run `python docs/architecture.py`"


def test_no_file_of_the_project_reads_the_teams_shared_folder() -> None:
    """A user's clone has no ../shared: the package and the tests must not reach for it (the benchmarks and
    experiments take such paths as arguments)."""
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""parents?\[?\d*\]?\s*/\s*["']shared["']|\.\./shared|/work/shared""")
    offenders = [str(p.relative_to(root)) for folder in ("ddray", "tests") for p in (root / folder).rglob("*.py")
                 if pattern.search(p.read_text()) and p.name != "test_architecture.py"]
    assert offenders == []
