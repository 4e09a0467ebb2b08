"""The package layers: no import cycle between qdefend's packages (imports inside functions
included), and the edge package imports nothing from the rest of qdefend."""

import ast
from collections import defaultdict
from pathlib import Path

import qdefend

ROOT = Path(qdefend.__file__).parent


def _imports():
    """(importing module, imported qdefend module, where) for every import in the package."""
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_pkg else parts)
        package = module if is_pkg else module.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = package.split(".")[: len(package.split(".")) - n.level + 1]
                    target = ".".join(base + ([n.module] if n.module else []))
                    names = [target] if n.module else [f"{target}.{a.name}" for a in n.names]
                else:
                    names = [n.module or ""]
            elif isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            else:
                continue
            for name in names:
                if name == "qdefend" or name.startswith("qdefend."):
                    yield module, name, f"{f.relative_to(ROOT.parent)}:{n.lineno}"


def _node(module: str) -> str:
    """A package (qdefend.attacks) or a top-level module (qdefend.train) of qdefend."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else "qdefend"


def test_no_import_cycle_between_packages():
    edges, where = defaultdict(set), {}
    for src, dst, loc in _imports():
        a, b = _node(src), _node(dst)
        if a != b and b != "qdefend":  # `from qdefend import QdefendError`: the root re-exports errors only
            edges[a].add(b)
            where.setdefault((a, b), loc)
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                cycle = path[path.index(w):] + [w]
                steps = ", ".join(f"{cycle[i]} -> {cycle[i + 1]} ({where[cycle[i], cycle[i + 1]]})"
                                  for i in range(len(cycle) - 1))
                raise AssertionError(f"import cycle: {steps}")
            if state.get(w) is None:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(edges):
        if state.get(v) is None:
            visit(v)
    assert edges["qdefend.attacks"] and edges["qdefend.defenses"]  # the graph was really read


def test_edge_imports_only_itself():
    """qdefend.edge is copied flat into device bundles: it may import nothing else of qdefend."""
    outside = [(src, dst, loc) for src, dst, loc in _imports()
               if src.startswith("qdefend.edge") and not dst.startswith("qdefend.edge")]
    assert outside == []
