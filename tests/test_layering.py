"""The dependency rule of DESIGN §1: the site model never imports the engine side."""

from __future__ import annotations

import ast
from pathlib import Path

import flowcopy

PACKAGE = Path(flowcopy.__file__).resolve().parent
ENGINE_SIDE = {"engine", "journal", "machine", "stages", "definitions", "planning", "runner", "commands",
               "chaos", "bench", "holds", "scheduler", "cli", "views"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_site_package_never_imports_the_engine() -> None:
    offenders = []
    for path in sorted((PACKAGE / "site").glob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "flowcopy" and len(parts) > 1 and parts[1] in ENGINE_SIDE:
                offenders.append(f"{path.name} imports {name}")
    assert offenders == []


def test_the_check_sees_an_offending_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from flowcopy.engine import Engine\nimport flowcopy.journal\n")
    assert {"flowcopy.engine", "flowcopy.journal"} <= imported_modules(bad)
