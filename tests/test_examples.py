"""The examples the docs include run and check what they claim (so the docs cannot rot)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart():
    assert "torch.Size([1, 4, 192, 64])" in run_example("quickstart.py")


def test_wan_integration_equals_dense_with_a_full_budget():
    assert "omnimem layer == dense layer" in run_example("wan_integration.py")


@pytest.mark.parametrize("chunks", ["6"])
def test_selection_heatmap(tmp_path, chunks):
    out = tmp_path / "heatmap.png"
    assert "wrote" in run_example("selection_heatmap.py", "--chunks", chunks, "--out", str(out))
    assert out.stat().st_size > 0
