"""The import graph: floors that only look down, and no cycles.

Every ``import`` of the project's own modules counts, including the lazy ones
inside functions: a lazy import still ties the two modules together.
Run ``python -m pytest tests/test_layers.py -q`` to check; the floors are
listed once, below; the README's layout table must say the same (checked).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Floor of each module; a module may import its own floor or lower ones, never higher.
FLOORS = {
    0: {  # core: the contract, the model and the graph, with no runtime library
        "painn_export",
        "painn_export.version",
        "painn_export.files",
        "painn_export.contract",
        "painn_export.errors",
        "painn_export.config",
        "painn_export.layers",
        "painn_export.slots",
        "painn_export.readout",
        "painn_export.model",
        "painn_export.reference",
        "painn_export.checkpoint",
        "painn_export.neighbors",
        "painn_export._neighbors_kernel",
        "painn_export._jit",
        "painn_export._collate_kernel",
        "painn_export.skin",
        "painn_export.batch",
        "painn_export.graphs_where",
        "painn_export.device_graphs",
        "painn_export._device_search",
        "painn_export._device_cap",
        "painn_export._device_layout",
        "painn_export.samples",
        "painn_export.schema",
        "painn_export.tolerances",
        "painn_export.metadata",
    },
    1: {  # runtimes: exporting, running and building engines
        "painn_export.export",
        "painn_export.aoti",
        "painn_export.opcheck",
        "painn_export.trt",
        "painn_export.runners",
        "painn_export.runners.base",
        "painn_export.runners.loaders",
        "painn_export.runners.eager",
        "painn_export.runners.ort",
        "painn_export.runners.aot",
        "painn_export.runners.engine",
        "painn_export.demo",
    },
    2: {  # applications
        "painn_export.parity",
        "painn_export.ase",
        "painn_export.cli",
        "painn_export.plots",
        "painn_export.parity_report",
    },
}
FLOOR_OF = {m: f for f, mods in FLOORS.items() for m in mods}
PIPELINES = 3  # the pipelines package: on top of everything


# Modules that never import torch, not even through another module of the project: the
# neighbour workers block torch (pipelines.graphs), and a driver that only reads files needs none.
NUMPY_ONLY = {
    "painn_export.version",
    "painn_export.files",
    "painn_export.contract",
    "painn_export.errors",
    "painn_export.readout",
    "painn_export.metadata",
    "painn_export.batch",
    "painn_export.neighbors",
    "painn_export._neighbors_kernel",
    "painn_export._jit",
    "painn_export._collate_kernel",
    "painn_export.skin",
    "painn_export.schema",
    "painn_export.samples",
}


def modules() -> dict[str, Path]:
    out = {}
    for package in ("painn_export", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "data" in parts:
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def floor(name: str) -> int:
    return PIPELINES if name.split(".")[0] == "pipelines" else FLOOR_OF[name]


def own_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file."""
    found = set()
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, node.level - 1 steps up
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: own_imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_floor():
    missing = [m for m in modules() if m.split(".")[0] == "painn_export" and m not in FLOOR_OF]
    assert not missing, f"give these modules a floor in FLOORS: {missing}"


def test_imports_only_look_down():
    upward = [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, deps in graph().items()
        for b in sorted(deps)
        if floor(b) > floor(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    deps = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(deps[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_readme_layout_table_lists_the_floors():
    """Each README layout row (``| N name | `a.py`, ... |``) names exactly that floor's modules;
    the pipelines row (floor 3) every module of the pipelines package."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout") :]
    listed: dict[int, set[str]] = {}
    for row in re.findall(r"^\| (\d) [^|]*\| ([^|]*) \|", section, re.M):
        floor_number, cell = int(row[0]), row[1]
        package = "pipelines" if floor_number == PIPELINES else "painn_export"
        names = re.findall(r"`(?:data/)?((?:runners/)?[a-z_]+)\.py`", cell)
        listed[floor_number] = {
            package if n == "__init__" else f"{package}." + n.replace("/__init__", "").replace("/", ".")
            for n in names
        }
    want = {f: {m for m in mods if m != "painn_export"} for f, mods in FLOORS.items()}
    want[PIPELINES] = {m for m in modules() if m.startswith("pipelines.")}
    got = {f: listed.get(f, set()) - {"painn_export", "pipelines"} for f in want}
    assert got == want


def test_the_numpy_only_floor_never_imports_torch():
    """Each NUMPY_ONLY module imports in a fresh interpreter where ``import torch`` fails, and none
    of them imports (even lazily) a project module outside that set."""
    import subprocess
    import sys

    deps = graph()
    leaks = [
        f"{m} imports {d}"
        for m in sorted(NUMPY_ONLY)
        for d in sorted(deps[m])
        if d not in NUMPY_ONLY | {"painn_export"}
    ]
    assert not leaks, "\n".join(leaks)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['cupy'] = None\n"
        + "".join(f"import {m}\n" for m in sorted(NUMPY_ONLY))
        + "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    "bad, expected",
    [({"painn_export.model": {"painn_export.runners"}}, "upward"), ({"a": {"b"}, "b": {"a"}}, "cycle")],
)
def test_the_checks_catch_what_they_look_for(bad, expected, monkeypatch):
    import sys

    module = sys.modules[__name__]
    if expected == "upward":
        monkeypatch.setattr(module, "graph", lambda: bad)
        with pytest.raises(AssertionError, match=r"imports painn_export\.runners"):
            test_imports_only_look_down()
    else:
        monkeypatch.setattr(module, "graph", lambda: bad)
        with pytest.raises(AssertionError, match="a -> b -> a"):
            test_no_import_cycles()
