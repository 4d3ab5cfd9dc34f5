"""The package's layout is its architecture: every import points down the layer list, never up.

Imports are read from the source with ``ast`` (module level and inside functions alike, relative ones resolved),
so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

#: lowest first; a module may import its own layer and the layers before it
LAYERS: list[tuple[str, ...]] = [
    ("vismech.errors", "vismech.version", "vismech.distributed", "vismech.store"),
    ("vismech.scenes",),
    ("vismech.analysis",),
    ("vismech.models",),
    ("vismech.engine",),
    ("vismech.experiments",),
    ("vismech.organism",),
    ("vismech.app",),
    ("vismech", "vismech.__main__", "vismech.api"),
]


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    if found is None:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported vismech module) for every import in ``path``; ``from P import name`` counts as importing
    ``P.name`` when that is a module or package, else ``P``."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vismech"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "vismech":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                as_path = SRC / Path(*sub.split("."))
                is_module = as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists()
                out.append((node.lineno, sub if is_module else target))
    return out


def upward_imports(root: Path = SRC / "vismech") -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path)
        for line, target in imports_of(path):
            if layer_of(target) > layer_of(mod):
                bad.append(f"{path.relative_to(SRC)}:{line}: {mod} imports {target}")
    return bad


def test_imports_point_down_the_layers():
    assert upward_imports() == []


def test_the_check_sees_upward_imports_lazy_and_relative(tmp_path):
    """The checker itself: an engine module that imports an experiment inside a function, and one that imports the
    app relatively, are both reported (the old ``activations -> experiments.behaviour`` import was of this kind)."""
    pkg = tmp_path / "vismech"
    for d in ("engine", "experiments", "app"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "experiments" / "behaviour.py").write_text("")
    (pkg / "engine" / "activations.py").write_text(
        "def f():\n    from vismech.experiments.behaviour import batches\n")
    (pkg / "engine" / "patching.py").write_text("from ..app import runner\nfrom . import hooks\n")
    global SRC
    old, SRC = SRC, tmp_path
    try:
        bad = upward_imports(pkg)
    finally:
        SRC = old
    assert bad == ["vismech/engine/activations.py:2: vismech.engine.activations imports vismech.experiments.behaviour",
                   "vismech/engine/patching.py:1: vismech.engine.patching imports vismech.app"]


@pytest.mark.parametrize("module, layer", [("vismech.store.units", 0), ("vismech.engine.hooks", 4),
                                           ("vismech.experiments.cma", 5), ("vismech.app.cli", 7), ("vismech", 8)])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
