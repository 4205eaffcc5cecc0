"""Every package folder ships: a regular (non-editable) install lists packages explicitly in pyproject.toml,
so a new ``onnxsparse/<pkg>/`` that is not listed works from the checkout but is missing from a wheel."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    # tomllib is Python 3.11+; the line is simple enough to read directly (3.10 is supported).
    text = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^packages = \[(.*?)\]$", text, re.M)
    assert line, "pyproject.toml must list [tool.setuptools] packages"
    return set(re.findall(r'"([^"]+)"', line.group(1)))


def test_every_package_folder_is_declared() -> None:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "onnxsparse").rglob("__init__.py")} | {
        "onnxsparse.passes"
    }
    assert found == _declared()
