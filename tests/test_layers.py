"""The package's structure: formats/ < emulation/ < eval/ (a lower layer never imports a higher
one), and no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"formats": 0, "emulation": 1, "eval": 2}


def _modules():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            yield layer, path


def _imports(path: Path, layer: str):
    """(imported module, names) of every import in ``path``, modules made absolute."""
    pkg = ["precisim", layer, *path.relative_to(ROOT / layer).parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_lower_layers_do_not_import_higher_ones() -> None:
    bad = []
    for layer, path in _modules():
        for mod, _ in _imports(path, layer):
            parts = mod.split(".")
            if parts[0] == "precisim" and len(parts) > 1 and parts[1] in LAYERS \
                    and LAYERS[parts[1]] > LAYERS[layer]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_no_module_imports_another_modules_private_names() -> None:
    bad = []
    for layer, path in _modules():
        for mod, names in _imports(path, layer):
            if not mod.startswith("precisim"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}: from {mod} import {n}")
    assert not bad, bad
