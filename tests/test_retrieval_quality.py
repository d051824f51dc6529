"""The retrieval-quality claims, at a reduced size (the benchmark script runs the full one)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "retrieval_quality", Path(__file__).parents[1] / "benchmarks" / "retrieval_quality.py"
)
retrieval_quality = importlib.util.module_from_spec(spec)
sys.modules["retrieval_quality"] = retrieval_quality  # dataclasses look their module up
spec.loader.exec_module(retrieval_quality)


def test_adaptive_finds_the_revisited_scene_and_the_baselines_do_worse():
    scenario = retrieval_quality.Scenario(
        frame_tokens=128, history_frames=90, block_size=32, heads=4, scene_frames=8
    )
    rows = {r["method"]: r for r in retrieval_quality.evaluate(scenario, top_k=32)}
    assert rows["adaptive"]["recall"] >= 0.95
    assert rows["truncation"]["recall"] == 0.0
    assert rows["never"]["recall"] < rows["adaptive"]["recall"] - 0.1
    assert rows["never"]["error"] > rows["adaptive"]["error"]
    assert rows["truncation"]["error"] > rows["adaptive"]["error"]
    # Union Explosion: per-query-group selection touches more blocks per head than query-shared.
    assert rows["per-query-group (64)"]["union_per_head"] > rows["adaptive"]["union_per_head"]
