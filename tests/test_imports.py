"""An import scan of the runtime: `monitor` never imports `train` or `bench` (not even inside a
function), no runtime module imports a network client, and monitor's import graph has no cycle."""

from __future__ import annotations

import ast

from tests.helpers import REPO

FORBIDDEN_PACKAGES = ("train", "bench")
# urllib.parse (the web page's query strings) is parsing, not a download: only clients are banned.
NETWORK_CLIENTS = ("urllib.request", "huggingface_hub", "requests", "httpx", "urllib3")


def _imports(path) -> list[tuple[str, int]]:
    """(module, line) of every import in the file, at any depth; relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def _monitor_modules() -> dict[str, object]:
    mods = {}
    for path in sorted((REPO / "monitor").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _hits(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def test_monitor_never_imports_train_or_bench_nor_a_network_client():
    bad = [f"{path.relative_to(REPO)}:{line}: {mod}" for path in _monitor_modules().values()
           for mod, line in _imports(path) if _hits(mod, FORBIDDEN_PACKAGES + NETWORK_CLIENTS)]
    assert not bad, "runtime imports it must not:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    mods = _monitor_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for mod, _ in _imports(path):
            # `from monitor.x import y`: y may be a module or a name in monitor.x
            target = mod if mod in mods else mod.rsplit(".", 1)[0] if "." in mod else mod
            if target in mods and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_monitor_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in monitor: " + "; ".join(" <-> ".join(c) for c in cycles)
