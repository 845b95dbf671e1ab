"""The package's import graph keeps the layout of docs/DESIGN.md §9: no cycles, every import goes down the layers
(core at the bottom, pure PyTorch; pipelines and the CLI on top), pipelines are driven only by the CLI, and no
module imports another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tailkd_ray"

# Layer of each top-level part of the package (DESIGN §9): a module imports only from lower layers or its own part.
LAYERS = {
    "tailkd_ray": 0, "errors": 0,
    "core": 1,
    "config": 2,
    "runtime": 3, "placement": 3, "models": 3,
    "data": 4,
    "teacher": 5,
    "train": 6,
    "pipelines": 7,
    "cli": 8,
    "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of module ``name``, at any depth."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found += [(m, []) for m in submodules] + [(base, [n for n in names if f"{base}.{n}" not in MODULES])]
    return found


def package_edges() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    return {name: {target for target, _ in imports(name) if target in MODULES and target != name} for name in MODULES}


def part(name: str) -> str:
    """The top-level part of the package a module belongs to (``tailkd_ray.train.loop`` -> ``train``)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_has_a_layer():
    assert {part(name) for name in MODULES} <= set(LAYERS), sorted({part(n) for n in MODULES} - set(LAYERS))


def test_no_import_cycles():
    edges = package_edges()
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [name, target]))
            if target not in state:
                visit(target, stack + [name])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [])


def test_imports_go_down_the_layers():
    upward = [f"{name} -> {target}" for name, targets in package_edges().items() for target in targets
              if part(target) != part(name) and LAYERS[part(target)] >= LAYERS[part(name)]]
    assert not upward, upward


def test_core_is_pure_pytorch():
    """core/ imports no Ray and nothing of the package but core itself and errors."""
    core = [name for name in MODULES if part(name) == "core"]
    for name in core:
        for target, _ in imports(name):
            assert target.split(".")[0] != "ray", f"{name} imports {target}"
            if target.startswith("tailkd_ray"):
                assert part(target) in ("core", "errors"), f"{name} imports {target}"
    loaded = subprocess.run([sys.executable, "-c", "import sys; import " + ", ".join(core) +
                             "; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing core loads {loaded}"


def test_pipelines_are_driven_only_by_the_cli():
    importers = {name for name, targets in package_edges().items() for target in targets
                 if part(target) == "pipelines" and part(name) != "pipelines"}
    assert importers <= {"tailkd_ray.cli"}, importers


def test_no_private_names_imported_across_modules():
    private = [f"{name}: from {target} import {n}" for name in MODULES for target, names in imports(name)
               if target.startswith("tailkd_ray") and target != name for n in names if n.startswith("_")
               and not n.startswith("__")]
    assert not private, private
