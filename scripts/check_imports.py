"""Import every module of l2o alone, each in a fresh interpreter, and check that the modules'
top-level imports form no cycle (CI runs this).

A module that imports only because of the order in which something else happened to load l2o
fails the first check; an import cycle that works only because of that order (``l2o/__init__``
-> ``guard`` -> ``learned.optimizer`` -> ``learned.checkpoint`` -> ``import l2o``) fails the
second, which reads the import statements that run at import time (not those inside functions
or under ``if TYPE_CHECKING``).

    python scripts/check_imports.py            # exit 1 and the failures if anything fails
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> list[str]:
    import l2o

    found = ["l2o"]
    for info in pkgutil.walk_packages(l2o.__path__, prefix="l2o."):
        found.append(info.name)
    return sorted(found)


def import_alone(name: str) -> tuple[str, int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return name, proc.returncode, proc.stderr.strip().splitlines()[-1:] and proc.stderr


def _source(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements executed at import time (module body, try/if blocks)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return found


def import_graph(names: list[str]) -> dict[str, set[str]]:
    """Module -> the l2o modules its import-time statements name."""
    known = set(names)
    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse(_source(name).read_text())
        package = name if _source(name).name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _top_level_imports(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                edges.add(full if full in known else base)
        graph[name] = {e for e in edges if e in known and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    names = modules()
    loops = cycles(import_graph(names))
    for loop in loops:
        print(f"FAILED import cycle: {' <-> '.join(loop)}", file=sys.stderr)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(import_alone, names))
    failed = [(name, err) for name, code, err in results if code != 0]
    for name, err in failed:
        print(f"FAILED import {name}:\n{err}", file=sys.stderr)
    print(f"{len(names) - len(failed)} passed, {len(failed) + len(loops)} failed")
    return 1 if failed or loops else 0


if __name__ == "__main__":
    sys.exit(main())
