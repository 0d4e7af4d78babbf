"""The project's layers import one way: no import cycle among its modules, meshrt knows no llm.

A static check (the source is parsed, nothing is imported): every ``import`` and ``from ...
import`` statement counts, also those inside functions, since a lazy import only hides a cycle.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("meshrt", "llm")


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
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import fn`` only mod
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:        # ``import a.b.c``: the deepest known
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
                return stack[stack.index(nxt):] + [nxt]
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
    assert "meshrt.mesh" in graph["meshrt.fabric"]          # from .mesh import ...
    assert "llm.cli.generate" in graph["llm.cli"]            # from . import generate
    assert "meshrt.runtime" in graph["llm.cli.generate"]     # from meshrt import runtime


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_meshrt_imports_nothing_from_llm():
    graph = import_graph()
    leaks = sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("meshrt")
                   for t in targets if t == "llm" or t.startswith("llm."))
    assert not leaks, "; ".join(leaks)


@pytest.mark.parametrize("sources, cycle", [
    ({"meshrt/a.py": "from . import b\n", "meshrt/b.py": "def f():\n    from .a import g\n"},
     ["meshrt.a", "meshrt.b", "meshrt.a"]),
    ({"meshrt/a.py": "from .b import x\n", "meshrt/b.py": "import numpy\n"}, None),
    ({"llm/__init__.py": "", "llm/p/__init__.py": "from .q import f\n",
      "llm/p/q.py": "from .. import r\n", "llm/r.py": "import llm.p\n"},
     ["llm.p", "llm.p.q", "llm.r", "llm.p"]),
])
def test_the_check_finds_cycles(tmp_path, sources, cycle):
    """The checker itself: a lazy import closes a cycle; relative imports resolve."""
    for rel, text in sources.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "meshrt").mkdir(exist_ok=True)
    (tmp_path / "llm").mkdir(exist_ok=True)
    assert find_cycle(import_graph(tmp_path)) == cycle
