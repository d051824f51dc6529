"""The wheel ships every subpackage: pyproject lists packages explicitly, so a new folder
must be added there or a non-editable install fails to import it."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "omnimem").rglob("__init__.py")
    }
    found |= {"omnimem.backends." + p.parent.name for p in (ROOT / "backends").glob("*/__init__.py")}
    found.add("omnimem.backends")
    missing = found - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
