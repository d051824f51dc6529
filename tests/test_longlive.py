"""LongLive (NVlabs/LongLive, ``wan/modules/causal_model.py`` at d69a1fa) through
``patch_causal_wan``: its layers return their cache update for the model to apply, and a
prompt switch re-encodes the frames so far under the new prompt with a block-causal mask."""

from __future__ import annotations

import copy

import pytest
import torch

from omnimem import OmniMemConfig
from omnimem.causal_wan import patch_causal_wan

from .causal_wan_standin import (
    StandinBlockMask,
    StandinLongLive2Model,
    StandinLongLiveModel,
    StandinLongLivePipeline,
    grid_sizes_of,
)
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


def test_a_reencode_from_a_later_frame_runs_offloaded(poisoned_allocations):
    """A re-cache of the last frames only (LongLive with ``local_attn_size`` set re-encodes from a
    later frame): the cache rewinds there, offloaded as resident, and the video goes on alike
    (bit for bit on ``gather``)."""
    outs = []
    for offload in (False, True):
        ours = longlive()
        patch_causal_wan(ours, FULL.replace(backend="gather"), max_frames=20, offload=offload)
        pipeline, _ = run(ours, chunks(3, seed=2))  # 3 chunks, a switch at 3 never comes
        recent = torch.cat(chunks(3, seed=2)[1:], dim=1)  # chunks 1 and 2 again, from frame CHUNK
        with torch.no_grad():
            ours(recent, grid_sizes_of(GRID, 2), FREQS, pipeline.kv_cache1, CHUNK, StandinBlockMask(2), 0.3)
            nxt = chunks(1, seed=9)[0]
            outs.append(ours(nxt, GRID, FREQS, pipeline.kv_cache1, 3 * CHUNK, cond=0.3))
        assert pipeline.kv_cache1[0]["omnimem"].history_len == 3 * CHUNK
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


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


def test_the_ninth_argument_of_longlives_last_layer():
    """LongLive's 1.3B layer at its last version (7b56712) passes ``sink_recache_after_switch``
    ninth: a re-cache after frame 0 keeps the first prompt's sink unless it is True. Accepted;
    generation is unchanged by it; a re-encode inside a kept sink is refused before anything
    changes, one that rewrites the sink runs; a non-bool is a TypeError."""
    ours = longlive()
    for block in ours.blocks:
        block.self_attn.sink_size = 2  # frames
    patch_causal_wan(ours, FULL, max_frames=20)
    pipeline, _ = run(ours, chunks(2, seed=1))
    layer, attn = pipeline.kv_cache1[0], ours.blocks[0].self_attn
    cache = layer["omnimem"]
    x = chunks(1, seed=4)[0]
    plain = attn(x, None, GRID, FREQS, None, layer, 2 * CHUNK)
    again = attn(x, None, GRID, FREQS, None, layer, 2 * CHUNK, None, False)  # the same chunk rewritten
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    frame = int(GRID[0][1] * GRID[0][2])
    before = cache.history_len, cache.chunk_len
    with pytest.raises(
        ValueError, match=r"current_start=\d+ with sink_recache_after_switch=False starts inside"
    ):
        attn(x, None, GRID, FREQS, StandinBlockMask(2), layer, frame, None, False)
    with pytest.raises(TypeError, match="sink_recache_after_switch must be a bool, got int"):
        attn(x, None, GRID, FREQS, StandinBlockMask(2), layer, frame, None, 1)
    assert (cache.history_len, cache.chunk_len) == before
    out, _ = attn(x, None, GRID, FREQS, StandinBlockMask(2), layer, frame, None, True)  # rewrites the sink
    assert out.shape == x.shape and cache.history_len + cache.chunk_len == frame + x.shape[1]


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


def longlive2(**rope) -> StandinLongLive2Model:
    torch.manual_seed(0)
    model = StandinLongLive2Model(num_layers=2, dim=DIM, num_heads=HEADS)
    for name, value in rope.items():
        setattr(model, name, value)
    return model


@pytest.mark.parametrize(
    "rope",
    [
        dict(t_scale=0.5),
        dict(t_scale=0.75, rope_temporal_offset=3.0),
        dict(rope_temporal_offset=torch.arange(40, dtype=torch.float64) * 0.25),  # per frame of the video
        dict(t_scale=0.5, use_relative_rope=True),
    ],
)
def test_longlive2_rope_options_equal_their_attention_at_full_budget(rope, poisoned_allocations):
    """LongLive-2.0 (its current model) passes ``t_scale``, ``use_relative_rope``, ``method``,
    ``original_seq_len`` and ``temporal_offset`` to every layer: honoured, each chunk equals
    their attention at full budget (their window-relative rotation over a window from frame 0
    is the absolute one, which ``positions="relative"`` also gives under its budget)."""
    theirs = longlive2(**rope)
    ours = copy.deepcopy(theirs)
    positions = "relative" if rope.get("use_relative_rope") else "absolute"
    patch_causal_wan(ours, FULL, max_frames=20, positions=positions)
    inputs = chunks(6, seed=7)
    want = StandinLongLivePipeline(theirs, buffer_tokens=6 * CHUNK).inference(inputs, GRID, FREQS)
    got = StandinLongLivePipeline(ours, buffer_tokens=6 * CHUNK).inference(inputs, GRID, FREQS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    plain = StandinLongLivePipeline(longlive2(), buffer_tokens=6 * CHUNK).inference(inputs, GRID, FREQS)
    assert not torch.allclose(plain[-1], want[-1], atol=1e-3)  # the options change the video


def test_longlive2_misuse_is_refused_clearly():
    inputs = chunks(2, seed=1)
    for rope, error, match in (
        (
            dict(use_relative_rope=True),
            ValueError,
            r"use_relative_rope=True\): patch it with .*positions='relative'",
        ),
        (dict(rope_method="ntk"), ValueError, "only LongLive-2.0's linear temporal RoPE"),
        (dict(t_scale=0.0), ValueError, "t_scale must be a positive number"),
        (dict(rope_temporal_offset=torch.zeros(1, 4)), ValueError, r"temporal_offset per sample"),
    ):
        ours = longlive2(**rope)
        patch_causal_wan(ours, FULL, max_frames=20)
        with pytest.raises(error, match=match):
            StandinLongLivePipeline(ours, buffer_tokens=2 * CHUNK).inference(inputs, GRID, FREQS)
    ours = longlive2(t_scale=0.5)
    patch_causal_wan(ours, FULL, max_frames=20)
    pipeline = StandinLongLivePipeline(ours, buffer_tokens=4 * CHUNK)
    pipeline.inference(inputs, GRID, FREQS)
    ours.t_scale = 0.25
    with pytest.raises(ValueError, match=r"t_scale changed from 0\.5 to 0\.25 mid-run"):
        pipeline.inference(inputs, GRID, FREQS)


def test_longlive2_rotates_with_its_own_function_bit_for_bit():
    """LongLive-2.0 rotates in float32 (a Triton kernel) by default: the patch finds the
    ``causal_rope_apply`` of the layer's own module and rotates the chunk with it, so the keys it
    keeps are their keys bit for bit (float64 rotation differs in the last bits)."""
    from . import longlive2_fp32_standin as fp32

    torch.manual_seed(0)
    theirs = fp32.Fp32RopeModel(num_layers=2, dim=DIM, num_heads=HEADS)
    theirs.t_scale, theirs.rope_temporal_offset = 0.75, 2.0
    ours = copy.deepcopy(theirs)
    patch_causal_wan(ours, FULL, max_frames=20)
    inputs = chunks(4, seed=3)
    before = fp32.CALLS[0]
    pipeline = StandinLongLivePipeline(theirs, buffer_tokens=4 * CHUNK)
    want = pipeline.inference(inputs, GRID, FREQS)
    calls = fp32.CALLS[0] - before
    mine = StandinLongLivePipeline(ours, buffer_tokens=4 * CHUNK)
    got = mine.inference(inputs, GRID, FREQS)
    assert fp32.CALLS[0] - before == 2 * calls > 0  # q and k of every layer's every call, as theirs
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    # Their kept keys and ours, layer 0, bit for bit (their cache dict holds theirs).
    cache = mine.kv_cache1[0]["omnimem"]
    kept = cache.k[:, :, : cache.history_len].transpose(1, 2)
    torch.testing.assert_close(kept, pipeline.kv_cache1[0]["k"][:, : cache.history_len], atol=0, rtol=0)
