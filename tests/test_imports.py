"""The project's layers import one way: no import cycle, meshrt knows no llm, llm's rooms in order.

A static check (the source is parsed, nothing is imported): every ``import`` and ``from ...
import`` statement counts, also those inside functions, since a lazy import only hides a cycle.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("meshrt", "llm")
#: llm's rooms, lowest first: a room imports only from the rooms before it (and from itself).
ROOMS = ("modeling", "text", "placement", "storage", "engine", "cost", "serve", "cli")
#: rooms that need no mesh at all: they import nothing from meshrt.
MESH_FREE = ("modeling", "text")


def module_names(root: Path = ROOT) -> dict:
    """``{dotted module name: source path}`` of every module of :data:`PACKAGES`."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known) -> set:
    """The project modules that module ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import fn`` only mod
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c``: the deepest known
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict:
    known = module_names(root)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of module names (first == last), or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert "meshrt.fabric" in graph and "llm.cli" in graph
    assert "meshrt.mesh" in graph["meshrt.fabric"]  # from .mesh import ...
    assert "llm.cli.generate" in graph["llm.cli"]  # from . import generate
    assert "meshrt.runtime" in graph["llm.cli.generate"]  # from meshrt import runtime


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_meshrt_imports_nothing_from_llm():
    graph = import_graph()
    leaks = sorted(
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith("meshrt")
        for t in targets
        if t == "llm" or t.startswith("llm.")
    )
    assert not leaks, "; ".join(leaks)


def room_of(module: str):
    """The room of an llm module (``llm.engine.model`` -> ``"engine"``), else ``None``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "llm" and len(parts) > 1 and parts[1] in ROOMS else None


def room_violations(graph: dict) -> list:
    """Every import of an llm room from a room after it, or of meshrt from a mesh-free room."""
    out = []
    for module, targets in sorted(graph.items()):
        room = room_of(module)
        if room is None:
            continue
        for target in sorted(targets):
            other = room_of(target)
            if other is not None and ROOMS.index(other) > ROOMS.index(room):
                out.append(f"{module} ({room}) imports {target} ({other})")
            if room in MESH_FREE and target.split(".")[0] == "meshrt":
                out.append(f"{module} ({room}, mesh-free) imports {target}")
    return out


def test_every_llm_module_lives_in_a_room():
    homeless = [
        m
        for m in import_graph()
        if m.startswith("llm.") and room_of(m) is None and m != "llm.__main__"
    ]
    assert not homeless, f"llm modules outside the rooms {ROOMS}: {homeless}"


def test_rooms_import_in_order():
    violations = room_violations(import_graph())
    assert not violations, "; ".join(violations)


def test_the_room_order_is_the_documented_one():
    """llm/__init__.py lists the rooms in the order this test enforces."""
    doc = ast.get_docstring(ast.parse((ROOT / "llm" / "__init__.py").read_text()))
    listed = re.findall(r"^\d+\. :mod:`llm\.(\w+)`", doc, re.M)
    assert tuple(listed) == ROOMS


@pytest.mark.parametrize(
    "graph, found",
    [
        ({"llm.engine.a": {"llm.modeling.b", "llm.engine.c", "meshrt.fabric"}}, []),
        (
            {"llm.storage.a": {"llm.engine.model"}},
            ["llm.storage.a (storage) imports llm.engine.model (engine)"],
        ),
        ({"llm.text.t": {"meshrt.mesh"}}, ["llm.text.t (text, mesh-free) imports meshrt.mesh"]),
        ({"llm.cli.x": {"llm.serve.generate", "llm.cost.predict"}, "llm": {"llm.cli.x"}}, []),
    ],
    ids=["downward", "upward", "mesh-free", "top-room"],
)
def test_the_room_check_finds_upward_imports(graph, found):
    assert room_violations(graph) == found


@pytest.mark.parametrize(
    "sources, cycle",
    [
        (
            {"meshrt/a.py": "from . import b\n", "meshrt/b.py": "def f():\n    from .a import g\n"},
            ["meshrt.a", "meshrt.b", "meshrt.a"],
        ),
        ({"meshrt/a.py": "from .b import x\n", "meshrt/b.py": "import numpy\n"}, None),
        (
            {
                "llm/__init__.py": "",
                "llm/p/__init__.py": "from .q import f\n",
                "llm/p/q.py": "from .. import r\n",
                "llm/r.py": "import llm.p\n",
            },
            ["llm.p", "llm.p.q", "llm.r", "llm.p"],
        ),
    ],
)
def test_the_check_finds_cycles(tmp_path, sources, cycle):
    """The checker itself: a lazy import closes a cycle; relative imports resolve."""
    for rel, text in sources.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "meshrt").mkdir(exist_ok=True)
    (tmp_path / "llm").mkdir(exist_ok=True)
    assert find_cycle(import_graph(tmp_path)) == cycle
