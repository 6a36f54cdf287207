"""Layering: ``lowrank_jax`` <- ``train`` <- ``analysis``; ``rundir`` is shared and imports
neither application. Every import statement (also those inside functions) is checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package, forbidden", [("train", {"analysis"}),
                                                ("rundir", {"analysis", "train"}),
                                                ("lowrank_jax", {"analysis", "train", "rundir"})])
def test_package_does_not_import_upwards(package, forbidden):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(REPO)): sorted(_imported_packages(f) & forbidden) for f in files}
    assert not {f: b for f, b in bad.items() if b}
