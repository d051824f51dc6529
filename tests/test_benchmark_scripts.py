"""The GPU benchmark scripts run end to end on a tiny CPU model (``--smoke``), so that a device
call is never spent on a script that no longer runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["codebases_gpu.py", "hour_gpu.py", "self_forcing_rollout_gpu.py"])
def test_a_benchmark_script_runs_its_smoke_mode(script, tmp_path):
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["rows"], result
