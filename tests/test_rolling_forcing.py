"""Rolling Forcing (TencentARC/RollingForcing, ``wan/modules/causal_model.py`` and
``pipeline/rolling_forcing_inference.py`` at a1477d0) through ``patch_causal_wan``: windows of
blocks at staggered noise levels, each written at its start, then its clean first block again
(``updating_cache=True``), the next window one block later."""

from __future__ import annotations

import copy

import pytest
import torch

from omnimem import OmniMemConfig
from omnimem.causal_wan import patch_causal_wan

from .causal_wan_standin import StandinRollingModel, StandinRollingPipeline
from .test_causal_wan import CHUNK, DIM, FREQS, FULL, GRID, HEADS, chunks


def rolling() -> StandinRollingModel:
    torch.manual_seed(0)
    return StandinRollingModel(num_layers=2, dim=DIM, num_heads=HEADS, block_length=CHUNK)


def test_full_budget_equals_rolling_forcing_over_its_windows():
    """Their loop, unmodified: every window's output (first windows growing at the start,
    shrinking at the end) equals their attention at full budget; their modules are found
    without a sink_size."""
    theirs = rolling()
    ours = copy.deepcopy(theirs)
    assert len(patch_causal_wan(ours, FULL, max_frames=24)) == 2
    inputs = chunks(8, seed=6)
    want = StandinRollingPipeline(theirs, buffer_tokens=8 * CHUNK).inference(inputs, GRID, FREQS)
    pipeline = StandinRollingPipeline(ours, buffer_tokens=8 * CHUNK)
    got = pipeline.inference(inputs, GRID, FREQS)
    assert len(got) == 8 + 3 - 1
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    cache = pipeline.kv_cache1[0]["omnimem"]
    assert cache.history_len + cache.chunk_len == 8 * CHUNK  # every clean block, the last one current


def test_with_a_budget_it_runs_past_their_window_and_refuses_a_bad_flag():
    budget = OmniMemConfig(block_size=4, top_k=3, sink_tokens=12, local_tokens=24, backend="gather")
    ours = rolling()
    patch_causal_wan(ours, budget, max_frames=60)
    inputs = chunks(30, seed=2)  # 60 frames; their working cache holds 10 blocks here
    first = StandinRollingPipeline(ours, buffer_tokens=30 * CHUNK).inference(inputs, GRID, FREQS)
    second = StandinRollingPipeline(ours, buffer_tokens=30 * CHUNK).inference(inputs, GRID, FREQS)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    pipeline = StandinRollingPipeline(ours, buffer_tokens=30 * CHUNK)
    pipeline.inference(inputs[:2], GRID, FREQS)
    attn = ours.blocks[0].self_attn
    with pytest.raises(TypeError, match="updating_cache must be a bool, got str"):
        attn(inputs[0], None, GRID, FREQS, None, pipeline.kv_cache1[0], 0, updating_cache="yes")
