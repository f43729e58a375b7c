"""The package's dependency rule, checked on the source: imports only point down the rooms of LAYERS (cli and the
training entry point on top, base at the bottom), and no module imports another module's private name."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "halfv_export"
# each may import only those before it
LAYERS = ["base", "host", "tasks", "graphs", "engines", "measure", "calibration", "benchmarks", "stages", "serving", "cli",
          "training"]


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every `from ... import` in a package module."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_only_point_down(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in sorted((ROOT / layer).rglob("*.py")):
        for module, names, line in imports_of(path):
            parts = module.split(".")
            if parts[0] != "halfv_export" or len(parts) < 2:
                continue
            target = parts[1] if parts[1] in LAYERS else (names[0] if module == "halfv_export" else None)
            assert target is None or target in allowed, f"{path.relative_to(ROOT)}:{line} imports {module} ({target})"


def test_no_private_names_cross_modules():
    for path in sorted(ROOT.rglob("*.py")):
        for module, names, line in imports_of(path):
            if module.startswith("halfv_export"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)}:{line} imports private {private} from {module}"


def test_every_room_has_a_layer():
    rooms = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert rooms == set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}; layers without a room: " \
                                 f"{sorted(set(LAYERS) - rooms)}"
