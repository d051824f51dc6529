"""The GPU benchmark scripts run end to end on a tiny CPU model (``--smoke``), so that a device
call is never spent on a script that no longer runs."""

from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("mode", ["--smoke", "--check"])
@pytest.mark.parametrize("codebase", ["Self-Forcing", "CausVid", "Rolling Forcing"])
def test_their_models_script_runs_on_a_fake_checkout(codebase, mode, tmp_path):
    """``their_models_gpu.py`` imports a codebase's model from a folder of checkouts; here fake
    ones (``tests/fake_codebase``: the stand-in blocks behind their model's call) stand for
    Self-Forcing's, CausVid's (``current_end``) and Rolling Forcing's (a window of blocks, then
    ``updating_cache``), so the script's loops, patching and check run in CI."""
    fakes = Path(__file__).parent / "fake_codebase"
    for name in ("self-forcing", "causvid", "rolling-forcing"):
        (tmp_path / name).symlink_to(fakes / name)
    path = f"{Path(__file__).parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    done = subprocess.run(
        # 3 s: the fakes' caches do not roll (their real models' do, past 21 frames: 6 s)
        [sys.executable, str(BENCHMARKS / "their_models_gpu.py"), "--theirs", str(tmp_path), mode,
         "--only", codebase, "--smoke-seconds", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and "error" not in rows[0], done.stdout[-2000:]
    if mode == "--check":  # at full budget the patched model is theirs, to a bf16 ulp
        assert rows[0]["max_relative_difference"] <= 2**-7
    else:
        assert rows[0]["omnimem_ms"] > 0 and rows[0]["theirs_ms"] > 0


def test_every_gpu_benchmark_script_imports_without_a_gpu():
    """Each ``benchmarks/*_gpu.py`` module's top level (its imports of the library's names, its
    tables of kernel switches) runs here, so a renamed or removed name fails in CI, not in a
    device call (``kv_formats_gpu.py`` once named a removed switch at import)."""
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*_gpu.py"))
    code = (
        "import importlib, sys\n"
        "failed = {}\n"
        f"for name in {scripts!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed[name] = repr(err)\n"
        "print(failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300
    )
    assert len(scripts) > 10
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
