"""No import cycles between jmoe's modules, nor between its packages.

The graph is parsed from the source (``ast``), lazy imports inside functions
included: a lazy import hides a cycle from Python but not from a reader.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jmoe", "checkpoints_convert", "pallas_kernels")


def modules() -> dict[str, str]:
    """Module name -> file, for every module of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3]
                    name = rel.replace(os.sep, ".").removesuffix(".__init__")
                    out[name] = os.path.join(folder, f)
    return out


def imports_of(path: str, name: str, known: set[str]) -> set[str]:
    """Known modules imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # ``from a import b`` imports a, and a.b when b is a module
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # ``import a.b.c`` counts as a.b.c's closest module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, m, known) for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(edges.get(nxt, ())))))
                path.append(nxt)
    return None


def _ancestor(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_module_cycles():
    edges = graph()
    # a package's __init__ re-exports its modules, and importing any module runs the
    # __init__s above it: those edges are implied, not import decisions
    edges = {m: {t for t in ts if not _ancestor(t, m) and not _ancestor(m, t)}
             for m, ts in edges.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_cycles():
    top = lambda m: m.split(".")[0]
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for m, ts in graph().items():
        edges[top(m)] |= {top(t) for t in ts if top(t) != top(m)}
    cycle = find_cycle(edges)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    known = {"jmoe", "jmoe.x", "jmoe.y"}
    src = "def f():\n    from jmoe import y\n    import jmoe.x.z\n"
    path = str(tmp_path / "probe.py")
    with open(path, "w") as fh:
        fh.write(src)
    assert imports_of(path, "jmoe.w", known) == {"jmoe", "jmoe.y", "jmoe.x"}
