"""The import graph of the ``cggm`` package, read from the source (AST, nothing imported), checked
against a declared layer order; ``--long`` lists the functions over 60 lines instead.

Every ``import`` and ``from ... import`` counts, at module level and inside functions alike (a
function-level import is the same dependency, only deferred); only those under ``if TYPE_CHECKING:``
are left out (they never run: annotations only). ``from pkg import name`` is an edge
to ``pkg.name`` where that is a module of the package, else to ``pkg``. Importing a module does not
count as importing its parent packages' ``__init__``.

A *unit* is a top-level module (``cggm.types``) or a subpackage (``cggm.methods``, everything under
it). Each unit has a layer; a unit may import units of lower layers and its own modules, never a
unit of the same or a higher layer. From the bottom up:

0. ``_optional``, ``distributed``, ``optim``: plumbing on torch and the standard library alone (lazy
   optional imports, DDP reductions, the optimizer builder).
1. ``metrics``: metric computations on tensors (functional references, torchmetrics objects, the
   per-kind metric sets); they know nothing of tasks, models or data.
2. ``types``: the shared vocabulary (``ModelOutput``, ``Task``). A ``Task`` *composes* its kind's
   loss and metrics, so it sits above the metrics it is built from.
3. ``models``: encoders and fusion; they return ``ModelOutput`` and read the ``Task``.
4. ``data``: datasets, loaders, paper datasets; they build a ``Task`` and may name a model size,
   never a method or the engine.
5. ``methods``: the balancing methods act on a model's outputs and a batch.
6. ``training``: the engine drives a method over data (step, evaluation, checkpoints).
7. ``diagnostics``: analyses of a trained model (probes, Shapley values, the Bayes ceiling, plots);
   they evaluate with the engine.
8. ``integrations``: the engine's step inside other frameworks (Lightning).
9. ``config``: YAML presets and configs, resolved against the method, model and data registries.
10. ``runner``: a run and a benchmark from a config.
11. ``report``: the benchmark report (runs, then diagnostics of them).
12. ``commands``: what the command line does with saved runs (plots, the sweep, ``diagnose``).
13. ``demo``: the README's demonstration, a few runs and a table.
14. the package's ``__init__`` (the public facade); 15. ``cli``; 16. ``__main__``.

Prints each cycle of modules and each import that runs back up (an import of a unit of the same
or a higher layer), and exits 1 on any. ``--long`` prints the functions (and methods) longer than
``--max-lines`` (60) lines, decorators included, and exits 1 on any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cggm"

LAYERS: list[tuple[str, ...]] = [
    ("_optional", "distributed", "optim"),
    ("metrics",),
    ("types",),
    ("models",),
    ("data",),
    ("methods",),
    ("training",),
    ("diagnostics",),
    ("integrations",),
    ("config",),
    ("runner",),
    ("report",),
    ("commands",),
    ("demo",),
    ("__init__",),
    ("cli",),
    ("__main__",),
]
MAX_LINES = 60


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.AST) -> bool:
    """Whether ``node`` is an ``if TYPE_CHECKING:`` block."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(mods: dict[str, Path], package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """``{module: {imported module of the package: first line}}``."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        skip = {id(n) for block in ast.walk(tree) if _type_checking(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods and "." in target:  # import cggm.x.y.Name
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != name and (target == package or target.startswith(package + ".")):
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def unit(module: str, package: str = PACKAGE) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(unit_name: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit_name in names:
            return i
    raise KeyError(f"unit {unit_name!r} has no layer: add it to LAYERS in scripts/import_graph.py")


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def back_up(graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> list[str]:
    """Each import of a unit of the same or a higher layer, as ``file:line: a -> b (why)``."""
    out = []
    for a, edges in sorted(graph.items()):
        for b, line in sorted(edges.items()):
            ua, ub = unit(a), unit(b)
            if ua == ub:
                continue
            la, lb = layer(ua), layer(ub)
            if lb >= la:
                where = mods[a].relative_to(ROOT.parent)
                out.append(f"{where}:{line}: {a} -> {b} (layer {ua}={la} imports {ub}={lb})")
    return out


def long_functions(root: Path = ROOT, package: str = PACKAGE, max_lines: int = MAX_LINES) -> list[str]:
    """Each function or method over ``max_lines`` lines (decorators included), as ``file:line: name N``."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                        n = child.end_lineno - start + 1
                        if n > max_lines:
                            out.append(f"{path.relative_to(root.parent)}:{child.lineno}: {name} {n} lines")
                    name += "."
                stack.append((child, name))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="list the functions over --max-lines lines instead")
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    args = parser.parse_args(argv)
    if args.long:
        found = long_functions(max_lines=args.max_lines)
        for line in found:
            print(line)
        print(f"{len(found)} function(s) over {args.max_lines} lines")
        return 1 if found else 0
    mods = modules()
    graph = imports(mods)
    circles = cycles(graph)
    wrong = back_up(graph, mods)
    for comp in circles:
        print("cycle: " + " <-> ".join(comp))
    for line in wrong:
        print("back up: " + line)
    edges = sum(len(e) for e in graph.values())
    print(f"{len(mods)} modules, {edges} imports: {len(circles)} cycle(s), {len(wrong)} import(s) running back up")
    return 1 if circles or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
