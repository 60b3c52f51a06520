"""The layering the code promises (docs/architecture.md), checked over its imports.

Layers, each importing only from those before it:

    errors, data  <-  runtime  <-  frontends  <-  compiler  <-  passes  <-  backends  <-  api, cli, ...

and within ``passes/``: a pass module imports ``compiler/`` and ``passes/math/``, never another
pass; ``passes/math/`` is pure NumPy and imports nothing of tforge outside itself. No import
cycle exists among the modules of ``tforge/`` and ``tools/`` (imports inside functions count:
they are dependencies all the same). The rules read every ``import`` statement with ``ast``;
:func:`test_the_rules_catch_violations` shows that each rule fails on a deliberate violation.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Layer of each top-level part of the package; a module may import its own layer and lower ones.
LAYERS = {
    "tforge.errors": 0,
    "tforge.data": 0,
    "tforge.runtime": 1,
    "tforge.frontends": 2,
    "tforge.compiler": 3,
    "tforge.passes": 4,
    "tforge.backends": 5,
    # the user-facing top: it may import everything
    "tforge.api": 6,
    "tforge.cli": 6,
    "tforge.evaluate": 6,
    "tforge.presets": 6,
    "tforge.testing": 6,
    "tforge": 6,
}
#: Imports that cross layers on purpose, with why.
ALLOWED = {
    # The registry finds the built-in passes by importing their package (plugin discovery); it
    # never names or calls a pass's code.
    ("tforge.compiler.registry", "tforge.passes"),
}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool) -> list[str]:
    """Every module named by an import statement in ``source`` (relative imports resolved)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.append(prefix)
            found += [f"{prefix}.{alias.name}" for alias in node.names]
    return found


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, list[str]]:
    """module -> the modules of ``sources`` it imports (``from p import m`` counts as importing p.m
    when p.m is a module, else p)."""
    graph: dict[str, list[str]] = {}
    for module, (source, is_package) in sources.items():
        targets = []
        for name in imports(source, module, is_package):
            if name in sources and name != module:
                targets.append(name)
        graph[module] = list(dict.fromkeys(targets))
    # "from tforge.compiler import structure" lists both tforge.compiler and
    # tforge.compiler.structure: keep only the most specific module
    for module, targets in graph.items():
        graph[module] = [t for t in targets if not any(o.startswith(t + ".") for o in targets)]
    return graph


def layer_of(module: str) -> tuple[str, int] | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    return None


def layer_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        mine = layer_of(module)
        for target in targets:
            if (module, target) in ALLOWED:
                continue
            theirs = layer_of(target)
            if mine is None or theirs is None:
                continue
            if theirs[1] > mine[1]:
                bad.append(f"{module} imports {target} (layer {theirs[0]} is above {mine[0]})")
            if _is_pass(module) and _is_pass(target) and target != module:
                bad.append(f"pass {module} imports pass {target}")
            if module.startswith("tforge.passes.math") and not target.startswith("tforge.passes.math"):
                bad.append(f"math module {module} imports {target} (math is pure NumPy)")
    return bad


def _is_pass(module: str) -> bool:
    return module.startswith("tforge.passes.") and not module.startswith("tforge.passes.math")


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _sources(root: Path, folder: str) -> dict[str, tuple[str, bool]]:
    out = {}
    for path in sorted((root / folder).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        base = root if folder == "tforge" else root / folder
        out[module_name(path, base)] = (path.read_text(), path.name == "__init__.py")
    return out


@pytest.fixture(scope="module")
def tforge_graph() -> dict[str, list[str]]:
    return import_graph(_sources(REPO, "tforge"))


def test_every_module_has_a_layer(tforge_graph: dict[str, list[str]]) -> None:
    missing = [m for m in tforge_graph if layer_of(m) is None]
    assert not missing, f"modules outside the layering (add them to LAYERS): {missing}"


def test_layers_only_import_downwards(tforge_graph: dict[str, list[str]]) -> None:
    assert layer_violations(tforge_graph) == []


def test_no_import_cycles_in_tforge(tforge_graph: dict[str, list[str]]) -> None:
    assert cycles(tforge_graph) == []


def test_no_import_cycles_in_tools() -> None:
    # tools/ scripts import each other by file name (tools/ is on sys.path)
    assert cycles(import_graph(_sources(REPO, "tools"))) == []


def test_the_rules_catch_violations() -> None:
    """Each rule, on a small tree that breaks it."""
    broken = {
        "tforge.compiler.structure": ("import tforge.passes.quantize\n", False),
        "tforge.passes.quantize": ("from tforge.passes import smoothquant\n", False),
        "tforge.passes.smoothquant": ("from tforge.compiler import structure\n", False),
        "tforge.passes.math.int8": ("from tforge.compiler.structure import const_array\n", False),
        "tforge.runtime.ort": ("def f():\n    from tforge.backends import ort\n", False),
        "tforge.backends.ort": ("from tforge.runtime.ort import create_session\n", False),
        "tforge.passes": ("", True),
        "tforge.compiler": ("", True),
    }
    graph = import_graph(broken)
    bad = layer_violations(graph)
    assert "tforge.compiler.structure imports tforge.passes.quantize (layer tforge.passes is above tforge.compiler)" in bad
    assert "pass tforge.passes.quantize imports pass tforge.passes.smoothquant" in bad
    assert any(b.startswith("math module tforge.passes.math.int8 imports tforge.compiler.structure") for b in bad)
    assert "tforge.runtime.ort imports tforge.backends.ort (layer tforge.backends is above tforge.runtime)" in bad
    assert ["tforge.backends.ort", "tforge.runtime.ort"] in cycles(graph)
    # relative imports resolve like absolute ones
    rel = import_graph({"pkg.a": ("from .b import X\n", False), "pkg.b": ("from . import a\n", False)})
    assert cycles(rel) == [["pkg.a", "pkg.b"]]
