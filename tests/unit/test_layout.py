"""The house in rooms: each package imports only what the layout in DESIGN.md allows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGES = ("schemas", "streams", "pipeline", "handlers", "projections")
GROUND = (
    "pipeline.settings",
    "pipeline.errors",
    "pipeline.metrics",
    "pipeline.logs",
    "pipeline.tracing",
)
ROOMS = ("pipeline.store", "pipeline.ingest", "pipeline.detection", "pipeline.ops")
COMPOSITION_ROOTS = ("pipeline.app", "pipeline.api", "pipeline.ops")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that the file imports, anywhere in it."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


MODULES = {
    _module_name(path): _imports(path)
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offending(modules: tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    return {
        module: {i for i in imports if _under(i, forbidden)}
        for module, imports in MODULES.items()
        if _under(module, modules) and any(_under(i, forbidden) for i in imports)
    }


def test_the_scan_sees_the_packages() -> None:
    assert "pipeline.ingest.intake" in MODULES
    assert "pipeline.store.eventstore" in MODULES["pipeline.ingest.intake"]


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (("schemas",), ("pipeline", "streams", "handlers", "projections")),
        (("streams",), ("pipeline", "handlers", "projections")),
        (GROUND, (*ROOMS, "pipeline.app", "pipeline.api", "pipeline.audit", "handlers")),
        (
            ("pipeline.store",),
            ("pipeline.ingest", "pipeline.detection", "pipeline.ops", "pipeline.app"),
        ),
        (("pipeline.ingest",), ("pipeline.detection", "pipeline.ops", "pipeline.app")),
        (("pipeline.detection",), ("pipeline.ops", "pipeline.app")),
        (("handlers",), ("projections", "pipeline.app", "pipeline.ops")),
        (
            ("projections",),
            (
                "handlers",
                "pipeline.ingest",
                "pipeline.detection",
                "pipeline.ops",
                "pipeline.app",
                "pipeline.api",
            ),
        ),
    ],
)
def test_imports_follow_the_layout(modules: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert _offending(modules, forbidden) == {}


def test_only_composition_roots_import_handlers_and_projections() -> None:
    offending = {
        module: imports
        for module, imports in MODULES.items()
        if _under(module, ("pipeline",))
        and not _under(module, COMPOSITION_ROOTS)
        and any(_under(i, ("handlers", "projections")) for i in imports)
    }
    assert offending == {}
