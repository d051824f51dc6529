"""LongLive (NVlabs/LongLive, ``wan/modules/causal_model.py`` at d69a1fa) through
``patch_causal_wan``: its layers return their cache update for the model to apply, and a
prompt switch re-encodes the frames so far under the new prompt with a block-causal mask."""

from __future__ import annotations

import copy

import pytest
import torch

from omnimem import OmniMemConfig
from omnimem.causal_wan import patch_causal_wan

from .causal_wan_standin import StandinBlockMask, StandinLongLiveModel, StandinLongLivePipeline
from .test_causal_wan import CHUNK, DIM, FREQS, FULL, GRID, HEADS, chunks

PROMPTS = (0.0, 0.3, -0.2)


def longlive() -> StandinLongLiveModel:
    torch.manual_seed(0)
    return StandinLongLiveModel(num_layers=2, dim=DIM, num_heads=HEADS)


def run(model, inputs, **kw):
    pipeline = StandinLongLivePipeline(model, buffer_tokens=len(inputs) * CHUNK)
    return pipeline, pipeline.inference(inputs, GRID, FREQS, switches=(3, 6), prompts=PROMPTS, **kw)


@pytest.mark.parametrize("offload", [False, True])
def test_full_budget_equals_longlive_through_prompt_switches(offload):
    """Their loop, unmodified: every chunk's output equals their own attention at full budget,
    before and after two prompt switches (each re-encodes the frames so far, block-causally,
    under the new prompt; from frame 0 any cache, offloaded too, starts again); their end
    indices keep moving as theirs do."""
    theirs = longlive()
    ours = copy.deepcopy(theirs)
    patch_causal_wan(ours, FULL, max_frames=20, offload=offload)
    inputs = chunks(9, seed=4)
    _, want = run(theirs, inputs)
    pipeline, got = run(ours, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    layer = pipeline.kv_cache1[0]
    assert int(layer["global_end_index"]) == int(layer["local_end_index"]) == 9 * CHUNK
    assert layer["k"].numel() == 0  # their window buffers are released once patched
    cache = layer["omnimem"]
    assert cache.history_len + cache.chunk_len == 9 * CHUNK


def test_with_a_budget_prompt_switches_give_the_same_video_again():
    """Full-range retrieval with a budget (sink, window, top-k blocks) through the same loop:
    switches re-encode, and a second run of the same loop gives the same outputs."""
    budget = OmniMemConfig(block_size=4, top_k=3, sink_tokens=12, local_tokens=24, backend="gather")
    ours = longlive()
    patch_causal_wan(ours, budget, max_frames=40)
    inputs = chunks(20, seed=5)
    _, first = run(ours, inputs)
    _, second = run(ours, inputs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    theirs = longlive()
    _, full = run(theirs, inputs)
    assert not torch.allclose(first[-1], full[-1], atol=1e-4)  # the budget did select


def test_a_reencode_inside_a_global_sink_is_refused_before_anything_changes():
    ours = longlive()
    for block in ours.blocks:
        block.self_attn.sink_size = 1
    patch_causal_wan(ours, FULL, max_frames=20)
    pipeline, _ = run(ours, chunks(2, seed=1))
    layer = pipeline.kv_cache1[0]
    layer["global_sink"] = True
    before = layer["omnimem"].history_len, layer["omnimem"].chunk_len
    attn = ours.blocks[0].self_attn
    with pytest.raises(ValueError, match=r"re-encode from current_start=0 with kv_cache\['global_sink'\]"):
        attn(chunks(1)[0], None, GRID, FREQS, StandinBlockMask(2), layer, 0)
    assert (layer["omnimem"].history_len, layer["omnimem"].chunk_len) == before


def test_a_reencode_in_blocks_larger_than_the_cache_takes_is_refused_before_anything_changes():
    ours = longlive()
    ours.num_frame_per_block = 4  # 48 tokens; the caches take 3 frames (36)
    patch_causal_wan(ours, FULL, max_frames=20, max_chunk_frames=3)
    pipeline, _ = run(ours, chunks(2, seed=1))
    layer = pipeline.kv_cache1[0]
    before = layer["omnimem"].history_len, layer["omnimem"].chunk_len
    attn = ours.blocks[0].self_attn
    x = torch.cat(chunks(2), dim=1)  # 4 frames at frame 0
    grid = torch.tensor([[4, 3, 4]])
    with pytest.raises(ValueError, match=r"re-encode in blocks of 48 tokens, .* at most 36"):
        attn(x, None, grid, FREQS, StandinBlockMask(4), layer, 0)
    assert (layer["omnimem"].history_len, layer["omnimem"].chunk_len) == before
