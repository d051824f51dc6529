"""patch_causal_wan on a stand-in for a Self-Forcing-family model and its unmodified loop."""

from __future__ import annotations

import copy

import pytest
import torch

from omnimem import OmniMemCache, OmniMemConfig
from omnimem.causal_wan import patch_causal_wan, unpatch_causal_wan
from omnimem.gated_wan import wan_rope_freqs

from .causal_wan_standin import StandinModel, StandinPipeline

GRID = torch.tensor([[2, 3, 4]])  # chunks of 2 frames of 3 x 4 tokens
FRAME, CHUNK, DIM, HEADS = 12, 24, 32, 2
FREQS = wan_rope_freqs(DIM // HEADS)
# Everything attended: 4-token blocks, a budget larger than any history here.
FULL = OmniMemConfig(block_size=4, top_k=64, sink_tokens=0, local_tokens=0, backend="dense")


def chunks(count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, CHUNK, DIM, generator=gen) for _ in range(count)]


def model(window: int = 32760) -> StandinModel:
    torch.manual_seed(0)
    return StandinModel(num_layers=2, dim=DIM, num_heads=HEADS, window=window)


def test_full_budget_equals_their_cache_over_an_unmodified_loop():
    theirs = model()
    ours = copy.deepcopy(theirs)
    patched = patch_causal_wan(ours, FULL, max_frames=12)
    assert len(patched) == 2
    inputs = chunks(5)
    want = StandinPipeline(theirs, buffer_tokens=5 * CHUNK).inference(inputs, GRID, FREQS)
    pipeline = StandinPipeline(ours, buffer_tokens=5 * CHUNK)
    got = pipeline.inference(inputs, GRID, FREQS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
    cache = pipeline.kv_cache1[0]["omnimem"]
    assert isinstance(cache, OmniMemCache)
    assert (cache.history_len, cache.chunk_len) == (4 * CHUNK, CHUNK)  # the last chunk is current
    assert pipeline.kv_cache1[0]["k"].numel() == 0  # their window buffer was released
    # The loop resets its caches by item assignment for the next video: same results again.
    again = pipeline.inference(inputs, GRID, FREQS)
    for g, w in zip(again, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_a_budget_runs_past_their_window_and_differs_from_truncation():
    """Their model attends only its last `window` tokens; with a budget omnimem keeps the whole
    history (here 3x the window) and retrieves from all of it."""
    window = 2 * CHUNK
    truncated = model(window=window)
    ours = copy.deepcopy(truncated)
    patch_causal_wan(ours, FULL.replace(top_k=2), max_frames=14, sink_frames=1, local_frames=2)
    inputs = chunks(7, seed=1)
    pipeline = StandinPipeline(ours, buffer_tokens=window)
    got = pipeline.inference(inputs, GRID, FREQS)
    cache = pipeline.kv_cache1[1]["omnimem"]
    assert cache.history_len == 6 * CHUNK > window
    assert (cache.config.sink_tokens, cache.config.local_tokens) == (FRAME, 2 * FRAME)
    want = StandinPipeline(truncated, buffer_tokens=7 * CHUNK).inference(inputs, GRID, FREQS)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=2e-5)  # history fits everything
    assert all(torch.isfinite(g).all() for g in got)
    assert not torch.allclose(got[-1], want[-1], atol=1e-3)  # not the truncated answer


def test_unpatch_restores_their_forward_and_training_path_is_untouched():
    theirs = model()
    ours = copy.deepcopy(theirs)
    patch_causal_wan(ours, FULL, max_frames=4)
    x = chunks(1)[0]
    # Without a kv_cache (training / teacher forcing) the original forward runs.
    torch.testing.assert_close(ours(x, GRID, FREQS), theirs(x, GRID, FREQS), atol=0, rtol=0)
    assert unpatch_causal_wan(ours) == 2
    inputs = chunks(2)
    want = StandinPipeline(theirs, buffer_tokens=2 * CHUNK).inference(inputs, GRID, FREQS)
    got = StandinPipeline(ours, buffer_tokens=2 * CHUNK).inference(inputs, GRID, FREQS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_misuse_is_refused_clearly():
    with pytest.raises(ValueError, match="found no CausalWanSelfAttention-like module"):
        patch_causal_wan(torch.nn.Linear(2, 2), max_frames=4)
    ours = model()
    with pytest.raises(ValueError, match="max_frames must be an int >= 1"):
        patch_causal_wan(ours, max_frames=0)
    with pytest.raises(TypeError, match="config must be an OmniMemConfig"):
        patch_causal_wan(ours, config={"top_k": 4}, max_frames=4)
    with pytest.raises(TypeError, match="unknown OmniMemConfig field"):
        patch_causal_wan(ours, max_frames=4, topk=4)
    patch_causal_wan(ours, FULL, max_frames=4)
    with pytest.raises(ValueError, match="already patched"):
        patch_causal_wan(ours, FULL, max_frames=4)
    pipeline = StandinPipeline(ours, buffer_tokens=4 * CHUNK)
    pipeline.inference(chunks(1), GRID, FREQS)
    x = chunks(1)[0]
    with pytest.raises(ValueError, match=r"start must be 0 \(rewrite the current chunk\) or 24"):
        ours(x, GRID, FREQS, pipeline.kv_cache1, current_start=2 * CHUNK)  # a skipped chunk
    with pytest.raises(ValueError, match="past the cache capacity of 48"):
        pipeline.inference(chunks(4), GRID, FREQS)  # 3 chunks of history > max_frames=4
